//! Secrets never printed (#15): every secret-bearing key, through `config`,
//! the logs and error messages of a failing `scan`, `status` and `export`.

use crate::cli::{run, stderr, stdout};
use crate::helpers::TestApp;

/// Every key that can hold a secret, with a canary value for it. A new
/// secret-bearing key belongs here (and in a `Secret`/`SecretUrl` field).
fn secret_keys(closed: u16) -> Vec<(&'static str, String, &'static str)> {
    vec![
        (
            "profile.url (password)",
            format!("postgres://warden:CANARY-DBPW@127.0.0.1:{closed}/app"),
            "CANARY-DBPW",
        ),
        (
            "fetch.proxy (password)",
            format!("http://proxyuser:CANARY-PROXY@127.0.0.1:{closed}"),
            "CANARY-PROXY",
        ),
        (
            "storage.endpoint (password and signed query)",
            format!("http://u:CANARY-EP@127.0.0.1:{closed}/?X-Amz-Signature=CANARY-SIG"),
            "CANARY-EP",
        ),
        ("storage.endpoint signed query", String::new(), "CANARY-SIG"),
        ("storage.access_key_id", "CANARY-AKID".into(), "CANARY-AKID"),
        (
            "storage.secret_access_key",
            "CANARY-SAK".into(),
            "CANARY-SAK",
        ),
        (
            "webhook url (token)",
            format!("http://127.0.0.1:{closed}/hook?token=CANARY-HOOKTOKEN"),
            "CANARY-HOOKTOKEN",
        ),
        ("webhook secret", "CANARY-HMAC".into(), "CANARY-HMAC"),
        (
            "openim api (password)",
            format!("http://admin:CANARY-OIMPW@127.0.0.1:{closed}"),
            "CANARY-OIMPW",
        ),
        (
            "openim secret",
            "CANARY-OIMSECRET".into(),
            "CANARY-OIMSECRET",
        ),
        (
            "yunxin base_url (password)",
            format!("http://y:CANARY-YXPW@127.0.0.1:{closed}"),
            "CANARY-YXPW",
        ),
        (
            "yunxin app_secret",
            "CANARY-YXSECRET".into(),
            "CANARY-YXSECRET",
        ),
    ]
}

