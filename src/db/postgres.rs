//! PostgreSQL backend. Batches travel as arrays (`UNNEST`), claims lock rows
//! with `FOR UPDATE SKIP LOCKED` so replicas never wait on each other.

use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Column, Executor, Row, Statement, TypeInfo};

use super::migrate::{self, MIGRATIONS_TABLE};
use super::{
    AvatarRecord, Candidate, Claim, ClaimedPage, DbError, Dialect, LOCK_COLUMNS, Locked,
    ProfileNames, Recorded, STATE_COLUMNS, STATE_TABLE, Selection, StatusCounts, UserId,
    select_claims, unclaimed,
};
use crate::config::ProfileSettings;

/// The batch upsert never changes: built once.
static UPSERT_SQL: LazyLock<String> = LazyLock::new(|| {
    const TYPES: [&str; 20] = [
        "text", "text", "text", "text", "text", "text", "text", "text", "int8", "int8", "int8",
        "text", "bool", "int8", "int8", "int8", "int8", "text", "text", "int8",
    ];
    let arrays: Vec<String> = TYPES
        .iter()
        .enumerate()
        .map(|(i, t)| format!("${}::{t}[]", i + 1))
        .collect();
    let updates: Vec<String> = STATE_COLUMNS[1..]
        .iter()
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .chain(std::iter::once(super::SETTLE_LEASE.to_string()))
        .collect();
    format!(
        "INSERT INTO {STATE_TABLE} ({}) SELECT * FROM UNNEST({}) ON CONFLICT (user_id) DO UPDATE SET {}",
        STATE_COLUMNS.join(", "),
        arrays.join(", "),
        updates.join(", ")
    )
});

pub struct Postgres {
    pool: PgPool,
    names: ProfileNames,
    /// The id column's SQL type, for typed comparisons that keep its index usable.
    id_type: String,
    id_is_int: bool,
    /// How to write a boolean into the configured re-auth column.
    reauth_is_bool: bool,
}

impl Postgres {
    pub async fn connect(settings: &ProfileSettings, names: ProfileNames) -> Result<Self, DbError> {
        let statement_ms = settings.statement_timeout().as_millis().to_string();
        let options = PgConnectOptions::from_str(settings.url.expose())
            .map_err(|e| DbError::Config(format!("profile.url: {e}")))?
            .application_name("avatar-warden")
            // The server enforces the same deadline the client does, so an
            // abandoned statement does not keep running after we gave up.
            .options([("statement_timeout", statement_ms.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections.max(1))
            .acquire_timeout(Duration::from_secs(settings.connect_timeout_secs.max(1)))
            .connect_with(options)
            .await
            .map_err(|e| DbError::Connect(e.to_string()))?;
        let mut pg = Postgres {
            pool,
            names,
            id_type: "TEXT".into(),
            id_is_int: false,
            reauth_is_bool: true,
        };
        // The profile table may not exist yet when only `migrate` runs; types are read lazily then.
        if let Ok(types) = pg.column_types().await {
            (pg.id_type, pg.id_is_int, pg.reauth_is_bool) = types;
        }
        Ok(pg)
    }

    async fn column_types(&self) -> Result<(String, bool, bool), DbError> {
        let sql = format!("SELECT id FROM {} AS p LIMIT 0", self.names.source());
        let stmt = (&self.pool).prepare(&sql).await.map_err(|e| {
            DbError::Config(format!(
                "the profile table does not match the configuration: {e}"
            ))
        })?;
        let id_type = stmt.columns()[0].type_info().name().to_string();
        let id_is_int = matches!(id_type.as_str(), "INT2" | "INT4" | "INT8");
        let reauth_is_bool = match &self.names.reauth {
            Some(col) => {
                let sql = format!("SELECT t.{col} FROM {} AS t LIMIT 0", self.names.table);
                let stmt = (&self.pool).prepare(&sql).await.map_err(|e| {
                    DbError::Config(format!(
                        "profile.reauth_column does not match the table: {e}"
                    ))
                })?;
                stmt.columns()[0].type_info().name() == "BOOL"
            }
            None => true,
        };
        if let Some(col) = &self.names.mirror_url {
            let sql = format!("SELECT t.{col} FROM {} AS t LIMIT 0", self.names.table);
            (&self.pool).prepare(&sql).await.map_err(|e| {
                DbError::Config(format!(
                    "profile.mirror_url_column does not match the table: {e}"
                ))
            })?;
        }
        Ok((id_type, id_is_int, reauth_is_bool))
    }

    pub async fn ping(&self) -> Result<(), DbError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn check_profile(&self) -> Result<(), DbError> {
        self.column_types().await.map(|_| ())
    }

    pub async fn migrate(&self) -> Result<Vec<i64>, DbError> {
        let mut tx = self.pool.begin().await?;
        // Replicas starting together: one migrates, the others wait and find it done.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('avatar_warden_migrate'))")
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)"
        ))
        .execute(&mut *tx)
        .await?;
        let done: Vec<i64> = sqlx::query_scalar(&format!("SELECT version FROM {MIGRATIONS_TABLE}"))
            .fetch_all(&mut *tx)
            .await?;
        let mut applied = Vec::new();
        for m in migrate::POSTGRES
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
                "INSERT INTO {MIGRATIONS_TABLE} (version, name, applied_at) VALUES ($1, $2, $3)"
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

