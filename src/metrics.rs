//! Prometheus metrics (OpenMetrics text). Names are defined here once; labels
//! are low-cardinality codes only, never user ids or URLs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::model::{
    AvatarRecord, MirrorKind, OpObserver, Reason, Reverified, ScanReport, Status, StoreOp,
    StoredObject,
};

mod process;

pub(crate) const PREFIX: &str = "avatar_warden";

/// Content type of [`Metrics::encode`].
pub(crate) const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of [`Metrics::encode_prometheus`] (Pushgateway, textfile collector, promtool).
pub(crate) const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabels {
    pub status: String,
    pub reason: String,
    /// The provider rule's name, `other` when none matched.
    pub provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScanLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MirrorCheckLabels {
    /// `first_mirror`, `unchanged` or `changed`.
    outcome: &'static str,
    /// How it was decided: `get`, `conditional` (If-None-Match / If-Modified-Since) or `head`.
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DownloadLabels {
    /// `first_mirror`, `unchanged`, `changed` or `other` (no picture: expired, failing…).
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    sink: String,
    /// `delivered`, `retried` (failed, will try again) or `dead` (given up).
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    /// The provider rule's name, `other` when none matched (never a host:
    /// hosts are unbounded).
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabels {
    sink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    /// The commit it was built from (`build.rs`), or `unknown`.
    commit: String,
}

type TimeGauge = Gauge<f64, AtomicU64>;
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

struct Inner {
    registry: Registry,
    processed: Family<OutcomeLabels, Counter>,
    in_flight: Gauge,
    fetch_seconds: Histogram,
    avatar_seconds: Histogram,
    response_bytes: Histogram,
    storage_seconds: HistogramFamily<OpLabels>,
    bytes_stored: Counter,
    objects_stored: Counter,
    objects_deduplicated: Counter,
    reauth_flagged: Counter,
    db_batch_seconds: Histogram,
    due_backlog: Gauge,
    oldest_due_age: Gauge,
    scans: Family<ScanLabels, Counter>,
    scan_last_started: TimeGauge,
    scan_last_success: TimeGauge,
    scan_last_duration: TimeGauge,
    last_scan_avatars: Family<StatusLabels, Gauge>,
    deliveries: Family<DeliveryLabels, Counter>,
    outbox_pending: Family<SinkLabels, Gauge>,
    outbox_dead: Family<SinkLabels, Gauge>,
    outbox_oldest: Family<SinkLabels, TimeGauge>,
    mirror_checks: Family<MirrorCheckLabels, Counter>,
    host_push_backs: Family<ProviderLabels, Counter>,
    host_concurrency: Family<ProviderLabels, TimeGauge>,
    downloaded_bytes: Family<DownloadLabels, Counter>,
    /// Avatars checked since start, for progress display (not exported).
    progress: AtomicU64,
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

/// Avatar fetches: a loopback hit takes ~1 ms, a slow CDN node seconds, the timeout ~10 s.
fn fetch_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 12)) // 5 ms .. ~10 s
}

/// Store operations: local disk ~0.1 ms, an S3 PUT tens of ms.
fn storage_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 14)) // 0.5 ms .. ~4 s
}

