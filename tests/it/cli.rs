//! The real binary, with the arguments and environment an operator would use.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::TestApp;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_avatar-warden");

pub(crate) fn command(app: &TestApp, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("AVATAR_WARDEN") {
            cmd.env_remove(k);
        }
    }
    if let Some(file) = &app.config_file {
        cmd.arg("--config").arg(file);
    }
    cmd.args(args)
        .envs(app.env.iter().cloned())
        .current_dir(app.dir.path());
    cmd
}

pub(crate) fn run(app: &TestApp, args: &[&str]) -> Output {
    command(app, args).output().unwrap()
}

pub(crate) fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_header_that_decided_an_expired_wechat_avatar() {
    let app = TestApp::empty().await;
    let out = run(&app, &["check", &app.origin.url("/wechat/expired/someone")]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    assert!(text.contains("verdict:    expired"), "{text}");
    assert!(text.contains("detail:     X-ErrNo: -6101"), "{text}");
    assert!(text.contains("decided by: header rule X-ErrNo"), "{text}");
    assert!(
        text.contains("header:     x-info: notexist:-6101"),
        "{text}"
    );
    assert!(text.contains("http:       200 OK (1 request(s))"), "{text}");

    let out = run(
        &app,
        &["check", "--json", &app.origin.url("/avatar/webp/x")],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "mirrored");
    assert_eq!(v["image"]["format"], "webp");
    assert_eq!(v["image"]["width"], 132);

    let out = run(&app, &["check", &app.origin.url("/status/503/x")]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "failing exits 2: {}",
        stdout(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_loopback_by_default_without_contacting_it() {
    let mut app = TestApp::empty().await;
    app.set("FETCH__ALLOW_PRIVATE_NETWORKS", "false");
    let out = run(&app, &["check", &app.origin.url("/avatar/jpeg/x")]);
    let text = stdout(&out);
    assert!(text.contains("verdict:    blocked"), "{text}");
    assert!(text.contains("loopback"), "{text}");
    assert_eq!(app.origin.total_hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_exits_2_when_some_avatars_are_failing_and_export_follows_the_contract() {
    let app = TestApp::spawn().await;
    let out = run(&app, &["migrate"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("applied [1, 2, 3, 4, 5, 6, 7, 8, 9]"),
        "{}",
        stdout(&out)
    );
    let again = run(&app, &["migrate"]);
    assert!(stdout(&again).contains("already up to date"));

    let out = run(&app, &["scan"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("scanned 13 avatars"),
        "{}",
        stdout(&out)
    );

    let out = run(&app, &["export", "--format", "jsonl"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 13);
    for line in &lines {
        for key in [
            "user_id",
            "source_url",
            "status",
            "reason",
            "mirror_url",
            "sha256",
            "reauth_required",
            "checked_at",
        ] {
            assert!(line.get(key).is_some(), "missing {key} in {line}");
        }
    }
    let gao = lines.iter().find(|l| l["user_id"] == "7").unwrap();
    assert_eq!(gao["status"], "expired");
    assert_eq!(gao["reauth_required"], true);
    assert!(chrono::DateTime::parse_from_rfc3339(gao["checked_at"].as_str().unwrap()).is_ok());

    let out = run(&app, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["reauth_required"], 6, "{v}");
    assert_eq!(v["counts"]["mirrored"], 6, "{v}");

    // Nothing failing is due yet, so a second scan has nothing to do and exits 0.
    let out = run(&app, &["scan"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_typo_exits_1_and_names_the_variable() {
    let mut app = TestApp::spawn().await;
    app.set("FETCH__CONCURENCY", "4");
    let out = run(&app, &["scan"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("AVATAR_WARDEN__FETCH__CONCURENCY"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_fails_when_no_worker_answers_and_says_why_once() {
    let mut app = TestApp::spawn().await;
    let port = crate::ops::free_port();
    app.set("METRICS__LISTEN", &format!("0.0.0.0:{port}"));
    let out = run(&app, &["healthcheck", "--timeout", "2"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("Connection refused"), "{err}");
    // A wildcard listen address is asked on loopback; the URL is said once.
    assert_eq!(
        err.matches(&format!("http://127.0.0.1:{port}/healthz"))
            .count(),
        1,
        "{err}"
    );
}

#[test]
fn completions_for_each_shell_and_a_version_with_the_commit() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        for word in ["verify-store", "healthcheck", "failing-exit-code"] {
            assert!(text.contains(word), "{shell} completions lack {word}");
        }
    }
    let out = Command::new(BIN).arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&out.stdout);
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let expected = match head {
        Some(commit) => format!("avatar-warden {} ({commit})\n", env!("CARGO_PKG_VERSION")),
        // Built outside a checkout (a source tarball): says so.
        None => format!("avatar-warden {} (unknown)\n", env!("CARGO_PKG_VERSION")),
    };
    assert_eq!(version, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_that_is_missing_or_mistyped_is_named_with_where_it_went_wrong() {
    let mut app = TestApp::spawn().await;
    let missing = app.dir.path().join("nope.toml");
    app.config_file = Some(missing.clone());
    let out = run(&app, &["status"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "cannot read configuration file {}",
            missing.display()
        )) && err.contains("No such file"),
        "{err}"
    );
    app.config_toml(
        "[profile]
table = users
",
    );
    let out = run(&app, &["config"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(", line 2, column 9: invalid TOML"), "{err}");
    // Said once: the cause is not repeated by its context.
    assert_eq!(err.matches("invalid TOML").count(), 1, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_prints_every_verdict_and_leaves_mirrors_on_disk() {
    let app = TestApp::empty().await;
    let dir = app.dir.path().join("demo-run");
    let out = run(&app, &["demo", "--dir", dir.to_str().unwrap()]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    for word in [
        "mirrored",
        "expired",
        "failing",
        "invalid",
        "FLAGGED",
        "provider_notexist",
    ] {
        assert!(text.contains(word), "missing {word}:\n{text}");
    }
    assert!(
        text.contains(&dir.display().to_string()),
        "the demo names its directory"
    );
    let files = crate::scan::walk(&dir.join("mirror"));
    assert_eq!(files.len(), 5, "{files:?}");
    // A folder the demo did not make is never wiped.
    let foreign = app.dir.path().join("precious");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("keep.txt"), "x").unwrap();
    let out = run(&app, &["demo", "--dir", foreign.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(foreign.join("keep.txt").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_scans_on_schedule_serves_metrics_and_stops_on_sigterm() {
    let mut app = TestApp::spawn().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    app.set("METRICS__LISTEN", &format!("127.0.0.1:{port}"));
    app.set("SCHEDULE__CRON", "*/1 * * * * *");
    let mut child = command(&app, &["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        assert!(
            Instant::now() < deadline,
            "no scan seen on /metrics in time"
        );
        if let Ok(r) = http.get(format!("{base}/metrics")).send().await {
            let text = r.text().await.unwrap();
            if text.contains("avatar_warden_scans_total{result=\"completed\"} 1") {
                break text;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        metrics.contains(
            "avatar_warden_avatars_processed_total{status=\"mirrored\",reason=\"valid_image\",provider=\"other\"} 6"
        ),
        "{metrics}"
    );
    // Without an Accept header: the classic text format, which promtool lints.
    crate::ops::promtool_check_metrics(&metrics);
    let open = http
        .get(format!("{base}/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert!(
        open.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "Prometheus gets OpenMetrics"
    );
    assert!(open.text().await.unwrap().ends_with("# EOF\n"));
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    // The container health check asks the same endpoints, without curl.
    for args in [&["healthcheck"][..], &["healthcheck", "--ready"]] {
        let out = run(&app, args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
    }

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        assert!(Instant::now() < deadline, "run did not stop after SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_dry_run_reports_what_would_change_and_bad_filters_are_refused() {
    let app = TestApp::spawn().await;
    let out = run(&app, &["scan", "--dry-run"]);
    let text = stdout(&out);
    assert!(
        text.contains("DRY RUN: nothing was stored or written"),
        "{text}"
    );
    assert!(text.contains("would change:"), "{text}");
    assert!(text.contains("new -> expired"), "{text}");
    let out = run(&app, &["export"]);
    assert_eq!(stdout(&out), "", "a dry run leaves no state");

    let out = run(&app, &["scan", "--provider", "wechatt"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("unknown provider \"wechatt\""),
        "{}",
        stderr(&out)
    );
    let out = run(&app, &["scan", "--only", "dead"]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "a usage error, not \"some failing\""
    );
    assert!(stderr(&out).contains("unknown status"), "{}", stderr(&out));
}

/// Usage errors exit 64 (EX_USAGE, as sysexits and many CLIs do): 2 means
/// "done, some avatars failing" and a cron job must not confuse the two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_64_and_help_exits_0() {
    let app = TestApp::empty().await;
    for args in [
        &["scan", "--no-such-flag"][..],
        &["scan", "--shard", "5/4"],
        &["scan", "--limit", "many"],
        &["no-such-command"],
        &[],
    ] {
        let out = run(&app, args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).is_empty(), "{args:?} says why");
    }
    for args in [&["--help"][..], &["scan", "--help"], &["--version"]] {
        let out = run(&app, args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(!stdout(&out).is_empty(), "{args:?} prints to stdout");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_provider_rule_that_decided() {
    let mut app = TestApp::empty().await;
    app.provider_rules(
        "[[provider]]\nname = \"test-cdn\"\nhosts = [\"127.0.0.1\"]\ndefault_avatar_paths = [\"/avatar/jpeg/default\"]\n",
    );
    let out = run(&app, &["check", &app.origin.url("/avatar/jpeg/default")]);
    let text = stdout(&out);
    assert!(text.contains("verdict:    invalid"), "{text}");
    assert!(text.contains("reason:     default_avatar"), "{text}");
    assert!(
        text.contains("decided by: provider test-cdn: default_avatar_paths"),
        "{text}"
    );
    assert!(text.contains("provider:   test-cdn"), "{text}");
    assert_eq!(app.origin.total_hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_prints_the_effective_settings_without_secrets() {
    let mut app = TestApp::empty().await;
    app.set("PROFILE__URL", "postgres://warden:hunter2@db.internal/app");
    app.set("STORAGE__SECRET_ACCESS_KEY", "very-secret");
    let out = run(&app, &["config"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        text.contains("postgres://warden:REDACTED@db.internal/app"),
        "{text}"
    );
    assert!(
        !text.contains("hunter2") && !text.contains("very-secret"),
        "{text}"
    );
    // Nor in --help, nor in the error of a failing connection.
    let help = stdout(&run(&app, &["--help"]));
    assert!(!help.contains("hunter2"));
    app.set("PROFILE__URL", "postgres://warden:hunter2@127.0.0.1:1/app");
    app.set("PROFILE__CONNECT_TIMEOUT_SECS", "1");
    let out = run(&app, &["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!stderr(&out).contains("hunter2"), "{}", stderr(&out));
}

/// What the container does: WORKDIR holds config/, AVATAR_WARDEN_ENV=production,
/// the rest by environment, ENTRYPOINT avatar-warden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_environment_selects_production_settings() {
    let app = TestApp::empty().await;
    let out = Command::new(BIN)
        .arg("config")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("AVATAR_WARDEN_ENV", "production")
        .env("AVATAR_WARDEN__STORAGE__BUCKET", "avatars")
        .env("AVATAR_WARDEN__PROFILE__URL", &app.db_url)
        .output()
        .unwrap();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(text.contains("format = \"json\""), "{text}");
    assert!(text.contains("kind = \"s3\""), "{text}");
    assert!(text.contains("bucket = \"avatars\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_writes_its_report_and_a_textfile_for_node_exporter() {
    let app = TestApp::spawn().await;
    let md = app.dir.path().join("scan.md");
    let prom = app.dir.path().join("avatar_warden.prom");
    let out = run(
        &app,
        &[
            "scan",
            "--report",
            md.to_str().unwrap(),
            "--metrics-file",
            prom.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let md = std::fs::read_to_string(md).unwrap();
    assert!(md.contains("| mirrored | 6 |"), "{md}");
    let prom = std::fs::read_to_string(prom).unwrap();
    assert!(
        prom.contains("avatar_warden_avatars_processed_total{status=\"expired\",reason=\"provider_notexist\",provider=\"other\"} 2"),
        "{prom}"
    );
    crate::ops::promtool_check_metrics(&prom);
}

/// With `log.format = "json"` a log shipper parses every stderr line,
/// the fatal error included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_stay_json_down_to_the_fatal_error() {
    let mut app = TestApp::empty().await;
    app.set("LOG__FORMAT", "json");
    app.set("PROFILE__URL", "postgres://warden@127.0.0.1:1/app");
    app.set("PROFILE__CONNECT_TIMEOUT_SECS", "1");
    let out = run(&app, &["scan"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stderr(&out);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "the error is said");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v.get("level").is_some(), "{line}");
    }
    let last: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(last["level"], "ERROR", "{last}");
    assert!(
        last.to_string().contains("127.0.0.1:1"),
        "names where: {last}"
    );
}

/// Arguments that cannot work fail at start, before an hour-long scan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_output_arguments_fail_before_any_work() {
    let app = TestApp::empty().await;
    app.users(&[(1, app.origin.url("/avatar/jpeg/a"))]).await;
    for (args, says) in [
        (&["scan", "--pushgateway", "notaurl"][..], "http(s) URL"),
        (&["scan", "--pushgateway", "ftp://gw:9091"], "http(s) URL"),
        (
            &["scan", "--report", "/missing/dir/r.md"],
            "/missing/dir does not exist",
        ),
        (&["scan", "--report", "summary.txt"], ".json or .md"),
        (
            &["scan", "--metrics-file", "/missing/dir/m.prom"],
            "/missing/dir does not exist",
        ),
    ] {
        let out = run(&app, args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
    assert_eq!(app.origin.total_hits(), 0, "nothing was fetched");
}

/// PostgreSQL's "relation … already exists, skipping" notices (every
/// `CREATE … IF NOT EXISTS` of a start-up migration) are not logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_notices_do_not_reach_the_log_on_every_start() {
    let Some(app) = TestApp::spawn_on(crate::helpers::Backend::Postgres).await else {
        return;
    };
    assert_eq!(run(&app, &["migrate"]).status.code(), Some(0));
    let out = run(&app, &["scan", "--no-progress", "--failing-exit-code", "0"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("scan finished"), "logging at INFO: {err}");
    assert!(!err.contains("already exists, skipping"), "{err}");
}

/// A database that is down is named with its host:port and the socket's
/// own reason, not the pool's "timed out", on both server backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_named_with_host_port_and_connection_refused() {
    for url in [
        "postgres://warden@127.0.0.1:1/app",
        "mysql://warden@127.0.0.1:1/app",
    ] {
        let mut app = TestApp::empty().await;
        app.set("PROFILE__URL", url);
        app.set("PROFILE__CONNECT_TIMEOUT_SECS", "1");
        let out = run(&app, &["status"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("127.0.0.1:1"), "{url}: {err}");
        assert!(
            err.to_lowercase().contains("connection refused"),
            "{url}: {err}"
        );
        assert!(!err.contains("timed out"), "{url}: {err}");
        assert_eq!(
            err.to_lowercase().matches("connection refused").count(),
            1,
            "said once: {err}"
        );
    }
}
