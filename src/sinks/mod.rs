//! Sinks: where verdicts go besides the state table — IM platforms (OpenIM,
//! NetEase Yunxin) and webhooks. A changed verdict becomes events; each event
//! a sink wants becomes an outbox row in the verdict's own transaction; the
//! delivery loop here drains the outbox with retries and backoff (at least
//! once, in order per user, idempotency key = event id).

mod deliver;
mod openim;
mod webhook;
mod yunxin;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

pub use deliver::{Deliverer, backoff_secs};
pub use openim::OpenImSink;
pub use webhook::{WebhookSink, signature};
pub use yunxin::{YunxinSink, checksum};

use crate::classify::Status;
use crate::config::{ConfigError, OutboxSettings, Settings, SinkSettings};
use crate::db::{AvatarRecord, Database, DbError, Delivery, OutboxRow, Previous, Settle};
use crate::metrics::Metrics;
use crate::model::Cause;
pub use crate::model::DeliveryCounts;

/// What changed for a user, as sinks hear it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    #[serde(rename = "avatar.mirrored")]
    Mirrored,
    #[serde(rename = "avatar.expired")]
    Expired,
    #[serde(rename = "avatar.invalid")]
    Invalid,
    #[serde(rename = "reauth.required")]
    ReauthRequired,
    #[serde(rename = "reauth.cleared")]
    ReauthCleared,
}

impl EventKind {
    pub const ALL: [EventKind; 5] = [
        EventKind::Mirrored,
        EventKind::Expired,
        EventKind::Invalid,
        EventKind::ReauthRequired,
        EventKind::ReauthCleared,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Mirrored => "avatar.mirrored",
            EventKind::Expired => "avatar.expired",
            EventKind::Invalid => "avatar.invalid",
            EventKind::ReauthRequired => "reauth.required",
            EventKind::ReauthCleared => "reauth.cleared",
        }
    }
}

/// One event, as stored in the outbox and sent to webhooks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Idempotency key: the same verdict replayed gives the same id.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// Unix seconds of the check that produced it.
    pub occurred_at: i64,
    pub user_id: String,
    pub source_url: String,
    pub mirror_url: Option<String>,
    pub status: String,
    pub reason: String,
    pub reason_detail: Option<String>,
    pub reauth_required: bool,
    /// `null` for a user seen for the first time.
    pub previous_status: Option<String>,
}

/// The events a new record means against what was recorded before. Nothing
/// for an unchanged verdict: a weekly re-check of a live avatar is silent.
pub fn events_for(prev: Option<&Previous>, rec: &AvatarRecord) -> Vec<EventKind> {
    let mut out = Vec::new();
    let was = prev.map(|p| p.status);
    match rec.status {
        Status::Mirrored
            if was != Some(Status::Mirrored)
                || prev.and_then(|p| p.mirror_url.as_deref()) != rec.mirror_url.as_deref() =>
        {
            out.push(EventKind::Mirrored);
        }
        Status::Expired if was != Some(Status::Expired) => out.push(EventKind::Expired),
        Status::Invalid if was != Some(Status::Invalid) => out.push(EventKind::Invalid),
        _ => {}
    }
    let was_flagged = prev.is_some_and(|p| p.reauth_required);
    match (was_flagged, rec.reauth_required) {
        (false, true) => out.push(EventKind::ReauthRequired),
        (true, false) => out.push(EventKind::ReauthCleared),
        _ => {}
    }
    out
}

