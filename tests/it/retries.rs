//! Retries within a scan (#15): decided by the error's type, bounded in time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use avatar_warden::classify::Status;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::TestApp;

/// A server that resets the first `resets` connections (RST, after reading
/// the request) and then answers with `body` as a JPEG. Counts connections.
async fn resetting_server(resets: usize, body: Vec<u8>) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                if n < resets {
                    // Linger 0: close() sends RST, as a crashing peer or a middlebox does.
                    let _ = conn.set_zero_linger();
                    drop(conn);
                    return;
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: image/jpeg\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(&body).await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_reset_is_retried_within_the_scan() {
    let app = TestApp::empty().await;
    let jpeg = app.origin.image_bytes("jpeg", "reset").unwrap().to_vec();
    let (addr, connections) = resetting_server(1, jpeg).await;
    app.users(&[(1, format!("http://{addr}/avatar.jpg"))]).await;
    app.scan().await;
    let s = app.state("1").await;
    assert_eq!(
        (s.status, s.reason.as_str()),
        (Status::Mirrored, "valid_image"),
        "{s:?}"
    );
    assert_eq!(
        connections.load(Ordering::SeqCst),
        2,
        "one reset, one retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_is_asked_again_once_per_scan() {
    let mut app = TestApp::empty().await;
    app.users(&[(1, app.origin.url("/drip/a"))]).await;
    app.set("FETCH__TIMEOUT_SECS", "2");
    app.set("RETRY__IN_RUN", "5");
    let started = Instant::now();
    app.scan().await;
    let took = started.elapsed();
    let s = app.state("1").await;
    assert_eq!((s.status, s.reason.as_str()), (Status::Failing, "timeout"));
    assert_eq!(app.origin.hits("/drip/a"), 2, "asked twice, not six times");
    // Two 2 s deadlines and one 0.5 s backoff.
    assert!(took < Duration::from_secs(6), "{took:?}");
    assert!(!s.reauth_required);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_avatar_never_holds_a_slot_past_its_budget() {
    let mut app = TestApp::empty().await;
    // Two hosts (the same origin by two names): each avatar's budget alone.
    let port = app.origin.addr().port();
    app.users(&[
        (1, app.origin.url("/drip/a")),
        (2, format!("http://localhost:{port}/status/503/b")),
    ])
    .await;
    app.set("FETCH__TIMEOUT_SECS", "2");
    app.set("RETRY__IN_RUN", "10");
    app.set("RETRY__BACKOFF_MS", "400");
    app.set("RETRY__BUDGET_SECS", "3");
    let started = Instant::now();
    app.scan().await;
    let took = started.elapsed();
    // The drip: 2 s, 0.4 s backoff, and the second attempt cut at 3 s.
    // The 503s: 0.4 + 0.8 + 1.6 s of backoff fit, the next 3.2 s would not.
    assert!(took < Duration::from_millis(4500), "{took:?}");
    assert_eq!(app.state("1").await.reason, "timeout");
    assert_eq!(app.state("2").await.reason, "server_error");
    assert_eq!(app.origin.hits("/status/503/b"), 4);
}
