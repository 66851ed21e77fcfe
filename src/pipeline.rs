//! One scan end to end: read due avatars page by page, check them with bounded
//! concurrency, store valid pictures, and record outcomes in batches.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::check::{Checker, HostLimiter, Known, Reverified};
use crate::classify::{Reason, Status, Verdict};
use crate::config::{ExpirySettings, RecheckSettings, Settings, WhenMirrorExists};
use crate::db::{
    AvatarRecord, Claim, Database, DbError, DueAvatar, RunRecord, Selection, Shard, UrlFilter,
    UserId, Validators, new_lease_token,
};
use crate::media::ImageInfo;
use crate::metrics::Metrics;
pub use crate::model::{
    FlaggedUser, MirrorKind, REPORT_FLAGGED_LIMIT, REPORT_HOSTS_LIMIT, ScanReport, unix_now,
};
use crate::storage::{ImageWriter, StoredObject};

/// Everything a scan needs, built once by the binary (or a test).
#[derive(Clone)]
pub struct Deps {
    pub db: Arc<Database>,
    pub checker: Checker,
    pub images: ImageWriter,
    pub policy: Policy,
    pub metrics: Metrics,
    pub sinks: crate::sinks::Sinks,
}

/// The rules that turn a verdict into what is recorded.
#[derive(Debug, Clone)]
pub struct Policy {
    pub recheck: RecheckSettings,
    pub expiry: ExpirySettings,
    pub when_mirror_exists: WhenMirrorExists,
    pub max_attempts: i64,
}

