//! Operating it (#6): promtool on every exposition, a real Pushgateway, SIGTERM
//! in the middle of a scan, `status`, and the deploy manifests' exact arguments.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use avatar_warden::demo::OriginOptions;

use crate::cli::{command, run, stderr, stdout};
use crate::helpers::TestApp;

/// A Prometheus tool from the PATH; skipped with a reason when missing, a failure under CI.
pub fn tool(name: &str) -> Option<PathBuf> {
    crate::helpers::tool(
        name,
        "scripts/test --with-tools, or apt-get install prometheus prometheus-pushgateway",
    )
}

/// `promtool check metrics`: the exposition parses and passes Prometheus' lint.
pub fn promtool_check_metrics(text: &str) {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n--- input ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub(crate) struct KillOnDrop(pub(crate) Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real Pushgateway on a free port, stopped when dropped.
async fn pushgateway() -> Option<(KillOnDrop, String)> {
    let bin = tool("prometheus-pushgateway")?;
    let port = free_port();
    let child = Command::new(bin)
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let guard = KillOnDrop(child);
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = reqwest::get(format!("{base}/-/ready")).await
            && r.status().is_success()
        {
            return Some((guard, base));
        }
        assert!(Instant::now() < deadline, "pushgateway did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn get_text(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_shot_scan_pushes_its_run_and_the_next_push_replaces_it() {
    let Some((_gateway, base)) = pushgateway().await else {
        return;
    };
    let mut app = TestApp::spawn().await;
    app.set("METRICS__PUSH_INSTANCE", "it-push");
    let out = run(&app, &["scan", "--pushgateway", &base]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let pushed = get_text(&format!("{base}/metrics")).await;
    let mirrored = "avatar_warden_avatars_processed_total{instance=\"it-push\",job=\"avatar_warden\",provider=\"other\",reason=\"valid_image\",status=\"mirrored\"} 6";
    assert!(pushed.contains(mirrored), "{pushed}");
    assert!(
        pushed.contains("avatar_warden_last_scan_avatars{instance=\"it-push\",job=\"avatar_warden\",status=\"mirrored\"} 6"),
        "{pushed}"
    );
    assert!(
        pushed.contains(
            "avatar_warden_fetch_duration_seconds_count{instance=\"it-push\",job=\"avatar_warden\"}"
        ),
        "{pushed}"
    );
    // The gateway's whole exposition, our pushed group included, passes promtool.
    promtool_check_metrics(&pushed);

    // The next run has nothing due: its push replaces the group, so the first
    // run's per-verdict series are gone rather than left stale.
    let out = run(
        &app,
        &["scan", "--pushgateway", &base, "--failing-exit-code", "0"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let pushed = get_text(&format!("{base}/metrics")).await;
    assert!(
        !pushed.contains(mirrored),
        "stale series left behind:\n{pushed}"
    );
    assert!(
        pushed.contains("avatar_warden_last_scan_avatars{instance=\"it-push\",job=\"avatar_warden\",status=\"mirrored\"} 0"),
        "{pushed}"
    );
    assert!(
        pushed.contains("avatar_warden_scans_total{instance=\"it-push\",job=\"avatar_warden\",result=\"completed\"} 1"),
        "{pushed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_pushgateway_fails_the_run_after_its_work_is_recorded() {
    let app = TestApp::spawn().await;
    let base = format!("http://127.0.0.1:{}", free_port());
    let out = run(&app, &["scan", "--pushgateway", &base]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stderr(&out).contains("pushing to"), "{}", stderr(&out));
    assert!(stdout(&out).contains("scanned 13 avatars"));
    let recorded = app
        .text("SELECT CAST(COUNT(*) AS TEXT) FROM avatar_warden_avatars WHERE status = 'mirrored'")
        .await;
    assert_eq!(recorded.as_deref(), Some("6"));
}

/// `n` users whose avatars the origin serves after its latency.
async fn slow_app(latency: Duration, n: i64) -> TestApp {
    let app = TestApp::with_origin(OriginOptions {
        latency,
        ..OriginOptions::default()
    })
    .await;
    let rows: Vec<(i64, String)> = (1..=n)
        .map(|i| (i, app.origin.url(&format!("/avatar/jpeg/u{i}"))))
        .collect();
    app.users(&rows).await;
    app
}

pub(crate) fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// Runs `scan`, sends SIGTERM once the origin has seen `hits` requests, and
/// returns the output and how long the exit took after the signal.
async fn scan_until_sigterm(app: &TestApp, hits: u64) -> (std::process::Output, Duration) {
    let child = command(app, &["scan", "--no-progress"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.origin.total_hits() < hits {
        assert!(Instant::now() < deadline, "the scan never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sigterm(&child);
    let signalled = Instant::now();
    let out = child.wait_with_output().unwrap();
    let took = signalled.elapsed();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    (out, took)
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    app.text(sql).await.unwrap().parse().unwrap()
}

/// State rows still leased to some scan.
async fn leased(app: &TestApp) -> i64 {
    count(
        app,
        "SELECT CAST(COUNT(*) AS TEXT) FROM avatar_warden_avatars WHERE lease_token IS NOT NULL",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_scan_finishes_in_flight_avatars_records_them_and_releases_the_rest() {
    let mut app = slow_app(Duration::from_millis(800), 40).await;
    app.set("FETCH__CONCURRENCY", "4");
    app.set("SCAN__BATCH_SIZE", "100");
    app.set("SHUTDOWN__GRACE_SECS", "20");
    // SIGTERM at the second wave of requests: 4 done, 4 in flight.
    let (out, took) = scan_until_sigterm(&app, 6).await;
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert!(
        stdout(&out).contains("(interrupted by shutdown)"),
        "{}",
        stdout(&out)
    );
    let hits = app.origin.total_hits() as i64;
    let mirrored = count(
        &app,
        "SELECT CAST(COUNT(*) AS TEXT) FROM avatar_warden_avatars WHERE status = 'mirrored'",
    )
    .await;
    // Every avatar that was fetched was finished and recorded; none was started after the signal.
    assert_eq!(mirrored, hits, "{}", stdout(&out));
    assert!((6..40).contains(&mirrored), "{mirrored}");
    let leased = leased(&app).await;
    assert_eq!(
        leased, 0,
        "claimed but unchecked avatars are released at once"
    );
    assert_eq!(
        app.text("SELECT result FROM avatar_warden_runs")
            .await
            .as_deref(),
        Some("interrupted")
    );

    // The next run picks up exactly the rest.
    let out = run(&app, &["scan", "--no-progress"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("scanned {} avatars", 40 - mirrored)),
        "{}",
        stdout(&out)
    );
    assert_eq!(app.origin.total_hits(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_grace_period_runs_out_in_flight_avatars_are_abandoned_and_released() {
    let mut app = slow_app(Duration::from_secs(60), 10).await;
    app.set("FETCH__CONCURRENCY", "3");
    app.set("FETCH__TIMEOUT_SECS", "120");
    app.set("SHUTDOWN__GRACE_SECS", "1");
    let (out, took) = scan_until_sigterm(&app, 3).await;
    assert!(took < Duration::from_secs(10), "exited after {took:?}");
    assert!(
        stdout(&out).contains("3 avatars abandoned"),
        "{}",
        stdout(&out)
    );
    let leased = leased(&app).await;
    assert_eq!(leased, 0);
    let checked = count(
        &app,
        "SELECT CAST(COUNT(*) AS TEXT) FROM avatar_warden_avatars WHERE status <> 'pending'",
    )
    .await;
    assert_eq!(checked, 0, "nothing half-done is recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_backlog_the_oldest_due_item_and_the_last_run() {
    let app = TestApp::spawn().await;
    let status = |app: &TestApp| {
        let out = run(app, &["status", "--json"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap()
    };
    let before = status(&app);
    assert_eq!(before["due_backlog"], 13, "{before}");
    assert!(before["last_run"].is_null());

    let out = run(&app, &["scan", "--failing-exit-code", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let after = status(&app);
    assert_eq!(after["counts"]["mirrored"], 6, "{after}");
    assert_eq!(after["due_backlog"], 0, "{after}");
    assert_eq!(after["last_run"]["result"], "completed");
    assert_eq!(after["last_run"]["processed"], 13);
    assert!(after["oldest_due_at"].is_null());

    // Re-checks come due: the oldest shows with how long it has waited.
    app.sql(&["UPDATE avatar_warden_avatars SET next_check_at = 1000 WHERE status = 'mirrored'"])
        .await;
    let due = status(&app);
    assert_eq!(due["due_backlog"], 6, "{due}");
    assert_eq!(due["oldest_due_at"], "1970-01-01T00:16:40+00:00");
    let text = stdout(&run(&app, &["status"]));
    assert!(text.contains("due now                   6"), "{text}");
    assert!(text.contains("last run"), "{text}");
}

/// The container spec of a manifest: its args and literal env values.
fn container(path: &str) -> (Vec<String>, Vec<(String, String)>, serde_yaml::Value) {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let pod = if doc["kind"] == "CronJob" {
        &doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    } else {
        &doc["spec"]["template"]["spec"]
    };
    let c = pod["containers"][0].clone();
    let args = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let env = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (args, env, c)
}

/// The binary with a manifest's arguments and its own settings, except where
/// they point at cluster services (storage is the test's).
fn manifest_command(app: &TestApp, args: &[String], env: &[(String, String)]) -> Command {
    let mut cmd = command(app, &args.iter().map(String::as_str).collect::<Vec<_>>());
    for (k, v) in env {
        if !k.starts_with("AVATAR_WARDEN__STORAGE__") {
            cmd.env(k, v);
        }
    }
    cmd
}

/// The CronJob's exact arguments against the local stand-ins: the Pushgateway
/// address replaced by a real local one, storage by the test's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cronjob_manifest_runs_as_written() {
    let (args, env, _) = container("deploy/kubernetes/cronjob.yaml");
    assert_eq!(args[0], "scan");
    let Some((_gateway, base)) = pushgateway().await else {
        return;
    };
    let app = TestApp::spawn().await;
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            if a.starts_with("http://") {
                base.clone()
            } else {
                a.clone()
            }
        })
        .collect();
    let out = manifest_command(&app, &args, &env).output().unwrap();
    // Failing avatars do not fail the Job: the next run retries them.
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let pushed = get_text(&format!("{base}/metrics")).await;
    assert!(
        pushed.contains("avatar_warden_scans_total{instance=\"all\",job=\"avatar_warden\",result=\"completed\"} 1"),
        "{pushed}"
    );
    // Every AVATAR_WARDEN__ key the manifest sets is one the binary knows.
    let mut cmd = command(&app, &["config"]);
    cmd.envs(env.iter().cloned());
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// The gc CronJob's exact arguments: after a picture changed behind its URL
/// and the grace period passed, the old object goes and the current ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gc_cronjob_manifest_runs_as_written() {
    let (args, env, _) = container("deploy/kubernetes/gc-cronjob.yaml");
    assert_eq!(args, vec!["gc"]);
    let app = TestApp::spawn().await;
    app.scan().await;
    let referenced = app.object_keys().await;
    // An object nobody points at, last written long before the grace period.
    let orphan = format!("avatars/ab/{}.jpg", "ab".repeat(32));
    let path = app.mirror_root().join(&orphan);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"old picture").unwrap();
    crate::helpers::backdate(&path, std::time::Duration::from_secs(30 * 86_400));
    let out = manifest_command(&app, &args, &env).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("deleted 1"), "{}", stdout(&out));
    assert!(!path.exists());
    for key in referenced {
        assert!(app.mirror_root().join(&key).exists(), "{key}");
    }
}

/// The Deployment's args, port and probe paths against the real binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployment_manifest_serves_its_probes_on_its_port() {
    let (args, env, c) = container("deploy/kubernetes/deployment.yaml");
    assert_eq!(args, ["run"]);
    let port = c["ports"][0]["containerPort"].as_u64().unwrap();
    // The manifest's port is the built-in default listen port.
    let settings = avatar_warden::config::Settings::from_layers(None, Vec::new()).unwrap();
    assert!(settings.metrics.listen.ends_with(&format!(":{port}")));
    let mut app = TestApp::spawn().await;
    let local = free_port();
    app.set("METRICS__LISTEN", &format!("127.0.0.1:{local}"));
    let mut cmd = command(&app, &args.iter().map(String::as_str).collect::<Vec<_>>());
    for (k, v) in &env {
        if !k.starts_with("AVATAR_WARDEN__STORAGE__") {
            cmd.env(k, v);
        }
    }
    let child = KillOnDrop(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{local}");
    for probe in ["livenessProbe", "readinessProbe"] {
        let path = c[probe]["httpGet"]["path"].as_str().unwrap();
        assert_eq!(c[probe]["httpGet"]["port"], "metrics");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = reqwest::get(format!("{base}{path}")).await
                && r.status().is_success()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{probe} {path} never answered 200"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let annotations = &c["ports"][0];
    assert_eq!(annotations["name"], "metrics");
    drop(child);
}

fn repo_file(name: &str) -> String {
    std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(name)).unwrap()
}

/// Patterns of an ignore file, without comments and anchoring slashes.
fn ignore_patterns(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches('/').trim_end_matches('/').to_string())
        .collect()
}

/// What git ignores (the default fs store, SQLite databases and their WAL
/// files) never enters the image's build context either.
#[test]
fn the_container_build_context_leaves_out_what_git_ignores() {
    let docker = ignore_patterns(&repo_file(".dockerignore"));
    let missing: Vec<String> = ignore_patterns(&repo_file(".gitignore"))
        .into_iter()
        .filter(|p| !docker.contains(p))
        .collect();
    assert!(missing.is_empty(), ".dockerignore lacks {missing:?}");
}

/// The release binary ships without symbols; the profiling build keeps its
/// line tables; the image says what it is (OCI labels).
#[test]
fn the_release_build_is_stripped_and_the_image_labelled() {
    let cargo: toml::Table = repo_file("Cargo.toml").parse().unwrap();
    let profile = |name: &str| cargo["profile"][name].as_table().unwrap().clone();
    assert_eq!(
        profile("release").get("strip"),
        Some(&toml::Value::Boolean(true))
    );
    assert_eq!(
        profile("profiling").get("strip"),
        Some(&toml::Value::String("none".into())),
        "perf and callgrind need the line tables"
    );
    let dockerfile = repo_file("Dockerfile");
    for label in ["title", "description", "version", "licenses"] {
        assert!(
            dockerfile.contains(&format!("org.opencontainers.image.{label}=")),
            "Dockerfile lacks the OCI label {label}"
        );
    }
}
