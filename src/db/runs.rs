//! What reports and `gc` ask of the state tables: runs, counts, the backlog,
//! export pages, and which objects rows still point at.

use async_trait::async_trait;

use super::columns::{RUNS_TABLE, STATE_TABLE, record, state_names};
use super::dialect::{Args, Dialect};
use super::driver::{Driver, Row};
use super::store::Store;
use super::{Backlog, DbError, RunRecord, Selection, StatusCounts};
use crate::model::{AvatarRecord, UserId};

/// Object keys asked about in one `gc` statement.
const KEYS_PER_STATEMENT: usize = 500;

#[async_trait]
pub(super) trait RunStore: Send + Sync {
    async fn export_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AvatarRecord>, DbError>;
    async fn status_counts(&self, now: i64) -> Result<StatusCounts, DbError>;
    /// The backlog in the walk's window after `after`, and where it ended
    /// (`None`: at the table's end).
    async fn count_due_in(
        &self,
        after: Option<&UserId>,
        now: i64,
    ) -> Result<(Backlog, Option<UserId>), DbError>;
    async fn record_run(&self, run: &RunRecord) -> Result<(), DbError>;
    async fn last_run(&self) -> Result<Option<RunRecord>, DbError>;
    async fn last_completed_at(&self) -> Result<Option<i64>, DbError>;
    async fn referenced_keys(&self, keys: &[String]) -> Result<Vec<String>, DbError>;
    async fn forget_objects(&self, keys: &[String]) -> Result<u64, DbError>;
    async fn missing_users(&self, ids: &[String]) -> Result<Vec<String>, DbError>;
}

impl<D: Dialect> Store<D> {
    /// Runs `sql` for each chunk of `keys` (`IN (…)` filled in).
    async fn per_key_chunk(
        &self,
        keys: &[String],
        sql: impl Fn(&str) -> String,
    ) -> Result<Vec<Row<D>>, DbError> {
        let mut rows = Vec::new();
        for chunk in keys.chunks(KEYS_PER_STATEMENT) {
            let sql = sql(&D::params().list(chunk.len()));
            let args = Self::args(chunk.iter().map(|k| k.as_str().into()))?;
            rows.extend(self.fetch(&sql, args).await?);
        }
        Ok(rows)
    }
}

#[async_trait]
impl<D: Dialect> RunStore for Store<D> {
    async fn export_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AvatarRecord>, DbError> {
        let mut p = D::params();
        let sql = format!(
            "SELECT {} FROM {STATE_TABLE} WHERE user_id > {} ORDER BY user_id LIMIT {}",
            state_names(),
            p.one(),
            p.one()
        );
        let args = Self::args([
            after.unwrap_or("").into(),
            crate::model::saturating_i64(limit).into(),
        ])?;
        let rows = self.fetch(&sql, args).await?;
        rows.iter().map(record::<D::Db>).collect()
    }

    async fn status_counts(&self, now: i64) -> Result<StatusCounts, DbError> {
        let sql = format!(
            "SELECT status, COUNT(*) AS n FROM {STATE_TABLE} GROUP BY status ORDER BY status"
        );
        let mut counts = Vec::new();
        for row in self.fetch(&sql, Args::<D>::default()).await? {
            counts.push((
                D::Db::required_text(&row, "status")?,
                D::Db::required_int(&row, "n")?,
            ));
        }
        let sql = format!(
            "SELECT COUNT(CASE WHEN reauth_required THEN 1 END) AS flagged, \
             COUNT(CASE WHEN next_check_at <= {} THEN 1 END) AS due FROM {STATE_TABLE}",
            D::params().one()
        );
        let rows = self.fetch(&sql, Self::args([now.into()])?).await?;
        let row = rows.first().ok_or(sqlx::Error::RowNotFound)?;
        Ok(StatusCounts {
            counts,
            reauth_required: D::Db::required_int(row, "flagged")?,
            due_now: D::Db::required_int(row, "due")?,
        })
    }

    async fn count_due_in(
        &self,
        after: Option<&UserId>,
        now: i64,
    ) -> Result<(Backlog, Option<UserId>), DbError> {
        let end = self.window_end(after).await?;
        let mut p = D::params();
        // The oldest due re-check comes from the rows this walk reads anyway:
        // an index on next_check_at for it cost an entry per settle (#19).
        let sql = format!(
            "SELECT COUNT(*) AS n, MIN(CASE WHEN s.next_check_at <= {} THEN s.next_check_at END) AS oldest {}",
            p.one(),
            self.due_from(
                after.is_some(),
                end.is_some(),
                &Selection::default(),
                &mut p
            )
        );
        let mut args = Args::<D>::default();
        D::Db::bind(&mut args, now.into())?;
        Self::bind_range(&mut args, after, end.as_ref())?;
        for v in [now, now] {
            D::Db::bind(&mut args, v.into())?;
        }
        let rows = self.fetch(&sql, args).await?;
        let row = rows.first().ok_or(sqlx::Error::RowNotFound)?;
        let backlog = Backlog {
            due: D::Db::required_int(row, "n")?,
            oldest_due_at: D::Db::int(row, "oldest")?,
        };
        Ok((backlog, end))
    }

