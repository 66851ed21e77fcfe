//! The write path (#16): nothing marked mirrored without its object.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use avatar_warden::classify::Status;
use avatar_warden::config::StorageSettings;
use avatar_warden::storage::{FsStore, ObjectPage, ObjectStore, StoreError};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::cli::{run, stdout};
use crate::helpers::{Backend, TestApp};

/// The real fs store whose next durability barrier fails, as a disk that
/// turns read-only (or fills up) between writing a batch and publishing it.
struct FailingSync {
    inner: FsStore,
    fail_next: AtomicBool,
}

#[async_trait]
impl ObjectStore for FailingSync {
    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.exists(key).await
    }
    async fn put(&self, key: &str, body: Bytes, content_type: &str) -> Result<(), StoreError> {
        self.inner.put(key, body, content_type).await
    }
    fn public_url(&self, key: &str) -> String {
        self.inner.public_url(key)
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    fn prefix(&self) -> &str {
        self.inner.prefix()
    }
    async fn sync(&self) -> Result<(), StoreError> {
        if self.fail_next.swap(false, Ordering::SeqCst) {
            // What a read-only remount does to the publishing step.
            self.inner.discard_pending().await;
            return Err(StoreError::Io(std::io::Error::from_raw_os_error(30)));
        }
        self.inner.sync().await
    }
    async fn discard_pending(&self) {
        self.inner.discard_pending().await;
    }
    async fn list_avatars(&self, cursor: Option<String>) -> Result<ObjectPage, StoreError> {
        self.inner.list_avatars(cursor).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }
}

fn files_under(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| {
                if e.path().is_dir() {
                    files_under(&e.path())
                } else {
                    1
                }
            })
            .sum()
    })
}

