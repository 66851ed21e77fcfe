//! The worker's statements, written once for every backend: claim a page,
//! record a batch, leases, runs, export, `gc`'s questions, the outbox and
//! migrations. A backend contributes its `Dialect` (spelling) and a pool.

use std::collections::HashMap;

use async_trait::async_trait;
use sqlx::Pool;

use super::claim::{
    Candidate, Claim, ClaimedPage, Locked, Selection, WALK_WINDOW, WalkCursor, WindowEnd,
    select_claims, unclaimed,
};
use super::columns::{Assign, LOCK_COLUMNS, SETTLE_LEASE, STATE_TABLE, locked};
use super::dialect::{Args, Dialect, ROWS_PER_STATEMENT, bind_id};
use super::driver::{Driver, Params, Row, Value};
use super::migrate::MIGRATIONS_TABLE;
use super::outbox::OutboxRow;
use super::outbox::OutboxStore;
use super::profile::ProfileNames;
use super::rewrite::RewriteStore;
use super::runs::RunStore;
use super::{DbError, Recorded};
use crate::model::{AvatarRecord, UserId};

/// The state tables' operations, whatever the backend: a scan's own
/// (here), the outbox's (`outbox`) and those of reports and `gc` (`runs`).
pub(super) trait StateStore: ScanStore + OutboxStore + RunStore + RewriteStore {}

impl<T: ScanStore + OutboxStore + RunStore + RewriteStore> StateStore for T {}

#[async_trait]
pub(super) trait ScanStore: Send + Sync {
    async fn ping(&self) -> Result<(), DbError>;
    async fn check_profile(&self) -> Result<(), DbError>;
    async fn migrate(&self) -> Result<Vec<i64>, DbError>;
    /// The migrations this binary has that the database lacks, read without writing.
    async fn pending_migrations(&self) -> Result<Vec<i64>, DbError>;
    async fn claim_page(&self, claim: &Claim<'_>) -> Result<ClaimedPage, DbError>;
    async fn record_batch(
        &self,
        records: &[AvatarRecord],
        outbox: &[OutboxRow],
        token: &str,
    ) -> Result<Recorded, DbError>;
    /// Extends the leases `token` holds on `ids` (found by primary key).
    async fn renew(&self, token: &str, until: i64, ids: &[String]) -> Result<u64, DbError>;
    /// Clears the leases `token` holds on `ids`.
    async fn release(&self, token: &str, ids: &[String]) -> Result<u64, DbError>;
}

/// One backend: its pool, the configured profile names and its dialect.
pub(super) struct Store<D: Dialect> {
    pub(super) pool: Pool<D::Db>,
    pub(super) names: ProfileNames,
    pub(super) dialect: D,
}

pub(super) type Tx<D> = sqlx::Transaction<'static, <D as Dialect>::Db>;

impl<D: Dialect> Store<D> {
    pub(super) async fn begin_write(&self) -> Result<Tx<D>, DbError> {
        Ok(match D::BEGIN_WRITE {
            Some(begin) => self.pool.begin_with(begin).await?,
            None => self.pool.begin().await?,
        })
    }

    /// Runs one statement on a pooled connection.
    pub(super) async fn execute<'q>(
        &self,
        sql: &'q str,
        args: Args<'q, D>,
    ) -> Result<u64, DbError> {
        let mut conn = self.pool.acquire().await?;
        let done = D::Db::execute(&mut conn, sql, args).await?;
        Ok(D::rows_affected(&done))
    }

