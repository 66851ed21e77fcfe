use super::*;

#[test]
fn odd_ip_literal_spellings_are_normalised_before_the_guard() {
    for raw in [
        "http://127.0.0.1/a",
        "http://2130706433/a",
        "http://0x7f.1/a",
        "http://127.1/a",
        "http://[::ffff:7f00:1]/a",
        "http://[::1]/a",
        "http://localhost/a",
        "http://LOCALHOST./a",
    ] {
        let url = Url::parse(raw).unwrap();
        assert_eq!(literal_host_class(&url), Some("loopback"), "{raw}");
    }
    let url = Url::parse("http://169.254.169.254/latest/meta-data").unwrap();
    assert_eq!(literal_host_class(&url), Some("link_local"));
    assert_eq!(
        literal_host_class(&Url::parse("https://thirdwx.qlogo.cn/x").unwrap()),
        None
    );
}

proptest::proptest! {
    /// However an IPv4 address is spelled (dotted, one decimal number,
    /// hex octets), the guard judges the address it means.
    #[test]
    fn every_spelling_of_an_ipv4_address_gets_the_same_judgement(ip in proptest::prelude::any::<u32>()) {
        let addr = std::net::Ipv4Addr::from(ip);
        let want = guard::non_public_class(IpAddr::V4(addr));
        let o = addr.octets();
        for spelling in [
            format!("http://{addr}/a"),
            format!("http://{ip}/a"),
            format!("http://0x{:x}.0x{:x}.0x{:x}.0x{:x}/a", o[0], o[1], o[2], o[3]),
            format!("http://[::ffff:{addr}]/a"),
        ] {
            let url = Url::parse(&spelling).unwrap();
            proptest::prop_assert_eq!(literal_host_class(&url), want, "{}", spelling);
        }
    }

    /// Whatever is stored in the avatar column, parsing gives a URL or a reason.
    #[test]
    fn any_avatar_string_parses_or_gets_a_reason(raw in ".{0,300}") {
        if let Err(v) = crate::classify::parse_avatar_url(&raw) {
            proptest::prop_assert_eq!(v.status, Status::Invalid);
        }
    }
}

fn settings() -> FetchSettings {
    let mut s = crate::config::Settings::from_layers(None, Vec::new())
        .unwrap()
        .fetch;
    s.allowed_ports.clear();
    s.timeout_secs = 5;
    s
}

fn fixed(pairs: &[(&str, &str)]) -> Lookup {
    let mut table = std::collections::HashMap::<String, Vec<IpAddr>>::new();
    for (host, ip) in pairs {
        table
            .entry((*host).to_string())
            .or_default()
            .push(ip.parse().unwrap());
    }
    Lookup::Fixed(table)
}

#[tokio::test]
async fn dns_answers_in_refused_ranges_never_reach_connect() {
    let cases = [
        ("::ffff:0:7f00:1", "ipv4_translated"),
        ("::ffff:0:a9fe:a9fe", "ipv4_translated"),
        ("64:ff9b:1:a00:0:100:808:808", "nat64_local_use"),
        ("168.63.129.16", "cloud_metadata"),
        ("fec0::1", "site_local"),
    ];
    for (ip, class) in cases {
        let fetcher = settings()
            .client_with(fixed(&[("avatar.test", ip)]))
            .unwrap();
        let url = Url::parse("http://avatar.test/a.jpg").unwrap();
        let err = fetcher.get(&url).await.unwrap_err();
        // Refused inside the resolver: no address was handed to connect().
        assert_eq!(err, FetchError::Blocked(class), "{ip}");
    }
}

#[tokio::test]
async fn new_ip_literal_forms_are_refused_before_any_request() {
    let fetcher = settings().client().unwrap();
    for (raw, class) in [
        ("http://[::ffff:0:7f00:1]/", "ipv4_translated"),
        ("http://[::ffff:0:a9fe:a9fe]/", "ipv4_translated"),
        ("http://[64:ff9b:1:a00:0:100:808:808]/", "nat64_local_use"),
        (
            "http://168.63.129.16/machine?comp=goalstate",
            "cloud_metadata",
        ),
        ("http://[fec0::1]/", "site_local"),
    ] {
        let err = fetcher.get(&Url::parse(raw).unwrap()).await.unwrap_err();
        assert_eq!(err, FetchError::Blocked(class), "{raw}");
    }
}

