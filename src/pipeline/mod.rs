//! One scan end to end: read due avatars page by page, check them with bounded
//! concurrency, store valid pictures, and record outcomes in batches.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::check::{Checker, HostLimiter, Known, Reverified};
use crate::classify::{Reason, Status, Verdict};
use crate::config::{ExpirySettings, RecheckSettings, Settings, WhenMirrorExists};
use crate::db::{
    AvatarRecord, Claim, Database, DbError, DueAvatar, RunRecord, Selection, Shard, UrlFilter,
    WalkCursor, new_lease_token,
};
use crate::metrics::Metrics;
use crate::model::saturating_i64;
pub(crate) use crate::model::{
    FlaggedUser, MirrorKind, REPORT_FLAGGED_LIMIT, REPORT_HOSTS_LIMIT, ScanReport, unix_now,
};
use crate::storage::{ImageWriter, StoredObject};

mod policy;
mod rewrite;
mod stages;
mod writer;

use stages::{Checked, ObjectCheck, examine_avatar, finish_avatar, missing_objects};

pub(crate) use policy::{Found, build_record};
use writer::{Pace, WriteOptions, renew_leases, write_results};

/// Everything a scan needs, built once by the binary (or a test).
#[derive(Clone)]
pub(crate) struct Deps {
    pub db: Arc<Database>,
    pub checker: Checker,
    pub images: ImageWriter,
    pub policy: Policy,
    pub metrics: Metrics,
    pub sinks: crate::sinks::Sinks,
}

/// The rules that turn a verdict into what is recorded.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    pub recheck: RecheckSettings,
    pub expiry: ExpirySettings,
    pub when_mirror_exists: WhenMirrorExists,
    pub max_attempts: i64,
}

