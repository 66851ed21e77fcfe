//! The profile database: the user's own table (read due avatars, write back
//! the mirror URL and re-auth flag) and the worker's state tables beside it.
//! One file per backend; callers see one API and never learn which it is.

mod ident;
mod migrate;
mod mysql;
pub mod outbox;
mod postgres;
mod sqlite;

use std::future::Future;
use std::time::Duration;

use crate::config::ProfileSettings;
pub use crate::model::{AvatarRecord, Status, UserId, Validators};

pub use ident::{Quote, quote};

pub const STATE_TABLE: &str = "avatar_warden_avatars";
pub const RUNS_TABLE: &str = "avatar_warden_runs";

pub use outbox::{Delivery, OUTBOX_TABLE, OutboxBacklog, OutboxRow, Settle};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid profile database settings: {0}")]
    Config(String),
    #[error("cannot connect to the profile database: {0}")]
    Connect(String),
    /// The server went away mid-statement (restarted, network cut).
    #[error("the connection to the profile database at {endpoint} was lost")]
    ConnectionLost {
        endpoint: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("database statement timed out after {0:?}")]
    Timeout(Duration),
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
    #[error("migration {version} ({name}) failed: {source}")]
    Migration {
        version: i64,
        name: &'static str,
        source: sqlx::Error,
    },
    #[error("{0}")]
    Data(String),
}

impl DbError {
    /// Connection trouble, timeouts, deadlocks and lock waits may heal; SQL and config errors will not.
    /// The server chose this transaction as a deadlock victim (InnoDB 1213,
    /// PostgreSQL 40P01) or a serialization failure (40001): run it again.
    pub fn is_deadlock(&self) -> bool {
        match self {
            DbError::Query(sqlx::Error::Database(d)) => {
                matches!(d.code().as_deref(), Some("40001" | "40P01"))
            }
            _ => false,
        }
    }

    /// The server refused the values of a row (too long, a constraint, a
    /// bad string), not the connection or the statement: other rows of the
    /// same batch may well be fine.
    pub fn is_data_error(&self) -> bool {
        let DbError::Query(sqlx::Error::Database(e)) = self else {
            return false;
        };
        if self.is_retryable() {
            return false;
        }
        if !matches!(e.kind(), sqlx::error::ErrorKind::Other) {
            return true; // unique, foreign key, not null, check
        }
        if let Some(my) = e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
            // 1406 data too long, 1366 incorrect string value, 1264 out of
            // range, 1292 truncated value, 3819/4025 check constraint, 1644 SIGNAL.
            return matches!(my.number(), 1406 | 1366 | 1264 | 1292 | 3819 | 4025 | 1644);
        }
        let code = e.code().unwrap_or_default();
        // SQLSTATE class 22 (data exception) and 23 (integrity constraint);
        // SQLite's primary codes 18 (TOOBIG), 19 (CONSTRAINT), 20 (MISMATCH).
        code.starts_with("22")
            || code.starts_with("23")
            || code
                .parse::<i32>()
                .is_ok_and(|c| matches!(c & 0xFF, 18..=20))
    }

    pub fn is_retryable(&self) -> bool {
        match self {
            DbError::Timeout(_) | DbError::Connect(_) | DbError::ConnectionLost { .. } => true,
            DbError::Query(sqlx::Error::Database(e)) => {
                // 40001 serialization failure, 40P01 deadlock (PostgreSQL); 1213/1205 (MySQL) report 40001/HY000.
                matches!(
                    e.code().as_deref(),
                    Some("40001" | "40P01" | "55P03" | "57014")
                ) || e.message().contains("Deadlock")
                    || e.message().contains("Lock wait timeout")
                    || e.message().contains("database is locked")
            }
            DbError::Query(e) => matches!(
                e,
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
            ),
            _ => false,
        }
    }
}

/// The mirrored picture as last recorded: carried over while the mirror stays.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MirrorMeta {
    pub size_bytes: Option<i64>,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub format: Option<String>,
}

/// What the last check left behind for an avatar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Previous {
    pub source_url: String,
    pub status: Status,
    pub mirror_url: Option<String>,
    pub object_key: Option<String>,
    pub sha256: Option<String>,
    pub meta: MirrorMeta,
    pub validators: Validators,
    pub attempts: i64,
    pub expiry_signals: i64,
    pub reauth_required: bool,
}

/// One avatar this worker holds a lease on and must check now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueAvatar {
    pub user_id: UserId,
    /// Exactly as stored in the profile table.
    pub avatar_url: String,
    pub previous: Option<Previous>,
}

/// What to claim: the next page after `after`, leased to `token` until `lease_until`.
#[derive(Clone)]
pub struct Claim<'a> {
    pub after: Option<&'a UserId>,
    pub now: i64,
    pub limit: usize,
    pub token: &'a str,
    pub lease_until: i64,
    pub shard: Option<Shard>,
    pub selection: &'a Selection,
    /// Only avatar URLs this accepts (e.g. `--provider`).
    pub keep_url: Option<&'a dyn UrlFilter>,
}

/// Decides which avatar URLs a scan takes.
pub trait UrlFilter: Send + Sync {
    fn keep(&self, url: &str) -> bool;
}

impl Claim<'_> {
    /// Drops candidates outside this worker's shard or the URL filter.
    fn narrow(&self, candidates: &mut Vec<Candidate>) {
        if let Some(shard) = self.shard {
            candidates.retain(|c| shard.owns(&c.user_id));
        }
        if let Some(keep) = self.keep_url {
            candidates.retain(|c| keep.keep(&c.avatar_url));
        }
    }
}

