//! The outbox: sink deliveries written in the verdict's own transaction and
//! drained by the delivery loop. The same SQL on every backend; only the
//! placeholders and the "insert unless present" spelling differ.

use super::UserId;

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

/// `?` placeholders as PostgreSQL's `$1, $2, …`.
pub fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push_str(&format!("${n}"));
        } else {
            out.push(c);
        }
    }
    out
}

/// Columns of an outbox insert, in bind order.
pub const INSERT_COLUMNS: &str =
    "event_id, sink, kind, user_id, payload, created_at, next_attempt_at";
pub const INSERT_ARITY: usize = 7;

/// The outbox statements for one backend: `$db` its sqlx database type,
/// `$ph` turns `?` placeholders into its own, `$insert`/`$ignore` spell
/// "insert, skipping rows already there" around the column list and values.
macro_rules! outbox_statements {
    ($db:ty, $ph:expr, $insert:literal, $ignore:literal) => {
        /// Writes deliveries inside the verdict's transaction.
        async fn insert_outbox(
            tx: &mut sqlx::Transaction<'_, $db>,
            rows: &[&super::outbox::OutboxRow],
        ) -> Result<(), super::DbError> {
            use super::outbox::{INSERT_ARITY, INSERT_COLUMNS, OUTBOX_TABLE};
            // Bound parameters per statement stay under every backend's limit.
            for chunk in rows.chunks(500) {
                let sql = $ph(&format!(
                    "{} {OUTBOX_TABLE} ({INSERT_COLUMNS}) VALUES {} {}",
                    $insert,
                    super::question_marks(chunk.len(), INSERT_ARITY),
                    $ignore
                ));
                let mut q = sqlx::query(&sql);
                for r in chunk {
                    q = q
                        .bind(&r.event_id)
                        .bind(&r.sink)
                        .bind(&r.kind)
                        .bind(r.user_id.to_string())
                        .bind(&r.payload)
                        .bind(r.created_at)
                        .bind(r.created_at);
                }
                q.execute(&mut **tx).await?;
            }
            Ok(())
        }

        /// Leases up to `limit` due deliveries of `sink` to `token`: only the
        /// oldest pending one per user, so a user's events arrive in order.
        pub async fn claim_deliveries(
            &self,
            sink: &str,
            now: i64,
            limit: usize,
            token: &str,
            lease_until: i64,
        ) -> Result<Vec<super::outbox::Delivery>, super::DbError> {
            use super::outbox::OUTBOX_TABLE;
            let sql = $ph(&format!(
                "SELECT o.id FROM {OUTBOX_TABLE} o WHERE o.sink = ? AND o.state = 'pending' \
                 AND o.next_attempt_at <= ? AND (o.lease_until IS NULL OR o.lease_until <= ?) \
                 AND NOT EXISTS (SELECT 1 FROM {OUTBOX_TABLE} p WHERE p.sink = o.sink \
                 AND p.user_id = o.user_id AND p.state = 'pending' AND p.id < o.id) \
                 ORDER BY o.id LIMIT {limit}"
            ));
            let ids: Vec<i64> = sqlx::query_scalar(&sql)
                .bind(sink)
                .bind(now)
                .bind(now)
                .fetch_all(&self.pool)
                .await?;
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            // Ids come from the database as integers: safe to inline.
            let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(", ");
            // Re-checked in the UPDATE: another loop may have leased some meanwhile.
            let sql = $ph(&format!(
                "UPDATE {OUTBOX_TABLE} SET lease_token = ?, lease_until = ? WHERE id IN ({list}) \
                 AND state = 'pending' AND (lease_until IS NULL OR lease_until <= ?)"
            ));
            sqlx::query(&sql)
                .bind(token)
                .bind(lease_until)
                .bind(now)
                .execute(&self.pool)
                .await?;
            let sql = $ph(&format!(
                "SELECT id, event_id, sink, kind, user_id, payload, attempts FROM {OUTBOX_TABLE} \
                 WHERE lease_token = ? AND state = 'pending' ORDER BY id"
            ));
            let rows = sqlx::query(&sql).bind(token).fetch_all(&self.pool).await?;
            use sqlx::Row;
            rows.iter()
                .map(|row| {
                    Ok(super::outbox::Delivery {
                        id: row.try_get("id")?,
                        event_id: text(row, "event_id")?,
                        sink: text(row, "sink")?,
                        kind: text(row, "kind")?,
                        user_id: text(row, "user_id")?,
                        payload: text(row, "payload")?,
                        attempts: row.try_get("attempts")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(Into::into)
        }

        /// Settles one claimed delivery: delivered (removed), retried later, or dead.
        pub async fn settle_delivery(
            &self,
            id: i64,
            token: &str,
            outcome: &super::outbox::Settle,
        ) -> Result<(), super::DbError> {
            use super::outbox::{OUTBOX_TABLE, Settle};
            let sql = $ph(&match outcome {
                Settle::Delivered => {
                    format!("DELETE FROM {OUTBOX_TABLE} WHERE id = ? AND lease_token = ?")
                }
                _ => format!(
                    "UPDATE {OUTBOX_TABLE} SET state = ?, attempts = attempts + ?, \
                     next_attempt_at = COALESCE(?, next_attempt_at), last_error = ?, \
                     lease_token = NULL, lease_until = NULL WHERE id = ? AND lease_token = ?"
                ),
            });
            let q = sqlx::query(&sql);
            let q = match outcome {
                Settle::Delivered => q,
                Settle::Retry { at, error } => q
                    .bind("pending")
                    .bind(1_i64)
                    .bind(Some(*at))
                    .bind(error.as_str()),
                Settle::Later { at } => q
                    .bind("pending")
                    .bind(0_i64)
                    .bind(Some(*at))
                    .bind(None::<&str>),
                Settle::Dead { error } => q
                    .bind("dead")
                    .bind(1_i64)
                    .bind(None::<i64>)
                    .bind(error.as_str()),
            };
            q.bind(id).bind(token).execute(&self.pool).await?;
            Ok(())
        }

        pub async fn outbox_backlog(
            &self,
        ) -> Result<Vec<super::outbox::OutboxBacklog>, super::DbError> {
            use super::outbox::OUTBOX_TABLE;
            let sql = format!(
                "SELECT sink, COUNT(CASE WHEN state = 'pending' THEN 1 END) AS pending, \
                 COUNT(CASE WHEN state = 'dead' THEN 1 END) AS dead, \
                 MIN(CASE WHEN state = 'pending' THEN created_at END) AS oldest \
                 FROM {OUTBOX_TABLE} GROUP BY sink ORDER BY sink"
            );
            let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
            use sqlx::Row;
            rows.iter()
                .map(|row| {
                    Ok(super::outbox::OutboxBacklog {
                        sink: text(row, "sink")?,
                        pending: row.try_get("pending")?,
                        dead: row.try_get("dead")?,
                        oldest_pending_at: row.try_get("oldest")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(Into::into)
        }
    };
}

pub(crate) use outbox_statements;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_for_postgres() {
        assert_eq!(
            numbered("UPDATE t SET a = ? WHERE id IN (1, 2) AND b = ?"),
            "UPDATE t SET a = $1 WHERE id IN (1, 2) AND b = $2"
        );
    }
}
