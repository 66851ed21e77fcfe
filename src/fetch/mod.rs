//! One shared HTTP client with every limit the worker relies on: connect and
//! total timeouts, a redirect cap, a streamed body cap, no environment
//! proxies, and the network guard applied where the connection is made.

pub mod guard;

use std::error::Error as StdError;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::HeaderMap;
use reqwest::redirect;
use sha2::{Digest, Sha256};
use url::{Host, Url};

use crate::classify::{Status, Verdict};
use crate::config::FetchSettings;

pub const DEFAULT_USER_AGENT: &str = concat!("avatar-warden/", env!("CARGO_PKG_VERSION"));

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
    Connect(String),
    #[error("DNS lookup failed: {0}")]
    Dns(String),
    #[error("more than {0} redirects")]
    TooManyRedirects(usize),
    #[error("redirect to a non-http(s) URL")]
    BadRedirect,
    #[error("body larger than {0} bytes")]
    TooLarge(u64),
    #[error("connection broke while reading the body: {0}")]
    Body(String),
    #[error("request failed: {0}")]
    Other(String),
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
        let (status, code) = match self {
            FetchError::Blocked(class) => {
                return Verdict::new(Status::Blocked, "non_public_address").with_detail(*class);
            }
            FetchError::NotAllowed(why) => {
                return Verdict::new(Status::Blocked, "not_allowed").with_detail(why.clone());
            }
            FetchError::Timeout => (Status::Failing, "timeout"),
            FetchError::Connect(_) => (Status::Failing, "connect_error"),
            FetchError::Dns(_) => (Status::Failing, "dns_error"),
            FetchError::Body(_) => (Status::Failing, "body_error"),
            FetchError::Other(_) => (Status::Failing, "request_error"),
            FetchError::TooManyRedirects(_) => (Status::Invalid, "too_many_redirects"),
            FetchError::BadRedirect => (Status::Invalid, "bad_redirect"),
            FetchError::TooLarge(limit) => {
                return Verdict::new(Status::Invalid, "too_large")
                    .with_detail(format!("over {limit} bytes"));
            }
        };
        Verdict::new(status, code).with_detail(self.to_string())
    }
}

/// Raised inside the resolver and redirect hook, recognised again in the error chain.
#[derive(Debug)]
struct BlockedAddress(&'static str);
impl std::fmt::Display for BlockedAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} address refused", self.0)
    }
}
impl StdError for BlockedAddress {}

#[derive(Debug)]
struct DnsFailure(String);
impl std::fmt::Display for DnsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl StdError for DnsFailure {}

#[derive(Debug)]
struct RedirectRefused(FetchError);
impl std::fmt::Display for RedirectRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
impl StdError for RedirectRefused {}

/// Resolves with the system resolver and drops every non-public answer, so the
/// address checked is the address connected to (no DNS-rebinding window).
struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let answers = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| {
                    Box::new(DnsFailure(format!("{host}: {e}"))) as Box<dyn StdError + Send + Sync>
                })?;
            let mut allowed: Vec<SocketAddr> = Vec::new();
            let mut refused = None;
            for addr in answers {
                match guard::non_public_class(addr.ip()) {
                    Some(class) => refused = refused.or(Some(class)),
                    None => allowed.push(addr),
                }
            }
            if allowed.is_empty() {
                let err: Box<dyn StdError + Send + Sync> = match refused {
                    Some(class) => Box::new(BlockedAddress(class)),
                    None => Box::new(DnsFailure(format!("{host}: no addresses"))),
                };
                return Err(err);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// IP-literal hosts never reach the resolver: check them directly. The `url`
/// crate has already normalised odd spellings (`2130706433`, `0x7f.1`, `127.1`).
fn literal_host_class(url: &Url) -> Option<&'static str> {
    match url.host()? {
        Host::Ipv4(v4) => guard::non_public_class(IpAddr::V4(v4)),
        Host::Ipv6(v6) => guard::non_public_class(IpAddr::V6(v6)),
        Host::Domain(d) => {
            // Resolvers answer *.localhost with loopback without asking DNS.
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            (d == "localhost" || d.ends_with(".localhost")).then_some("loopback")
        }
    }
}