fn assert_no_canary(what: &str, text: &str, keys: &[(&str, String, &str)]) {
    for (key, _, canary) in keys {
        assert!(!text.contains(canary), "{what} shows {key}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_key_is_ever_printed() {
    let mut app = TestApp::empty().await;
    // User 2 is decided without a request, so every sink has an event to try.
    app.users(&[
        (1, app.origin.url("/avatar/jpeg/a")),
        (2, "ftp://files.example/a.png".into()),
    ])
    .await;
    // A port nothing listens on: every sink and the proxy fail, and say so.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let keys = secret_keys(closed);
    let v = |i: usize| keys[i].1.clone();
    app.config_toml(&format!(
        r#"
[[sink]]
kind = "webhook"
url = "{hook}"
secret = "{hmac}"

[[sink]]
kind = "openim"
api = "{oim}"
secret = "{oimsecret}"
on_expired = "clear"

[[sink]]
kind = "yunxin"
base_url = "{yx}"
app_key = "key"
app_secret = "{yxsecret}"
on_expired = "clear"
"#,
        hook = v(6),
        hmac = v(7),
        oim = v(8),
        oimsecret = v(9),
        yx = v(10),
        yxsecret = v(11),
    ));
    app.set("OUTBOX__DRAIN_SECS", "2");
    app.set("OUTBOX__BACKOFF_INITIAL_SECS", "1");
    app.set("FETCH__PROXY", &v(1));
    app.env
        .push(("RUST_LOG".into(), "avatar_warden=debug,info".into()));

    // `config` with every key set.
    let db_url = app.db_url.clone();
    let s3_keys = [
        ("STORAGE__KIND", "s3".to_string()),
        ("STORAGE__BUCKET", "b".to_string()),
        ("STORAGE__ENDPOINT", format!("http://127.0.0.1:{closed}")),
        ("STORAGE__ACCESS_KEY_ID", v(4)),
        ("STORAGE__SECRET_ACCESS_KEY", v(5)),
        ("STORAGE__TIMEOUT_SECS", "1".to_string()),
    ];
    for (k, val) in &s3_keys {
        app.set(k, val);
    }
    app.set("PROFILE__URL", &v(0));
    let out = run(&app, &["config"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let shown = stdout(&out);
    assert_no_canary("config", &shown, &keys);
    assert!(shown.contains("token=REDACTED"), "{shown}");

    // A database that cannot be reached.
    app.set("PROFILE__CONNECT_TIMEOUT_SECS", "1");
    let out = run(&app, &["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert_no_canary("status error", &stderr(&out), &keys);

    // An S3 endpoint with credentials in it is refused at start-up (the
    // SDK would quote it in its errors), without repeating it.
    app.set("PROFILE__URL", &db_url);
    app.set("FETCH__PROXY", "");
    app.set("STORAGE__ENDPOINT", &v(2));
    let out = run(&app, &["scan"]);
    let logs = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(1), "{logs}");
    assert!(logs.contains("storage.endpoint must be"), "{logs}");
    assert_no_canary("scan with credentials in the S3 endpoint", &logs, &keys);
    // A plain endpoint that cannot be reached: the keys stay unsaid.
    app.set("STORAGE__ENDPOINT", &format!("http://127.0.0.1:{closed}"));
    let out = run(&app, &["scan"]);
    let logs = format!("{}{}", stdout(&out), stderr(&out));
    assert_ne!(out.status.code(), Some(0), "{logs}");
    assert_no_canary("scan with a failing S3 endpoint", &logs, &keys);

    // A scan whose proxy and sinks all fail: logs and the recorded details.
    app.env
        .retain(|(k, _)| !k.starts_with("AVATAR_WARDEN__STORAGE__"));
    app.set("STORAGE__ROOT", &app.mirror_root().display().to_string());
    app.set("FETCH__PROXY", &v(1));
    let out = run(&app, &["scan"]);
    let logs = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        logs.contains("delivery failed"),
        "the sinks were tried:\n{logs}"
    );
    assert_no_canary("scan output and logs", &logs, &keys);
    let export = stdout(&run(&app, &["export", "--format", "jsonl"]));
    assert!(export.contains("\"status\":\"failing\""), "{export}");
    assert_no_canary("export", &export, &keys);
    let status = run(&app, &["status", "--json"]);
    assert_no_canary(
        "status",
        &format!("{}{}", stdout(&status), stderr(&status)),
        &keys,
    );
}

/// `check` prints what a remote server sent: control characters (C1 CSI,
/// ANSI sequences) arrive escaped, never raw on the operator's terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_escapes_control_characters_from_the_server() {
    let app = TestApp::empty().await;
    let out = run(&app, &["check", &app.origin.url("/hostile/escape/x")]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "{text:?}"
    );
    assert!(text.contains(r"\u{9b}31mred"), "{text}");
}

/// Sinks never go through a proxy from the environment: signed bodies and
/// admin secrets reach only the configured endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinks_ignore_proxies_from_the_environment() {
    let mut app = TestApp::empty().await;
    app.users(&[(1, app.origin.url("/avatar/jpeg/a"))]).await;
    let hook = app.origin.url("/status/204/hook");
    app.config_toml(&format!(
        "[[sink]]\nkind = \"webhook\"\nurl = \"{hook}\"\nsecret = \"s\"\n"
    ));
    // A second origin plays the proxy nobody configured, and counts what reaches it.
    let proxy = avatar_warden::demo::Origin::spawn(Default::default())
        .await
        .unwrap();
    let mut cmd = crate::cli::command(&app, &["scan"]);
    for var in ["NO_PROXY", "no_proxy"] {
        cmd.env_remove(var);
    }
    for var in ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"] {
        cmd.env(var, proxy.url(""));
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(app.origin.hits("/status/204/hook"), 1, "delivered directly");
    assert_eq!(proxy.total_hits(), 0, "nothing went through the proxy");
}