/// Which avatars a scan takes beyond "everything due" (the backfill controls).
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Ignore `next_check_at`: everything matching is due now.
    pub force: bool,
    /// Only avatars whose recorded status is one of these (`pending` = never checked).
    pub only: Vec<Status>,
    /// Only these user ids.
    pub users: Vec<String>,
    /// Read and report, but claim nothing: no pending rows, no leases.
    pub dry_run: bool,
}

/// How a backend spells literals in the selection's SQL.
#[derive(Debug, Clone, Copy)]
enum Dialect<'a> {
    Sqlite,
    Postgres { id_type: &'a str },
    MySql,
}

impl Selection {
    /// SQL added to the due query: a term OR-ed into the due condition, and
    /// conditions AND-ed after it. Values are literals from an enum or escaped
    /// text, so the statement needs no extra parameters.
    fn sql(&self, d: Dialect<'_>) -> (String, String) {
        let due_or = if self.force {
            " OR 1 = 1".to_string()
        } else {
            String::new()
        };
        let mut and = String::new();
        if !self.only.is_empty() {
            let known: Vec<String> = self
                .only
                .iter()
                .map(|s| format!("'{}'", s.as_str()))
                .collect();
            let never_checked = if self.only.contains(&Status::Pending) {
                " OR s.user_id IS NULL"
            } else {
                ""
            };
            and.push_str(&format!(
                " AND (s.status IN ({}){never_checked})",
                known.join(", ")
            ));
        }
        if !self.users.is_empty() {
            let int_ids = matches!(d, Dialect::Postgres { id_type } if id_type.starts_with("INT"));
            let ids: Vec<String> = self
                .users
                .iter()
                // An id that cannot exist in an integer column matches nothing (and must not break the cast).
                .filter(|u| !int_ids || u.parse::<i64>().is_ok())
                .map(|u| {
                    let text = match d {
                        // MySQL also treats backslashes as escapes in literals.
                        Dialect::MySql => {
                            format!("'{}'", u.replace('\\', "\\\\").replace('\'', "''"))
                        }
                        _ => format!("'{}'", u.replace('\'', "''")),
                    };
                    match d {
                        // Typed, so the id index is used.
                        Dialect::Postgres { id_type } => format!("CAST({text} AS {id_type})"),
                        _ => match u.parse::<i64>() {
                            Ok(i) => i.to_string(),
                            Err(_) => text,
                        },
                    }
                })
                .collect();
            if ids.is_empty() {
                and.push_str(" AND 1 = 0");
            } else {
                and.push_str(&format!(" AND p.id IN ({})", ids.join(", ")));
            }
        }
        (due_or, and)
    }
}

/// Static sharding for indexed Jobs: this worker takes ids whose shard is `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    /// Integer ids shard by value, text ids by a stable FNV-1a hash.
    pub fn owns(&self, id: &UserId) -> bool {
        let bucket = match id {
            UserId::Int(i) => i.rem_euclid(i64::from(self.count)) as u32,
            UserId::Text(s) => {
                let h = s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
                });
                (h % u64::from(self.count)) as u32
            }
        };
        bucket == self.index
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (i, n) = s.split_once('/').ok_or("expected I/N, e.g. 0/4")?;
        let index: u32 = i
            .trim()
            .parse()
            .map_err(|_| format!("bad shard index {i:?}"))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("bad shard count {n:?}"))?;
        if count == 0 || index >= count {
            return Err(format!("shard {index}/{count}: need 0 <= I < N"));
        }
        Ok(Shard { index, count })
    }
}

/// One page of the keyset walk: what was claimed, and where the walk goes on.
#[derive(Debug, Clone, Default)]
pub struct ClaimedPage {
    pub claimed: Vec<DueAvatar>,
    /// Last id read (claimed or not); `None` when the walk is over.
    pub cursor: Option<UserId>,
}

/// A due candidate from the keyset query, before its lease is taken.
#[derive(Debug, Clone)]
struct Candidate {
    user_id: UserId,
    avatar_url: String,
    has_state: bool,
}

/// A state row as locked while claiming.
#[derive(Debug, Clone)]
struct Locked {
    user_id: String,
    previous: Previous,
    next_check_at: Option<i64>,
    lease_expires_at: Option<i64>,
}

/// Re-checked under the row lock: another worker may have taken or finished it
/// since the page was read.
fn claimable(now: i64, url: &str, locked: &Locked, force: bool) -> bool {
    let lease_free = locked.lease_expires_at.is_none_or(|t| t <= now);
    let due = force
        || locked.previous.source_url != url
        || locked.next_check_at.is_some_and(|t| t <= now);
    lease_free && due
}

/// A dry run claims nothing: candidates with what the state table says of them.
fn unclaimed(candidates: Vec<Candidate>, locked: Vec<Locked>) -> Vec<DueAvatar> {
    let mut by_id: std::collections::HashMap<String, Locked> =
        locked.into_iter().map(|l| (l.user_id.clone(), l)).collect();
    candidates
        .into_iter()
        .map(|c| DueAvatar {
            previous: by_id.remove(&c.user_id.to_string()).map(|l| l.previous),
            user_id: c.user_id,
            avatar_url: c.avatar_url,
        })
        .collect()
}