    pub(super) async fn fetch<'q>(
        &self,
        sql: &'q str,
        args: Args<'q, D>,
    ) -> Result<Vec<Row<D>>, DbError> {
        let mut conn = self.pool.acquire().await?;
        Ok(D::Db::fetch_all(&mut conn, sql, args).await?)
    }

    pub(super) fn args<'q>(
        values: impl IntoIterator<Item = Value>,
    ) -> Result<Args<'q, D>, DbError> {
        let mut args = Args::<D>::default();
        for v in values {
            D::Db::bind(&mut args, v)?;
        }
        Ok(args)
    }

    /// The due avatars' FROM and WHERE (parameters: [cursor], [window end],
    /// now, now). Due: never checked, URL changed since the last check, or
    /// its time has come, and not leased by a worker right now.
    pub(super) fn due_from(
        &self,
        with_cursor: bool,
        with_end: bool,
        selection: &Selection,
        p: &mut Params,
    ) -> String {
        let d = &self.dialect;
        let mut range = String::new();
        if with_cursor {
            range += &format!("p.id > {} AND ", d.id_param(p.one()));
        }
        if with_end {
            range += &format!("p.id <= {} AND ", d.id_param(p.one()));
        }
        let (due_or, and) = selection.sql(d);
        let avatar = d.compare_text("p.avatar");
        format!(
            "FROM {source} AS p LEFT JOIN {STATE_TABLE} AS s ON s.user_id = {id} \
             WHERE {range}p.avatar IS NOT NULL AND TRIM({avatar}) <> '' \
             AND (s.user_id IS NULL OR s.source_url <> {avatar} OR s.next_check_at <= {now}{due_or}) \
             AND (s.lease_expires_at IS NULL OR s.lease_expires_at <= {now2}){and}",
            source = self.names.source(),
            id = d.cast_text("p.id"),
            now = p.one(),
            now2 = p.one(),
        )
    }

    /// Where the walk's next window ends: the `WALK_WINDOW`-th profile row
    /// after `after`, or `None` when fewer remain (the window runs to the end).
    /// Bounding each statement by rows read, not by rows found, keeps a tick
    /// over a table where little is due from being one statement as long as
    /// the table.
    pub(super) async fn window_end(
        &self,
        after: Option<&UserId>,
    ) -> Result<Option<UserId>, DbError> {
        let d = &self.dialect;
        let mut p = D::params();
        let cursor = match after {
            Some(_) => format!(" WHERE p.id > {}", d.id_param(p.one())),
            None => String::new(),
        };
        let sql = format!(
            "SELECT {id} AS id FROM {source} AS p{cursor} ORDER BY p.id LIMIT 1 OFFSET {skip}",
            id = d.select_text("p.id"),
            source = self.names.source(),
            skip = WALK_WINDOW - 1,
        );
        let mut args = Args::<D>::default();
        if let Some(after) = after {
            bind_id::<D::Db>(&mut args, after)?;
        }
        let rows = self.fetch(&sql, args).await?;
        Ok(rows.first().map(|row| d.user_id(row)).transpose()?)
    }

    /// Binds the walk's range: the cursor, then the window's end.
    pub(super) fn bind_range(
        args: &mut Args<'_, D>,
        after: Option<&UserId>,
        end: Option<&UserId>,
    ) -> Result<(), DbError> {
        for id in [after, end].into_iter().flatten() {
            bind_id::<D::Db>(args, id)?;
        }
        Ok(())
    }

    async fn candidates(
        &self,
        c: &Claim<'_>,
        end: Option<&UserId>,
    ) -> Result<Vec<Candidate>, DbError> {
        let d = &self.dialect;
        let mut p = D::params();
        let after = c.after.map(|cursor| &cursor.after);
        let from = self.due_from(after.is_some(), end.is_some(), c.selection, &mut p);
        let sql = format!(
            "SELECT {id} AS id, {avatar} AS avatar, {has_state} AS has_state {from} ORDER BY p.id LIMIT {limit}",
            id = d.select_text("p.id"),
            avatar = d.select_text("p.avatar"),
            has_state = d.has_state(),
            limit = p.one(),
        );
        let mut args = Args::<D>::default();
        Self::bind_range(&mut args, after, end)?;
        for v in [c.now, c.now, crate::model::saturating_i64(c.limit)] {
            D::Db::bind(&mut args, v.into())?;
        }
        let rows = self.fetch(&sql, args).await?;
        rows.iter()
            .map(|row| {
                Ok(Candidate {
                    user_id: d.user_id(row)?,
                    avatar_url: D::Db::required_text(row, "avatar")?,
                    has_state: D::Db::flag(row, "has_state")?,
                })
            })
            .collect()
    }

    /// The state rows of `ids`, locked with `lock` ("" where the transaction is the lock).
    async fn lock_rows(
        conn: &mut <D::Db as sqlx::Database>::Connection,
        ids: &[String],
        lock: &str,
    ) -> Result<Vec<Locked>, DbError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "SELECT {LOCK_COLUMNS} FROM {STATE_TABLE} WHERE user_id IN ({}){lock}",
                D::params().list(chunk.len())
            );
            let args = Self::args(chunk.iter().map(|id| id.as_str().into()))?;
            for row in D::Db::fetch_all(conn, &sql, args).await? {
                out.push(locked::<D::Db>(&row)?);
            }
        }
        Ok(out)
    }

    /// State rows for never-checked candidates, so they can be locked and leased.
    async fn insert_pending(
        tx: &mut Tx<D>,
        d: &D,
        new: &[&Candidate],
        now: i64,
    ) -> Result<(), DbError> {
        for chunk in new.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO {STATE_TABLE} (user_id, source_url, status, reason, checked_at, next_check_at) VALUES {} {}",
                D::params().rows(chunk.len(), 6),
                d.skip_existing("user_id"),
            );
            let mut args = Args::<D>::default();
            for cand in chunk {
                for v in [
                    Value::from(cand.user_id.to_string()),
                    cand.avatar_url.clone().into(),
                    "pending".into(),
                    "not_checked_yet".into(),
                    0.into(),
                    now.into(),
                ] {
                    D::Db::bind(&mut args, v)?;
                }
            }
            D::Db::execute(tx, &sql, args).await?;
        }
        Ok(())
    }

    /// Which of `ids` are still leased to `token`, locked until commit: a
    /// lease cannot be taken over between this check and the writes.
    /// The rows of `ids` this worker still holds, with their stored
    /// `STABLE_INDEXED` values (status, object key).
    async fn owned(
        tx: &mut Tx<D>,
        ids: &[String],
        token: &str,
    ) -> Result<HashMap<String, (String, Option<String>)>, DbError> {
        let mut owned = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let mut p = D::params();
            let sql = format!(
                // The lease is a filter, not an index condition: PostgreSQL
                // chose the lease index (its statistics see few leases) and
                // tested every leased row against the whole id list. The
                // primary key finds the ids: half its CPU in a first scan
                // (BENCHMARKS.md, #19).
                "SELECT user_id, status, object_key FROM {STATE_TABLE} WHERE COALESCE(lease_token, '') = {} AND user_id IN ({}){}",
                p.one(),
                p.list(chunk.len()),
                D::WRITE_LOCK,
            );
            let args = Self::args(
                std::iter::once(token.into()).chain(chunk.iter().map(|id| id.as_str().into())),
            )?;
            for row in D::Db::fetch_all(tx, &sql, args).await? {
                owned.insert(
                    D::Db::required_text(&row, "user_id")?,
                    (
                        D::Db::required_text(&row, "status")?,
                        D::Db::text(&row, "object_key")?,
                    ),
                );
            }
        }
        Ok(owned)
    }

    /// Writes the configured columns of the user's table.
    pub(super) async fn write_back(
        &self,
        tx: &mut Tx<D>,
        records: &[&AvatarRecord],
    ) -> Result<(), DbError> {
        if self.names.mirror_url.is_none() && self.names.reauth.is_none() {
            return Ok(());
        }
        for chunk in records.chunks(ROWS_PER_STATEMENT) {
            let sql = self
                .dialect
                .write_back(&self.names, chunk.len(), &mut D::params());
            let mut args = Args::<D>::default();
            for r in chunk {
                bind_id::<D::Db>(&mut args, &r.user_id)?;
                D::Db::bind(&mut args, r.mirror_url.clone().into())?;
                D::Db::bind(&mut args, r.reauth_required.into())?;
            }
            D::Db::execute(tx, &sql, args).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl<D: Dialect> ScanStore for Store<D> {
    async fn ping(&self) -> Result<(), DbError> {
        self.fetch("SELECT 1", Args::<D>::default()).await?;
        Ok(())
    }

    async fn check_profile(&self) -> Result<(), DbError> {
        let table = format!(
            "SELECT id, avatar FROM {} AS p LIMIT 0",
            self.names.source()
        );
        let mut checks = vec![(
            "profile.table, profile.id_column, profile.avatar_column and profile.filter",
            table,
        )];
        for (key, col) in [
            ("profile.mirror_url_column", &self.names.mirror_url),
            ("profile.reauth_column", &self.names.reauth),
        ] {
            if let Some(col) = col {
                checks.push((
                    key,
                    format!("SELECT t.{col} FROM {} AS t LIMIT 0", self.names.table),
                ));
            }
        }
        for (key, sql) in checks {
            self.fetch(&sql, Args::<D>::default())
                .await
                .map_err(|e| match e {
                    DbError::Query(source) => DbError::Profile { key, source },
                    other => other,
                })?;
        }
        Ok(())
    }

    async fn migrate(&self) -> Result<Vec<i64>, DbError> {
        let mut tx = self.begin_write().await?;
        for lock in D::MIGRATE_LOCK {
            D::Db::execute(&mut tx, lock, Args::<D>::default()).await?;
        }
        let result = migrate_in::<D>(&mut tx).await;
        for unlock in D::MIGRATE_UNLOCK {
            D::Db::execute(&mut tx, unlock, Args::<D>::default()).await?;
        }
        let applied = result?;
        tx.commit().await?;
        Ok(applied)
    }

    async fn pending_migrations(&self) -> Result<Vec<i64>, DbError> {
        let sql = format!("{}'{MIGRATIONS_TABLE}'", D::COUNT_TABLES_NAMED);
        let rows = self.fetch(&sql, Args::<D>::default()).await?;
        let exists = match rows.first() {
            Some(row) => D::Db::required_int(row, "n")? > 0,
            None => false,
        };
        let applied = if exists {
            let sql = format!("SELECT version FROM {MIGRATIONS_TABLE}");
            self.fetch(&sql, Args::<D>::default())
                .await?
                .iter()
                .map(|row| D::Db::required_int(row, "version"))
                .collect::<Result<Vec<i64>, _>>()?
        } else {
            Vec::new()
        };
        Ok(D::MIGRATIONS
            .iter()
            .map(|m| m.version)
            .filter(|v| !applied.contains(v))
            .collect())
    }

    async fn claim_page(&self, c: &Claim<'_>) -> Result<ClaimedPage, DbError> {
        let after = c.after.map(|cursor| &cursor.after);
        let end = match c.after.map(|cursor| &cursor.window) {
            // A list of users is read by id, not walked: no window to bound.
            _ if !c.selection.users.is_empty() => None,
            Some(WindowEnd::At(end)) => Some(end.clone()),
            Some(WindowEnd::TableEnd) => None,
            Some(WindowEnd::Unknown) | None => self.window_end(after).await?,
        };
        let mut candidates = self.candidates(c, end.as_ref()).await?;
        // A full page may leave due rows in its window: go on after its last
        // row, in the same window. Otherwise the window is done: go on after
        // it, or stop at the end.
        let cursor = if candidates.len() >= c.limit {
            candidates.last().map(|last| WalkCursor {
                after: last.user_id.clone(),
                window: end.map_or(WindowEnd::TableEnd, WindowEnd::At),
            })
        } else {
            end.map(|end| WalkCursor {
                after: end,
                window: WindowEnd::Unknown,
            })
        };
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
            let locked = Self::lock_rows(&mut conn, &ids, "").await?;
            return Ok(ClaimedPage {
                claimed: unclaimed(candidates, locked),
                cursor,
            });
        }
        let mut tx = self.begin_write().await?;
        let new: Vec<&Candidate> = candidates.iter().filter(|c| !c.has_state).collect();
        Self::insert_pending(&mut tx, &self.dialect, &new, c.now).await?;
        let locked = Self::lock_rows(&mut tx, &ids, D::CLAIM_LOCK).await?;
        let claimed = select_claims(c.now, candidates, locked, c.selection.force);
        for chunk in claimed.chunks(ROWS_PER_STATEMENT) {
            let mut p = D::params();
            let sql = format!(
                "UPDATE {STATE_TABLE} SET lease_token = {}, lease_expires_at = {} WHERE user_id IN ({})",
                p.one(),
                p.one(),
                p.list(chunk.len())
            );
            let args = Self::args(
                [c.token.into(), c.lease_until.into()]
                    .into_iter()
                    .chain(chunk.iter().map(|d| d.user_id.to_string().into())),
            )?;
            D::Db::execute(&mut tx, &sql, args).await?;
        }
        tx.commit().await?;
        Ok(ClaimedPage { claimed, cursor })
    }

    async fn record_batch(
        &self,
        records: &[AvatarRecord],
        outbox: &[OutboxRow],
        token: &str,
    ) -> Result<Recorded, DbError> {
        let mut tx = self.begin_write().await?;
        let ids: Vec<String> = records.iter().map(|r| r.user_id.to_string()).collect();
        let owned = Self::owned(&mut tx, &ids, token).await?;
        let mine: Vec<&AvatarRecord> = records
            .iter()
            .filter(|r| owned.contains_key(&r.user_id.to_string()))
            .collect();
        // Most of a re-verification leaves status and object key as stored.
        let (same, changed): (Vec<&AvatarRecord>, Vec<&AvatarRecord>) =
            mine.iter().partition(|r| {
                D::KEEP_INDEXED
                    && owned
                        .get(&r.user_id.to_string())
                        .is_some_and(|(status, key)| {
                            status == r.status.as_str() && *key == r.object_key
                        })
            });
        for (rows, assign) in [(&same, Assign::KeepIndexed), (&changed, Assign::All)] {
            for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                let (sql, args) = self.dialect.upsert_state(chunk, assign)?;
                D::Db::execute(&mut tx, &sql, args).await?;
            }
        }
        self.write_back(&mut tx, &mine).await?;
        let deliveries: Vec<&OutboxRow> = outbox
            .iter()
            .filter(|o| owned.contains_key(&o.user_id.to_string()))
            .collect();
        self.insert_outbox(&mut tx, &deliveries).await?;
        tx.commit().await?;
        Ok(Recorded {
            written: mine.len(),
            discarded: records.len() - mine.len(),
            replaced: Vec::new(),
        })
    }

    async fn renew(&self, token: &str, until: i64, ids: &[String]) -> Result<u64, DbError> {
        let set = |p: &mut Params| format!("lease_expires_at = {}", p.one());
        self.per_held_chunk(token, ids, Some(until.into()), set)
            .await
    }

    async fn release(&self, token: &str, ids: &[String]) -> Result<u64, DbError> {
        self.per_held_chunk(token, ids, None, |_| SETTLE_LEASE.to_string())
            .await
    }
}

