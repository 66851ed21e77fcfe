//! Why a request produced no usable response, with its cause kept: the
//! verdict's detail is the cause chain's text, `source()` the cause itself.

use std::error::Error as StdError;

use crate::model::{Cause, Reason, Verdict};

/// Why a request produced no usable response. Classifies itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("destination refused by the network guard: {0} address")]
    Blocked(&'static str),
    #[error("destination refused: {0}")]
    NotAllowed(String),
    #[error("timed out")]
    Timeout,
    #[error("cannot connect: {0}")]
    Connect(#[source] Cause),
    #[error("DNS lookup failed: {0}")]
    Dns(#[source] Cause),
    #[error("more than {0} redirects")]
    TooManyRedirects(usize),
    #[error("redirect to a non-http(s) URL")]
    BadRedirect,
    #[error("body larger than {0} bytes")]
    TooLarge(u64),
    #[error("connection broke while reading the body: {0}")]
    Body(#[source] Cause),
    #[error("request failed: {0}")]
    Other(#[source] Cause),
}

impl FetchError {
    /// Worth asking again later: the network or the server may recover.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            FetchError::Timeout
                | FetchError::Connect(_)
                | FetchError::Dns(_)
                | FetchError::Body(_)
                | FetchError::Other(_)
        )
    }

    pub fn verdict(&self) -> Verdict {
        let reason = match self {
            FetchError::Blocked(class) => {
                return Verdict::new(Reason::NonPublicAddress).with_detail(*class);
            }
            FetchError::NotAllowed(why) => {
                return Verdict::new(Reason::NotAllowed).with_detail(why.clone());
            }
            FetchError::TooLarge(limit) => {
                return Verdict::new(Reason::TooLarge).with_detail(format!("over {limit} bytes"));
            }
            FetchError::Timeout => Reason::Timeout,
            FetchError::Connect(_) => Reason::ConnectError,
            FetchError::Dns(_) => Reason::DnsError,
            FetchError::Body(_) => Reason::BodyError,
            FetchError::Other(_) => Reason::RequestError,
            FetchError::TooManyRedirects(_) => Reason::TooManyRedirects,
            FetchError::BadRedirect => Reason::BadRedirect,
        };
        Verdict::new(reason).with_detail(self.to_string())
    }
}

/// Raised inside the resolver and redirect hook, recognised again in the error chain.
#[derive(Debug)]
pub(super) struct BlockedAddress(pub(super) &'static str);
impl std::fmt::Display for BlockedAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} address refused", self.0)
    }
}
impl StdError for BlockedAddress {}

/// A name that did not resolve: the host and the resolver's own error.
#[derive(Debug)]
pub(super) struct DnsFailure {
    host: String,
    source: Cause,
}

impl DnsFailure {
    pub(super) fn new(host: &str, source: impl Into<Cause>) -> Self {
        DnsFailure {
            host: host.to_owned(),
            source: source.into(),
        }
    }
}

impl std::fmt::Display for DnsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.host, self.source)
    }
}

impl StdError for DnsFailure {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.source)
    }
}

#[derive(Debug)]
pub(super) struct RedirectRefused(pub(super) FetchError);
impl std::fmt::Display for RedirectRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
impl StdError for RedirectRefused {}

pub(super) fn map_reqwest_error(err: reqwest::Error) -> FetchError {
    // Our own errors travel inside reqwest's source chain: find them first.
    let mut source: Option<&(dyn StdError + 'static)> = err.source();
    while let Some(e) = source {
        if let Some(b) = e.downcast_ref::<BlockedAddress>() {
            return FetchError::Blocked(b.0);
        }
        if let Some(r) = e.downcast_ref::<RedirectRefused>() {
            return r.0.clone();
        }
        if let Some(d) = e.downcast_ref::<DnsFailure>() {
            return FetchError::Dns(Cause::text(d));
        }
        source = e.source();
    }
    if err.is_timeout() {
        return FetchError::Timeout;
    }
    let (connect, body) = (err.is_connect(), err.is_body() || err.is_decode());
    let cause = Cause::new(err);
    let text = cause.to_string();
    if connect {
        if text.contains("dns error") || text.contains("failed to lookup") {
            FetchError::Dns(cause)
        } else {
            FetchError::Connect(cause)
        }
    } else if body {
        FetchError::Body(cause)
    } else {
        FetchError::Other(cause)
    }
}
