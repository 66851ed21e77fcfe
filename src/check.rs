//! Checking one URL: provider rules before and after the request, retries
//! within the run, and politeness per host. Never stores, never errors: every
//! outcome is a verdict, with the rule that decided it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{
    CONTENT_LENGTH, ETAG, HeaderMap, HeaderValue, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED,
    RETRY_AFTER,
};
use reqwest::{Method, StatusCode};
use url::Url;

use crate::classify::{self, HeadDecision, Reason, Status, Verdict};
use crate::config::{ConfigError, FetchSettings, MediaSettings, RetrySettings, Settings};
use crate::fetch::hosts::Signal;
pub use crate::fetch::hosts::{HostLimiter, HostState};
use crate::fetch::{Body, FetchError, Fetcher};
use crate::media::{self, ImageInfo};
pub use crate::model::Reverified;
use crate::model::Validators;
use crate::providers::{ProviderRule, Providers, Reverify};

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
    /// What the source said of the picture (`ETag`, `Last-Modified`,
    /// `Content-Length`): recorded with a new mirror, or with one confirmed unchanged.
    pub validators: Validators,
    /// Set when this was a re-verification of a mirrored picture that ended
    /// in a picture (unchanged or changed).
    pub reverified: Option<Reverified>,
    /// How a `HEAD` or conditional request ended, before any body was read.
    probe: Option<Probe>,
    /// The network error behind a `failing` verdict: it says whether asking
    /// again can help (`FetchError::is_transient`).
    fetch_error: Option<FetchError>,
}

/// Whether another attempt within this scan may help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    Never,
    Again,
    /// A timeout: asked again at most once per scan (a slow host stays slow).
    AfterTimeout,
}

/// What a re-verification compares with: the mirrored picture and what its
/// source said about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    pub sha256: String,
    pub validators: Validators,
}

