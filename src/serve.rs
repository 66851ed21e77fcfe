//! The operations endpoint of `run`: `/metrics`, `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::metrics::{OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE};
use crate::pipeline::Deps;

const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds first, so a port clash is an error at start-up, then serves in the background.
pub(crate) async fn spawn(
    listen: &str,
    deps: Deps,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(deps);
    tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    Ok(addr)
}

/// OpenMetrics when the scraper asks for it (Prometheus does), the classic
/// text format otherwise (curl, promtool, older scrapers).
async fn metrics(State(deps): State<Deps>, headers: header::HeaderMap) -> impl IntoResponse {
    let wants_openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if wants_openmetrics {
        (
            [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
            deps.metrics.encode(),
        )
    } else {
        (
            [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
            deps.metrics.encode_prometheus(),
        )
    }
}

/// Ready when the profile database and the object store both answer.
async fn ready(State(deps): State<Deps>) -> impl IntoResponse {
    let db = tokio::time::timeout(READY_TIMEOUT, deps.db.ping()).await;
    let store = tokio::time::timeout(READY_TIMEOUT, deps.images.store().ping()).await;
    match (db, store) {
        (Ok(Ok(())), Ok(Ok(()))) => (StatusCode::OK, "ready\n".to_string()),
        (db, store) => {
            let why = |r: Result<Result<(), String>, tokio::time::error::Elapsed>| match r {
                Ok(Ok(())) => "ok".to_string(),
                Ok(Err(e)) => e,
                Err(_) => "timed out".to_string(),
            };
            let db = why(db.map(|r| r.map_err(|e| e.to_string())));
            let store = why(store.map(|r| r.map_err(|e| e.to_string())));
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("database: {db}\nstorage: {store}\n"),
            )
        }
    }
}

/// `healthcheck`: asks this host's running worker for `path` on its
/// `metrics.listen` address (a wildcard address is asked on loopback).
pub(crate) async fn probe(listen: &str, path: &str, timeout: Duration) -> Result<(), String> {
    let mut addr: SocketAddr = listen
        .parse()
        .map_err(|e| format!("metrics.listen {listen:?} is not an address: {e}"))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let url = format!("http://{addr}{path}");
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .map_err(|e| e.to_string())?;
    let answer = client
        .get(&url)
        .send()
        .await
        .map_err(|e| crate::model::error_chain(&e))?;
    if answer.status().is_success() {
        Ok(())
    } else {
        Err(format!("{url} answered {}", answer.status()))
    }
}
