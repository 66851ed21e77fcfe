//! Sinks: where verdicts go besides the state table — IM platforms (OpenIM,
//! NetEase Yunxin) and webhooks. A changed verdict becomes events; each event
//! a sink wants becomes an outbox row in the verdict's own transaction; the
//! delivery loop here drains the outbox with retries and backoff (at least
//! once, in order per user, idempotency key = event id).

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

pub use openim::OpenImSink;
pub use webhook::{WebhookSink, signature};
pub use yunxin::{YunxinSink, checksum};

use crate::classify::Status;
use crate::config::{ConfigError, OutboxSettings, Settings, SinkSettings};
use crate::db::{AvatarRecord, Database, DbError, Delivery, OutboxRow, Previous, Settle};
use crate::metrics::Metrics;
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
            out.push(EventKind::Mirrored)
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
    #[error("{0}")]
    Retryable(String),
    /// The sink asked us to slow down.
    #[error("rate limited: {0}")]
    RateLimited(String),
    /// Will fail the same way every time (bad request, unknown user...).
    #[error("{0}")]
    Permanent(String),
}

impl SinkError {
    pub fn is_retryable(&self) -> bool {
        !matches!(self, SinkError::Permanent(_))
    }

    /// Transport errors: timeouts and connection trouble pass. The URL is
    /// left out: a webhook URL may carry a token in its query.
    pub(crate) fn transport(e: reqwest::Error) -> Self {
        SinkError::Retryable(format!("request failed: {}", error_chain(&e.without_url())))
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

/// Drains the outbox into the sinks.
#[derive(Clone)]
pub struct Deliverer {
    pub db: Arc<Database>,
    pub sinks: Sinks,
    pub metrics: Metrics,
    pub settings: OutboxSettings,
    /// The process is stopping: no new attempt starts.
    stopping: CancellationToken,
    /// Time is up: attempts in flight are dropped and their deliveries
    /// released (they stay in the outbox, unattempted, due at once).
    cutoff: CancellationToken,
}

impl Deliverer {
    /// Deliveries for these sinks; `None` when no sink needs any.
    pub fn new(
        db: Arc<Database>,
        sinks: Sinks,
        metrics: Metrics,
        settings: &OutboxSettings,
    ) -> Option<Self> {
        (!sinks.is_empty()).then(|| Deliverer {
            db,
            sinks,
            metrics,
            settings: settings.clone(),
            stopping: CancellationToken::new(),
            cutoff: CancellationToken::new(),
        })
    }

    /// Bounds deliveries by the process's shutdown: once `shutdown` is
    /// cancelled no attempt starts, and `grace` later those in flight are
    /// dropped and released, so the process exits within its grace period
    /// even when a sink hangs.
    pub fn stop_with(mut self, shutdown: &CancellationToken, grace: Duration) -> Self {
        self.stopping = shutdown.clone();
        let (signal, cutoff) = (shutdown.clone(), self.cutoff.clone());
        tokio::spawn(async move {
            signal.cancelled().await;
            tokio::time::sleep(grace).await;
            cutoff.cancel();
        });
        self
    }

    fn winding_down(&self) -> bool {
        self.stopping.is_cancelled() || self.cutoff.is_cancelled()
    }

    /// `work` (a scan) with deliveries alongside: the loop runs while it
    /// does (a sink that is down never slows it), then, if `drain_after`
    /// says so, the outbox is drained; the loop's last pass and the drain
    /// share `outbox.drain_secs`, so a sink that hangs cannot hold the
    /// process past it.
    pub async fn alongside<T>(
        this: Option<Self>,
        work: impl std::future::Future<Output = T>,
        drain_after: impl FnOnce(&T) -> bool,
    ) -> (T, DeliveryCounts) {
        let Some(d) = this else {
            return (work.await, DeliveryCounts::default());
        };
        let stop = CancellationToken::new();
        let looping = tokio::spawn({
            let (d, stop) = (d.clone(), stop.clone());
            async move { d.run(stop).await }
        });
        let output = work.await;
        stop.cancel();
        let drain = Duration::from_secs(d.settings.drain_secs);
        let cutoff = AbortOnDrop(tokio::spawn({
            let cutoff = d.cutoff.clone();
            async move {
                tokio::time::sleep(drain).await;
                cutoff.cancel();
            }
        }));
        let started = tokio::time::Instant::now();
        let mut counts = looping.await.unwrap_or_default();
        if drain_after(&output) && !d.winding_down() {
            match d.drain(drain.saturating_sub(started.elapsed())).await {
                Ok(c) => counts.add(c),
                Err(e) => {
                    tracing::warn!(error = %e, "outbox drain failed; deliveries wait for the next run")
                }
            }
        }
        drop(cutoff);
        (output, counts)
    }

    /// Delivers until `stop`; sleeps `poll_interval_ms` when nothing is due.
    /// Database trouble is logged and retried: a sink loop never ends a run.
    pub async fn run(&self, stop: CancellationToken) -> DeliveryCounts {
        let idle = Duration::from_millis(self.settings.poll_interval_ms.max(10));
        let mut total = DeliveryCounts::default();
        while !stop.is_cancelled() && !self.winding_down() {
            let worked = match self.pass().await {
                Ok(c) => {
                    total.add(c);
                    c.attempted() > 0
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbox delivery pass failed");
                    false
                }
            };
            if !worked {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(idle) => {}
                }
            }
        }
        total
    }

    /// Delivers what is due now, for at most `limit`; ends early when a pass
    /// finds nothing due (what failed waits for its backoff).
    pub async fn drain(&self, limit: Duration) -> Result<DeliveryCounts, DbError> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut total = DeliveryCounts::default();
        while !self.winding_down() {
            let counts = self.pass().await?;
            total.add(counts);
            if counts.attempted() == 0 || tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        self.update_backlog().await;
        Ok(total)
    }

    /// One batch per sink.
    pub async fn pass(&self) -> Result<DeliveryCounts, DbError> {
        let mut total = DeliveryCounts::default();
        for sink in &self.sinks.sinks {
            total.add(self.sink_pass(sink).await?);
        }
        if total.attempted() > 0 {
            self.update_backlog().await;
        }
        Ok(total)
    }

    pub async fn update_backlog(&self) {
        match self.db.outbox_backlog().await {
            Ok(rows) => rows
                .iter()
                .for_each(|b| self.metrics.set_outbox(&b.sink, b.pending, b.dead)),
            Err(e) => tracing::debug!(error = %e, "outbox backlog not updated"),
        }
    }

    async fn sink_pass(&self, sink: &Arc<dyn Sink>) -> Result<DeliveryCounts, DbError> {
        let token = crate::db::new_lease_token();
        let now = crate::model::unix_now();
        let s = &self.settings;
        let batch = self
            .db
            .claim_deliveries(
                sink.name(),
                now,
                s.batch_size,
                &token,
                now + s.lease_secs as i64,
            )
            .await?;
        let slow_down = std::sync::atomic::AtomicBool::new(false);
        let outcomes: Vec<Result<Option<DeliveryOutcome>, DbError>> = futures::stream::iter(batch)
            .map(|d| {
                let (token, slow_down) = (&token, &slow_down);
                async move {
                    let released = Settle::Later {
                        at: crate::model::unix_now(),
                    };
                    let settle = if self.winding_down() {
                        // Stopping: not started, given back at once.
                        released
                    } else if slow_down.load(std::sync::atomic::Ordering::Relaxed) {
                        // Rate limited: the rest of the batch goes back in line untouched.
                        Settle::Later {
                            at: crate::model::unix_now() + s.backoff_initial_secs as i64,
                        }
                    } else {
                        tokio::select! {
                            result = self.attempt(sink.as_ref(), &d) => {
                                if matches!(result, Err(SinkError::RateLimited(_))) {
                                    slow_down.store(true, std::sync::atomic::Ordering::Relaxed);
                                }
                                self.settle_for(&d, result)
                            }
                            // Time is up: dropped mid-request, given back.
                            () = self.cutoff.cancelled() => released,
                        }
                    };
                    self.db.settle_delivery(d.id, token, &settle).await?;
                    let outcome = match &settle {
                        Settle::Delivered => Some(DeliveryOutcome::Delivered),
                        Settle::Retry { error, .. } => {
                            tracing::info!(sink = sink.name(), user_id = %d.user_id, event = %d.kind, attempts = d.attempts + 1, error = %error, "delivery failed, will retry");
                            Some(DeliveryOutcome::Retried)
                        }
                        Settle::Later { .. } if self.winding_down() => Some(DeliveryOutcome::Released),
                        // Rate limited: back in line, not an attempt.
                        Settle::Later { .. } => None,
                        Settle::Dead { error } => {
                            tracing::warn!(sink = sink.name(), user_id = %d.user_id, event = %d.kind, error = %error, "delivery given up");
                            Some(DeliveryOutcome::Dead)
                        }
                    };
                    if let Some(label) = outcome.and_then(DeliveryOutcome::metric_label) {
                        self.metrics.delivery(sink.name(), label);
                    }
                    Ok(outcome)
                }
            })
            .buffer_unordered(s.concurrency.max(1))
            .collect()
            .await;
        let mut counts = DeliveryCounts::default();
        for outcome in outcomes {
            match outcome? {
                Some(DeliveryOutcome::Delivered) => counts.delivered += 1,
                Some(DeliveryOutcome::Retried) => counts.retried += 1,
                Some(DeliveryOutcome::Dead) => counts.dead += 1,
                Some(DeliveryOutcome::Released) => counts.released += 1,
                None => {}
            }
        }
        Ok(counts)
    }

    async fn attempt(&self, sink: &dyn Sink, d: &Delivery) -> Result<(), SinkError> {
        let event: Event = serde_json::from_str(&d.payload)
            .map_err(|e| SinkError::Permanent(format!("unreadable outbox payload: {e}")))?;
        sink.deliver(&event).await
    }

    fn settle_for(&self, d: &Delivery, result: Result<(), SinkError>) -> Settle {
        let s = &self.settings;
        // The error quotes the sink's reply: bounded like any remote text.
        let bound = |e: String| crate::classify::bounded(e, crate::classify::MAX_DETAIL_BYTES);
        match result {
            Ok(()) => Settle::Delivered,
            Err(e) if !e.is_retryable() => Settle::Dead {
                error: bound(e.to_string()),
            },
            Err(e) if d.attempts + 1 >= s.max_attempts => Settle::Dead {
                error: bound(format!("{} attempts, last: {e}", d.attempts + 1)),
            },
            Err(e) => Settle::Retry {
                at: crate::model::unix_now() + backoff_secs(d.attempts, s, &mut rand::rng()) as i64,
                error: bound(e.to_string()),
            },
        }
    }
}

/// What became of one claimed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeliveryOutcome {
    Delivered,
    Retried,
    Dead,
    /// Given back unattempted (shutdown, or the drain's time ran out).
    Released,
}

