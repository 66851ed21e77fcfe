//! What an SRE reads (#18): alert rules with runbooks that exist, metrics
//! whose meaning survives empty ticks and restarts, every known label value
//! exported from the start, and the standard process metrics.

use crate::helpers::TestApp;

fn repo_file(name: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(name)).unwrap()
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens.
fn github_anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_alert_has_a_summary_a_description_and_a_runbook_section_in_the_readme() {
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&repo_file("deploy/prometheus/alerts.yml")).unwrap();
    let readme = repo_file("README.md");
    let anchors: Vec<String> = readme
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| github_anchor(l.trim_start_matches('#')))
        .collect();
    let mut alerts = 0;
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let Some(name) = rule["alert"].as_str() else {
                continue;
            };
            alerts += 1;
            let a = &rule["annotations"];
            for key in ["summary", "description", "runbook_url"] {
                assert!(
                    a[key].as_str().is_some_and(|v| !v.trim().is_empty()),
                    "{name} has no {key}"
                );
            }
            let url = a["runbook_url"].as_str().unwrap();
            let (page, anchor) = url.split_once('#').unwrap();
            assert!(page.ends_with("/README.md"), "{name}: {url}");
            assert_eq!(anchor, format!("runbook-{}", name.to_lowercase()), "{name}");
            assert!(
                anchors.iter().any(|a| a == anchor),
                "{name}: README.md has no section #{anchor}"
            );
        }
    }
    assert!(alerts >= 8, "only {alerts} alerts");
}

/// One sample of the OpenMetrics text, by its full series name with labels.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_with_nothing_due_keeps_the_last_scans_counts_and_a_restart_keeps_the_last_success()
{
    let app = TestApp::spawn().await;
    let fresh = app.deps().await;
    let text = fresh.metrics_text();
    assert_eq!(
        sample(&text, "avatar_warden_scan_last_success_timestamp_seconds"),
        Some(0.0),
        "nothing ever completed: {text}"
    );

    let report = app.scan_with(&fresh).await;
    let mirrored = report.by_status["mirrored"];
    assert!(mirrored > 0);
    let series = "avatar_warden_last_scan_avatars{status=\"mirrored\"}";
    let first = fresh.metrics_text();
    let first_success =
        sample(&first, "avatar_warden_scan_last_success_timestamp_seconds").unwrap();
    assert_eq!(sample(&first, series), Some(mirrored as f64));
    assert!(first_success > 0.0);

    // The next tick finds nothing due: the counts alerts read stay those
    // of the last real scan, while the success time moves on.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let empty = app.scan_with(&fresh).await;
    assert_eq!(empty.processed, 0);
    let after = fresh.metrics_text();
    assert_eq!(sample(&after, series), Some(mirrored as f64), "{after}");
    assert!(
        sample(&after, "avatar_warden_scan_last_success_timestamp_seconds").unwrap()
            > first_success
    );

    // A restarted worker, before its first scan, reports the last completed one.
    let restarted = app.deps().await.metrics_text();
    let resumed = sample(
        &restarted,
        "avatar_warden_scan_last_success_timestamp_seconds",
    )
    .unwrap();
    assert!(
        resumed >= first_success.floor(),
        "{resumed} after a restart, {first_success} before"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_known_label_value_and_the_process_metrics_are_exported_before_any_scan() {
    let mut app = TestApp::spawn().await;
    app.config_toml(
        r#"
[[sink]]
kind = "webhook"
name = "hook"
url = "http://127.0.0.1:9/never"
secret = "s"
"#,
    );
    let text = app.deps().await.metrics_text();
    for series in [
        "avatar_warden_scans_total{result=\"completed\"}",
        "avatar_warden_scans_total{result=\"interrupted\"}",
        "avatar_warden_scans_total{result=\"failed\"}",
        "avatar_warden_last_scan_avatars{status=\"expired\"}",
        "avatar_warden_last_scan_avatars{status=\"blocked\"}",
        "avatar_warden_avatars_processed_total{status=\"expired\",reason=\"provider_notexist\",provider=\"other\"}",
        "avatar_warden_avatars_processed_total{status=\"failing\",reason=\"rate_limited\",provider=\"other\"}",
        "avatar_warden_avatars_processed_total{status=\"mirrored\",reason=\"valid_image\",provider=\"other\"}",
        "avatar_warden_mirror_checks_total{outcome=\"changed\",method=\"head\"}",
        "avatar_warden_downloaded_bytes_total{outcome=\"other\"}",
        "avatar_warden_sink_deliveries_total{sink=\"hook\",result=\"dead\"}",
        "avatar_warden_outbox_pending{sink=\"hook\"}",
    ] {
        assert_eq!(
            sample(&text, series),
            Some(0.0),
            "{series} missing:\n{text}"
        );
    }
    assert!(
        !text.contains("reason=\"head_rejected\"") && !text.contains("reason=\"not_checked_yet\""),
        "internal codes are never outcomes"
    );
    assert!(
        text.contains("# UNIT avatar_warden_downloaded_bytes bytes"),
        "{text}"
    );
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        let v = sample(&text, name).unwrap_or_else(|| panic!("{name} missing:\n{text}"));
        assert!(v >= 0.0, "{name} {v}");
    }
    assert!(sample(&text, "process_resident_memory_bytes").unwrap() > 1e6);
    let prom = app.deps().await.metrics_prometheus_text();
    assert!(
        prom.contains("# TYPE process_cpu_seconds_total counter"),
        "{prom}"
    );
    crate::ops::promtool_check_metrics(&prom);
}

/// Every query of every panel of the Grafana dashboard, as Grafana would send
/// it for "all jobs" and a 30 s rate interval.
fn dashboard_queries() -> Vec<(String, String)> {
    let dash: serde_json::Value =
        serde_json::from_str(&repo_file("deploy/grafana/avatar-warden.json")).unwrap();
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "30s")
                .replace("$job", ".*");
            out.push((panel["title"].as_str().unwrap().to_string(), expr));
        }
    }
    out
}

