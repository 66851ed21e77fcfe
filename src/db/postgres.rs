//! PostgreSQL: `$n` parameters, the state batch bound as arrays (`UNNEST`,
//! one statement text whatever the batch size), ids compared in the id
//! column's own type so its index is used, claims `FOR UPDATE SKIP LOCKED`.

use std::str::FromStr;
use std::sync::LazyLock;

use sqlx::postgres::{PgArguments, PgConnectOptions, PgPool, PgQueryResult, PgRow};
use sqlx::{Arguments, Column, Executor, Row, Statement, TypeInfo};

use super::columns::{Assign, Kind, SETTLE_LEASE, STATE, STATE_TABLE, state_names};
use super::dialect::{Args, Dialect};
use super::driver::{Params, Value, dollar};
use super::migrate::{self, Migration};
use super::profile::ProfileNames;
use super::store::{StateStore, Store};
use super::{DbError, SERVER_POOL_SIZE, open_pool, pool_options};
use crate::config::ProfileSettings;
use crate::model::{AvatarRecord, UserId};

/// The batch upserts never change: built once from the column table.
static UPSERT_SQL: LazyLock<[String; 2]> =
    LazyLock::new(|| [Assign::All, Assign::KeepIndexed].map(upsert_sql));

fn upsert_sql(assign: Assign) -> String {
    let arrays: Vec<String> = STATE
        .iter()
        .enumerate()
        .map(|(i, c)| format!("${}::{}[]", i + 1, c.kind.postgres_type()))
        .collect();
    format!(
        "INSERT INTO {STATE_TABLE} ({}) SELECT * FROM UNNEST({}) {}, {SETTLE_LEASE}",
        state_names(),
        arrays.join(", "),
        Postgres::default().update_existing("user_id", &assign.columns()),
    )
}

/// What the profile table's column types ask of the SQL.
pub(super) struct Postgres {
    /// The id column's SQL type, for typed comparisons that keep its index usable.
    id_type: String,
    id_is_int: bool,
    /// Whether the configured re-auth column is a boolean (else 0/1).
    reauth_is_bool: bool,
}

impl Default for Postgres {
    /// Before the profile table exists (`migrate` alone): text ids.
    fn default() -> Self {
        Postgres {
            id_type: "TEXT".into(),
            id_is_int: false,
            reauth_is_bool: true,
        }
    }
}

