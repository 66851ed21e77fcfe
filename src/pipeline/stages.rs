//! The two check stages of a scan: examine an avatar (network, bounded by
//! the fetch slots), then finish it (store the picture, build the record).

use std::collections::HashSet;

use super::*;
use crate::storage::ObjectStore;

/// One avatar after its fetch: what was found, not yet stored or recorded.
pub(super) struct Examined {
    pub(super) due: DueAvatar,
    pub(super) exam: crate::check::Examination,
    pub(super) started: Instant,
    pub(super) now: i64,
    pub(super) span: tracing::Span,
    pub(super) _in_flight: crate::metrics::InFlight,
}

impl MirrorKind {
    /// From the recorded outcome: `unchanged` and `source_changed` are
    /// re-verifications, any other newly stored object is a first mirror.
    fn of(record: &AvatarRecord, stored: bool) -> Option<Self> {
        match record.reason {
            Reason::Unchanged => Some(MirrorKind::Unchanged),
            Reason::SourceChanged => Some(MirrorKind::Changed),
            _ if stored => Some(MirrorKind::First),
            _ => None,
        }
    }
}

/// The mirrored picture a re-check compares with: only for the same URL.
pub(super) fn known_picture(due: &DueAvatar) -> Option<Known> {
    let prev = due.previous.as_ref()?;
    if prev.source_url != due.avatar_url {
        return None;
    }
    Some(Known {
        sha256: prev.sha256.clone()?,
        validators: prev.validators.clone(),
    })
}

/// The mirrored object a re-verification would confirm by headers alone.
fn rechecked_object(due: &DueAvatar) -> Option<&str> {
    known_picture(due)?;
    due.previous.as_ref()?.object_key.as_deref()
}

/// Whether an avatar's mirrored object is still stored, if already known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ObjectCheck {
    /// The stage asks the store itself.
    Ask,
    /// Answered with the page's other avatars (`missing_objects`).
    Answered { missing: bool },
}

impl ObjectCheck {
    pub(super) fn of(due: &DueAvatar, missing: Option<&HashSet<String>>) -> Self {
        match (missing, rechecked_object(due)) {
            (Some(missing), Some(key)) => ObjectCheck::Answered {
                missing: missing.contains(key),
            },
            _ => ObjectCheck::Ask,
        }
    }
}

/// The page's mirrored objects that are gone, asked of the store in one
/// go; `None` if it could not say (each avatar then asks on its own). A
/// page is checked within seconds of this answer, and `gc` never deletes
/// an object an avatar still references.
pub(super) async fn missing_objects(
    store: Arc<dyn ObjectStore>,
    page: &[DueAvatar],
) -> Option<HashSet<String>> {
    let keys: Vec<String> = page
        .iter()
        .filter_map(rechecked_object)
        .map(str::to_owned)
        .collect();
    if keys.is_empty() {
        return Some(HashSet::new());
    }
    match store.missing(keys).await {
        Ok(missing) => Some(missing),
        Err(e) => {
            tracing::warn!(error = %e, "could not check the page's mirrored objects at once: asking per avatar");
            None
        }
    }
}

/// Stage one: fetch, classify and validate one avatar, in its own span.
pub(super) async fn examine_avatar(
    deps: &Deps,
    due: DueAvatar,
    object: ObjectCheck,
    hosts: &HostLimiter,
    redownload: bool,
) -> Examined {
    let span = tracing::info_span!(
        "avatar",
        user_id = %due.user_id,
        host = url::Url::parse(&due.avatar_url).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default(),
        status = tracing::field::Empty,
        reason = tracing::field::Empty,
        duration_ms = tracing::field::Empty,
    );
    let started = Instant::now();
    let in_flight = deps.metrics.in_flight_guard();
    let now = unix_now();
    let mut known = known_picture(&due).filter(|_| !redownload);
    let object_key = due.previous.as_ref().and_then(|p| p.object_key.clone());
    if let (Some(_), Some(key)) = (&known, &object_key) {
        // A re-verification that would only confirm headers must not confirm
        // a mirror whose object is gone: one existence check (cheap next to
        // the request) and, if it is missing, a full download stores it again.
        let missing = match object {
            ObjectCheck::Answered { missing } => missing,
            ObjectCheck::Ask => matches!(deps.images.store().exists(key).await, Ok(false)),
        };
        if missing {
            tracing::warn!(parent: &span, user_id = %due.user_id, key, "the mirrored object is missing from the store: downloading the picture again");
            deps.images.forget(key);
            known = None;
        }
    }
    let exam = deps
        .checker
        .reexamine(&due.avatar_url, now, hosts, known.as_ref())
        .instrument(span.clone())
        .await;
    if exam.requests > 0 {
        deps.metrics.observe_fetch(exam.fetch_time, exam.bytes_read);
    }
    Examined {
        due,
        exam,
        started,
        now,
        span,
        _in_flight: in_flight,
    }
}

