//! The worker's own migrations, embedded in the binary. They are tracked in
//! `avatar_warden_migrations`, not sqlx's `_sqlx_migrations`, because the
//! profile database usually belongs to an application with migrations of its own.

pub(super) const MIGRATIONS_TABLE: &str = "avatar_warden_migrations";

#[derive(Debug, Clone, Copy)]
pub(super) struct Migration {
    pub(super) version: i64,
    pub(super) name: &'static str,
    pub(super) sql: &'static str,
}

pub(super) const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "avatar_state",
        sql: include_str!("../../migrations/sqlite/0001_avatar_state.sql"),
    },
    Migration {
        version: 2,
        name: "runs",
        sql: include_str!("../../migrations/sqlite/0002_runs.sql"),
    },
    Migration {
        version: 3,
        name: "outbox",
        sql: include_str!("../../migrations/sqlite/0003_outbox.sql"),
    },
    Migration {
        version: 4,
        name: "source_validators",
        sql: include_str!("../../migrations/sqlite/0004_source_validators.sql"),
    },
    Migration {
        version: 5,
        name: "long_source_urls",
        sql: include_str!("../../migrations/sqlite/0005_long_source_urls.sql"),
    },
    Migration {
        version: 6,
        name: "run_errors",
        sql: include_str!("../../migrations/sqlite/0006_run_errors.sql"),
    },
    Migration {
        version: 7,
        name: "meta",
        sql: include_str!("../../migrations/sqlite/0007_meta.sql"),
    },
    Migration {
        version: 8,
        name: "lease_index_partial",
        sql: include_str!("../../migrations/sqlite/0008_lease_index_partial.sql"),
    },
    Migration {
        version: 9,
        name: "hot_updates",
        sql: include_str!("../../migrations/sqlite/0009_hot_updates.sql"),
    },
];

pub(super) const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "avatar_state",
        sql: include_str!("../../migrations/postgres/0001_avatar_state.sql"),
    },
    Migration {
        version: 2,
        name: "runs",
        sql: include_str!("../../migrations/postgres/0002_runs.sql"),
    },
    Migration {
        version: 3,
        name: "outbox",
        sql: include_str!("../../migrations/postgres/0003_outbox.sql"),
    },
    Migration {
        version: 4,
        name: "source_validators",
        sql: include_str!("../../migrations/postgres/0004_source_validators.sql"),
    },
    Migration {
        version: 5,
        name: "long_source_urls",
        sql: include_str!("../../migrations/postgres/0005_long_source_urls.sql"),
    },
    Migration {
        version: 6,
        name: "run_errors",
        sql: include_str!("../../migrations/postgres/0006_run_errors.sql"),
    },
    Migration {
        version: 7,
        name: "meta",
        sql: include_str!("../../migrations/postgres/0007_meta.sql"),
    },
    Migration {
        version: 8,
        name: "lease_index_partial",
        sql: include_str!("../../migrations/postgres/0008_lease_index_partial.sql"),
    },
    Migration {
        version: 9,
        name: "hot_updates",
        sql: include_str!("../../migrations/postgres/0009_hot_updates.sql"),
    },
];

pub(super) const MYSQL: &[Migration] = &[
    Migration {
        version: 1,
        name: "avatar_state",
        sql: include_str!("../../migrations/mysql/0001_avatar_state.sql"),
    },
    Migration {
        version: 2,
        name: "runs",
        sql: include_str!("../../migrations/mysql/0002_runs.sql"),
    },
    Migration {
        version: 3,
        name: "outbox",
        sql: include_str!("../../migrations/mysql/0003_outbox.sql"),
    },
    Migration {
        version: 4,
        name: "source_validators",
        sql: include_str!("../../migrations/mysql/0004_source_validators.sql"),
    },
    Migration {
        version: 5,
        name: "long_source_urls",
        sql: include_str!("../../migrations/mysql/0005_long_source_urls.sql"),
    },
    Migration {
        version: 6,
        name: "run_errors",
        sql: include_str!("../../migrations/mysql/0006_run_errors.sql"),
    },
    Migration {
        version: 7,
        name: "meta",
        sql: include_str!("../../migrations/mysql/0007_meta.sql"),
    },
    Migration {
        version: 8,
        name: "lease_index_partial",
        sql: include_str!("../../migrations/mysql/0008_lease_index_partial.sql"),
    },
    Migration {
        version: 9,
        name: "hot_updates",
        sql: include_str!("../../migrations/mysql/0009_hot_updates.sql"),
    },
];

/// Splits a migration file into statements. Comments go first, so a `;` in
/// one cannot cut a statement (our files keep `;` and `--` out of literals).
pub(super) fn statements(sql: &str) -> Vec<String> {
    let code: String = sql
        .lines()
        .map(|l| l.split_once("--").map_or(l, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n");
    code.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_and_split_into_statements() {
        for set in [SQLITE, POSTGRES, MYSQL] {
            for (i, m) in set.iter().enumerate() {
                assert_eq!(m.version, crate::model::saturating_i64(i) + 1);
            }
        }
        assert_eq!(SQLITE.len(), POSTGRES.len());
        assert_eq!(SQLITE.len(), MYSQL.len());
        let stmts = statements(SQLITE[0].sql);
        assert_eq!(stmts.len(), 4);
        assert!(stmts[0].contains("CREATE TABLE IF NOT EXISTS avatar_warden_avatars"));
    }

    #[test]
    fn a_semicolon_in_a_comment_does_not_split_a_statement() {
        let sql = "-- Why: the old index; it was full.\nDROP INDEX IF EXISTS a;\n\
                   CREATE INDEX b ON t (c); -- trailing; note\n";
        let stmts = statements(sql);
        assert_eq!(stmts, ["DROP INDEX IF EXISTS a", "CREATE INDEX b ON t (c)"]);
    }

    #[test]
    fn every_embedded_statement_starts_with_a_sql_keyword() {
        for m in SQLITE.iter().chain(POSTGRES).chain(MYSQL) {
            for stmt in statements(m.sql) {
                let first = stmt.split_whitespace().next().unwrap_or("");
                assert!(
                    [
                        "CREATE", "ALTER", "DROP", "INSERT", "UPDATE", "DELETE", "SELECT"
                    ]
                    .contains(&first),
                    "migration {} {}: statement starts with {first:?}: {stmt}",
                    m.version,
                    m.name
                );
            }
        }
    }
}