/// Pairs candidates with their locked rows and keeps the claimable ones.
fn select_claims(
    now: i64,
    candidates: Vec<Candidate>,
    locked: Vec<Locked>,
    force: bool,
) -> Vec<DueAvatar> {
    let mut by_id: std::collections::HashMap<String, Locked> =
        locked.into_iter().map(|l| (l.user_id.clone(), l)).collect();
    candidates
        .into_iter()
        .filter_map(|c| {
            let l = by_id.remove(&c.user_id.to_string())?;
            let due = claimable(now, &c.avatar_url, &l, force);
            due.then_some(DueAvatar {
                user_id: c.user_id,
                avatar_url: c.avatar_url,
                previous: Some(l.previous),
            })
        })
        .collect()
}

/// Outcome of writing a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    pub written: usize,
    /// Results whose lease expired or was taken over: not written.
    pub discarded: usize,
    /// Rows the database refused, by index in the batch: written instead as
    /// this `record_error` record, or (`None`) not written at all.
    pub replaced: Vec<(usize, Option<AvatarRecord>)>,
}

impl Recorded {
    fn add(&mut self, other: Recorded) {
        self.written += other.written;
        self.discarded += other.discarded;
    }
}

impl AvatarRecord {
    /// What is recorded for a row the database refused: `failing` with
    /// reason `record_error` and the server's words, checked again in an
    /// hour; the remote-derived values that could be the cause (detail,
    /// validators) are not written. Like any `failing`, it never changes
    /// the user's re-auth flag: `was_flagged` is what it was before.
    pub fn refused(&self, error: &DbError, was_flagged: bool) -> AvatarRecord {
        const RETRY_SECS: i64 = 3600;
        AvatarRecord {
            status: Status::Failing,
            reason: crate::model::Reason::RecordError,
            reason_detail: Some(crate::model::bounded(
                format!("the database refused this row: {error}"),
                crate::model::MAX_DETAIL_BYTES,
            )),
            validators: Validators::default(),
            reauth_required: was_flagged,
            attempts: self.attempts + 1,
            next_check_at: Some(self.checked_at + RETRY_SECS),
            ..self.clone()
        }
    }
}

/// Validated, quoted names of the user's table and columns.
#[derive(Debug, Clone)]
pub struct ProfileNames {
    pub table: String,
    pub id: String,
    pub avatar: String,
    pub mirror_url: Option<String>,
    pub reauth: Option<String>,
    /// Operator-supplied SQL condition on the profile table, in parentheses.
    pub filter: Option<String>,
}

impl ProfileNames {
    fn new(s: &ProfileSettings, q: Quote) -> Result<Self, DbError> {
        let col = |what: &str, name: &str| quote(what, name, false, q);
        let filter = match s.filter.as_deref() {
            None => None,
            Some(f) if f.contains(';') => {
                return Err(DbError::Config(
                    "profile.filter must be a single SQL condition (no ';')".into(),
                ));
            }
            Some(f) => Some(format!("({f})")),
        };
        Ok(ProfileNames {
            table: quote("profile.table", &s.table, true, q)?,
            id: col("profile.id_column", &s.id_column)?,
            avatar: col("profile.avatar_column", &s.avatar_column)?,
            mirror_url: s
                .mirror_url_column
                .as_deref()
                .map(|c| col("profile.mirror_url_column", c))
                .transpose()?,
            reauth: s
                .reauth_column
                .as_deref()
                .map(|c| col("profile.reauth_column", c))
                .transpose()?,
            filter,
        })
    }

    /// The profile table reduced to `id` and `avatar` (and the filter), as a
    /// derived table: the filter's column names cannot collide with ours.
    fn source(&self) -> String {
        // Qualified names: SQLite reads an unknown "double-quoted" name as a
        // string literal, which would turn a typo into a URL for every row.
        format!(
            "(SELECT t.{id} AS id, t.{avatar} AS avatar FROM {table} AS t{filter})",
            id = self.id,
            avatar = self.avatar,
            table = self.table,
            filter = self
                .filter
                .as_ref()
                .map(|f| format!(" WHERE {f}"))
                .unwrap_or_default()
        )
    }
}

/// The columns of the state table, in the order batches bind them.
const STATE_COLUMNS: [&str; 20] = [
    "user_id",
    "source_url",
    "status",
    "reason",
    "reason_detail",
    "mirror_url",
    "object_key",
    "sha256",
    "size_bytes",
    "width",
    "height",
    "format",
    "reauth_required",
    "attempts",
    "expiry_signals",
    "checked_at",
    "next_check_at",
    "source_etag",
    "source_last_modified",
    "source_length",
];

/// Written with every outcome: a settled avatar holds no lease, so a worker
/// killed after writing leaves no stale token behind, and a lease renewal
/// reaches only the avatars still being checked.
const SETTLE_LEASE: &str = "lease_token = NULL, lease_expires_at = NULL";

/// Columns read back into `Previous` when claiming.
const LOCK_COLUMNS: &str = "user_id, source_url, status, mirror_url, object_key, sha256, size_bytes, width, height, format, source_etag, source_last_modified, source_length, attempts, expiry_signals, reauth_required, next_check_at, lease_expires_at";