impl Event {
    pub fn new(kind: EventKind, prev: Option<&Previous>, rec: &AvatarRecord) -> Self {
        let user_id = rec.user_id.to_string();
        // Same verdict, same id: a replayed batch inserts nothing twice.
        let mut h = Sha256::new();
        for part in [
            user_id.as_str(),
            kind.as_str(),
            &rec.source_url,
            rec.mirror_url.as_deref().unwrap_or(""),
            &rec.checked_at.to_string(),
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        Event {
            id: hex::encode(&h.finalize()[..16]),
            kind,
            occurred_at: rec.checked_at,
            user_id,
            // A profile may hold any text as its avatar URL: bound what is sent.
            source_url: crate::classify::bounded(
                rec.source_url.clone(),
                crate::classify::MAX_URL_LEN + 64,
            ),
            mirror_url: rec.mirror_url.clone(),
            status: rec.status.to_string(),
            reason: rec.reason.to_string(),
            reason_detail: rec.reason_detail.clone(),
            reauth_required: rec.reauth_required,
            previous_status: prev.map(|p| p.status.to_string()),
        }
    }
}

/// Why a delivery failed; the loop retries what may pass.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The request did not complete (timeout, connection trouble).
    #[error("request failed: {0}")]
    Transport(#[source] Cause),
    /// The sink's own answer that may change (5xx, 408, a reply we could not read).
    #[error("{0}")]
    Retryable(String),
    /// The sink asked us to slow down.
    #[error("rate limited: {0}")]
    RateLimited(String),
    /// Will fail the same way every time (bad request, unknown user...).
    #[error("{0}")]
    Permanent(String),
    /// An outbox payload that cannot be read back (written by another version).
    #[error("unreadable outbox payload: {0}")]
    Payload(#[source] serde_json::Error),
}

impl SinkError {
    pub fn is_retryable(&self) -> bool {
        !matches!(self, SinkError::Permanent(_) | SinkError::Payload(_))
    }

    /// Transport errors: timeouts and connection trouble pass. The URL is
    /// left out: a webhook URL may carry a token in its query.
    pub(crate) fn transport(e: reqwest::Error) -> Self {
        SinkError::Transport(Cause::new(e.without_url()))
    }
}

/// One destination for events.
#[async_trait]
pub trait Sink: Send + Sync {
    fn name(&self) -> &str;
    /// Whether this sink has anything to do for `kind`.
    fn wants(&self, kind: EventKind) -> bool;
    async fn deliver(&self, event: &Event) -> Result<(), SinkError>;
}

/// The configured delivery sinks (the `sql` sink is the write-back inside
/// the batch transaction and needs no delivery).
#[derive(Clone, Default)]
pub struct Sinks {
    sinks: Vec<Arc<dyn Sink>>,
}

impl Sinks {
    pub fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let mut sinks: Vec<Arc<dyn Sink>> = Vec::new();
        for s in &settings.sink {
            let name = s.name();
            match s {
                SinkSettings::Sql => {}
                SinkSettings::Openim(c) => sinks.push(Arc::new(OpenImSink::new(name, c)?)),
                SinkSettings::Yunxin(c) => sinks.push(Arc::new(YunxinSink::new(name, c)?)),
                SinkSettings::Webhook(c) => sinks.push(Arc::new(WebhookSink::new(name, c)?)),
            }
        }
        Ok(Sinks { sinks })
    }

    pub fn new(sinks: Vec<Arc<dyn Sink>>) -> Self {
        Sinks { sinks }
    }

    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.sinks.iter().map(|s| s.name())
    }

    /// The outbox rows a new record produces: one per event per sink that wants it.
    pub fn outbox_rows(&self, prev: Option<&Previous>, rec: &AvatarRecord) -> Vec<OutboxRow> {
        if self.sinks.is_empty() {
            return Vec::new();
        }
        let mut rows = Vec::new();
        for kind in events_for(prev, rec) {
            let event = Event::new(kind, prev, rec);
            let payload = serde_json::to_string(&event).expect("an event serializes");
            for sink in self.sinks.iter().filter(|s| s.wants(kind)) {
                rows.push(OutboxRow {
                    event_id: event.id.clone(),
                    sink: sink.name().to_string(),
                    kind: kind.as_str().to_string(),
                    user_id: rec.user_id.clone(),
                    payload: payload.clone(),
                    created_at: rec.checked_at,
                });
            }
        }
        rows
    }
}

/// Which events an IM profile sink (OpenIM, Yunxin) acts on.
pub(crate) fn im_wants(on_expired: crate::config::OnExpired, kind: EventKind) -> bool {
    im_avatar(on_expired, kind, Some("")).is_some()
}

/// The avatar an IM profile gets for an event: the mirror, `""` for a dead
/// avatar under `clear` (explicitly empty: some APIs ignore a null), or
/// `None` to leave the profile alone.
pub(crate) fn im_avatar(
    on_expired: crate::config::OnExpired,
    kind: EventKind,
    mirror_url: Option<&str>,
) -> Option<String> {
    use crate::config::OnExpired;
    match kind {
        // Never "clear" by accident: a mirrored event without a URL sets nothing.
        EventKind::Mirrored => mirror_url.map(str::to_string),
        EventKind::Expired | EventKind::Invalid if on_expired == OnExpired::Clear => {
            Some(String::new())
        }
        _ => None,
    }
}

/// An HTTP client for one sink: its own timeout, no redirects (a sink
/// endpoint that redirects is misconfigured, and would leak the signature).
pub(crate) fn http_client(timeout_secs: u64) -> Result<reqwest::Client, ConfigError> {
    crate::fetch::service_client(Duration::from_secs(timeout_secs.max(1)))
        .map_err(|e| ConfigError::Invalid(format!("sink HTTP client: {e}")))
}

/// Longest reply read from a sink: far more than any API's JSON reply.
pub(crate) const MAX_REPLY_BYTES: usize = 64 * 1024;

/// Retryable for 408/429/5xx, permanent for other non-success statuses.
pub(crate) fn status_error(status: reqwest::StatusCode, body: &str) -> SinkError {
    let text = format!(
        "HTTP {status}: {}",
        body.chars().take(200).collect::<String>()
    );
    match status.as_u16() {
        429 => SinkError::RateLimited(text),
        408 | 500..=599 => SinkError::Retryable(text),
        _ => SinkError::Permanent(text),
    }
}

#[cfg(test)]
mod tests;
