//! End-to-end benchmark: the release binary's `scan` against the simulated
//! origin, each in its own process, on SQLite or PostgreSQL with the fs store
//! or a local Garage (S3).
//!
//!   cargo bench --bench pipeline -- --scenario all
//!   cargo bench --bench pipeline -- --users 20000 --db postgres --latency-ms 0 --concurrency 64
//!   cargo bench --bench pipeline -- --scenario reverify   (a second scan of mirrored avatars)
//!   cargo bench --bench pipeline -- --scenario slow-host  (one host, 50 ms, 429 beyond N at once;
//!                                                          slow-host-50k, slow-host-1m: more users)
//!   cargo bench --bench pipeline -- --scenario scale      (20k/200k/1M users: first scan, re-verification)
//!   cargo bench --bench pipeline -- --scenario fleet      (1, 2, 4 scanners sharing one PostgreSQL)
//!   cargo bench --bench pipeline -- --scenario idle       (a scan that finds nothing due, 1M/10M rows)
//!   cargo bench --bench pipeline -- --scenario rewrite    (a new CDN domain: every mirror URL of 1M rows rewritten)
//!   cargo bench --bench pipeline -- --users 200000 --worker-env AVATAR_WARDEN__PROFILE__MAX_CONNECTIONS=8
//!                                                         (A/B of one worker setting)
//!
//! Measured from outside the worker: avatars/s (the scan's own duration),
//! per-avatar latency p50/p99 (its `avatar_check_duration_seconds` histogram),
//! CPU seconds per 1,000 avatars (user+sys of the worker process only, from
//! `getrusage(RUSAGE_CHILDREN)`), peak RSS (`VmHWM`), DB statements (sqlx's
//! own per-statement log events), origin requests (the origin's counter), and
//! the origin's capacity alone. Results go to `target/bench/*.json` and are
//! appended to BENCHMARKS.md unless `--no-append`.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_avatar-warden");

#[derive(Debug, Clone)]
struct Scenario {
    name: String,
    users: u64,
    latency_ms: u64,
    concurrency: usize,
    db: Db,
    /// Percent of users whose avatar is valid / expired; the rest are 404.
    valid_pct: u64,
    expired_pct: u64,
    image_bytes: usize,
    /// 640x640 JPEGs of 20-120 KB, median ~45 KB, instead of `image_bytes`.
    realistic_images: bool,
    batch: usize,
    store: Store,
    /// Measure a second scan of the same, already mirrored avatars (#9).
    recheck: Option<Recheck>,
    /// The origin answers 429 beyond this many requests in flight.
    host_limit: Option<u64>,
    /// Keep the default per-host politeness (adaptive, up to 10 at once)
    /// instead of lifting it for the single benchmark host.
    default_politeness: bool,
    measured: Measured,
    /// Extra settings for the worker (`--worker-env K=V`), for A/B runs of a
    /// setting; the command line in BENCHMARKS.md records them.
    worker_env: Vec<(String, String)>,
}

/// Which runs of a scenario are measured.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Measured {
    /// One scan (or, with `recheck`, the second scan).
    Scan,
    /// The first scan and then the re-verification of the same table
    /// (`scale`: the cost per avatar against the table's size).
    FirstThenReverify,
    /// Re-verification by this many scanner processes at once, one run per
    /// entry, on one PostgreSQL (`fleet`: what the database sustains).
    Fleet(Vec<usize>),
    /// A scan that finds nothing due: every row already checked and not due
    /// for years (`idle`: the cost of walking the table every tick).
    Idle,
    /// The same table, scanned after `storage.public_base_url` changed:
    /// nothing is due, every mirror URL is rewritten (`rewrite`: the cost of
    /// moving to a new CDN domain).
    NewCdn,
}

impl Measured {
    /// Whether the measured scan finds nothing due (the seeded state is settled).
    fn settled(&self) -> bool {
        matches!(self, Measured::Idle | Measured::NewCdn)
    }
}

/// How the measured second scan re-verifies the mirrored avatars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recheck {
    /// The default: `If-None-Match` / `If-Modified-Since`, 304 expected.
    Conditional,
    /// A provider rule with `reverify = "head"` for the origin's host.
    Head,
    /// `scan --redownload`: every picture in full (the cost without #9).
    Redownload,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Fs,
    /// A single-node Garage started by `scripts/garage-up` (S3 over loopback).
    Garage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Db {
    Sqlite,
    Postgres,
}

impl Scenario {
    fn new(name: &str, users: u64, latency_ms: u64, concurrency: usize, db: Db) -> Self {
        Scenario {
            name: name.into(),
            users,
            latency_ms,
            concurrency,
            db,
            valid_pct: 100,
            expired_pct: 0,
            image_bytes: 20_000,
            realistic_images: false,
            batch: 1000,
            store: Store::Fs,
            recheck: None,
            host_limit: None,
            default_politeness: false,
            measured: Measured::Scan,
            worker_env: Vec::new(),
        }
    }
}

