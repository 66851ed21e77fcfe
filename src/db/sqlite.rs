//! SQLite backend (the embedded default). One writer at a time, so batches are
//! written in one transaction of multi-row statements.

use std::str::FromStr;
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteRow};
use sqlx::{QueryBuilder, Row};

use super::migrate::{self, MIGRATIONS_TABLE};
use super::{
    AvatarRecord, DbError, DueAvatar, Previous, ProfileNames, STATE_TABLE, StatusCounts, UserId,
};
use crate::classify::Status;
use crate::config::ProfileSettings;

/// SQLite allows 32766 bound parameters per statement; stay well below.
const ROWS_PER_STATEMENT: usize = 1000;

pub struct Sqlite {
    pool: SqlitePool,
    names: ProfileNames,
    due_sql: (String, String),
}

impl Sqlite {
    pub async fn connect(settings: &ProfileSettings, names: ProfileNames) -> Result<Self, DbError> {
        let options = SqliteConnectOptions::from_str(settings.url.expose_secret())
            .map_err(|e| DbError::Config(format!("profile.url: {e}")))?
            .busy_timeout(settings.statement_timeout());
        let pool = SqlitePoolOptions::new()
            .max_connections(settings.max_connections.max(1))
            .acquire_timeout(Duration::from_secs(settings.connect_timeout_secs.max(1)))
            .connect_with(options)
            .await
            .map_err(|e| DbError::Connect(e.to_string()))?;
        let due_sql = (due_query(&names, false), due_query(&names, true));
        Ok(Sqlite {
            pool,
            names,
            due_sql,
        })
    }

    pub async fn ping(&self) -> Result<(), DbError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn migrate(&self) -> Result<Vec<i64>, DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
        ))
        .execute(&mut *tx)
        .await?;
        let done: Vec<i64> = sqlx::query_scalar(&format!("SELECT version FROM {MIGRATIONS_TABLE}"))
            .fetch_all(&mut *tx)
            .await?;
        let mut applied = Vec::new();
        for m in migrate::SQLITE
            .iter()
            .filter(|m| !done.contains(&m.version))
        {
            for stmt in migrate::statements(m.sql) {
                sqlx::query(stmt)
                    .execute(&mut *tx)
                    .await
                    .map_err(|source| DbError::Migration {
                        version: m.version,
                        name: m.name,
                        source,
                    })?;
            }
            sqlx::query(&format!(
                "INSERT INTO {MIGRATIONS_TABLE} (version, name, applied_at) VALUES (?, ?, ?)"
            ))
            .bind(m.version)
            .bind(m.name)
            .bind(chrono::Utc::now().timestamp())
            .execute(&mut *tx)
            .await?;
            applied.push(m.version);
        }
        tx.commit().await?;
        Ok(applied)
    }

    pub async fn due_page(
        &self,
        after: Option<&UserId>,
        now: i64,
        limit: usize,
    ) -> Result<Vec<DueAvatar>, DbError> {
        let sql = if after.is_some() {
            &self.due_sql.1
        } else {
            &self.due_sql.0
        };
        let mut q = sqlx::query(sql);
        match after {
            Some(UserId::Int(i)) => q = q.bind(*i),
            Some(UserId::Text(s)) => q = q.bind(s.as_str()),
            None => {}
        }
        let rows = q.bind(now).bind(limit as i64).fetch_all(&self.pool).await?;
        rows.iter().map(due_from_row).collect()
    }

    pub async fn record_batch(&self, records: &[AvatarRecord]) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        for chunk in records.chunks(ROWS_PER_STATEMENT) {
            upsert_state(chunk).build().execute(&mut *tx).await?;
            if let Some(mut q) = write_back(&self.names, chunk) {
                q.build().execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn export_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AvatarRecord>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT * FROM {STATE_TABLE} WHERE user_id > ? ORDER BY user_id LIMIT ?"
        ))
        .bind(after.unwrap_or(""))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(record_from_row).collect()
    }

    pub async fn status_counts(&self, now: i64) -> Result<StatusCounts, DbError> {
        let counts: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT status, COUNT(*) FROM {STATE_TABLE} GROUP BY status ORDER BY status"
        ))
        .fetch_all(&self.pool)
        .await?;
        let (reauth_required, due_now): (i64, i64) = sqlx::query_as(&format!(
            "SELECT COALESCE(SUM(reauth_required), 0), COALESCE(SUM(CASE WHEN next_check_at <= ? THEN 1 ELSE 0 END), 0) FROM {STATE_TABLE}"
        ))
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        Ok(StatusCounts {
            counts,
            reauth_required,
            due_now,
        })
    }
}

/// Due: never checked, URL changed since the last check, or its time has come.
fn due_query(n: &ProfileNames, with_cursor: bool) -> String {
    let cursor = if with_cursor {
        format!("p.{} > ? AND ", n.id)
    } else {
        String::new()
    };
    format!(
        "SELECT p.{id} AS id, p.{avatar} AS avatar, s.source_url, s.status, s.mirror_url, s.object_key, s.sha256, \
         s.attempts, s.reauth_required \
         FROM {table} AS p LEFT JOIN {STATE_TABLE} AS s ON s.user_id = CAST(p.{id} AS TEXT) \
         WHERE {cursor}p.{avatar} IS NOT NULL AND TRIM(p.{avatar}) <> '' \
         AND (s.user_id IS NULL OR s.source_url <> p.{avatar} OR s.next_check_at <= ?) \
         ORDER BY p.{id} LIMIT ?",
        id = n.id,
        avatar = n.avatar,
        table = n.table,
    )
}

