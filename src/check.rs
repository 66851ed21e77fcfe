//! Checking one URL: provider rules before and after the request, retries
//! within the run, and politeness per host. Never stores, never errors: every
//! outcome is a verdict, with the rule that decided it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use url::Url;

use crate::classify::{self, HeadDecision, Reason, Status, Verdict};
use crate::config::{ConfigError, FetchSettings, MediaSettings, RetrySettings, Settings};
pub(crate) use crate::fetch::hosts::HostLimiter;
use crate::fetch::hosts::Signal;
use crate::fetch::{Body, FetchError, Fetcher};
use crate::media::{self, ImageInfo};
pub(crate) use crate::model::Reverified;
use crate::model::Validators;
use crate::providers::{ProviderRule, Providers, Reverify};

mod retry;
mod reverify;

pub(crate) use retry::parse_retry_after;
use reverify::{conditional_headers, merge, same_picture, validators_of};

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
pub(crate) struct Examination {
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
pub(crate) struct Known {
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
            (None, Some(s)) if matches!(s.as_u16(), 429 | 503) => {
                Signal::PushBack(self.retry_after)
            }
            (None, Some(_)) => Signal::Answered(took),
            (Some(_), _) | (None, None) => Signal::Nothing,
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
            (None, Some(status)) if classify::is_transient_status(status) => Retry::Again,
            (Some(_) | None, _) => Retry::Never,
        }
    }
}

/// Everything needed to check a URL, built once per process.
#[derive(Clone)]
pub(crate) struct Checker {
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
    pub(crate) fn new(settings: &Settings) -> Result<Self, CheckerError> {
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
    pub(crate) fn host_limiter(&self) -> HostLimiter {
        HostLimiter::new(&self.fetch_settings)
    }

    /// The provider rule name a URL falls under, if any.
    pub(crate) fn provider_of(&self, raw_url: &str) -> Option<String> {
        let url = Url::parse(raw_url.trim()).ok()?;
        self.providers.find(&url).map(|r| r.name.clone())
    }

    pub(crate) fn providers(&self) -> &Providers {
        &self.providers
    }

    /// Fetch, classify and validate one URL, applying the provider's rules.
    pub(crate) async fn examine(
        &self,
        raw_url: &str,
        now: i64,
        hosts: &HostLimiter,
    ) -> Examination {
        self.reexamine(raw_url, now, hosts, None).await
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

fn format_time(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0).map_or_else(|| t.to_string(), |d| d.to_rfc3339())
}

#[cfg(test)]
mod tests;