impl Dialect for Postgres {
    type Db = sqlx::Postgres;
    const PARAM: fn(usize) -> String = dollar;
    const MIGRATIONS: &'static [Migration] = migrate::POSTGRES;
    const COUNT_TABLES_NAMED: &'static str = "SELECT COUNT(*) AS n FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = ";
    const MIGRATIONS_COLUMNS: &'static str =
        "version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL";
    // Replicas starting together: one migrates, the others wait and find it done.
    const MIGRATE_LOCK: &'static [&'static str] =
        &["SELECT pg_advisory_xact_lock(hashtext('avatar_warden_migrate'))"];

    fn rows_affected(done: &PgQueryResult) -> u64 {
        done.rows_affected()
    }

    fn compare_text(&self, expr: &str) -> String {
        self.cast_text(expr)
    }

    fn id_param(&self, param: String) -> String {
        format!("CAST({param} AS {})", self.id_type)
    }

    fn user_id(&self, row: &PgRow) -> Result<UserId, sqlx::Error> {
        let text: String = row.try_get("id")?;
        Ok(match text.parse::<i64>() {
            Ok(i) if self.id_is_int => UserId::Int(i),
            _ => UserId::Text(text),
        })
    }

    fn id_literal(&self, id: &str) -> Option<String> {
        // An id that cannot exist in an integer column matches nothing (and must not break the cast).
        if self.id_type.starts_with("INT") && id.parse::<i64>().is_err() {
            return None;
        }
        Some(format!(
            "CAST({} AS {})",
            self.string_literal(id),
            self.id_type
        ))
    }

    fn write_back(&self, n: &ProfileNames, rows: usize, params: &mut Params) -> String {
        let reauth = if self.reauth_is_bool {
            "v.reauth"
        } else {
            "CASE WHEN v.reauth THEN 1 ELSE 0 END"
        };
        format!(
            "UPDATE {table} AS p SET {sets} FROM (VALUES {values}) AS v(id, mirror, reauth) \
             WHERE p.{id} = CAST(v.id AS {id_type})",
            table = n.table,
            sets = n.write_back_sets("", "v.mirror", reauth),
            values = params.rows(rows, 3),
            id = n.id,
            id_type = self.id_type,
        )
    }

    /// One `INSERT … SELECT FROM UNNEST(…)`: one array per column of the table.
    fn upsert_state<'q>(
        &self,
        records: &[&AvatarRecord],
        assign: Assign,
    ) -> Result<(String, Args<'q, Self>), DbError> {
        let mut args = PgArguments::default();
        for c in &STATE {
            let values = records.iter().map(|r| (c.value)(r));
            match c.kind {
                Kind::Text => args.add(values.map(Value::into_text).collect::<Vec<_>>()),
                Kind::Int => args.add(values.map(Value::into_int).collect::<Vec<_>>()),
                Kind::Bool => args.add(values.map(Value::into_bool).collect::<Vec<_>>()),
            }
            .map_err(|e| DbError::Query(sqlx::Error::Encode(e)))?;
        }
        let sql = &UPSERT_SQL[usize::from(assign == Assign::KeepIndexed)];
        Ok((sql.clone(), args))
    }
}

impl Postgres {
    #[cfg(test)]
    pub(super) fn with_id_type(id_type: &str) -> Self {
        Postgres {
            id_is_int: id_type.starts_with("INT"),
            id_type: id_type.into(),
            reauth_is_bool: true,
        }
    }

    /// Reads the column types the SQL must respect. Fails when the profile
    /// table does not exist (yet).
    async fn of_profile(pool: &PgPool, names: &ProfileNames) -> Result<Self, sqlx::Error> {
        let sql = format!("SELECT id FROM {} AS p LIMIT 0", names.source());
        let id_type = pool.prepare(&sql).await?.columns()[0]
            .type_info()
            .name()
            .to_owned();
        let reauth_is_bool = match &names.reauth {
            Some(col) => {
                let sql = format!("SELECT t.{col} FROM {} AS t LIMIT 0", names.table);
                pool.prepare(&sql).await?.columns()[0].type_info().name() == "BOOL"
            }
            None => true,
        };
        Ok(Postgres {
            id_is_int: matches!(id_type.as_str(), "INT2" | "INT4" | "INT8"),
            id_type,
            reauth_is_bool,
        })
    }
}

pub(super) async fn connect(
    settings: &ProfileSettings,
    names: ProfileNames,
    endpoint: &str,
) -> Result<Box<dyn StateStore>, DbError> {
    let statement_ms = settings.statement_timeout().as_millis().to_string();
    let options = PgConnectOptions::from_str(settings.url.expose())
        .map_err(DbError::Url)?
        .application_name("avatar-warden")
        // The server enforces the same deadline the client does, so an
        // abandoned statement does not keep running after we gave up.
        // Warnings only: every start-up migration's `IF NOT EXISTS` would
        // otherwise log "relation … already exists, skipping" at INFO.
        .options([
            ("statement_timeout", statement_ms.as_str()),
            ("client_min_messages", "warning"),
        ]);
    let pool = open_pool(pool_options(settings, SERVER_POOL_SIZE), options, endpoint).await?;
    // The profile table may not exist yet when only `migrate` runs.
    let dialect = Postgres::of_profile(&pool, &names)
        .await
        .unwrap_or_default();
    Ok(Box::new(Store {
        pool,
        names,
        dialect,
    }))
}