    async fn record_run(&self, run: &RunRecord) -> Result<(), DbError> {
        let sql = format!(
            "INSERT INTO {RUNS_TABLE} (started_at, finished_at, result, processed, failing, flagged, worker, error) VALUES {}",
            D::params().rows(1, 8)
        );
        let args = Self::args([
            run.started_at.into(),
            run.finished_at.into(),
            run.result.as_str().into(),
            run.processed.into(),
            run.failing.into(),
            run.flagged.into(),
            run.worker.as_str().into(),
            run.error.clone().into(),
        ])?;
        self.execute(&sql, args).await?;
        Ok(())
    }

    async fn last_run(&self) -> Result<Option<RunRecord>, DbError> {
        let sql = format!(
            "SELECT started_at, finished_at, result, processed, failing, flagged, worker, error \
             FROM {RUNS_TABLE} ORDER BY finished_at DESC LIMIT 1"
        );
        let rows = self.fetch(&sql, Args::<D>::default()).await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let int = |col| D::Db::required_int(row, col);
        Ok(Some(RunRecord {
            started_at: int("started_at")?,
            finished_at: int("finished_at")?,
            result: D::Db::required_text(row, "result")?,
            processed: int("processed")?,
            failing: int("failing")?,
            flagged: int("flagged")?,
            worker: D::Db::required_text(row, "worker")?,
            error: D::Db::text(row, "error")?,
        }))
    }

    async fn last_completed_at(&self) -> Result<Option<i64>, DbError> {
        let sql = format!(
            "SELECT MAX(finished_at) AS finished_at FROM {RUNS_TABLE} WHERE result = 'completed'"
        );
        let rows = self.fetch(&sql, Args::<D>::default()).await?;
        match rows.first() {
            Some(row) => Ok(D::Db::int(row, "finished_at")?),
            None => Ok(None),
        }
    }

    async fn referenced_keys(&self, keys: &[String]) -> Result<Vec<String>, DbError> {
        let rows = self
            .per_key_chunk(keys, |list| {
                format!(
                    "SELECT DISTINCT object_key FROM {STATE_TABLE} WHERE object_key IN ({list})"
                )
            })
            .await?;
        rows.iter()
            .map(|row| Ok(D::Db::required_text(row, "object_key")?))
            .collect()
    }

    /// Avatars pointing at `keys` (objects that are gone) forget their
    /// picture and are due now: the next scan downloads and stores it again.
    async fn forget_objects(&self, keys: &[String]) -> Result<u64, DbError> {
        let mut changed = 0;
        for chunk in keys.chunks(KEYS_PER_STATEMENT) {
            let sql = format!(
                "UPDATE {STATE_TABLE} SET sha256 = NULL, source_etag = NULL, source_last_modified = NULL, \
                 source_length = NULL, next_check_at = 0 WHERE object_key IN ({})",
                D::params().list(chunk.len())
            );
            changed += self
                .execute(&sql, Self::args(chunk.iter().map(|k| k.as_str().into()))?)
                .await?;
        }
        Ok(changed)
    }

    /// Which of `ids` the profile table (as filtered) has no row for.
    async fn missing_users(&self, ids: &[String]) -> Result<Vec<String>, DbError> {
        let d = &self.dialect;
        let literals: Vec<String> = ids.iter().filter_map(|id| d.id_literal(id)).collect();
        let mut found = std::collections::HashSet::new();
        if !literals.is_empty() {
            let sql = format!(
                "SELECT {} AS id FROM {} AS p WHERE p.id IN ({})",
                d.cast_text("p.id"),
                self.names.source(),
                literals.join(", ")
            );
            for row in self.fetch(&sql, Args::<D>::default()).await? {
                found.insert(D::Db::required_text(&row, "id")?);
            }
        }
        // An integer column finds "007" as 7.
        let present = |id: &String| {
            found.contains(id.as_str())
                || id
                    .parse::<i64>()
                    .is_ok_and(|i| found.contains(&i.to_string()))
        };
        Ok(ids.iter().filter(|id| !present(id)).cloned().collect())
    }
}
