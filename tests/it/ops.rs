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
    // `status` reads only: the tables come from `migrate` (or a first scan).
    assert_eq!(run(&app, &["migrate"]).status.code(), Some(0));
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
    let doc = manifest(path);
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
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (args, env, c)
}

/// The manifests' ConfigMap and Secret as the kubelet mounts them: the
/// config file, with the Secret volume's path pointing at a local copy of
/// the Secret's keys (the profile URL being the test's database).
fn mounted(app: &TestApp) -> (String, std::path::PathBuf) {
    let dir = app.dir.path().join("mounts");
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    let secret = manifest("deploy/kubernetes/secret.example.yaml");
    for (key, value) in secret["stringData"].as_mapping().unwrap() {
        let key = key.as_str().unwrap();
        let value = if key == "profile-url" {
            // As `kubectl create secret --from-file` leaves it: a trailing newline.
            format!("{}\n", app.db_url)
        } else {
            value.as_str().unwrap().to_string()
        };
        std::fs::write(secrets.join(key), value).unwrap();
    }
    let config = manifest("deploy/kubernetes/configmap.yaml")["data"]["config.toml"]
        .as_str()
        .unwrap()
        .replace(
            "/run/secrets/avatar-warden/",
            &format!("{}/", secrets.display()),
        );
    let file = dir.join("config.toml");
    std::fs::write(&file, config).unwrap();
    ("/etc/avatar-warden/config.toml".to_string(), file)
}

fn manifest(path: &str) -> serde_yaml::Value {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    serde_yaml::from_str(&std::fs::read_to_string(file).unwrap()).unwrap()
}

