//! The profile database: the user's own table (read due avatars, write back
//! the mirror URL and re-auth flag) and the worker's state tables beside it.
//! The statements are written once (`store`) over a `Dialect` per backend;
//! callers see one `Database` and never learn which backend it is.

mod claim;
mod columns;
mod dialect;
mod driver;
mod error;
mod held;
mod ident;
mod migrate;
mod mysql;
pub mod outbox;
mod postgres;
mod profile;
mod rewrite;
mod runs;
mod sqlite;
mod store;

use std::future::Future;
use std::time::Duration;

use crate::config::ProfileSettings;
pub use crate::model::{AvatarRecord, Status, UnknownCode, UserId, Validators};

pub use claim::{
    Claim, ClaimedPage, DueAvatar, MirrorMeta, Previous, Selection, Shard, UrlFilter, WALK_WINDOW,
    WalkCursor,
};
pub use columns::{RUNS_TABLE, STATE_TABLE};
pub use error::DbError;
pub use ident::{Quote, quote};
pub use outbox::{Delivery, OUTBOX_TABLE, OutboxBacklog, OutboxRow, Settle};
pub use profile::ProfileNames;
pub use rewrite::{Rewrite, WrittenBack};

use ident::Quote as Q;
use store::StateStore;

/// The profile database with every statement under one timeout.
pub struct Database {
    store: Box<dyn StateStore>,
    timeout: Duration,
    /// host:port (or the SQLite file), to name in errors; never credentials.
    endpoint: String,
    /// `profile.mirror_url_column` and `profile.reauth_column`, when set.
    write_back_columns: (Option<String>, Option<String>),
    /// What each scan holds leased, for the heartbeat and the release.
    held: held::Held,
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
async fn probe(endpoint: &str) -> Option<std::io::Error> {
    let attempt = tokio::net::TcpStream::connect(endpoint);
    match tokio::time::timeout(Duration::from_secs(2), attempt).await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(e),
        Err(_) => Some(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no answer within 2 s",
        )),
    }
}

/// Connections to a database server when `profile.max_connections` is 0.
const SERVER_POOL_SIZE: u32 = 8;

/// The pool size: the configured one, or the backend's own default for 0.
fn pool_size(configured: u32, backend_default: u32) -> u32 {
    match configured {
        0 => backend_default,
        n => n,
    }
}

/// The pool every backend uses: its size and how long to wait for a connection.
fn pool_options<DB: sqlx::Database>(
    settings: &ProfileSettings,
    backend_default: u32,
) -> sqlx::pool::PoolOptions<DB> {
    sqlx::pool::PoolOptions::new()
        .max_connections(pool_size(settings.max_connections, backend_default))
        .acquire_timeout(Duration::from_secs(settings.connect_timeout_secs.max(1)))
}

async fn open_pool<DB: sqlx::Database>(
    pool: sqlx::pool::PoolOptions<DB>,
    options: <DB::Connection as sqlx::Connection>::Options,
    endpoint: &str,
) -> Result<sqlx::Pool<DB>, DbError> {
    pool.connect_with(options)
        .await
        .map_err(|source| DbError::Connect {
            endpoint: endpoint.to_owned(),
            source,
        })
}

impl ProfileSettings {
    /// Connects to `profile.url`; the scheme picks the backend. Checks the
    /// configured table, columns and filter once, so a typo fails here.
    pub async fn connect(&self) -> Result<Database, DbError> {
        let url = self.url.expose();
        let endpoint = endpoint(url);
        let scheme = url.split(':').next().unwrap_or_default();
        let connected = match scheme {
            "sqlite" => sqlite::connect(self, ProfileNames::new(self, Q::Double)?, &endpoint).await,
            "postgres" | "postgresql" => {
                postgres::connect(self, ProfileNames::new(self, Q::Double)?, &endpoint).await
            }
            "mysql" | "mariadb" => {
                mysql::connect(self, ProfileNames::new(self, Q::Backtick)?, &endpoint).await
            }
            other => {
                return Err(DbError::Config(format!(
                    "profile.url scheme {other:?} is not supported (use postgres://, mysql:// or sqlite://)"
                )));
            }
        };
        match connected {
            Ok(store) => Ok(Database {
                store,
                timeout: self.statement_timeout(),
                endpoint,
                write_back_columns: (self.mirror_url_column.clone(), self.reauth_column.clone()),
                held: held::Held::default(),
            }),
            // The socket's own reason ("connection refused") says more than the pool's "timed out".
            Err(DbError::Connect { endpoint, source }) if scheme != "sqlite" => {
                Err(match probe(&endpoint).await {
                    Some(io) => DbError::Unreachable {
                        endpoint,
                        source: io,
                    },
                    None => DbError::Connect { endpoint, source },
                })
            }
            Err(e) => Err(e),
        }
    }
}

/// Per-status counts for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatusCounts {
    pub counts: Vec<(String, i64)>,
    pub reauth_required: i64,
    pub due_now: i64,
}

