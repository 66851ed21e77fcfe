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
