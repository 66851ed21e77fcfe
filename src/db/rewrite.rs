//! Late write-back: the statements that make the profile table's write-back
//! columns (and the state's mirror URLs) agree with the recorded state again
//! after the settings they derive from changed — a new CDN domain, a column
//! enabled after a first run — without fetching anything.

use std::collections::HashMap;

use async_trait::async_trait;

use super::dialect::{Args, Dialect, ROWS_PER_STATEMENT};
use super::driver::{Driver, Value};
use super::outbox::OutboxRow;
use super::store::Store;
use super::{DbError, STATE_TABLE};
use crate::model::{AvatarRecord, UserId};

pub(super) const META_TABLE: &str = "avatar_warden_meta";

/// What the profile table holds in the write-back columns of one user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WrittenBack {
    pub mirror_url: Option<String>,
    /// `None`: NULL, or no re-auth column configured.
    pub reauth_required: Option<bool>,
}

/// One page of corrections, written in one transaction.
#[derive(Debug, Default)]
pub struct Rewrite {
    /// State rows whose mirror URL changes (the object key stays).
    pub mirror_urls: Vec<(UserId, String)>,
    /// Users whose write-back columns are written from their record.
    pub write_back: Vec<AvatarRecord>,
    /// Sink deliveries for what the app sees change.
    pub outbox: Vec<OutboxRow>,
}

#[async_trait]
pub(super) trait RewriteStore: Send + Sync {
    async fn meta(&self, name: &str) -> Result<Option<String>, DbError>;
    async fn set_meta(&self, name: &str, value: &str) -> Result<(), DbError>;
    async fn written_back(&self, ids: &[UserId]) -> Result<HashMap<String, WrittenBack>, DbError>;
    async fn rewrite(&self, page: &Rewrite) -> Result<(), DbError>;
}

/// A flag as the profile table spells it, read through a text cast:
/// `true`/`t`/`1` (PostgreSQL booleans, integers 0/1 elsewhere).
fn parse_flag(text: Option<&str>) -> Option<bool> {
    match text?.trim().to_ascii_lowercase().as_str() {
        "true" | "t" | "1" => Some(true),
        "false" | "f" | "0" => Some(false),
        _ => None,
    }
}

#[async_trait]
impl<D: Dialect> RewriteStore for Store<D> {
    async fn meta(&self, name: &str) -> Result<Option<String>, DbError> {
        let sql = format!(
            "SELECT value FROM {META_TABLE} WHERE name = {}",
            D::params().one()
        );
        let rows = self.fetch(&sql, Self::args([name.into()])?).await?;
        match rows.first() {
            Some(row) => Ok(D::Db::text(row, "value")?),
            None => Ok(None),
        }
    }

    async fn set_meta(&self, name: &str, value: &str) -> Result<(), DbError> {
        let sql = format!(
            "INSERT INTO {META_TABLE} (name, value) VALUES {} {}",
            D::params().rows(1, 2),
            self.dialect.update_existing("name", &["value"])
        );
        self.execute(&sql, Self::args([name.into(), value.into()])?)
            .await?;
        Ok(())
    }

    async fn written_back(&self, ids: &[UserId]) -> Result<HashMap<String, WrittenBack>, DbError> {
        let d = &self.dialect;
        let n = &self.names;
        let mirror = n
            .mirror_url
            .as_ref()
            .map_or("NULL".to_string(), |c| d.cast_text(&format!("p.{c}")));
        let reauth = n
            .reauth
            .as_ref()
            .map_or("NULL".to_string(), |c| d.cast_text(&format!("p.{c}")));
        let mut out = HashMap::new();
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let literals: Vec<String> = chunk
                .iter()
                .filter_map(|id| d.id_literal(&id.to_string()))
                .collect();
            if literals.is_empty() {
                continue;
            }
            let sql = format!(
                "SELECT {id} AS id, {mirror} AS mirror, {reauth} AS reauth FROM {table} AS p WHERE p.{col} IN ({list})",
                id = d.cast_text(&format!("p.{}", n.id)),
                table = n.table,
                col = n.id,
                list = literals.join(", "),
            );
            for row in self.fetch(&sql, Args::<D>::default()).await? {
                out.insert(
                    D::Db::required_text(&row, "id")?,
                    WrittenBack {
                        mirror_url: D::Db::text(&row, "mirror")?,
                        reauth_required: parse_flag(D::Db::text(&row, "reauth")?.as_deref()),
                    },
                );
            }
        }
        Ok(out)
    }

    async fn rewrite(&self, page: &Rewrite) -> Result<(), DbError> {
        let mut tx = self.begin_write().await?;
        // One statement per chunk, not per row: a new CDN domain rewrites
        // every mirrored row, and 10M single-row updates took over 16 minutes.
        for chunk in page.mirror_urls.chunks(ROWS_PER_STATEMENT) {
            let mut p = D::params();
            let mut cases = String::new();
            for _ in chunk {
                let (id, url) = (p.one(), p.one());
                cases.push_str(&format!(" WHEN {id} THEN {url}"));
            }
            let sql = format!(
                "UPDATE {STATE_TABLE} SET mirror_url = CASE user_id{cases} END WHERE user_id IN ({})",
                p.list(chunk.len())
            );
            let pairs = chunk
                .iter()
                .flat_map(|(user, url)| [Value::from(user.to_string()), Value::from(url.as_str())]);
            let ids = chunk.iter().map(|(user, _)| Value::from(user.to_string()));
            D::Db::execute(&mut tx, &sql, Self::args(pairs.chain(ids))?).await?;
        }
        let records: Vec<&AvatarRecord> = page.write_back.iter().collect();
        self.write_back(&mut tx, &records).await?;
        let outbox: Vec<&OutboxRow> = page.outbox.iter().collect();
        self.insert_outbox(&mut tx, &outbox).await?;
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::parse_flag;

    #[test]
    fn flags_read_as_each_backend_spells_them() {
        for t in ["true", "t", "1", " TRUE "] {
            assert_eq!(parse_flag(Some(t)), Some(true), "{t}");
        }
        for f in ["false", "f", "0"] {
            assert_eq!(parse_flag(Some(f)), Some(false), "{f}");
        }
        assert_eq!(parse_flag(None), None);
        assert_eq!(parse_flag(Some("maybe")), None);
    }
}
