//! The state table's columns, once: their names, their kinds and how a
//! record binds to them and is read back. Every backend's batch writes and
//! every reader go through this table.

use super::DbError;
use super::claim::{Locked, MirrorMeta, Previous};
use super::driver::{Driver, Value};
use crate::model::{AvatarRecord, Reason, Status, UserId, Validators};

pub const STATE_TABLE: &str = "avatar_warden_avatars";
pub const RUNS_TABLE: &str = "avatar_warden_runs";

/// How a column binds (and, for PostgreSQL's arrays, its SQL type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Text,
    Int,
    Bool,
}

impl Kind {
    pub(super) fn postgres_type(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Int => "int8",
            Kind::Bool => "bool",
        }
    }
}

pub(super) struct Column {
    pub(super) name: &'static str,
    pub(super) kind: Kind,
    pub(super) value: fn(&AvatarRecord) -> Value,
}

const fn column(name: &'static str, kind: Kind, value: fn(&AvatarRecord) -> Value) -> Column {
    Column { name, kind, value }
}

/// The columns of a state row, in the order batches bind them.
pub(super) const STATE: [Column; 20] = [
    column("user_id", Kind::Text, |r| r.user_id.to_string().into()),
    column("source_url", Kind::Text, |r| r.source_url.clone().into()),
    column("status", Kind::Text, |r| r.status.as_str().into()),
    column("reason", Kind::Text, |r| r.reason.as_str().into()),
    column("reason_detail", Kind::Text, |r| {
        r.reason_detail.clone().into()
    }),
    column("mirror_url", Kind::Text, |r| r.mirror_url.clone().into()),
    column("object_key", Kind::Text, |r| r.object_key.clone().into()),
    column("sha256", Kind::Text, |r| r.sha256.clone().into()),
    column("size_bytes", Kind::Int, |r| r.size_bytes.into()),
    column("width", Kind::Int, |r| r.width.into()),
    column("height", Kind::Int, |r| r.height.into()),
    column("format", Kind::Text, |r| r.format.clone().into()),
    column("reauth_required", Kind::Bool, |r| r.reauth_required.into()),
    column("attempts", Kind::Int, |r| r.attempts.into()),
    column("expiry_signals", Kind::Int, |r| r.expiry_signals.into()),
    column("checked_at", Kind::Int, |r| r.checked_at.into()),
    column("next_check_at", Kind::Int, |r| r.next_check_at.into()),
    column("source_etag", Kind::Text, |r| {
        r.validators.etag.clone().into()
    }),
    column("source_last_modified", Kind::Text, |r| {
        r.validators.last_modified.clone().into()
    }),
    column("source_length", Kind::Int, |r| r.validators.length.into()),
];

/// Indexed state columns a re-verification leaves as they were. SQLite
/// rewrites an index entry whenever its column is assigned, even to the same
/// value, and `object_key`'s entries lie scattered over its whole index: a
/// batch assigning it dirtied one page per avatar, a cost that grew with
/// the table (BENCHMARKS.md, #19). So an update leaves these out when they
/// are unchanged.
pub(super) const STABLE_INDEXED: [&str; 2] = ["status", "object_key"];

/// Which state columns a batch upsert assigns to an existing row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Assign {
    /// Every column.
    All,
    /// All but `STABLE_INDEXED`, for rows whose stored values equal the new ones.
    KeepIndexed,
}

impl Assign {
    /// The columns an update of an existing row sets (never `user_id`).
    pub(super) fn columns(self) -> Vec<&'static str> {
        STATE[1..]
            .iter()
            .map(|c| c.name)
            .filter(|n| self == Assign::All || !STABLE_INDEXED.contains(n))
            .collect()
    }
}

/// `user_id, source_url, …`: every state column.
pub(super) fn state_names() -> String {
    STATE.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
}

/// Written with every outcome: a settled avatar holds no lease, so a worker
/// killed after writing leaves no stale token behind, and a lease renewal
/// reaches only the avatars still being checked.
pub(super) const SETTLE_LEASE: &str = "lease_token = NULL, lease_expires_at = NULL";

/// Columns read back into `Previous` when claiming.
pub(super) const LOCK_COLUMNS: &str = "user_id, source_url, status, mirror_url, object_key, sha256, size_bytes, width, height, format, source_etag, source_last_modified, source_length, attempts, expiry_signals, reauth_required, next_check_at, lease_expires_at";

fn status<Db: Driver>(row: &Db::Row) -> Result<Status, DbError> {
    let code = Db::required_text(row, "status")?;
    code.parse().map_err(|source| DbError::Data {
        column: "status",
        source,
    })
}

