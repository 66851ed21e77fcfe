//! The domain's plain data, below every other module: verdicts and their
//! statuses, user ids and the record written per avatar, what a source said
//! about a picture, a scan's report, and the clock. No I/O, no policy: the
//! modules that act on these types import them from here, never from each other.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

mod cause;
mod reason;

pub(crate) use cause::{Cause, error_chain};
pub use reason::{Reason, Status, UnknownCode};

/// A verdict: its reason (which knows the status) and an optional human
/// `detail` (header value, status code...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Always `code.status()`: kept as a field because it is read everywhere.
    pub status: Status,
    pub code: Reason,
    pub detail: Option<String>,
}

impl Verdict {
    pub fn new(code: Reason) -> Self {
        Verdict {
            status: code.status(),
            code,
            detail: None,
        }
    }

    /// Adds the human detail, cut to `MAX_DETAIL_BYTES`: it often quotes a
    /// remote server, which must not be able to make the row unwritable.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(bounded(detail.into(), MAX_DETAIL_BYTES));
        self
    }

    pub fn mirrored() -> Self {
        Verdict::new(Reason::ValidImage)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.detail {
            Some(d) => write!(f, "{} ({}: {})", self.status, self.code, d),
            None => write!(f, "{} ({})", self.status, self.code),
        }
    }
}

/// Longest reason detail kept (stored in `reason_detail`, sent in events).
/// Remote text longer than this is cut with a marker; it fits every
/// backend's column with room to spare.
pub const MAX_DETAIL_BYTES: usize = 1024;

/// `text` cut to at most `max` bytes (on a character boundary) with a marker
/// saying how long it was; unchanged when it fits.
pub fn bounded(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let marker = format!("… [cut from {} bytes]", text.len());
    let mut cut = max.saturating_sub(marker.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text.push_str(&marker);
    text
}

/// A user id as the profile table has it: integer or text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UserId {
    Int(i64),
    Text(String),
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserId::Int(i) => write!(f, "{i}"),
            UserId::Text(s) => f.write_str(s),
        }
    }
}

/// What the source said about the picture that was mirrored: a re-check
/// asks with these instead of downloading it again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validators {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// The source's `Content-Length` (before any metadata was stripped).
    pub length: Option<i64>,
}

impl Validators {
    /// Longest ETag kept (the MySQL column's width); a longer one is not stored.
    pub const MAX_ETAG: usize = 512;
    /// Longest `Last-Modified` kept; an HTTP date is 29 characters.
    pub const MAX_LAST_MODIFIED: usize = 64;
}

/// The outcome written to the state table and, where configured, back to the profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AvatarRecord {
    pub user_id: UserId,
    pub source_url: String,
    pub status: Status,
    pub reason: Reason,
    pub reason_detail: Option<String>,
    pub mirror_url: Option<String>,
    pub object_key: Option<String>,
    pub sha256: Option<String>,
    pub size_bytes: Option<i64>,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub format: Option<String>,
    /// The source's validators for the mirrored picture (re-verification).
    pub validators: Validators,
    pub reauth_required: bool,
    /// Consecutive failing checks of this URL.
    pub attempts: i64,
    /// Provider expiry signals seen for this URL.
    pub expiry_signals: i64,
    pub checked_at: i64,
    /// `None`: not until the URL changes.
    pub next_check_at: Option<i64>,
}

impl AvatarRecord {
    /// A record for `user_id`'s `source_url` checked at `checked_at` with
    /// `reason` (its status follows), nothing mirrored, nothing flagged;
    /// the `with_*` methods fill in the rest. For tests and benchmarks.
    pub fn new(
        user_id: UserId,
        source_url: impl Into<String>,
        reason: Reason,
        checked_at: i64,
    ) -> Self {
        AvatarRecord {
            user_id,
            source_url: source_url.into(),
            status: reason.status(),
            reason,
            reason_detail: None,
            mirror_url: None,
            object_key: None,
            sha256: None,
            size_bytes: None,
            width: None,
            height: None,
            format: None,
            validators: Validators::default(),
            reauth_required: false,
            attempts: 0,
            expiry_signals: 0,
            checked_at,
            next_check_at: None,
        }
    }

    /// The mirrored picture: where it is, its key and sha256.
    pub fn with_mirror(
        mut self,
        url: impl Into<String>,
        key: impl Into<String>,
        sha256: impl Into<String>,
    ) -> Self {
        self.mirror_url = Some(url.into());
        self.object_key = Some(key.into());
        self.sha256 = Some(sha256.into());
        self
    }

    pub fn with_reauth(mut self, reauth_required: bool) -> Self {
        self.reauth_required = reauth_required;
        self
    }

    pub fn with_next_check(mut self, at: Option<i64>) -> Self {
        self.next_check_at = at;
        self
    }
}

/// How many throttled hosts a report lists.
pub(crate) const REPORT_HOSTS_LIMIT: usize = 20;

/// How many flagged users a report lists by name.
pub(crate) const REPORT_FLAGGED_LIMIT: usize = 1000;

