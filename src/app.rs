//! The composition root's runtime pieces: the deliveries a set of wired
//! dependencies needs, and a scan with its deliveries alongside. Above the
//! pipeline and the sinks, so neither has to know the other's whole.

use crate::config::OutboxSettings;
use crate::model::ScanReport;
use crate::pipeline::{Deps, ScanError, ScanOptions, scan_once};
use crate::sinks::Deliverer;

/// The delivery loop for `deps`' sinks; `None` when none is configured.
pub fn deliverer(deps: &Deps, settings: &OutboxSettings) -> Option<Deliverer> {
    Deliverer::new(
        deps.db.clone(),
        deps.sinks.clone(),
        deps.metrics.clone(),
        settings,
    )
}

/// One scan with deliveries alongside, drained afterwards unless the scan
/// failed or was stopped; the report carries what was delivered.
pub async fn scan_with_deliveries(
    deps: &Deps,
    opts: &ScanOptions,
    deliverer: Option<Deliverer>,
) -> Result<ScanReport, ScanError> {
    let (result, deliveries) = Deliverer::alongside(deliverer, scan_once(deps, opts), |r| {
        r.as_ref().is_ok_and(|report| !report.interrupted)
    })
    .await;
    let mut report = result?;
    report.deliveries = deliveries;
    Ok(report)
}