/// What one request of a re-verification asks for.
#[derive(Debug, Clone, Copy)]
enum Ask<'a> {
    /// A plain GET: read and validate the body.
    Get,
    /// A GET with `If-None-Match` / `If-Modified-Since`.
    Conditional(&'a Validators),
    /// A HEAD compared with these validators.
    Head(&'a Validators),
}

/// How a headers-only answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// 304, or a HEAD whose validators match: the picture has not changed.
    Unchanged,
    /// A HEAD whose validators differ, or say too little to tell.
    Download,
    /// 405/501 to a HEAD.
    HeadRejected,
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
            validators: Validators::default(),
            reverified: None,
            probe: None,
            fetch_error: None,
        }
    }

    /// A request that produced no usable response.
    fn failed(error: FetchError, decided_by: &str) -> Self {
        let mut e = Examination::decided(error.verdict(), decided_by);
        e.fetch_error = Some(error);
        e
    }

    /// Counts an earlier attempt's requests, time and bytes into this one.
    fn absorb(mut self, earlier: &Examination) -> Self {
        self.requests += earlier.requests;
        self.fetch_time += earlier.fetch_time;
        self.bytes_read += earlier.bytes_read;
        self
    }

    /// What this request tells the host's politeness: 429/503 and timeouts
    /// push back, any other answer says how fast the host is.
    fn host_signal(&self, took: Duration) -> Signal {
        match (&self.fetch_error, self.http_status) {
            (Some(FetchError::Timeout), _) => Signal::PushBack(None),
            (Some(_), _) => Signal::Nothing,
            (None, Some(s)) if matches!(s.as_u16(), 429 | 503) => {
                Signal::PushBack(self.retry_after)
            }
            (None, Some(_)) => Signal::Answered(took),
            (None, None) => Signal::Nothing,
        }
    }

    /// Whether another attempt within this run may help, from the error's
    /// type or the HTTP status class — never from the reason's words.
    fn retry(&self) -> Retry {
        if self.verdict.status != Status::Failing {
            return Retry::Never;
        }
        match (&self.fetch_error, self.http_status) {
            (Some(FetchError::Timeout), _) => Retry::AfterTimeout,
            (Some(e), _) if e.is_transient() => Retry::Again,
            (Some(_), _) => Retry::Never,
            (None, Some(status)) if classify::is_transient_status(status) => Retry::Again,
            (None, _) => Retry::Never,
        }
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
        self.reexamine(raw_url, now, hosts, None).await
    }

    /// As `examine`; with `known` (the URL's mirrored picture) it re-verifies:
    /// headers only where the source allows it, a download only when the
    /// picture may have changed.
    pub async fn reexamine(
        &self,
        raw_url: &str,
        now: i64,
        hosts: &HostLimiter,
        known: Option<&Known>,
    ) -> Examination {
        let url = match classify::parse_avatar_url(raw_url) {
            Ok(u) => u,
            Err(v) => return Examination::decided(v, "URL rules"),
        };
        let mut deadline = None;
        let Some(rule) = self.providers.find(&url) else {
            return match known {
                Some(k) => self.reverify(&url, None, k, hosts, &mut deadline).await,
                None => {
                    self.fetch_with_retries(&url, None, hosts, Ask::Get, &mut deadline)
                        .await
                }
            };
        };
        let by = |what: &str| format!("provider {}: {what}", rule.name);
        let with_provider = |mut e: Examination| {
            e.provider = Some(rule.name.clone());
            e
        };
        if rule.is_default_avatar(&url) {
            let v = Verdict::new(Reason::DefaultAvatar);
            return with_provider(Examination::decided(v, by("default_avatar_paths")));
        }
        let expires_at = rule.signature_expiry(&url);
        if let Some(t) = expires_at
            && t <= now
        {
            let param = rule.expiry_param.as_deref().unwrap_or_default();
            let v = Verdict::new(Reason::SignatureExpired)
                .with_detail(format!("{param} passed at {}", format_time(t)));
            let mut e = with_provider(Examination::decided(
                v,
                by(&format!("expiry_param {param}")),
            ));
            e.expires_at = expires_at;
            return e;
        }
        let deprecated = |mut e: Examination| {
            if rule.deprecated && e.verdict.status == Status::Mirrored {
                // Keep the picture while the host still serves it, and ask the user to log in again.
                e.verdict = Verdict::new(Reason::DeprecatedHost)
                    .with_detail(url.host_str().unwrap_or_default());
                e.decided_by = by("deprecated");
            }
            e
        };
        // The largest size first: it may fail while the stored size works, and
        // the verdict is about the stored URL. A mirrored picture came from
        // the largest size too, so that is what is re-verified.
        let largest = rule.largest_size_url(&url);
        let mut earlier = None;
        if let Some(target) = largest.as_ref().or(known.map(|_| &url)) {
            let e = match known {
                Some(k) => {
                    self.reverify(target, Some(rule), k, hosts, &mut deadline)
                        .await
                }
                None => {
                    self.fetch_with_retries(target, Some(rule), hosts, Ask::Get, &mut deadline)
                        .await
                }
            };
            if e.verdict.status == Status::Mirrored || largest.is_none() {
                let mut e = with_provider(e);
                if largest.is_some() {
                    e.decided_by = by(&format!("size_segment (largest size /0), {}", e.decided_by));
                }
                e.expires_at = expires_at;
                return deprecated(e);
            }
            earlier = Some(e);
        }
        let mut e = with_provider(
            self.fetch_with_retries(&url, Some(rule), hosts, Ask::Get, &mut deadline)
                .await,
        );
        if let Some(earlier) = &earlier {
            e = e.absorb(earlier);
        }
        e.expires_at = expires_at;
        deprecated(e)
    }

    /// Re-verifies a mirrored picture: `HEAD` or a conditional `GET` per the
    /// provider rule, falling back to a full `GET` (remembered per host for
    /// the scan) when the host rejects `HEAD` or ignores validators.
    async fn reverify(
        &self,
        url: &Url,
        rule: Option<&ProviderRule>,
        known: &Known,
        hosts: &HostLimiter,
        deadline: &mut Option<Instant>,
    ) -> Examination {
        let host = url.host_str().unwrap_or_default();
        let v = &known.validators;
        let comparable = v.etag.is_some() || v.last_modified.is_some();
        let mut mode = rule.map_or(Reverify::Conditional, |r| r.reverify);
        if mode == Reverify::Head && (hosts.rejects_head(host) || !comparable) {
            mode = Reverify::Conditional;
        }
        if mode == Reverify::Conditional && (hosts.ignores_validators(host) || !comparable) {
            mode = Reverify::Get;
        }
        let mut earlier: Option<Examination> = None;
        if mode == Reverify::Head {
            let mut e = self
                .fetch_with_retries(url, rule, hosts, Ask::Head(v), deadline)
                .await;
            match e.probe {
                Some(Probe::Unchanged) => {
                    e.reverified = Some(Reverified { method: "head" });
                    return e;
                }
                Some(Probe::HeadRejected) => {
                    hosts.mark_rejects_head(host);
                    mode = Reverify::Conditional;
                }
                // It changed, or the headers cannot tell: a validator would
                // only earn a 304 the HEAD already ruled out.
                Some(Probe::Download) => mode = Reverify::Get,
                None => return e,
            }
            earlier = Some(e);
        }
        let (ask, method) = match mode {
            Reverify::Conditional => (Ask::Conditional(v), "conditional"),
            _ => (Ask::Get, "get"),
        };
        let mut e = self
            .fetch_with_retries(url, rule, hosts, ask, deadline)
            .await;
        if let Some(earlier) = &earlier {
            e = e.absorb(earlier);
        }
        if e.probe == Some(Probe::Unchanged) {
            e.reverified = Some(Reverified { method });
            return e;
        }
        let Some((_, body)) = &e.image else {
            return e;
        };
        if body.sha256.eq_ignore_ascii_case(&known.sha256) {
            if matches!(ask, Ask::Conditional(_)) {
                // A 200 with the very same picture: this host does not honour
                // validators, so stop sending them for the rest of the scan.
                hosts.mark_ignores_validators(host);
            }
            e.verdict =
                Verdict::new(Reason::Unchanged).with_detail(format!("{method}: same sha256"));
            // The same object is already stored.
            e.image = None;
        } else {
            e.verdict = Verdict::new(Reason::SourceChanged)
                .with_detail(format!("sha256 was {}", known.sha256));
        }
        e.reverified = Some(Reverified { method });
        e
    }

    /// One request and its retries. `deadline` is the avatar's budget
    /// (`retry.budget_secs`), set by its first request and shared by every
    /// request made for it (sizes, HEAD then GET).
    async fn fetch_with_retries(
        &self,
        url: &Url,
        rule: Option<&ProviderRule>,
        hosts: &HostLimiter,
        ask: Ask<'_>,
        deadline: &mut Option<Instant>,
    ) -> Examination {
        let host = url.host_str().unwrap_or_default().to_string();
        let mut requests = 0;
        let mut attempt = 0;
        let mut timed_out = false;
        let (mut fetch_time, mut bytes_read) = (Duration::ZERO, 0);
        let mut previous: Option<Examination> = None;
        loop {
            let permit = hosts.acquire(&host).await;
            let started = Instant::now();
            // The most one avatar may spend in requests and the waits between
            // them (it holds a fetch slot all that time), from its first request.
            let deadline = *deadline.get_or_insert(started + self.retry.budget());
            let left = deadline.saturating_duration_since(started);
            if left.is_zero()
                && let Some(previous) = previous
            {
                // The budget ran out while waiting for the host: the last
                // answer stands (it says more than "timed out" would).
                permit.done(Signal::Nothing);
                return previous;
            }
            let mut e = match tokio::time::timeout(left, self.fetch_once(url, rule, ask)).await {
                Ok(e) => e,
                Err(_) => Examination::failed(FetchError::Timeout, "retry.budget_secs"),
            };
            permit.done(e.host_signal(started.elapsed()));
            requests += 1;
            fetch_time += started.elapsed();
            bytes_read += e.bytes_read;
            e.requests = requests;
            e.fetch_time = fetch_time;
            e.bytes_read = bytes_read;
            let again = match e.retry() {
                Retry::Never => false,
                Retry::Again => true,
                Retry::AfterTimeout => !std::mem::replace(&mut timed_out, true),
            };
            if !again || attempt >= self.retry.in_run {
                return e;
            }
            let backoff =
                Duration::from_millis(self.retry.backoff_ms.saturating_mul(1 << attempt.min(16)));
            let cap = Duration::from_secs(self.retry.retry_after_cap_secs);
            let wait = e.retry_after.map_or(backoff, |ra| ra.min(cap).max(backoff));
            if Instant::now() + wait >= deadline {
                return e;
            }
            tracing::debug!(%url, code = %e.verdict.code, ?wait, "retrying within the run");
            tokio::time::sleep(wait).await;
            attempt += 1;
            previous = Some(e);
        }
    }

    async fn fetch_once(
        &self,
        url: &Url,
        rule: Option<&ProviderRule>,
        ask: Ask<'_>,
    ) -> Examination {
        let (method, request_headers) = match ask {
            Ask::Get => (Method::GET, HeaderMap::new()),
            Ask::Conditional(v) => (Method::GET, conditional_headers(v)),
            Ask::Head(_) => (Method::HEAD, HeaderMap::new()),
        };
        let response = match self.fetcher.send(method, url, request_headers).await {
            Ok(r) => r,
            Err(e) => return Examination::failed(e, "network"),
        };
        let status = response.status();
        let headers = relevant_headers(response.headers());
        let retry_after = parse_retry_after(response.headers());
        let validators = validators_of(response.headers());
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
            validators: validators.clone(),
            reverified: None,
            probe: None,
            fetch_error: None,
        };
        let probed = |probe: Probe, verdict: Verdict, decided_by: &str, known: &Validators| {
            let mut e = done(verdict, decided_by.into(), None, 0);
            e.probe = Some(probe);
            // A 304 may leave out what did not change: keep what we knew.
            e.validators = merge(known, &validators);
            e
        };
        let gone = classify::provider_expiry_header(response.headers()).is_some();
        match ask {
            Ask::Head(_) if matches!(status.as_u16(), 405 | 501) && !gone => {
                return probed(
                    Probe::HeadRejected,
                    Verdict::new(Reason::HeadRejected).with_detail(status.as_u16().to_string()),
                    &format!("HTTP {status} to HEAD"),
                    &Validators::default(),
                );
            }
            Ask::Conditional(known) if status == StatusCode::NOT_MODIFIED && !gone => {
                return probed(
                    Probe::Unchanged,
                    Verdict::new(Reason::Unchanged).with_detail("304 Not Modified"),
                    "conditional GET: 304 Not Modified",
                    known,
                );
            }
            Ask::Head(known) if status.is_success() && !gone => {
                return match same_picture(known, &validators) {
                    Some(true) => probed(
                        Probe::Unchanged,
                        Verdict::new(Reason::Unchanged).with_detail("HEAD: validators match"),
                        "HEAD: validators match",
                        known,
                    ),
                    // Never recorded: `reverify` downloads instead.
                    _ => probed(
                        Probe::Download,
                        Verdict::new(Reason::HeadInconclusive),
                        "HEAD: validators differ or say too little",
                        &Validators::default(),
                    ),
                };
            }
            _ => {}
        }
        if let HeadDecision::Final(v) = classify::classify_head(status, response.headers()) {
            let by = if v.code == Reason::ProviderNotexist {
                "header rule X-ErrNo / X-Info: notexist (any host)".to_string()
            } else {
                format!("HTTP {status}")
            };
            return match (rule, v.code) {
                (Some(r), Reason::AccessDenied) if r.expiry_param.is_some() => done(
                    Verdict::new(Reason::SignatureRejected)
                        .with_detail(status.as_u16().to_string()),
                    format!("provider {}: 403 on a signed URL", r.name),
                    None,
                    0,
                ),
                (Some(r), Reason::NotFound | Reason::Gone) if r.not_found_means_changed => done(
                    Verdict::new(Reason::AvatarChanged).with_detail(status.as_u16().to_string()),
                    format!("provider {}: not_found_means_changed", r.name),
                    None,
                    0,
                ),
                _ => done(v, by, None, 0),
            };
        }
        let body = match self.fetcher.read_body(response).await {
            Ok(b) => b,
            Err(e) => {
                let mut failed = done(e.verdict(), "body".into(), None, 0);
                failed.fetch_error = Some(e);
                return failed;
            }
        };
        let bytes_read = body.bytes.len() as u64;
        if let Some(r) = rule
            && r.is_placeholder(&body.sha256)
        {
            let v = Verdict::new(Reason::PlaceholderImage).with_detail(body.sha256.clone());
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
                let mut verdict = Verdict::mirrored();
                verdict.detail = info.tolerated.describe();
                done(
                    verdict,
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

/// `If-None-Match` / `If-Modified-Since` from what the source said last time.
fn conditional_headers(v: &Validators) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in [
        (IF_NONE_MATCH, &v.etag),
        (IF_MODIFIED_SINCE, &v.last_modified),
    ] {
        if let Some(value) = value.as_deref().and_then(|t| HeaderValue::from_str(t).ok()) {
            h.insert(name, value);
        }
    }
    h
}

/// The validators of a response; a value too long to store is left out
/// (never an error: one odd header must not fail the batch's write).
fn validators_of(h: &HeaderMap) -> Validators {
    let text = |name, max: usize| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty() && v.len() <= max)
            .map(str::to_owned)
    };
    Validators {
        etag: text(ETAG, Validators::MAX_ETAG),
        last_modified: text(LAST_MODIFIED, Validators::MAX_LAST_MODIFIED),
        length: h
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok()),
    }
}

