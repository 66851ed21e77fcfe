use avatar_warden::classify::Status;
use avatar_warden::db::{AvatarRecord, Claim, UserId};
use avatar_warden::demo::SAMPLE_USERS;

use crate::helpers::{Backend, TestApp, sha256_hex, sql_string};

async fn every_sample_user_gets_the_verdict_the_demo_promises(backend: Backend) {
    let Some(app) = TestApp::spawn_on(backend).await else {
        return;
    };
    let report = app.scan().await;
    let states = app.states().await;
    for user in SAMPLE_USERS {
        let state = states
            .iter()
            .find(|r| r.user_id == UserId::Text(user.id.to_string()));
        if user.avatar.is_none() {
            assert!(
                state.is_none(),
                "user {} has no avatar and must be skipped",
                user.id
            );
        } else {
            let state = state.unwrap_or_else(|| panic!("user {} was not recorded", user.id));
            assert_eq!(
                state.status.as_str(),
                user.expect,
                "user {} ({})",
                user.id,
                user.nickname
            );
        }
    }
    assert_eq!(report.processed, 13);
    assert_eq!(report.count(Status::Mirrored), 6);
    assert_eq!(report.count(Status::Expired), 3);
    assert_eq!(report.count(Status::Invalid), 3);
    assert_eq!(report.count(Status::Failing), 1);
}

async fn expired_wechat_avatar_flags_user_for_reauth_and_is_never_mirrored(backend: Backend) {
    let Some(app) = TestApp::spawn_on(backend).await else {
        return;
    };
    app.scan().await;
    let gao = app.state("7").await;
    assert_eq!(gao.status, Status::Expired);
    assert_eq!(gao.reason, "provider_notexist");
    assert_eq!(gao.reason_detail.as_deref(), Some("X-ErrNo: -6101"));
    assert!(gao.reauth_required);
    assert_eq!(
        gao.mirror_url, None,
        "the gray placeholder must never be mirrored"
    );
    assert_eq!(
        app.profile(7).await,
        (None, true),
        "write-back flags the user in the profile table"
    );
}

async fn valid_avatar_is_mirrored_byte_for_byte_and_written_back(backend: Backend) {
    let Some(app) = TestApp::spawn_on(backend).await else {
        return;
    };
    app.scan().await;
    let alice = app.state("1").await;
    assert_eq!(alice.status, Status::Mirrored);
    let served = app.origin.image_bytes("jpeg", "alice").unwrap();
    let sha = sha256_hex(&served);
    assert_eq!(alice.sha256.as_deref(), Some(sha.as_str()));
    assert_eq!(alice.format.as_deref(), Some("jpeg"));
    assert_eq!((alice.width, alice.height), (Some(132), Some(132)));
    let key = format!("avatars/{}/{sha}.jpg", &sha[..2]);
    let on_disk = std::fs::read(app.mirror_root().join(&key)).unwrap();
    assert_eq!(sha256_hex(&on_disk), sha);
    let (mirror, reauth) = app.profile(1).await;
    assert!(!reauth);
    let mirror = mirror.expect("mirror url written back");
    assert!(
        mirror.starts_with("file://") && mirror.ends_with(&key),
        "{mirror}"
    );
    assert_eq!(alice.mirror_url.as_deref(), Some(mirror.as_str()));
}

async fn transient_errors_never_flag_the_user(backend: Backend) {
    let Some(app) = TestApp::spawn_on(backend).await else {
        return;
    };
    app.scan().await;
    let jun = app.state("10").await;
    assert_eq!(
        (jun.status, jun.reason.as_str()),
        (Status::Failing, "server_error")
    );
    assert!(!jun.reauth_required);
    assert_eq!(jun.attempts, 1);
    assert!(
        jun.next_check_at.unwrap() > jun.checked_at,
        "failing avatars are retried later"
    );
    assert_eq!(app.profile(10).await, (None, false));
}

