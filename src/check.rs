//! Checking one URL: provider rules before and after the request, retries
//! within the run, and politeness per host. Never stores, never errors: every
//! outcome is a verdict, with the rule that decided it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use url::Url;

use crate::classify::{self, HeadDecision, Status, Verdict};
use crate::config::{ConfigError, FetchSettings, MediaSettings, RetrySettings, Settings};
use crate::fetch::{Body, FetchError, Fetcher};
use crate::media::{self, ImageInfo};
use crate::providers::{ProviderRule, Providers};

/// Headers `check` shows: the ones rules read, and the ones people ask about.
const RELEVANT_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "x-errno",
    "x-info",
    "retry-after",
    "etag",
    "last-modified",
];

/// What one look at a URL found, before anything is stored.
#[derive(Debug, Clone)]
pub struct Examination {
    pub verdict: Verdict,
    /// The rule that decided, in words (`check` prints it).
    pub decided_by: String,
    /// The provider rule the URL matched, if any.
    pub provider: Option<String>,
    pub http_status: Option<StatusCode>,
    /// The URL the picture came from (the largest size may differ from the stored URL).
    pub fetched_url: Option<Url>,
    pub headers: Vec<(String, String)>,
    /// A valid picture, ready to store (also kept for `deprecated_host`).
    pub image: Option<(ImageInfo, Body)>,
    /// When the URL's signature expires, if it has one.
    pub expires_at: Option<i64>,
    /// Requests sent, retries included.
    pub requests: u32,
    /// Time spent in requests and body reads (retries included, waits between them not).
    pub fetch_time: Duration,
    /// Response body bytes read, retries included.
    pub bytes_read: u64,
    /// Server asked us to wait (429/503 Retry-After).
    retry_after: Option<Duration>,
}

impl Examination {
    fn decided(verdict: Verdict, decided_by: impl Into<String>) -> Self {
        Examination {
            verdict,
            decided_by: decided_by.into(),
            provider: None,
            http_status: None,
            fetched_url: None,
            headers: Vec::new(),
            image: None,
            expires_at: None,
            requests: 0,
            fetch_time: Duration::ZERO,
            bytes_read: 0,
            retry_after: None,
        }
    }

    /// Worth another attempt within this run.
    fn retryable(&self) -> bool {
        self.verdict.status == Status::Failing
            && matches!(
                self.verdict.code,
                "server_error"
                    | "request_timeout"
                    | "rate_limited"
                    | "timeout"
                    | "connect_error"
                    | "body_error"
                    | "dns_error"
            )
    }
}

/// Per-host politeness for one scan: a concurrency cap and a minimum interval
/// between request starts; a 429 doubles that host's interval.
pub struct HostLimiter {
    per_host: usize,
    min_interval: Duration,
    hosts: Mutex<HashMap<String, Arc<HostGate>>>,
}

struct HostGate {
    slots: Arc<Semaphore>,
    /// (earliest next start, current interval)
    pace: Mutex<(Instant, Duration)>,
}

/// Slowest a 429 can make one host: one request per minute.
const MAX_HOST_INTERVAL: Duration = Duration::from_secs(60);

impl HostLimiter {
    pub fn new(settings: &FetchSettings) -> Self {
        HostLimiter {
            per_host: settings.per_host_concurrency.max(1),
            min_interval: Duration::from_millis(settings.per_host_min_interval_ms),
            hosts: Mutex::new(HashMap::new()),
        }
    }

    fn gate(&self, host: &str) -> Arc<HostGate> {
        let mut hosts = self.hosts.lock().expect("host limiter lock");
        hosts
            .entry(host.to_string())
            .or_insert_with(|| {
                Arc::new(HostGate {
                    slots: Arc::new(Semaphore::new(self.per_host)),
                    pace: Mutex::new((Instant::now(), self.min_interval)),
                })
            })
            .clone()
    }

    /// Waits for a slot and for the host's pace; hold the permit during the request.
    pub async fn acquire(&self, host: &str) -> OwnedSemaphorePermit {
        let gate = self.gate(host);
        let permit = gate
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let start = {
            let mut pace = gate.pace.lock().expect("pace lock");
            let now = Instant::now();
            let start = pace.0.max(now);
            pace.0 = start + pace.1;
            start
        };
        tokio::time::sleep_until(start.into()).await;
        permit
    }

    /// The host said 429: halve its rate for the rest of the scan.
    pub fn slow_down(&self, host: &str) {
        let gate = self.gate(host);
        let mut pace = gate.pace.lock().expect("pace lock");
        pace.1 = (pace.1 * 2)
            .max(Duration::from_secs(1))
            .min(MAX_HOST_INTERVAL);
    }

    pub fn interval(&self, host: &str) -> Duration {
        self.gate(host).pace.lock().expect("pace lock").1
    }
}

/// Everything needed to check a URL, built once per process.
#[derive(Clone)]
pub struct Checker {
    fetcher: Fetcher,
    fetch_settings: FetchSettings,
    media: MediaSettings,
    providers: Arc<Providers>,
    retry: RetrySettings,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("building the HTTP client: {0}")]
    Fetch(#[from] FetchError),
}

