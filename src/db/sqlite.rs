//! SQLite backend (the embedded default). One writer at a time: writes take
//! the lock up front (`BEGIN IMMEDIATE`), batches are multi-row statements.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteRow,
};
use sqlx::{Arguments, Row};

use super::migrate::{self, MIGRATIONS_TABLE};
use super::{
    AvatarRecord, Candidate, Claim, ClaimedPage, DbError, Dialect, LOCK_COLUMNS, Locked,
    ProfileNames, Recorded, STATE_COLUMNS, STATE_TABLE, Selection, StatusCounts, UserId,
    question_marks, select_claims, unclaimed,
};
use crate::config::ProfileSettings;

/// SQLite allows 32766 bound parameters per statement; 1000 rows x 20 stays well below.
const ROWS_PER_STATEMENT: usize = 1000;

pub struct Sqlite {
    pool: SqlitePool,
    names: ProfileNames,
}

impl Sqlite {
    pub async fn connect(settings: &ProfileSettings, names: ProfileNames) -> Result<Self, DbError> {
        let options = SqliteConnectOptions::from_str(settings.url.expose())
            .map_err(|e| DbError::Config(format!("profile.url: {e}")))?
            .busy_timeout(settings.statement_timeout());
        let pool = SqlitePoolOptions::new()
            .max_connections(settings.max_connections.max(1))
            .acquire_timeout(Duration::from_secs(settings.connect_timeout_secs.max(1)))
            .connect_with(options)
            .await
            .map_err(|e| DbError::Connect(e.to_string()))?;
        Ok(Sqlite { pool, names })
    }

    pub async fn ping(&self) -> Result<(), DbError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn check_profile(&self) -> Result<(), DbError> {
        let sql = format!(
            "SELECT id, avatar FROM {} AS p LIMIT 0",
            self.names.source()
        );
        sqlx::query(&sql).fetch_all(&self.pool).await.map_err(|e| {
            DbError::Config(format!(
                "the profile table does not match the configuration: {e}"
            ))
        })?;
        for (what, col) in [
            ("profile.mirror_url_column", &self.names.mirror_url),
            ("profile.reauth_column", &self.names.reauth),
        ] {
            if let Some(col) = col {
                let sql = format!("SELECT t.{col} FROM {} AS t LIMIT 0", self.names.table);
                sqlx::query(&sql).fetch_all(&self.pool).await.map_err(|e| {
                    DbError::Config(format!("{what} does not match the table: {e}"))
                })?;
            }
        }
        Ok(())
    }

    pub async fn migrate(&self) -> Result<Vec<i64>, DbError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
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

