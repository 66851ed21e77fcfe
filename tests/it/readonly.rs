//! Commands that only read (`status`, `export`, `gc --dry-run`,
//! `verify-store`) never create or migrate tables: they work as a
//! SELECT-only database role, and on an un-migrated database they say to run
//! `migrate` and exit 1 (#18).

use crate::cli::{run, stderr, stdout};
use crate::helpers::{Backend, TestApp};
use avatar_warden::demo::OriginOptions;

const READ_ONLY: &[&[&str]] = &[
    &["status", "--json"],
    &["export", "--format", "jsonl"],
    &["gc", "--dry-run"],
    &["verify-store"],
];

fn every_read_only_command_succeeds(app: &TestApp, how: &str) {
    for args in READ_ONLY {
        let out = run(app, args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?} {how}: {}{}",
            stdout(&out),
            stderr(&out)
        );
    }
}

/// How many of the worker's tables exist, asked as the owner.
async fn worker_tables(app: &TestApp) -> i64 {
    let sql = match app.backend {
        Backend::Sqlite => {
            "SELECT CAST(COUNT(*) AS TEXT) FROM sqlite_master WHERE name LIKE 'avatar\\_warden%' ESCAPE '\\'"
        }
        Backend::Postgres => {
            "SELECT CAST(COUNT(*) AS TEXT) FROM information_schema.tables WHERE table_schema = current_schema() AND table_name LIKE 'avatar\\_warden%'"
        }
        Backend::MySql => {
            "SELECT CAST(COUNT(*) AS CHAR) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name LIKE 'avatar\\_warden%'"
        }
    };
    app.text(sql).await.unwrap().parse().unwrap()
}

async fn unmigrated_database_is_named_and_left_alone(backend: Backend) {
    let Some(app) = TestApp::empty_on(backend, OriginOptions::default()).await else {
        return;
    };
    app.seed_sample_users().await;
    for args in READ_ONLY {
        let out = run(&app, args);
        let err = stderr(&out);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {err}{}",
            stdout(&out)
        );
        assert!(
            err.contains("run `avatar-warden migrate`"),
            "{args:?}: {err}"
        );
        assert!(
            err.contains("[1, 2, 3, 4, 5, 6, 7, 8, 9]"),
            "{args:?} names the missing migrations: {err}"
        );
    }
    assert_eq!(
        worker_tables(&app).await,
        0,
        "a read-only command created tables"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_read_only_commands_on_an_unmigrated_database_say_to_migrate() {
    unmigrated_database_is_named_and_left_alone(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_read_only_commands_on_an_unmigrated_database_say_to_migrate() {
    unmigrated_database_is_named_and_left_alone(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_read_only_commands_on_an_unmigrated_database_say_to_migrate() {
    unmigrated_database_is_named_and_left_alone(Backend::MySql).await;
}

/// A role that can read every table of the test database and write none.
/// Returns the statements that make it, its URL and those that drop it.
fn reader_role(app: &TestApp) -> (Vec<String>, String, Vec<String>) {
    let role = format!("aw_reader_{:08x}", rand::random::<u32>());
    let (prefix, db) = app.db_url.rsplit_once('/').unwrap();
    let (scheme, rest) = prefix.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let url = format!("{scheme}://{role}@{host}/{db}");
    match app.backend {
        Backend::Postgres => (
            vec![
                format!("CREATE ROLE {role} LOGIN"),
                format!("GRANT CONNECT ON DATABASE {db} TO {role}"),
                format!("GRANT USAGE ON SCHEMA public TO {role}"),
                format!("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"),
                // PostgreSQL 15 no longer lets every role create in `public`;
                // say so for older servers too.
                format!("REVOKE CREATE ON SCHEMA public FROM {role}, PUBLIC"),
            ],
            url,
            vec![format!("DROP OWNED BY {role}"), format!("DROP ROLE {role}")],
        ),
        Backend::MySql => (
            vec![
                format!("CREATE USER '{role}'@'%'"),
                format!("GRANT SELECT ON {db}.* TO '{role}'@'%'"),
            ],
            url,
            vec![format!("DROP USER '{role}'@'%'")],
        ),
        Backend::Sqlite => unreachable!("SQLite has no roles: see the read-only file test"),
    }
}

async fn select_only_role_runs_every_read_only_command(backend: Backend) {
    let Some(mut app) = TestApp::spawn_on(backend).await else {
        return;
    };
    let report = app.scan().await;
    assert!(report.processed > 0);
    let owner_export = stdout(&run(&app, &["export", "--format", "jsonl"]));
    assert!(owner_export.lines().count() > 0);
    let (grants, url, drop) = reader_role(&app);
    app.sql(&grants.iter().map(String::as_str).collect::<Vec<_>>())
        .await;

    // The role really cannot write: the tests below would prove nothing otherwise.
    let reader = sqlx::AnyPool::connect(&url).await.unwrap();
    let denied = sqlx::query("CREATE TABLE avatar_warden_probe (a INT)")
        .execute(&reader)
        .await;
    assert!(denied.is_err(), "the reader role may create tables");
    reader.close().await;

    app.set("PROFILE__URL", &url);
    every_read_only_command_succeeds(&app, "as a SELECT-only role");
    let export = stdout(&run(&app, &["export", "--format", "jsonl"]));
    assert_eq!(export, owner_export);
    // A writing command fails as this role: it needs to write, and says so.
    let out = run(&app, &["migrate"]);
    assert_ne!(out.status.code(), Some(0), "{}", stdout(&out));

    app.sql(&drop.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_select_only_role_runs_status_export_gc_dry_run_and_verify_store() {
    select_only_role_runs_every_read_only_command(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_select_only_role_runs_status_export_gc_dry_run_and_verify_store() {
    select_only_role_runs_every_read_only_command(Backend::MySql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_read_only_file_runs_status_export_gc_dry_run_and_verify_store() {
    let mut app = TestApp::spawn().await;
    app.scan().await;
    let path = app.dir.path().join("profiles.db");
    let url = format!("sqlite://{}?mode=ro", path.display());
    app.set("PROFILE__URL", &url);
    every_read_only_command_succeeds(&app, "on a read-only SQLite file");
}