/// Row decoders shared by every backend (the row type differs, the columns do not).
macro_rules! row_readers {
    ($row:ty) => {
        /// Text that MySQL may report as VARBINARY (binary collations) is still text.
        fn text(row: &$row, col: &str) -> Result<String, sqlx::Error> {
            use sqlx::Row;
            row.try_get::<String, _>(col).or_else(|_| {
                row.try_get::<Vec<u8>, _>(col)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
            })
        }

        fn opt_text(row: &$row, col: &str) -> Result<Option<String>, sqlx::Error> {
            use sqlx::Row;
            row.try_get::<Option<String>, _>(col).or_else(|_| {
                row.try_get::<Option<Vec<u8>>, _>(col)
                    .map(|b| b.map(|b| String::from_utf8_lossy(&b).into_owned()))
            })
        }

        #[allow(dead_code)]
        fn locked_from_row(row: &$row) -> Result<super::Locked, super::DbError> {
            use sqlx::Row;
            Ok(super::Locked {
                user_id: text(row, "user_id")?,
                previous: super::Previous {
                    source_url: text(row, "source_url")?,
                    status: super::parse_status(&text(row, "status")?)?,
                    mirror_url: opt_text(row, "mirror_url")?,
                    object_key: opt_text(row, "object_key")?,
                    sha256: opt_text(row, "sha256")?,
                    meta: super::MirrorMeta {
                        size_bytes: row.try_get("size_bytes")?,
                        width: row.try_get("width")?,
                        height: row.try_get("height")?,
                        format: opt_text(row, "format")?,
                    },
                    validators: validators_from_row(row)?,
                    attempts: row.try_get("attempts")?,
                    expiry_signals: row.try_get("expiry_signals")?,
                    reauth_required: row.try_get("reauth_required")?,
                },
                next_check_at: row.try_get("next_check_at")?,
                lease_expires_at: row.try_get("lease_expires_at")?,
            })
        }

        fn validators_from_row(row: &$row) -> Result<super::Validators, super::DbError> {
            use sqlx::Row;
            Ok(super::Validators {
                etag: opt_text(row, "source_etag")?,
                last_modified: opt_text(row, "source_last_modified")?,
                length: row.try_get("source_length")?,
            })
        }

        fn record_from_row(row: &$row) -> Result<super::AvatarRecord, super::DbError> {
            use sqlx::Row;
            Ok(super::AvatarRecord {
                user_id: super::UserId::Text(text(row, "user_id")?),
                source_url: text(row, "source_url")?,
                status: super::parse_status(&text(row, "status")?)?,
                reason: super::parse_reason(&text(row, "reason")?)?,
                reason_detail: opt_text(row, "reason_detail")?,
                mirror_url: opt_text(row, "mirror_url")?,
                object_key: opt_text(row, "object_key")?,
                sha256: opt_text(row, "sha256")?,
                size_bytes: row.try_get("size_bytes")?,
                width: row.try_get("width")?,
                height: row.try_get("height")?,
                format: opt_text(row, "format")?,
                validators: validators_from_row(row)?,
                reauth_required: row.try_get("reauth_required")?,
                attempts: row.try_get("attempts")?,
                expiry_signals: row.try_get("expiry_signals")?,
                checked_at: row.try_get("checked_at")?,
                next_check_at: row.try_get("next_check_at")?,
            })
        }
    };
}
pub(crate) use row_readers;