/// The targets, each as a scenario.
fn presets(name: &str) -> Vec<Scenario> {
    let t1_pg = Scenario::new("t1-postgres-0ms", 30_000, 0, 64, Db::Postgres);
    let t1_sqlite = Scenario::new("t1-sqlite-0ms", 30_000, 0, 64, Db::Sqlite);
    let t2 = Scenario::new("t2-postgres-100ms-c128", 12_800, 100, 128, Db::Postgres);
    // Memory against table size: 10 % valid keeps the 1M run's mirror at ~2 GB.
    let mut rss_small = Scenario::new("t3-rss-10k", 10_000, 0, 64, Db::Postgres);
    let mut rss_big = Scenario::new("t3-rss-1m", 1_000_000, 0, 64, Db::Postgres);
    (rss_small.valid_pct, rss_small.expired_pct) = (10, 45);
    (rss_big.valid_pct, rss_big.expired_pct) = (10, 45);
    let mut mixed = Scenario::new("mixed-postgres", 30_000, 0, 64, Db::Postgres);
    (mixed.valid_pct, mixed.expired_pct) = (80, 15);
    let mut s3 = Scenario::new("t1-postgres-garage", 20_000, 0, 64, Db::Postgres);
    s3.store = Store::Garage;
    let smoke = Scenario::new("smoke", 1_000, 0, 16, Db::Sqlite);
    // Re-verification: 20k mirrored avatars, all unchanged, origin at 0 ms so
    // the cost per avatar shows (with latency, latency x concurrency bounds all three).
    let recheck = |name: &str, how| {
        let mut s = Scenario::new(name, 20_000, 0, 64, Db::Postgres);
        s.recheck = Some(how);
        s
    };
    let reverify = vec![
        recheck("reverify-conditional", Recheck::Conditional),
        recheck("reverify-head", Recheck::Head),
        recheck("reverify-redownload", Recheck::Redownload),
    ];
    // One host at 50 ms that refuses (429) more than 6 requests at once,
    // behind the default politeness: what a WeChat backfill meets.
    let slow_host = |name: &str, users, db| {
        let mut s = Scenario::new(name, users, 50, 64, db);
        s.host_limit = Some(6);
        s.default_politeness = true;
        s
    };
    // Cost per avatar against table size (#19): the first scan and the
    // re-verification of 20k, 200k and 1M users, 10 % WeChat-expired.
    // `<kind>-<users>-<db>` at 0 ms and concurrency 64, e.g. `scale-1m-sqlite`.
    let sized = |kind: &str, users: u64, db: Db| {
        let label = match users {
            n if n >= 1_000_000 => format!("{}m", n / 1_000_000),
            n => format!("{}k", n / 1000),
        };
        let db_name = format!("{db:?}").to_lowercase();
        Scenario::new(&format!("{kind}-{label}-{db_name}"), users, 0, 64, db)
    };
    let scale = |users: u64, db| {
        let mut s = sized("scale", users, db);
        (s.valid_pct, s.expired_pct) = (90, 10);
        s.realistic_images = true;
        s.measured = Measured::FirstThenReverify;
        s
    };
    // One PostgreSQL, 1/2/4 scanners re-verifying at once against an origin
    // that answers 304 at once: the database's share of a fleet (#19).
    let fleet = |name: &str, users, scanners: &[usize]| {
        let mut s = Scenario::new(name, users, 0, 64, Db::Postgres);
        s.measured = Measured::Fleet(scanners.to_vec());
        s
    };
    let idle = |users: u64, db| {
        let mut s = sized("idle", users, db);
        s.measured = Measured::Idle;
        s
    };
    let rewrite = |users: u64, db| {
        let mut s = sized("rewrite", users, db);
        s.measured = Measured::NewCdn;
        s
    };
    match name {
        "scale" => [Db::Sqlite, Db::Postgres]
            .into_iter()
            .flat_map(|db| [20_000, 200_000, 1_000_000].map(|n| scale(n, db)))
            .collect(),
        "scale-200k" => vec![
            scale(20_000, Db::Sqlite),
            scale(200_000, Db::Sqlite),
            scale(20_000, Db::Postgres),
            scale(200_000, Db::Postgres),
        ],
        "scale-smoke" => vec![scale(2_000, Db::Sqlite)],
        "fleet" => vec![fleet("fleet-200k", 200_000, &[1, 2, 4])],
        "fleet-smoke" => vec![fleet("fleet-smoke", 2_000, &[1, 2])],
        "idle" => vec![
            idle(1_000_000, Db::Sqlite),
            idle(1_000_000, Db::Postgres),
            idle(10_000_000, Db::Sqlite),
            idle(10_000_000, Db::Postgres),
        ],
        "idle-smoke" => vec![
            idle(2_000, Db::Sqlite),
            idle(2_000, Db::Postgres),
            rewrite(2_000, Db::Sqlite),
        ],
        "rewrite" => vec![
            rewrite(1_000_000, Db::Sqlite),
            rewrite(1_000_000, Db::Postgres),
        ],
        "reverify" => reverify,
        "slow-host" => vec![slow_host("slow-host-50ms-limit6", 5_000, Db::Postgres)],
        // Ten times the users: does the host-bound rate hold as the run grows?
        "slow-host-50k" => vec![slow_host("slow-host-50k-50ms-limit6", 50_000, Db::Postgres)],
        // Target 4 of #19 itself: 1M avatars from one slow host (about 2.5 h).
        // SQLite, so that PostgreSQL stays free for other runs meanwhile.
        "slow-host-1m" => vec![slow_host("slow-host-1m-50ms-limit6", 1_000_000, Db::Sqlite)],
        "slow-host-smoke" => vec![slow_host("slow-host-smoke", 300, Db::Sqlite)],
        "all" => [
            vec![t1_pg, t1_sqlite, t2, mixed, s3, rss_small, rss_big],
            reverify,
        ]
        .concat(),
        "s3" => vec![s3],
        "t1" => vec![t1_pg, t1_sqlite],
        "t2" => vec![t2],
        "t3" => vec![rss_small, rss_big],
        "mixed" => vec![mixed],
        "smoke" => vec![smoke],
        other => panic!(
            "unknown scenario {other:?} (all, t1, t2, t3, mixed, s3, reverify, slow-host, slow-host-50k, slow-host-1m, slow-host-smoke, scale, scale-200k, scale-smoke, fleet, fleet-smoke, idle, idle-smoke, rewrite, smoke)"
        ),
    }
}

struct Args {
    scenarios: Vec<Scenario>,
    append: bool,
    postgres_url: String,
}

