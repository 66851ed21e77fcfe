//! What can go wrong with the profile database, classified: may it heal
//! (retry), was it a deadlock (rerun), or did the server refuse a row's values.
//! Messages quote their cause once; `source()` keeps it for the chain.

use std::time::Duration;

use crate::model::UnknownCode;

use super::columns::STATE_TABLE;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// Our own validation of the settings (names, filter, scheme).
    #[error("invalid profile database settings: {0}")]
    Config(String),
    #[error("profile.url: {0}")]
    Url(#[source] sqlx::Error),
    /// A configured table, column or filter the database does not have.
    #[error("{key} does not match the profile table: {source}")]
    Profile {
        key: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// No connection to the server: the socket's own reason.
    #[error("cannot connect to the profile database: {endpoint}: {source}")]
    Unreachable {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    /// The server answered but the connection failed (TLS, authentication, pool).
    #[error("cannot connect to the profile database: {endpoint}: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: sqlx::Error,
    },
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
        #[source]
        source: sqlx::Error,
    },
    /// A read-only command found the worker's tables missing or behind this binary.
    #[error(
        "the worker's tables lack migrations {pending:?}: run `avatar-warden migrate` (with a role that may create tables) first"
    )]
    NotMigrated { pending: Vec<i64> },
    /// A state row holding a code this version does not know.
    #[error("{STATE_TABLE}.{column}: {source}")]
    Data {
        column: &'static str,
        #[source]
        source: UnknownCode,
    },
}

impl DbError {
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

    /// Connection trouble, timeouts, deadlocks and lock waits may heal; SQL
    /// and settings errors will not.
    pub fn is_retryable(&self) -> bool {
        match self {
            DbError::Timeout(_)
            | DbError::Connect { .. }
            | DbError::Unreachable { .. }
            | DbError::ConnectionLost { .. } => true,
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

/// The connection itself failed mid-statement, as opposed to the statement.
pub(super) fn connection_lost(e: &sqlx::Error) -> bool {
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