async fn invalid_bytes_flag_the_user_with_a_specific_reason(backend: Backend) {
    let Some(app) = TestApp::spawn_on(backend).await else {
        return;
    };
    app.scan().await;
    for (id, reason) in [
        ("11", "not_an_image"),
        ("12", "truncated"),
        ("13", "unsupported_scheme"),
    ] {
        let s = app.state(id).await;
        assert_eq!(
            (s.status, s.reason.as_str()),
            (Status::Invalid, reason),
            "user {id}"
        );
        assert!(s.reauth_required);
    }
    assert_eq!(app.state("11").await.reason_detail.as_deref(), Some("html"));
}

async fn identical_bytes_are_stored_once(backend: Backend) {
    let Some(app) = TestApp::spawn_on(backend).await else {
        return;
    };
    let report = app.scan().await;
    let dan = app.state("4").await;
    let erin = app.state("5").await;
    assert_eq!(dan.mirror_url, erin.mirror_url);
    assert_eq!(report.objects_uploaded, 5);
    assert_eq!(report.objects_deduplicated, 1);
    let files = walk(&app.mirror_root());
    assert_eq!(files.len(), 5, "{files:?}");
}

async fn a_second_scan_right_after_fetches_nothing_already_settled(backend: Backend) {
    let Some(app) = TestApp::spawn_on(backend).await else {
        return;
    };
    let first = app.scan().await;
    let hits = app.origin.total_hits();
    assert_eq!(first.processed, 13);
    assert!(
        hits >= 12,
        "the first scan fetched every http avatar: {hits}"
    );
    let second = app.scan().await;
    assert_eq!(second.processed, 0, "{second:?}");
    assert_eq!(
        app.origin.total_hits(),
        hits,
        "no request on the second scan"
    );
}

/// The backlog count, oldest due item and runs table on each backend's SQL.
async fn status_counts_the_backlog_and_remembers_the_last_run(backend: Backend) {
    let Some(app) = TestApp::spawn_on(backend).await else {
        return;
    };
    let deps = app.deps().await;
    let now = avatar_warden::app::unix_now();
    let before = deps.database().status(now).await.unwrap();
    assert_eq!((before.due_backlog, before.last_run), (13, None));
    app.scan_with(&deps).await;
    let after = deps.database().status(now).await.unwrap();
    assert_eq!(after.due_backlog, 0, "{after:?}");
    assert_eq!(after.counts.get("mirrored"), Some(&6));
    let run = after.last_run.unwrap();
    assert_eq!((run.result.as_str(), run.processed), ("completed", 13));
    app.sql(&["UPDATE avatar_warden_avatars SET next_check_at = 1000 WHERE status = 'mirrored'"])
        .await;
    let due = deps.database().status(now).await.unwrap();
    assert_eq!((due.due_backlog, due.oldest_due_at), (6, Some(1000)));
}

async fn a_changed_avatar_url_is_due_at_once_and_clears_the_flag_when_it_mirrors(backend: Backend) {
    let Some(app) = TestApp::spawn_on(backend).await else {
        return;
    };
    app.scan().await;
    assert!(app.state("7").await.reauth_required);
    let new_url = app.origin.url("/avatar/png/gao-new");
    app.sql(&[&format!(
        "UPDATE users SET avatar_url = '{new_url}' WHERE id = 7"
    )])
    .await;
    let report = app.scan().await;
    assert_eq!(report.processed, 1, "only the changed avatar is due");
    let gao = app.state("7").await;
    assert_eq!(
        (gao.status, gao.source_url.as_str()),
        (Status::Mirrored, new_url.as_str())
    );
    assert!(!gao.reauth_required);
    let (mirror, reauth) = app.profile(7).await;
    assert!(!reauth);
    assert!(mirror.unwrap().ends_with(".png"));
}

