//! The user's profile table as configured: validated, quoted names, and
//! the derived table the due query reads.

use super::DbError;
use super::ident::{Quote, quote};
use crate::config::ProfileSettings;

/// Validated, quoted names of the user's table and columns.
#[derive(Debug, Clone)]
pub struct ProfileNames {
    pub table: String,
    pub id: String,
    pub avatar: String,
    pub mirror_url: Option<String>,
    pub reauth: Option<String>,
    /// Operator-supplied SQL condition on the profile table, in parentheses.
    pub filter: Option<String>,
}

impl ProfileNames {
    pub(super) fn new(s: &ProfileSettings, q: Quote) -> Result<Self, DbError> {
        let col = |what: &str, name: &str| quote(what, name, false, q);
        let filter = match s.filter.as_deref() {
            None => None,
            Some(f) if f.contains(';') => {
                return Err(DbError::Config(
                    "profile.filter must be a single SQL condition (no ';')".into(),
                ));
            }
            Some(f) => Some(format!("({f})")),
        };
        Ok(ProfileNames {
            table: quote("profile.table", &s.table, true, q)?,
            id: col("profile.id_column", &s.id_column)?,
            avatar: col("profile.avatar_column", &s.avatar_column)?,
            mirror_url: s
                .mirror_url_column
                .as_deref()
                .map(|c| col("profile.mirror_url_column", c))
                .transpose()?,
            reauth: s
                .reauth_column
                .as_deref()
                .map(|c| col("profile.reauth_column", c))
                .transpose()?,
            filter,
        })
    }

    /// The profile table reduced to `id` and `avatar` (and the filter), as a
    /// derived table: the filter's column names cannot collide with ours.
    pub(super) fn source(&self) -> String {
        // Qualified names: SQLite reads an unknown "double-quoted" name as a
        // string literal, which would turn a typo into a URL for every row.
        format!(
            "(SELECT t.{id} AS id, t.{avatar} AS avatar FROM {table} AS t{filter})",
            id = self.id,
            avatar = self.avatar,
            table = self.table,
            filter = self
                .filter
                .as_ref()
                .map(|f| format!(" WHERE {f}"))
                .unwrap_or_default()
        )
    }
}

impl ProfileNames {
    /// `SET` assignments of the configured write-back columns, from the
    /// values `mirror` and `reauth`; `target` qualifies the columns (`p.` or "").
    pub(super) fn write_back_sets(&self, target: &str, mirror: &str, reauth: &str) -> String {
        let mut sets = Vec::new();
        if let Some(col) = &self.mirror_url {
            sets.push(format!("{target}{col} = {mirror}"));
        }
        if let Some(col) = &self.reauth {
            sets.push(format!("{target}{col} = {reauth}"));
        }
        sets.join(", ")
    }
}