/// The binary with a manifest's arguments, its ConfigMap and its Secret
/// (mounted as files), except where they point at cluster services: storage
/// is the test's.
fn manifest_command(app: &TestApp, args: &[String], env: &[(String, String)]) -> Command {
    let (mount, local) = mounted(app);
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            if *a == mount {
                local.display().to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let mut cmd = command(app, &args.iter().map(String::as_str).collect::<Vec<_>>());
    // The database URL comes from the Secret file the ConfigMap names.
    cmd.env_remove("AVATAR_WARDEN__PROFILE__URL");
    cmd.env("AVATAR_WARDEN__STORAGE__KIND", "fs");
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
    assert_eq!(
        args[..3],
        ["--config", "/etc/avatar-warden/config.toml", "scan"]
    );
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
    let config_args = ["--config", "/etc/avatar-warden/config.toml", "config"].map(String::from);
    let mut cmd = manifest_command(&app, &config_args, &[]);
    cmd.envs(env.iter().cloned());
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// The gc CronJob's exact arguments: after a picture changed behind its URL
/// and the grace period passed, the old object goes and the current ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gc_cronjob_manifest_runs_as_written() {
    let (args, env, _) = container("deploy/kubernetes/gc-cronjob.yaml");
    assert_eq!(args, ["--config", "/etc/avatar-warden/config.toml", "gc"]);
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
    assert_eq!(args, ["--config", "/etc/avatar-warden/config.toml", "run"]);
    let port = c["ports"][0]["containerPort"].as_u64().unwrap();
    // The manifest's port is the built-in default listen port.
    let settings = avatar_warden::config::Settings::from_layers(None, Vec::new()).unwrap();
    assert!(settings.metrics.listen.ends_with(&format!(":{port}")));
    let mut app = TestApp::spawn().await;
    let local = free_port();
    app.set("METRICS__LISTEN", &format!("127.0.0.1:{local}"));
    let mut cmd = manifest_command(&app, &args, &env);
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
    for label in ["title", "description", "version", "revision", "licenses"] {
        assert!(
            dockerfile.contains(&format!("org.opencontainers.image.{label}=")),
            "Dockerfile lacks the OCI label {label}"
        );
    }
}

/// The pod spec of a Deployment or a CronJob.
fn pod_spec(doc: &serde_yaml::Value) -> &serde_yaml::Value {
    if doc["kind"] == "CronJob" {
        &doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    } else {
        &doc["spec"]["template"]["spec"]
    }
}

/// The core manifests pass the Kubernetes schemas (strict: an unknown field
/// fails), and the pieces fit together: what the kustomization lists exists,
/// the Service selects the Deployment's pods, the ServiceMonitor the Service
/// and its port, and every pod runs without an API token, with CPU and memory
/// limits, the ConfigMap and the Secret mounted read-only.
#[test]
fn the_kubernetes_manifests_pass_the_schemas_and_fit_together() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let kustomization = manifest("deploy/kubernetes/kustomization.yaml");
    let mut listed: Vec<String> = kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    for file in &listed {
        assert!(dir.join(file).is_file(), "kustomization lists {file}");
    }
    let deployment = manifest("deploy/kubernetes/deployment.yaml");
    let service = manifest("deploy/kubernetes/service.yaml");
    let monitor = manifest("deploy/kubernetes/servicemonitor.yaml");
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (k, v) in service["spec"]["selector"].as_mapping().unwrap() {
        assert_eq!(&pod_labels[k.as_str().unwrap()], v, "Service selects {k:?}");
    }
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .unwrap()
    {
        assert_eq!(
            &service["metadata"]["labels"][k.as_str().unwrap()],
            v,
            "ServiceMonitor selects {k:?}"
        );
    }
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"],
        service["spec"]["ports"][0]["name"]
    );
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"],
        pod_spec(&deployment)["containers"][0]["ports"][0]["name"]
    );
    for file in ["deployment.yaml", "cronjob.yaml", "gc-cronjob.yaml"] {
        let doc = manifest(&format!("deploy/kubernetes/{file}"));
        let pod = pod_spec(&doc);
        assert_eq!(pod["automountServiceAccountToken"], false, "{file}");
        let c = &pod["containers"][0];
        for resource in ["cpu", "memory"] {
            assert!(
                c["resources"]["limits"][resource].as_str().is_some(),
                "{file}: no {resource} limit"
            );
        }
        let mounts: Vec<&str> = c["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .inspect(|m| assert_eq!(m["readOnly"], true, "{file}"))
            .map(|m| m["mountPath"].as_str().unwrap())
            .collect();
        assert_eq!(
            mounts,
            ["/etc/avatar-warden", "/run/secrets/avatar-warden"],
            "{file}"
        );
        assert_eq!(pod["volumes"][0]["configMap"]["name"], "avatar-warden");
        assert_eq!(pod["volumes"][1]["secret"]["secretName"], "avatar-warden");
    }

    let Some(validate) = crate::helpers::tool(
        "kubernetes-validate",
        "scripts/install-tools, or pip install kubernetes-validate",
    ) else {
        return;
    };
    // Custom resources have no schema there; the checks above cover them.
    listed.retain(|f| f != "servicemonitor.yaml");
    listed.extend(["cronjob.yaml", "secret.example.yaml"].map(String::from));
    let out = Command::new(&validate)
        .arg("--strict")
        .args(&listed)
        .current_dir(&dir)
        .output()
        .unwrap();
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(out.status.success(), "{said}");
    assert_eq!(
        said.matches(" passed for resource ").count(),
        listed.len(),
        "{said}"
    );

    // The validator does reject a manifest with a misspelt field.
    let bad = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(dir.join("deployment.yaml"))
        .unwrap()
        .replace("readOnlyRootFilesystem", "readOnlyRootFileSystem");
    std::fs::write(bad.path().join("deployment.yaml"), text).unwrap();
    let out = Command::new(&validate)
        .args(["--strict", "deployment.yaml"])
        .current_dir(bad.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "a misspelt field passed");
}