#[tokio::test]
async fn private_targets_are_blocked_by_default_and_never_contacted() {
    let mut app = TestApp::spawn().await;
    app.set("FETCH__ALLOW_PRIVATE_NETWORKS", "false");
    let report = app.scan().await;
    assert_eq!(
        app.origin.total_hits(),
        0,
        "the guard must refuse before connecting"
    );
    let alice = app.state("1").await;
    assert_eq!(
        (alice.status, alice.reason.as_str()),
        (Status::Blocked, "non_public_address")
    );
    assert_eq!(alice.reason_detail.as_deref(), Some("loopback"));
    assert!(!alice.reauth_required, "our policy is not the user's fault");
    assert_eq!(report.count(Status::Blocked), 12);
    // ftp:// is refused by the URL rules before the guard.
    assert_eq!(app.state("13").await.status, Status::Invalid);
}

#[tokio::test]
async fn a_body_over_max_bytes_is_too_large() {
    let mut app = TestApp::spawn().await;
    app.set("FETCH__MAX_BYTES", "1000");
    app.scan().await;
    let bo = app.state("2").await;
    assert_eq!(
        (bo.status, bo.reason.as_str()),
        (Status::Invalid, "too_large")
    );
}

async fn string_ids_a_custom_table_and_a_filter_are_supported(backend: Backend) {
    let Some(mut app) = TestApp::empty_on(backend, Default::default()).await else {
        return;
    };
    let ok = app.origin.url("/avatar/jpeg/u-a");
    let gone = app.origin.url("/status/410/u-b");
    let deleted = app.origin.url("/avatar/jpeg/u-e");
    let (key, boolean, f) = (
        backend.text_key(),
        backend.boolean(),
        backend.false_literal(),
    );
    app.sql(&[
        &format!(
            "CREATE TABLE members (uid {key} PRIMARY KEY, face TEXT, face_mirror TEXT, \
             must_relogin {boolean} NOT NULL DEFAULT {f}, status {key}, deleted_at BIGINT)"
        ),
        &format!(
            "INSERT INTO members (uid, face, status, deleted_at) VALUES \
             ('u-a', {}, 'active', NULL), ('u-b', {}, 'active', NULL), ('u-c', '', 'active', NULL), \
             ('u-d', NULL, 'active', NULL), ('u-e', {}, 'active', 1700000000)",
            sql_string(&ok),
            sql_string(&gone),
            sql_string(&deleted)
        ),
    ])
    .await;
    app.set("PROFILE__TABLE", "members");
    app.set("PROFILE__ID_COLUMN", "uid");
    app.set("PROFILE__AVATAR_COLUMN", "face");
    app.set("PROFILE__MIRROR_URL_COLUMN", "face_mirror");
    app.set("PROFILE__REAUTH_COLUMN", "must_relogin");
    // `status` also names a column of the worker's state table: the filter must still mean the profile's.
    app.set(
        "PROFILE__FILTER",
        "deleted_at IS NULL AND status = 'active'",
    );
    app.set("SCAN__BATCH_SIZE", "1"); // exercise keyset paging over text ids
    let report = app.scan().await;
    assert_eq!(
        report.processed, 2,
        "empty, NULL and filtered-out avatars are skipped: {report:?}"
    );
    assert_eq!(app.state("u-a").await.status, Status::Mirrored);
    let b = app.state("u-b").await;
    assert_eq!((b.status, b.reason.as_str()), (Status::Expired, "gone"));
    assert_eq!(
        app.origin.hits("/avatar/jpeg/u-e"),
        0,
        "the filter excludes deleted users"
    );
    let mirror = |uid: &str| format!("SELECT face_mirror FROM members WHERE uid = '{uid}'");
    let flag = |uid: &str| {
        format!(
            "SELECT CASE WHEN must_relogin THEN 'yes' ELSE 'no' END FROM members WHERE uid = '{uid}'"
        )
    };
    assert!(app.text(&mirror("u-a")).await.is_some());
    assert_eq!(app.text(&flag("u-a")).await.as_deref(), Some("no"));
    assert_eq!(app.text(&mirror("u-b")).await, None);
    assert_eq!(app.text(&flag("u-b")).await.as_deref(), Some("yes"));
    assert_eq!(
        app.text(&flag("u-c")).await.as_deref(),
        Some("no"),
        "rows without avatar are untouched"
    );
}

