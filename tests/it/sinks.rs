//! Sinks end to end: scans against the simulated origin, deliveries through
//! the outbox to stand-ins of OpenIM, Yunxin and a webhook receiver.

use std::sync::atomic::Ordering;
use std::time::Duration;

use avatar_warden::app::ScanReport;
use avatar_warden::sinks::{Deliverer, checksum, signature};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::helpers::{Backend, TestApp};
use crate::standins::{OPENIM_SECRET, StandIns, WEBHOOK_SECRET, YUNXIN_APP_KEY, YUNXIN_APP_SECRET};

const UPDATE: &str = "/openim/user/update_user_info_ex";
const TOKEN: &str = "/openim/auth/get_admin_token";
const YUNXIN: &str = "/yunxin/user/updateUinfo.action";

/// Users 1 and 3 valid, 2 expired (WeChat's -6101), 4 gone (404).
async fn app_with_sinks(backend: Backend, sinks: &str) -> Option<(TestApp, StandIns)> {
    let mut app = TestApp::empty_on(backend, Default::default()).await?;
    let ids = [(1, "valid"), (2, "expired"), (3, "valid"), (4, "gone")];
    let rows: Vec<(i64, String)> = ids
        .iter()
        .map(|(id, kind)| (*id, app.origin.url(&format!("/bench/{kind}/{id}"))))
        .collect();
    app.users(&rows).await;
    let standins = StandIns::spawn().await;
    app.config_toml(&sinks.replace("{base}", &standins.url("")));
    // Retries come back quickly in tests.
    app.set("OUTBOX__BACKOFF_INITIAL_SECS", "1");
    app.set("OUTBOX__POLL_INTERVAL_MS", "50");
    app.set("OUTBOX__DRAIN_SECS", "10");
    Some((app, standins))
}

/// A scan with the delivery loop around it, as `avatar-warden scan` runs it.
async fn scan_and_deliver(app: &TestApp) -> ScanReport {
    let settings = app.settings();
    let deps = app.deps().await;
    let opts = avatar_warden::app::ScanOptions::from_settings(&settings, CancellationToken::new());
    let deliverer = deps.deliverer(&settings.outbox);
    deps.scan_with_deliveries(&opts, deliverer).await.unwrap()
}

async fn deliverer(app: &TestApp) -> Deliverer {
    let settings = app.settings();
    app.deps().await.deliverer(&settings.outbox).unwrap()
}

async fn outbox(app: &TestApp) -> Vec<avatar_warden::db::OutboxBacklog> {
    let db = app.settings().profile.connect().await.unwrap();
    db.outbox_backlog().await.unwrap()
}

/// Deliveries waiting, all sinks (delivered rows leave the outbox).
async fn pending(app: &TestApp) -> i64 {
    outbox(app).await.iter().map(|b| b.pending).sum()
}