fn parse_args() -> Args {
    let mut custom = Scenario::new("custom", 10_000, 0, 64, Db::Sqlite);
    let (mut preset, mut is_custom, mut append) = (None, false, true);
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--bench" => {} // passed by `cargo bench`
            "--scenario" => preset = Some(value()),
            "--no-append" => append = false,
            "--users" => (custom.users, is_custom) = (value().parse().unwrap(), true),
            "--latency-ms" => (custom.latency_ms, is_custom) = (value().parse().unwrap(), true),
            "--concurrency" => (custom.concurrency, is_custom) = (value().parse().unwrap(), true),
            "--image-bytes" => (custom.image_bytes, is_custom) = (value().parse().unwrap(), true),
            "--realistic-images" => (custom.realistic_images, is_custom) = (true, true),
            "--batch" => (custom.batch, is_custom) = (value().parse().unwrap(), true),
            "--worker-env" => {
                let kv = value();
                let (k, v) = kv.split_once('=').expect("--worker-env takes KEY=VALUE");
                custom.worker_env.push((k.to_string(), v.to_string()));
                is_custom = true;
            }
            "--valid-pct" => (custom.valid_pct, is_custom) = (value().parse().unwrap(), true),
            "--expired-pct" => (custom.expired_pct, is_custom) = (value().parse().unwrap(), true),
            "--recheck" => {
                custom.recheck = Some(match value().as_str() {
                    "conditional" => Recheck::Conditional,
                    "head" => Recheck::Head,
                    "redownload" => Recheck::Redownload,
                    other => panic!("--recheck {other}: conditional, head or redownload"),
                });
                is_custom = true;
            }
            "--store" => {
                custom.store = match value().as_str() {
                    "fs" => Store::Fs,
                    "garage" | "s3" => Store::Garage,
                    other => panic!("--store {other}: fs or garage"),
                };
                is_custom = true;
            }
            "--db" => {
                custom.db = match value().as_str() {
                    "sqlite" => Db::Sqlite,
                    "postgres" => Db::Postgres,
                    other => panic!("--db {other}: sqlite or postgres"),
                };
                is_custom = true;
            }
            other => panic!("unknown argument {other:?}"),
        }
    }
    let scenarios = match (preset, is_custom) {
        (Some(p), _) => presets(&p),
        (None, true) => vec![custom],
        (None, false) => presets("smoke"),
    };
    Args {
        scenarios,
        append,
        postgres_url: std::env::var("AVATAR_WARDEN_BENCH_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
    }
}

/// The origin in its own process; killed on drop.
struct OriginProcess {
    child: Child,
    base: String,
}

impl Drop for OriginProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_origin(s: &Scenario) -> OriginProcess {
    let mut child = Command::new(BIN)
        .args(["origin", "--latency-ms", &s.latency_ms.to_string()])
        .args(if s.realistic_images {
            vec!["--realistic-images".to_string()]
        } else {
            vec!["--image-bytes".to_string(), s.image_bytes.to_string()]
        })
        .args(
            s.host_limit
                .map(|n| vec!["--limit".to_string(), n.to_string()])
                .unwrap_or_default(),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the origin");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    OriginProcess {
        child,
        base: line.trim().to_string(),
    }
}

async fn origin_stats(http: &reqwest::Client, base: &str) -> Value {
    let text = http
        .get(format!("{base}/__stats"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Requests/s the origin serves alone, at the scenario's concurrency.
async fn origin_capacity(http: &reqwest::Client, base: &str, s: &Scenario) -> f64 {
    let n = (s.concurrency as u64 * 40).clamp(2_000, 20_000);
    // The first request renders the picture pool: not part of the capacity.
    let warm = format!("{base}/bench/valid/{}", 9_999_999);
    http.get(warm).send().await.unwrap().bytes().await.unwrap();
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let url = format!("{base}/bench/valid/{}", 10_000_000 + i);
            async move { http.get(url).send().await.unwrap().bytes().await.unwrap() }
        })
        .buffer_unordered(s.concurrency)
        .for_each(|_| async {})
        .await;
    n as f64 / started.elapsed().as_secs_f64()
}

/// Creates `bench_users` with `users` rows and returns the worker's profile URL.
async fn seed(s: &Scenario, args: &Args, base: &str, dir: &Path) -> String {
    let url_expr = format!(
        "'{base}/bench/' || CASE WHEN i % 100 < {v} THEN 'valid' WHEN i % 100 < {e} THEN 'expired' ELSE 'gone' END || '/' || i",
        v = s.valid_pct,
        e = s.valid_pct + s.expired_pct
    );
    match s.db {
        Db::Sqlite => {
            let url = format!("sqlite://{}?mode=rwc", dir.join("bench.db").display());
            let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
            sqlx::query("CREATE TABLE bench_users (id INTEGER PRIMARY KEY, avatar_url TEXT)")
                .execute(&pool)
                .await
                .unwrap();
            sqlx::query(&format!(
                "WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < {n}) \
                 INSERT INTO bench_users (id, avatar_url) SELECT i, {url_expr} FROM seq",
                n = s.users
            ))
            .execute(&pool)
            .await
            .unwrap();
            pool.close().await;
            url
        }
        Db::Postgres => {
            let admin = sqlx::PgPool::connect(&args.postgres_url).await.unwrap();
            sqlx::query("DROP DATABASE IF EXISTS avatar_warden_bench WITH (FORCE)")
                .execute(&admin)
                .await
                .unwrap();
            sqlx::query("CREATE DATABASE avatar_warden_bench")
                .execute(&admin)
                .await
                .unwrap();
            admin.close().await;
            let url = replace_db(&args.postgres_url, "avatar_warden_bench");
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            sqlx::query("CREATE TABLE bench_users (id BIGINT PRIMARY KEY, avatar_url TEXT)")
                .execute(&pool)
                .await
                .unwrap();
            sqlx::query(&format!(
                "INSERT INTO bench_users (id, avatar_url) SELECT i, {url_expr} FROM generate_series(1, {n}::bigint) AS i",
                n = s.users
            ))
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query("VACUUM ANALYZE bench_users")
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
            url
        }
    }
}

/// Makes every mirrored avatar due again, as a week passing would.
async fn all_due_now(profile_url: &str) {
    execute(
        profile_url,
        &["UPDATE avatar_warden_avatars SET next_check_at = 0 WHERE next_check_at IS NOT NULL"],
    )
    .await;
}

/// Runs statements, each on its own, on the benchmark's database.
async fn execute(profile_url: &str, statements: &[&str]) {
    if profile_url.starts_with("sqlite") {
        let pool = sqlx::SqlitePool::connect(profile_url).await.unwrap();
        for sql in statements {
            sqlx::query(sql).execute(&pool).await.unwrap();
        }
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(profile_url).await.unwrap();
        for sql in statements {
            sqlx::query(sql).execute(&pool).await.unwrap();
        }
        pool.close().await;
    }
}

fn replace_db(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("a database in the URL");
    format!("{base}/{db}")
}

/// (user, system) CPU seconds of reaped child processes.
fn children_cpu_secs() -> (f64, f64) {
    use nix::sys::resource::{UsageWho, getrusage};
    let u = getrusage(UsageWho::RUSAGE_CHILDREN).expect("getrusage");
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    (secs(u.user_time()), secs(u.system_time()))
}

/// CPU seconds (user + system) a live process has used so far.
fn process_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    (ticks(11).unwrap_or(0.0) + ticks(12).unwrap_or(0.0)) / CLOCK_TICKS
}

