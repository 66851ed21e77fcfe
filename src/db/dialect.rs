//! How a backend spells the shared statements. The statements themselves
//! (claim, record, runs, outbox, migrate) are written once in `store`; a
//! backend says only what differs: placeholders, casts, locking clauses,
//! "insert or skip/update", the write-back join and how it binds a batch.

use sqlx::Database;

use super::DbError;
use super::columns::{Assign, SETTLE_LEASE, STATE, STATE_TABLE, state_names};
use super::driver::{Driver, Params, question};
use super::migrate::Migration;
use super::profile::ProfileNames;
use crate::model::{AvatarRecord, UserId};

/// Arguments of one statement of dialect `D`.
pub(super) type Args<'q, D> = <<D as Dialect>::Db as Database>::Arguments<'q>;

/// Rows per multi-row statement: 1,000 rows of 20 columns stay below every
/// backend's limit of bound parameters (SQLite 32,766, MySQL and PostgreSQL 65,535).
pub(super) const ROWS_PER_STATEMENT: usize = 1000;

pub(super) trait Dialect: Send + Sync + Sized + 'static {
    type Db: Driver;

    /// The n-th parameter (1-based).
    const PARAM: fn(usize) -> String = question;
    /// How a writing transaction starts (SQLite takes its one write lock up front).
    const BEGIN_WRITE: Option<&'static str> = None;
    /// Locks the rows being claimed; rows another worker holds are skipped, not waited for.
    const CLAIM_LOCK: &'static str = " FOR UPDATE SKIP LOCKED";
    /// Leave unchanged `STABLE_INDEXED` columns out of a batch's update
    /// (`Assign::KeepIndexed`). Only SQLite gains: it rewrites the index entry
    /// of every assigned column. MySQL compares values itself, and on
    /// PostgreSQL the narrower update measured slower (BENCHMARKS.md, #19).
    const KEEP_INDEXED: bool = false;
    /// Locks the rows about to be written until commit.
    const WRITE_LOCK: &'static str = " FOR UPDATE";
    const MIGRATIONS: &'static [Migration];
    /// The migrations table's columns (it is created before anything else).
    const MIGRATIONS_COLUMNS: &'static str;
    /// Statements that serialise replicas migrating together, and undo it.
    const MIGRATE_LOCK: &'static [&'static str] = &[];
    const MIGRATE_UNLOCK: &'static [&'static str] = &[];
    /// Counts the tables of the current database or schema named by the
    /// string literal appended to it (read-only: commands that must not
    /// create tables ask this before reading the migrations table).
    const COUNT_TABLES_NAMED: &'static str;

    fn rows_affected(done: &<Self::Db as Database>::QueryResult) -> u64;

    fn params() -> Params {
        Params::new(Self::PARAM)
    }

    /// `expr` as text, to compare with the state table's text `user_id`.
    fn cast_text(&self, expr: &str) -> String {
        format!("CAST({expr} AS TEXT)")
    }

    /// `expr` in the due query's select list.
    fn select_text(&self, expr: &str) -> String {
        self.cast_text(expr)
    }

    /// The profile's avatar in a comparison with text.
    fn compare_text(&self, expr: &str) -> String {
        expr.to_owned()
    }

    /// A bound user id compared with the profile's id column.
    fn id_param(&self, param: String) -> String {
        param
    }

    /// The due query's "has a state row" column.
    fn has_state(&self) -> &'static str {
        "s.user_id IS NOT NULL"
    }

    /// The user id of a due-query row (`id`, as selected by `select_text`).
    fn user_id(&self, row: &<Self::Db as Database>::Row) -> Result<UserId, sqlx::Error>;

    fn string_literal(&self, s: &str) -> String {
        format!("'{}'", s.replace('\'', "''"))
    }

    /// `id` as a literal of the profile's id column; `None` when no row can have it.
    fn id_literal(&self, id: &str) -> Option<String> {
        Some(match id.parse::<i64>() {
            Ok(i) => i.to_string(),
            Err(_) => self.string_literal(id),
        })
    }

    /// Ends an INSERT so that rows whose `key` exists are skipped.
    fn skip_existing(&self, key: &str) -> String {
        format!("ON CONFLICT ({key}) DO NOTHING")
    }

    /// Ends an INSERT so that rows whose `key` exists get `columns` from the new row.
    fn update_existing(&self, key: &str, columns: &[&str]) -> String {
        let sets: Vec<String> = columns
            .iter()
            .map(|c| format!("{c} = excluded.{c}"))
            .collect();
        format!("ON CONFLICT ({key}) DO UPDATE SET {}", sets.join(", "))
    }

    /// One statement setting the configured write-back columns of `rows`
    /// users, bound per row as (id, mirror URL, re-auth flag).
    fn write_back(&self, names: &ProfileNames, rows: usize, params: &mut Params) -> String;

    /// The batch upsert of state rows with its arguments: multi-row VALUES,
    /// bound from the column table. A replayed batch writes the same values.
    fn upsert_state<'q>(
        &self,
        records: &[&AvatarRecord],
        assign: Assign,
    ) -> Result<(String, Args<'q, Self>), DbError> {
        let sql = format!(
            "INSERT INTO {STATE_TABLE} ({}) VALUES {} {}, {SETTLE_LEASE}",
            state_names(),
            Self::params().rows(records.len(), STATE.len()),
            self.update_existing("user_id", &assign.columns()),
        );
        let mut args = Args::<Self>::default();
        for r in records {
            for c in &STATE {
                Self::Db::bind(&mut args, (c.value)(r))?;
            }
        }
        Ok((sql, args))
    }
}

/// Binds a user id as its own type, so the id column's index is usable.
pub(super) fn bind_id<Db: Driver>(
    args: &mut Db::Arguments<'_>,
    id: &UserId,
) -> Result<(), DbError> {
    match id {
        UserId::Int(i) => Db::bind(args, (*i).into()),
        UserId::Text(s) => Db::bind(args, s.clone().into()),
    }
}