fn object_path(app: &TestApp, mirror_url: &str) -> std::path::PathBuf {
    app.mirror_root()
        .join(&mirror_url[mirror_url.find("avatars/").unwrap()..])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_durability_barrier_never_leaves_mirrored_rows_without_objects() {
    let app = TestApp::empty().await;
    app.users(&[
        (1, app.origin.url("/avatar/jpeg/a")),
        (2, app.origin.url("/avatar/png/b")),
        (3, app.origin.url("/avatar/jpeg/c")),
    ])
    .await;
    let deps = app.deps().await;
    let StorageSettings::Fs(fs) = &app.settings().storage else {
        panic!("fs store")
    };
    let store = Arc::new(FailingSync {
        inner: FsStore::open(fs).await.unwrap(),
        fail_next: AtomicBool::new(true),
    });
    // One writer for both scans, as `run` keeps it.
    let deps = deps.with_store(store);
    let opts =
        avatar_warden::app::ScanOptions::from_settings(&app.settings(), CancellationToken::new());

    let failed = deps.scan(&opts).await;
    assert!(failed.is_err(), "the scan fails with its store: {failed:?}");
    assert_eq!(
        files_under(&app.mirror_root().join(".tmp")),
        0,
        "a failed scan removes the temp files it wrote"
    );

    let report = deps.scan(&opts).await.unwrap();
    assert_eq!(report.count(Status::Mirrored), 3, "{report:?}");
    for id in ["1", "2", "3"] {
        let s = app.state(id).await;
        let path = object_path(&app, s.mirror_url.as_deref().unwrap());
        assert!(path.is_file(), "user {id}: {} exists", path.display());
    }
    let out = run(&app, &["verify-store"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).contains("0 missing"), "{}", stdout(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_object_is_reported_and_stored_again() {
    let app = TestApp::empty().await;
    app.users(&[
        (1, app.origin.url("/avatar/jpeg/a")),
        (2, app.origin.url("/avatar/jpeg/b")),
    ])
    .await;
    app.scan().await;
    let a = app.state("1").await;
    let b = app.state("2").await;
    let (a_path, b_path) = (
        object_path(&app, a.mirror_url.as_deref().unwrap()),
        object_path(&app, b.mirror_url.as_deref().unwrap()),
    );
    std::fs::remove_file(&a_path).unwrap();

    let out = run(&app, &["verify-store"]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains("1 missing (1 rows)"), "{text}");
    assert!(text.contains(a.object_key.as_deref().unwrap()), "{text}");

    // The next re-verification notices and downloads it again; the other
    // one is still confirmed with headers only.
    app.time_passes().await;
    app.scan().await;
    assert!(a_path.is_file(), "stored again");
    let again = app.state("1").await;
    assert_eq!(
        (again.status, again.sha256.as_deref()),
        (Status::Mirrored, a.sha256.as_deref())
    );
    assert_eq!(app.origin.hits("/avatar/jpeg/a"), 2, "a full download");
    assert_eq!(app.state("2").await.reason, "unchanged");

    // `--repair` makes the avatars of a missing object due at once.
    std::fs::remove_file(&b_path).unwrap();
    let out = run(&app, &["verify-store", "--repair"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("1 avatars made due"),
        "{}",
        stdout(&out)
    );
    let report = app.scan().await;
    assert_eq!(report.processed, 1, "only the repaired one was due");
    assert!(b_path.is_file(), "stored again");
    let out = run(&app, &["verify-store", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["missing"], 0);
}

/// `n` users whose distinct avatars (`/avatar/jpeg/<tag><i>`) the origin
/// serves after 200 ms; `None` when `backend` is not available here.
async fn slow_origin_users(backend: Backend, n: i64, tag: &str) -> Option<TestApp> {
    let origin = avatar_warden::demo::OriginOptions {
        latency: std::time::Duration::from_millis(200),
        ..Default::default()
    };
    let app = TestApp::empty_on(backend, origin).await?;
    let rows: Vec<(i64, String)> = (1..=n)
        .map(|i| (i, app.origin.url(&format!("/avatar/jpeg/{tag}{i}"))))
        .collect();
    app.users(&rows).await;
    Some(app)
}

/// Three replicas against an origin that gives each about 20 avatars/s, with
/// pages that take longer than a lease: renewals keep every page with its
/// holder, so no URL is fetched twice and no result is thrown away.
async fn slow_replicas_never_fetch_twice_with_a_short_lease(backend: Backend) {
    const USERS: i64 = 240;
    let Some(mut app) = slow_origin_users(backend, USERS, "r").await else {
        return;
    };
    // 4 slots x 200 ms = 20 avatars/s per replica; a 80-avatar page takes
    // 4 s, longer than the 3 s lease.
    app.set("FETCH__CONCURRENCY", "4");
    app.set("FETCH__TIMEOUT_SECS", "1");
    app.set("SCAN__LEASE_SECS", "3");
    app.set("SCAN__BATCH_SIZE", "80");
    app.set("PROFILE__MAX_CONNECTIONS", "3");
    let mut scans = Vec::new();
    for _ in 0..3 {
        let deps = app.deps().await;
        let opts =
            avatar_warden::app::ScanOptions::from_settings(&app.settings(), Default::default());
        scans.push(tokio::spawn(async move { deps.scan(&opts).await.unwrap() }));
    }
    let (mut processed, mut lost) = (0, 0);
    for s in scans {
        let report = s.await.unwrap();
        processed += report.processed;
        lost += report.lease_lost;
    }
    assert_eq!((processed, lost), (USERS as u64, 0));
    for i in 1..=USERS {
        assert_eq!(
            app.origin.hits(&format!("/avatar/jpeg/r{i}")),
            1,
            "user {i}"
        );
    }
}

/// A `kill -9` loses at most what finished within `scan.flush_secs` (plus
/// what was in flight), not a whole unfilled batch; the next scan finds the
/// rest due once the leases expire, and finished rows hold no lease.
async fn a_kill_loses_at_most_the_last_flush_interval(backend: Backend) {
    const USERS: i64 = 400;
    let Some(mut app) = slow_origin_users(backend, USERS, "k").await else {
        return;
    };
    app.set("FETCH__CONCURRENCY", "4");
    app.set("SCAN__FLUSH_SECS", "1");
    let mut child = crate::cli::command(&app, &["scan", "--no-progress"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let fetched: u64 = (1..=USERS)
        .map(|i| app.origin.hits(&format!("/avatar/jpeg/k{i}")))
        .sum();
    let states = app.states().await;
    let written = states
        .iter()
        .filter(|r| r.status != Status::Pending)
        .count() as u64;
    assert!(fetched >= 40, "the scan was under way: {fetched} fetched");
    // 20 avatars/s x 1 s of flush interval, 4 in flight, and one batch being written.
    assert!(
        fetched - written <= 20 + 4 + 20,
        "{fetched} fetched, {written} written"
    );
    let leased = app
        .text("SELECT CAST(COUNT(*) AS VARCHAR(20)) FROM avatar_warden_avatars WHERE lease_token IS NOT NULL AND status <> 'pending'")
        .await;
    assert_eq!(leased.as_deref(), Some("0"), "finished rows hold no lease");
}

/// PostgreSQL with `users` numbered users, scanned once by the binary (whose
/// exit flushes its connections' statistics).
async fn scanned_postgres_users(users: i64) -> Option<TestApp> {
    let app = TestApp::numbered_users(Backend::Postgres, users, "/avatar/png/").await?;
    let out = run(&app, &["scan", "--no-progress"]);
    assert_eq!(out.status.code(), Some(0), "{}", crate::cli::stderr(&out));
    Some(app)
}

/// The state table's (updates, HOT updates) so far, once at least `least`
/// updates have been flushed to the statistics.
async fn state_updates(app: &TestApp, least: i64) -> (i64, i64) {
    let mut counts = (0, 0);
    for _ in 0..100 {
        let row = app
            .text("SELECT n_tup_upd || ',' || n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'avatar_warden_avatars'")
            .await
            .unwrap_or_default();
        if let Some((upd, hot)) = row.split_once(',') {
            counts = (upd.parse().unwrap(), hot.parse().unwrap());
        }
        if counts.0 >= least {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    counts
}

/// #19: a re-verification that finds every picture unchanged changes no
/// indexed column (the lease and next check time are not indexed since
/// migration 9), so PostgreSQL updates its rows in place (HOT) and adds no
/// index entry. Before, every claim and settle was a non-HOT update (0 of
/// 4,000 here with the old indexes put back): half of PostgreSQL's CPU in a
/// re-verification of 1M rows. Not all are HOT (65 % here): a claim updates
/// a page of rows in one transaction, and a heap page has room for the new
/// versions of only some of its rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_verification_updates_rows_without_touching_an_index() {
    const USERS: i64 = 2_000;
    let Some(app) = scanned_postgres_users(USERS).await else {
        return;
    };
    app.time_passes().await;
    // As autovacuum leaves the table between re-verifications (the test's
    // mass update leaves a dead version of every row behind).
    app.sql(&["VACUUM avatar_warden_avatars"]).await;
    let (upd, hot) = state_updates(&app, 3 * USERS).await;
    let out = run(&app, &["scan", "--no-progress", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", crate::cli::stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["processed"], USERS, "{report}");
    // The claim and the settle: two updates per avatar.
    let (upd2, hot2) = state_updates(&app, upd + 2 * USERS).await;
    let (upd, hot) = (upd2 - upd, hot2 - hot);
    assert!(upd >= 2 * USERS, "{upd} updates");
    assert!(
        hot * 10 >= upd * 4,
        "{hot} of {upd} updates in a re-verification were HOT"
    );
}

/// Migration 9 on a database at version 8 that holds state rows: the lease
/// and next-check indexes go, and scans go on (the heartbeat and release
/// find rows by primary key, the oldest due avatar comes from the walk).
async fn a_database_at_version_8_upgrades_and_scans(backend: Backend) {
    let Some(app) = TestApp::spawn_on(backend).await else {
        return;
    };
    app.scan().await;
    let lease_index = match backend {
        Backend::MySql => {
            "CREATE INDEX avatar_warden_avatars_lease ON avatar_warden_avatars (lease_token)"
        }
        _ => {
            "CREATE INDEX avatar_warden_avatars_leased ON avatar_warden_avatars (lease_token) WHERE lease_token IS NOT NULL"
        }
    };
    // Back to version 8 as it was.
    app.sql(&[
        "DELETE FROM avatar_warden_migrations WHERE version = 9",
        lease_index,
        "CREATE INDEX avatar_warden_avatars_next_check ON avatar_warden_avatars (next_check_at)",
    ])
    .await;
    let out = run(&app, &["migrate"]);
    assert_eq!(out.status.code(), Some(0), "{}", crate::cli::stderr(&out));
    assert!(stdout(&out).contains("applied [9]"), "{}", stdout(&out));
    app.sql(&["UPDATE avatar_warden_avatars SET next_check_at = 1000 WHERE status = 'mirrored'"])
        .await;
    let now = avatar_warden::app::unix_now();
    let deps = app.deps().await;
    let due = deps.database().status(now).await.unwrap();
    assert_eq!((due.due_backlog, due.oldest_due_at), (6, Some(1000)));
    let report = app.scan_with(&deps).await;
    assert_eq!(report.processed, 6, "{report:?}");
    let leased = app
        .text("SELECT CAST(COUNT(*) AS VARCHAR(20)) FROM avatar_warden_avatars WHERE lease_token IS NOT NULL")
        .await;
    assert_eq!(leased.as_deref(), Some("0"));
}

crate::on_every_backend!(
    slow_replicas_never_fetch_twice_with_a_short_lease,
    a_kill_loses_at_most_the_last_flush_interval,
    a_failed_scan_is_recorded_with_its_error,
    a_database_at_version_8_upgrades_and_scans,
);

/// A webhook receiver that accepts connections and never answers.
async fn hanging_receiver() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    addr
}

/// How many outbox rows wait, and how many of them are leased.
async fn outbox_rows(app: &TestApp) -> (String, String) {
    let count = |sql: &str| {
        let sql = sql.to_string();
        async move { app.text(&sql).await.unwrap_or_default() }
    };
    (
        count("SELECT CAST(COUNT(*) AS VARCHAR(20)) FROM avatar_warden_outbox WHERE state = 'pending'").await,
        count("SELECT CAST(COUNT(*) AS VARCHAR(20)) FROM avatar_warden_outbox WHERE lease_token IS NOT NULL").await,
    )
}

async fn app_with_a_hanging_sink() -> TestApp {
    let mut app = TestApp::empty().await;
    // Decided without a request: 20 users, two events each (invalid, reauth).
    let rows: Vec<(i64, String)> = (1..=20)
        .map(|i| (i, format!("ftp://files.example/{i}.png")))
        .collect();
    app.users(&rows).await;
    let hook = hanging_receiver().await;
    app.config_toml(&format!(
        "[[sink]]\nkind = \"webhook\"\nurl = \"http://{hook}/hook\"\nsecret = \"s\"\ntimeout_secs = 10\n"
    ));
    app.set("SHUTDOWN__GRACE_SECS", "3");
    app.set("OUTBOX__CONCURRENCY", "4");
    app
}

/// Runs the binary with `args`, sends SIGTERM after two seconds, and checks
/// it exited 0 within the 3 s grace period and a 2 s margin.
async fn sigterm_after_two_seconds(app: &TestApp, args: &[&str]) -> std::process::Output {
    let child = crate::cli::command(app, args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    crate::ops::sigterm(&child);
    let signalled = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    let took = signalled.elapsed();
    assert!(
        took < std::time::Duration::from_secs(3 + 2),
        "{args:?} exited {took:?} after SIGTERM:\n{}",
        crate::cli::stderr(&out)
    );
    assert_eq!(out.status.code(), Some(0), "{}", crate::cli::stderr(&out));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_scan_within_its_grace_period_although_a_sink_hangs() {
    let app = app_with_a_hanging_sink().await;
    let out = sigterm_after_two_seconds(&app, &["scan", "--no-progress"]).await;
    assert!(
        stdout(&out).contains("given back unattempted"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        outbox_rows(&app).await,
        ("40".into(), "0".into()),
        "every delivery still waits, none leased"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_sink_holds_scan_no_longer_than_the_drain_and_run_stops_in_time() {
    let mut app = app_with_a_hanging_sink().await;
    app.set("OUTBOX__DRAIN_SECS", "2");
    let started = std::time::Instant::now();
    let out = run(&app, &["scan", "--no-progress"]);
    assert_eq!(out.status.code(), Some(0), "{}", crate::cli::stderr(&out));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(8),
        "scan took {:?}",
        started.elapsed()
    );
    assert_eq!(outbox_rows(&app).await, ("40".into(), "0".into()));

    // `run` picks them up between scans; SIGTERM ends it within the grace period.
    app.set("SCHEDULE__CRON", "0 0 1 1 *");
    app.set("METRICS__LISTEN", "127.0.0.1:0");
    sigterm_after_two_seconds(&app, &["run"]).await;
    assert_eq!(outbox_rows(&app).await, ("40".into(), "0".into()));
}

/// A scan that fails on a database error is recorded as `failed` with its
/// error, so `status` does not show the previous good run as the last.
async fn a_failed_scan_is_recorded_with_its_error(backend: Backend) {
    let Some(app) = TestApp::spawn_on(backend).await else {
        return;
    };
    app.scan().await;
    app.time_passes().await;
    let deps = app.deps().await;
    // The write-back column disappears under the running worker.
    app.sql(&["ALTER TABLE users DROP COLUMN avatar_mirror_url"])
        .await;
    let opts =
        avatar_warden::app::ScanOptions::from_settings(&app.settings(), CancellationToken::new());
    let failed = deps.scan(&opts).await;
    assert!(failed.is_err(), "{failed:?}");
    let out = run(&app, &["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let last = &json["last_run"];
    assert_eq!(last["result"], "failed", "{json}");
    assert!(
        last["error"]
            .as_str()
            .unwrap()
            .contains("avatar_mirror_url"),
        "{json}"
    );
    let text = stdout(&run(&app, &["status"]));
    assert!(text.contains("last run failed: "), "{text}");
}

/// A second SIGTERM exits at once with 143 (128 + SIGTERM), as documented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once_with_143() {
    let origin = avatar_warden::demo::OriginOptions {
        latency: std::time::Duration::from_secs(5),
        ..Default::default()
    };
    let mut app = TestApp::with_origin(origin).await;
    app.users(&[(1, app.origin.url("/avatar/jpeg/slow"))]).await;
    app.set("SHUTDOWN__GRACE_SECS", "30");
    let child = crate::cli::command(&app, &["scan", "--no-progress"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    while app.origin.total_hits() == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    crate::ops::sigterm(&child);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    crate::ops::sigterm(&child);
    let started = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143));
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

/// The rows PostgreSQL read through each index of the state table, once the
/// scan's backends (gone with the process) have flushed their statistics.
async fn state_index_reads(app: &TestApp, users: i64) -> Vec<(String, i64)> {
    for _ in 0..100 {
        let updated: i64 = app
            .text("SELECT CAST(n_tup_upd AS TEXT) FROM pg_stat_user_tables WHERE relname = 'avatar_warden_avatars'")
            .await
            .map_or(0, |n| n.parse().unwrap());
        if updated >= users {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let list = app
        .text(
            "SELECT string_agg(indexrelname || '=' || idx_tup_read, ',' ORDER BY indexrelname) \
             FROM pg_stat_user_indexes WHERE relname = 'avatar_warden_avatars'",
        )
        .await
        .unwrap_or_default();
    list.split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
        .collect()
}

/// A regression test for #19: the writer's check that it still held its
/// leases read every leased row of the claimed window through the lease
/// index, once per write batch (window × batches, 11 rows per avatar here),
/// and tested each against the batch's id list. Each statement now finds its
/// rows by primary key: a scan reads a few index entries per avatar, however
/// large the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_reads_a_few_index_entries_per_avatar_not_the_window_per_batch() {
    const USERS: i64 = 3_000;
    let Some(app) = scanned_postgres_users(USERS).await else {
        return;
    };
    let reads = state_index_reads(&app, USERS).await;
    let total: i64 = reads.iter().map(|(_, n)| n).sum();
    assert!(
        total <= 3 * USERS,
        "index entries read in a scan of {USERS} users: {reads:?}"
    );
}