/// Linux reports CPU time in `USER_HZ` ticks, 100 per second on every
/// architecture it exports them for.
const CLOCK_TICKS: f64 = 100.0;

/// CPU seconds the whole machine has been busy (all CPUs, not idle or
/// waiting for I/O), from `/proc/stat`.
fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    let total: f64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).unwrap_or(&0.0) + ticks.get(4).unwrap_or(&0.0);
    (total - idle) / CLOCK_TICKS
}

/// `VmHWM` (peak resident set) of a running process, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Polls the state table from its own thread until a first result is
/// written: the seconds from the worker's start (`None`: none within 10 min).
fn watch_first_row(
    profile_url: String,
    started: Instant,
    done: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Option<f64>> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            sqlx::any::install_default_drivers();
            // One row, not a count: this polls while a 10M-row table is measured.
            let sql = "SELECT user_id FROM avatar_warden_avatars WHERE status <> 'pending' LIMIT 1";
            while !done.load(Ordering::Relaxed) {
                if let Ok(pool) = sqlx::AnyPool::connect(&profile_url).await {
                    let row = sqlx::query(sql).fetch_optional(&pool).await;
                    pool.close().await;
                    if row.is_ok_and(|r| r.is_some()) {
                        return Some(started.elapsed().as_secs_f64());
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            None
        })
    })
}

struct WorkerRun {
    report: Value,
    wall_secs: f64,
    cpu_secs: f64,
    /// User-mode part of `cpu_secs`: the worker's own computation, without
    /// the kernel's side of I/O (syscalls, context switches, file system).
    user_secs: f64,
    peak_rss_kib: u64,
    db_statements: u64,
    /// Seconds from the worker's start to its first written result.
    first_row_secs: Option<f64>,
    metrics: String,
}

/// A Garage node for one scenario, stopped on drop; its S3 settings as the
/// worker's environment.
struct GarageProcess {
    pid: String,
    env: Vec<(String, String)>,
}

impl Drop for GarageProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(&self.pid).status();
    }
}

fn start_garage(dir: &Path) -> GarageProcess {
    let state = dir.join("garage");
    let script = project_dir().join("scripts/garage-up");
    let out = Command::new("bash")
        .arg(script)
        .arg(&state)
        // Ports of its own: the test suite's Garage may be running.
        .env("GARAGE_TEST_S3_PORT", "39410")
        .env("GARAGE_TEST_RPC_PORT", "39411")
        .env("GARAGE_TEST_ADMIN_PORT", "39413")
        .output()
        .expect("scripts/garage-up (is `garage` installed? .ci/run installs it)");
    assert!(
        out.status.success(),
        "garage-up failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vars: std::collections::HashMap<String, String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("export AVATAR_WARDEN_TEST_GARAGE_"))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let var = |k: &str| {
        vars.get(k)
            .cloned()
            .unwrap_or_else(|| panic!("garage-up: no {k}"))
    };
    let env = [
        ("KIND", "s3".to_string()),
        ("BUCKET", var("BUCKET")),
        ("ENDPOINT", var("ENDPOINT")),
        ("REGION", "garage".into()),
        ("FORCE_PATH_STYLE", "true".into()),
        ("PUBLIC_BASE_URL", "https://cdn.example.com/".into()),
        ("ACCESS_KEY_ID", var("KEY_ID")),
        ("SECRET_ACCESS_KEY", var("SECRET")),
    ];
    GarageProcess {
        pid: std::fs::read_to_string(state.join("pid"))
            .unwrap()
            .trim()
            .to_string(),
        env: env
            .into_iter()
            .map(|(k, v)| (format!("AVATAR_WARDEN__STORAGE__{k}"), v))
            .collect(),
    }
}

/// The worker binary with the scenario's settings in its environment.
fn worker_command(
    s: &Scenario,
    profile_url: &str,
    dir: &Path,
    storage_env: &[(String, String)],
) -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("AVATAR_WARDEN") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    let env = [
        ("PROFILE__URL", profile_url.to_string()),
        ("PROFILE__TABLE", "bench_users".into()),
        ("STORAGE__ROOT", dir.join("mirror").display().to_string()),
        ("FETCH__ALLOW_PRIVATE_NETWORKS", "true".into()),
        ("FETCH__ALLOWED_PORTS", "[]".into()),
        ("FETCH__CONCURRENCY", s.concurrency.to_string()),
        ("SCAN__BATCH_SIZE", s.batch.to_string()),
        ("LOG__FORMAT", "json".into()),
    ];
    // One origin host: lift the per-host politeness caps meant for real CDNs,
    // unless the scenario measures them.
    let politeness = [
        ("PER_HOST_CONCURRENCY", s.concurrency.to_string()),
        ("PER_HOST_MIN_INTERVAL_MS", "0".to_string()),
    ];
    let politeness = politeness
        .iter()
        .filter(|_| !s.default_politeness)
        .map(|(k, v)| (format!("AVATAR_WARDEN__FETCH__{k}"), v.clone()));
    cmd.envs(
        env.iter()
            .map(|(k, v)| (format!("AVATAR_WARDEN__{k}"), v.clone())),
    )
    .envs(storage_env.iter().cloned())
    .envs(politeness)
    .envs(s.worker_env.iter().cloned());
    cmd
}

