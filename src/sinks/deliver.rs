//! The delivery loop: claims due outbox rows per sink, delivers them with
//! bounded concurrency, settles each (delivered, retried with backoff, dead),
//! and stops starting work after a shutdown signal.

use super::*;

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
                    tracing::warn!(error = %e, "outbox drain failed; deliveries wait for the next run");
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
        // What waits from before a restart is on the gauges before the first attempt.
        self.update_backlog().await;
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
                    () = stop.cancelled() => {}
                    () = tokio::time::sleep(idle) => {}
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
            Ok(rows) => rows.iter().for_each(|b| {
                self.metrics
                    .set_outbox(&b.sink, b.pending, b.dead, b.oldest_pending_at);
            }),
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
                now + crate::model::saturating_i64(s.lease_secs),
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
                            at: crate::model::unix_now() + crate::model::saturating_i64(s.backoff_initial_secs),
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
        let event: Event = serde_json::from_str(&d.payload).map_err(SinkError::Payload)?;
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
                at: crate::model::unix_now()
                    + crate::model::saturating_i64(backoff_secs(d.attempts, s, &mut rand::rng())),
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
    let exp = u32::try_from(attempts.clamp(0, 30)).unwrap_or(0);
    let base = crate::model::exponential_backoff(s.backoff_initial_secs, s.backoff_max_secs, exp);
    let jitter = rng.random_range(0.8..=1.2);
    // Positive and far below 2^52: the rounded product fits.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let secs = (base as f64 * jitter).round() as u64;
    secs.max(1)
}