#[derive(Debug, Clone, Default, Serialize)]
pub struct ScanReport {
    pub processed: u64,
    pub by_status: BTreeMap<String, u64>,
    /// `status/reason` → count.
    pub by_reason: BTreeMap<String, u64>,
    pub objects_uploaded: u64,
    pub objects_deduplicated: u64,
    pub bytes_uploaded: u64,
    /// Results not written because their lease had passed to another worker.
    pub lease_lost: u64,
    /// Hosts that pushed back (429, 503, timeouts), with the concurrency
    /// and spacing they ended with (first `REPORT_HOSTS_LIMIT`).
    pub hosts: Vec<HostState>,
    /// Results the database refused even as `record_error`: not written,
    /// left leased for a later scan (logged with their user id).
    pub unrecorded: u64,
    /// Users flagged for re-authorization by this scan (first `REPORT_FLAGGED_LIMIT`).
    pub flagged: Vec<FlaggedUser>,
    /// How many avatars this scan recorded as needing re-authorization.
    pub flagged_total: u64,
    pub duration_secs: f64,
    pub interrupted: bool,
    /// Nothing was stored or written (`scan --dry-run`).
    pub dry_run: bool,
    /// In flight at shutdown and not finished within the grace period.
    pub abandoned: u64,
    /// Response body bytes downloaded.
    pub bytes_downloaded: u64,
    /// `old → new` status changes this scan made (or would make).
    pub changes: BTreeMap<String, u64>,
    /// Sink deliveries made while the scan ran and in its drain.
    pub deliveries: DeliveryCounts,
    /// Avatars mirrored for the first time (new user or new URL).
    pub first_mirrors: u64,
    /// Re-verified and found unchanged (no new object).
    pub unchanged: u64,
    /// Re-verified and found to be a new picture behind the same URL.
    pub changed: u64,
    /// `method/outcome` of re-verifications, e.g. `head/unchanged`, `conditional/changed`.
    pub reverified: BTreeMap<String, u64>,
    /// Users whose written-back values or mirror URL were rewritten, without
    /// fetching, after the settings they derive from changed.
    pub rewritten: u64,
}

impl ScanReport {
    pub fn count(&self, status: Status) -> u64 {
        self.by_status.get(status.as_str()).copied().unwrap_or(0)
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FlaggedUser {
    pub user_id: String,
    pub status: String,
    pub reason: String,
}

/// What a mirrored avatar's check found about its picture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorKind {
    /// Mirrored for the first time (a new user, or a new URL).
    First,
    /// The same picture as the mirror.
    Unchanged,
    /// A new picture behind the same URL.
    Changed,
}

impl MirrorKind {
    pub const ALL: [MirrorKind; 3] = [
        MirrorKind::First,
        MirrorKind::Unchanged,
        MirrorKind::Changed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MirrorKind::First => "first_mirror",
            MirrorKind::Unchanged => "unchanged",
            MirrorKind::Changed => "changed",
        }
    }
}

/// A count or a configured number of seconds as the `i64` the database
/// stores: a value past `i64::MAX` (never sensible) saturates instead of
/// wrapping to a negative time.
pub(crate) fn saturating_i64<N: TryInto<i64>>(n: N) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// `initial * 2^exp`, capped at `max` (both at least 1): the one
/// exponential backoff curve (re-checks of failing avatars, sink
/// deliveries, retries within a scan).
pub(crate) fn exponential_backoff(initial: u64, max: u64, exp: u32) -> u64 {
    initial
        .max(1)
        .saturating_mul(1u64 << exp.min(40))
        .min(max.max(1))
}

/// Now, in unix seconds (the unit of every stored time).
pub fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A host's state at the end of a scan, for the summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostState {
    pub host: String,
    /// The provider rule the host falls under (filled in by the scan).
    pub provider: Option<String>,
    /// The concurrency limit it ended with.
    pub concurrency: f64,
    /// The spacing between request starts it ended with, in milliseconds.
    pub interval_ms: u64,
    /// 429s, 503s and timeouts it answered with.
    pub push_backs: u64,
}

/// Delivered, retried and given up on in one pass or drain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryCounts {
    pub delivered: u64,
    pub retried: u64,
    pub dead: u64,
    /// Claimed but given back unattempted (shutdown, or the drain's time ran out).
    #[serde(default)]
    pub released: u64,
}

impl DeliveryCounts {
    pub fn add(&mut self, o: DeliveryCounts) {
        self.delivered += o.delivered;
        self.retried += o.retried;
        self.dead += o.dead;
        self.released += o.released;
    }

    pub fn attempted(&self) -> u64 {
        self.delivered + self.retried + self.dead
    }
}

/// A re-verification that ended in a picture, and how it asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reverified {
    /// `conditional`, `head` or `get`: the request that decided.
    pub method: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub key: String,
    pub url: String,
    /// The object was already there: nothing was uploaded.
    pub deduplicated: bool,
}

/// A store operation, for timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    Exists,
    Put,
}

impl StoreOp {
    pub const ALL: [StoreOp; 2] = [StoreOp::Exists, StoreOp::Put];

    pub fn as_str(self) -> &'static str {
        match self {
            StoreOp::Exists => "exists",
            StoreOp::Put => "put",
        }
    }
}

/// Told how long each store operation took (metrics hook; keeps storage free of metrics).
pub type OpObserver = Arc<dyn Fn(StoreOp, std::time::Duration) + Send + Sync>;

#[cfg(test)]
mod tests;