fn run_worker(
    s: &Scenario,
    profile_url: &str,
    dir: &Path,
    storage_env: &[(String, String)],
    extra_args: &[&str],
) -> WorkerRun {
    // Scanners running at once (`fleet`) each keep their own metrics file.
    static RUN: AtomicU64 = AtomicU64::new(0);
    let metrics_file = dir.join(format!(
        "metrics-{}.prom",
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let mut cmd = worker_command(s, profile_url, dir, storage_env);
    cmd.args([
        "scan",
        "--json",
        "--no-progress",
        "--metrics-file",
        metrics_file.to_str().unwrap(),
    ])
    .args(extra_args)
    // sqlx logs every statement it executes at debug under `sqlx::query`.
    .env("RUST_LOG", "warn,sqlx::query=debug")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let cpu_before = children_cpu_secs();
    let started = Instant::now();
    let mut child = cmd.spawn().expect("starting the worker");
    let worker_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let first_row = watch_first_row(profile_url.to_string(), started, worker_done.clone());
    let pid = child.id();
    let statements = Arc::new(AtomicU64::new(0));
    let stderr = child.stderr.take().unwrap();
    let counter = statements.clone();
    let reader = std::thread::spawn(move || {
        let mut other = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("\"target\":\"sqlx::query\"") {
                counter.fetch_add(1, Ordering::Relaxed);
            } else if other.len() < 10_000 {
                other.push_str(&line);
                other.push('\n');
            }
        }
        other
    });
    let mut stdout = child.stdout.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    let mut peak = 0;
    let status = loop {
        if let Some(kib) = peak_rss_kib(pid) {
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall_secs = started.elapsed().as_secs_f64();
    let cpu_after = children_cpu_secs();
    let user_secs = cpu_after.0 - cpu_before.0;
    let cpu_secs = user_secs + cpu_after.1 - cpu_before.1;
    let logs = reader.join().unwrap();
    let stdout = out_reader.join().unwrap();
    worker_done.store(true, Ordering::Relaxed);
    let first_row_secs = first_row.join().unwrap();
    assert!(
        matches!(status.code(), Some(0 | 2)),
        "worker failed ({status}):\n{logs}"
    );
    WorkerRun {
        report: serde_json::from_str(&stdout).expect("scan --json output"),
        wall_secs,
        cpu_secs,
        user_secs,
        peak_rss_kib: peak,
        db_statements: statements.load(Ordering::Relaxed),
        first_row_secs,
        metrics: std::fs::read_to_string(metrics_file).unwrap_or_default(),
    }
}

/// A quantile from a Prometheus histogram's cumulative buckets, interpolated
/// linearly inside the bucket (as `histogram_quantile` does).
fn histogram_quantile(metrics: &str, name: &str, q: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{le=\"");
    let buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            return Some(lower + (le - lower) * (rank - below) / (count - below).max(1.0));
        }
        (lower, below) = (le, count);
    }
    None
}

async fn run_scenario(s: &Scenario, args: &Args, http: &reqwest::Client) -> Vec<Value> {
    eprintln!(
        "== {} ({} users, {} ms, c{}, {:?}, {:?})",
        s.name, s.users, s.latency_ms, s.concurrency, s.db, s.store
    );
    let dir = tempfile::tempdir().unwrap();
    let origin = spawn_origin(s);
    // A host that refuses beyond N at once has no capacity to speak of, and
    // a scan that finds nothing due asks the origin nothing.
    let capacity = match s.host_limit {
        None if !s.measured.settled() => Some(origin_capacity(http, &origin.base, s).await),
        _ => None,
    };
    let profile_url = seed(s, args, &origin.base, dir.path()).await;
    let results = match &s.measured {
        Measured::Scan | Measured::FirstThenReverify => {
            run_single(s, http, &origin.base, &profile_url, dir.path(), capacity).await
        }
        Measured::Idle | Measured::NewCdn => {
            run_idle(s, http, &origin.base, &profile_url, dir.path()).await
        }
        Measured::Fleet(sizes) => run_fleet(s, sizes, &origin, &profile_url, dir.path()).await,
    };
    drop(origin);
    if s.db == Db::Postgres {
        // Leave no multi-gigabyte database behind.
        if let Ok(admin) = sqlx::PgPool::connect(&args.postgres_url).await {
            let _ = sqlx::query("DROP DATABASE IF EXISTS avatar_warden_bench WITH (FORCE)")
                .execute(&admin)
                .await;
        }
    }
    results
}

/// One worker: the first scan and/or a re-verification, each measured.
async fn run_single(
    s: &Scenario,
    http: &reqwest::Client,
    origin: &str,
    profile_url: &str,
    dir: &Path,
    capacity: Option<f64>,
) -> Vec<Value> {
    let garage = (s.store == Store::Garage).then(|| start_garage(dir));
    let storage_env = garage.as_ref().map(|g| g.env.clone()).unwrap_or_default();
    let mut storage_env = storage_env;
    let mut extra_args: Vec<&str> = Vec::new();
    let mut results = Vec::new();
    if s.measured == Measured::FirstThenReverify {
        // The first scan, measured; then every avatar due again for the
        // re-verification, measured below.
        let mut first = s.clone();
        first.name = format!("{}-first", s.name);
        results.push(
            measure(
                &first,
                http,
                origin,
                profile_url,
                dir,
                &storage_env,
                &[],
                capacity,
            )
            .await,
        );
        all_due_now(profile_url).await;
    } else if let Some(how) = s.recheck {
        // The first scan mirrors everything; the second, measured, re-verifies it.
        run_worker(s, profile_url, dir, &storage_env, &[]);
        all_due_now(profile_url).await;
        match how {
            Recheck::Conditional => {}
            Recheck::Head => {
                let rules = dir.join("providers.toml");
                std::fs::write(
                    &rules,
                    "[[provider]]\nname = \"bench\"\nhosts = [\"127.0.0.1\"]\nreverify = \"head\"\n",
                )
                .unwrap();
                storage_env.push((
                    "AVATAR_WARDEN__PROVIDERS__FILE".into(),
                    rules.display().to_string(),
                ));
            }
            Recheck::Redownload => extra_args.push("--redownload"),
        }
    }
    let mut measured = s.clone();
    if s.measured == Measured::FirstThenReverify {
        measured.name = format!("{}-reverify", s.name);
        measured.recheck = Some(Recheck::Conditional);
    }
    results.push(
        measure(
            &measured,
            http,
            origin,
            profile_url,
            dir,
            &storage_env,
            &extra_args,
            capacity,
        )
        .await,
    );
    drop(garage);
    results
}

/// A scan that finds nothing due: every profile row already has a state row,
/// checked, its URL unchanged, not due for decades. The state is written in
/// SQL (a first scan of 10M avatars would take an hour); one scan runs
/// unmeasured (it records the mirror fingerprint), then one is measured.
async fn run_idle(
    s: &Scenario,
    http: &reqwest::Client,
    origin: &str,
    profile_url: &str,
    dir: &Path,
) -> Vec<Value> {
    let status = worker_command(s, profile_url, dir, &[])
        .arg("migrate")
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "avatar-warden migrate: {status}");
    // Rows as wide as real mirrored ones: the walk reads every page. Their
    // mirror URLs are on the worker's own CDN base, so the unmeasured scan
    // only records the fingerprint instead of rewriting every row.
    let cdn = "https://cdn.example.com/";
    let storage_env = [(
        "AVATAR_WARDEN__STORAGE__PUBLIC_BASE_URL".to_string(),
        cdn.to_string(),
    )];
    let seed_state = format!(
        "INSERT INTO avatar_warden_avatars (user_id, source_url, status, reason, \
         checked_at, next_check_at, mirror_url, object_key, sha256, size_bytes, width, height, format) \
         SELECT CAST(id AS TEXT), avatar_url, 'mirrored', 'unchanged', 1700000000, 4000000000, \
         '{cdn}avatars/9f/86/9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08-' || id || '.jpg', \
         'avatars/9f/86/9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08-' || id || '.jpg', \
         '9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08', 45000, 640, 640, 'jpeg' \
         FROM bench_users"
    );
    // Both tables as long-lived ones are: statistics, and on PostgreSQL a
    // visibility map (autovacuum's work), without which the profile table's
    // id index cannot be read index-only.
    let maintenance: &[&str] = if s.db == Db::Postgres {
        &[
            "VACUUM ANALYZE avatar_warden_avatars",
            "VACUUM ANALYZE bench_users",
        ]
    } else {
        &["ANALYZE"]
    };
    execute(profile_url, &[&[seed_state.as_str()], maintenance].concat()).await;
    run_worker(s, profile_url, dir, &storage_env, &[]);
    // `rewrite`: the CDN moved since; the measured scan rewrites every row.
    let storage_env = match s.measured {
        Measured::NewCdn => [(
            storage_env[0].0.clone(),
            "https://cdn-new.example.com/".to_string(),
        )],
        _ => storage_env,
    };
    let result = measure(s, http, origin, profile_url, dir, &storage_env, &[], None).await;
    if s.measured == Measured::NewCdn {
        assert_eq!(
            result["rewritten"].as_u64(),
            Some(s.users),
            "every mirror URL rewritten"
        );
    }
    vec![result]
}