impl<D: Dialect> Store<D> {
    /// `UPDATE … SET {set}` on the rows of `ids` still leased to `token`, a
    /// chunk of ids per statement (found by primary key, the token a filter);
    /// `value` fills the parameter `set` takes, if any.
    async fn per_held_chunk(
        &self,
        token: &str,
        ids: &[String],
        value: Option<Value>,
        set: impl Fn(&mut Params) -> String,
    ) -> Result<u64, DbError> {
        let mut changed = 0;
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let mut p = D::params();
            let sql = format!(
                "UPDATE {STATE_TABLE} SET {} WHERE user_id IN ({}) AND lease_token = {}",
                set(&mut p),
                p.list(chunk.len()),
                p.one(),
            );
            let args = Self::args(
                value
                    .clone()
                    .into_iter()
                    .chain(chunk.iter().map(|id| id.as_str().into()))
                    .chain(std::iter::once(token.into())),
            )?;
            changed += self.execute(&sql, args).await?;
        }
        Ok(changed)
    }
}

/// Applies the migrations this database has not seen, inside the lock.
async fn migrate_in<D: Dialect>(tx: &mut Tx<D>) -> Result<Vec<i64>, DbError> {
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} ({})",
        D::MIGRATIONS_COLUMNS
    );
    D::Db::execute(tx, &sql, Args::<D>::default()).await?;
    let sql = format!("SELECT version FROM {MIGRATIONS_TABLE}");
    let done = D::Db::fetch_all(tx, &sql, Args::<D>::default())
        .await?
        .iter()
        .map(|row| D::Db::required_int(row, "version"))
        .collect::<Result<Vec<i64>, _>>()?;
    let mut applied = Vec::new();
    for m in D::MIGRATIONS.iter().filter(|m| !done.contains(&m.version)) {
        for stmt in super::migrate::statements(m.sql) {
            D::Db::execute(tx, &stmt, Args::<D>::default())
                .await
                .map_err(|source| DbError::Migration {
                    version: m.version,
                    name: m.name,
                    source,
                })?;
        }
        let sql = format!(
            "INSERT INTO {MIGRATIONS_TABLE} (version, name, applied_at) VALUES {}",
            D::params().rows(1, 3)
        );
        let mut args = Args::<D>::default();
        for v in [
            m.version.into(),
            m.name.into(),
            crate::model::unix_now().into(),
        ] {
            D::Db::bind(&mut args, v)?;
        }
        D::Db::execute(tx, &sql, args).await?;
        applied.push(m.version);
    }
    Ok(applied)
}
