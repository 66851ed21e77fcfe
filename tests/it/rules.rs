//! Verdicts users can trust: provider rules, flapping CDNs, retries and
//! politeness, against the simulated origin over real HTTP.

use std::time::{Duration, Instant};

use avatar_warden::classify::Status;
use avatar_warden::demo::origin::gray_placeholder_png;

use crate::helpers::{TestApp, sha256_hex};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_cdn_gets_mirrored_and_the_flag_waits_for_confirmations() {
    let mut app = TestApp::empty().await;
    let url = app.origin.url("/flap/dying");
    app.users(&[(1, url.clone())]).await;
    app.set("EXPIRY__CONFIRMATIONS", "2");

    // 1st look: a node still has the picture — mirror it at once.
    app.scan().await;
    let s = app.state("1").await;
    assert_eq!(s.status, Status::Mirrored);
    let mirror = s.mirror_url.clone().unwrap();

    // 2nd look: "notexist" — one signal, not enough: not flagged, re-checked soon.
    app.time_passes().await;
    app.scan().await;
    let s = app.state("1").await;
    assert_eq!(
        (s.status, s.reason.as_str()),
        (Status::Failing, "expiry_unconfirmed")
    );
    assert!(!s.reauth_required);
    assert_eq!(
        s.mirror_url.as_deref(),
        Some(mirror.as_str()),
        "the mirror stays"
    );
    assert_eq!(s.next_check_at.unwrap() - s.checked_at, 600);

    // 3rd look: the picture again (a node that has not caught up); the signal still counts.
    app.time_passes().await;
    app.scan().await;
    let s = app.state("1").await;
    assert_eq!((s.status, s.expiry_signals), (Status::Mirrored, 1));
    assert!(!s.reauth_required);

    // 4th look: the second signal confirms it.
    app.time_passes().await;
    app.scan().await;
    let s = app.state("1").await;
    assert_eq!(
        (s.status, s.reason.as_str()),
        (Status::Expired, "provider_notexist")
    );
    assert!(s.reauth_required);
    assert_eq!(
        s.mirror_url.as_deref(),
        Some(mirror.as_str()),
        "the app keeps showing the last picture"
    );
    assert_eq!(app.profile(1).await, (Some(mirror), true));
    assert_eq!(app.origin.hits("/flap/dying"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_default_settings_one_signal_expires_and_policy_can_keep_mirrored_users_quiet() {
    let mut app = TestApp::empty().await;
    app.users(&[
        (1, app.origin.url("/flap/a")),
        (2, app.origin.url("/flap/b")),
    ])
    .await;
    app.scan().await;
    app.time_passes().await;
    app.scan().await;
    assert_eq!(app.state("1").await.status, Status::Expired);
    assert!(app.state("1").await.reauth_required);

    // reauth.when_mirror_exists = keep: the mirror shows the picture, do not nag.
    app.set("REAUTH__WHEN_MIRROR_EXISTS", "keep");
    app.sql(&["UPDATE avatar_warden_avatars SET status = 'mirrored', next_check_at = 0, expiry_signals = 0 WHERE user_id = '2'"])
        .await;
    // b's next answers: the picture (3rd request), then the placeholder (4th).
    app.scan().await;
    app.time_passes().await;
    // Runs finished in the same second are not ordered: keep only this one.
    app.sql(&["DELETE FROM avatar_warden_runs"]).await;
    let deps = app.deps().await;
    let report = app.scan_with(&deps).await;
    let b = app.state("2").await;
    assert_eq!(
        (b.status, b.reauth_required),
        (Status::Expired, false),
        "{b:?}"
    );
    assert!(b.mirror_url.is_some());
    // "Flagged" is the record's own flag everywhere: the report, the runs
    // table and the metric do not count a user the policy kept quiet.
    assert_eq!(
        (report.flagged_total, report.flagged.len()),
        (0, 0),
        "{report:?}"
    );
    let metrics = deps.metrics_prometheus_text();
    assert!(
        metrics.contains("avatar_warden_reauth_flagged_total 0"),
        "{metrics}"
    );
    let runs = app
        .text("SELECT CAST(flagged AS VARCHAR(20)) FROM avatar_warden_runs")
        .await;
    assert_eq!(runs.as_deref(), Some("0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_is_honoured_within_the_run() {
    let mut app = TestApp::empty().await;
    app.users(&[(1, app.origin.url("/ratelimit/1/busy"))]).await;
    app.set("RETRY__BACKOFF_MS", "10");
    let started = Instant::now();
    let report = app.scan().await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited for Retry-After: 1"
    );
    assert_eq!(report.count(Status::Mirrored), 1);
    assert_eq!(app.origin.hits("/ratelimit/1/busy"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_are_retried_in_run_then_backed_off_and_never_flag() {
    let mut app = TestApp::empty().await;
    app.users(&[
        (1, app.origin.url("/status/503/down")),
        (2, app.origin.url("/status/403/waf")),
    ])
    .await;
    app.set("RETRY__BACKOFF_MS", "10");
    app.set("RETRY__IN_RUN", "2");
    app.scan().await;
    assert_eq!(app.origin.hits("/status/503/down"), 3, "1 try + 2 retries");
    assert_eq!(
        app.origin.hits("/status/403/waf"),
        1,
        "403 is not retried within the run"
    );
    for id in ["1", "2"] {
        let s = app.state(id).await;
        assert_eq!(s.status, Status::Failing);
        assert!(!s.reauth_required);
    }
    // After retry.max_attempts scans in a row: gave_up, still not flagged, no further checks.
    app.set("RETRY__MAX_ATTEMPTS", "2");
    app.time_passes().await;
    app.scan().await;
    let s = app.state("1").await;
    assert_eq!(
        (s.status, s.reason.as_str(), s.next_check_at),
        (Status::Failing, "gave_up", None)
    );
    assert!(!s.reauth_required);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_urls_are_judged_by_their_expiry() {
    let mut app = TestApp::empty().await;
    let now = chrono::Utc::now().timestamp();
    let past = app
        .origin
        .url(&format!("/signed/old?x-expires={}", now - 10));
    let future = app
        .origin
        .url(&format!("/signed/fresh?x-expires={}", now + 3600));
    app.users(&[(1, past), (2, future)]).await;
    app.provider_rules("[[provider]]\nname = \"test-signed\"\nhosts = [\"127.0.0.1\"]\nexpiry_param = \"x-expires\"\n");
    app.scan().await;
    let old = app.state("1").await;
    assert_eq!(
        (old.status, old.reason.as_str()),
        (Status::Expired, "signature_expired")
    );
    assert_eq!(
        app.origin.hits("/signed/old"),
        0,
        "an expired signature needs no request"
    );
    let fresh = app.state("2").await;
    assert_eq!(
        fresh.status,
        Status::Mirrored,
        "mirrored before the signature runs out"
    );
    assert!(!fresh.reauth_required);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_on_a_signed_url_means_expired() {
    let mut app = TestApp::empty().await;
    // Our clock says the signature is valid for an hour; the server already refuses it.
    let url = app.origin.url(&format!(
        "/signed/refused?x-expires={}",
        chrono::Utc::now().timestamp() + 3600
    ));
    let refusing = url.replace("/signed/refused", "/status/403/refused");
    app.users(&[(1, refusing)]).await;
    app.provider_rules("[[provider]]\nname = \"test-signed\"\nhosts = [\"127.0.0.1\"]\nexpiry_param = \"x-expires\"\n");
    app.scan().await;
    let s = app.state("1").await;
    assert_eq!(
        (s.status, s.reason.as_str()),
        (Status::Expired, "signature_rejected")
    );
    assert!(s.reauth_required);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_wechat_size_is_mirrored_with_a_fallback_to_the_stored_size() {
    let mut app = TestApp::empty().await;
    app.users(&[
        (1, app.origin.url("/sized/alice/132")),
        (2, app.origin.url("/sized/nobig-bob/132")),
    ])
    .await;
    app.provider_rules(
        "[[provider]]\nname = \"test-wechat\"\nhosts = [\"127.0.0.1\"]\nsize_segment = true\n",
    );
    app.scan().await;
    let alice = app.state("1").await;
    assert_eq!(
        (alice.status, alice.width),
        (Status::Mirrored, Some(256)),
        "/0 is the largest"
    );
    assert_eq!(
        alice.source_url,
        app.origin.url("/sized/alice/132"),
        "the verdict is about the stored URL"
    );
    assert_eq!(app.origin.hits("/sized/alice/132"), 0);
    let bob = app.state("2").await;
    assert_eq!(
        (bob.status, bob.width),
        (Status::Mirrored, Some(132)),
        "fell back to the stored size"
    );
    assert_eq!(app.origin.hits("/sized/nobig-bob/0"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_avatars_placeholders_and_changed_pictures_get_their_own_reasons() {
    let mut app = TestApp::empty().await;
    app.users(&[
        (1, app.origin.url("/avatar/jpeg/the-default")),
        (2, app.origin.url("/placeholder/x")),
        (3, app.origin.url("/status/404/changed")),
    ])
    .await;
    let placeholder_sha = sha256_hex(&gray_placeholder_png());
    app.provider_rules(&format!(
        "[[provider]]\nname = \"test-cdn\"\nhosts = [\"127.0.0.1\"]\ndefault_avatar_paths = [\"/avatar/jpeg/the-default\"]\n\
         placeholder_sha256 = [\"{placeholder_sha}\"]\nnot_found_means_changed = true\n"
    ));
    app.scan().await;
    let d = app.state("1").await;
    assert_eq!(
        (d.status, d.reason.as_str()),
        (Status::Invalid, "default_avatar")
    );
    assert!(
        d.reauth_required && d.mirror_url.is_none(),
        "not mirrored as their picture"
    );
    assert_eq!(app.origin.hits("/avatar/jpeg/the-default"), 0);
    let p = app.state("2").await;
    assert_eq!(
        (p.status, p.reason.as_str()),
        (Status::Expired, "placeholder_image")
    );
    assert!(p.mirror_url.is_none());
    let c = app.state("3").await;
    assert_eq!(
        (c.status, c.reason.as_str()),
        (Status::Expired, "avatar_changed")
    );
}