/// `fleet` re-verifications of every avatar, each by that many scanner
/// processes at once on one PostgreSQL; the origin answers 304 at once, so
/// what is measured is claims and batched writes. WAL bytes come from
/// `pg_current_wal_lsn()`, CPU from the workers, the origin and the machine.
async fn run_fleet(
    s: &Scenario,
    fleet: &[usize],
    origin: &OriginProcess,
    profile_url: &str,
    dir: &Path,
) -> Vec<Value> {
    // The first scan mirrors every avatar, unmeasured.
    run_worker(s, profile_url, dir, &[], &[]);
    let pool = sqlx::PgPool::connect(profile_url).await.unwrap();
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let mut results = Vec::new();
    for &scanners in fleet {
        all_due_now(profile_url).await;
        // Each run starts from a table without the last run's dead rows.
        execute(profile_url, &["VACUUM ANALYZE avatar_warden_avatars"]).await;
        let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&pool)
            .await
            .unwrap();
        let (busy, origin_cpu, workers_cpu) = (
            machine_busy_secs(),
            process_cpu_secs(origin.child.id()),
            children_cpu_secs(),
        );
        let started = Instant::now();
        let runs: Vec<WorkerRun> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..scanners)
                .map(|_| scope.spawn(|| run_worker(s, profile_url, dir, &[], &[])))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let wall_secs = started.elapsed().as_secs_f64();
        let wal_bytes: i64 = sqlx::query_scalar(
            "SELECT CAST(pg_wal_lsn_diff(pg_current_wal_lsn(), CAST($1 AS pg_lsn)) AS BIGINT)",
        )
        .bind(&lsn)
        .fetch_one(&pool)
        .await
        .unwrap();
        let count = |key: &str| -> u64 {
            runs.iter()
                .map(|r| r.report[key].as_u64().unwrap_or(0))
                .sum()
        };
        let processed = count("processed");
        // Every avatar once, across the fleet, and each re-verified unchanged.
        assert_eq!(
            processed,
            s.users * s.valid_pct / 100,
            "fleet of {scanners}"
        );
        assert_eq!(count("unchanged"), processed, "fleet of {scanners}");
        let workers_cpu = {
            let after = children_cpu_secs();
            after.0 + after.1 - workers_cpu.0 - workers_cpu.1
        };
        let origin_cpu = process_cpu_secs(origin.child.id()) - origin_cpu;
        let busy = machine_busy_secs() - busy;
        let per_k = |x: f64| x / processed.max(1) as f64 * 1000.0;
        let statements: u64 = runs.iter().map(|r| r.db_statements).sum();
        let result = json!({
            "scenario": format!("{}-x{scanners}", s.name),
            "fleet_scanners": scanners,
            "users": s.users,
            "db": "postgres",
            "processed": processed,
            "per_scanner": runs.iter().map(|r| r.report["processed"].clone()).collect::<Vec<_>>(),
            "wall_secs": wall_secs,
            "avatars_per_sec": processed as f64 / wall_secs,
            "worker_cpu_secs_per_1000": per_k(workers_cpu),
            "origin_cpu_secs_per_1000": per_k(origin_cpu),
            "database_and_rest_cpu_secs_per_1000": per_k(busy - workers_cpu - origin_cpu),
            "machine_busy_pct": busy / (wall_secs * cpus as f64) * 100.0,
            "db_statements_per_1000": per_k(statements as f64),
            "wal_bytes_per_1000": per_k(wal_bytes as f64),
            "peak_rss_mib": runs.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0) as f64 / 1024.0,
        });
        eprintln!("{}", serde_json::to_string_pretty(&result).unwrap());
        results.push(result);
    }
    pool.close().await;
    results
}