#[test]
fn the_dashboard_is_importable_with_the_data_source_as_a_variable() {
    let dash: serde_json::Value =
        serde_json::from_str(&repo_file("deploy/grafana/avatar-warden.json")).unwrap();
    let vars = dash["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "no data source variable"
    );
    let mut ids = std::collections::HashSet::new();
    for panel in dash["panels"].as_array().unwrap() {
        assert!(ids.insert(panel["id"].as_i64().unwrap()), "duplicate id");
        let grid = &panel["gridPos"];
        assert!(grid["x"].as_i64().unwrap() + grid["w"].as_i64().unwrap() <= 24);
        if panel["type"] != "row" {
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{panel}");
            assert!(!panel["targets"].as_array().unwrap().is_empty());
        }
    }
    assert!(dashboard_queries().len() >= 20);
}

/// A real Prometheus scrapes a real `run` (with a sink that is down and a
/// host that throttles) and answers every panel's query with data; the alert
/// rules load and evaluate without error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_answers_every_dashboard_panel_from_a_running_worker() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use crate::ops::{KillOnDrop, free_port, tool};

    let Some(prometheus) = tool("prometheus") else {
        return;
    };
    let mut app = TestApp::spawn().await;
    app.sql(&[&format!(
        "INSERT INTO users (id, nickname, avatar_url) VALUES (90, 'throttled', '{}')",
        app.origin.url("/status/429/throttled")
    )])
    .await;
    // A sink that is down: deliveries wait in the outbox.
    app.config_toml(&format!(
        "[[sink]]\nkind = \"webhook\"\nname = \"hook\"\nurl = \"http://127.0.0.1:{}/down\"\nsecret = \"s\"\n",
        free_port()
    ));
    let port = free_port();
    app.set("METRICS__LISTEN", &format!("127.0.0.1:{port}"));
    app.set("SCHEDULE__CRON", "*/2 * * * * *");
    let _worker = KillOnDrop(
        crate::cli::command(&app, &["run"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let rules =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yml");
    let prom_port = free_port();
    let config = app.dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: avatar-warden\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n",
            rules.display()
        ),
    )
    .unwrap();
    let _prometheus = KillOnDrop(
        Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                app.dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let api = format!("http://127.0.0.1:{prom_port}/api/v1");
    let http = reqwest::Client::new();
    let query = |q: String| {
        let http = http.clone();
        let api = api.clone();
        async move {
            let url = url::Url::parse_with_params(&format!("{api}/query"), [("query", q.as_str())])
                .unwrap();
            let text = http.get(url).send().await.ok()?.text().await.ok()?;
            serde_json::from_str::<serde_json::Value>(&text).ok()
        }
    };

    // Scrapes from before and after a completed scan with a delivery attempt.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = query(
            "avatar_warden_scans_total{result=\"completed\"} > 0 and on (instance) avatar_warden_sink_deliveries_total{result=\"retried\"} > 0"
                .into(),
        )
        .await
        .is_some_and(|v| v["data"]["result"].as_array().is_some_and(|r| !r.is_empty()));
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw a completed scan"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;

    let mut problems = Vec::new();
    for (title, expr) in dashboard_queries() {
        let v = query(expr.clone()).await.unwrap();
        if v["status"] != "success" {
            problems.push(format!("{title}: {expr}: {v}"));
        } else if v["data"]["result"].as_array().is_none_or(Vec::is_empty) {
            problems.push(format!("{title}: {expr}: no series"));
        }
    }
    assert!(
        problems.is_empty(),
        "panels without data:\n{}",
        problems.join("\n")
    );

    let rules: serde_json::Value = serde_json::from_str(
        &http
            .get(format!("{api}/rules"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    let mut loaded = 0;
    for group in rules["data"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            loaded += 1;
            assert_eq!(rule["health"], "ok", "{rule}");
        }
    }
    assert!(loaded >= 10, "{rules}");
}
