//! `scan --pushgateway URL`: a one-shot scan cannot be scraped, so it pushes
//! its metrics to a Prometheus Pushgateway when it ends.
//!
//! The push is a `PUT` to one stable group (`job`/`instance`), which replaces
//! every series the previous run left there: no stale series accumulate.

use std::time::Duration;

use base64::Engine;
use url::Url;

use crate::metrics::PROMETHEUS_CONTENT_TYPE;

#[derive(Debug, thiserror::Error)]
pub(crate) enum PushError {
    #[error("pushgateway URL {0:?} is not an http(s) URL")]
    BadUrl(String),
    #[error("pushing to {url}: {source}")]
    Request { url: String, source: reqwest::Error },
    #[error("pushing to {url}: HTTP {status}: {body}")]
    Rejected {
        url: String,
        status: u16,
        body: String,
    },
}

impl PushError {
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            PushError::BadUrl(_) => false,
            PushError::Request { .. } => true,
            // 400: the gateway refused our text; sending it again will not help.
            PushError::Rejected { status, .. } => *status >= 500 || *status == 429,
        }
    }
}

/// The group a run's metrics replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grouping {
    pub job: String,
    pub instance: String,
}

impl Grouping {
    /// `instance` as configured, else the shard (`0-of-4`) or `all`: stable
    /// from run to run, unlike a pod name, so each push replaces the last.
    pub(crate) fn new(job: &str, instance: &str, shard: Option<(u32, u32)>) -> Self {
        let instance = if !instance.is_empty() {
            instance.to_string()
        } else if let Some((i, n)) = shard {
            format!("{i}-of-{n}")
        } else {
            "all".to_string()
        };
        Grouping {
            job: job.to_string(),
            instance,
        }
    }

    /// `{base}/metrics/job/{job}/instance/{instance}`; a value that cannot be a
    /// path segment (empty, or holding `/`) uses the gateway's `@base64` form.
    pub(crate) fn url(&self, base: &str) -> Result<Url, PushError> {
        let mut url = Url::parse(base).map_err(|_| PushError::BadUrl(base.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
            return Err(PushError::BadUrl(base.to_string()));
        }
        {
            let mut path = url
                .path_segments_mut()
                .map_err(|()| PushError::BadUrl(base.to_string()))?;
            path.pop_if_empty().push("metrics");
            for (name, value) in [("job", &self.job), ("instance", &self.instance)] {
                if value.is_empty() || value.contains('/') {
                    let encoded = base64::engine::general_purpose::URL_SAFE.encode(value);
                    path.push(&format!("{name}@base64"))
                        .push(if encoded.is_empty() { "=" } else { &encoded });
                } else {
                    path.push(name).push(value);
                }
            }
        }
        Ok(url)
    }
}

const ATTEMPTS: u32 = 3;

/// Replaces the group's metrics with `text` (Prometheus text format 0.0.4),
/// retrying transient failures.
pub(crate) async fn push(
    base: &str,
    grouping: &Grouping,
    text: String,
    timeout: Duration,
) -> Result<Url, PushError> {
    let url = grouping.url(base)?;
    let client = crate::fetch::service_client(timeout).map_err(|source| PushError::Request {
        url: url.to_string(),
        source,
    })?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match push_once(&client, &url, &text).await {
            Ok(()) => return Ok(url),
            Err(e) if e.is_retryable() && attempt < ATTEMPTS => {
                tracing::warn!(error = %e, attempt, "pushgateway push failed; retrying");
                tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn push_once(client: &reqwest::Client, url: &Url, text: &str) -> Result<(), PushError> {
    let response = client
        .put(url.clone())
        .header(reqwest::header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)
        .body(text.to_string())
        .send()
        .await
        .map_err(|source| PushError::Request {
            url: url.to_string(),
            source,
        })?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body = crate::fetch::capped_text(response, 4096).await;
    Err(PushError::Rejected {
        url: url.to_string(),
        status: status.as_u16(),
        body: body.chars().take(500).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_group_is_stable_and_path_safe() {
        let g = Grouping::new("avatar_warden", "", None);
        assert_eq!(
            g.url("http://pgw:9091").unwrap().as_str(),
            "http://pgw:9091/metrics/job/avatar_warden/instance/all"
        );
        let g = Grouping::new("avatar_warden", "", Some((0, 4)));
        assert_eq!(g.instance, "0-of-4");
        // A base with a path prefix (behind a proxy) keeps it.
        let g = Grouping::new("aw", "eu/1", None);
        assert_eq!(
            g.url("https://ops.example/pushgateway/").unwrap().as_str(),
            "https://ops.example/pushgateway/metrics/job/aw/instance@base64/ZXUvMQ=="
        );
        assert!(matches!(g.url("ftp://x"), Err(PushError::BadUrl(_))));
    }
}
