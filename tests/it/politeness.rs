//! Adaptive per-host politeness (#16): a host that answers 429 when more
//! than N requests are in flight is met near N, with few 429s; the same host
//! without a limit is not slowed down.

use std::time::{Duration, Instant};

use avatar_warden::classify::Status;

use crate::helpers::TestApp;

async fn scan_one_host(
    limit: u64,
    users: i64,
) -> (
    avatar_warden::app::ScanReport,
    Duration,
    avatar_warden::demo::LimitedStats,
) {
    let mut app = TestApp::empty().await;
    let rows: Vec<(i64, String)> = (1..=users)
        .map(|i| (i, app.origin.url(&format!("/limited/{limit}/40/p{i}"))))
        .collect();
    app.users(&rows).await;
    app.set("FETCH__CONCURRENCY", "32");
    app.set("FETCH__PER_HOST_CONCURRENCY", "10");
    let started = Instant::now();
    let report = app.scan().await;
    let took = started.elapsed();
    assert_eq!(report.count(Status::Mirrored), users as u64, "{report:?}");
    let stats = app.origin.limited_stats();
    eprintln!(
        "limit {limit}: {stats:?} in {took:?}, hosts {:?}",
        report.hosts
    );
    (report, took, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_limits_concurrency_is_met_near_its_limit() {
    let (report, took, stats) = scan_one_host(3, 300).await;
    let share = stats.refused as f64 / (stats.served + stats.refused) as f64;
    assert!(share < 0.10, "429 share {share:.3}: {stats:?}");
    let host = &report.hosts[0];
    assert!(
        (1.0..=6.0).contains(&host.concurrency),
        "ended near the host's limit of 3: {host:?}"
    );
    assert_eq!(host.push_backs, stats.refused);
    // 300 x 40 ms at 3 at once is 4 s of work.
    assert!(took < Duration::from_secs(15), "{took:?} {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_without_limits_is_not_slowed_down() {
    let (report, took, stats) = scan_one_host(1000, 300).await;
    assert_eq!(stats.refused, 0);
    assert!(report.hosts.is_empty(), "{:?}", report.hosts);
    assert_eq!(
        stats.peak_in_flight, 10,
        "every per-host slot used: {stats:?}"
    );
    // 300 x 40 ms at 10 at once is about a second of work.
    assert!(took < Duration::from_secs(8), "{took:?}");
}