impl Metrics {
    pub fn new() -> Self {
        // `process_*` carry no prefix: their names are the same in every client library.
        let mut root = Registry::default();
        root.register_collector(Box::new(process::ProcessCollector));
        let registry = root.sub_registry_with_prefix(PREFIX);
        let processed = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "avatars_processed",
            "Avatars checked, by verdict status, reason and provider",
            processed.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "avatars_in_flight",
            "Avatars being checked right now",
            in_flight.clone(),
        );
        let fetch_seconds = fetch_buckets();
        registry.register_with_unit(
            "fetch_duration",
            "Time spent fetching one avatar URL (requests and body, retries included)",
            Unit::Seconds,
            fetch_seconds.clone(),
        );
        let avatar_seconds = storage_buckets();
        registry.register_with_unit(
            "avatar_check_duration",
            "One avatar end to end: fetch, validation and storage",
            Unit::Seconds,
            avatar_seconds.clone(),
        );
        // Avatars are 2 KB (WeChat's 46 px) to a few hundred KB; 1 KiB .. 8 MiB.
        let response_bytes = Histogram::new(exponential_buckets(1024.0, 2.0, 14));
        registry.register_with_unit(
            "fetch_response_size",
            "Response body bytes read per avatar URL",
            Unit::Bytes,
            response_bytes.clone(),
        );
        let storage_seconds: HistogramFamily<OpLabels> =
            Family::new_with_constructor(storage_buckets);
        registry.register_with_unit(
            "storage_operation_duration",
            "Object store operations (exists, put)",
            Unit::Seconds,
            storage_seconds.clone(),
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
        let due_backlog = Gauge::default();
        registry.register(
            "due_backlog",
            "Avatars due for a check (never checked, URL changed, or time come), counted at scan start and end",
            due_backlog.clone(),
        );
        let oldest_due_age = Gauge::default();
        registry.register_with_unit(
            "due_oldest_age",
            "How long the avatar that came due first has waited (0 when none is due), counted at scan start and end",
            Unit::Seconds,
            oldest_due_age.clone(),
        );
        let scans = Family::<ScanLabels, Counter>::default();
        registry.register(
            "scans",
            "Scans ended, by result (completed, interrupted, failed)",
            scans.clone(),
        );
        let scan_last_started = TimeGauge::default();
        registry.register_with_unit(
            "scan_last_started_timestamp",
            "Unix time the last scan started",
            Unit::Seconds,
            scan_last_started.clone(),
        );
        let scan_last_success = TimeGauge::default();
        registry.register_with_unit(
            "scan_last_success_timestamp",
            "Unix time the last scan completed (not interrupted, no error)",
            Unit::Seconds,
            scan_last_success.clone(),
        );
        let scan_last_duration = TimeGauge::default();
        registry.register_with_unit(
            "scan_last_duration",
            "How long the last scan took",
            Unit::Seconds,
            scan_last_duration.clone(),
        );
        // Per-run numbers that read the same scraped (`run`) or pushed (`scan`):
        // alert rules compare ratios of the last scan without rate().
        let last_scan_avatars = Family::<StatusLabels, Gauge>::default();
        registry.register(
            "last_scan_avatars",
            "Avatars in the last completed scan that checked any, by verdict status (a tick with nothing due leaves it as it was)",
            last_scan_avatars.clone(),
        );
        registry.register(
            "build",
            "Build information",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
                commit: env!("AVATAR_WARDEN_COMMIT").to_string(),
            }),
        );
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            "sink_deliveries",
            "Outbox deliveries to sinks, by sink and result (delivered, retried, dead)",
            deliveries.clone(),
        );
        let outbox_pending = Family::<SinkLabels, Gauge>::default();
        registry.register(
            "outbox_pending",
            "Deliveries waiting in the outbox, by sink",
            outbox_pending.clone(),
        );
        let outbox_dead = Family::<SinkLabels, Gauge>::default();
        registry.register(
            "outbox_dead",
            "Deliveries given up on (permanent error or attempts exhausted), by sink",
            outbox_dead.clone(),
        );
        let outbox_oldest = Family::<SinkLabels, TimeGauge>::default();
        registry.register_with_unit(
            "outbox_oldest_pending_timestamp",
            "Unix time the oldest delivery still waiting for a sink was written (absent when none waits)",
            Unit::Seconds,
            outbox_oldest.clone(),
        );
        let mirror_checks = Family::<MirrorCheckLabels, Counter>::default();
        registry.register(
            "mirror_checks",
            "Pictures mirrored for the first time, re-verified unchanged, or found changed behind the same URL, by the request that decided",
            mirror_checks.clone(),
        );
        let downloaded_bytes = Family::<DownloadLabels, Counter>::default();
        registry.register_with_unit(
            "downloaded",
            "Response body bytes downloaded from avatar sources, by what the check found",
            Unit::Bytes,
            downloaded_bytes.clone(),
        );
        let host_push_backs = Family::<ProviderLabels, Counter>::default();
        registry.register(
            "host_push_backs",
            "429s, 503s and timeouts avatar hosts answered with, by provider (each halves the host's concurrency)",
            host_push_backs.clone(),
        );
        let host_concurrency = Family::<ProviderLabels, TimeGauge>::default();
        registry.register(
            "host_concurrency_limit",
            "The lowest per-host concurrency limit a provider's hosts ended the last scan with, among hosts that pushed back",
            host_concurrency.clone(),
        );
        let metrics = Metrics {
            inner: Arc::new(Inner {
                outbox_oldest,
                host_push_backs,
                host_concurrency,
                mirror_checks,
                downloaded_bytes,
                deliveries,
                outbox_pending,
                outbox_dead,
                registry: root,
                processed,
                in_flight,
                fetch_seconds,
                avatar_seconds,
                response_bytes,
                storage_seconds,
                bytes_stored,
                objects_stored,
                objects_deduplicated,
                reauth_flagged,
                db_batch_seconds,
                due_backlog,
                oldest_due_age,
                scans,
                scan_last_started,
                scan_last_success,
                scan_last_duration,
                last_scan_avatars,
                progress: AtomicU64::new(0),
            }),
        };
        metrics.known_labels();
        metrics
    }

    /// Every label value known up front starts at 0, so a query by status,
    /// reason or result finds its series before the first event (and
    /// `increase()` sees the first one).
    fn known_labels(&self) {
        let m = &self.inner;
        for result in ["completed", "interrupted", "failed"] {
            let _ = m.scans.get_or_create(&ScanLabels { result });
        }
        for status in Status::ALL {
            let _ = m.last_scan_avatars.get_or_create(&StatusLabels {
                status: status.as_str(),
            });
        }
        for reason in Reason::ALL.into_iter().filter(|r| r.is_outcome()) {
            let _ = m.processed.get_or_create(&OutcomeLabels {
                status: reason.status().to_string(),
                reason: reason.to_string(),
                provider: "other".to_string(),
            });
        }
        for outcome in MirrorKind::ALL {
            for method in ["get", "conditional", "head"] {
                let _ = m.mirror_checks.get_or_create(&MirrorCheckLabels {
                    outcome: outcome.as_str(),
                    method,
                });
            }
            let _ = m.downloaded_bytes.get_or_create(&DownloadLabels {
                outcome: outcome.as_str(),
            });
        }
        let _ = m
            .downloaded_bytes
            .get_or_create(&DownloadLabels { outcome: "other" });
        for op in StoreOp::ALL {
            let _ = m
                .storage_seconds
                .get_or_create(&OpLabels { op: op.as_str() });
        }
    }

    /// The configured sinks, so their delivery and outbox series exist from the start.
    pub fn known_sinks<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        for sink in names {
            for result in ["delivered", "retried", "dead"] {
                let _ = self.inner.deliveries.get_or_create(&DeliveryLabels {
                    sink: sink.to_string(),
                    result,
                });
            }
            let labels = SinkLabels {
                sink: sink.to_string(),
            };
            let _ = self.inner.outbox_pending.get_or_create(&labels);
            let _ = self.inner.outbox_dead.get_or_create(&labels);
        }
    }

    /// The provider rules' names (and `other`), so per-provider series exist from the start.
    pub fn known_providers<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        for provider in names.into_iter().chain(["other"]) {
            let _ = self.inner.host_push_backs.get_or_create(&ProviderLabels {
                provider: provider.to_string(),
            });
        }
    }

    /// The last completed scan recorded in the database, for a process that
    /// has not completed one yet: a restart does not look like a stalled worker.
    pub fn resume_last_success(&self, finished_at: i64) {
        let g = &self.inner.scan_last_success;
        if g.get() == 0.0 {
            #[allow(clippy::cast_precision_loss, reason = "unix seconds fit f64 exactly")]
            g.set(finished_at as f64);
        }
    }

    /// Counts an avatar in flight until the guard drops.
    pub fn in_flight_guard(&self) -> InFlight {
        self.inner.in_flight.inc();
        InFlight(self.inner.in_flight.clone())
    }

    pub fn record_outcome(
        &self,
        record: &AvatarRecord,
        provider: Option<&str>,
        stored: Option<&StoredObject>,
        size: u64,
    ) {
        let m = &self.inner;
        m.processed
            .get_or_create(&OutcomeLabels {
                status: record.status.to_string(),
                reason: record.reason.to_string(),
                provider: provider.unwrap_or("other").to_string(),
            })
            .inc();
        if record.reauth_required {
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

    /// What a check found about the mirrored picture, and the bytes it cost.
    pub fn observe_mirror_check(
        &self,
        kind: Option<MirrorKind>,
        reverified: Option<Reverified>,
        bytes: u64,
    ) {
        let outcome = kind.map_or("other", MirrorKind::as_str);
        if let Some(kind) = kind {
            let method = reverified.map_or("get", |r| r.method);
            self.inner
                .mirror_checks
                .get_or_create(&MirrorCheckLabels {
                    outcome: kind.as_str(),
                    method,
                })
                .inc();
        }
        self.inner
            .downloaded_bytes
            .get_or_create(&DownloadLabels { outcome })
            .inc_by(bytes);
    }

    /// One avatar URL fetched (not called when no request was needed).
    pub fn observe_fetch(&self, elapsed: Duration, bytes: u64) {
        self.inner.fetch_seconds.observe(elapsed.as_secs_f64());
        self.inner.response_bytes.observe(bytes as f64);
    }

    /// One avatar checked (counted for progress now, not when its batch is written).
    pub fn observe_avatar(&self, elapsed: Duration) {
        self.inner.avatar_seconds.observe(elapsed.as_secs_f64());
        self.inner.progress.fetch_add(1, Ordering::Relaxed);
    }

    /// The hook the storage writer's `observed` takes.
    pub fn storage_observer(&self) -> OpObserver {
        let family = self.inner.storage_seconds.clone();
        Arc::new(move |op: StoreOp, elapsed: Duration| {
            family
                .get_or_create(&OpLabels { op: op.as_str() })
                .observe(elapsed.as_secs_f64());
        })
    }

    pub fn observe_db_batch(&self, elapsed: Duration) {
        self.inner.db_batch_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn delivery(&self, sink: &str, result: &'static str) {
        self.inner
            .deliveries
            .get_or_create(&DeliveryLabels {
                sink: sink.to_string(),
                result,
            })
            .inc();
    }

    /// A sink's deliveries waiting and given up on, and when the oldest waiting one was written.
    pub fn set_outbox(&self, sink: &str, pending: i64, dead: i64, oldest_pending_at: Option<i64>) {
        let labels = SinkLabels {
            sink: sink.to_string(),
        };
        let m = &self.inner;
        m.outbox_pending.get_or_create(&labels).set(pending);
        m.outbox_dead.get_or_create(&labels).set(dead);
        match oldest_pending_at {
            #[allow(clippy::cast_precision_loss, reason = "unix seconds fit f64 exactly")]
            Some(t) if pending > 0 => {
                m.outbox_oldest.get_or_create(&labels).set(t as f64);
            }
            _ => {
                m.outbox_oldest.remove(&labels);
            }
        }
    }

    pub fn set_due_backlog(&self, due: i64) {
        self.inner.due_backlog.set(due);
    }

    pub fn set_oldest_due_age(&self, secs: i64) {
        self.inner.oldest_due_age.set(secs.max(0));
    }

    pub fn scan_started(&self) {
        self.inner.scan_last_started.set(unix_now_f64());
    }

    pub fn scan_finished(&self, report: &ScanReport) {
        let m = &self.inner;
        let result = if report.interrupted {
            "interrupted"
        } else {
            "completed"
        };
        m.scans.get_or_create(&ScanLabels { result }).inc();
        m.scan_last_duration.set(report.duration_secs);
        let mut lowest: std::collections::HashMap<&str, f64> = std::collections::HashMap::new();
        for h in &report.hosts {
            let provider = h.provider.as_deref().unwrap_or("other");
            let labels = ProviderLabels {
                provider: provider.to_string(),
            };
            m.host_push_backs
                .get_or_create(&labels)
                .inc_by(h.push_backs);
            let low = lowest.entry(provider).or_insert(h.concurrency);
            *low = low.min(h.concurrency);
        }
        for (provider, limit) in lowest {
            m.host_concurrency
                .get_or_create(&ProviderLabels {
                    provider: provider.to_string(),
                })
                .set(limit);
        }
        if !report.interrupted {
            m.scan_last_success.set(unix_now_f64());
        }
        // Under `run` most ticks find nothing due; the ratios alerts read
        // are those of the last scan that checked something.
        if !report.interrupted && report.processed > 0 {
            for status in Status::ALL {
                m.last_scan_avatars
                    .get_or_create(&StatusLabels {
                        status: status.as_str(),
                    })
                    .set(crate::model::saturating_i64(report.count(status)));
            }
        }
    }

    pub fn scan_failed(&self) {
        self.inner
            .scans
            .get_or_create(&ScanLabels { result: "failed" })
            .inc();
    }

    pub fn due_backlog(&self) -> i64 {
        self.inner.due_backlog.get()
    }

    /// Avatars being checked right now.
    pub fn in_flight(&self) -> i64 {
        self.inner.in_flight.get()
    }

    /// Avatars checked since this registry was made (for progress display).
    pub fn progress(&self) -> u64 {
        self.inner.progress.load(Ordering::Relaxed)
    }

    /// Processed count for one status, summed over reasons and providers.
    pub fn processed(&self, status: Status) -> u64 {
        let needle = format!("status=\"{}\"", status.as_str());
        self.encode()
            .lines()
            .filter(|l| {
                l.starts_with("avatar_warden_avatars_processed_total{") && l.contains(&needle)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// OpenMetrics text exposition (what Prometheus asks for by default).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }

    /// Prometheus text format 0.0.4: what the Pushgateway, node_exporter's
    /// textfile collector and `promtool check metrics` parse.
    pub fn encode_prometheus(&self) -> String {
        openmetrics_to_prometheus(&self.encode())
    }
}

fn unix_now_f64() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64 / 1000.0
}

/// Rewrites OpenMetrics text as Prometheus text 0.0.4. The samples are the
/// same; what differs is metadata: OpenMetrics names a counter family without
/// `_total` (and an info family without `_info`), which a 0.0.4 parser would
/// take for an empty family plus an untyped one. `# UNIT` and `# EOF` do not
/// exist in 0.0.4.
pub(crate) fn openmetrics_to_prometheus(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut help: Option<&str> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "gaugehistogram" | "stateset" | "unknown" => (name.to_string(), "untyped"),
                other => (name.to_string(), other),
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            // OpenMetrics only: the text format has neither.
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests;
