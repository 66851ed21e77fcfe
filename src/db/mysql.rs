//! MySQL 8 / MariaDB >= 10.6: `ON DUPLICATE KEY UPDATE` (a replayed batch
//! never raises 1062, which would stop replication), claims `FOR UPDATE
//! SKIP LOCKED`, a named lock around migrations (DDL commits implicitly).

use std::str::FromStr;

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlQueryResult, MySqlRow};
use sqlx::{Column, Executor, Row, Statement, TypeInfo};

use super::dialect::Dialect;
use super::driver::Params;
use super::migrate::{self, Migration};
use super::profile::ProfileNames;
use super::store::{StateStore, Store};
use super::{DbError, SERVER_POOL_SIZE, open_pool, pool_options};
use crate::config::ProfileSettings;
use crate::model::UserId;

pub(super) struct MySql {
    id_is_int: bool,
}

impl Dialect for MySql {
    type Db = sqlx::MySql;
    const MIGRATIONS: &'static [Migration] = migrate::MYSQL;
    const COUNT_TABLES_NAMED: &'static str = "SELECT COUNT(*) AS n FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = ";
    const MIGRATIONS_COLUMNS: &'static str =
        "version BIGINT PRIMARY KEY, name VARCHAR(128) NOT NULL, applied_at BIGINT NOT NULL";
    const MIGRATE_LOCK: &'static [&'static str] = &["SELECT GET_LOCK('avatar_warden_migrate', 60)"];
    const MIGRATE_UNLOCK: &'static [&'static str] =
        &["SELECT RELEASE_LOCK('avatar_warden_migrate')"];

    fn rows_affected(done: &MySqlQueryResult) -> u64 {
        done.rows_affected()
    }

    fn cast_text(&self, expr: &str) -> String {
        format!("CAST({expr} AS CHAR)")
    }

    fn has_state(&self) -> &'static str {
        "CAST(s.user_id IS NOT NULL AS SIGNED)"
    }

    fn user_id(&self, row: &MySqlRow) -> Result<UserId, sqlx::Error> {
        let text: String = row.try_get("id")?;
        Ok(match text.parse::<i64>() {
            Ok(i) if self.id_is_int => UserId::Int(i),
            _ => UserId::Text(text),
        })
    }

    /// MySQL also reads backslashes as escapes in literals.
    fn string_literal(&self, s: &str) -> String {
        format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
    }

    fn skip_existing(&self, key: &str) -> String {
        let first = key.split(',').next().unwrap_or(key).trim();
        format!("ON DUPLICATE KEY UPDATE {first} = {first}")
    }

    /// `VALUES(col)` works on MariaDB and MySQL alike.
    fn update_existing(&self, _key: &str, columns: &[&str]) -> String {
        let sets: Vec<String> = columns
            .iter()
            .map(|c| format!("{c} = VALUES({c})"))
            .collect();
        format!("ON DUPLICATE KEY UPDATE {}", sets.join(", "))
    }

    /// A multi-table `UPDATE … JOIN (SELECT … UNION ALL …)`.
    fn write_back(&self, n: &ProfileNames, rows: usize, params: &mut Params) -> String {
        let rows: Vec<String> = (0..rows)
            .map(|i| {
                let (id, mirror, reauth) = (params.one(), params.one(), params.one());
                if i == 0 {
                    format!("SELECT {id} AS id, {mirror} AS mirror, {reauth} AS reauth")
                } else {
                    format!("SELECT {id}, {mirror}, {reauth}")
                }
            })
            .collect();
        format!(
            "UPDATE {table} AS p JOIN ({rows}) AS v ON p.{id} = v.id SET {sets}",
            table = n.table,
            rows = rows.join(" UNION ALL "),
            id = n.id,
            sets = n.write_back_sets("p.", "v.mirror", "v.reauth"),
        )
    }
}

impl MySql {
    #[cfg(test)]
    pub(super) fn with_int_ids(id_is_int: bool) -> Self {
        MySql { id_is_int }
    }

    async fn of_profile(pool: &MySqlPool, names: &ProfileNames) -> Result<Self, sqlx::Error> {
        let sql = format!("SELECT id, avatar FROM {} AS p LIMIT 0", names.source());
        let stmt = pool.prepare(&sql).await?;
        Ok(MySql {
            id_is_int: stmt.columns()[0].type_info().name().contains("INT"),
        })
    }
}

pub(super) async fn connect(
    settings: &ProfileSettings,
    names: ProfileNames,
    endpoint: &str,
) -> Result<Box<dyn StateStore>, DbError> {
    let options = MySqlConnectOptions::from_str(settings.url.expose())
        .map_err(DbError::Url)?
        .charset("utf8mb4");
    let lock_wait = settings.statement_timeout().as_secs().max(1);
    let pool_options = pool_options(settings, SERVER_POOL_SIZE).after_connect(
        move |conn: &mut sqlx::MySqlConnection, _| {
            Box::pin(async move {
                // A lock wait must end before our own statement deadline does.
                conn.execute(
                    format!("SET SESSION innodb_lock_wait_timeout = {lock_wait}").as_str(),
                )
                .await?;
                Ok(())
            })
        },
    );
    let pool = open_pool(pool_options, options, endpoint).await?;
    let dialect = MySql::of_profile(&pool, &names)
        .await
        .unwrap_or(MySql { id_is_int: true });
    Ok(Box::new(Store {
        pool,
        names,
        dialect,
    }))
}
