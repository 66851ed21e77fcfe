//! SQLite (the embedded default): one writer at a time, so writes take the
//! lock up front (`BEGIN IMMEDIATE`) and the transaction is the row lock.

use std::str::FromStr;

use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteQueryResult, SqliteRow};

use super::dialect::Dialect;
use super::driver::Params;
use super::migrate::{self, Migration};
use super::profile::ProfileNames;
use super::store::{StateStore, Store};
use super::{DbError, open_pool, pool_options};
use crate::config::ProfileSettings;
use crate::model::UserId;

pub(super) struct Sqlite;

impl Dialect for Sqlite {
    type Db = sqlx::Sqlite;
    const BEGIN_WRITE: Option<&'static str> = Some("BEGIN IMMEDIATE");
    const CLAIM_LOCK: &'static str = "";
    const KEEP_INDEXED: bool = true;
    const WRITE_LOCK: &'static str = "";
    const MIGRATIONS: &'static [Migration] = migrate::SQLITE;
    const COUNT_TABLES_NAMED: &'static str =
        "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name = ";
    const MIGRATIONS_COLUMNS: &'static str =
        "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL";

    fn rows_affected(done: &SqliteQueryResult) -> u64 {
        done.rows_affected()
    }

    /// Values keep their own type in SQLite: an integer id stays an integer.
    fn select_text(&self, expr: &str) -> String {
        expr.to_owned()
    }

    fn user_id(&self, row: &SqliteRow) -> Result<UserId, sqlx::Error> {
        match row.try_get::<i64, _>("id") {
            Ok(i) => Ok(UserId::Int(i)),
            Err(_) => Ok(UserId::Text(row.try_get("id")?)),
        }
    }

    fn write_back(&self, n: &ProfileNames, rows: usize, params: &mut Params) -> String {
        format!(
            "UPDATE {table} AS p SET {sets} FROM (VALUES {values}) AS v WHERE p.{id} = v.column1",
            table = n.table,
            sets = n.write_back_sets("", "v.column2", "v.column3"),
            values = params.rows(rows, 3),
            id = n.id,
        )
    }
}

/// One connection unless configured otherwise: SQLite has one writer, so
/// more connections add no throughput, only memory (each its own page cache,
/// prepared statements and thread). BENCHMARKS.md, #19: a 200k first scan
/// peaked at 64 MiB with one, 74 with two and 80-83 with four or eight.
pub(super) const POOL_SIZE: u32 = 1;

/// Rows sqlx's SQLite thread may hand over before it waits for the scan to
/// take them (sqlx's default is 50): with 50 it parked and was woken every
/// few rows of a 10,000-row window. 1,000 re-verified 5–11 % faster at
/// 200k, the first scan unchanged, RSS within 2 MiB (BENCHMARKS.md, #19).
const ROW_BUFFER: usize = 1_000;

pub(super) async fn connect(
    settings: &ProfileSettings,
    names: ProfileNames,
    endpoint: &str,
) -> Result<Box<dyn StateStore>, DbError> {
    let options = SqliteConnectOptions::from_str(settings.url.expose())
        .map_err(DbError::Url)?
        .busy_timeout(settings.statement_timeout())
        .row_buffer_size(ROW_BUFFER);
    let pool = open_pool(pool_options(settings, POOL_SIZE), options, endpoint).await?;
    Ok(Box::new(Store {
        pool,
        names,
        dialect: Sqlite,
    }))
}