/// A fully read, size-capped body and its sha256, computed while streaming.
#[derive(Debug, Clone)]
pub struct Body {
    pub bytes: Bytes,
    pub sha256: String,
}

#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    max_bytes: u64,
    allow_private: bool,
    url_policy: guard::UrlPolicy,
}

impl FetchSettings {
    /// Builds the one HTTP client of the process.
    pub fn client(&self) -> Result<Fetcher, FetchError> {
        let max_redirects = self.max_redirects;
        let allow_private = self.allow_private_networks;
        let url_policy = self.url_policy();
        let hop_policy = url_policy.clone();
        let policy = redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > max_redirects {
                return attempt.error(RedirectRefused(FetchError::TooManyRedirects(max_redirects)));
            }
            if !matches!(attempt.url().scheme(), "http" | "https") {
                return attempt.error(RedirectRefused(FetchError::BadRedirect));
            }
            if !allow_private && let Some(class) = literal_host_class(attempt.url()) {
                return attempt.error(RedirectRefused(FetchError::Blocked(class)));
            }
            if let Err(why) = hop_policy.check(attempt.url()) {
                return attempt.error(RedirectRefused(FetchError::NotAllowed(why)));
            }
            attempt.follow()
        });
        let mut builder = reqwest::Client::builder()
            .user_agent(self.user_agent.as_deref().unwrap_or(DEFAULT_USER_AGENT))
            .connect_timeout(Duration::from_secs(self.connect_timeout_secs.max(1)))
            .timeout(Duration::from_secs(self.timeout_secs.max(1)))
            .redirect(policy)
            // Proxies from the environment would route around the guard.
            .no_proxy()
            .pool_max_idle_per_host(self.concurrency.max(1))
            .tcp_nodelay(true);
        if !allow_private {
            builder = builder.dns_resolver(Arc::new(GuardedResolver));
        }
        if let Some(proxy) = &self.proxy {
            let proxy = reqwest::Proxy::all(proxy.as_str())
                .map_err(|e| FetchError::Other(format!("fetch.proxy: {e}")))?;
            builder = builder.proxy(proxy);
        }
        let client = builder
            .build()
            .map_err(|e| FetchError::Other(e.to_string()))?;
        Ok(Fetcher {
            client,
            max_bytes: self.max_bytes,
            allow_private,
            url_policy,
        })
    }

    pub fn url_policy(&self) -> guard::UrlPolicy {
        guard::UrlPolicy {
            allowed_ports: self.allowed_ports.clone(),
            allowed_hosts: self.allowed_hosts.clone(),
            denied_hosts: self.denied_hosts.clone(),
        }
    }
}

impl Fetcher {
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Sends a GET and returns once the headers are in; the body is read
    /// separately so a verdict from the headers never downloads it.
    pub async fn get(&self, url: &Url) -> Result<reqwest::Response, FetchError> {
        self.send(reqwest::Method::GET, url, HeaderMap::new()).await
    }

    /// Sends `method` with extra request headers (validators for a
    /// conditional GET), under the same guard, limits and redirect policy.
    pub async fn send(
        &self,
        method: reqwest::Method,
        url: &Url,
        headers: HeaderMap,
    ) -> Result<reqwest::Response, FetchError> {
        if !self.allow_private
            && let Some(class) = literal_host_class(url)
        {
            return Err(FetchError::Blocked(class));
        }
        self.url_policy.check(url).map_err(FetchError::NotAllowed)?;
        self.client
            .request(method, url.clone())
            .headers(headers)
            .send()
            .await
            .map_err(map_reqwest_error)
    }