/// One measured worker run of scenario `s`, as a result row.
#[allow(clippy::too_many_arguments)]
async fn measure(
    s: &Scenario,
    http: &reqwest::Client,
    origin: &str,
    profile_url: &str,
    dir: &Path,
    storage_env: &[(String, String)],
    extra_args: &[&str],
    capacity: Option<f64>,
) -> Value {
    let before = origin_stats(http, origin).await;
    let requests_before = before["requests"].as_u64().unwrap();
    let run = run_worker(s, profile_url, dir, storage_env, extra_args);
    let stats = origin_stats(http, origin).await;
    let requests = stats["requests"].as_u64().unwrap() - requests_before - 1;
    let processed = run.report["processed"].as_u64().unwrap_or(0);
    let scan_secs = run.report["duration_secs"]
        .as_f64()
        .unwrap_or(run.wall_secs);
    // A benchmark that silently measured less than it was asked to would lie.
    // A re-verification takes the mirrored avatars (expired ones wait for a new URL).
    let expected = if s.measured.settled() {
        0
    } else if s.recheck.is_some() {
        s.users * s.valid_pct / 100
    } else {
        s.users
    };
    assert_eq!(
        processed, expected,
        "the scan did not process every due avatar"
    );
    assert!(
        requests >= processed,
        "{requests} origin requests for {processed} avatars"
    );
    let bytes_downloaded = run.report["bytes_downloaded"].as_u64().unwrap_or(0);
    if s.recheck.is_some() {
        // Every mirrored avatar must have been re-verified, none mirrored anew.
        assert_eq!(
            run.report["unchanged"].as_u64(),
            run.report["by_status"]["mirrored"].as_u64(),
            "not all re-verified unchanged: {}",
            run.report
        );
    }
    let per_k = |x: f64| x / processed.max(1) as f64 * 1000.0;
    let delta = |key: &str| stats[key].as_u64().unwrap_or(0) - before[key].as_u64().unwrap_or(0);
    let quantile = |q| {
        histogram_quantile(
            &run.metrics,
            "avatar_warden_avatar_check_duration_seconds",
            q,
        )
        .map(|s| s * 1000.0)
    };
    let result = json!({
        "scenario": s.name,
        "users": s.users,
        "db": format!("{:?}", s.db).to_lowercase(),
        "store": format!("{:?}", s.store).to_lowercase(),
        "origin_latency_ms": s.latency_ms,
        "concurrency": s.concurrency,
        "batch_size": s.batch,
        "image_bytes": (!s.realistic_images).then_some(s.image_bytes),
        "image_mix": if s.realistic_images { "realistic: 640x640, 20-120 KB, median ~45 KB" } else { "uniform" },
        "idle": s.measured.settled(),
        "rewritten": run.report["rewritten"],
        "mix": {"valid_pct": s.valid_pct, "expired_pct": s.expired_pct, "gone_pct": 100 - s.valid_pct - s.expired_pct},
        "processed": processed,
        "by_status": run.report["by_status"],
        "scan_secs": scan_secs,
        "wall_secs": run.wall_secs,
        "avatars_per_sec": processed as f64 / scan_secs,
        "latency_p50_ms": quantile(0.5),
        "latency_p99_ms": quantile(0.99),
        "cpu_secs": run.cpu_secs,
        "cpu_secs_per_1000": per_k(run.cpu_secs),
        "user_cpu_secs_per_1000": per_k(run.user_secs),
        "sys_cpu_secs_per_1000": per_k(run.cpu_secs - run.user_secs),
        "cpu_secs_total": run.cpu_secs,
        "user_cpu_secs_total": run.user_secs,
        "peak_rss_mib": run.peak_rss_kib as f64 / 1024.0,
        "db_statements": run.db_statements,
        "db_statements_per_1000": per_k(run.db_statements as f64),
        "origin_requests": requests,
        "origin_capacity_rps": capacity,
        "recheck": s.recheck.map(|r| format!("{r:?}").to_lowercase()),
        "bytes_downloaded": bytes_downloaded,
        "objects_uploaded": run.report["objects_uploaded"],
        "bytes_per_avatar": bytes_downloaded as f64 / processed.max(1) as f64,
        "reverified": run.report["reverified"],
        "first_row_secs": run.first_row_secs,
        "host_limit": s.host_limit,
        "refused_429": delta("refused"),
        "duplicate_fetches": s.host_limit.map(|_| delta("bench_served").saturating_sub(processed)),
        "hosts": run.report["hosts"],
    });
    eprintln!("{}", serde_json::to_string_pretty(&result).unwrap());
    result
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .unwrap_or(0);
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        "cpu_model": cpu,
        "memory_gib": (mem as f64 / 1024.0 / 1024.0).round(),
        "os": std::env::consts::OS,
    })
}

/// The checkout being measured: cargo runs benchmarks from the package root.
/// Not `CARGO_MANIFEST_DIR`: with a target directory shared between clones
/// (CI's cache), a binary built in another clone would write there.
fn project_dir() -> PathBuf {
    std::env::current_dir().expect("a working directory")
}

fn git_commit() -> String {
    Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".into(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_string(),
        )
}

