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
];

/// Splits a migration file into statements (our files keep `;` out of literals).
pub(super) fn statements(sql: &str) -> impl Iterator<Item = &str> {
    sql.split(';').map(str::trim).filter(|s| {
        s.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--"))
    })
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
        let stmts: Vec<_> = statements(SQLITE[0].sql).collect();
        assert_eq!(stmts.len(), 4);
        assert!(stmts[0].contains("CREATE TABLE IF NOT EXISTS avatar_warden_avatars"));
    }
}