fn due_from_row(row: &SqliteRow) -> Result<DueAvatar, DbError> {
    let user_id = match row.try_get::<i64, _>("id") {
        Ok(i) => UserId::Int(i),
        Err(_) => UserId::Text(row.try_get::<String, _>("id")?),
    };
    // A column holding bytes that are not UTF-8 must not stop the batch.
    let avatar_url = match row.try_get::<String, _>("avatar") {
        Ok(s) => s,
        Err(_) => String::from_utf8_lossy(&row.try_get::<Vec<u8>, _>("avatar")?).into_owned(),
    };
    let previous = match row.try_get::<Option<String>, _>("source_url")? {
        None => None,
        Some(source_url) => Some(Previous {
            source_url,
            status: parse_status(&row.try_get::<String, _>("status")?)?,
            mirror_url: row.try_get("mirror_url")?,
            object_key: row.try_get("object_key")?,
            sha256: row.try_get("sha256")?,
            attempts: row.try_get("attempts")?,
            reauth_required: row.try_get("reauth_required")?,
        }),
    };
    Ok(DueAvatar {
        user_id,
        avatar_url,
        previous,
    })
}

fn parse_status(s: &str) -> Result<Status, DbError> {
    s.parse()
        .map_err(|e| DbError::Data(format!("{STATE_TABLE}.status: {e}")))
}

fn record_from_row(row: &SqliteRow) -> Result<AvatarRecord, DbError> {
    Ok(AvatarRecord {
        user_id: UserId::Text(row.try_get("user_id")?),
        source_url: row.try_get("source_url")?,
        status: parse_status(&row.try_get::<String, _>("status")?)?,
        reason: row.try_get("reason")?,
        reason_detail: row.try_get("reason_detail")?,
        mirror_url: row.try_get("mirror_url")?,
        object_key: row.try_get("object_key")?,
        sha256: row.try_get("sha256")?,
        size_bytes: row.try_get("size_bytes")?,
        width: row.try_get("width")?,
        height: row.try_get("height")?,
        format: row.try_get("format")?,
        reauth_required: row.try_get("reauth_required")?,
        attempts: row.try_get("attempts")?,
        checked_at: row.try_get("checked_at")?,
        next_check_at: row.try_get("next_check_at")?,
    })
}

const STATE_COLUMNS: &str = "user_id, source_url, status, reason, reason_detail, mirror_url, object_key, sha256, \
     size_bytes, width, height, format, reauth_required, attempts, checked_at, next_check_at";

/// One multi-row upsert: a replayed batch overwrites rows with the same values.
fn upsert_state(records: &[AvatarRecord]) -> QueryBuilder<'_, sqlx::Sqlite> {
    let mut q = QueryBuilder::new(format!("INSERT INTO {STATE_TABLE} ({STATE_COLUMNS}) "));
    q.push_values(records, |mut b, r| {
        b.push_bind(r.user_id.to_string())
            .push_bind(&r.source_url)
            .push_bind(r.status.as_str())
            .push_bind(&r.reason)
            .push_bind(&r.reason_detail)
            .push_bind(&r.mirror_url)
            .push_bind(&r.object_key)
            .push_bind(&r.sha256)
            .push_bind(r.size_bytes)
            .push_bind(r.width)
            .push_bind(r.height)
            .push_bind(&r.format)
            .push_bind(r.reauth_required)
            .push_bind(r.attempts)
            .push_bind(r.checked_at)
            .push_bind(r.next_check_at);
    });
    q.push(" ON CONFLICT (user_id) DO UPDATE SET ");
    let updates: Vec<String> = STATE_COLUMNS
        .split(", ")
        .skip(1)
        .map(|c| format!("{c} = excluded.{c}"))
        .collect();
    q.push(updates.join(", "));
    q
}

/// One `UPDATE ... FROM (VALUES ...)` for the configured write-back columns.
fn write_back<'a>(
    n: &ProfileNames,
    records: &'a [AvatarRecord],
) -> Option<QueryBuilder<'a, sqlx::Sqlite>> {
    if n.mirror_url.is_none() && n.reauth.is_none() {
        return None;
    }
    let mut sets = Vec::new();
    if let Some(col) = &n.mirror_url {
        sets.push(format!("{col} = v.column2"));
    }
    if let Some(col) = &n.reauth {
        sets.push(format!("{col} = v.column3"));
    }
    let mut q = QueryBuilder::new(format!(
        "UPDATE {} AS p SET {} FROM (",
        n.table,
        sets.join(", ")
    ));
    q.push_values(records, |mut b, r| {
        match &r.user_id {
            UserId::Int(i) => b.push_bind(*i),
            UserId::Text(s) => b.push_bind(s.as_str()),
        };
        b.push_bind(&r.mirror_url).push_bind(r.reauth_required);
    });
    q.push(format!(") AS v WHERE p.{} = v.column1", n.id));
    Some(q)
}