async fn replaying_a_batch_succeeds_and_changes_nothing(backend: Backend) {
    let Some(app) = TestApp::spawn_on(backend).await else {
        return;
    };
    app.scan().await;
    let before = app.states().await;
    // The worker still holds the lease, as right after a commit whose acknowledgement was lost.
    app.sql(&[
        "UPDATE avatar_warden_avatars SET lease_token = 'replay', lease_expires_at = 9999999999",
    ])
    .await;
    let db = app.settings().profile.connect().await.unwrap();
    let records: Vec<AvatarRecord> = before
        .iter()
        .map(|r| AvatarRecord {
            user_id: UserId::Int(r.user_id.to_string().parse().unwrap()),
            ..r.clone()
        })
        .collect();
    let recorded = db.record_batch(&records, &[], "replay").await.unwrap();
    assert_eq!((recorded.written, recorded.discarded), (records.len(), 0));
    // Writing settled the rows (their lease is cleared): a second replay
    // owns nothing any more, and still fails on nothing.
    let recorded = db.record_batch(&records, &[], "replay").await.unwrap();
    assert_eq!((recorded.written, recorded.discarded), (0, records.len()));
    assert_eq!(
        app.text("SELECT CAST(COUNT(*) AS VARCHAR(20)) FROM avatar_warden_avatars WHERE lease_token IS NOT NULL")
            .await
            .as_deref(),
        Some("0"),
        "settled rows hold no lease"
    );
    assert_eq!(app.states().await, before);
    assert_eq!(app.profile(7).await, (None, true));
}

async fn a_result_whose_lease_was_taken_over_is_discarded(backend: Backend) {
    let Some(app) = TestApp::spawn_on(backend).await else {
        return;
    };
    let db = app.settings().profile.connect().await.unwrap();
    db.migrate().await.unwrap();
    let now = avatar_warden::app::unix_now();
    let selection = avatar_warden::db::Selection::default();
    let claim = |token: &'static str| Claim {
        after: None,
        now,
        limit: 100,
        token,
        lease_until: now + 600,
        shard: None,
        selection: &selection,
        keep_url: None,
    };
    let page = db.claim_page(&claim("worker-a")).await.unwrap();
    assert_eq!(page.claimed.len(), 13);
    // While A holds the leases, B finds nothing to claim.
    assert!(
        db.claim_page(&claim("worker-b"))
            .await
            .unwrap()
            .claimed
            .is_empty()
    );
    // A's lease expired and C took the avatars over.
    app.sql(&["UPDATE avatar_warden_avatars SET lease_token = 'worker-c'"])
        .await;
    let records: Vec<AvatarRecord> = page
        .claimed
        .iter()
        .map(|d| {
            AvatarRecord::new(
                d.user_id.clone(),
                d.avatar_url.clone(),
                avatar_warden::classify::Reason::NotFound,
                now,
            )
        })
        .collect();
    let recorded = db.record_batch(&records, &[], "worker-a").await.unwrap();
    assert_eq!((recorded.written, recorded.discarded), (0, 13));
    assert!(
        app.states()
            .await
            .iter()
            .all(|r| r.status == Status::Pending)
    );
    assert_eq!(
        app.profile(7).await,
        (None, false),
        "no write-back from a lost lease"
    );
}

