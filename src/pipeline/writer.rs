//! The writer task and the lease keepers: results written in batches or
//! `scan.flush_secs` after they finished, leases renewed while the scan
//! lives, claim pages sized to what finishes within half a lease.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::db::{AvatarRecord, Database};
use crate::model::unix_now;

use super::{Checked, Deps, ScanError, ScanReport};

/// Sleeps until `at`, or forever without one (a `select!` arm that never fires).
pub(super) async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Renews the scan's leases every third of a lease until aborted. A failed
/// renewal is logged and tried again; the leases outlive one miss.
pub(super) async fn renew_leases(db: Arc<Database>, token: String, lease_secs: u64) {
    let every = Duration::from_secs(lease_secs.max(3) / 3);
    loop {
        tokio::time::sleep(every).await;
        let until = unix_now() + crate::model::saturating_i64(lease_secs);
        match db.renew_leases(&token, until).await {
            Ok(n) => tracing::debug!(renewed = n, "leases renewed"),
            Err(e) => tracing::warn!(error = %e, "could not renew leases; trying again"),
        }
    }
}

/// Sizes claim pages to what this scan finishes within half a lease, so a
/// page never outlives its lease even if a renewal is missed (never fewer
/// than two rounds of the fetch slots, never more than `scan.batch_size`).
pub(super) struct Pace {
    started: Instant,
    finished: std::sync::atomic::AtomicU64,
    min: usize,
    max: usize,
    lease_secs: u64,
}

impl Pace {
    pub(super) fn new(concurrency: usize, batch: usize, lease_secs: u64) -> Self {
        Pace {
            started: Instant::now(),
            finished: std::sync::atomic::AtomicU64::new(0),
            min: (concurrency * 2).min(batch),
            max: batch,
            lease_secs,
        }
    }

    pub(super) fn finished(&self) {
        self.finished
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub(super) fn page_size(&self) -> usize {
        let elapsed = self.started.elapsed().as_secs_f64();
        let done = self.finished.load(std::sync::atomic::Ordering::Relaxed);
        // Too early to know the rate: a full page, as before.
        if elapsed < 5.0 || done == 0 {
            return self.max;
        }
        let rate = done as f64 / elapsed;
        // Non-negative; clamped to the page bounds right after.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let size = (rate * self.lease_secs as f64 / 2.0) as usize;
        size.clamp(self.min, self.max)
    }
}

/// How the writer batches: `batch` results, or whatever finished `flush` ago.
pub(super) struct WriteOptions {
    pub(super) batch: usize,
    pub(super) flush: Duration,
    pub(super) token: String,
    pub(super) dry_run: bool,
}

pub(super) async fn write_results(
    deps: Deps,
    mut rx: tokio::sync::mpsc::Receiver<Checked>,
    opts: WriteOptions,
) -> Result<ScanReport, ScanError> {
    let WriteOptions {
        batch,
        flush,
        token,
        dry_run,
    } = opts;
    let mut report = ScanReport {
        dry_run,
        ..ScanReport::default()
    };
    let mut buf: Vec<Checked> = Vec::with_capacity(batch);
    let mut open = true;
    // When the oldest unwritten result arrived: it is written by `flush`
    // after that, however slowly the rest trickle in.
    let mut oldest: Option<Instant> = None;
    while open || !buf.is_empty() {
        if open && buf.len() < batch {
            let due = oldest.map(|t| t + flush);
            let room = batch - buf.len();
            tokio::select! {
                n = rx.recv_many(&mut buf, room) => {
                    open = n > 0;
                    if n > 0 && oldest.is_none() {
                        oldest = Some(Instant::now());
                    }
                    let overdue = due.is_some_and(|d| Instant::now() >= d);
                    if open && buf.len() < batch && !overdue {
                        continue;
                    }
                }
                () = sleep_until_opt(due) => {}
            }
        }
        if buf.is_empty() {
            continue;
        }
        oldest = None;
        let mut unwritten = Vec::new();
        if !dry_run {
            let records: Vec<AvatarRecord> = buf.iter().map(|c| c.record.clone()).collect();
            let outbox: Vec<crate::db::OutboxRow> =
                buf.iter_mut().flat_map(|c| c.outbox.drain(..)).collect();
            // Objects first, then the rows that point at them: a crash in
            // between leaves an unreferenced object, never a dangling URL.
            if buf.iter().any(|c| c.stored.is_some()) {
                deps.images.sync().await?;
            }
            let write_started = Instant::now();
            let refused =
                |i: usize, e: &crate::db::DbError| records[i].refused(e, buf[i].was_flagged);
            let recorded = deps
                .db
                .record_batch_with(&records, &outbox, &token, &refused)
                .await?;
            deps.metrics.observe_db_batch(write_started.elapsed());
            report.lease_lost += recorded.discarded as u64;
            // Rows the database refused are reported as what was written instead.
            for (index, replacement) in recorded.replaced {
                match replacement {
                    Some(record) => buf[index].record = record,
                    None => unwritten.push(index),
                }
            }
        }
        report.unrecorded += unwritten.len() as u64;
        for (index, c) in buf.drain(..).enumerate() {
            if unwritten.contains(&index) {
                continue;
            }
            report.add(&c);
            deps.metrics.record_outcome(
                &c.record,
                c.provider.as_deref(),
                c.stored.as_ref(),
                c.size,
            );
        }
    }
    Ok(report)
}