/// The compose try-out: every image pinned to a version, a restart policy on
/// every service, a health check the binary itself answers, and environment
/// keys the binary knows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_file_pins_its_images_restarts_and_checks_health_with_the_binary() {
    let compose = manifest("deploy/compose.yaml");
    let services = compose["services"].as_mapping().unwrap();
    for (name, service) in services {
        let name = name.as_str().unwrap();
        if let Some(image) = service["image"].as_str() {
            let (_, tag) = image.rsplit_once(':').unwrap_or((image, ""));
            assert!(
                !tag.is_empty() && tag != "latest",
                "{name}: image {image} is not pinned"
            );
        }
        assert!(
            service["restart"].as_str().is_some(),
            "{name}: no restart policy"
        );
    }
    let warden = &compose["services"]["avatar-warden"];
    let test: Vec<&str> = warden["healthcheck"]["test"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(test[..2], ["CMD", "avatar-warden"]);
    // The binary accepts those arguments: with no worker up it answers
    // "unhealthy" (1), not a usage error (64).
    let app = TestApp::spawn().await;
    let mut args: Vec<&str> = test[2..].to_vec();
    args.extend(["--timeout", "1"]);
    let mut cmd = command(&app, &args);
    cmd.env(
        "AVATAR_WARDEN__METRICS__LISTEN",
        format!("127.0.0.1:{}", free_port()),
    );
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let mut cmd = command(&app, &["config"]);
    for (k, v) in warden["environment"].as_mapping().unwrap() {
        cmd.env(k.as_str().unwrap(), v.as_str().unwrap());
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// Off a terminal, `scan` logs progress lines that a log shipper can read:
/// total, done, the rate as a number and the ETA; `done` moves per avatar
/// checked, not per batch written (here one batch holds the whole scan).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_lines_count_avatars_as_they_are_checked_with_numbers_a_shipper_can_read() {
    let mut app = slow_app(Duration::from_millis(40), 120).await;
    app.set("FETCH__CONCURRENCY", "4");
    app.set("SCAN__BATCH_SIZE", "1000");
    app.set("LOG__FORMAT", "json");
    let out = run(&app, &["scan", "--progress-every", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stderr(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter(|v: &serde_json::Value| v["fields"]["message"] == "progress")
        .collect();
    assert!(!lines.is_empty(), "{}", stderr(&out));
    let mid = lines
        .iter()
        .map(|v| &v["fields"])
        .find(|f| f["done"].as_u64().is_some_and(|d| d > 0 && d < 120))
        .unwrap_or_else(|| panic!("no line saw the scan half done: {lines:?}"));
    assert_eq!(mid["total"], 120, "{mid}");
    assert!(
        mid["rate_per_sec"].as_f64().is_some_and(|r| r > 0.0),
        "{mid}"
    );
    assert!(mid["eta_secs"].as_u64().is_some(), "{mid}");
}

/// On a terminal, log lines are printed above the progress bar, never glued
/// to it: no line of the screen holds both the bar and a log message.
/// (`script` gives the scan a pseudo-terminal, so the bar is drawn.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_on_a_terminal_never_share_a_line_with_the_progress_bar() {
    let Some(script) = crate::helpers::tool("script", "apt-get install bsdutils") else {
        return;
    };
    let mut app = slow_app(Duration::from_millis(30), 150).await;
    app.set("FETCH__CONCURRENCY", "4");
    // A debug line per avatar: many log lines while the bar is drawn.
    let env: Vec<(String, String)> = app.env.clone();
    let out = Command::new(script)
        .args(["-qfec", &format!("{} scan", crate::cli::BIN), "/dev/null"])
        .envs(env)
        .env("RUST_LOG", "avatar_warden=debug")
        .env("NO_COLOR", "1")
        .env("TERM", "xterm")
        .env("COLUMNS", "200")
        .current_dir(app.dir.path())
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(screen.contains("avatars"), "no bar was drawn:\n{screen}");
    assert!(screen.contains("avatar checked"), "no log lines:\n{screen}");
    // The terminal's lines as the bar and the log left them: a carriage
    // return or an escape sequence (erase line, cursor up) starts a new
    // piece; a piece holding both the bar and a log message is the defect.
    let glued: Vec<&str> = screen
        .split(['\n', '\r', '\u{1b}'])
        .filter(|piece| piece.contains("avatars") && piece.contains("DEBUG"))
        .collect();
    assert!(
        glued.is_empty(),
        "a log line glued to the bar:\n{}",
        glued.join("\n")
    );
}