    /// Reads the body up to the cap, hashing as it streams. A declared length
    /// over the cap is refused before reading a byte.
    pub async fn read_body(&self, mut response: reqwest::Response) -> Result<Body, FetchError> {
        if let Some(len) = response.content_length()
            && len > self.max_bytes
        {
            return Err(FetchError::TooLarge(self.max_bytes));
        }
        let hint = response
            .content_length()
            .unwrap_or(64 * 1024)
            .min(self.max_bytes);
        let mut buf = Vec::with_capacity(hint as usize);
        let mut hasher = Sha256::new();
        while let Some(chunk) = response.chunk().await.map_err(map_reqwest_error)? {
            if (buf.len() + chunk.len()) as u64 > self.max_bytes {
                return Err(FetchError::TooLarge(self.max_bytes));
            }
            hasher.update(&chunk);
            buf.extend_from_slice(&chunk);
        }
        Ok(Body {
            bytes: Bytes::from(buf),
            sha256: hex::encode(hasher.finalize()),
        })
    }
}

fn map_reqwest_error(err: reqwest::Error) -> FetchError {
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
            return FetchError::Dns(d.0.clone());
        }
        source = e.source();
    }
    let detail = error_chain(&err);
    if err.is_timeout() {
        FetchError::Timeout
    } else if err.is_connect() {
        if detail.contains("dns error") || detail.contains("failed to lookup") {
            FetchError::Dns(detail)
        } else {
            FetchError::Connect(detail)
        }
    } else if err.is_body() || err.is_decode() {
        FetchError::Body(detail)
    } else {
        FetchError::Other(detail)
    }
}

fn error_chain(err: &dyn StdError) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_ip_literal_spellings_are_normalised_before_the_guard() {
        for raw in [
            "http://127.0.0.1/a",
            "http://2130706433/a",
            "http://0x7f.1/a",
            "http://127.1/a",
            "http://[::ffff:7f00:1]/a",
            "http://[::1]/a",
            "http://localhost/a",
            "http://LOCALHOST./a",
        ] {
            let url = Url::parse(raw).unwrap();
            assert_eq!(literal_host_class(&url), Some("loopback"), "{raw}");
        }
        let url = Url::parse("http://169.254.169.254/latest/meta-data").unwrap();
        assert_eq!(literal_host_class(&url), Some("link_local"));
        assert_eq!(
            literal_host_class(&Url::parse("https://thirdwx.qlogo.cn/x").unwrap()),
            None
        );
    }

    proptest::proptest! {
        /// However an IPv4 address is spelled (dotted, one decimal number,
        /// hex octets), the guard judges the address it means.
        #[test]
        fn every_spelling_of_an_ipv4_address_gets_the_same_judgement(ip in proptest::prelude::any::<u32>()) {
            let addr = std::net::Ipv4Addr::from(ip);
            let want = guard::non_public_class(IpAddr::V4(addr));
            let o = addr.octets();
            for spelling in [
                format!("http://{addr}/a"),
                format!("http://{ip}/a"),
                format!("http://0x{:x}.0x{:x}.0x{:x}.0x{:x}/a", o[0], o[1], o[2], o[3]),
                format!("http://[::ffff:{addr}]/a"),
            ] {
                let url = Url::parse(&spelling).unwrap();
                proptest::prop_assert_eq!(literal_host_class(&url), want, "{}", spelling);
            }
        }

        /// Whatever is stored in the avatar column, parsing gives a URL or a reason.
        #[test]
        fn any_avatar_string_parses_or_gets_a_reason(raw in ".{0,300}") {
            if let Err(v) = crate::classify::parse_avatar_url(&raw) {
                proptest::prop_assert_eq!(v.status, Status::Invalid);
            }
        }
    }

    #[test]
    fn errors_know_whether_they_are_transient_and_their_verdict() {
        assert!(FetchError::Timeout.is_transient());
        assert!(FetchError::Connect("reset".into()).is_transient());
        assert!(!FetchError::TooLarge(10).is_transient());
        assert!(!FetchError::Blocked("loopback").is_transient());
        assert_eq!(FetchError::Timeout.verdict().status, Status::Failing);
        assert_eq!(FetchError::TooLarge(10).verdict().code, "too_large");
        let blocked = FetchError::Blocked("private").verdict();
        assert_eq!(
            (blocked.status, blocked.detail.as_deref()),
            (Status::Blocked, Some("private"))
        );
    }
}