/// Stage two: store the picture and build the record. Its own stage so a
/// slow disk or object store never holds one of the fetch slots (t2 in
/// BENCHMARKS.md: fsync latency there cost a fifth of the throughput).
pub(super) async fn finish_avatar(deps: &Deps, examined: Examined, dry_run: bool) -> Checked {
    let span = examined.span.clone();
    finish_avatar_in(deps, examined, dry_run)
        .instrument(span)
        .await
}

pub(super) async fn finish_avatar_in(deps: &Deps, examined: Examined, dry_run: bool) -> Checked {
    let Examined {
        due,
        exam,
        started,
        now,
        ..
    } = examined;
    let mut verdict = exam.verdict;
    let mut mirror = None;
    let mut size = 0;
    if let Some((info, body)) = exam.image.filter(|_| !dry_run) {
        size = body.bytes.len() as u64;
        match deps
            .images
            .store_image(&body.sha256, info.format, body.bytes)
            .await
        {
            Ok(stored) => mirror = Some((info, body.sha256, stored)),
            Err(e) => {
                tracing::warn!(user_id = %due.user_id, error = %e, "storing the mirror failed");
                verdict = Verdict::new(Reason::StorageError).with_detail(e.to_string());
            }
        }
    }
    let mut rng = rand::rng();
    let found = Found {
        verdict,
        expires_at: exam.expires_at,
        mirror: mirror.as_ref(),
        size,
        validators: &exam.validators,
        now,
    };
    let record = build_record(&due, found, &deps.policy, &mut rng);
    let span = tracing::Span::current();
    span.record("status", record.status.as_str());
    span.record("reason", record.reason.as_str());
    span.record(
        "duration_ms",
        u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    );
    deps.metrics.observe_avatar(started.elapsed());
    tracing::debug!(
        provider = exam.provider.as_deref().unwrap_or("-"),
        requests = exam.requests,
        "avatar checked"
    );
    let kind = MirrorKind::of(&record, mirror.is_some());
    deps.metrics
        .observe_mirror_check(kind, exam.reverified, exam.bytes_read);
    Checked {
        outbox: deps.sinks.outbox_rows(due.previous.as_ref(), &record),
        kind,
        reverified: exam.reverified,
        previous: due.previous.as_ref().map(|p| p.status),
        was_flagged: due.previous.as_ref().is_some_and(|p| p.reauth_required),
        record,
        stored: mirror.map(|(_, _, s)| s),
        size,
        downloaded: exam.bytes_read,
        provider: exam.provider,
    }
}

/// One checked avatar: its record, the object stored for it, bytes fetched.
pub(super) struct Checked {
    pub(super) record: AvatarRecord,
    pub(super) stored: Option<StoredObject>,
    /// Bytes of the stored picture.
    pub(super) size: u64,
    /// Response bytes downloaded to decide.
    pub(super) downloaded: u64,
    pub(super) previous: Option<Status>,
    /// The user's re-auth flag before this check.
    pub(super) was_flagged: bool,
    pub(super) provider: Option<String>,
    /// First mirror, unchanged or changed picture.
    pub(super) kind: Option<MirrorKind>,
    pub(super) reverified: Option<Reverified>,
    /// Sink deliveries this verdict causes, written in its batch.
    pub(super) outbox: Vec<crate::db::OutboxRow>,
}