const OPENIM_CLEAR: &str = r#"
[[sink]]
kind = "openim"
api = "{base}/openim"
secret = "openIM123"
on_expired = "clear"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openim_gets_the_mirror_url_and_an_explicit_empty_face_url_for_dead_avatars() {
    let (app, im) = app_with_sinks(Backend::Sqlite, OPENIM_CLEAR).await.unwrap();
    im.openim_knows(&["1", "2", "3", "4"]);
    let report = scan_and_deliver(&app).await;
    assert_eq!(report.processed, 4);
    // 1 and 3 mirrored, 2 and 4 expired (clear): four updates, nothing left.
    assert_eq!(report.deliveries.delivered, 4, "{:?}", report.deliveries);

    let token_calls = im.requests(TOKEN);
    assert_eq!(token_calls.len(), 1, "one admin token for the whole run");
    assert_eq!(
        token_calls[0].json(),
        json!({"secret": OPENIM_SECRET, "userID": "imAdmin"})
    );
    let updates = im.requests(UPDATE);
    assert_eq!(updates.len(), 4);
    let by_user = |id: &str| {
        updates
            .iter()
            .find(|r| r.json()["userInfo"]["userID"] == id)
            .unwrap_or_else(|| panic!("no update for user {id}"))
            .clone()
    };
    let mirror = app.state("1").await.mirror_url.unwrap();
    assert_eq!(
        by_user("1").json(),
        json!({"userInfo": {"userID": "1", "faceURL": mirror}})
    );
    for dead in ["2", "4"] {
        let r = by_user(dead);
        assert_eq!(
            r.json(),
            json!({"userInfo": {"userID": dead, "faceURL": ""}})
        );
        // The trap: null or a missing field would be ignored by OpenIM.
        assert!(r.body.contains(r#""faceURL":"""#), "{}", r.body);
    }
    let op_ids: std::collections::HashSet<&str> =
        updates.iter().map(|r| r.header("operationid")).collect();
    assert_eq!(op_ids.len(), 4, "an operationID per request");
    assert!(updates.iter().all(|r| r.header("token") == "admin-token-1"));
    assert!(
        outbox(&app).await.is_empty(),
        "delivered rows leave the outbox"
    );

    // Nothing changed: the next scan sends nothing.
    app.time_passes().await;
    let again = scan_and_deliver(&app).await;
    assert_eq!(again.deliveries.delivered, 0);
    assert_eq!(im.requests(UPDATE).len(), 4);

    // The counters a dashboard reads, from the loop that delivered.
    let d = deliverer(&app).await;
    im.openim_knows(&["5"]);
    app.sql(&[&format!(
        "INSERT INTO users (id, avatar_url) VALUES (5, '{}')",
        app.origin.url("/bench/valid/5")
    )])
    .await;
    app.scan().await;
    d.drain(Duration::from_secs(10)).await.unwrap();
    let metrics = d.metrics.encode();
    assert!(
        metrics
            .contains(r#"avatar_warden_sink_deliveries_total{sink="openim",result="delivered"} 1"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openim_keep_policy_sends_only_mirrors_and_unknown_users_are_given_up() {
    let sinks = OPENIM_CLEAR.replace("on_expired = \"clear\"", "");
    let (app, im) = app_with_sinks(Backend::Sqlite, &sinks).await.unwrap();
    im.openim_knows(&["1"]); // user 3 is not in OpenIM: RecordNotFoundError
    let report = scan_and_deliver(&app).await;
    assert_eq!(report.deliveries.delivered, 1);
    assert_eq!(report.deliveries.dead, 1, "errCode 1004 is permanent");
    let sent: Vec<Value> = im
        .requests(UPDATE)
        .iter()
        .map(super::standins::Request::json)
        .collect();
    assert_eq!(
        sent.len(),
        2,
        "no updates for expired avatars under keep: {sent:?}"
    );
    let backlog = outbox(&app).await;
    assert_eq!(backlog.len(), 1);
    assert_eq!((backlog[0].pending, backlog[0].dead), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openim_token_is_refreshed_when_rejected_and_before_it_expires() {
    let (mut app, im) = app_with_sinks(Backend::Sqlite, OPENIM_CLEAR).await.unwrap();
    im.openim_knows(&["1", "2", "3", "4"]);
    // Tokens that live 2 s (the stand-in rejects them after that), and one
    // delivery per pass so the test decides when each one goes.
    im.inner.token_lifetime.store(2, Ordering::SeqCst);
    app.set("OUTBOX__BATCH_SIZE", "1");
    let d = deliverer(&app).await;
    app.scan().await; // verdicts and outbox rows; nothing delivered yet
    assert_eq!(pending(&app).await, 4);
    assert_eq!(d.pass().await.unwrap().delivered, 1);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    // Still valid for 0.7 s, but inside the refresh window: a new token first.
    assert_eq!(d.pass().await.unwrap().delivered, 1);
    let updates = im.requests(UPDATE);
    assert_eq!(updates.len(), 2, "no call was refused");
    assert_eq!(updates[0].header("token"), "admin-token-1");
    assert_eq!(updates[1].header("token"), "admin-token-2");
    d.drain(Duration::from_secs(10)).await.unwrap();
    assert_eq!(pending(&app).await, 0);

    // A token OpenIM rejects (TokenExpiredError) is replaced and the call repeated.
    // First the sink must hold a long-lived token, so that no refresh before
    // expiry interferes: every token so far is revoked and new ones live long
    // (the cached one is either refreshed early or rejected: a new one either way).
    im.inner.token_lifetime.store(7_776_000, Ordering::SeqCst);
    let issued: Vec<String> = im
        .inner
        .tokens
        .lock()
        .unwrap()
        .iter()
        .map(|t| t.0.clone())
        .collect();
    im.inner.revoked.lock().unwrap().extend(issued);
    let new_picture = |id: i64, n: u32| {
        format!(
            "UPDATE users SET avatar_url = '{}' WHERE id = {id}",
            app.origin.url(&format!("/bench/valid/{n}"))
        )
    };
    app.sql(&[&new_picture(1, 11)]).await;
    app.time_passes().await;
    app.scan().await;
    assert_eq!(d.drain(Duration::from_secs(10)).await.unwrap().delivered, 1);
    // Now the sink's token is the last one issued, valid for 90 days: revoke it.
    let current = im.inner.tokens.lock().unwrap().last().cloned().unwrap().0;
    im.inner.revoked.lock().unwrap().insert(current.clone());
    app.sql(&[&new_picture(2, 12)]).await;
    let before = im.requests(UPDATE).len();
    app.time_passes().await;
    app.scan().await;
    // The same sink (and token cache) as before: it still holds the revoked token.
    let counts = d.drain(Duration::from_secs(10)).await.unwrap();
    assert_eq!(counts.delivered, 1, "{counts:?}");
    let updates = im.requests(UPDATE);
    assert_eq!(updates.len(), before + 2, "rejected once, then accepted");
    assert_eq!(updates[before].header("token"), current);
    assert_ne!(updates[before + 1].header("token"), current);
}

const YUNXIN_SINK: &str = r#"
[[sink]]
kind = "yunxin"
base_url = "{base}/yunxin"
app_key = "go9dnk49bkd9jd9vmel1kglw0803mgq3"
app_secret = "4f8b5b7c2e1a"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yunxin_gets_signed_form_posts_and_waits_out_its_rate_limit() {
    let (app, im) = app_with_sinks(Backend::Sqlite, YUNXIN_SINK).await.unwrap();
    im.inner.yunxin_rate_limited.store(1, Ordering::SeqCst);
    let report = scan_and_deliver(&app).await;
    assert_eq!(report.processed, 4);
    // The first call hit code 416: everything waits for the backoff, then goes.
    let d = deliverer(&app).await;
    for _ in 0..40 {
        if pending(&app).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        d.drain(Duration::from_secs(5)).await.unwrap();
    }
    assert_eq!(pending(&app).await, 0);
    let calls = im.requests(YUNXIN);
    assert_eq!(calls.len(), 3, "one refused with 416, then users 1 and 3");
    for c in &calls {
        assert_eq!(c.header("appkey"), YUNXIN_APP_KEY);
        let sum = checksum(YUNXIN_APP_SECRET, c.header("nonce"), c.header("curtime"));
        assert_eq!(c.header("checksum"), sum);
        assert!(
            c.header("checksum")
                .chars()
                .all(|ch| !ch.is_ascii_uppercase())
        );
    }
    let forms: Vec<_> = calls.iter().map(super::standins::Request::form).collect();
    let accids: std::collections::BTreeSet<&str> =
        forms.iter().map(|f| f["accid"].as_str()).collect();
    assert_eq!(accids.into_iter().collect::<Vec<_>>(), ["1", "3"]);
    let f1 = forms.iter().find(|f| f["accid"] == "1").unwrap();
    assert_eq!(Some(f1["icon"].clone()), app.state("1").await.mirror_url);
    assert_eq!(f1.len(), 2, "only accid and icon: {f1:?}");
}

const WEBHOOK_SINK: &str = r#"
[[sink]]
kind = "webhook"
url = "{base}/hook"
secret = "whsec-test"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_events_are_signed_and_survive_an_outage_without_stalling_the_scan() {
    let (app, hook) = app_with_sinks(Backend::Sqlite, WEBHOOK_SINK).await.unwrap();
    hook.inner.webhook_down.store(true, Ordering::SeqCst);
    let report = scan_and_deliver(&app).await;
    // The scan finished and recorded everything while the receiver was down.
    assert_eq!(report.processed, 4);
    assert_eq!(report.by_status.get("mirrored"), Some(&2));
    // mirrored ×2, expired ×2, reauth.required ×2
    let backlog = outbox(&app).await;
    assert_eq!(backlog[0].sink, "webhook");
    assert_eq!(backlog[0].pending, 6, "{backlog:?}");
    let status = crate::cli::run(&app, &["status", "--json"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["outbox"][0]["pending"], 6, "{status}");

    // Back up (first answer a 500 once): everything arrives, once each.
    hook.inner.webhook_down.store(false, Ordering::SeqCst);
    hook.inner.webhook_failures.store(1, Ordering::SeqCst);
    let d = deliverer(&app).await;
    for _ in 0..40 {
        d.drain(Duration::from_secs(5)).await.unwrap();
        if pending(&app).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(pending(&app).await, 0);
    let got = hook.requests("/hook");
    assert_eq!(got.len(), 7, "6 events, one of them twice after a 500");
    let mut ids = std::collections::HashSet::new();
    let mut kinds = Vec::new();
    for r in &got {
        let sig = signature(WEBHOOK_SECRET.as_bytes(), r.body.as_bytes());
        assert_eq!(r.header("x-avatar-warden-signature"), sig);
        let event = r.json();
        assert_eq!(r.header("idempotency-key"), event["id"].as_str().unwrap());
        assert_eq!(
            r.header("x-avatar-warden-event"),
            event["type"].as_str().unwrap()
        );
        if ids.insert(event["id"].as_str().unwrap().to_string()) {
            kinds.push(format!(
                "{}:{}",
                event["user_id"].as_str().unwrap(),
                event["type"].as_str().unwrap()
            ));
        }
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "1:avatar.mirrored",
            "2:avatar.expired",
            "2:reauth.required",
            "3:avatar.mirrored",
            "4:avatar.expired",
            "4:reauth.required"
        ]
    );
    let expired = got
        .iter()
        .map(super::standins::Request::json)
        .find(|e| e["user_id"] == "2")
        .unwrap();
    assert_eq!(expired["status"], "expired");
    assert!(
        expired["source_url"]
            .as_str()
            .unwrap()
            .ends_with("/bench/expired/2")
    );
    assert!(expired["occurred_at"].as_i64().unwrap() > 1_700_000_000);
}

/// The outbox SQL (insert with the verdict, claim oldest-per-user, settle,
/// backlog) on every backend.
async fn outbox_rows_are_written_claimed_in_order_and_settled(backend: Backend) {
    let Some((app, hook)) = app_with_sinks(backend, WEBHOOK_SINK).await else {
        return;
    };
    hook.inner.webhook_down.store(true, Ordering::SeqCst);
    app.scan().await;
    // A second verdict for user 1 while the first is still undelivered.
    app.sql(&[&format!(
        "UPDATE users SET avatar_url = '{}' WHERE id = 1",
        app.origin.url("/bench/expired/1")
    )])
    .await;
    app.scan().await;
    let backlog = outbox(&app).await;
    assert_eq!(backlog[0].pending, 8, "{backlog:?}");
    let db = app.settings().profile.connect().await.unwrap();
    let now = chrono::Utc::now().timestamp();
    let claimed = db
        .claim_deliveries("webhook", now, 100, "t1", now + 60)
        .await
        .unwrap();
    // One per user at a time, oldest first.
    let users: Vec<&str> = claimed.iter().map(|d| d.user_id.as_str()).collect();
    assert_eq!(users.len(), 4, "{users:?}");
    let first_for_1 = claimed.iter().find(|d| d.user_id == "1").unwrap();
    assert_eq!(first_for_1.kind, "avatar.mirrored");
    // Leased: a second claimer gets nothing.
    assert!(
        db.claim_deliveries("webhook", now, 100, "t2", now + 60)
            .await
            .unwrap()
            .is_empty()
    );
    use avatar_warden::db::Settle;
    db.settle_delivery(first_for_1.id, "t1", &Settle::Delivered)
        .await
        .unwrap();
    for d in claimed.iter().filter(|d| d.user_id != "1") {
        db.settle_delivery(
            d.id,
            "t1",
            &Settle::Retry {
                at: now + 3600,
                error: "503".into(),
            },
        )
        .await
        .unwrap();
    }
    // User 1's next event is now first in line; the others wait for their retry.
    let next = db
        .claim_deliveries("webhook", now, 100, "t3", now + 60)
        .await
        .unwrap();
    assert_eq!(next.len(), 1, "{next:?}");
    assert_eq!(
        (next[0].user_id.as_str(), next[0].kind.as_str()),
        ("1", "avatar.expired")
    );
    db.settle_delivery(
        next[0].id,
        "t3",
        &Settle::Dead {
            error: "410".into(),
        },
    )
    .await
    .unwrap();
    let backlog = outbox(&app).await;
    assert_eq!((backlog[0].pending, backlog[0].dead), (6, 1), "{backlog:?}");
}

crate::on_every_backend!(outbox_rows_are_written_claimed_in_order_and_settled);

/// The real binary: `scan` delivers alongside and reports the deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scan_command_delivers_to_sinks_and_reports_it() {
    let (app, hook) = app_with_sinks(Backend::Sqlite, WEBHOOK_SINK).await.unwrap();
    let out = tokio::task::spawn_blocking({
        let cmd = crate::cli::command(&app, &["scan", "--json", "--no-progress"]);
        move || {
            let mut cmd = cmd;
            cmd.output().unwrap()
        }
    })
    .await
    .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", crate::cli::stderr(&out)));
    assert_eq!(report["deliveries"]["delivered"], 6, "{report}");
    assert_eq!(hook.requests("/hook").len(), 6);
    assert_eq!(pending(&app).await, 0);
}

/// `run` delivers between scans: what is in the outbox goes out without
/// waiting for the next scheduled scan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_command_delivers_between_scans() {
    let (mut app, hook) = app_with_sinks(Backend::Sqlite, WEBHOOK_SINK).await.unwrap();
    app.scan().await; // verdicts and their outbox rows; nobody delivers them yet
    assert_eq!(pending(&app).await, 6);
    app.set(
        "METRICS__LISTEN",
        &format!("127.0.0.1:{}", crate::ops::free_port()),
    );
    // Once a year: no scheduled scan during the test.
    app.set("SCHEDULE__CRON", "0 0 1 1 *");
    let _run = crate::ops::KillOnDrop(
        crate::cli::command(&app, &["run"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while hook.requests("/hook").len() < 6 {
        assert!(
            std::time::Instant::now() < deadline,
            "run delivered {} of 6",
            hook.requests("/hook").len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.requests("/hook").len(), 6, "each event once");
    assert_eq!(pending(&app).await, 0);
}