fn fmt_opt(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

/// A Markdown table and a blank line after it.
fn md_table(md: &mut String, header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    md.push_str(&format!("| {} |\n", header.join(" | ")));
    md.push_str(&format!("|{}\n", "---|".repeat(header.len())));
    for row in rows {
        md.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    md.push('\n');
}

fn markdown(results: &[Value], machine: &Value, command: &str, date: &str, commit: &str) -> String {
    let mut md = format!(
        "\n## {date} — commit {commit}\n\nMachine: {} CPUs ({}), {} GiB; {}.\nCommand: `{command}`\n\n",
        machine["cpus"],
        machine["cpu_model"].as_str().unwrap_or(""),
        machine["memory_gib"],
        machine["os"].as_str().unwrap_or("")
    );
    let slow: Vec<&Value> = results
        .iter()
        .filter(|r| !r["host_limit"].is_null())
        .collect();
    if !slow.is_empty() {
        md.push_str("| slow-host scenario | users | latency | host refuses beyond | avatars/s | 429s | 429 share | duplicate fetches | first row written after s | ended at (per host) |\n");
        md.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
        for r in &slow {
            let refused = r["refused_429"].as_u64().unwrap_or(0);
            let requests = r["origin_requests"].as_u64().unwrap_or(0).max(1);
            md.push_str(&format!(
                "| {} | {} | {} ms | {} | {} | {} | {:.1} % | {} | {} | {} |\n",
                r["scenario"].as_str().unwrap_or(""),
                r["users"],
                r["origin_latency_ms"],
                r["host_limit"],
                fmt_opt(&r["avatars_per_sec"], 0),
                refused,
                refused as f64 * 100.0 / requests as f64,
                r["duplicate_fetches"],
                fmt_opt(&r["first_row_secs"], 1),
                r["hosts"][0]["concurrency"],
            ));
        }
        md.push('\n');
    }
    let fleet: Vec<&Value> = results
        .iter()
        .filter(|r| !r["fleet_scanners"].is_null())
        .collect();
    if !fleet.is_empty() {
        let rows = fleet.iter().map(|r| {
            vec![
                r["scenario"].as_str().unwrap_or("").to_string(),
                r["users"].to_string(),
                r["fleet_scanners"].to_string(),
                fmt_opt(&r["avatars_per_sec"], 0),
                fmt_opt(&r["worker_cpu_secs_per_1000"], 3),
                fmt_opt(&r["origin_cpu_secs_per_1000"], 3),
                fmt_opt(&r["database_and_rest_cpu_secs_per_1000"], 3),
                format!("{} %", fmt_opt(&r["machine_busy_pct"], 0)),
                fmt_opt(&r["db_statements_per_1000"], 1),
                fmt_opt(&r["wal_bytes_per_1000"], 0),
                fmt_opt(&r["peak_rss_mib"], 1),
            ]
        });
        md_table(
            &mut md,
            &[
                "fleet scenario",
                "users",
                "scanners",
                "avatars/s",
                "worker CPU s/1k",
                "origin CPU s/1k",
                "PostgreSQL + rest CPU s/1k",
                "machine busy",
                "DB stmts/1k",
                "WAL bytes/1k",
                "peak RSS MiB (one scanner)",
            ],
            rows,
        );
    }
    let idle: Vec<&Value> = results.iter().filter(|r| r["idle"] == true).collect();
    if !idle.is_empty() {
        let rows = idle.iter().map(|r| {
            let secs = r["scan_secs"].as_f64().unwrap_or(0.0);
            let rows = r["users"].as_f64().unwrap_or(1.0);
            vec![
                r["scenario"].as_str().unwrap_or("").to_string(),
                r["users"].to_string(),
                r["db"].as_str().unwrap_or("").to_string(),
                format!("{secs:.2}"),
                format!("{:.2}", secs / rows * 1e6),
                fmt_opt(&r["cpu_secs_total"], 2),
                fmt_opt(&r["user_cpu_secs_total"], 2),
                r["db_statements"].to_string(),
                fmt_opt(&r["peak_rss_mib"], 1),
            ]
        });
        md_table(
            &mut md,
            &[
                "idle / rewrite scenario",
                "rows",
                "db",
                "scan s (nothing due)",
                "s per 1M rows",
                "worker CPU s",
                "user CPU s",
                "DB statements",
                "peak RSS MiB",
            ],
            rows,
        );
    }
    let rest: Vec<&Value> = results
        .iter()
        .filter(|r| r["fleet_scanners"].is_null() && r["idle"] != true)
        .collect();
    if rest.is_empty() {
        return md;
    }
    md.push_str("| scenario | users | db | store | images | latency | conc. | avatars/s | p50 ms | p99 ms | CPU s/1k | user CPU s/1k | sys CPU s/1k | peak RSS MiB | DB stmts/1k | origin req | origin capacity req/s | bytes dl/avatar |\n");
    md.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rest {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} ms | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r["scenario"].as_str().unwrap_or(""),
            r["users"],
            r["db"].as_str().unwrap_or(""),
            r["store"].as_str().unwrap_or(""),
            if r["image_bytes"].is_null() { "realistic".to_string() } else { format!("{} B", r["image_bytes"]) },
            r["origin_latency_ms"],
            r["concurrency"],
            fmt_opt(&r["avatars_per_sec"], 0),
            fmt_opt(&r["latency_p50_ms"], 2),
            fmt_opt(&r["latency_p99_ms"], 2),
            fmt_opt(&r["cpu_secs_per_1000"], 3),
            fmt_opt(&r["user_cpu_secs_per_1000"], 3),
            fmt_opt(&r["sys_cpu_secs_per_1000"], 3),
            fmt_opt(&r["peak_rss_mib"], 1),
            fmt_opt(&r["db_statements_per_1000"], 1),
            r["origin_requests"],
            fmt_opt(&r["origin_capacity_rps"], 0),
            fmt_opt(&r["bytes_per_avatar"], 0),
        ));
    }
    md
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let http = reqwest::Client::new();
    let mut results = Vec::new();
    for s in &args.scenarios {
        results.extend(run_scenario(s, &args, &http).await);
    }
    let machine = machine();
    let date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string();
    let commit = git_commit();
    let command = format!(
        "cargo bench --bench pipeline -- {}",
        std::env::args()
            .skip(1)
            .filter(|a| a != "--bench")
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out_dir = project_dir().join("target/bench");
    std::fs::create_dir_all(&out_dir).unwrap();
    let file = out_dir.join(format!(
        "pipeline-{}.json",
        chrono::Utc::now().format("%Y%m%dT%H%M%S")
    ));
    let doc = json!({"date": date, "commit": commit, "command": command, "machine": machine, "results": results});
    std::fs::write(&file, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    let md = markdown(&results, &machine, &command, &date, &commit);
    print!("{md}");
    eprintln!("results: {}", file.display());
    if args.append {
        use std::io::Write;
        let path = project_dir().join("BENCHMARKS.md");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .unwrap();
        f.write_all(md.as_bytes()).unwrap();
        eprintln!("appended to {}", path.display());
    }
}
