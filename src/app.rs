//! The composition root: `App::build` wires the worker from its settings
//! (database, checker, object store, metrics, sinks); the deliveries a set of
//! wired dependencies needs, and a scan with its deliveries alongside. Above
//! the pipeline and the sinks, so neither has to know the other's whole.

use std::sync::Arc;

use crate::check::{Checker, CheckerError};
use crate::config::{ConfigError, OutboxSettings, Settings};
use crate::db::DbError;
use crate::metrics::Metrics;
use crate::model::ScanReport;
use crate::pipeline::{Deps, Policy, ScanError, ScanOptions, scan_once};
use crate::sinks::{Deliverer, Sinks};
use crate::storage::{ImageWriter, StoreError};

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

/// The worker, wired: what every command that scans runs on.
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
        Ok(App {
            deps: Deps {
                db: Arc::new(db),
                checker,
                images: ImageWriter::new(store).observed(metrics.storage_observer()),
                policy: Policy::from_settings(settings),
                metrics,
                sinks: Sinks::from_settings(settings).map_err(BuildError::Sinks)?,
            },
        })
    }

    pub fn deps(&self) -> &Deps {
        &self.deps
    }

    pub fn into_deps(self) -> Deps {
        self.deps
    }

    /// One scan with `opts`.
    pub async fn scan(&self, opts: &ScanOptions) -> Result<ScanReport, ScanError> {
        scan_once(&self.deps, opts).await
    }
}

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