impl Checker {
    pub fn new(settings: &Settings) -> Result<Self, CheckerError> {
        let providers =
            Providers::load(settings.providers.file.as_deref().map(std::path::Path::new))?;
        Ok(Checker {
            fetcher: settings.fetch.client()?,
            fetch_settings: settings.fetch.clone(),
            media: settings.media.clone(),
            providers: Arc::new(providers),
            retry: settings.retry.clone(),
        })
    }

    /// Politeness state for one scan (a 429 slows a host for that scan only).
    pub fn host_limiter(&self) -> HostLimiter {
        HostLimiter::new(&self.fetch_settings)
    }

    /// The provider rule name a URL falls under, if any.
    pub fn provider_of(&self, raw_url: &str) -> Option<String> {
        let url = Url::parse(raw_url.trim()).ok()?;
        self.providers.find(&url).map(|r| r.name.clone())
    }

    pub fn providers(&self) -> &Providers {
        &self.providers
    }

    /// Fetch, classify and validate one URL, applying the provider's rules.
    pub async fn examine(&self, raw_url: &str, now: i64, hosts: &HostLimiter) -> Examination {
        let url = match classify::parse_avatar_url(raw_url) {
            Ok(u) => u,
            Err(v) => return Examination::decided(v, "URL rules"),
        };
        let Some(rule) = self.providers.find(&url) else {
            return self.fetch_with_retries(&url, None, hosts).await;
        };
        let by = |what: &str| format!("provider {}: {what}", rule.name);
        let with_provider = |mut e: Examination| {
            e.provider = Some(rule.name.clone());
            e
        };
        if rule.is_default_avatar(&url) {
            let v = Verdict::new(Status::Invalid, "default_avatar");
            return with_provider(Examination::decided(v, by("default_avatar_paths")));
        }
        let expires_at = rule.signature_expiry(&url);
        if let Some(t) = expires_at
            && t <= now
        {
            let param = rule.expiry_param.as_deref().unwrap_or_default();
            let v = Verdict::new(Status::Expired, "signature_expired")
                .with_detail(format!("{param} passed at {}", format_time(t)));
            let mut e = with_provider(Examination::decided(
                v,
                by(&format!("expiry_param {param}")),
            ));
            e.expires_at = expires_at;
            return e;
        }
        // The largest size first: it may fail while the stored size works, and
        // the verdict is about the stored URL.
        if let Some(largest) = rule.largest_size_url(&url) {
            let e = self.fetch_with_retries(&largest, Some(rule), hosts).await;
            if e.verdict.status == Status::Mirrored {
                let mut e = with_provider(e);
                e.decided_by = by("size_segment (largest size /0)");
                return e;
            }
        }
        let mut e = with_provider(self.fetch_with_retries(&url, Some(rule), hosts).await);
        e.expires_at = expires_at;
        if rule.deprecated && e.image.is_some() {
            // Keep the picture while the host still serves it, and ask the user to log in again.
            e.verdict = Verdict::new(Status::Expired, "deprecated_host")
                .with_detail(url.host_str().unwrap_or_default());
            e.decided_by = by("deprecated");
        }
        e
    }