impl Policy {
    pub fn from_settings(s: &Settings) -> Self {
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
    Task(String),
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

/// One avatar after its fetch: what was found, not yet stored or recorded.
struct Examined {
    due: DueAvatar,
    exam: crate::check::Examination,
    started: Instant,
    now: i64,
    span: tracing::Span,
    _in_flight: crate::metrics::InFlight,
}

impl MirrorKind {
    /// From the recorded outcome: `unchanged` and `source_changed` are
    /// re-verifications, any other newly stored object is a first mirror.
    fn of(record: &AvatarRecord, stored: bool) -> Option<Self> {
        match record.reason {
            Reason::Unchanged => Some(MirrorKind::Unchanged),
            Reason::SourceChanged => Some(MirrorKind::Changed),
            _ if stored => Some(MirrorKind::First),
            _ => None,
        }
    }
}

/// The mirrored picture a re-check compares with: only for the same URL.
fn known_picture(due: &DueAvatar) -> Option<Known> {
    let prev = due.previous.as_ref()?;
    if prev.source_url != due.avatar_url {
        return None;
    }
    Some(Known {
        sha256: prev.sha256.clone()?,
        validators: prev.validators.clone(),
    })
}

/// Stage one: fetch, classify and validate one avatar, in its own span.
async fn examine_avatar(
    deps: &Deps,
    due: DueAvatar,
    hosts: &HostLimiter,
    redownload: bool,
) -> Examined {
    let span = tracing::info_span!(
        "avatar",
        user_id = %due.user_id,
        host = url::Url::parse(&due.avatar_url).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default(),
        status = tracing::field::Empty,
        reason = tracing::field::Empty,
        duration_ms = tracing::field::Empty,
    );
    let started = Instant::now();
    let in_flight = deps.metrics.in_flight_guard();
    let now = unix_now();
    let mut known = known_picture(&due).filter(|_| !redownload);
    let object_key = due.previous.as_ref().and_then(|p| p.object_key.clone());
    if let (Some(_), Some(key)) = (&known, &object_key) {
        // A re-verification that would only confirm headers must not confirm
        // a mirror whose object is gone: one existence check (cheap next to
        // the request) and, if it is missing, a full download stores it again.
        if let Ok(false) = deps.images.store().exists(key).await {
            tracing::warn!(parent: &span, user_id = %due.user_id, key, "the mirrored object is missing from the store: downloading the picture again");
            deps.images.forget(key);
            known = None;
        }
    }
    let exam = deps
        .checker
        .reexamine(&due.avatar_url, now, hosts, known.as_ref())
        .instrument(span.clone())
        .await;
    if exam.requests > 0 {
        deps.metrics.observe_fetch(exam.fetch_time, exam.bytes_read);
    }
    Examined {
        due,
        exam,
        started,
        now,
        span,
        _in_flight: in_flight,
    }
}

/// Stage two: store the picture and build the record. Its own stage so a
/// slow disk or object store never holds one of the fetch slots (t2 in
/// BENCHMARKS.md: fsync latency there cost a fifth of the throughput).
async fn finish_avatar(deps: &Deps, examined: Examined, dry_run: bool) -> Checked {
    let span = examined.span.clone();
    finish_avatar_in(deps, examined, dry_run)
        .instrument(span)
        .await
}

async fn finish_avatar_in(deps: &Deps, examined: Examined, dry_run: bool) -> Checked {
    let Examined {
        due,
        exam,
        started,
        now,
        ..
    } = examined;
    let mut verdict = exam.verdict;
    let mut mirror = None;
    let mut size = 0;
    if let Some((info, body)) = exam.image.filter(|_| !dry_run) {
        size = body.bytes.len() as u64;
        match deps
            .images
            .store_image(&body.sha256, info.format, body.bytes)
            .await
        {
            Ok(stored) => mirror = Some((info, body.sha256, stored)),
            Err(e) => {
                tracing::warn!(user_id = %due.user_id, error = %e, "storing the mirror failed");
                verdict = Verdict::new(Reason::StorageError).with_detail(e.to_string());
            }
        }
    }
    let mut rng = rand::rng();
    let record = build_record(
        &due,
        verdict,
        exam.expires_at,
        mirror.as_ref(),
        size,
        &exam.validators,
        now,
        &deps.policy,
        &mut rng,
    );
    let span = tracing::Span::current();
    span.record("status", record.status.as_str());
    span.record("reason", record.reason.as_str());
    span.record("duration_ms", started.elapsed().as_millis() as u64);
    deps.metrics.observe_avatar(started.elapsed());
    tracing::debug!(
        provider = exam.provider.as_deref().unwrap_or("-"),
        requests = exam.requests,
        "avatar checked"
    );
    let kind = MirrorKind::of(&record, mirror.is_some());
    deps.metrics
        .observe_mirror_check(kind, exam.reverified, exam.bytes_read);
    Checked {
        outbox: deps.sinks.outbox_rows(due.previous.as_ref(), &record),
        kind,
        reverified: exam.reverified,
        previous: due.previous.as_ref().map(|p| p.status),
        was_flagged: due.previous.as_ref().is_some_and(|p| p.reauth_required),
        record,
        stored: mirror.map(|(_, _, s)| s),
        size,
        downloaded: exam.bytes_read,
        provider: exam.provider,
    }
}

/// A newly stored picture: what it is, its sha256, where it went.
pub type Mirror = (ImageInfo, String, StoredObject);

/// Re-check a URL whose signature expires this long before it does.
const EXPIRY_MARGIN_SECS: i64 = 60;

/// Turns a verdict into the row to record: what carries over from the last
/// check, when to look again, and whether the user must re-authorize.
/// `validators` are what the source said in this check (kept with a new
/// mirror, or with one confirmed `unchanged`).
#[allow(clippy::too_many_arguments)]
pub fn build_record(
    due: &DueAvatar,
    mut verdict: Verdict,
    expires_at: Option<i64>,
    mirror: Option<&Mirror>,
    size: u64,
    validators: &Validators,
    now: i64,
    policy: &Policy,
    rng: &mut impl Rng,
) -> AvatarRecord {
    let prev = due.previous.as_ref();
    let same_url = prev.is_some_and(|p| p.source_url == due.avatar_url);
    // The same URL downloaded again: name what the picture did.
    if let (Some((_, sha, _)), Some(old)) = (mirror, prev.and_then(|p| p.sha256.as_deref()))
        && same_url
        && verdict.code == Verdict::mirrored().code
    {
        verdict = if old.eq_ignore_ascii_case(sha) {
            Verdict::new(Reason::Unchanged).with_detail("get: same sha256")
        } else {
            Verdict::new(Reason::SourceChanged).with_detail(format!("sha256 was {old}"))
        };
    }
    let confirmed = verdict.code == Reason::Unchanged;
    let signals_before = if same_url {
        prev.map_or(0, |p| p.expiry_signals)
    } else {
        0
    };
    let mut record = AvatarRecord {
        user_id: due.user_id.clone(),
        source_url: due.avatar_url.clone(),
        status: verdict.status,
        reason: verdict.code,
        reason_detail: verdict.detail.clone(),
        // The last good mirror stays visible until a new one replaces it.
        mirror_url: prev.and_then(|p| p.mirror_url.clone()),
        object_key: prev.and_then(|p| p.object_key.clone()),
        sha256: prev.and_then(|p| p.sha256.clone()),
        size_bytes: prev.and_then(|p| p.meta.size_bytes),
        width: prev.and_then(|p| p.meta.width),
        height: prev.and_then(|p| p.meta.height),
        format: prev.and_then(|p| p.meta.format.clone()),
        // Validators belong to the URL they came from.
        validators: if mirror.is_some() || confirmed {
            validators.clone()
        } else if same_url {
            prev.map(|p| p.validators.clone()).unwrap_or_default()
        } else {
            Validators::default()
        },
        reauth_required: prev.is_some_and(|p| p.reauth_required),
        attempts: 0,
        expiry_signals: signals_before,
        checked_at: now,
        next_check_at: None,
    };
    if let Some((info, sha, stored)) = mirror {
        record.mirror_url = Some(stored.url.clone());
        record.object_key = Some(stored.key.clone());
        record.sha256 = Some(sha.clone());
        record.size_bytes = Some(size as i64);
        record.width = Some(i64::from(info.width));
        record.height = Some(i64::from(info.height));
        record.format = Some(info.format.name().to_string());
    }
    match verdict.status {
        Status::Mirrored => {
            record.reauth_required = false;
            // A URL that has said "gone" before is dying: look again soon.
            let wait = if signals_before > 0 {
                policy.expiry.min_interval_secs as i64
            } else {
                jitter(policy.recheck.mirrored_secs, 0.1, rng)
            };
            record.next_check_at = Some(now + wait);
        }
        Status::Expired => {
            let is_signal = verdict.code.is_expiry_signal();
            if is_signal {
                record.expiry_signals += 1;
            }
            if is_signal && record.expiry_signals < policy.expiry.confirmations {
                record.status = Status::Failing;
                record.reason = Reason::ExpiryUnconfirmed;
                record.reason_detail = Some(format!(
                    "{} of {} expiry signals; last: {}{}",
                    record.expiry_signals,
                    policy.expiry.confirmations,
                    verdict.code,
                    verdict
                        .detail
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                ));
                record.next_check_at = Some(before_expiry(
                    now + policy.expiry.min_interval_secs as i64,
                    expires_at,
                    now,
                ));
            } else {
                let keep_quiet = record.mirror_url.is_some()
                    && policy.when_mirror_exists == WhenMirrorExists::Keep;
                record.reauth_required = !keep_quiet;
            }
        }
        Status::Invalid => record.reauth_required = true,
        Status::Failing => {
            let before = if same_url && prev.is_some_and(|p| p.status == Status::Failing) {
                prev.map_or(0, |p| p.attempts)
            } else {
                0
            };
            record.attempts = before + 1;
            if record.attempts >= policy.max_attempts {
                record.reason = Reason::GaveUp;
                record.reason_detail = Some(format!(
                    "{} failing checks in a row; last: {}{}",
                    record.attempts,
                    verdict.code,
                    verdict
                        .detail
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                ));
            } else {
                let backoff = backoff_secs(record.attempts, &policy.recheck);
                let next = now + jitter(backoff, 0.2, rng);
                record.next_check_at = Some(before_expiry(next, expires_at, now));
            }
        }
        Status::Blocked | Status::Pending => {}
    }
    // The composed detail quotes remote text: bound it once more as a whole.
    record.reason_detail = record
        .reason_detail
        .map(|d| crate::classify::bounded(d, crate::classify::MAX_DETAIL_BYTES));
    record
}

/// A signed URL must be tried again before its signature runs out.
fn before_expiry(next: i64, expires_at: Option<i64>, now: i64) -> i64 {
    match expires_at {
        Some(t) if t > now => next.min((t - EXPIRY_MARGIN_SECS).max(now + 1)),
        _ => next,
    }
}

/// `initial * 2^(attempts-1)`, capped.
pub fn backoff_secs(attempts: i64, recheck: &RecheckSettings) -> u64 {
    let exp = attempts.clamp(1, 40) as u32 - 1;
    recheck
        .failing_initial_secs
        .max(1)
        .saturating_mul(1u64 << exp.min(40))
        .min(recheck.failing_max_secs.max(1))
}

/// Spreads re-checks so a million avatars mirrored on one day are not all due on the same second.
fn jitter(secs: u64, fraction: f64, rng: &mut impl Rng) -> i64 {
    let spread = secs as f64 * fraction;
    (secs as f64 + rng.random_range(-spread..=spread)).max(1.0) as i64
}

/// Scans everything due once: the unit the scheduler repeats and tests call.
/// Avatars are claimed page by page under a lease, so several workers can
/// scan one table at once without checking anything twice.
pub async fn scan_once(deps: &Deps, opts: &ScanOptions) -> Result<ScanReport, ScanError> {
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
    let result = scan_with_lease(deps, opts, token).await;
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
            processed: report.processed as i64,
            failing: report.count(Status::Failing) as i64,
            flagged: report.flagged_total as i64,
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

/// The due backlog gauge; a count that fails is logged, never fatal.
async fn update_backlog(deps: &Deps) {
    match deps.db.count_due(unix_now()).await {
        Ok(n) => deps.metrics.set_due_backlog(n),
        Err(e) => tracing::warn!(error = %e, "could not count the due backlog"),
    }
}

/// This worker's name in `avatar_warden_runs`: the host (the pod, in Kubernetes).
pub fn worker_name() -> String {
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

/// Sleeps until `at`, or forever without one (a `select!` arm that never fires).
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Renews the scan's leases every third of a lease until aborted. A failed
/// renewal is logged and tried again; the leases outlive one miss.
async fn renew_leases(db: Arc<Database>, token: String, lease_secs: u64) {
    let every = Duration::from_secs(lease_secs.max(3) / 3);
    loop {
        tokio::time::sleep(every).await;
        let until = unix_now() + lease_secs as i64;
        match db.renew_leases(&token, until).await {
            Ok(n) => tracing::debug!(renewed = n, "leases renewed"),
            Err(e) => tracing::warn!(error = %e, "could not renew leases; trying again"),
        }
    }
}

/// Sizes claim pages to what this scan finishes within half a lease, so a
/// page never outlives its lease even if a renewal is missed (never fewer
/// than two rounds of the fetch slots, never more than `scan.batch_size`).
struct Pace {
    started: Instant,
    finished: std::sync::atomic::AtomicU64,
    min: usize,
    max: usize,
    lease_secs: u64,
}

impl Pace {
    fn new(concurrency: usize, batch: usize, lease_secs: u64) -> Self {
        Pace {
            started: Instant::now(),
            finished: std::sync::atomic::AtomicU64::new(0),
            min: (concurrency * 2).min(batch),
            max: batch,
            lease_secs,
        }
    }

    fn finished(&self) {
        self.finished
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn page_size(&self) -> usize {
        let elapsed = self.started.elapsed().as_secs_f64();
        let done = self.finished.load(std::sync::atomic::Ordering::Relaxed);
        // Too early to know the rate: a full page, as before.
        if elapsed < 5.0 || done == 0 {
            return self.max;
        }
        let rate = done as f64 / elapsed;
        ((rate * self.lease_secs as f64 / 2.0) as usize).clamp(self.min, self.max)
    }
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

/// One checked avatar: its record, the object stored for it, bytes fetched.
struct Checked {
    record: AvatarRecord,
    stored: Option<StoredObject>,
    /// Bytes of the stored picture.
    size: u64,
    /// Response bytes downloaded to decide.
    downloaded: u64,
    previous: Option<Status>,
    /// The user's re-auth flag before this check.
    was_flagged: bool,
    provider: Option<String>,
    /// First mirror, unchanged or changed picture.
    kind: Option<MirrorKind>,
    reverified: Option<Reverified>,
    /// Sink deliveries this verdict causes, written in its batch.
    outbox: Vec<crate::db::OutboxRow>,
}

async fn scan_with_lease(
    deps: &Deps,
    opts: &ScanOptions,
    token: &str,
) -> Result<ScanReport, ScanError> {
    let batch = opts.batch_size.max(1);
    let (lease_secs, shard) = (opts.lease_secs as i64, opts.shard);
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
    let claim_token = token.to_string();
    let pace = Arc::new(Pace::new(opts.concurrency.max(1), batch, opts.lease_secs));
    let claim_pace = pace.clone();
    let claim = move |after: Option<UserId>| {
        let db = db.clone();
        let token = claim_token.clone();
        let selection = selection.clone();
        let keep_url = keep_url.clone();
        let limit = claim_pace.page_size();
        AbortOnDrop(tokio::spawn(async move {
            let now = unix_now();
            db.claim_page(&Claim {
                after: after.as_ref(),
                now,
                limit,
                token: &token,
                lease_until: now + lease_secs,
                shard,
                selection: &selection,
                keep_url: keep_url.as_deref().map(|f| f as &dyn UrlFilter),
            })
            .await
        }))
    };
    let first = claim(None);
    let pages = stream::try_unfold(Some(first), move |pending| {
        let claim = claim.clone();
        async move {
            let Some(pending) = pending else {
                return Ok::<_, ScanError>(None);
            };
            let page = pending
                .await
                .map_err(|e| ScanError::Task(e.to_string()))??;
            let next = page.cursor.map(|after| claim(Some(after)));
            let items = page.claimed.into_iter().map(Ok::<DueAvatar, ScanError>);
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
    let limit = opts.limit.map_or(usize::MAX, |l| l as usize);
    let results = pages
        .try_flatten()
        .take(limit)
        .take_until(async move { shutdown.cancelled().await })
        .map_ok(|due| async move {
            Ok::<_, ScanError>(examine_avatar(deps, due, hosts, redownload).await)
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
            _ = &mut hard_stop => {
                abandoned = deps.metrics.in_flight() as u64;
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
    let mut report = writer.await.map_err(|e| ScanError::Task(e.to_string()))??;
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

/// How the writer batches: `batch` results, or whatever finished `flush` ago.
struct WriteOptions {
    batch: usize,
    flush: Duration,
    token: String,
    dry_run: bool,
}

async fn write_results(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{MirrorMeta, Previous};
    use crate::media::ImageFormat;
    use rand::SeedableRng;

    fn policy() -> Policy {
        Policy {
            recheck: RecheckSettings {
                mirrored_secs: 1000,
                failing_initial_secs: 60,
                failing_max_secs: 86_400,
            },
            expiry: ExpirySettings {
                confirmations: 1,
                min_interval_secs: 600,
            },
            when_mirror_exists: WhenMirrorExists::Flag,
            max_attempts: 10,
        }
    }

    const URL: &str = "https://thirdwx.qlogo.cn/mmopen/a/132";

    fn due(prev: Option<Previous>) -> DueAvatar {
        DueAvatar {
            user_id: UserId::Int(7),
            avatar_url: URL.into(),
            previous: prev,
        }
    }

    fn prev(status: Status, attempts: i64) -> Previous {
        Previous {
            source_url: URL.into(),
            status,
            mirror_url: Some("https://cdn/avatars/ab/ab.jpg".into()),
            object_key: Some("avatars/ab/ab.jpg".into()),
            sha256: Some("ab".into()),
            meta: MirrorMeta {
                size_bytes: Some(4000),
                width: Some(132),
                height: Some(132),
                format: Some("jpeg".into()),
            },
            validators: Validators {
                etag: Some("\"v1\"".into()),
                last_modified: None,
                length: Some(4000),
            },
            attempts,
            expiry_signals: 0,
            reauth_required: false,
        }
    }

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(1)
    }

    fn record(d: &DueAvatar, v: Verdict, p: &Policy) -> AvatarRecord {
        build_record(
            d,
            v,
            None,
            None,
            0,
            &Validators::default(),
            100,
            p,
            &mut rng(),
        )
    }

    fn mirror() -> Mirror {
        let info = ImageInfo {
            format: ImageFormat::Jpeg,
            width: 132,
            height: 132,
            tolerated: crate::media::Tolerated::default(),
        };
        let stored = StoredObject {
            key: "avatars/cd/cd.jpg".into(),
            url: "https://cdn/avatars/cd/cd.jpg".into(),
            deduplicated: false,
        };
        (info, "cd".to_string(), stored)
    }

    fn expired() -> Verdict {
        Verdict::new(Reason::ProviderNotexist).with_detail("X-ErrNo: -6101")
    }

    #[test]
    fn expired_avatar_flags_user_and_keeps_the_last_mirror() {
        let r = record(&due(Some(prev(Status::Mirrored, 0))), expired(), &policy());
        assert!(r.reauth_required);
        assert_eq!(
            r.mirror_url.as_deref(),
            Some("https://cdn/avatars/ab/ab.jpg")
        );
        assert_eq!(r.next_check_at, None, "expired avatars wait for a new URL");
        assert_eq!(r.expiry_signals, 1);
    }

    #[test]
    fn an_existing_mirror_can_keep_the_user_unflagged_by_policy() {
        let mut p = policy();
        p.when_mirror_exists = WhenMirrorExists::Keep;
        let r = record(&due(Some(prev(Status::Mirrored, 0))), expired(), &p);
        assert_eq!((r.status, r.reauth_required), (Status::Expired, false));
        // Without a mirror there is nothing to show: flag.
        let r = record(&due(None), expired(), &p);
        assert!(r.reauth_required);
    }

    #[test]
    fn mirrored_avatar_clears_the_flag_and_schedules_a_jittered_recheck() {
        let mut p = prev(Status::Expired, 0);
        p.reauth_required = true;
        let m = mirror();
        let r = build_record(
            &due(Some(p)),
            Verdict::mirrored(),
            None,
            Some(&m),
            5000,
            &Validators::default(),
            100,
            &policy(),
            &mut rng(),
        );
        assert!(!r.reauth_required);
        assert_eq!(
            r.mirror_url.as_deref(),
            Some("https://cdn/avatars/cd/cd.jpg")
        );
        assert_eq!(
            (r.width, r.height, r.size_bytes),
            (Some(132), Some(132), Some(5000))
        );
        let next = r.next_check_at.unwrap() - 100;
        assert!((900..=1100).contains(&next), "{next}");
    }

    #[test]
    fn expiry_needs_the_configured_confirmations_and_counts_signals_across_valid_answers() {
        let mut p = policy();
        p.expiry.confirmations = 2;
        // First signal: not yet expired, not flagged, re-checked after min_interval.
        let first = record(&due(Some(prev(Status::Mirrored, 0))), expired(), &p);
        assert_eq!(
            (first.status, first.reason.as_str()),
            (Status::Failing, "expiry_unconfirmed")
        );
        assert!(!first.reauth_required);
        assert_eq!(first.next_check_at, Some(100 + 600));
        assert_eq!(first.expiry_signals, 1);
        // A valid answer in between (a node that has not caught up): mirrored, signal kept, looked at again soon.
        let mut after = prev(Status::Failing, 0);
        after.expiry_signals = first.expiry_signals;
        let m = mirror();
        let valid = build_record(
            &due(Some(after.clone())),
            Verdict::mirrored(),
            None,
            Some(&m),
            1,
            &Validators::default(),
            100,
            &p,
            &mut rng(),
        );
        assert_eq!((valid.status, valid.expiry_signals), (Status::Mirrored, 1));
        assert_eq!(valid.next_check_at, Some(100 + 600));
        // Second signal: confirmed.
        after.status = Status::Mirrored;
        after.expiry_signals = valid.expiry_signals;
        let second = record(&due(Some(after)), expired(), &p);
        assert_eq!((second.status, second.expiry_signals), (Status::Expired, 2));
        assert!(second.reauth_required);
        // A new URL starts counting from zero.
        let mut changed = prev(Status::Failing, 0);
        changed.source_url = "https://thirdwx.qlogo.cn/old/132".into();
        changed.expiry_signals = 1;
        let r = record(&due(Some(changed)), expired(), &p);
        assert_eq!((r.status, r.expiry_signals), (Status::Failing, 1));
    }

    #[test]
    fn an_unchanged_picture_keeps_its_mirror_and_what_is_known_of_it() {
        let p = prev(Status::Mirrored, 0);
        let seen = Validators {
            etag: Some("\"v1\"".into()),
            last_modified: Some("Tue, 14 Nov 2023 22:13:20 GMT".into()),
            length: Some(4000),
        };
        let r = build_record(
            &due(Some(p.clone())),
            Verdict::new(Reason::Unchanged),
            None,
            None,
            0,
            &seen,
            100,
            &policy(),
            &mut rng(),
        );
        assert_eq!(
            (r.status, r.reason.as_str()),
            (Status::Mirrored, "unchanged")
        );
        assert_eq!((&r.mirror_url, &r.sha256), (&p.mirror_url, &p.sha256));
        assert_eq!(
            (r.size_bytes, r.width, r.format.as_deref()),
            (Some(4000), Some(132), Some("jpeg"))
        );
        assert_eq!(r.validators, seen, "a 304's news is kept");
        let next = r.next_check_at.unwrap() - 100;
        assert!((900..=1100).contains(&next), "the weekly cadence: {next}");
    }

    #[test]
    fn a_download_of_the_same_url_says_whether_the_picture_changed() {
        let m = mirror(); // sha "cd"; the previous mirror is "ab"
        let fresh = Validators {
            etag: Some("\"v2\"".into()),
            ..Validators::default()
        };
        let build = |p: Previous| {
            build_record(
                &due(Some(p)),
                Verdict::mirrored(),
                None,
                Some(&m),
                5000,
                &fresh,
                100,
                &policy(),
                &mut rng(),
            )
        };
        let r = build(prev(Status::Mirrored, 0));
        assert_eq!(r.reason, "source_changed");
        assert_eq!(r.reason_detail.as_deref(), Some("sha256 was ab"));
        assert_eq!((r.sha256.as_deref(), &r.validators), (Some("cd"), &fresh));
        let mut same = prev(Status::Mirrored, 0);
        same.sha256 = Some("cd".into());
        assert_eq!(build(same).reason, "unchanged");
        let mut other_url = prev(Status::Mirrored, 0);
        other_url.source_url = "https://thirdwx.qlogo.cn/mmopen/old/132".into();
        assert_eq!(
            build(other_url).reason,
            "valid_image",
            "a new URL is a first mirror"
        );
    }

    #[test]
    fn validators_stay_with_their_url() {
        // A failing check keeps the mirror's validators for the next try...
        let r = record(
            &due(Some(prev(Status::Mirrored, 0))),
            Verdict::new(Reason::Timeout),
            &policy(),
        );
        assert_eq!(r.validators.etag.as_deref(), Some("\"v1\""));
        // ...but a new URL that failed must not inherit the old URL's.
        let mut moved = prev(Status::Mirrored, 0);
        moved.source_url = "https://thirdwx.qlogo.cn/mmopen/old/132".into();
        let r = record(&due(Some(moved)), Verdict::new(Reason::Timeout), &policy());
        assert_eq!(r.validators, Validators::default());
        assert!(r.mirror_url.is_some(), "the last good mirror stays visible");
    }

    #[test]
    fn failing_avatars_back_off_never_flag_and_give_up_after_max_attempts() {
        let v = Verdict::new(Reason::ServerError);
        let r = record(&due(Some(prev(Status::Failing, 3))), v.clone(), &policy());
        assert_eq!(r.attempts, 4);
        assert!(!r.reauth_required);
        let next = r.next_check_at.unwrap() - 100;
        assert!((384..=576).contains(&next), "60*2^3=480 +-20%: {next}");
        let r = record(&due(None), v.clone(), &policy());
        assert_eq!(r.attempts, 1, "a first failure starts the count");
        let r = record(&due(Some(prev(Status::Failing, 9))), v, &policy());
        assert_eq!(
            (r.status, r.reason.as_str(), r.next_check_at),
            (Status::Failing, "gave_up", None)
        );
        assert!(!r.reauth_required, "giving up is never the user's fault");
        assert!(r.reason_detail.unwrap().contains("server_error"));
    }

    #[test]
    fn a_signed_url_is_retried_before_its_signature_runs_out() {
        let v = Verdict::new(Reason::Timeout);
        // The 6th failure in a row would wait 60 * 2^5 s: the signature runs out sooner.
        let r = build_record(
            &due(Some(prev(Status::Failing, 5))),
            v,
            Some(100 + 400),
            None,
            0,
            &Validators::default(),
            100,
            &policy(),
            &mut rng(),
        );
        assert_eq!(r.next_check_at, Some(100 + 400 - EXPIRY_MARGIN_SECS));
    }

    #[test]
    fn a_deprecated_host_keeps_its_new_mirror_and_flags_the_user() {
        let v = Verdict::new(Reason::DeprecatedHost);
        let m = mirror();
        let r = build_record(
            &due(None),
            v,
            None,
            Some(&m),
            10,
            &Validators::default(),
            100,
            &policy(),
            &mut rng(),
        );
        assert_eq!((r.status, r.reauth_required), (Status::Expired, true));
        assert_eq!(
            r.mirror_url.as_deref(),
            Some("https://cdn/avatars/cd/cd.jpg")
        );
        assert_eq!(
            r.expiry_signals, 0,
            "a retiring host is not a flapping signal"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let rc = policy().recheck;
        assert_eq!(backoff_secs(1, &rc), 60);
        assert_eq!(backoff_secs(2, &rc), 120);
        assert_eq!(backoff_secs(30, &rc), 86_400);
    }
}