impl DeliveryOutcome {
    /// The `result` label of `sink_deliveries_total`; a release is no attempt.
    fn metric_label(self) -> Option<&'static str> {
        match self {
            DeliveryOutcome::Delivered => Some("delivered"),
            DeliveryOutcome::Retried => Some("retried"),
            DeliveryOutcome::Dead => Some("dead"),
            DeliveryOutcome::Released => None,
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Exponential backoff from `backoff_initial_secs`, capped, ±20 % jitter so
/// a sink coming back is not hit by every retry at once.
pub fn backoff_secs(attempts: i64, s: &OutboxSettings, rng: &mut impl Rng) -> u64 {
    let exp = attempts.clamp(0, 30) as u32;
    let base = s
        .backoff_initial_secs
        .max(1)
        .saturating_mul(1u64 << exp.min(40))
        .min(s.backoff_max_secs.max(1));
    let jitter = rng.random_range(0.8..=1.2);
    ((base as f64 * jitter).round() as u64).max(1)
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
    reqwest::Client::builder()
        .timeout(Duration::from_secs(timeout_secs.max(1)))
        .connect_timeout(Duration::from_secs(timeout_secs.clamp(1, 10)))
        .redirect(reqwest::redirect::Policy::none())
        // Signed bodies and admin secrets go only where the config says,
        // never through a proxy that happens to be in the environment.
        .no_proxy()
        .user_agent(concat!("avatar-warden/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ConfigError::Invalid(format!("sink HTTP client: {e}")))
}

/// A reqwest error with its causes (reqwest's own text says only "error
/// sending request"; the cause says connection refused, reset...).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
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
