//! MySQL 8 / MariaDB >= 10.6 backend. Batches are multi-row statements with
//! `ON DUPLICATE KEY UPDATE` (a replayed batch never raises 1062, which would
//! stop replication); claims use `FOR UPDATE SKIP LOCKED`.

use std::str::FromStr;
use std::time::Duration;

use sqlx::mysql::{MySqlArguments, MySqlConnectOptions, MySqlPool, MySqlPoolOptions, MySqlRow};
use sqlx::{Arguments, Column, Executor, Row, Statement, TypeInfo};

use super::migrate::{self, MIGRATIONS_TABLE};
use super::{
    AvatarRecord, Candidate, Claim, ClaimedPage, DbError, Dialect, LOCK_COLUMNS, Locked,
    ProfileNames, Recorded, STATE_COLUMNS, STATE_TABLE, Selection, StatusCounts, UserId,
    question_marks, select_claims, unclaimed,
};
use crate::config::ProfileSettings;

/// MySQL allows 65535 placeholders per statement; 1000 rows x 20 stays well below.
const ROWS_PER_STATEMENT: usize = 1000;

pub struct MySql {
    pool: MySqlPool,
    names: ProfileNames,
    id_is_int: bool,
}

impl MySql {
    pub async fn connect(settings: &ProfileSettings, names: ProfileNames) -> Result<Self, DbError> {
        let options = MySqlConnectOptions::from_str(settings.url.expose())
            .map_err(|e| DbError::Config(format!("profile.url: {e}")))?
            .charset("utf8mb4");
        let lock_wait = settings.statement_timeout().as_secs().max(1);
        let pool = MySqlPoolOptions::new()
            .max_connections(settings.max_connections.max(1))
            .acquire_timeout(Duration::from_secs(settings.connect_timeout_secs.max(1)))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    // A lock wait must end before our own statement deadline does.
                    conn.execute(
                        format!("SET SESSION innodb_lock_wait_timeout = {lock_wait}").as_str(),
                    )
                    .await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(|e| DbError::Connect(e.to_string()))?;
        let mut db = MySql {
            pool,
            names,
            id_is_int: true,
        };
        if let Ok(is_int) = db.id_is_int().await {
            db.id_is_int = is_int;
        }
        Ok(db)
    }

    async fn id_is_int(&self) -> Result<bool, DbError> {
        let sql = format!(
            "SELECT id, avatar FROM {} AS p LIMIT 0",
            self.names.source()
        );
        let stmt = (&self.pool).prepare(&sql).await.map_err(|e| {
            DbError::Config(format!(
                "the profile table does not match the configuration: {e}"
            ))
        })?;
        Ok(stmt.columns()[0].type_info().name().contains("INT"))
    }

    pub async fn ping(&self) -> Result<(), DbError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn check_profile(&self) -> Result<(), DbError> {
        self.id_is_int().await?;
        for (what, col) in [
            ("profile.mirror_url_column", &self.names.mirror_url),
            ("profile.reauth_column", &self.names.reauth),
        ] {
            if let Some(col) = col {
                let sql = format!("SELECT t.{col} FROM {} AS t LIMIT 0", self.names.table);
                (&self.pool).prepare(&sql).await.map_err(|e| {
                    DbError::Config(format!("{what} does not match the table: {e}"))
                })?;
            }
        }
        Ok(())
    }

