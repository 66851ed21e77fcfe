//! `gc`: removes stored avatar objects that no avatar points at any more
//! (a changed picture leaves its old object behind), once they are older
//! than a grace period. Objects are never deleted by a scan.

use std::collections::HashSet;
use std::time::Duration;

use futures::{StreamExt, stream};
use serde::Serialize;

use crate::db::{Database, DbError};
use crate::storage::{ObjectStore, StoreError, is_avatar_key};

/// Deletes at once: enough to keep an S3 endpoint busy, few enough to stay polite.
const PARALLEL_DELETES: usize = 8;
/// How many candidate keys a report lists by name.
pub const REPORT_KEYS_LIMIT: usize = 1000;

#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Only objects last written longer ago than this. Covers objects stored
    /// by a scan whose rows are not written yet, and a restore of the state
    /// table from a recent backup.
    pub grace: Duration,
    /// List what would be deleted; delete nothing.
    pub dry_run: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    /// Objects of this worker's shape listed.
    pub listed: u64,
    /// Pointed at by some avatar (whatever their age): kept. Every listed
    /// object is in exactly one of `referenced`, `too_young`, `unreferenced`.
    pub referenced: u64,
    /// Unreferenced, but written within the grace period: kept.
    pub too_young: u64,
    /// Unreferenced and old enough: deleted (or, in a dry run, would be).
    pub unreferenced: u64,
    pub unreferenced_bytes: u64,
    pub deleted: u64,
    /// Deletes that failed (logged; the next `gc` tries again).
    pub failed: u64,
    /// Deleted objects a scan began to use meanwhile (it found the object
    /// still there and stored nothing): those avatars were made due to store
    /// their picture again.
    pub healed: u64,
    /// Other objects under the prefix, never touched.
    pub foreign: u64,
    /// The first `REPORT_KEYS_LIMIT` unreferenced keys.
    pub keys: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("listing the object store: {0}")]
    Store(#[from] StoreError),
}

impl GcError {
    pub fn is_retryable(&self) -> bool {
        match self {
            GcError::Db(e) => e.is_retryable(),
            GcError::Store(e) => e.is_retryable(),
        }
    }
}

/// Walks the store page by page; per page, asks the state table which keys
/// are referenced right before deleting the rest (memory stays one page).
pub async fn collect_garbage(
    db: &Database,
    store: &dyn ObjectStore,
    opts: &GcOptions,
    now: i64,
) -> Result<GcReport, GcError> {
    let mut report = GcReport {
        dry_run: opts.dry_run,
        ..GcReport::default()
    };
    let cutoff = now - crate::model::saturating_i64(opts.grace.as_secs());
    let mut cursor = None;
    loop {
        let page = store.list_avatars(cursor.take()).await?;
        let (ours, foreign): (Vec<_>, Vec<_>) = page
            .objects
            .into_iter()
            .partition(|o| is_avatar_key(store.prefix(), &o.key));
        report.foreign += foreign.len() as u64;
        report.listed += ours.len() as u64;
        // Every object is asked about, whatever its age, so each lands in
        // exactly one count and "referenced" does not depend on the grace.
        let keys: Vec<String> = ours.iter().map(|o| o.key.clone()).collect();
        let referenced: HashSet<String> = db.referenced_keys(&keys).await?.into_iter().collect();
        report.referenced += referenced.len() as u64;
        let (old, young): (Vec<_>, Vec<_>) = ours
            .into_iter()
            .filter(|o| !referenced.contains(&o.key))
            .partition(|o| o.modified <= cutoff);
        report.too_young += young.len() as u64;
        let doomed = old;
        report.unreferenced += doomed.len() as u64;
        report.unreferenced_bytes += doomed.iter().map(|o| o.size).sum::<u64>();
        for o in &doomed {
            if report.keys.len() < REPORT_KEYS_LIMIT {
                report.keys.push(o.key.clone());
            }
        }
        if !opts.dry_run {
            let results: Vec<(String, Result<(), StoreError>)> = stream::iter(doomed)
                .map(|o| async move {
                    let r = store.delete(&o.key).await;
                    (o.key, r)
                })
                .buffer_unordered(PARALLEL_DELETES)
                .collect()
                .await;
            let mut deleted = Vec::new();
            for (key, r) in results {
                match r {
                    Ok(()) => deleted.push(key),
                    Err(e) => {
                        tracing::warn!(key, error = %e, "could not delete an unreferenced object");
                        report.failed += 1;
                    }
                }
            }
            report.deleted += deleted.len() as u64;
            // A scan may have found one of these objects (same picture) between
            // the reference check and its delete: have it stored again.
            let raced = db.referenced_keys(&deleted).await?;
            if !raced.is_empty() {
                tracing::warn!(
                    objects = raced.len(),
                    "objects deleted while a scan started using them: their avatars are due again"
                );
                report.healed += db.forget_objects(&raced).await?;
            }
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => return Ok(report),
        }
    }
}

/// How many keys are checked at once by `verify-store`.
const PARALLEL_CHECKS: usize = 16;

/// What `verify-store` found: rows pointing at an object the store lacks.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Avatars whose row names a stored object.
    pub rows: u64,
    /// Distinct objects checked.
    pub objects: u64,
    /// Objects missing from the store.
    pub missing: u64,
    /// Avatars pointing at a missing object.
    pub missing_rows: u64,
    /// With `--repair`: avatars made due to store their picture again.
    pub repaired: u64,
    /// The first `REPORT_KEYS_LIMIT` missing keys.
    pub keys: Vec<String>,
    /// Checks that failed (store errors; logged).
    pub failed: u64,
}

/// Pages through the state table and asks the store for every object a row
/// points at. `repair` makes the avatars of missing objects forget their
/// picture and be due at once, so the next scan downloads and stores it.
pub async fn verify_store(
    db: &Database,
    store: &dyn ObjectStore,
    repair: bool,
) -> Result<VerifyReport, GcError> {
    let mut report = VerifyReport::default();
    let mut after: Option<String> = None;
    loop {
        let page = db.export_page(after.as_deref(), 1000).await?;
        let Some(last) = page.last() else {
            break;
        };
        after = Some(last.user_id.to_string());
        let keys: Vec<String> = page.iter().filter_map(|r| r.object_key.clone()).collect();
        report.rows += keys.len() as u64;
        let unique: HashSet<String> = keys.iter().cloned().collect();
        report.objects += unique.len() as u64;
        let checked: Vec<(String, Result<bool, StoreError>)> = stream::iter(unique)
            .map(|key| async move {
                let found = store.exists(&key).await;
                (key, found)
            })
            .buffer_unordered(PARALLEL_CHECKS)
            .collect()
            .await;
        let mut missing = Vec::new();
        for (key, found) in checked {
            match found {
                Ok(true) => {}
                Ok(false) => missing.push(key),
                Err(e) => {
                    tracing::warn!(key, error = %e, "could not check an object");
                    report.failed += 1;
                }
            }
        }
        report.missing += missing.len() as u64;
        report.missing_rows += keys.iter().filter(|k| missing.contains(k)).count() as u64;
        for key in &missing {
            if report.keys.len() < REPORT_KEYS_LIMIT {
                report.keys.push(key.clone());
            }
        }
        if repair && !missing.is_empty() {
            report.repaired += db.forget_objects(&missing).await?;
        }
    }
    report.keys.sort();
    Ok(report)
}