/// What a scan would claim now, for the backlog gauges and `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Due avatars, never-checked ones included.
    pub due: i64,
    /// Unix time the longest-waiting re-check became due (avatars with a
    /// state row; never-checked ones are due from the start).
    pub oldest_due_at: Option<i64>,
}

impl Backlog {
    /// Adds the backlog of another window of the walk.
    fn add(&mut self, window: Backlog) {
        self.due += window.due;
        self.oldest_due_at = match (self.oldest_due_at, window.oldest_due_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
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

impl Database {
    async fn timed<T>(&self, fut: impl Future<Output = Result<T, DbError>>) -> Result<T, DbError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err(DbError::Timeout(self.timeout)),
            Ok(Err(DbError::Query(e))) if error::connection_lost(&e) => {
                Err(DbError::ConnectionLost {
                    endpoint: self.endpoint.clone(),
                    source: e,
                })
            }
            Ok(other) => other,
        }
    }

    /// Creates or upgrades the worker's own tables. Never touches the user's table.
    pub async fn migrate(&self) -> Result<Vec<i64>, DbError> {
        self.timed(self.store.migrate()).await
    }

    /// For commands that only read: fails with [`DbError::NotMigrated`] when
    /// the worker's tables are missing or older than this binary, without
    /// creating or changing anything (they may run as a SELECT-only role).
    pub async fn require_migrated(&self) -> Result<(), DbError> {
        let pending = self.timed(self.store.pending_migrations()).await?;
        if pending.is_empty() {
            Ok(())
        } else {
            Err(DbError::NotMigrated { pending })
        }
    }

    /// Checks that the profile table, its columns and the filter exist (after `migrate`).
    pub async fn check_profile(&self) -> Result<(), DbError> {
        self.timed(self.store.check_profile()).await
    }

    /// Reads the next keyset page of due avatars and leases what no other
    /// worker holds. Rows locked by another worker are skipped, not waited for.
    pub async fn claim_page(&self, claim: &Claim<'_>) -> Result<ClaimedPage, DbError> {
        // Concurrent claims and batch writes can deadlock on InnoDB's gap
        // locks; the loser's transaction was rolled back whole: run it again.
        let page =
            rerun_deadlocks(|| async { self.timed(self.store.claim_page(claim)).await }).await?;
        if !claim.selection.dry_run {
            let ids = page.claimed.iter().map(|d| d.user_id.to_string());
            self.held.claimed(claim.token, ids);
        }
        Ok(page)
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
        let recorded = match self.record_once(records, outbox, token).await {
            Err(e) if e.is_data_error() => {
                tracing::warn!(error = %e, rows = records.len(), "a row of the batch was refused: writing them one by one");
                self.record_one_by_one(records, outbox, token, refused)
                    .await
            }
            other => other,
        }?;
        // Written rows gave their lease back; so did rows another worker took
        // over. A row refused even as `record_error` stays held (released
        // at the end of the scan).
        let kept: Vec<usize> = recorded
            .replaced
            .iter()
            .filter(|(_, r)| r.is_none())
            .map(|(i, _)| *i)
            .collect();
        let ids = records
            .iter()
            .enumerate()
            .filter(|(i, _)| !kept.contains(i))
            .map(|(_, r)| r.user_id.to_string());
        self.held.settled(token, ids);
        Ok(recorded)
    }

    async fn record_once(
        &self,
        records: &[AvatarRecord],
        outbox: &[OutboxRow],
        token: &str,
    ) -> Result<Recorded, DbError> {
        // A replayed batch changes nothing, so a deadlock victim is simply rerun.
        rerun_deadlocks(|| async {
            self.timed(self.store.record_batch(records, outbox, token))
                .await
        })
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
                    total.add(&r);
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
                    total.add(&r);
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
        self.timed(
            self.store
                .claim_deliveries(sink, now, limit, token, lease_until),
        )
        .await
    }

    pub async fn settle_delivery(
        &self,
        id: i64,
        token: &str,
        outcome: &Settle,
    ) -> Result<(), DbError> {
        self.timed(self.store.settle_delivery(id, token, outcome))
            .await
    }

    pub async fn outbox_backlog(&self) -> Result<Vec<OutboxBacklog>, DbError> {
        self.timed(self.store.outbox_backlog()).await
    }

    /// The heartbeat: extends to `until` the lease of every avatar `token`
    /// claimed and has not written yet, so a slow page is never taken over
    /// by another replica while its holder is alive.
    pub async fn renew_leases(&self, token: &str, until: i64) -> Result<u64, DbError> {
        let ids = self.held.ids(token);
        rerun_deadlocks(|| async { self.timed(self.store.renew(token, until, &ids)).await }).await
    }

    /// Gives back every lease `token` still holds (avatars claimed but not checked).
    pub async fn release(&self, token: &str) -> Result<u64, DbError> {
        let ids = self.held.take(token);
        self.timed(self.store.release(token, &ids)).await
    }

    /// State rows after `after` (by user id text), for `export`.
    pub async fn export_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AvatarRecord>, DbError> {
        self.timed(self.store.export_page(after, limit)).await
    }

    pub async fn status_counts(&self, now: i64) -> Result<StatusCounts, DbError> {
        self.timed(self.store.status_counts(now)).await
    }

    /// Avatars due now, counted one window of the walk per statement, each
    /// under the statement timeout (one statement over 10M rows was not).
    pub async fn count_due(&self, now: i64) -> Result<Backlog, DbError> {
        let (mut total, mut after) = (Backlog::default(), None);
        loop {
            let (window, end) = self
                .timed(self.store.count_due_in(after.as_ref(), now))
                .await?;
            total.add(window);
            match end {
                Some(end) => after = Some(end),
                None => return Ok(total),
            }
        }
    }

    /// A fact kept between runs (`avatar_warden_meta`).
    pub async fn meta(&self, name: &str) -> Result<Option<String>, DbError> {
        self.timed(self.store.meta(name)).await
    }

    pub async fn set_meta(&self, name: &str, value: &str) -> Result<(), DbError> {
        self.timed(self.store.set_meta(name, value)).await
    }

    /// What the profile table's write-back columns hold for `ids` (users
    /// the table does not have are absent).
    pub async fn written_back(
        &self,
        ids: &[UserId],
    ) -> Result<std::collections::HashMap<String, WrittenBack>, DbError> {
        self.timed(self.store.written_back(ids)).await
    }

    /// Writes one page of late write-back corrections in one transaction.
    pub async fn rewrite(&self, page: &Rewrite) -> Result<(), DbError> {
        rerun_deadlocks(|| async { self.timed(self.store.rewrite(page)).await }).await
    }

    /// The configured write-back columns: (mirror URL, re-auth flag).
    pub fn writes_back(&self) -> (Option<&str>, Option<&str>) {
        (
            self.write_back_columns.0.as_deref(),
            self.write_back_columns.1.as_deref(),
        )
    }

    /// When the last completed scan finished, if one ever did.
    pub async fn last_completed_at(&self) -> Result<Option<i64>, DbError> {
        self.timed(self.store.last_completed_at()).await
    }

    pub async fn record_run(&self, run: &RunRecord) -> Result<(), DbError> {
        self.timed(self.store.record_run(run)).await
    }

    /// Counts, backlog, oldest due item and last run, for `status`.
    pub async fn status(&self, now: i64) -> Result<StatusSummary, DbError> {
        let counts = self.status_counts(now).await?;
        let backlog = self.count_due(now).await?;
        Ok(StatusSummary {
            counts: counts.counts.into_iter().collect(),
            reauth_required: counts.reauth_required,
            due_backlog: backlog.due,
            oldest_due_at: backlog.oldest_due_at,
            last_run: self.timed(self.store.last_run()).await?,
            outbox: self.outbox_backlog().await?,
        })
    }

    /// Which of `keys` some avatar's state still points at.
    pub async fn referenced_keys(&self, keys: &[String]) -> Result<Vec<String>, DbError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.timed(self.store.referenced_keys(keys)).await
    }