    fn due_query(&self, with_cursor: bool, selection: &Selection) -> String {
        let (due_or, and) = selection.sql(Dialect::Postgres {
            id_type: &self.id_type,
        });
        // Parameters: [$1 cursor], now, now, limit.
        let (cursor, base) = if with_cursor {
            (format!("p.id > CAST($1 AS {}) AND ", self.id_type), 2)
        } else {
            (String::new(), 1)
        };
        format!(
            "SELECT CAST(p.id AS TEXT) AS id, CAST(p.avatar AS TEXT) AS avatar, s.user_id IS NOT NULL AS has_state \
             FROM {source} AS p LEFT JOIN {STATE_TABLE} AS s ON s.user_id = CAST(p.id AS TEXT) \
             WHERE {cursor}p.avatar IS NOT NULL AND TRIM(CAST(p.avatar AS TEXT)) <> '' \
             AND (s.user_id IS NULL OR s.source_url <> CAST(p.avatar AS TEXT) OR s.next_check_at <= ${n1}{due_or}) \
             AND (s.lease_expires_at IS NULL OR s.lease_expires_at <= ${n2}){and} \
             ORDER BY p.id LIMIT ${n3}",
            source = self.names.source(),
            n1 = base,
            n2 = base + 1,
            n3 = base + 2,
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
        if let Some(after) = c.after {
            q = q.bind(after.to_string());
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
                has_state: row.try_get("has_state")?,
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
        let (new_ids, new_urls): (Vec<String>, Vec<String>) = candidates
            .iter()
            .filter(|c| !c.has_state)
            .map(|c| (c.user_id.to_string(), c.avatar_url.clone()))
            .unzip();
        if !new_ids.is_empty() {
            sqlx::query(&format!(
                "INSERT INTO {STATE_TABLE} (user_id, source_url, status, reason, checked_at, next_check_at) \
                 SELECT u, url, 'pending', 'not_checked_yet', 0, $3 FROM UNNEST($1::text[], $2::text[]) AS t(u, url) \
                 ON CONFLICT (user_id) DO NOTHING"
            ))
            .bind(&new_ids)
            .bind(&new_urls)
            .bind(c.now)
            .execute(&mut *tx)
            .await?;
        }
        // Rows another worker is claiming right now are skipped, not waited for.
        let locked = lock_rows(&mut tx, &ids, " FOR UPDATE SKIP LOCKED").await?;
        let claimed = select_claims(c.now, candidates, locked, c.selection.force);
        let claimed_ids: Vec<String> = claimed.iter().map(|d| d.user_id.to_string()).collect();
        if !claimed_ids.is_empty() {
            sqlx::query(&format!(
                "UPDATE {STATE_TABLE} SET lease_token = $1, lease_expires_at = $2 WHERE user_id = ANY($3)"
            ))
            .bind(c.token)
            .bind(c.lease_until)
            .bind(&claimed_ids)
            .execute(&mut *tx)
            .await?;
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
        let ids: Vec<String> = records.iter().map(|r| r.user_id.to_string()).collect();
        // Locked until commit: a lease cannot be taken over between this check and the writes.
        let owned: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT user_id FROM {STATE_TABLE} WHERE lease_token = $1 AND user_id = ANY($2) FOR UPDATE"
        ))
        .bind(token)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let owned: std::collections::HashSet<String> = owned.into_iter().collect();
        let mine: Vec<&AvatarRecord> = records
            .iter()
            .filter(|r| owned.contains(&r.user_id.to_string()))
            .collect();
        if !mine.is_empty() {
            self.upsert_state(&mine).execute(&mut *tx).await?;
            if let Some(sql) = self.write_back_sql() {
                sqlx::query(&sql)
                    .bind(
                        mine.iter()
                            .map(|r| r.user_id.to_string())
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        mine.iter()
                            .map(|r| r.mirror_url.clone())
                            .collect::<Vec<_>>(),
                    )
                    .bind(mine.iter().map(|r| r.reauth_required).collect::<Vec<_>>())
                    .execute(&mut *tx)
                    .await?;
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

    /// One `INSERT ... SELECT FROM UNNEST(...)` upsert for the whole batch.
    fn upsert_state<'q>(
        &self,
        records: &[&AvatarRecord],
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let col = |f: fn(&AvatarRecord) -> Option<String>| {
            records.iter().map(|r| f(r)).collect::<Vec<_>>()
        };
        let num =
            |f: fn(&AvatarRecord) -> Option<i64>| records.iter().map(|r| f(r)).collect::<Vec<_>>();
        sqlx::query(UPSERT_SQL.as_str())
            .bind(col(|r| Some(r.user_id.to_string())))
            .bind(col(|r| Some(r.source_url.clone())))
            .bind(col(|r| Some(r.status.to_string())))
            .bind(col(|r| Some(r.reason.as_str().to_string())))
            .bind(col(|r| r.reason_detail.clone()))
            .bind(col(|r| r.mirror_url.clone()))
            .bind(col(|r| r.object_key.clone()))
            .bind(col(|r| r.sha256.clone()))
            .bind(num(|r| r.size_bytes))
            .bind(num(|r| r.width))
            .bind(num(|r| r.height))
            .bind(col(|r| r.format.clone()))
            .bind(
                records
                    .iter()
                    .map(|r| r.reauth_required)
                    .collect::<Vec<_>>(),
            )
            .bind(num(|r| Some(r.attempts)))
            .bind(num(|r| Some(r.expiry_signals)))
            .bind(num(|r| Some(r.checked_at)))
            .bind(num(|r| r.next_check_at))
            .bind(col(|r| r.validators.etag.clone()))
            .bind(col(|r| r.validators.last_modified.clone()))
            .bind(num(|r| r.validators.length))
    }

    fn write_back_sql(&self) -> Option<String> {
        let n = &self.names;
        if n.mirror_url.is_none() && n.reauth.is_none() {
            return None;
        }
        let mut sets = Vec::new();
        if let Some(col) = &n.mirror_url {
            sets.push(format!("{col} = v.mirror"));
        }
        if let Some(col) = &n.reauth {
            if self.reauth_is_bool {
                sets.push(format!("{col} = v.reauth"));
            } else {
                sets.push(format!("{col} = CASE WHEN v.reauth THEN 1 ELSE 0 END"));
            }
        }
        Some(format!(
            "UPDATE {table} AS p SET {sets} FROM UNNEST($1::text[], $2::text[], $3::bool[]) AS v(id, mirror, reauth) \
             WHERE p.{id} = CAST(v.id AS {id_type})",
            table = n.table,
            sets = sets.join(", "),
            id = n.id,
            id_type = self.id_type,
        ))
    }

    super::state_statements!(
        "$1",
        "$1",
        "$2",
        "$1",
        "$1, $2, $3, $4, $5, $6, $7, $8",
        super::dollar_list
    );
    super::outbox::outbox_statements!(
        sqlx::Postgres,
        super::outbox::numbered,
        "INSERT INTO",
        "ON CONFLICT (event_id, sink) DO NOTHING"
    );

    pub async fn status_counts(&self, now: i64) -> Result<StatusCounts, DbError> {
        let counts: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT status, COUNT(*) FROM {STATE_TABLE} GROUP BY status ORDER BY status"
        ))
        .fetch_all(&self.pool)
        .await?;
        let (reauth_required, due_now): (i64, i64) = sqlx::query_as(&format!(
            "SELECT COUNT(*) FILTER (WHERE reauth_required), COUNT(*) FILTER (WHERE next_check_at <= $1) FROM {STATE_TABLE}"
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
    conn: &mut sqlx::PgConnection,
    ids: &[String],
    lock: &str,
) -> Result<Vec<Locked>, DbError> {
    let rows = sqlx::query(&format!(
        "SELECT {LOCK_COLUMNS} FROM {STATE_TABLE} WHERE user_id = ANY($1){lock}"
    ))
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(locked_from_row).collect()
}

super::row_readers!(PgRow);