/// `release` and `export_page`, the same on every backend but for the
/// placeholder spelling: (release token, export cursor, export limit).
macro_rules! state_statements {
    ($token:literal, $after:literal, $limit:literal, $now:literal, $run:literal, $list:path) => {
        /// Which of `keys` a state row still points at (`gc`).
        pub async fn referenced_keys(
            &self,
            keys: &[String],
        ) -> Result<Vec<String>, super::DbError> {
            let mut found = Vec::new();
            for chunk in keys.chunks(super::KEYS_PER_STATEMENT) {
                let sql = format!(
                    "SELECT DISTINCT object_key FROM {} WHERE object_key IN ({})",
                    super::STATE_TABLE,
                    $list(chunk.len())
                );
                let mut q = sqlx::query(&sql);
                for key in chunk {
                    q = q.bind(key);
                }
                for row in q.fetch_all(&self.pool).await? {
                    found.push(text(&row, "object_key")?);
                }
            }
            Ok(found)
        }

        /// Avatars pointing at `keys` (objects that are gone) forget their
        /// picture and are due now: the next scan downloads and stores it again.
        pub async fn forget_objects(&self, keys: &[String]) -> Result<u64, super::DbError> {
            let mut changed = 0;
            for chunk in keys.chunks(super::KEYS_PER_STATEMENT) {
                let sql = format!(
                    "UPDATE {} SET sha256 = NULL, source_etag = NULL, source_last_modified = NULL, \
                     source_length = NULL, next_check_at = 0 WHERE object_key IN ({})",
                    super::STATE_TABLE,
                    $list(chunk.len())
                );
                let mut q = sqlx::query(&sql);
                for key in chunk {
                    q = q.bind(key);
                }
                changed += q.execute(&self.pool).await?.rows_affected();
            }
            Ok(changed)
        }

        /// Everything a scan would claim now (`status`, the backlog gauge).
        pub async fn count_due(&self, now: i64) -> Result<i64, super::DbError> {
            let sql = super::count_query(&self.due_query(false, &super::Selection::default()));
            let n: i64 = sqlx::query_scalar(&sql)
                .bind(now)
                .bind(now)
                .fetch_one(&self.pool)
                .await?;
            Ok(n)
        }

        /// When the longest-waiting due avatar became due.
        pub async fn oldest_due(&self, now: i64) -> Result<Option<i64>, super::DbError> {
            let sql = format!(
                "SELECT MIN(next_check_at) FROM {} WHERE next_check_at <= {}",
                super::STATE_TABLE,
                $now
            );
            let t: Option<i64> = sqlx::query_scalar(&sql)
                .bind(now)
                .fetch_one(&self.pool)
                .await?;
            Ok(t)
        }

        pub async fn record_run(&self, run: &super::RunRecord) -> Result<(), super::DbError> {
            let sql = format!(
                "INSERT INTO {} (started_at, finished_at, result, processed, failing, flagged, worker, error) VALUES ({})",
                super::RUNS_TABLE,
                $run
            );
            sqlx::query(&sql)
                .bind(run.started_at)
                .bind(run.finished_at)
                .bind(&run.result)
                .bind(run.processed)
                .bind(run.failing)
                .bind(run.flagged)
                .bind(&run.worker)
                .bind(run.error.as_deref())
                .execute(&self.pool)
                .await?;
            Ok(())
        }

        pub async fn last_run(&self) -> Result<Option<super::RunRecord>, super::DbError> {
            let sql = format!(
                "SELECT started_at, finished_at, result, processed, failing, flagged, worker, error \
                 FROM {} ORDER BY finished_at DESC LIMIT 1",
                super::RUNS_TABLE
            );
            let Some(row) = sqlx::query(&sql).fetch_optional(&self.pool).await? else {
                return Ok(None);
            };
            use sqlx::Row;
            Ok(Some(super::RunRecord {
                started_at: row.try_get("started_at")?,
                finished_at: row.try_get("finished_at")?,
                result: text(&row, "result")?,
                processed: row.try_get("processed")?,
                failing: row.try_get("failing")?,
                flagged: row.try_get("flagged")?,
                worker: text(&row, "worker")?,
                error: opt_text(&row, "error")?,
            }))
        }

        /// Extends the lease of every avatar still leased to `token` (claimed,
        /// not yet written: written rows have their lease cleared).
        pub async fn renew(&self, token: &str, until: i64) -> Result<u64, super::DbError> {
            // `until` is our own integer: a literal keeps one placeholder per dialect.
            let sql = format!(
                "UPDATE {} SET lease_expires_at = {until} WHERE lease_token = {}",
                super::STATE_TABLE,
                $token
            );
            let done = sqlx::query(&sql).bind(token).execute(&self.pool).await?;
            Ok(done.rows_affected())
        }

        pub async fn release(&self, token: &str) -> Result<u64, super::DbError> {
            let sql = format!(
                "UPDATE {} SET lease_token = NULL, lease_expires_at = NULL WHERE lease_token = {}",
                super::STATE_TABLE,
                $token
            );
            let done = sqlx::query(&sql).bind(token).execute(&self.pool).await?;
            Ok(done.rows_affected())
        }

        pub async fn export_page(
            &self,
            after: Option<&str>,
            limit: usize,
        ) -> Result<Vec<super::AvatarRecord>, super::DbError> {
            let sql = format!(
                "SELECT {} FROM {} WHERE user_id > {} ORDER BY user_id LIMIT {}",
                super::STATE_COLUMNS.join(", "),
                super::STATE_TABLE,
                $after,
                $limit
            );
            let rows = sqlx::query(&sql)
                .bind(after.unwrap_or(""))
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?;
            rows.iter().map(record_from_row).collect()
        }
    };
}
pub(crate) use state_statements;

enum Backend {
    Sqlite(sqlite::Sqlite),
    Postgres(postgres::Postgres),
    MySql(mysql::MySql),
}

/// The profile database with every statement under one timeout.
pub struct Database {
    backend: Backend,
    timeout: Duration,
    /// host:port (or the SQLite file), to name in errors; never credentials.
    endpoint: String,
}

/// Where a database URL points: `host:port` for a server, the path for
/// SQLite. Never its credentials.
fn endpoint(url: &str) -> String {
    let Ok(u) = url::Url::parse(url) else {
        return "the configured profile.url".into();
    };
    match u.scheme() {
        "sqlite" => format!("{}{}", u.host_str().unwrap_or_default(), u.path()),
        scheme => {
            let default = if scheme.starts_with("postgres") {
                5432
            } else {
                3306
            };
            format!(
                "{}:{}",
                u.host_str().unwrap_or("localhost"),
                u.port().unwrap_or(default)
            )
        }
    }
}

/// Why a server cannot be reached, in the socket's words ("connection
/// refused", "no route to host"), instead of the pool's "timed out".
async fn probe(endpoint: &str) -> Option<String> {
    let attempt = tokio::net::TcpStream::connect(endpoint);
    match tokio::time::timeout(Duration::from_secs(2), attempt).await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("no answer within 2 s".into()),
    }
}

/// The connection itself failed mid-statement, as opposed to the statement.
fn connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::WorkerCrashed => true,
        // MariaDB/MySQL: "expected to read 4 bytes, got 0 bytes at EOF".
        sqlx::Error::Protocol(m) => m.contains("expected to read") || m.contains("EOF"),
        // PostgreSQL: the server terminated the session (admin, shutdown, crash).
        sqlx::Error::Database(d) => {
            matches!(d.code().as_deref(), Some("57P01" | "57P02" | "57P03"))
        }
        _ => false,
    }
}

impl ProfileSettings {
    /// Connects to `profile.url`; the scheme picks the backend. Checks the
    /// configured table, columns and filter once, so a typo fails here.
    pub async fn connect(&self) -> Result<Database, DbError> {
        let url = self.url.expose();
        let endpoint = endpoint(url);
        match self.connect_to(url).await {
            Ok(backend) => Ok(Database {
                backend,
                timeout: self.statement_timeout(),
                endpoint,
            }),
            Err(DbError::Connect(why)) if !url.starts_with("sqlite") => {
                let cause = probe(&endpoint).await.unwrap_or(why);
                Err(DbError::Connect(format!("{endpoint}: {cause}")))
            }
            Err(e) => Err(e),
        }
    }