    async fn fetch_with_retries(
        &self,
        url: &Url,
        rule: Option<&ProviderRule>,
        hosts: &HostLimiter,
    ) -> Examination {
        let host = url.host_str().unwrap_or_default().to_string();
        let mut requests = 0;
        let mut attempt = 0;
        let (mut fetch_time, mut bytes_read) = (Duration::ZERO, 0);
        loop {
            let permit = hosts.acquire(&host).await;
            let started = Instant::now();
            let mut e = self.fetch_once(url, rule).await;
            drop(permit);
            requests += 1;
            fetch_time += started.elapsed();
            bytes_read += e.bytes_read;
            e.requests = requests;
            e.fetch_time = fetch_time;
            e.bytes_read = bytes_read;
            if e.verdict.code == "rate_limited" {
                hosts.slow_down(&host);
            }
            if !e.retryable() || attempt >= self.retry.in_run {
                return e;
            }
            let backoff =
                Duration::from_millis(self.retry.backoff_ms.saturating_mul(1 << attempt.min(16)));
            let cap = Duration::from_secs(self.retry.retry_after_cap_secs);
            let wait = e.retry_after.map_or(backoff, |ra| ra.min(cap).max(backoff));
            tracing::debug!(%url, code = e.verdict.code, ?wait, "retrying within the run");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    async fn fetch_once(&self, url: &Url, rule: Option<&ProviderRule>) -> Examination {
        let response = match self.fetcher.get(url).await {
            Ok(r) => r,
            Err(e) => return Examination::decided(e.verdict(), "network"),
        };
        let status = response.status();
        let headers = relevant_headers(response.headers());
        let retry_after = parse_retry_after(response.headers());
        let done = |verdict: Verdict, decided_by: String, image, bytes_read| Examination {
            verdict,
            decided_by,
            provider: None,
            http_status: Some(status),
            fetched_url: Some(url.clone()),
            headers: headers.clone(),
            image,
            expires_at: None,
            requests: 1,
            fetch_time: Duration::ZERO,
            bytes_read,
            retry_after,
        };
        if let HeadDecision::Final(v) = classify::classify_head(status, response.headers()) {
            let by = if v.code == "provider_notexist" {
                "header rule X-ErrNo / X-Info: notexist (any host)".to_string()
            } else {
                format!("HTTP {status}")
            };
            return match (rule, v.code) {
                (Some(r), "access_denied") if r.expiry_param.is_some() => done(
                    Verdict::new(Status::Expired, "signature_rejected")
                        .with_detail(status.as_u16().to_string()),
                    format!("provider {}: 403 on a signed URL", r.name),
                    None,
                    0,
                ),
                (Some(r), "not_found" | "gone") if r.not_found_means_changed => done(
                    Verdict::new(Status::Expired, "avatar_changed")
                        .with_detail(status.as_u16().to_string()),
                    format!("provider {}: not_found_means_changed", r.name),
                    None,
                    0,
                ),
                _ => done(v, by, None, 0),
            };
        }
        let body = match self.fetcher.read_body(response).await {
            Ok(b) => b,
            Err(e) => return done(e.verdict(), "body".into(), None, 0),
        };
        let bytes_read = body.bytes.len() as u64;
        if let Some(r) = rule
            && r.is_placeholder(&body.sha256)
        {
            let v =
                Verdict::new(Status::Expired, "placeholder_image").with_detail(body.sha256.clone());
            return done(
                v,
                format!("provider {}: placeholder_sha256", r.name),
                None,
                bytes_read,
            );
        }
        match media::validate(&body.bytes, &self.media) {
            Ok(info) => {
                let body = if self.media.strip_metadata {
                    strip(body, info.format)
                } else {
                    body
                };
                done(
                    Verdict::mirrored(),
                    "image validation".into(),
                    Some((info, body)),
                    bytes_read,
                )
            }
            Err(e) => done(e.verdict(), "image validation".into(), None, bytes_read),
        }
    }
}

/// The picture without its metadata; the stored bytes' hash is the key.
fn strip(body: Body, format: media::ImageFormat) -> Body {
    match media::strip_metadata(&body.bytes, format) {
        Some(clean) => {
            use sha2::Digest;
            Body {
                sha256: hex::encode(sha2::Sha256::digest(&clean)),
                bytes: clean.into(),
            }
        }
        None => body,
    }
}

fn relevant_headers(h: &HeaderMap) -> Vec<(String, String)> {
    RELEVANT_HEADERS
        .iter()
        .filter_map(|name| {
            let v = h.get(*name)?;
            Some((
                name.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            ))
        })
        .collect()
}

/// `Retry-After` in seconds or as an HTTP date.
pub fn parse_retry_after(h: &HeaderMap) -> Option<Duration> {
    let v = h.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    (when.with_timezone(&chrono::Utc) - chrono::Utc::now())
        .to_std()
        .ok()
}

fn format_time(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.to_rfc3339())
        .unwrap_or_else(|| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn two_per_host() -> FetchSettings {
        let mut settings = Settings::from_layers(None, Vec::new()).unwrap().fetch;
        settings.per_host_concurrency = 2;
        settings.per_host_min_interval_ms = 0;
        settings
    }

    #[test]
    fn retry_after_in_seconds_and_as_a_date() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(7)));
        let later = (chrono::Utc::now() + chrono::Duration::seconds(120)).to_rfc2822();
        h.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        let d = parse_retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(parse_retry_after(&h), None);
    }

    #[tokio::test]
    async fn a_429_slows_the_host_down_and_only_that_host() {
        let hosts = HostLimiter::new(&two_per_host());
        assert_eq!(hosts.interval("a"), Duration::ZERO);
        hosts.slow_down("a");
        assert_eq!(hosts.interval("a"), Duration::from_secs(1));
        hosts.slow_down("a");
        assert_eq!(hosts.interval("a"), Duration::from_secs(2));
        assert_eq!(hosts.interval("b"), Duration::ZERO);
        for _ in 0..10 {
            hosts.slow_down("a");
        }
        assert_eq!(hosts.interval("a"), MAX_HOST_INTERVAL);
    }

    #[tokio::test]
    async fn per_host_concurrency_is_capped() {
        let hosts = HostLimiter::new(&two_per_host());
        let a = hosts.acquire("h").await;
        let _b = hosts.acquire("h").await;
        let third = tokio::time::timeout(Duration::from_millis(50), hosts.acquire("h")).await;
        assert!(third.is_err(), "a third request to the same host must wait");
        let _other = tokio::time::timeout(Duration::from_millis(50), hosts.acquire("other"))
            .await
            .unwrap();
        drop(a);
        let _again = tokio::time::timeout(Duration::from_millis(50), hosts.acquire("h"))
            .await
            .unwrap();
    }
}
