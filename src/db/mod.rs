//! The profile database: the user's own table (read due avatars, write back
//! the mirror URL and re-auth flag) and the worker's state tables beside it.
//! Backend-specific SQL lives in one file per backend; callers see one API.

mod ident;
mod migrate;
mod sqlite;

use std::fmt;
use std::future::Future;
use std::time::Duration;

use secrecy::ExposeSecret;

use crate::classify::Status;
use crate::config::ProfileSettings;

pub use ident::{Quote, quote};

pub const STATE_TABLE: &str = "avatar_warden_avatars";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid profile database settings: {0}")]
    Config(String),
    #[error("cannot connect to the profile database: {0}")]
    Connect(String),
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
    /// Connection trouble and timeouts may heal; SQL and config errors will not.
    pub fn is_retryable(&self) -> bool {
        match self {
            DbError::Timeout(_) | DbError::Connect(_) => true,
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

/// What the last check left behind for an avatar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Previous {
    pub source_url: String,
    pub status: Status,
    pub mirror_url: Option<String>,
    pub object_key: Option<String>,
    pub sha256: Option<String>,
    pub attempts: i64,
    pub reauth_required: bool,
}

/// One avatar that must be checked now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueAvatar {
    pub user_id: UserId,
    /// Exactly as stored in the profile table.
    pub avatar_url: String,
    pub previous: Option<Previous>,
}

/// The outcome written to the state table and, where configured, back to the profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AvatarRecord {
    pub user_id: UserId,
    pub source_url: String,
    pub status: Status,
    pub reason: String,
    pub reason_detail: Option<String>,
    pub mirror_url: Option<String>,
    pub object_key: Option<String>,
    pub sha256: Option<String>,
    pub size_bytes: Option<i64>,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub format: Option<String>,
    pub reauth_required: bool,
    /// Consecutive failing checks of this URL.
    pub attempts: i64,
    pub checked_at: i64,
    /// `None`: not until the URL changes.
    pub next_check_at: Option<i64>,
}

/// A state row as `export` shows it.
pub type ExportRow = AvatarRecord;

/// Validated, quoted names of the user's table and columns.
#[derive(Debug, Clone)]
pub struct ProfileNames {
    pub table: String,
    pub id: String,
    pub avatar: String,
    pub mirror_url: Option<String>,
    pub reauth: Option<String>,
}

impl ProfileNames {
    fn new(s: &ProfileSettings, q: Quote) -> Result<Self, DbError> {
        let col = |what: &str, name: &str| quote(what, name, false, q);
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
        })
    }
}

enum Backend {
    Sqlite(sqlite::Sqlite),
}

/// The profile database with every statement under one timeout.
pub struct Database {
    backend: Backend,
    timeout: Duration,
}

impl ProfileSettings {
    /// Connects to `profile.url`; the scheme picks the backend.
    pub async fn connect(&self) -> Result<Database, DbError> {
        let url = self.url.expose_secret();
        let scheme = url.split(':').next().unwrap_or_default();
        let backend = match scheme {
            "sqlite" => Backend::Sqlite(
                sqlite::Sqlite::connect(self, ProfileNames::new(self, Quote::Double)?).await?,
            ),
            other => {
                return Err(DbError::Config(format!(
                    "profile.url scheme {other:?} is not supported (use sqlite://)"
                )));
            }
        };
        Ok(Database {
            backend,
            timeout: self.statement_timeout(),
        })
    }
}

/// Per-status counts for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatusCounts {
    pub counts: Vec<(String, i64)>,
    pub reauth_required: i64,
    pub due_now: i64,
}

impl Database {
    async fn timed<T>(&self, fut: impl Future<Output = Result<T, DbError>>) -> Result<T, DbError> {
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| DbError::Timeout(self.timeout))?
    }

    /// Creates or upgrades the worker's own tables. Never touches the user's table.
    pub async fn migrate(&self) -> Result<Vec<i64>, DbError> {
        match &self.backend {
            Backend::Sqlite(db) => self.timed(db.migrate()).await,
        }
    }

    /// The next page of due avatars after `after`, in id order.
    pub async fn due_page(
        &self,
        after: Option<&UserId>,
        now: i64,
        limit: usize,
    ) -> Result<Vec<DueAvatar>, DbError> {
        match &self.backend {
            Backend::Sqlite(db) => self.timed(db.due_page(after, now, limit)).await,
        }
    }

    /// Writes a batch of outcomes (state rows and write-back) in one transaction.
    /// Replaying the same batch succeeds and changes nothing.
    pub async fn record_batch(&self, records: &[AvatarRecord]) -> Result<(), DbError> {
        if records.is_empty() {
            return Ok(());
        }
        match &self.backend {
            Backend::Sqlite(db) => self.timed(db.record_batch(records)).await,
        }
    }

    /// State rows after `after` (by user id text), for `export`.
    pub async fn export_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ExportRow>, DbError> {
        match &self.backend {
            Backend::Sqlite(db) => self.timed(db.export_page(after, limit)).await,
        }
    }

    pub async fn status_counts(&self, now: i64) -> Result<StatusCounts, DbError> {
        match &self.backend {
            Backend::Sqlite(db) => self.timed(db.status_counts(now)).await,
        }
    }

    /// Reachability, for readiness.
    pub async fn ping(&self) -> Result<(), DbError> {
        match &self.backend {
            Backend::Sqlite(db) => self.timed(db.ping()).await,
        }
    }
}