impl Policy {
    pub(crate) fn from_settings(s: &Settings) -> Self {
        Policy {
            recheck: s.recheck.clone(),
            expiry: s.expiry.clone(),
            when_mirror_exists: s.reauth.when_mirror_exists,
            max_attempts: s.retry.max_attempts.max(1),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ScanOptions {
    pub batch_size: usize,
    pub concurrency: usize,
    /// How long claimed avatars stay leased to this scan (renewed while it runs).
    pub lease_secs: u64,
    /// A result is written at the latest this long after it finished.
    pub flush: Duration,
    /// Static sharding: only ids of this shard.
    pub shard: Option<Shard>,
    /// Backfill controls: force, only statuses, users, dry run.
    pub selection: Selection,
    /// Stop after this many avatars.
    pub limit: Option<u64>,
    /// Only avatars of this provider (a rule name from the provider rules).
    pub provider: Option<String>,
    /// Cancelled: stop reading new avatars, finish and record those in flight.
    pub shutdown: CancellationToken,
    /// After shutdown, how long avatars in flight may take before they are
    /// abandoned (their leases are released; nothing half-done is recorded).
    pub grace: Duration,
    /// Download every picture again instead of re-verifying with headers
    /// (`scan --redownload`).
    pub redownload: bool,
}

impl ScanOptions {
    /// A whole scan as configured: no shard, no backfill controls.
    pub fn from_settings(settings: &Settings, shutdown: CancellationToken) -> Self {
        ScanOptions {
            batch_size: settings.scan.batch_size,
            concurrency: settings.fetch.concurrency,
            lease_secs: settings.scan.lease_secs,
            flush: settings.scan.flush(),
            shard: None,
            selection: Selection::default(),
            limit: None,
            provider: None,
            shutdown,
            grace: Duration::from_secs(settings.shutdown.grace_secs),
            redownload: false,
        }
    }
}

impl ScanReport {
    fn add(&mut self, c: &Checked) {
        let (record, stored, bytes) = (&c.record, c.stored.as_ref(), c.size);
        self.bytes_downloaded += c.downloaded;
        match c.kind {
            Some(MirrorKind::First) => self.first_mirrors += 1,
            Some(MirrorKind::Unchanged) => self.unchanged += 1,
            Some(MirrorKind::Changed) => self.changed += 1,
            None => {}
        }
        if let Some(kind) = c.kind.filter(|k| *k != MirrorKind::First) {
            // No re-verification request: a full download of the same URL decided.
            let method = c.reverified.map_or("get", |r| r.method);
            *self
                .reverified
                .entry(format!("{method}/{}", kind.as_str()))
                .or_default() += 1;
        }
        let before = c.previous.map_or("new", |s| s.as_str());
        if before != record.status.as_str() {
            *self
                .changes
                .entry(format!("{before} -> {}", record.status))
                .or_default() += 1;
        }
        self.processed += 1;
        *self.by_status.entry(record.status.to_string()).or_default() += 1;
        *self
            .by_reason
            .entry(format!("{}/{}", record.status, record.reason))
            .or_default() += 1;
        if let Some(s) = stored {
            if s.deduplicated {
                self.objects_deduplicated += 1;
            } else {
                self.objects_uploaded += 1;
                self.bytes_uploaded += bytes;
            }
        }
        // The record's own flag: the policy may keep a user quiet (#12).
        if record.reauth_required {
            self.flagged_total += 1;
        }
        if record.reauth_required && self.flagged.len() < REPORT_FLAGGED_LIMIT {
            self.flagged.push(FlaggedUser {
                user_id: record.user_id.to_string(),
                status: record.status.to_string(),
                reason: record.reason.to_string(),
            });
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("a scan task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// Stored objects could not be made durable: their rows are not written.
    #[error(transparent)]
    Store(#[from] crate::storage::StoreError),
}

impl ScanError {
    pub fn is_retryable(&self) -> bool {
        match self {
            ScanError::Db(e) => e.is_retryable(),
            ScanError::Task(_) => false,
            ScanError::Store(e) => e.is_retryable(),
        }
    }
}

/// Scans everything due once: the unit the scheduler repeats and tests call.
/// Avatars are claimed page by page under a lease, so several workers can
/// scan one table at once without checking anything twice.
pub(crate) async fn scan_once(deps: &Deps, opts: &ScanOptions) -> Result<ScanReport, ScanError> {
    let token = new_lease_token();
    let span = tracing::info_span!("scan", lease = &token[..8]);
    scan_traced(deps, opts, &token).instrument(span).await
}

async fn scan_traced(
    deps: &Deps,
    opts: &ScanOptions,
    token: &str,
) -> Result<ScanReport, ScanError> {
    let started = Instant::now();
    let started_at = unix_now();
    deps.metrics.scan_started();
    deps.images.forget_all();
    update_backlog(deps).await;
    let result = match rewrite_first(deps, opts).await {
        Ok(rewritten) => scan_with_lease(deps, opts, token)
            .await
            .map(|report| ScanReport {
                rewritten,
                ..report
            }),
        Err(e) => Err(e),
    };
    // Give back what was claimed but not checked (shutdown, or an error mid-way).
    if let Err(e) = deps.db.release(token).await {
        tracing::warn!(error = %e, "could not release leases; they expire by themselves");
    }
    let mut report = match result {
        Ok(r) => r,
        Err(e) => {
            // What this scan wrote but never made durable is not kept, and
            // not trusted by the next scan of this process.
            deps.images.discard_unsynced().await;
            deps.metrics.scan_failed();
            if !opts.selection.dry_run {
                let run = RunRecord {
                    started_at,
                    finished_at: unix_now(),
                    result: "failed".into(),
                    worker: worker_name(),
                    error: Some(crate::classify::bounded(
                        e.to_string(),
                        crate::classify::MAX_DETAIL_BYTES,
                    )),
                    ..RunRecord::default()
                };
                // The database may be what failed: then say so, once.
                if let Err(record) = deps.db.record_run(&run).await {
                    tracing::warn!(error = %record, "the failed scan could not be recorded in avatar_warden_runs either");
                }
            }
            return Err(e);
        }
    };
    report.interrupted = opts.shutdown.is_cancelled();
    report.duration_secs = started.elapsed().as_secs_f64();
    deps.metrics.scan_finished(&report);
    if !report.interrupted {
        update_backlog(deps).await;
    }
    if !report.dry_run {
        let run = RunRecord {
            started_at,
            finished_at: unix_now(),
            result: if report.interrupted {
                "interrupted"
            } else {
                "completed"
            }
            .into(),
            processed: saturating_i64(report.processed),
            failing: saturating_i64(report.count(Status::Failing)),
            flagged: saturating_i64(report.flagged_total),
            worker: worker_name(),
            error: None,
        };
        if let Err(e) = deps.db.record_run(&run).await {
            tracing::warn!(error = %e, "could not record the run in avatar_warden_runs");
        }
    }
    tracing::info!(
        processed = report.processed,
        interrupted = report.interrupted,
        abandoned = report.abandoned,
        duration_secs = report.duration_secs,
        "scan finished"
    );
    Ok(report)
}

/// Late write-back before the scan, when the settings it derives from changed.
async fn rewrite_first(deps: &Deps, opts: &ScanOptions) -> Result<u64, ScanError> {
    if !rewrite::applies(opts) {
        return Ok(0);
    }
    Ok(rewrite::rewrite_stale(deps, &opts.shutdown).await?)
}

/// The due backlog gauges; a count that fails is logged, never fatal.
async fn update_backlog(deps: &Deps) {
    let now = unix_now();
    match deps.db.count_due(now).await {
        Ok(backlog) => {
            deps.metrics.set_due_backlog(backlog.due);
            let age = backlog.oldest_due_at.map_or(0, |t| now - t);
            deps.metrics.set_oldest_due_age(age);
        }
        Err(e) => tracing::warn!(error = %e, "could not count the due backlog"),
    }
}

/// This worker's name in `avatar_warden_runs`: the host (the pod, in Kubernetes).
pub(crate) fn worker_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// `scan --provider NAME`: only URLs that rule matches.
struct ProviderFilter {
    checker: Checker,
    name: String,
}

impl UrlFilter for ProviderFilter {
    fn keep(&self, url: &str) -> bool {
        self.checker.provider_of(url).as_deref() == Some(self.name.as_str())
    }
}

async fn scan_with_lease(
    deps: &Deps,
    opts: &ScanOptions,
    token: &str,
) -> Result<ScanReport, ScanError> {
    let batch = opts.batch_size.max(1);
    let (lease_secs, shard) = (saturating_i64(opts.lease_secs), opts.shard);
    let selection = Arc::new(opts.selection.clone());
    let dry_run = opts.selection.dry_run;
    let redownload = opts.redownload;
    let keep_url = opts.provider.clone().map(|name| {
        Arc::new(ProviderFilter {
            checker: deps.checker.clone(),
            name,
        })
    });
    // Keyset pages, claimed lazily as the workers need them: memory is bounded
    // by two pages plus what is in flight, whatever the table size. Each claim
    // runs as its own task so its transaction finishes even while this stream
    // is not being polled (an open transaction would block the writer).
    // The next page is claimed while this one is checked: waiting for the
    // claim between pages left the workers idle (t2 in BENCHMARKS.md).
    let db = deps.db.clone();
    // A store that answers for many keys at once is asked once per page
    // whether the re-verified avatars' objects are still there. (The writer
    // is captured, not the `Arc<dyn ObjectStore>`: capturing that failed
    // the `Send` proof of the spawned scan.)
    let bulk = (deps.images.store().checks_in_bulk() && !redownload).then(|| deps.images.clone());
    let claim_token = token.to_string();
    let pace = Arc::new(Pace::new(opts.concurrency.max(1), batch, opts.lease_secs));
    let claim_pace = pace.clone();
    let claim = move |after: Option<WalkCursor>| {
        let db = db.clone();
        let token = claim_token.clone();
        let selection = selection.clone();
        let keep_url = keep_url.clone();
        let bulk = bulk.clone();
        let limit = claim_pace.page_size();
        AbortOnDrop(tokio::spawn(async move {
            let now = unix_now();
            let page = db
                .claim_page(&Claim {
                    after: after.as_ref(),
                    now,
                    limit,
                    token: &token,
                    lease_until: now + lease_secs,
                    shard,
                    selection: &selection,
                    keep_url: keep_url.as_deref().map(|f| f as &dyn UrlFilter),
                })
                .await?;
            let missing = match bulk {
                Some(images) => missing_objects(images.store().clone(), &page.claimed).await,
                None => None,
            };
            Ok::<_, DbError>((page, missing))
        }))
    };
    let first = claim(None);
    let pages = stream::try_unfold(Some(first), move |pending| {
        let claim = claim.clone();
        async move {
            let Some(pending) = pending else {
                return Ok::<_, ScanError>(None);
            };
            let (page, missing) = pending.await.map_err(ScanError::Task)??;
            let next = page.cursor.map(|after| claim(Some(after)));
            let items = page.claimed.into_iter().map(move |due| {
                let object = ObjectCheck::of(&due, missing.as_ref());
                Ok::<_, ScanError>((due, object))
            });
            Ok(Some((stream::iter(items), next)))
        }
    });

    // The heartbeat: while this scan runs, what it claimed and has not
    // written stays leased to it, however slow a page is.
    let _heartbeat = (!dry_run).then(|| {
        AbortOnDrop(tokio::spawn(renew_leases(
            deps.db.clone(),
            token.to_string(),
            opts.lease_secs,
        )))
    });

    // The writer drains results in batches on its own task, so checking
    // never pauses while a batch is written.
    let (tx, rx) = tokio::sync::mpsc::channel::<Checked>(batch * 2);
    let writer = tokio::spawn(write_results(
        deps.clone(),
        rx,
        WriteOptions {
            batch,
            flush: opts.flush,
            token: token.to_string(),
            dry_run,
        },
    ));

    let hosts = deps.checker.host_limiter();
    let hosts = &hosts;
    let shutdown = opts.shutdown.clone();
    let limit = opts
        .limit
        .map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
    let results = pages
        .try_flatten()
        .take(limit)
        .take_until(async move { shutdown.cancelled().await })
        .map_ok(|(due, object)| async move {
            Ok::<_, ScanError>(examine_avatar(deps, due, object, hosts, redownload).await)
        })
        .try_buffer_unordered(opts.concurrency.max(1))
        // Storing is a stage of its own with as many slots: a slow disk no
        // longer holds fetch slots (bodies held: at most 2 × concurrency).
        .map_ok(|ex| async move { Ok::<_, ScanError>(finish_avatar(deps, ex, dry_run).await) })
        .try_buffer_unordered(opts.concurrency.max(1));
    // Boxed, not pinned on the stack, so dropping it cancels what is in flight.
    let mut results = Box::pin(results);
    let mut failure = None;
    // After shutdown, in-flight avatars get `grace` to finish; then they are dropped.
    let (stop, grace) = (opts.shutdown.clone(), opts.grace);
    let hard_stop = async move {
        stop.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    futures::pin_mut!(hard_stop);
    let mut abandoned = 0;
    loop {
        let next = tokio::select! {
            next = results.try_next() => next,
            () = &mut hard_stop => {
                abandoned = u64::try_from(deps.metrics.in_flight()).unwrap_or(0);
                tracing::warn!(abandoned, ?grace, "grace period over: abandoning avatars in flight");
                break;
            }
        };
        match next {
            Ok(Some(checked)) => {
                pace.finished();
                if tx.send(checked).await.is_err() {
                    break; // the writer stopped: its error is reported below
                }
            }
            Ok(None) => break,
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    drop(results);
    drop(tx);
    let mut report = writer.await.map_err(ScanError::Task)??;
    report.abandoned = abandoned;
    report.hosts = hosts
        .throttled()
        .into_iter()
        .take(REPORT_HOSTS_LIMIT)
        .map(|mut h| {
            h.provider = deps.checker.provider_of(&format!("https://{}/", h.host));
            h
        })
        .collect();
    match failure {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// A prefetched claim that nobody will read (limit reached, shutdown, error)
/// is cancelled: its transaction rolls back, or, if it committed already, the
/// scan's final release gives its leases back.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}
