//! Moving CDNs and late write-back (#18): a write-back column enabled after
//! a first run, or a new `storage.public_base_url`, is applied to existing
//! rows by the next scan — without fetching anything — on every backend.

use crate::helpers::{Backend, TestApp};

async fn count_any(app: &TestApp, sql: &str) -> i64 {
    // SQLite and PostgreSQL spell the cast to text differently from MySQL.
    let cast = match app.backend {
        Backend::MySql => format!("SELECT CAST(({sql}) AS CHAR)"),
        _ => format!("SELECT CAST(({sql}) AS TEXT)"),
    };
    app.text(&cast).await.unwrap().parse().unwrap()
}

async fn columns_enabled_after_a_first_run_are_filled_in(backend: Backend) {
    let Some(mut app) = TestApp::spawn_on(backend).await else {
        return;
    };
    app.set("PROFILE__MIRROR_URL_COLUMN", "");
    app.set("PROFILE__REAUTH_COLUMN", "");
    let first = app.scan().await;
    assert!(first.count(avatar_warden::db::Status::Expired) > 0);
    assert_eq!(
        count_any(
            &app,
            "SELECT COUNT(*) FROM users WHERE avatar_mirror_url IS NOT NULL"
        )
        .await,
        0
    );
    let hits = app.origin.total_hits();

    // The operator enables both columns: the next scan finds nothing due,
    // fetches nothing, and fills them in for every checked user.
    app.set("PROFILE__MIRROR_URL_COLUMN", "avatar_mirror_url");
    app.set("PROFILE__REAUTH_COLUMN", "avatar_reauth_required");
    let second = app.scan().await;
    assert_eq!(second.processed, 0);
    assert_eq!(app.origin.total_hits(), hits, "nothing was fetched");
    let states = app.states().await;
    let checked = states
        .iter()
        .filter(|r| r.status != avatar_warden::db::Status::Pending)
        .count() as u64;
    // Users with a mirror or a flag get them written; the failing one
    // already shows what its record means (no mirror, not flagged).
    let to_write = states
        .iter()
        .filter(|r| r.mirror_url.is_some() || r.reauth_required)
        .count() as u64;
    assert!(to_write > 0 && to_write < checked, "{states:?}");
    assert_eq!(second.rewritten, to_write, "{second:?}");
    for r in &states {
        let id: i64 = r.user_id.to_string().parse().unwrap();
        let (mirror, flag) = app.profile(id).await;
        assert_eq!(mirror, r.mirror_url, "user {id}");
        assert_eq!(flag, r.reauth_required, "user {id}");
    }

    // Done once: the next scan rewrites nothing.
    let third = app.scan().await;
    assert_eq!(third.rewritten, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_columns_enabled_after_a_first_run_are_filled_in() {
    columns_enabled_after_a_first_run_are_filled_in(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_columns_enabled_after_a_first_run_are_filled_in() {
    columns_enabled_after_a_first_run_are_filled_in(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_columns_enabled_after_a_first_run_are_filled_in() {
    columns_enabled_after_a_first_run_are_filled_in(Backend::MySql).await;
}

async fn a_new_cdn_domain_rewrites_mirror_urls_and_tells_the_sinks(backend: Backend) {
    let Some(mut app) = TestApp::spawn_on(backend).await else {
        return;
    };
    app.set("STORAGE__PUBLIC_BASE_URL", "https://cdn-a.example/");
    app.config_toml(
        "[[sink]]\nkind = \"webhook\"\nname = \"hook\"\nurl = \"http://127.0.0.1:9/hook\"\nsecret = \"s\"\n",
    );
    app.scan().await;
    let events = |kind: &'static str| {
        format!("SELECT COUNT(*) FROM avatar_warden_outbox WHERE kind = '{kind}'")
    };
    let mirrored_before = count_any(&app, &events("avatar.mirrored")).await;
    let expired_before = count_any(&app, &events("avatar.expired")).await;
    assert!(mirrored_before > 0);
    let hits = app.origin.total_hits();

    app.set("STORAGE__PUBLIC_BASE_URL", "https://cdn-b.example/");
    let report = app.scan().await;
    assert_eq!(report.processed, 0);
    assert_eq!(app.origin.total_hits(), hits, "nothing was fetched");
    let states = app.states().await;
    let mirrors: Vec<_> = states.iter().filter_map(|r| r.mirror_url.clone()).collect();
    assert!(!mirrors.is_empty());
    for url in &mirrors {
        assert!(url.starts_with("https://cdn-b.example/avatars/"), "{url}");
    }
    for r in &states {
        let id: i64 = r.user_id.to_string().parse().unwrap();
        assert_eq!(app.profile(id).await.0, r.mirror_url, "user {id}");
    }
    assert_eq!(report.rewritten, mirrors.len() as u64);
    // The app sees a new avatar URL for each mirrored user: one event each,
    // carrying it; nothing for users whose visible value did not change.
    assert_eq!(
        count_any(&app, &events("avatar.mirrored")).await - mirrored_before,
        mirrors.len() as i64
    );
    assert_eq!(
        count_any(&app, &events("avatar.expired")).await,
        expired_before
    );
    assert_eq!(
        count_any(
            &app,
            "SELECT COUNT(*) FROM avatar_warden_outbox WHERE kind = 'avatar.mirrored' AND payload LIKE '%cdn-b.example%'"
        )
        .await,
        mirrors.len() as i64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_new_cdn_domain_rewrites_mirror_urls_and_tells_the_sinks() {
    a_new_cdn_domain_rewrites_mirror_urls_and_tells_the_sinks(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_new_cdn_domain_rewrites_mirror_urls_and_tells_the_sinks() {
    a_new_cdn_domain_rewrites_mirror_urls_and_tells_the_sinks(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_a_new_cdn_domain_rewrites_mirror_urls_and_tells_the_sinks() {
    a_new_cdn_domain_rewrites_mirror_urls_and_tells_the_sinks(Backend::MySql).await;
}

/// A new CDN domain over more mirrored rows than one statement carries:
/// every row is rewritten, across the statement boundaries, and nothing is
/// fetched. Before, each row was its own `UPDATE` (10M rows: over 16 minutes).
async fn a_new_cdn_domain_rewrites_many_rows_in_batches(backend: Backend) {
    const USERS: i64 = 2_500;
    let Some(mut app) = TestApp::numbered_users(backend, USERS, "/valid/").await else {
        return;
    };
    let (id, key) = match backend {
        Backend::MySql => (
            "CAST(id AS CHAR)",
            "CONCAT('avatars/ab/cd/k', CAST(id AS CHAR), '.jpg')",
        ),
        _ => (
            "CAST(id AS TEXT)",
            "'avatars/ab/cd/k' || CAST(id AS TEXT) || '.jpg'",
        ),
    };
    let old_url = match backend {
        Backend::MySql => format!("CONCAT('https://cdn-a.example/', {key})"),
        _ => format!("'https://cdn-a.example/' || {key}"),
    };
    app.sql(&[
        &format!(
            "INSERT INTO avatar_warden_avatars (user_id, source_url, status, reason, checked_at, \
             next_check_at, mirror_url, object_key) \
             SELECT {id}, avatar_url, 'mirrored', 'unchanged', 1700000000, 4000000000, {old_url}, {key} \
             FROM users"
        ),
        &format!("UPDATE users SET avatar_mirror_url = {old_url}"),
    ])
    .await;
    // The fingerprint of cdn-a is recorded first, as after a real first run.
    app.set("STORAGE__PUBLIC_BASE_URL", "https://cdn-a.example/");
    assert_eq!(app.scan().await.rewritten, 0);

    app.set("STORAGE__PUBLIC_BASE_URL", "https://cdn-b.example/");
    let report = app.scan().await;
    assert_eq!(report.rewritten, USERS as u64, "{report:?}");
    assert_eq!(report.processed, 0);
    assert_eq!(app.origin.total_hits(), 0, "nothing was fetched");
    let states = app.states().await;
    assert_eq!(states.len(), USERS as usize);
    for r in &states {
        let id = r.user_id.to_string();
        assert_eq!(
            r.mirror_url.as_deref(),
            Some(format!("https://cdn-b.example/avatars/ab/cd/k{id}.jpg").as_str())
        );
    }
    for id in [1, 1000, 1001, 2000, 2001, USERS] {
        let want = format!("https://cdn-b.example/avatars/ab/cd/k{id}.jpg");
        assert_eq!(app.profile(id).await.0, Some(want), "user {id}");
    }
}

crate::on_every_backend!(a_new_cdn_domain_rewrites_many_rows_in_batches);
