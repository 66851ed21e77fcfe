//! One shared HTTP client with every limit the worker relies on: connect and
//! total timeouts, a redirect cap, a streamed body cap, no environment
//! proxies, and the network guard applied where the connection is made.

mod error;
pub(crate) mod guard;
pub(crate) mod hosts;

pub(crate) use crate::model::Cause;
pub(crate) use error::FetchError;
use error::{BlockedAddress, DnsFailure, RedirectRefused, map_reqwest_error};

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

use crate::config::FetchSettings;
#[cfg(test)]
use crate::model::Status;

pub(crate) const DEFAULT_USER_AGENT: &str = concat!("avatar-warden/", env!("CARGO_PKG_VERSION"));

/// The client for services the operator configured (sinks, the
/// Pushgateway), as opposed to avatar hosts: no redirects, and never a proxy
/// from the environment: signed bodies and admin secrets go only where the
/// config says.
pub(crate) fn service_client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.clamp(Duration::from_secs(1), Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(DEFAULT_USER_AGENT)
        .build()
}

/// Where names are looked up: the system resolver, or (in tests) a fixed
/// table standing in for DNS answers.
#[derive(Clone, Default)]
enum Lookup {
    #[default]
    System,
    #[cfg(test)]
    Fixed(std::collections::HashMap<String, Vec<IpAddr>>),
}

impl Lookup {
    async fn addrs(&self, host: &str) -> std::io::Result<Vec<SocketAddr>> {
        match self {
            Lookup::System => Ok(tokio::net::lookup_host((host, 0)).await?.collect()),
            #[cfg(test)]
            Lookup::Fixed(table) => table
                .get(host)
                .map(|ips| ips.iter().map(|ip| SocketAddr::new(*ip, 0)).collect())
                .ok_or_else(|| std::io::Error::other("no such host")),
        }
    }
}

/// Resolves and drops every non-public answer, so the address checked is the
/// address connected to (no DNS-rebinding window). The operator's own proxy
/// is exempt: an in-cluster egress proxy has a private address by design.
struct GuardedResolver {
    lookup: Lookup,
    proxy_host: Option<String>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        let lookup = self.lookup.clone();
        let exempt = self
            .proxy_host
            .as_deref()
            .is_some_and(|p| p.eq_ignore_ascii_case(host.trim_end_matches('.')));
        Box::pin(async move {
            let answers = lookup.addrs(&host).await.map_err(|e| {
                Box::new(DnsFailure::new(&host, e)) as Box<dyn StdError + Send + Sync>
            })?;
            let mut allowed: Vec<SocketAddr> = Vec::new();
            let mut refused = None;
            for addr in answers {
                match guard::non_public_class(addr.ip()) {
                    Some(class) if !exempt => refused = refused.or(Some(class)),
                    _ => allowed.push(addr),
                }
            }
            if allowed.is_empty() {
                let err: Box<dyn StdError + Send + Sync> = match refused {
                    Some(class) => Box::new(BlockedAddress(class)),
                    None => Box::new(DnsFailure::new(&host, "no addresses")),
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
    /// The configured proxy's host: never an avatar destination.
    proxy_host: Option<String>,
}

impl FetchSettings {
    /// Builds the one HTTP client of the process.
    pub fn client(&self) -> Result<Fetcher, FetchError> {
        self.client_with(Lookup::System)
    }

    fn client_with(&self, lookup: Lookup) -> Result<Fetcher, FetchError> {
        let max_redirects = self.max_redirects;
        let allow_private = self.allow_private_networks;
        let url_policy = self.url_policy();
        let hop_policy = url_policy.clone();
        let proxy = self
            .proxy
            .as_ref()
            .map(|p| crate::config::parse_proxy(p.expose()))
            .transpose()
            .map_err(|why| FetchError::Other(Cause::text(why)))?;
        let proxy_host = proxy
            .as_ref()
            .and_then(|p| p.host_str())
            .map(|h| h.trim_end_matches('.').to_ascii_lowercase());
        let hop_proxy_host = proxy_host.clone();
        let policy = redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > max_redirects {
                return attempt.error(RedirectRefused(FetchError::TooManyRedirects(max_redirects)));
            }
            if !matches!(attempt.url().scheme(), "http" | "https") {
                return attempt.error(RedirectRefused(FetchError::BadRedirect));
            }
            if !allow_private
                && let Err(e) = guard_destination(attempt.url(), hop_proxy_host.as_deref())
            {
                return attempt.error(RedirectRefused(e));
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
            builder = builder.dns_resolver(Arc::new(GuardedResolver {
                lookup,
                proxy_host: proxy_host.clone(),
            }));
        }
        if let Some(proxy) = &proxy {
            let proxy = reqwest::Proxy::all(proxy.as_str())
                .map_err(|e| FetchError::Other(Cause::new(e).context("fetch.proxy")))?;
            builder = builder.proxy(proxy);
        }
        let client = builder
            .build()
            .map_err(|e| FetchError::Other(Cause::new(e)))?;
        Ok(Fetcher {
            client,
            max_bytes: self.max_bytes,
            allow_private,
            url_policy,
            proxy_host,
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

/// The checks a destination gets before any connection: IP literals and
/// `localhost` names by address class, and never the proxy itself (its
/// name is exempt from the resolver's guard).
fn guard_destination(url: &Url, proxy_host: Option<&str>) -> Result<(), FetchError> {
    if let Some(class) = literal_host_class(url) {
        return Err(FetchError::Blocked(class));
    }
    let host = url.host_str().unwrap_or_default().trim_end_matches('.');
    if proxy_host.is_some_and(|p| p.eq_ignore_ascii_case(host)) {
        return Err(FetchError::NotAllowed(format!(
            "host {host} is the configured fetch.proxy"
        )));
    }
    Ok(())
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
        if !self.allow_private {
            guard_destination(url, self.proxy_host.as_deref())?;
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
        let mut buf = Vec::with_capacity(usize::try_from(hint).unwrap_or(0));
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

/// Reads at most `max` bytes of a body as text (lossy): for replies and
/// error bodies of servers we talk to (sinks, the Pushgateway), which must
/// not be able to exhaust memory with an endless answer.
pub(crate) async fn capped_text(mut response: reqwest::Response, max: usize) -> String {
    let mut buf = Vec::new();
    while buf.len() < max {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = max - buf.len();
                buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests;