async fn concurrent_scanners_share_the_work_without_fetching_twice(backend: Backend) {
    const USERS: usize = 1500;
    let origin = avatar_warden::demo::OriginOptions {
        latency: std::time::Duration::from_millis(2),
        ..Default::default()
    };
    for workers in [2usize, 4] {
        let Some(mut app) = TestApp::empty_on(backend, origin.clone()).await else {
            return;
        };
        let rows: Vec<(i64, String)> = (1..=USERS as i64)
            .map(|i| {
                let path = if i % 10 == 0 {
                    format!("/status/404/u{i}")
                } else {
                    format!("/avatar/jpeg/u{}", i % 700)
                };
                (i, app.origin.url(&path))
            })
            .collect();
        app.users(&rows).await;
        app.set("SCAN__BATCH_SIZE", "50");
        app.set("FETCH__CONCURRENCY", "8");
        app.set("PROFILE__MAX_CONNECTIONS", "4");
        let mut scans = Vec::new();
        for _ in 0..workers {
            let deps = app.deps().await; // each worker: its own pool, writer and memory
            let opts =
                avatar_warden::app::ScanOptions::from_settings(&app.settings(), Default::default());
            scans.push(tokio::spawn(async move { deps.scan(&opts).await.unwrap() }));
        }
        let mut processed = 0;
        for s in scans {
            let report = s.await.unwrap();
            assert_eq!(report.lease_lost, 0);
            processed += report.processed;
        }
        assert_eq!(
            processed as usize, USERS,
            "{workers} workers: every avatar exactly once"
        );
        let distinct_paths = app.origin.total_hits();
        // Each user's URL was fetched once; users sharing a URL each fetched it once too.
        let mut per_url = std::collections::HashMap::<String, u64>::new();
        for i in 1..=USERS {
            let path = if i % 10 == 0 {
                format!("/status/404/u{i}")
            } else {
                format!("/avatar/jpeg/u{}", i % 700)
            };
            *per_url.entry(path).or_default() += 1;
        }
        for (path, users) in &per_url {
            assert_eq!(
                app.origin.hits(path),
                *users,
                "{workers} workers: {path} fetched once per user"
            );
        }
        assert_eq!(distinct_paths as usize, USERS);
        let states = app.states().await;
        assert_eq!(states.len(), USERS);
        assert_eq!(
            states
                .iter()
                .filter(|r| r.status == Status::Mirrored)
                .count(),
            USERS - USERS / 10
        );
        assert_eq!(
            states
                .iter()
                .filter(|r| r.status == Status::Expired)
                .count(),
            USERS / 10
        );
        // Same final state as one scanner: one object per distinct picture.
        let pictures = per_url.keys().filter(|p| p.starts_with("/avatar/")).count();
        assert_eq!(walk(&app.mirror_root()).len(), pictures);
        let leased = app
            .text("SELECT CASE WHEN COUNT(*) = 0 THEN 'none' ELSE 'some' END FROM avatar_warden_avatars WHERE lease_token IS NOT NULL")
            .await;
        assert_eq!(
            leased.as_deref(),
            Some("none"),
            "every lease is released at the end"
        );
    }
}

/// `scan --user ID` for an id the profile table does not have says so and
/// exits 1 before fetching anything, instead of reporting "0 avatars".
async fn a_user_id_that_does_not_exist_is_named(backend: Backend) {
    let Some(app) = TestApp::spawn_on(backend).await else {
        return;
    };
    let ids: Vec<String> = ["1", "007", "999", "abc"].map(String::from).to_vec();
    let missing = app
        .deps()
        .await
        .database()
        .missing_users(&ids)
        .await
        .unwrap();
    assert_eq!(
        missing,
        ["999", "abc"],
        "007 is user 7 in an integer column"
    );
    let out = crate::cli::run(&app, &["scan", "--user", "3", "--user", "999"]);
    assert_eq!(out.status.code(), Some(1), "{}", crate::cli::stderr(&out));
    assert!(
        crate::cli::stderr(&out).contains("no user with id 999 in profile.table"),
        "{}",
        crate::cli::stderr(&out)
    );
    assert_eq!(app.origin.total_hits(), 0, "nothing fetched");
    let out = crate::cli::run(&app, &["scan", "--user", "3"]);
    assert!(
        matches!(out.status.code(), Some(0 | 2)),
        "{}",
        crate::cli::stderr(&out)
    );
}

