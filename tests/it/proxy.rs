//! Proxies (#15): an operator's proxy named by host is reachable although it
//! resolves to a private address; destinations stay guarded (IP literals and
//! every redirect hop here, names at the proxy); SOCKS5 through a real proxy.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use avatar_warden::classify::Status;

use crate::helpers::{TestApp, tool};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_proxy_named_by_host_carries_avatars_and_the_guard_still_holds() {
    let mut app = TestApp::empty().await;
    let port = app.origin.addr().port();
    let via = |path: &str| format!("http://avatars.example{path}");
    let bounce = |to: &str| via(&format!("/bounce?to={to}"));
    app.users(&[
        (1, via("/avatar/jpeg/a")),
        (2, format!("http://127.0.0.1:{port}/avatar/jpeg/b")),
        (3, format!("http://localhost:{port}/avatar/jpeg/c")),
        (4, bounce("http://[::ffff:0:7f00:1]/x")),
        (5, bounce("http://[64:ff9b:1:a00:0:100:808:808]/x")),
        (6, bounce("http://168.63.129.16/machine?comp=goalstate")),
        (7, bounce("http://[fec0::1]/x")),
        (8, "http://[::ffff:0:7f00:1]/avatar/jpeg/d".into()),
        (
            9,
            "http://[64:ff9b:1:a00:0:100:808:808]/avatar/jpeg/e".into(),
        ),
    ])
    .await;
    app.set("FETCH__ALLOW_PRIVATE_NETWORKS", "false");
    // The simulated origin doubles as a forward proxy (it routes by path);
    // `localhost` resolves to loopback, which the guard would refuse.
    app.set("FETCH__PROXY", &format!("http://localhost:{port}"));
    app.scan().await;

    let a = app.state("1").await;
    assert_eq!(
        (a.status, a.reason.as_str()),
        (Status::Mirrored, "valid_image"),
        "{a:?}"
    );
    assert_eq!(app.origin.hits("/avatar/jpeg/a"), 1);
    let blocked = [
        ("2", "loopback"),
        ("3", "loopback"),
        ("4", "ipv4_translated"),
        ("5", "nat64_local_use"),
        ("6", "cloud_metadata"),
        ("7", "site_local"),
        ("8", "ipv4_translated"),
        ("9", "nat64_local_use"),
    ];
    for (id, class) in blocked {
        let s = app.state(id).await;
        assert_eq!(
            (s.status, s.reason.as_str(), s.reason_detail.as_deref()),
            (Status::Blocked, "non_public_address", Some(class)),
            "user {id}"
        );
        assert!(
            !s.reauth_required,
            "user {id}: a refused target never flags"
        );
    }
    assert_eq!(
        app.origin.hits("/bounce"),
        4,
        "only the first hops went out"
    );
    for path in [
        "/avatar/jpeg/b",
        "/avatar/jpeg/c",
        "/avatar/jpeg/d",
        "/avatar/jpeg/e",
        "/x",
    ] {
        assert_eq!(app.origin.hits(path), 0, "{path} was never reached");
    }
}

/// A real SOCKS5 server (Debian's microsocks) on loopback, killed on drop.
struct Socks {
    child: Child,
    port: u16,
}

impl Socks {
    fn spawn() -> Option<Socks> {
        let bin = tool(
            "microsocks",
            "scripts/test --with-tools, or apt-get install microsocks",
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .args(["-i", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Killed and reaped on drop, also when it never starts listening.
        let socks = Socks { child, port };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(socks);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("microsocks did not start listening on {port}");
    }
}

impl Drop for Socks {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_proxies_carry_avatars_through_a_real_socks_server() {
    let Some(mut socks) = Socks::spawn() else {
        return;
    };
    let mut app = TestApp::empty().await;
    app.users(&[
        (1, app.origin.url("/avatar/jpeg/a")),
        (2, app.origin.url("/avatar/jpeg/b")),
    ])
    .await;
    // socks5h: the proxy resolves; the proxy itself named by host.
    app.set(
        "FETCH__PROXY",
        &format!("socks5h://localhost:{}", socks.port),
    );
    app.scan().await;
    assert_eq!(app.state("1").await.status, Status::Mirrored);

    // socks5: names resolved here (through the guard when it is on).
    app.set(
        "FETCH__PROXY",
        &format!("socks5://127.0.0.1:{}", socks.port),
    );
    app.sql(&["UPDATE users SET avatar_url = avatar_url || '?v=2' WHERE id = 2"])
        .await;
    app.scan().await;
    assert_eq!(app.state("2").await.status, Status::Mirrored);

    // With the guard on, a loopback destination is refused before the proxy is asked.
    app.set("FETCH__ALLOW_PRIVATE_NETWORKS", "false");
    app.set(
        "FETCH__PROXY",
        &format!("socks5://localhost:{}", socks.port),
    );
    let port = app.origin.addr().port();
    app.sql(&[&format!(
        "UPDATE users SET avatar_url = 'http://127.0.0.1:{port}/avatar/jpeg/guarded' WHERE id = 1"
    )])
    .await;
    app.scan().await;
    let guarded = app.state("1").await;
    assert_eq!(
        (guarded.status, guarded.reason.as_str()),
        (Status::Blocked, "non_public_address")
    );
    assert_eq!(app.origin.hits("/avatar/jpeg/guarded"), 0);

    // The avatars really went through the proxy: without it, nothing passes.
    app.set("FETCH__ALLOW_PRIVATE_NETWORKS", "true");
    let _ = socks.child.kill();
    let _ = socks.child.wait();
    app.sql(&["UPDATE users SET avatar_url = avatar_url || '&v=3' WHERE id = 2"])
        .await;
    app.scan().await;
    let down = app.state("2").await;
    assert_eq!(down.status, Status::Failing, "{down:?}");
}