/// What a headers-only answer says, over what was known.
fn merge(known: &Validators, got: &Validators) -> Validators {
    Validators {
        etag: got.etag.clone().or_else(|| known.etag.clone()),
        last_modified: got
            .last_modified
            .clone()
            .or_else(|| known.last_modified.clone()),
        length: got.length.or(known.length),
    }
}

/// Whether a HEAD's validators show the stored picture: `Some(false)` when
/// anything differs, `None` when they say too little to tell. Weak and strong
/// ETags compare by their opaque part (RFC 9110 weak comparison).
fn same_picture(known: &Validators, got: &Validators) -> Option<bool> {
    if let (Some(a), Some(b)) = (known.length, got.length)
        && a != b
    {
        return Some(false);
    }
    match (&known.etag, &got.etag) {
        (Some(a), Some(b)) => {
            return Some(a.trim_start_matches("W/") == b.trim_start_matches("W/"));
        }
        (Some(_), None) => return None,
        _ => {}
    }
    match (&known.last_modified, &got.last_modified) {
        (Some(a), Some(b)) => Some(a == b),
        _ => None,
    }
}

fn relevant_headers(h: &HeaderMap) -> Vec<(String, String)> {
    RELEVANT_HEADERS
        .iter()
        .filter_map(|name| {
            let v = h.get(*name)?;
            Some((
                name.to_string(),
                classify::bounded(
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    classify::MAX_DETAIL_BYTES,
                ),
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

    fn v(etag: Option<&str>, lm: Option<&str>, len: Option<i64>) -> Validators {
        Validators {
            etag: etag.map(Into::into),
            last_modified: lm.map(Into::into),
            length: len,
        }
    }

    #[test]
    fn head_validators_decide_only_when_they_can() {
        let lm = "Tue, 14 Nov 2023 22:13:20 GMT";
        let known = v(Some("\"a\""), Some(lm), Some(100));
        assert_eq!(
            same_picture(&known, &v(Some("\"a\""), None, Some(100))),
            Some(true)
        );
        assert_eq!(
            same_picture(&known, &v(Some("W/\"a\""), None, None)),
            Some(true),
            "weak comparison"
        );
        assert_eq!(
            same_picture(&known, &v(Some("\"b\""), Some(lm), Some(100))),
            Some(false)
        );
        assert_eq!(
            same_picture(&known, &v(Some("\"a\""), Some(lm), Some(101))),
            Some(false),
            "another length is another picture, whatever the ETag says"
        );
        assert_eq!(
            same_picture(&known, &v(None, Some(lm), Some(100))),
            None,
            "the ETag went missing"
        );
        let dated = v(None, Some(lm), Some(100));
        assert_eq!(
            same_picture(&dated, &v(None, Some(lm), Some(100))),
            Some(true)
        );
        assert_eq!(
            same_picture(
                &dated,
                &v(None, Some("Wed, 15 Nov 2023 22:13:20 GMT"), Some(100))
            ),
            Some(false)
        );
        assert_eq!(
            same_picture(&v(None, None, Some(100)), &v(None, None, Some(100))),
            None,
            "a length alone cannot tell"
        );
    }

    #[test]
    fn validators_too_long_to_store_are_left_out_and_a_304_keeps_what_was_known() {
        let mut h = HeaderMap::new();
        h.insert(
            ETAG,
            HeaderValue::from_str(&format!("\"{}\"", "x".repeat(600))).unwrap(),
        );
        h.insert(
            LAST_MODIFIED,
            HeaderValue::from_static("Tue, 14 Nov 2023 22:13:20 GMT"),
        );
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("4096"));
        let got = validators_of(&h);
        assert_eq!(got.etag, None);
        assert_eq!(got.length, Some(4096));
        let known = v(Some("\"a\""), None, Some(10));
        assert_eq!(
            merge(&known, &v(None, Some("d"), None)),
            v(Some("\"a\""), Some("d"), Some(10))
        );
        let sent = conditional_headers(&known);
        assert_eq!(sent.get(IF_NONE_MATCH).unwrap(), "\"a\"");
        assert!(sent.get(IF_MODIFIED_SINCE).is_none());
    }
}