    pub async fn migrate(&self) -> Result<Vec<i64>, DbError> {
        // DDL commits implicitly in MySQL: serialise replicas with a named lock instead.
        let mut conn = self.pool.acquire().await?;
        sqlx::query("SELECT GET_LOCK('avatar_warden_migrate', 60)")
            .execute(&mut *conn)
            .await?;
        let result = async {
            sqlx::query(&format!(
                "CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (version BIGINT PRIMARY KEY, name VARCHAR(128) NOT NULL, applied_at BIGINT NOT NULL)"
            ))
            .execute(&mut *conn)
            .await?;
            let done: Vec<i64> = sqlx::query_scalar(&format!("SELECT version FROM {MIGRATIONS_TABLE}"))
                .fetch_all(&mut *conn)
                .await?;
            let mut applied = Vec::new();
            for m in migrate::MYSQL.iter().filter(|m| !done.contains(&m.version)) {
                for stmt in migrate::statements(m.sql) {
                    sqlx::query(stmt)
                        .execute(&mut *conn)
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
                .execute(&mut *conn)
                .await?;
                applied.push(m.version);
            }
            Ok::<_, DbError>(applied)
        }
        .await;
        sqlx::query("SELECT RELEASE_LOCK('avatar_warden_migrate')")
            .execute(&mut *conn)
            .await?;
        result
    }

    fn due_query(&self, with_cursor: bool, selection: &Selection) -> String {
        let cursor = if with_cursor { "p.id > ? AND " } else { "" };
        let (due_or, and) = selection.sql(Dialect::MySql);
        format!(
            "SELECT CAST(p.id AS CHAR) AS id, CAST(p.avatar AS CHAR) AS avatar, \
             CAST(s.user_id IS NOT NULL AS SIGNED) AS has_state \
             FROM {source} AS p LEFT JOIN {STATE_TABLE} AS s ON s.user_id = CAST(p.id AS CHAR) \
             WHERE {cursor}p.avatar IS NOT NULL AND TRIM(p.avatar) <> '' \
             AND (s.user_id IS NULL OR s.source_url <> p.avatar OR s.next_check_at <= ?{due_or}) \
             AND (s.lease_expires_at IS NULL OR s.lease_expires_at <= ?){and} \
             ORDER BY p.id LIMIT ?",
            source = self.names.source(),
        )
    }

    fn user_id(&self, text: String) -> UserId {
        match text.parse::<i64>() {
            Ok(i) if self.id_is_int => UserId::Int(i),
            _ => UserId::Text(text),
        }
    }

    pub async fn claim_page(&self, c: &Claim<'_>) -> Result<ClaimedPage, DbError> {
        let sql = self.due_query(c.after.is_some(), c.selection);
        let mut q = sqlx::query(&sql);
        match c.after {
            Some(UserId::Int(i)) => q = q.bind(*i),
            Some(UserId::Text(s)) => q = q.bind(s.as_str()),
            None => {}
        }
        let rows = q
            .bind(c.now)
            .bind(c.now)
            .bind(c.limit as i64)
            .fetch_all(&self.pool)
            .await?;
        let mut candidates = Vec::with_capacity(rows.len());
        for row in &rows {
            candidates.push(Candidate {
                user_id: self.user_id(row.try_get("id")?),
                avatar_url: row.try_get("avatar")?,
                has_state: row.try_get::<i64, _>("has_state")? != 0,
            });
        }
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
            let locked = lock_rows(&mut conn, &ids, "").await?;
            return Ok(ClaimedPage {
                claimed: unclaimed(candidates, locked),
                cursor,
            });
        }
        let mut tx = self.pool.begin().await?;
        let new: Vec<&Candidate> = candidates.iter().filter(|c| !c.has_state).collect();
        for chunk in new.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO {STATE_TABLE} (user_id, source_url, status, reason, checked_at, next_check_at) VALUES {} \
                 ON DUPLICATE KEY UPDATE user_id = user_id",
                question_marks(chunk.len(), 6)
            );
            let mut args = MySqlArguments::default();
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
        // Rows another worker is claiming right now are skipped, not waited for.
        let locked = lock_rows(&mut tx, &ids, " FOR UPDATE SKIP LOCKED").await?;
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
        let mut tx = self.pool.begin().await?;
        let mut owned = std::collections::HashSet::new();
        for chunk in records.chunks(ROWS_PER_STATEMENT) {
            // Locked until commit: a lease cannot be taken over between this check and the writes.
            let sql = format!(
                "SELECT user_id FROM {STATE_TABLE} WHERE lease_token = ? AND user_id IN ({}) FOR UPDATE",
                super::question_list(chunk.len())
            );
            let mut q = sqlx::query(&sql).bind(token);
            for r in chunk {
                q = q.bind(r.user_id.to_string());
            }
            for row in q.fetch_all(&mut *tx).await? {
                owned.insert(text(&row, "user_id")?);
            }
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

    super::state_statements!(
        "?",
        "?",
        "?",
        "?",
        "?, ?, ?, ?, ?, ?, ?, ?",
        super::question_list
    );
    super::outbox::outbox_statements!(sqlx::MySql, String::from, "INSERT IGNORE INTO", "");

    pub async fn status_counts(&self, now: i64) -> Result<StatusCounts, DbError> {
        let counts: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT CAST(status AS CHAR), COUNT(*) FROM {STATE_TABLE} GROUP BY status ORDER BY status"
        ))
        .fetch_all(&self.pool)
        .await?;
        // SUM is DECIMAL in MySQL: cast for a plain integer.
        let (reauth_required, due_now): (i64, i64) = sqlx::query_as(&format!(
            "SELECT CAST(COALESCE(SUM(reauth_required), 0) AS SIGNED), \
             CAST(COALESCE(SUM(CASE WHEN next_check_at <= ? THEN 1 ELSE 0 END), 0) AS SIGNED) FROM {STATE_TABLE}"
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

async fn lock_rows(
    conn: &mut sqlx::MySqlConnection,
    ids: &[String],
    lock: &str,
) -> Result<Vec<Locked>, DbError> {
    let mut locked = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "SELECT {LOCK_COLUMNS} FROM {STATE_TABLE} WHERE user_id IN ({}){lock}",
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

super::row_readers!(MySqlRow);

fn add_all(
    args: &mut MySqlArguments,
    f: impl FnOnce(&mut MySqlArguments) -> Result<(), sqlx::error::BoxDynError>,
) -> Result<(), DbError> {
    f(args).map_err(|e| DbError::Query(sqlx::Error::Encode(e)))
}

/// Multi-row `INSERT ... ON DUPLICATE KEY UPDATE col = VALUES(col)`: the
/// `VALUES()` form works on MariaDB and MySQL alike.
fn upsert_state(records: &[&AvatarRecord]) -> Result<(String, MySqlArguments), DbError> {
    let updates: Vec<String> = STATE_COLUMNS[1..]
        .iter()
        .map(|c| format!("{c} = VALUES({c})"))
        .chain(std::iter::once(super::SETTLE_LEASE.to_string()))
        .collect();
    let sql = format!(
        "INSERT INTO {STATE_TABLE} ({}) VALUES {} ON DUPLICATE KEY UPDATE {}",
        STATE_COLUMNS.join(", "),
        question_marks(records.len(), STATE_COLUMNS.len()),
        updates.join(", ")
    );
    let mut args = MySqlArguments::default();
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

/// One multi-table `UPDATE ... JOIN (SELECT ... UNION ALL ...)` for the write-back columns.
fn write_back(
    n: &ProfileNames,
    records: &[&AvatarRecord],
) -> Result<Option<(String, MySqlArguments)>, DbError> {
    if n.mirror_url.is_none() && n.reauth.is_none() {
        return Ok(None);
    }
    let mut sets = Vec::new();
    if let Some(col) = &n.mirror_url {
        sets.push(format!("p.{col} = v.mirror"));
    }
    if let Some(col) = &n.reauth {
        sets.push(format!("p.{col} = v.reauth"));
    }
    let rows: Vec<&str> = (0..records.len())
        .map(|i| {
            if i == 0 {
                "SELECT ? AS id, ? AS mirror, ? AS reauth"
            } else {
                "SELECT ?, ?, ?"
            }
        })
        .collect();
    let sql = format!(
        "UPDATE {table} AS p JOIN ({rows}) AS v ON p.{id} = v.id SET {sets}",
        table = n.table,
        rows = rows.join(" UNION ALL "),
        id = n.id,
        sets = sets.join(", "),
    );
    let mut args = MySqlArguments::default();
    for r in records {
        add_all(&mut args, |a| {
            match &r.user_id {
                UserId::Int(i) => a.add(*i)?,
                UserId::Text(s) => a.add(s.clone())?,
            }
            a.add(r.mirror_url.clone())?;
            a.add(r.reauth_required)
        })?;
    }
    Ok(Some((sql, args)))
}
