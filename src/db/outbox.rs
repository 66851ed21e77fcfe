//! The outbox: sink deliveries written in the verdict's own transaction and
//! drained by the delivery loop (its statements are in `store`).

use async_trait::async_trait;

use super::dialect::{Args, Dialect};
use super::driver::{Driver, Value};
use super::store::{Store, Tx};
use super::{DbError, UserId};

pub const OUTBOX_TABLE: &str = "avatar_warden_outbox";

/// A delivery to write together with its verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// The idempotency key: the same event gets the same id on a replay.
    pub event_id: String,
    pub sink: String,
    pub kind: String,
    pub user_id: UserId,
    /// The event as JSON.
    pub payload: String,
    pub created_at: i64,
}

/// A delivery claimed by one delivery loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: i64,
    pub event_id: String,
    pub sink: String,
    pub kind: String,
    pub user_id: String,
    pub payload: String,
    /// Failed attempts so far.
    pub attempts: i64,
}

/// What a sink still has to deliver, for `status` and the backlog gauge.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct OutboxBacklog {
    pub sink: String,
    pub pending: i64,
    /// Given up on (permanent error or attempts exhausted): kept for inspection.
    pub dead: i64,
    pub oldest_pending_at: Option<i64>,
}

/// How a claimed delivery ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    Delivered,
    /// Failed, try again at `at`.
    Retry {
        at: i64,
        error: String,
    },
    /// Not attempted (the sink asked us to slow down): back in line at `at`.
    Later {
        at: i64,
    },
    /// Will never succeed, or out of attempts.
    Dead {
        error: String,
    },
}

#[async_trait]
pub(super) trait OutboxStore: Send + Sync {
    async fn claim_deliveries(
        &self,
        sink: &str,
        now: i64,
        limit: usize,
        token: &str,
        lease_until: i64,
    ) -> Result<Vec<Delivery>, DbError>;
    async fn settle_delivery(&self, id: i64, token: &str, outcome: &Settle) -> Result<(), DbError>;
    async fn outbox_backlog(&self) -> Result<Vec<OutboxBacklog>, DbError>;
}