    pub async fn claim_page(&self, c: &Claim<'_>) -> Result<ClaimedPage, DbError> {
        let sql = self.due_query(c.after.is_some(), c.selection);
        let mut args = SqliteArguments::default();
        if let Some(after) = c.after {
            bind_id(&mut args, after)?;
        }
        args.add(c.now).map_err(sqlx::Error::Encode)?;
        args.add(c.now).map_err(sqlx::Error::Encode)?;
        args.add(c.limit as i64).map_err(sqlx::Error::Encode)?;
        let rows = sqlx::query_with(&sql, args).fetch_all(&self.pool).await?;
        let mut candidates = rows
            .iter()
            .map(candidate_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let cursor = candidates.last().map(|c| c.user_id.clone());
        c.narrow(&mut candidates);
        if candidates.is_empty() {
            return Ok(ClaimedPage {
                claimed: Vec::new(),
                cursor,
            });
        }
        let ids: Vec<String> = candidates.iter().map(|c| c.user_id.to_string()).collect();
        if c.selection.dry_run {
            let mut conn = self.pool.acquire().await?;
            let locked = lock_rows(&mut conn, &ids).await?;
            return Ok(ClaimedPage {
                claimed: unclaimed(candidates, locked),
                cursor,
            });
        }
        // One writer at a time: nobody can claim between our read and our lease.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let new: Vec<&Candidate> = candidates.iter().filter(|c| !c.has_state).collect();
        for chunk in new.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO {STATE_TABLE} (user_id, source_url, status, reason, checked_at, next_check_at) VALUES {} \
                 ON CONFLICT (user_id) DO NOTHING",
                question_marks(chunk.len(), 6)
            );
            let mut args = SqliteArguments::default();
            for cand in chunk {
                add_all(&mut args, |a| {
                    a.add(cand.user_id.to_string())?;
                    a.add(cand.avatar_url.clone())?;
                    a.add("pending")?;
                    a.add("not_checked_yet")?;
                    a.add(0i64)?;
                    a.add(c.now)
                })?;
            }
            sqlx::query_with(&sql, args).execute(&mut *tx).await?;
        }
        let locked = lock_rows(&mut tx, &ids).await?;
        let claimed = select_claims(c.now, candidates, locked, c.selection.force);
        for chunk in claimed.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "UPDATE {STATE_TABLE} SET lease_token = ?, lease_expires_at = ? WHERE user_id IN ({})",
                super::question_list(chunk.len())
            );
            let mut q = sqlx::query(&sql).bind(c.token).bind(c.lease_until);
            for d in chunk {
                q = q.bind(d.user_id.to_string());
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(ClaimedPage { claimed, cursor })
    }

    pub async fn record_batch(
        &self,
        records: &[AvatarRecord],
        outbox: &[super::OutboxRow],
        token: &str,
    ) -> Result<Recorded, DbError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut owned = std::collections::HashSet::with_capacity(records.len());
        for chunk in records.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "SELECT user_id FROM {STATE_TABLE} WHERE lease_token = ? AND user_id IN ({})",
                super::question_list(chunk.len())
            );
            let mut q = sqlx::query_scalar::<_, String>(&sql).bind(token);
            for r in chunk {
                q = q.bind(r.user_id.to_string());
            }
            owned.extend(q.fetch_all(&mut *tx).await?);
        }
        let mine: Vec<&AvatarRecord> = records
            .iter()
            .filter(|r| owned.contains(&r.user_id.to_string()))
            .collect();
        for chunk in mine.chunks(ROWS_PER_STATEMENT) {
            let (sql, args) = upsert_state(chunk)?;
            sqlx::query_with(&sql, args).execute(&mut *tx).await?;
            if let Some((sql, args)) = write_back(&self.names, chunk)? {
                sqlx::query_with(&sql, args).execute(&mut *tx).await?;
            }
        }
        let deliveries: Vec<&super::OutboxRow> = outbox
            .iter()
            .filter(|o| owned.contains(&o.user_id.to_string()))
            .collect();
        Self::insert_outbox(&mut tx, &deliveries).await?;
        tx.commit().await?;
        Ok(Recorded {
            written: mine.len(),
            discarded: records.len() - mine.len(),
            replaced: Vec::new(),
        })
    }

    fn due_query(&self, with_cursor: bool, selection: &Selection) -> String {
        due_query(&self.names, with_cursor, selection)
    }

    super::state_statements!(
        "?",
        "?",
        "?",
        "?",
        "?, ?, ?, ?, ?, ?, ?, ?",
        super::question_list
    );
    super::outbox::outbox_statements!(sqlx::Sqlite, String::from, "INSERT OR IGNORE INTO", "");

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

fn add_all(
    args: &mut SqliteArguments<'_>,
    f: impl FnOnce(&mut SqliteArguments<'_>) -> Result<(), sqlx::error::BoxDynError>,
) -> Result<(), DbError> {
    f(args).map_err(|e| DbError::Query(sqlx::Error::Encode(e)))
}

fn bind_id(args: &mut SqliteArguments<'_>, id: &UserId) -> Result<(), DbError> {
    add_all(args, |a| match id {
        UserId::Int(i) => a.add(*i),
        UserId::Text(s) => a.add(s.clone()),
    })
}

/// Due: never checked, URL changed since the last check, or its time has
/// come — and not leased by a worker right now.
/// The state rows of `ids` (SQLite has one writer: the transaction is the lock).
async fn lock_rows(
    conn: &mut sqlx::SqliteConnection,
    ids: &[String],
) -> Result<Vec<Locked>, DbError> {
    let mut locked = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "SELECT {LOCK_COLUMNS} FROM {STATE_TABLE} WHERE user_id IN ({})",
            super::question_list(chunk.len())
        );
        let mut q = sqlx::query(&sql);
        for id in chunk {
            q = q.bind(id);
        }
        for row in q.fetch_all(&mut *conn).await? {
            locked.push(locked_from_row(&row)?);
        }
    }
    Ok(locked)
}