crate::on_every_backend!(
    a_user_id_that_does_not_exist_is_named,
    every_sample_user_gets_the_verdict_the_demo_promises,
    expired_wechat_avatar_flags_user_for_reauth_and_is_never_mirrored,
    valid_avatar_is_mirrored_byte_for_byte_and_written_back,
    transient_errors_never_flag_the_user,
    invalid_bytes_flag_the_user_with_a_specific_reason,
    identical_bytes_are_stored_once,
    a_second_scan_right_after_fetches_nothing_already_settled,
    status_counts_the_backlog_and_remembers_the_last_run,
    a_changed_avatar_url_is_due_at_once_and_clears_the_flag_when_it_mirrors,
    string_ids_a_custom_table_and_a_filter_are_supported,
    replaying_a_batch_succeeds_and_changes_nothing,
    a_result_whose_lease_was_taken_over_is_discarded,
    concurrent_scanners_share_the_work_without_fetching_twice,
    a_scanner_killed_mid_run_loses_and_duplicates_nothing,
    backfill_controls_select_what_a_scan_takes,
);

#[tokio::test]
async fn unknown_profile_columns_fail_at_start_with_the_column_named() {
    let mut app = TestApp::spawn().await;
    app.set("PROFILE__AVATAR_COLUMN", "avatar; DROP TABLE users");
    let err = match app.settings().profile.connect().await {
        Ok(_) => panic!("must refuse"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("profile.avatar_column"), "{err}");
}

#[tokio::test]
async fn a_misspelled_column_fails_at_start_before_any_fetch() {
    // SQLite would even read an unknown "quoted" column name as a string
    // literal and turn every avatar into junk: refuse before that can happen.
    for (key, typo, named) in [
        ("PROFILE__AVATAR_COLUMN", "avatar_urll", "avatar_urll"),
        (
            "PROFILE__MIRROR_URL_COLUMN",
            "avatar_mirorr_url",
            "profile.mirror_url_column",
        ),
        ("PROFILE__REAUTH_COLUMN", "reauth", "profile.reauth_column"),
    ] {
        let mut app = TestApp::spawn().await;
        app.set(key, typo);
        let err = match avatar_warden::app::App::build(&app.settings()).await {
            Ok(_) => panic!("{key}={typo} must be refused"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(named), "{err}");
        assert_eq!(app.origin.total_hits(), 0);
    }
}

/// The stored objects under a mirror root (partial writes in `.tmp` are not objects).
pub fn walk(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.join("avatars")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[tokio::test]
async fn a_slow_origin_and_a_closed_port_are_failing_not_flagged() {
    let slow = avatar_warden::demo::OriginOptions {
        latency: std::time::Duration::from_secs(5),
        ..Default::default()
    };
    let mut app = TestApp::with_origin(slow).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }; // dropped: nothing listens there now
    let slow_url = app.origin.url("/avatar/jpeg/slow");
    app.sql(&[
        "CREATE TABLE users (id INTEGER PRIMARY KEY, avatar_url TEXT, avatar_mirror_url TEXT, avatar_reauth_required INTEGER DEFAULT 0)",
        &format!("INSERT INTO users (id, avatar_url) VALUES (1, '{slow_url}'), (2, 'http://{closed}/a.jpg')"),
    ])
    .await;
    app.set("FETCH__TIMEOUT_SECS", "1");
    app.set("RETRY__IN_RUN", "0");
    let started = std::time::Instant::now();
    let report = app.scan().await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "one total deadline per request"
    );
    assert_eq!(report.count(Status::Failing), 2, "{report:?}");
    let slow = app.state("1").await;
    assert_eq!(slow.reason, "timeout");
    let refused = app.state("2").await;
    assert_eq!(refused.reason, "connect_error");
    assert!(!slow.reauth_required && !refused.reauth_required);
}

/// A profile table of `n` users, `distinct` pictures shared round-robin.
async fn seed_users(app: &TestApp, n: usize, distinct: usize) {
    let rows: Vec<(i64, String)> = (1..=n as i64)
        .map(|i| {
            (
                i,
                app.origin
                    .url(&format!("/avatar/jpeg/p{}", i % distinct as i64)),
            )
        })
        .collect();
    app.users(&rows).await;
}

async fn a_scanner_killed_mid_run_loses_and_duplicates_nothing(backend: Backend) {
    const USERS: usize = 300;
    const PICTURES: usize = 120;
    let origin = avatar_warden::demo::OriginOptions {
        latency: std::time::Duration::from_millis(25),
        ..Default::default()
    };
    let Some(mut app) = TestApp::empty_on(backend, origin).await else {
        return;
    };
    seed_users(&app, USERS, PICTURES).await;
    app.set("SCAN__BATCH_SIZE", "10");
    app.set("FETCH__CONCURRENCY", "4");
    app.set("FETCH__TIMEOUT_SECS", "1");
    app.set("SCAN__LEASE_SECS", "2");
    let bin = env!("CARGO_BIN_EXE_avatar-warden");
    let migrated = std::process::Command::new(bin)
        .arg("migrate")
        .envs(app.env.iter().cloned())
        .output()
        .unwrap();
    assert!(migrated.status.success());
    let mut child = std::process::Command::new(bin)
        .arg("scan")
        .envs(app.env.iter().cloned())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once some batches are written and more are in flight.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the scanner wrote nothing in time"
        );
        let written = app
            .text("SELECT CASE WHEN COUNT(*) >= 40 THEN 'yes' ELSE 'no' END FROM avatar_warden_avatars WHERE status = 'mirrored'")
            .await;
        if written.as_deref() == Some("yes") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    std::process::Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
    let unfinished = app
        .text("SELECT CASE WHEN COUNT(*) < 300 THEN 'yes' ELSE 'no' END FROM avatar_warden_avatars WHERE status = 'mirrored'")
        .await;
    assert_eq!(
        unfinished.as_deref(),
        Some("yes"),
        "the kill must land mid-run"
    );

    // Its leases expire; a restarted scanner picks everything up.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let report = app.scan().await;
    assert!(report.processed > 0);
    let states = app.states().await;
    assert_eq!(states.len(), USERS, "one state row per user");
    assert!(
        states.iter().all(|r| r.status == Status::Mirrored),
        "nothing lost"
    );
    let objects = walk(&app.mirror_root());
    assert_eq!(
        objects.len(),
        PICTURES,
        "one object per picture: {objects:?}"
    );
}