    async fn connect_to(&self, url: &str) -> Result<Backend, DbError> {
        let scheme = url.split(':').next().unwrap_or_default();
        let backend = match scheme {
            "sqlite" => Backend::Sqlite(
                sqlite::Sqlite::connect(self, ProfileNames::new(self, Quote::Double)?).await?,
            ),
            "postgres" | "postgresql" => Backend::Postgres(
                postgres::Postgres::connect(self, ProfileNames::new(self, Quote::Double)?).await?,
            ),
            "mysql" | "mariadb" => Backend::MySql(
                mysql::MySql::connect(self, ProfileNames::new(self, Quote::Backtick)?).await?,
            ),
            other => {
                return Err(DbError::Config(format!(
                    "profile.url scheme {other:?} is not supported (use postgres://, mysql:// or sqlite://)"
                )));
            }
        };
        Ok(backend)
    }
}

/// Per-status counts for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatusCounts {
    pub counts: Vec<(String, i64)>,
    pub reauth_required: i64,
    pub due_now: i64,
}

/// What `status` shows: counts, the backlog, and the last run.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatusSummary {
    pub counts: std::collections::BTreeMap<String, i64>,
    pub reauth_required: i64,
    /// Everything a scan would claim now, never-checked avatars included.
    pub due_backlog: i64,
    /// Unix time the longest-waiting re-check became due.
    pub oldest_due_at: Option<i64>,
    pub last_run: Option<RunRecord>,
    /// Per sink: deliveries pending and given up on.
    pub outbox: Vec<OutboxBacklog>,
}

/// One finished scan.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RunRecord {
    pub started_at: i64,
    pub finished_at: i64,
    /// `completed`, `interrupted` or `failed`.
    pub result: String,
    pub processed: i64,
    pub failing: i64,
    pub flagged: i64,
    /// Host name of the worker that ran it.
    pub worker: String,
    /// What ended a failed run.
    pub error: Option<String>,
}

/// The due query as a count: same FROM and WHERE, no order or limit.
fn count_query(due: &str) -> String {
    // The select list holds no FROM; the source's own FROM comes after it.
    let from = due.find(" FROM ").expect("due query has a FROM");
    let end = due
        .rfind(" ORDER BY p.id LIMIT ")
        .expect("due query ends with its order and limit");
    format!("SELECT COUNT(*) FROM{}", &due[from + " FROM".len()..end])
}

/// Runs of a transaction chosen as a deadlock victim before giving up.
const DEADLOCK_ATTEMPTS: u64 = 5;

/// Runs a transaction again while the server picks it as a deadlock victim
/// (it was rolled back whole), up to `DEADLOCK_ATTEMPTS` times.
async fn rerun_deadlocks<T, F, Fut>(mut run: F) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    let mut attempt = 1;
    loop {
        match run().await {
            Err(e) if e.is_deadlock() && attempt < DEADLOCK_ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $db:ident => $call:expr) => {
        match &$self.backend {
            Backend::Sqlite($db) => $self.timed($call).await,
            Backend::Postgres($db) => $self.timed($call).await,
            Backend::MySql($db) => $self.timed($call).await,
        }
    };
}