/// A one-shot HTTP forward proxy on loopback: answers every request with
/// 200 and reports the request line it was sent.
async fn recording_proxy() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = conn.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]);
                let _ = tx.send(head.lines().next().unwrap_or_default().to_string());
                let _ = conn
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn a_proxy_named_by_host_is_reachable_although_its_address_is_private() {
    let (addr, mut requests) = recording_proxy().await;
    let mut s = settings();
    s.proxy = Some(format!("http://egress-proxy:{}", addr.port()).into());
    // The proxy's name resolves to loopback, as an in-cluster proxy
    // resolves to a private address; the avatar host is never resolved here.
    let fetcher = s
        .client_with(fixed(&[("egress-proxy", "127.0.0.1")]))
        .unwrap();
    let url = Url::parse("http://thirdwx.qlogo.cn/mmopen/a/132").unwrap();
    let response = fetcher.get(&url).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        requests.recv().await.unwrap(),
        "GET http://thirdwx.qlogo.cn/mmopen/a/132 HTTP/1.1"
    );
    // IP literals are still judged here, and the proxy itself is no avatar host.
    let err = fetcher
        .get(&Url::parse("http://10.0.0.1/a").unwrap())
        .await
        .unwrap_err();
    assert_eq!(err, FetchError::Blocked("private"));
    let own = Url::parse(&format!("http://egress-proxy:{}/admin", addr.port())).unwrap();
    assert!(matches!(
        fetcher.get(&own).await.unwrap_err(),
        FetchError::NotAllowed(why) if why.contains("fetch.proxy")
    ));
    assert!(
        requests.try_recv().is_err(),
        "nothing else reached the proxy"
    );
}

#[tokio::test]
async fn socks5_resolves_destinations_here_through_the_guard() {
    let (addr, mut requests) = recording_proxy().await;
    let mut s = settings();
    s.proxy = Some(format!("socks5://socks-proxy:{}", addr.port()).into());
    let fetcher = s
        .client_with(fixed(&[
            ("socks-proxy", "127.0.0.1"),
            ("evil.test", "169.254.169.254"),
        ]))
        .unwrap();
    let err = fetcher
        .get(&Url::parse("http://evil.test/latest/meta-data").unwrap())
        .await
        .unwrap_err();
    assert_eq!(err, FetchError::Blocked("link_local"));
    assert!(requests.try_recv().is_err(), "the proxy was never asked");
}

#[tokio::test]
async fn replies_of_servers_we_talk_to_are_read_only_up_to_the_cap() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = conn.read(&mut buf).await;
        let _ = conn
            .write_all(b"HTTP/1.1 500 Oops\r\ncontent-length: 8388608\r\n\r\n")
            .await;
        // 8 MiB of error page, of which only the cap is read.
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..128 {
            if conn.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{addr}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(capped_text(response, 4096).await.len(), 4096);
}

#[test]
fn a_proxy_that_cannot_work_is_refused_at_start_up() {
    let mut s = settings();
    for (raw, why) in [
        ("ftp://proxy:21", "not supported"),
        ("proxy:3128", "not supported"),
        ("not a url", "not a URL"),
    ] {
        s.proxy = Some(raw.into());
        let Err(FetchError::Other(e)) = s.client() else {
            panic!("{raw} accepted")
        };
        assert!(e.to_string().contains(why), "{raw}: {e}");
    }
    for ok in [
        "http://p:3128",
        "https://p",
        "socks5://p:1080",
        "socks5h://u:pw@p:1080",
    ] {
        s.proxy = Some(ok.into());
        assert!(s.client().is_ok(), "{ok}");
    }
}

#[test]
fn errors_know_whether_they_are_transient_and_their_verdict() {
    assert!(FetchError::Timeout.is_transient());
    assert!(FetchError::Connect("reset".into()).is_transient());
    assert!(!FetchError::TooLarge(10).is_transient());
    assert!(!FetchError::Blocked("loopback").is_transient());
    assert_eq!(FetchError::Timeout.verdict().status, Status::Failing);
    assert_eq!(FetchError::TooLarge(10).verdict().code, "too_large");
    let blocked = FetchError::Blocked("private").verdict();
    assert_eq!(
        (blocked.status, blocked.detail.as_deref()),
        (Status::Blocked, Some("private"))
    );
}