#[tokio::test]
async fn static_shards_split_the_work_without_overlap() {
    let mut app = TestApp::empty().await;
    seed_users(&app, 100, 100).await;
    app.set("SCAN__BATCH_SIZE", "7");
    let deps = app.deps().await;
    let mut total = 0;
    for i in 0..3 {
        let mut opts =
            avatar_warden::app::ScanOptions::from_settings(&app.settings(), Default::default());
        opts.shard = Some(format!("{i}/3").parse().unwrap());
        let report = deps.scan(&opts).await.unwrap();
        let expected = (1..=100).filter(|id| id % 3 == i).count() as u64;
        assert_eq!(report.processed, expected, "shard {i}/3");
        total += report.processed;
    }
    assert_eq!(total, 100);
    assert_eq!(
        app.origin.total_hits(),
        100,
        "no avatar fetched by two shards"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_table_in_another_postgres_schema() {
    let Some(mut app) = TestApp::empty_on(Backend::Postgres, Default::default()).await else {
        return;
    };
    let url = app.origin.url("/avatar/png/schema-user");
    app.sql(&[
        "CREATE SCHEMA app",
        "CREATE TABLE app.users (user_id VARCHAR(40) PRIMARY KEY, headimgurl VARCHAR(512), mirror VARCHAR(512), needs_login SMALLINT NOT NULL DEFAULT 0)",
        &format!("INSERT INTO app.users VALUES ('wx_1', {}, NULL, 0), ('wx_2', 'https://', NULL, 0)", sql_string(&url)),
    ])
    .await;
    app.set("PROFILE__TABLE", "app.users");
    app.set("PROFILE__ID_COLUMN", "user_id");
    app.set("PROFILE__AVATAR_COLUMN", "headimgurl");
    app.set("PROFILE__MIRROR_URL_COLUMN", "mirror");
    app.set("PROFILE__REAUTH_COLUMN", "needs_login");
    let report = app.scan().await;
    assert_eq!(report.count(Status::Mirrored), 1);
    assert_eq!(report.count(Status::Invalid), 1);
    assert!(
        app.text("SELECT mirror FROM app.users WHERE user_id = 'wx_1'")
            .await
            .unwrap()
            .ends_with(".png")
    );
    // A SMALLINT flag column gets 1/0, not a boolean.
    assert_eq!(
        app.text("SELECT CAST(needs_login AS TEXT) FROM app.users WHERE user_id = 'wx_2'")
            .await
            .as_deref(),
        Some("1")
    );
}

async fn backfill_controls_select_what_a_scan_takes(backend: Backend) {
    use avatar_warden::db::Selection;
    let Some(app) = TestApp::spawn_on(backend).await else {
        return;
    };
    let deps = app.deps().await;
    let run = |selection: Selection, limit: Option<u64>, provider: Option<&str>| {
        let mut opts =
            avatar_warden::app::ScanOptions::from_settings(&app.settings(), Default::default());
        opts.selection = selection;
        opts.limit = limit;
        opts.provider = provider.map(str::to_string);
        let deps = deps.clone();
        async move { deps.scan(&opts).await.unwrap() }
    };

    // --dry-run: checks, but writes nothing and stores nothing.
    let dry = run(
        Selection {
            dry_run: true,
            ..Default::default()
        },
        None,
        None,
    )
    .await;
    assert_eq!((dry.processed, dry.dry_run), (13, true));
    assert_eq!(
        dry.changes.get("new -> mirrored"),
        Some(&6),
        "{:?}",
        dry.changes
    );
    assert!(app.states().await.is_empty(), "a dry run writes no state");
    assert!(
        !app.mirror_root().join("avatars").exists(),
        "and stores no object"
    );

    // --user: only those ids (integers and strings alike).
    let one = run(
        Selection {
            users: vec!["7".into(), "9".into()],
            ..Default::default()
        },
        None,
        None,
    )
    .await;
    assert_eq!(one.processed, 2);
    assert_eq!(app.states().await.len(), 2);

    // An id that cannot exist for the column's type matches nothing; it is not an error.
    let none = run(
        Selection {
            users: vec!["not-an-id".into()],
            ..Default::default()
        },
        None,
        None,
    )
    .await;
    assert_eq!(none.processed, 0);

    // --limit: stop after N.
    let some = run(Selection::default(), Some(4), None).await;
    assert_eq!(some.processed, 4);

    // The rest, then nothing is due...
    let rest = run(Selection::default(), None, None).await;
    assert_eq!(rest.processed, 13 - 2 - 4);
    assert_eq!(run(Selection::default(), None, None).await.processed, 0);
    // ...but --force with --only re-checks exactly the expired ones now.
    let hits = app.origin.total_hits();
    let forced = run(
        Selection {
            force: true,
            only: vec![Status::Expired],
            ..Default::default()
        },
        None,
        None,
    )
    .await;
    assert_eq!(forced.processed, 3, "{forced:?}");
    assert_eq!(app.origin.total_hits() - hits, 3);
    // --provider: no sample URL is a known provider's, so nothing is taken.
    let wechat = run(
        Selection {
            force: true,
            ..Default::default()
        },
        None,
        Some("wechat"),
    )
    .await;
    assert_eq!(wechat.processed, 0);
}