fn due_query(n: &ProfileNames, with_cursor: bool, selection: &Selection) -> String {
    let cursor = if with_cursor { "p.id > ? AND " } else { "" };
    let (due_or, and) = selection.sql(Dialect::Sqlite);
    format!(
        "SELECT p.id AS id, p.avatar AS avatar, s.user_id IS NOT NULL AS has_state \
         FROM {source} AS p LEFT JOIN {STATE_TABLE} AS s ON s.user_id = CAST(p.id AS TEXT) \
         WHERE {cursor}p.avatar IS NOT NULL AND TRIM(p.avatar) <> '' \
         AND (s.user_id IS NULL OR s.source_url <> p.avatar OR s.next_check_at <= ?{due_or}) \
         AND (s.lease_expires_at IS NULL OR s.lease_expires_at <= ?){and} \
         ORDER BY p.id LIMIT ?",
        source = n.source(),
    )
}

fn candidate_from_row(row: &SqliteRow) -> Result<Candidate, DbError> {
    let user_id = match row.try_get::<i64, _>("id") {
        Ok(i) => UserId::Int(i),
        Err(_) => UserId::Text(row.try_get::<String, _>("id")?),
    };
    // A column holding bytes that are not UTF-8 must not stop the batch.
    let avatar_url = match row.try_get::<String, _>("avatar") {
        Ok(s) => s,
        Err(_) => String::from_utf8_lossy(&row.try_get::<Vec<u8>, _>("avatar")?).into_owned(),
    };
    Ok(Candidate {
        user_id,
        avatar_url,
        has_state: row.try_get("has_state")?,
    })
}

super::row_readers!(SqliteRow);

/// One multi-row upsert: a replayed batch overwrites rows with the same values.
fn upsert_state<'a>(
    records: &[&'a AvatarRecord],
) -> Result<(String, SqliteArguments<'a>), DbError> {
    let updates: Vec<String> = STATE_COLUMNS[1..]
        .iter()
        .map(|c| format!("{c} = excluded.{c}"))
        .chain(std::iter::once(super::SETTLE_LEASE.to_string()))
        .collect();
    let sql = format!(
        "INSERT INTO {STATE_TABLE} ({}) VALUES {} ON CONFLICT (user_id) DO UPDATE SET {}",
        STATE_COLUMNS.join(", "),
        question_marks(records.len(), STATE_COLUMNS.len()),
        updates.join(", ")
    );
    let mut args = SqliteArguments::default();
    for r in records {
        add_all(&mut args, |a| {
            a.add(r.user_id.to_string())?;
            a.add(r.source_url.clone())?;
            a.add(r.status.as_str())?;
            a.add(r.reason.as_str())?;
            a.add(r.reason_detail.clone())?;
            a.add(r.mirror_url.clone())?;
            a.add(r.object_key.clone())?;
            a.add(r.sha256.clone())?;
            a.add(r.size_bytes)?;
            a.add(r.width)?;
            a.add(r.height)?;
            a.add(r.format.clone())?;
            a.add(r.reauth_required)?;
            a.add(r.attempts)?;
            a.add(r.expiry_signals)?;
            a.add(r.checked_at)?;
            a.add(r.next_check_at)?;
            a.add(r.validators.etag.clone())?;
            a.add(r.validators.last_modified.clone())?;
            a.add(r.validators.length)
        })?;
    }
    Ok((sql, args))
}

/// One `UPDATE ... FROM (VALUES ...)` for the configured write-back columns.
fn write_back<'a>(
    n: &ProfileNames,
    records: &[&'a AvatarRecord],
) -> Result<Option<(String, SqliteArguments<'a>)>, DbError> {
    if n.mirror_url.is_none() && n.reauth.is_none() {
        return Ok(None);
    }
    let mut sets = Vec::new();
    if let Some(col) = &n.mirror_url {
        sets.push(format!("{col} = v.column2"));
    }
    if let Some(col) = &n.reauth {
        sets.push(format!("{col} = v.column3"));
    }
    let sql = format!(
        "UPDATE {table} AS p SET {sets} FROM (VALUES {values}) AS v WHERE p.{id} = v.column1",
        table = n.table,
        sets = sets.join(", "),
        values = question_marks(records.len(), 3),
        id = n.id,
    );
    let mut args = SqliteArguments::default();
    for r in records {
        bind_id(&mut args, &r.user_id)?;
        add_all(&mut args, |a| {
            a.add(r.mirror_url.clone())?;
            a.add(r.reauth_required)
        })?;
    }
    Ok(Some((sql, args)))
}
