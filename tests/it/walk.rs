//! The keyset walk over a large profile table: each statement reads a bounded
//! window of rows, so a tick's statements stay short however large the table
//! is, and the walk still finds every due avatar and no other (#19).

use crate::helpers::{Backend, TestApp};

/// `id` as text in this backend's SQL (MySQL has no `CAST … AS TEXT`).
fn id_text(backend: Backend) -> &'static str {
    match backend {
        Backend::MySql => "CAST(id AS CHAR)",
        _ => "CAST(id AS TEXT)",
    }
}

/// A state row for every profile row: checked, URL unchanged, not due for
/// decades (what a settled table looks like between ticks).
fn settled_state(backend: Backend) -> String {
    format!(
        "INSERT INTO avatar_warden_avatars (user_id, source_url, status, reason, checked_at, next_check_at) \
         SELECT {}, avatar_url, 'expired', 'not_found', 1700000000, 4000000000 FROM users",
        id_text(backend)
    )
}

/// Before: the walk's page query ran on until it found a page of due rows
/// or the table's end, in one statement. On a table where nothing is due
/// that statement read every row, so a tick's cost was one statement as long
/// as the table: at 10M rows on SQLite it passed the 30 s statement timeout
/// and every scan failed (`--scenario idle`). The due count behind
/// `due_backlog` did the same. 1M rows and a 1 s timeout reproduce it here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_over_a_large_settled_table_runs_only_short_statements() {
    const USERS: i64 = 1_000_000;
    let mut app = TestApp::empty().await;
    let base = app.origin.url("/status/404/u");
    app.sql(&[
        "CREATE TABLE users (id BIGINT PRIMARY KEY, avatar_url TEXT, avatar_mirror_url TEXT, \
         avatar_reauth_required INTEGER NOT NULL DEFAULT 0)",
        &format!(
            "WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < {USERS}) \
             INSERT INTO users (id, avatar_url) SELECT i, '{base}' || i FROM seq"
        ),
    ])
    .await;
    drop(app.deps().await); // creates the worker's tables
    app.sql(&[
        &settled_state(Backend::Sqlite),
        // Two avatars are due: one changed in the middle, one scheduled at the end.
        &format!(
            "UPDATE users SET avatar_url = '{base}changed' WHERE id = {}",
            USERS / 2
        ),
        &format!("UPDATE avatar_warden_avatars SET next_check_at = 0 WHERE user_id = '{USERS}'"),
        "ANALYZE",
    ])
    .await;
    app.set("PROFILE__STATEMENT_TIMEOUT_SECS", "1");
    let report = app.scan().await;
    assert_eq!(report.processed, 2, "{report:?}");
    // The status command's due count walks the table too, in windows; it
    // agrees with a count straight from the state table (every URL is
    // unchanged now, so due means scheduled).
    let at = 4_000_000_001_i64;
    let db = app.settings().profile.connect().await.unwrap();
    let expected = app
        .text(&format!(
            "SELECT CAST(COUNT(*) AS TEXT) FROM avatar_warden_avatars WHERE next_check_at <= {at}"
        ))
        .await
        .unwrap();
    assert_eq!(
        db.status(at).await.unwrap().due_backlog.to_string(),
        expected
    );
    assert!(expected.parse::<i64>().unwrap() >= USERS - 2);
}

/// The window's edges on every backend: due rows at the first and last id,
/// on both sides of each window boundary, a run of due rows longer than a
/// page inside one window, and a changed URL; nothing else is claimed.
async fn the_windowed_walk_claims_every_due_avatar_and_no_other(backend: Backend) {
    const USERS: i64 = 25_000;
    let Some(mut app) = TestApp::numbered_users(backend, USERS, "/status/404/").await else {
        return;
    };
    let window = avatar_warden::db::WALK_WINDOW as i64;
    let mut due: Vec<i64> = vec![
        1,
        window - 1,
        window,
        window + 1,
        2 * window,
        2 * window + 1,
        USERS,
    ];
    due.extend(12_001..=12_130); // 130 due in a row, pages of 50
    // A run that ends on a window's last row (2 × window is due above): a
    // page may end exactly there, and the next must still start a new window.
    due.extend(2 * window - 49..2 * window);
    let ids = due
        .iter()
        .map(|i| format!("'{i}'"))
        .collect::<Vec<_>>()
        .join(", ");
    app.sql(&[
        &settled_state(backend),
        &format!("UPDATE avatar_warden_avatars SET next_check_at = 0 WHERE user_id IN ({ids})"),
        &format!(
            "UPDATE users SET avatar_url = '{}' WHERE id = 17000",
            app.origin.url("/status/404/changed")
        ),
    ])
    .await;
    app.set("SCAN__BATCH_SIZE", "50");
    let report = app.scan().await;
    assert_eq!(report.processed as usize, due.len() + 1, "{report:?}");
    let mut checked: Vec<i64> = app
        .states()
        .await
        .iter()
        .filter(|r| r.checked_at > 1_700_000_000)
        .map(|r| r.user_id.to_string().parse().unwrap())
        .collect();
    checked.sort_unstable();
    due.push(17_000);
    due.sort_unstable();
    assert_eq!(checked, due);
    // The due count agrees with the walk: everything is settled again.
    let db = app.settings().profile.connect().await.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert_eq!(db.status(now).await.unwrap().due_backlog, 0);
}

crate::on_every_backend!(the_windowed_walk_claims_every_due_avatar_and_no_other);
