//! Prometheus metrics (OpenMetrics text). Names are defined here once; labels
//! are low-cardinality codes only, never user ids or URLs.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::classify::Status;
use crate::db::AvatarRecord;
use crate::pipeline::ScanReport;
use crate::storage::StoredObject;

pub const PREFIX: &str = "avatar_warden";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub status: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

struct Inner {
    registry: Registry,
    processed: Family<OutcomeLabels, Counter>,
    in_flight: Gauge,
    bytes_stored: Counter,
    objects_stored: Counter,
    objects_deduplicated: Counter,
    reauth_flagged: Counter,
    db_batch_seconds: Histogram,
    scans: Counter,
    scan_last_success: Gauge<f64, AtomicU64>,
    scan_last_duration: Gauge<f64, AtomicU64>,
}

/// Cheap to clone; all clones share one registry.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let processed = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "avatars_processed",
            "Avatars checked, by verdict status and reason",
            processed.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "avatars_in_flight",
            "Avatars being checked right now",
            in_flight.clone(),
        );
        let bytes_stored = Counter::default();
        registry.register_with_unit(
            "stored",
            "Bytes uploaded to the object store",
            Unit::Bytes,
            bytes_stored.clone(),
        );
        let objects_stored = Counter::default();
        registry.register(
            "objects_stored",
            "Objects uploaded to the object store",
            objects_stored.clone(),
        );
        let objects_deduplicated = Counter::default();
        registry.register(
            "objects_deduplicated",
            "Valid avatars whose bytes were already stored",
            objects_deduplicated.clone(),
        );
        let reauth_flagged = Counter::default();
        registry.register(
            "reauth_flagged",
            "Avatars recorded as needing re-authorization",
            reauth_flagged.clone(),
        );
        // 1 ms .. ~16 s
        let db_batch_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register_with_unit(
            "db_batch_duration",
            "Time to write one batch of outcomes",
            Unit::Seconds,
            db_batch_seconds.clone(),
        );
        let scans = Counter::default();
        registry.register("scans", "Scans completed", scans.clone());
        let scan_last_success = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "scan_last_success_timestamp",
            "Unix time the last scan finished",
            Unit::Seconds,
            scan_last_success.clone(),
        );
        let scan_last_duration = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "scan_last_duration",
            "How long the last scan took",
            Unit::Seconds,
            scan_last_duration.clone(),
        );
        registry.register(
            "build",
            "Build information",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
            }),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                processed,
                in_flight,
                bytes_stored,
                objects_stored,
                objects_deduplicated,
                reauth_flagged,
                db_batch_seconds,
                scans,
                scan_last_success,
                scan_last_duration,
            }),
        }
    }

    /// Counts an avatar in flight until the guard drops.
    pub fn in_flight_guard(&self) -> InFlight {
        self.inner.in_flight.inc();
        InFlight(self.inner.in_flight.clone())
    }

    pub fn record_outcome(&self, record: &AvatarRecord, stored: Option<&StoredObject>, size: u64) {
        let m = &self.inner;
        m.processed
            .get_or_create(&OutcomeLabels {
                status: record.status.to_string(),
                reason: record.reason.clone(),
            })
            .inc();
        if record.status.requires_reauth() {
            m.reauth_flagged.inc();
        }
        match stored {
            Some(s) if s.deduplicated => {
                m.objects_deduplicated.inc();
            }
            Some(_) => {
                m.objects_stored.inc();
                m.bytes_stored.inc_by(size);
            }
            None => {}
        }
    }

    pub fn observe_db_batch(&self, elapsed: Duration) {
        self.inner.db_batch_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn scan_finished(&self, report: &ScanReport) {
        let m = &self.inner;
        m.scans.inc();
        m.scan_last_duration.set(report.duration_secs);
        m.scan_last_success
            .set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
    }

    /// Processed count for one status, summed over reasons.
    pub fn processed(&self, status: Status) -> u64 {
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.inner.registry);
        let needle = format!("status=\"{}\"", status.as_str());
        text.lines()
            .filter(|l| {
                l.starts_with("avatar_warden_avatars_processed_total{") && l.contains(&needle)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }
}

pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::UserId;

    fn record(status: Status, reason: &str) -> AvatarRecord {
        AvatarRecord {
            user_id: UserId::Int(1),
            source_url: "https://x/y".into(),
            status,
            reason: reason.into(),
            reason_detail: None,
            mirror_url: None,
            object_key: None,
            sha256: None,
            size_bytes: None,
            width: None,
            height: None,
            format: None,
            reauth_required: status.requires_reauth(),
            attempts: 0,
            expiry_signals: 0,
            checked_at: 0,
            next_check_at: None,
        }
    }

    #[test]
    fn outcomes_are_counted_per_status_without_user_labels() {
        let m = Metrics::new();
        m.record_outcome(&record(Status::Expired, "provider_notexist"), None, 0);
        m.record_outcome(&record(Status::Expired, "not_found"), None, 0);
        m.record_outcome(&record(Status::Failing, "timeout"), None, 0);
        assert_eq!(m.processed(Status::Expired), 2);
        assert_eq!(m.processed(Status::Failing), 1);
        let text = m.encode();
        assert!(text.contains(
            "avatar_warden_avatars_processed_total{status=\"expired\",reason=\"provider_notexist\"} 1"
        ), "{text}");
        assert!(
            text.contains("avatar_warden_reauth_flagged_total 2"),
            "{text}"
        );
        assert!(!text.contains("https://x/y"));
        assert!(text.ends_with("# EOF\n"));
    }
}