    /// Avatars whose object is gone forget their picture and become due, so
    /// the next scan stores it again (`gc` losing a race with a scan).
    pub async fn forget_objects(&self, keys: &[String]) -> Result<u64, DbError> {
        if keys.is_empty() {
            return Ok(0);
        }
        self.timed(self.store.forget_objects(keys)).await
    }

    /// Which of `ids` the configured profile table has no user for
    /// (`scan --user`), compared as text.
    pub async fn missing_users(&self, ids: &[String]) -> Result<Vec<String>, DbError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.timed(self.store.missing_users(ids)).await
    }

    /// Reachability, for readiness.
    pub async fn ping(&self) -> Result<(), DbError> {
        self.timed(self.store.ping()).await
    }
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
    fn add(&mut self, other: &Recorded) {
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

/// A random lease token for one scan.
pub fn new_lease_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use error::connection_lost;

    #[test]
    fn a_pool_size_of_zero_means_the_backends_own_default() {
        assert_eq!(pool_size(0, sqlite::POOL_SIZE), 1);
        assert_eq!(pool_size(0, SERVER_POOL_SIZE), 8);
        // An operator's explicit size wins, on SQLite too.
        assert_eq!(pool_size(4, sqlite::POOL_SIZE), 4);
        assert_eq!(pool_size(32, SERVER_POOL_SIZE), 32);
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
    fn the_backlog_of_the_walk_is_the_sum_of_its_windows_and_their_oldest() {
        let mut total = Backlog::default();
        for (due, oldest) in [(2, Some(2000)), (0, None), (3, Some(1000)), (1, None)] {
            total.add(Backlog {
                due,
                oldest_due_at: oldest,
            });
        }
        assert_eq!(
            total,
            Backlog {
                due: 6,
                oldest_due_at: Some(1000)
            }
        );
    }
}