fn reason<Db: Driver>(row: &Db::Row) -> Result<Reason, DbError> {
    let code = Db::required_text(row, "reason")?;
    code.parse().map_err(|source| DbError::Data {
        column: "reason",
        source,
    })
}

fn validators<Db: Driver>(row: &Db::Row) -> Result<Validators, sqlx::Error> {
    Ok(Validators {
        etag: Db::text(row, "source_etag")?,
        last_modified: Db::text(row, "source_last_modified")?,
        length: Db::int(row, "source_length")?,
    })
}

fn meta<Db: Driver>(row: &Db::Row) -> Result<MirrorMeta, sqlx::Error> {
    Ok(MirrorMeta {
        size_bytes: Db::int(row, "size_bytes")?,
        width: Db::int(row, "width")?,
        height: Db::int(row, "height")?,
        format: Db::text(row, "format")?,
    })
}

/// A state row as locked while claiming (`LOCK_COLUMNS`).
pub(super) fn locked<Db: Driver>(row: &Db::Row) -> Result<Locked, DbError> {
    Ok(Locked {
        user_id: Db::required_text(row, "user_id")?,
        previous: Previous {
            source_url: Db::required_text(row, "source_url")?,
            status: status::<Db>(row)?,
            mirror_url: Db::text(row, "mirror_url")?,
            object_key: Db::text(row, "object_key")?,
            sha256: Db::text(row, "sha256")?,
            meta: meta::<Db>(row)?,
            validators: validators::<Db>(row)?,
            attempts: Db::required_int(row, "attempts")?,
            expiry_signals: Db::required_int(row, "expiry_signals")?,
            reauth_required: Db::flag(row, "reauth_required")?,
        },
        next_check_at: Db::int(row, "next_check_at")?,
        lease_expires_at: Db::int(row, "lease_expires_at")?,
    })
}

/// A whole state row (`STATE`), for `export`.
pub(super) fn record<Db: Driver>(row: &Db::Row) -> Result<AvatarRecord, DbError> {
    let meta = meta::<Db>(row)?;
    Ok(AvatarRecord {
        user_id: UserId::Text(Db::required_text(row, "user_id")?),
        source_url: Db::required_text(row, "source_url")?,
        status: status::<Db>(row)?,
        reason: reason::<Db>(row)?,
        reason_detail: Db::text(row, "reason_detail")?,
        mirror_url: Db::text(row, "mirror_url")?,
        object_key: Db::text(row, "object_key")?,
        sha256: Db::text(row, "sha256")?,
        size_bytes: meta.size_bytes,
        width: meta.width,
        height: meta.height,
        format: meta.format,
        validators: validators::<Db>(row)?,
        reauth_required: Db::flag(row, "reauth_required")?,
        attempts: Db::required_int(row, "attempts")?,
        expiry_signals: Db::required_int(row, "expiry_signals")?,
        checked_at: Db::required_int(row, "checked_at")?,
        next_check_at: Db::int(row, "next_check_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_column_table_binds_every_field_of_a_record_in_order() {
        let r = AvatarRecord::new(UserId::Int(7), "https://x/a.jpg", Reason::ValidImage, 100)
            .with_next_check(Some(200));
        let values: Vec<Value> = STATE.iter().map(|c| (c.value)(&r)).collect();
        assert_eq!(values[0], Value::from("7"));
        assert_eq!(values[2], Value::from("mirrored"));
        assert_eq!(values[3], Value::from("valid_image"));
        assert_eq!(values[15], Value::from(100));
        assert_eq!(values[16], Value::from(200));
        for (c, v) in STATE.iter().zip(&values) {
            let kind = match v {
                Value::Text(_) => Kind::Text,
                Value::Int(_) => Kind::Int,
                Value::Bool(_) => Kind::Bool,
            };
            assert_eq!(c.kind, kind, "{}", c.name);
        }
    }

    #[test]
    fn an_update_keeping_the_indexed_columns_sets_everything_else() {
        let all = Assign::All.columns();
        let kept = Assign::KeepIndexed.columns();
        assert_eq!(all.len(), STATE.len() - 1, "all but the key");
        assert!(!all.contains(&"user_id"));
        assert_eq!(kept.len(), all.len() - STABLE_INDEXED.len());
        assert!(!kept.contains(&"status") && !kept.contains(&"object_key"));
        assert!(kept.contains(&"next_check_at") && kept.contains(&"mirror_url"));
    }
}
