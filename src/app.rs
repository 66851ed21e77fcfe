//! The composition root: `App::build` wires the worker from its settings
//! (database, checker, object store, metrics, sinks); the deliveries a set of
//! wired dependencies needs, and a scan with its deliveries alongside. Above
//! the pipeline and the sinks, so neither has to know the other's whole.

use std::sync::Arc;

use crate::check::{Checker, CheckerError};
use crate::config::{ConfigError, OutboxSettings, Settings};
use crate::db::Database;
use crate::db::DbError;
use crate::metrics::Metrics;
use crate::pipeline::{Deps, Policy, scan_once};
use crate::sinks::{Deliverer, Sinks};
use crate::storage::{ImageWriter, ObjectStore, StoreError};

pub use crate::model::{ScanReport, unix_now};
pub use crate::pipeline::{ScanError, ScanOptions};

/// Why the worker could not be wired.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Database(#[from] DbError),
    #[error("migrating the worker's tables: {0}")]
    Migrate(#[source] DbError),
    #[error(transparent)]
    Checker(#[from] CheckerError),
    #[error("opening the object store: {0}")]
    Store(#[source] StoreError),
    #[error("configuring the sinks: {0}")]
    Sinks(#[source] ConfigError),
}

impl BuildError {
    /// An unreachable database or store may come back; a wrong setting will not.
    pub fn is_retryable(&self) -> bool {
        match self {
            BuildError::Database(e) | BuildError::Migrate(e) => e.is_retryable(),
            BuildError::Store(e) => e.is_retryable(),
            BuildError::Checker(_) | BuildError::Sinks(_) => false,
        }
    }
}

/// The worker, wired: what every command that scans runs on, and the API
/// the integration tests drive it through.
#[derive(Clone)]
pub struct App {
    deps: Deps,
}

impl App {
    /// Connects and migrates the database, checks the configured profile
    /// table, builds the checker, opens the store and the sinks.
    pub async fn build(settings: &Settings) -> Result<App, BuildError> {
        if settings.fetch.allow_private_networks {
            tracing::warn!(
                "fetch.allow_private_networks = true: avatar URLs may reach loopback, private and link-local addresses"
            );
        }
        let db = settings.profile.connect().await?;
        db.migrate().await.map_err(BuildError::Migrate)?;
        db.check_profile().await?;
        let checker = Checker::new(settings)?;
        let store = settings.storage.open().await.map_err(BuildError::Store)?;
        let metrics = Metrics::new();
        let sinks = Sinks::from_settings(settings).map_err(BuildError::Sinks)?;
        metrics.known_sinks(sinks.names());
        metrics.known_providers(checker.providers().names());
        // A restarted worker reports the last completed scan, not 1970.
        match db.last_completed_at().await {
            Ok(Some(at)) => metrics.resume_last_success(at),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "could not read the last completed scan"),
        }
        Ok(App {
            deps: Deps {
                db: Arc::new(db),
                checker,
                images: ImageWriter::new(store).observed(metrics.storage_observer()),
                policy: Policy::from_settings(settings),
                metrics,
                sinks,
            },
        })
    }

    pub(crate) fn into_deps(self) -> Deps {
        self.deps
    }

    /// The profile database it scans.
    pub fn database(&self) -> &Database {
        &self.deps.db
    }

    /// The same worker storing into `store` (a test's stand-in for a failing disk).
    #[must_use]
    pub fn with_store(mut self, store: Arc<dyn ObjectStore>) -> Self {
        self.deps.images = ImageWriter::new(store).observed(self.deps.metrics.storage_observer());
        self
    }

    /// Its metrics in the OpenMetrics text format (what `/metrics` serves).
    pub fn metrics_text(&self) -> String {
        self.deps.metrics.encode()
    }

    /// Its metrics in the Prometheus text format 0.0.4 (textfile collector, Pushgateway).
    pub fn metrics_prometheus_text(&self) -> String {
        self.deps.metrics.encode_prometheus()
    }

    /// One scan with `opts`.
    pub async fn scan(&self, opts: &ScanOptions) -> Result<ScanReport, ScanError> {
        scan_once(&self.deps, opts).await
    }

    /// The delivery loop for its sinks; `None` when none is configured.
    pub fn deliverer(&self, settings: &OutboxSettings) -> Option<Deliverer> {
        deliverer(&self.deps, settings)
    }

    /// One scan with deliveries alongside (see `scan_with_deliveries`).
    pub async fn scan_with_deliveries(
        &self,
        opts: &ScanOptions,
        deliverer: Option<Deliverer>,
    ) -> Result<ScanReport, ScanError> {
        scan_with_deliveries(&self.deps, opts, deliverer).await
    }
}

/// The delivery loop for `deps`' sinks; `None` when none is configured.
pub(crate) fn deliverer(deps: &Deps, settings: &OutboxSettings) -> Option<Deliverer> {
    Deliverer::new(
        deps.db.clone(),
        deps.sinks.clone(),
        deps.metrics.clone(),
        settings,
    )
}

/// One scan with deliveries alongside, drained afterwards unless the scan
/// failed or was stopped; the report carries what was delivered.
pub(crate) async fn scan_with_deliveries(
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