impl Database {
    async fn timed<T>(&self, fut: impl Future<Output = Result<T, DbError>>) -> Result<T, DbError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err(DbError::Timeout(self.timeout)),
            Ok(Err(DbError::Query(e))) if connection_lost(&e) => Err(DbError::ConnectionLost {
                endpoint: self.endpoint.clone(),
                source: e,
            }),
            Ok(other) => other,
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match &self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
            Backend::MySql(_) => "mysql",
        }
    }

    /// Creates or upgrades the worker's own tables. Never touches the user's table.
    pub async fn migrate(&self) -> Result<Vec<i64>, DbError> {
        dispatch!(self, db => db.migrate())
    }

    /// Checks that the profile table, its columns and the filter exist (after `migrate`).
    pub async fn check_profile(&self) -> Result<(), DbError> {
        dispatch!(self, db => db.check_profile())
    }

    /// Reads the next keyset page of due avatars and leases what no other
    /// worker holds. Rows locked by another worker are skipped, not waited for.
    pub async fn claim_page(&self, claim: &Claim<'_>) -> Result<ClaimedPage, DbError> {
        // Concurrent claims and batch writes can deadlock on InnoDB's gap
        // locks; the loser's transaction was rolled back whole: run it again.
        rerun_deadlocks(|| async { dispatch!(self, db => db.claim_page(claim)) }).await
    }

    /// Writes a batch of outcomes (state rows and write-back) in one
    /// transaction, only for avatars still leased to `token`. Replaying the
    /// same batch succeeds and changes nothing.
    /// The batch's sink deliveries (`outbox`) go into the same transaction,
    /// for the avatars that were written.
    pub async fn record_batch(
        &self,
        records: &[AvatarRecord],
        outbox: &[OutboxRow],
        token: &str,
    ) -> Result<Recorded, DbError> {
        self.record_batch_with(records, outbox, token, &|i, e| records[i].refused(e, false))
            .await
    }

    /// As `record_batch`; a row the database refuses is replaced by
    /// `refused(index, error)` (see `AvatarRecord::refused`).
    pub async fn record_batch_with(
        &self,
        records: &[AvatarRecord],
        outbox: &[OutboxRow],
        token: &str,
        refused: &(dyn Fn(usize, &DbError) -> AvatarRecord + Sync),
    ) -> Result<Recorded, DbError> {
        if records.is_empty() {
            return Ok(Recorded::default());
        }
        match self.record_once(records, outbox, token).await {
            Err(e) if e.is_data_error() => {
                tracing::warn!(error = %e, rows = records.len(), "a row of the batch was refused: writing them one by one");
                self.record_one_by_one(records, outbox, token, refused)
                    .await
            }
            other => other,
        }
    }

    async fn record_once(
        &self,
        records: &[AvatarRecord],
        outbox: &[OutboxRow],
        token: &str,
    ) -> Result<Recorded, DbError> {
        // A replayed batch changes nothing, so a deadlock victim is simply rerun.
        rerun_deadlocks(|| async { dispatch!(self, db => db.record_batch(records, outbox, token)) })
            .await
    }

    /// The second line behind bounded values: each row on its own, so the
    /// good rows land; a refused row is recorded as `failing`/`record_error`
    /// instead (its events dropped), or, if even that is refused, left
    /// leased and counted, to be tried again by a later scan.
    async fn record_one_by_one(
        &self,
        records: &[AvatarRecord],
        outbox: &[OutboxRow],
        token: &str,
        refused_as: &(dyn Fn(usize, &DbError) -> AvatarRecord + Sync),
    ) -> Result<Recorded, DbError> {
        let mut total = Recorded::default();
        for (index, record) in records.iter().enumerate() {
            let user_id = record.user_id.to_string();
            let events: Vec<OutboxRow> = outbox
                .iter()
                .filter(|o| o.user_id == record.user_id)
                .cloned()
                .collect();
            let refused = match self
                .record_once(std::slice::from_ref(record), &events, token)
                .await
            {
                Ok(r) => {
                    total.add(r);
                    continue;
                }
                Err(e) if e.is_data_error() => e,
                Err(e) => return Err(e),
            };
            let replacement = refused_as(index, &refused);
            match self
                .record_once(std::slice::from_ref(&replacement), &[], token)
                .await
            {
                Ok(r) => {
                    total.add(r);
                    tracing::warn!(user_id, error = %refused, "row refused by the database: recorded as record_error");
                    total.replaced.push((index, Some(replacement)));
                }
                Err(e) if e.is_data_error() => {
                    tracing::error!(user_id, error = %e, "row refused by the database even as record_error: left for a later scan");
                    total.replaced.push((index, None));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(total)
    }

    /// Leases due deliveries of one sink (oldest first, one per user at a time).
    pub async fn claim_deliveries(
        &self,
        sink: &str,
        now: i64,
        limit: usize,
        token: &str,
        lease_until: i64,
    ) -> Result<Vec<Delivery>, DbError> {
        dispatch!(self, db => db.claim_deliveries(sink, now, limit, token, lease_until))
    }

    pub async fn settle_delivery(
        &self,
        id: i64,
        token: &str,
        outcome: &Settle,
    ) -> Result<(), DbError> {
        dispatch!(self, db => db.settle_delivery(id, token, outcome))
    }

    pub async fn outbox_backlog(&self) -> Result<Vec<OutboxBacklog>, DbError> {
        dispatch!(self, db => db.outbox_backlog())
    }

    /// The heartbeat: extends to `until` the lease of every avatar `token`
    /// claimed and has not written yet, so a slow page is never taken over
    /// by another replica while its holder is alive.
    pub async fn renew_leases(&self, token: &str, until: i64) -> Result<u64, DbError> {
        rerun_deadlocks(|| async { dispatch!(self, db => db.renew(token, until)) }).await
    }

    /// Gives back every lease `token` still holds (avatars claimed but not checked).
    pub async fn release(&self, token: &str) -> Result<u64, DbError> {
        dispatch!(self, db => db.release(token))
    }

    /// State rows after `after` (by user id text), for `export`.
    pub async fn export_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AvatarRecord>, DbError> {
        dispatch!(self, db => db.export_page(after, limit))
    }

    pub async fn status_counts(&self, now: i64) -> Result<StatusCounts, DbError> {
        dispatch!(self, db => db.status_counts(now))
    }

    pub async fn count_due(&self, now: i64) -> Result<i64, DbError> {
        dispatch!(self, db => db.count_due(now))
    }

    pub async fn record_run(&self, run: &RunRecord) -> Result<(), DbError> {
        dispatch!(self, db => db.record_run(run))
    }

    /// Counts, backlog, oldest due item and last run, for `status`.
    pub async fn status(&self, now: i64) -> Result<StatusSummary, DbError> {
        let counts = self.status_counts(now).await?;
        Ok(StatusSummary {
            counts: counts.counts.into_iter().collect(),
            reauth_required: counts.reauth_required,
            due_backlog: self.count_due(now).await?,
            oldest_due_at: dispatch!(self, db => db.oldest_due(now))?,
            last_run: dispatch!(self, db => db.last_run())?,
            outbox: self.outbox_backlog().await?,
        })
    }

    /// Which of `keys` some avatar's state still points at.
    pub async fn referenced_keys(&self, keys: &[String]) -> Result<Vec<String>, DbError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        dispatch!(self, db => db.referenced_keys(keys))
    }

    /// Avatars whose object is gone forget their picture and become due, so
    /// the next scan stores it again (`gc` losing a race with a scan).
    pub async fn forget_objects(&self, keys: &[String]) -> Result<u64, DbError> {
        if keys.is_empty() {
            return Ok(0);
        }
        dispatch!(self, db => db.forget_objects(keys))
    }

    /// Reachability, for readiness.
    pub async fn ping(&self) -> Result<(), DbError> {
        dispatch!(self, db => db.ping())
    }
}

fn parse_reason(s: &str) -> Result<crate::model::Reason, DbError> {
    s.parse()
        .map_err(|e| DbError::Data(format!("{STATE_TABLE}.reason: {e}")))
}

fn parse_status(s: &str) -> Result<Status, DbError> {
    s.parse()
        .map_err(|e| DbError::Data(format!("{STATE_TABLE}.status: {e}")))
}

/// Object keys asked about in one `gc` statement.
const KEYS_PER_STATEMENT: usize = 500;

/// `?, ?, ?` for `n` parameters.
pub(crate) fn question_list(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// `$1, $2, $3` for `n` parameters.
fn dollar_list(n: usize) -> String {
    (1..=n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `(?, ?, ?), (?, ?, ?)` for `rows` rows of `cols` columns.
fn question_marks(rows: usize, cols: usize) -> String {
    let row = format!("({})", question_list(cols));
    vec![row.as_str(); rows].join(", ")
}

/// A random lease token for one scan.
pub fn new_lease_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locked(url: &str, next: Option<i64>, lease: Option<i64>) -> Locked {
        Locked {
            user_id: "1".into(),
            previous: Previous {
                source_url: url.into(),
                status: Status::Mirrored,
                mirror_url: None,
                object_key: None,
                sha256: None,
                meta: MirrorMeta::default(),
                validators: Validators::default(),
                attempts: 0,
                expiry_signals: 0,
                reauth_required: false,
            },
            next_check_at: next,
            lease_expires_at: lease,
        }
    }

    #[test]
    fn a_row_is_claimable_only_when_due_and_not_leased() {
        let now = 1000;
        let c =
            |url: &str, next, lease, force| claimable(now, url, &locked("u", next, lease), force);
        assert!(c("u", Some(999), None, false), "due by time");
        assert!(c("new", None, None, false), "url changed");
        assert!(!c("u", Some(2000), None, false), "not due yet");
        assert!(
            c("u", Some(2000), None, true),
            "--force ignores next_check_at"
        );
        assert!(!c("u", None, None, false), "settled until the url changes");
        assert!(
            !c("u", Some(999), Some(1500), true),
            "leased by another worker, even with --force"
        );
        assert!(
            c("u", Some(999), Some(1000), false),
            "an expired lease is free"
        );
    }

    #[test]
    fn selection_sql_uses_only_escaped_literals() {
        let sel = Selection {
            force: true,
            only: vec![Status::Failing, Status::Pending],
            users: vec!["42".into(), "o'brien\\x".into()],
            dry_run: false,
        };
        let (due_or, and) = sel.sql(Dialect::Sqlite);
        assert_eq!(due_or, " OR 1 = 1");
        assert_eq!(
            and,
            " AND (s.status IN ('failing', 'pending') OR s.user_id IS NULL) AND p.id IN (42, 'o''brien\\x')"
        );
        let (_, and) = sel.sql(Dialect::MySql);
        assert!(and.ends_with("p.id IN (42, 'o''brien\\\\x')"), "{and}");
        let (_, and) = sel.sql(Dialect::Postgres { id_type: "TEXT" });
        assert!(
            and.ends_with("p.id IN (CAST('42' AS TEXT), CAST('o''brien\\x' AS TEXT))"),
            "{and}"
        );
        let (_, and) = sel.sql(Dialect::Postgres { id_type: "INT8" });
        assert!(
            and.ends_with("p.id IN (CAST('42' AS INT8))"),
            "a text id cannot exist in an integer column: {and}"
        );
        let only_text = Selection {
            users: vec!["abc".into()],
            ..Default::default()
        };
        assert_eq!(
            only_text.sql(Dialect::Postgres { id_type: "INT4" }).1,
            " AND 1 = 0"
        );
        assert_eq!(
            Selection::default().sql(Dialect::Sqlite),
            (String::new(), String::new())
        );
    }

    #[test]
    fn shards_split_ids_without_overlap() {
        let shards: Vec<Shard> = (0..4).map(|i| format!("{i}/4").parse().unwrap()).collect();
        for id in (0..200)
            .map(UserId::Int)
            .chain((0..200).map(|i| UserId::Text(format!("u{i}"))))
        {
            assert_eq!(shards.iter().filter(|s| s.owns(&id)).count(), 1, "{id}");
        }
        assert!("4/4".parse::<Shard>().is_err());
        assert!("1".parse::<Shard>().is_err());
    }

    #[test]
    fn errors_name_where_the_database_is_never_its_credentials() {
        assert_eq!(
            endpoint("postgres://u:pw@db.internal/app"),
            "db.internal:5432"
        );
        assert_eq!(
            endpoint("mysql://root:pw@10.0.0.5:3307/app"),
            "10.0.0.5:3307"
        );
        assert_eq!(
            endpoint("sqlite:///var/lib/aw/p.db?mode=rwc"),
            "/var/lib/aw/p.db"
        );
        assert!(connection_lost(&sqlx::Error::Protocol(
            "expected to read 4 bytes, got 0 bytes at EOF".into()
        )));
        assert!(connection_lost(&sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset
        ))));
        assert!(!connection_lost(&sqlx::Error::RowNotFound));
        let lost = DbError::ConnectionLost {
            endpoint: "db:3306".into(),
            source: sqlx::Error::Protocol("expected to read 4 bytes, got 0 bytes at EOF".into()),
        };
        assert_eq!(
            lost.to_string(),
            "the connection to the profile database at db:3306 was lost"
        );
        assert!(lost.is_retryable());
    }

    #[test]
    fn placeholders_for_multi_row_statements() {
        assert_eq!(question_marks(2, 3), "(?, ?, ?), (?, ?, ?)");
    }
}