impl<D: Dialect> Store<D> {
    /// Writes deliveries inside the verdict's transaction.
    pub(super) async fn insert_outbox(
        &self,
        tx: &mut Tx<D>,
        rows: &[&OutboxRow],
    ) -> Result<(), DbError> {
        const COLUMNS: &str = "event_id, sink, kind, user_id, payload, created_at, next_attempt_at";
        // 500 rows of 7: under every backend's limit of bound parameters.
        for chunk in rows.chunks(500) {
            let sql = format!(
                "INSERT INTO {OUTBOX_TABLE} ({COLUMNS}) VALUES {} {}",
                D::params().rows(chunk.len(), 7),
                self.dialect.skip_existing("event_id, sink"),
            );
            let mut args = Args::<D>::default();
            for r in chunk {
                for v in [
                    Value::from(r.event_id.as_str()),
                    r.sink.as_str().into(),
                    r.kind.as_str().into(),
                    r.user_id.to_string().into(),
                    r.payload.as_str().into(),
                    r.created_at.into(),
                    r.created_at.into(),
                ] {
                    D::Db::bind(&mut args, v)?;
                }
            }
            D::Db::execute(tx, &sql, args).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl<D: Dialect> OutboxStore for Store<D> {
    /// Leases up to `limit` due deliveries of `sink` to `token`: only the
    /// oldest pending one per user, so a user's events arrive in order.
    async fn claim_deliveries(
        &self,
        sink: &str,
        now: i64,
        limit: usize,
        token: &str,
        lease_until: i64,
    ) -> Result<Vec<Delivery>, DbError> {
        let mut p = D::params();
        let sql = format!(
            "SELECT o.id AS id FROM {OUTBOX_TABLE} o WHERE o.sink = {} AND o.state = 'pending' \
             AND o.next_attempt_at <= {} AND (o.lease_until IS NULL OR o.lease_until <= {}) \
             AND NOT EXISTS (SELECT 1 FROM {OUTBOX_TABLE} p WHERE p.sink = o.sink \
             AND p.user_id = o.user_id AND p.state = 'pending' AND p.id < o.id) \
             ORDER BY o.id LIMIT {limit}",
            p.one(),
            p.one(),
            p.one()
        );
        let rows = self
            .fetch(&sql, Self::args([sink.into(), now.into(), now.into()])?)
            .await?;
        let ids = rows
            .iter()
            .map(|row| D::Db::required_int(row, "id"))
            .collect::<Result<Vec<i64>, _>>()?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // Ids come from the database as integers: safe to inline.
        let list = ids
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        // Re-checked in the UPDATE: another loop may have leased some meanwhile.
        let mut p = D::params();
        let sql = format!(
            "UPDATE {OUTBOX_TABLE} SET lease_token = {}, lease_until = {} WHERE id IN ({list}) \
             AND state = 'pending' AND (lease_until IS NULL OR lease_until <= {})",
            p.one(),
            p.one(),
            p.one()
        );
        self.execute(
            &sql,
            Self::args([token.into(), lease_until.into(), now.into()])?,
        )
        .await?;
        let sql = format!(
            "SELECT id, event_id, sink, kind, user_id, payload, attempts FROM {OUTBOX_TABLE} \
             WHERE lease_token = {} AND state = 'pending' ORDER BY id",
            D::params().one()
        );
        let rows = self.fetch(&sql, Self::args([token.into()])?).await?;
        let text = |row, col| D::Db::required_text(row, col);
        rows.iter()
            .map(|row| {
                Ok(Delivery {
                    id: D::Db::required_int(row, "id")?,
                    event_id: text(row, "event_id")?,
                    sink: text(row, "sink")?,
                    kind: text(row, "kind")?,
                    user_id: text(row, "user_id")?,
                    payload: text(row, "payload")?,
                    attempts: D::Db::required_int(row, "attempts")?,
                })
            })
            .collect()
    }

    /// Settles one claimed delivery: delivered (removed), retried later, or dead.
    async fn settle_delivery(&self, id: i64, token: &str, outcome: &Settle) -> Result<(), DbError> {
        let mut p = D::params();
        let (sql, mut values) = if outcome == &Settle::Delivered {
            (
                format!(
                    "DELETE FROM {OUTBOX_TABLE} WHERE id = {} AND lease_token = {}",
                    p.one(),
                    p.one()
                ),
                Vec::new(),
            )
        } else {
            let (state, failed, at, error): (&str, i64, Option<i64>, Option<String>) = match outcome
            {
                Settle::Retry { at, error } => ("pending", 1, Some(*at), Some(error.clone())),
                Settle::Later { at } => ("pending", 0, Some(*at), None),
                Settle::Dead { error } => ("dead", 1, None, Some(error.clone())),
                Settle::Delivered => unreachable!("handled above"),
            };
            let sql = format!(
                "UPDATE {OUTBOX_TABLE} SET state = {}, attempts = attempts + {}, \
                 next_attempt_at = COALESCE({}, next_attempt_at), last_error = {}, \
                 lease_token = NULL, lease_until = NULL WHERE id = {} AND lease_token = {}",
                p.one(),
                p.one(),
                p.one(),
                p.one(),
                p.one(),
                p.one()
            );
            (
                sql,
                vec![state.into(), failed.into(), at.into(), error.into()],
            )
        };
        values.extend([id.into(), token.into()]);
        self.execute(&sql, Self::args(values)?).await?;
        Ok(())
    }

    async fn outbox_backlog(&self) -> Result<Vec<OutboxBacklog>, DbError> {
        let sql = format!(
            "SELECT sink, COUNT(CASE WHEN state = 'pending' THEN 1 END) AS pending, \
             COUNT(CASE WHEN state = 'dead' THEN 1 END) AS dead, \
             MIN(CASE WHEN state = 'pending' THEN created_at END) AS oldest \
             FROM {OUTBOX_TABLE} GROUP BY sink ORDER BY sink"
        );
        let rows = self.fetch(&sql, Args::<D>::default()).await?;
        rows.iter()
            .map(|row| {
                Ok(OutboxBacklog {
                    sink: D::Db::required_text(row, "sink")?,
                    pending: D::Db::required_int(row, "pending")?,
                    dead: D::Db::required_int(row, "dead")?,
                    oldest_pending_at: D::Db::int(row, "oldest")?,
                })
            })
            .collect()
    }
}
