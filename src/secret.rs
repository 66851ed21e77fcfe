//! Secrets in the configuration. Redaction is a property of the type: a
//! `Secret` or `SecretUrl` prints as `REDACTED` through `Debug`, `Display`
//! and `Serialize` alike, so `config`, logs and error messages cannot show
//! one by accident, and a new secret-bearing key only has to use the type.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

pub const REDACTED: &str = "REDACTED";

/// A password, key or token. Read with `expose` where it is used, only there.
#[derive(Clone, Deserialize)]
#[serde(from = "String")]
pub struct Secret(SecretString);

impl Secret {
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    pub fn is_empty(&self) -> bool {
        self.expose().trim().is_empty()
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(SecretString::from(s))
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret::from(s.to_string())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // An empty value is shown as empty: "not set" is worth knowing.
        s.serialize_str(if self.is_empty() { "" } else { REDACTED })
    }
}

/// A URL that may carry credentials: a password in its user-info, a token
/// in its query (`?token=…`, `?password=…`). Connect with `expose`; printed,
/// it shows with those parts replaced by `REDACTED` (`redacted`).
#[derive(Clone, Deserialize)]
#[serde(from = "String")]
pub struct SecretUrl(Secret);

impl SecretUrl {
    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    pub fn redacted(&self) -> String {
        redact_url(self.expose())
    }
}

impl From<String> for SecretUrl {
    fn from(s: String) -> Self {
        SecretUrl(Secret::from(s))
    }
}

impl From<&str> for SecretUrl {
    fn from(s: &str) -> Self {
        SecretUrl::from(s.to_string())
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// Query parameters whose values are credentials in the URLs operators use
/// (database drivers, webhook receivers, cloud endpoints).
fn is_secret_param(key: &str) -> bool {
    const WORDS: &[&str] = &[
        "password",
        "passwd",
        "pass",
        "pwd",
        "secret",
        "token",
        "key",
        "sig",
        "signature",
        "auth",
        "credential",
        "session",
    ];
    let key = key.to_ascii_lowercase();
    WORDS.iter().any(|w| key.contains(w))
}

/// A URL with its password and credential-like query values replaced. A
/// value that does not parse as a URL shows nothing of itself.
pub fn redact_url(raw: &str) -> String {
    if raw.trim().is_empty() {
        return String::new();
    }
    let Ok(mut u) = url::Url::parse(raw.trim()) else {
        return REDACTED.to_string();
    };
    if u.password().is_some() {
        let _ = u.set_password(Some(REDACTED));
    }
    if u.query().is_some() {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_secret_param(&k) {
                    REDACTED.to_string()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_print_as_redacted_everywhere() {
        let s = Secret::from("hunter2");
        assert_eq!(format!("{s} {s:?}"), "REDACTED REDACTED");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"REDACTED\"");
        assert_eq!(s.expose(), "hunter2");
        assert_eq!(serde_json::to_string(&Secret::from("")).unwrap(), "\"\"");
    }

    #[test]
    fn urls_keep_their_shape_without_their_credentials() {
        let u =
            SecretUrl::from("postgres://warden:hunter2@db:5432/app?sslmode=require&password=x2");
        let shown = format!("{u} {u:?} {}", serde_json::to_string(&u).unwrap());
        assert!(
            !shown.contains("hunter2") && !shown.contains("x2"),
            "{shown}"
        );
        assert!(
            shown.contains(
                "postgres://warden:REDACTED@db:5432/app?sslmode=require&password=REDACTED"
            ),
            "{shown}"
        );
        let hook = SecretUrl::from("https://hooks.example/in?token=abc123&team=ops");
        assert_eq!(
            hook.redacted(),
            "https://hooks.example/in?token=REDACTED&team=ops"
        );
        assert_eq!(SecretUrl::from("not a url hunter2").redacted(), "REDACTED");
    }
}
