//! An error's cause, kept with its chain: for error enums whose variants
//! carry "what went wrong underneath" without flattening it to a string.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

/// An error's cause, kept (shared, so a verdict's error can be cloned).
/// Its text is the whole chain, each cause said once.
#[derive(Debug, Clone)]
pub struct Cause {
    context: Option<&'static str>,
    error: Arc<dyn StdError + Send + Sync + 'static>,
}

/// A cause we describe ourselves (no underlying error value).
#[derive(Debug)]
struct Said(String);

impl fmt::Display for Said {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for Said {}

impl Cause {
    pub fn new(error: impl StdError + Send + Sync + 'static) -> Self {
        Cause {
            context: None,
            error: Arc::new(error),
        }
    }

    /// A cause known only by its text (an error already rendered elsewhere).
    pub fn text(text: impl fmt::Display) -> Self {
        Cause::new(Said(text.to_string()))
    }

    /// Names what was being done ("fetch.proxy").
    #[must_use]
    pub fn context(mut self, what: &'static str) -> Self {
        self.context = Some(what);
        self
    }
}

impl From<&str> for Cause {
    fn from(text: &str) -> Self {
        Cause::text(text)
    }
}

impl From<std::io::Error> for Cause {
    fn from(e: std::io::Error) -> Self {
        Cause::new(e)
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(what) = self.context {
            write!(f, "{what}: ")?;
        }
        f.write_str(&error_chain(&*self.error))
    }
}

impl StdError for Cause {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.error)
    }
}

/// Causes compare by what they say (tests, and `FetchError: Eq`).
impl PartialEq for Cause {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

impl Eq for Cause {}

/// An error and its causes as one line; a cause its parent already quotes
/// is not said again (reqwest's own text says only "error sending request").
pub(crate) fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}
