//! The network guard against real requests: refused targets are never reached.

use avatar_warden::classify::Status;
use avatar_warden::demo::{Origin, OriginOptions};

use crate::helpers::TestApp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_from_an_allowed_target_to_a_refused_one_never_reaches_it() {
    let mut app = TestApp::empty().await;
    let canary = Origin::spawn(OriginOptions::default()).await.unwrap();
    let target = canary.url("/avatar/jpeg/secret");
    app.users(&[(1, app.origin.url(&format!("/bounce?to={target}")))])
        .await;
    // Only the first origin's port is allowed; the canary listens on another.
    app.set(
        "FETCH__ALLOWED_PORTS",
        &format!("[{}]", app.origin.addr().port()),
    );
    app.scan().await;
    let s = app.state("1").await;
    assert_eq!(
        (s.status, s.reason.as_str()),
        (Status::Blocked, "not_allowed"),
        "{s:?}"
    );
    assert!(
        s.reason_detail
            .unwrap()
            .contains(&format!("port {}", canary.addr().port()))
    );
    assert_eq!(app.origin.hits("/bounce"), 1);
    assert_eq!(
        canary.total_hits(),
        0,
        "the refused target was never contacted"
    );
    assert!(!s.reauth_required);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_allow_and_deny_lists_refuse_before_connecting() {
    let mut app = TestApp::empty().await;
    let port = app.origin.addr().port();
    app.users(&[
        (1, format!("http://localhost:{port}/avatar/jpeg/a")),
        (2, format!("http://127.0.0.1:{port}/avatar/jpeg/b")),
    ])
    .await;
    app.set("FETCH__DENIED_HOSTS", "[\"localhost\"]");
    app.set("FETCH__ALLOWED_HOSTS", "[\"127.0.0.*\"]");
    app.scan().await;
    let a = app.state("1").await;
    assert_eq!(
        (a.status, a.reason.as_str()),
        (Status::Blocked, "not_allowed")
    );
    assert!(a.reason_detail.unwrap().contains("denied_hosts"));
    assert_eq!(app.state("2").await.status, Status::Mirrored);
    assert_eq!(app.origin.hits("/avatar/jpeg/a"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_port_rule_refuses_odd_ports() {
    let mut app = TestApp::empty().await;
    app.users(&[(1, app.origin.url("/avatar/jpeg/a"))]).await;
    app.set("FETCH__ALLOWED_PORTS", "[80, 443]");
    app.scan().await;
    assert_eq!(app.state("1").await.reason, "not_allowed");
    assert_eq!(app.origin.total_hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_get_a_specific_reason_and_never_stop_the_run() {
    let app = TestApp::empty().await;
    let good = app.origin.url("/avatar/jpeg/good");
    let long = format!(
        "{}?{}",
        app.origin.url("/avatar/jpeg/long"),
        "a".repeat(2100)
    );
    app.sql(&[
        "CREATE TABLE users (id INTEGER PRIMARY KEY, avatar_url TEXT, avatar_mirror_url TEXT, avatar_reauth_required INTEGER NOT NULL DEFAULT 0)",
        &format!(
            "INSERT INTO users (id, avatar_url) VALUES (1, NULL), (2, ''), (3, '   '), (4, '{long}'), \
             (5, 'file:///etc/passwd'), (6, 'data:image/png;base64,iVBORw0KGgo='), (7, 'javascript:alert(1)'), \
             (8, 'ftp://files.example.com/a.png'), (9, '/relative/a.png'), (10, 'http://exa mple.com/a.png'), \
             (11, X'ff fe 00 68 74 74 70'), (12, '{good}'), (13, '  {good}  ')"
        )
        .replace("X'ff fe 00 68 74 74 70'", "X'fffe0068747470'"),
    ])
    .await;
    let report = app.scan().await;
    let reason = |id: &'static str| {
        let states = app.states();
        async move {
            let s = states
                .await
                .into_iter()
                .find(|r| r.user_id.to_string() == id);
            s.map(|s| (s.status, s.reason.to_string()))
        }
    };
    for id in ["1", "2", "3"] {
        assert_eq!(reason(id).await, None, "user {id} has no avatar: skipped");
    }
    let invalid = |r: &str| Some((Status::Invalid, r.to_string()));
    assert_eq!(reason("4").await, invalid("url_too_long"));
    for id in ["5", "6", "7", "8"] {
        assert_eq!(reason(id).await, invalid("unsupported_scheme"), "user {id}");
    }
    assert_eq!(reason("9").await, invalid("unparsable_url"));
    assert_eq!(reason("10").await, invalid("unparsable_url"));
    assert_eq!(
        reason("11").await,
        invalid("unparsable_url"),
        "binary junk is a row like any other"
    );
    assert_eq!(
        reason("12").await,
        Some((Status::Mirrored, "valid_image".into()))
    );
    assert_eq!(
        reason("13").await,
        Some((Status::Mirrored, "valid_image".into())),
        "surrounding spaces are trimmed"
    );
    assert_eq!(report.processed, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_metadata_stores_the_picture_without_its_gps_position() {
    let mut app = TestApp::empty().await;
    app.users(&[
        (1, app.origin.url("/exif/phone")),
        (2, app.origin.url("/exif/phone2")),
    ])
    .await;
    app.set("MEDIA__STRIP_METADATA", "true");
    app.scan().await;
    let s = app.state("1").await;
    assert_eq!(s.status, Status::Mirrored);
    let key = s.mirror_url.unwrap();
    let key = &key[key.find("avatars/").unwrap()..];
    let stored = std::fs::read(app.mirror_root().join(key)).unwrap();
    assert!(
        !stored.windows(11).any(|w| w == b"GPSLatitude"),
        "no GPS in the mirror"
    );
    assert_eq!(
        crate::helpers::sha256_hex(&stored),
        s.sha256.unwrap(),
        "the key is the stored bytes' hash"
    );
    let served = app.origin.image_bytes("jpeg", "phone").unwrap();
    assert_eq!(
        stored,
        served.to_vec(),
        "exactly the picture without the EXIF segment"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_drip_cannot_hold_a_slot_and_a_huge_declared_body_is_not_read() {
    let mut app = TestApp::empty().await;
    app.users(&[
        (1, app.origin.url("/drip/a")),
        (2, app.origin.url("/huge/b")),
    ])
    .await;
    app.set("FETCH__TIMEOUT_SECS", "2");
    app.set("RETRY__IN_RUN", "0");
    let started = std::time::Instant::now();
    app.scan().await;
    // 2 s deadline per request; the drip would take a minute, the huge body an hour.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let drip = app.state("1").await;
    assert_eq!(
        (drip.status, drip.reason.as_str()),
        (Status::Failing, "timeout")
    );
    let huge = app.state("2").await;
    assert_eq!(
        (huge.status, huge.reason.as_str()),
        (Status::Invalid, "too_large")
    );
}

/// JPEGs libjpeg and browsers display with a warning are mirrored, their
/// users never flagged; with stripping on, EXIF goes wherever it hides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flawed_but_displayable_jpegs_are_mirrored_and_stripped() {
    let mut app = TestApp::empty().await;
    let kinds = ["stray", "com0", "fill-exif", "exif-after-scan"];
    let rows: Vec<(i64, String)> = kinds
        .iter()
        .enumerate()
        .map(|(i, k)| (i as i64 + 1, app.origin.url(&format!("/quirky/{k}/q{i}"))))
        .collect();
    app.users(&rows).await;
    app.set("MEDIA__STRIP_METADATA", "true");
    app.scan().await;
    for (i, kind) in kinds.iter().enumerate() {
        let id = (i + 1).to_string();
        let s = app.state(&id).await;
        assert_eq!(
            (s.status, s.reason.as_str()),
            (Status::Mirrored, "valid_image"),
            "{kind}: {s:?}"
        );
        assert!(
            !s.reauth_required,
            "{kind}: nobody is nagged for a fine picture"
        );
        assert!(!app.profile(i as i64 + 1).await.1, "{kind}");
        let url = s.mirror_url.unwrap();
        let stored = std::fs::read(
            app.mirror_root()
                .join(&url[url.find("avatars/").unwrap()..]),
        )
        .unwrap();
        assert!(
            !stored.windows(11).any(|w| w == b"GPSLatitude"),
            "{kind}: no GPS in the mirror"
        );
        if *kind == "stray" {
            assert_eq!(
                s.reason_detail.as_deref(),
                Some("tolerated: 3 extraneous JPEG bytes skipped")
            );
        }
    }
}
