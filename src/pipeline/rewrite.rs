//! Late write-back: after the settings written-back values derive from
//! change — a new CDN domain (`storage.public_base_url`), a write-back
//! column enabled or renamed after a first run — the next scan makes the
//! profile table and the state's mirror URLs agree with what is recorded,
//! page by page, without fetching anything. It runs once per change of
//! those settings (remembered in `avatar_warden_meta`), not every tick.

use std::collections::HashMap;

use tokio_util::sync::CancellationToken;

use super::{Deps, ScanOptions};
use crate::classify::Status;
use crate::db::{DbError, Previous, Rewrite, WrittenBack};
use crate::model::unix_now;

/// The `avatar_warden_meta` row holding the settings last made consistent.
const META_KEY: &str = "write_back";
const PAGE: usize = 1000;

/// A rewrite walks the whole table: only a scan of everything (not one
/// narrowed to users, statuses, a provider or a limit) starts one, and of
/// indexed Jobs only shard 0.
pub(super) fn applies(opts: &ScanOptions) -> bool {
    let s = &opts.selection;
    !s.dry_run
        && s.users.is_empty()
        && s.only.is_empty()
        && opts.provider.is_none()
        && opts.limit.is_none()
        && opts.shard.is_none_or(|sh| sh.index == 0)
}

/// What written-back values derive from.
fn fingerprint(deps: &Deps) -> String {
    let (mirror, reauth) = deps.db.writes_back();
    format!(
        "v1 base={} mirror_column={} reauth_column={}",
        deps.images.store().public_url(""),
        mirror.unwrap_or("-"),
        reauth.unwrap_or("-"),
    )
}

/// Rewrites what is stale; returns how many users' values changed.
/// Stopped by `shutdown`, it leaves the settings unremembered, so the next
/// scan goes over the table again (every step is idempotent).
pub(super) async fn rewrite_stale(
    deps: &Deps,
    shutdown: &CancellationToken,
) -> Result<u64, DbError> {
    let fingerprint = fingerprint(deps);
    if deps.db.meta(META_KEY).await?.as_deref() == Some(fingerprint.as_str()) {
        return Ok(0);
    }
    let store = deps.images.store();
    let (mirror_column, reauth_column) = deps.db.writes_back();
    let mut after: Option<String> = None;
    let mut rewritten = 0;
    loop {
        if shutdown.is_cancelled() {
            return Ok(rewritten);
        }
        let page = deps.db.export_page(after.as_deref(), PAGE).await?;
        let Some(last) = page.last() else {
            break;
        };
        after = Some(last.user_id.to_string());
        let current = if mirror_column.is_some() || reauth_column.is_some() {
            let ids: Vec<_> = page.iter().map(|r| r.user_id.clone()).collect();
            deps.db.written_back(&ids).await?
        } else {
            HashMap::new()
        };
        let now = unix_now();
        let mut fix = Rewrite::default();
        for record in page.into_iter().filter(|r| r.status != Status::Pending) {
            let mut want = record.clone();
            let mut changed = false;
            if let (Some(key), Some(url)) = (&record.object_key, &record.mirror_url) {
                let derived = store.public_url(key);
                if derived != *url {
                    want.mirror_url = Some(derived.clone());
                    fix.mirror_urls.push((record.user_id.clone(), derived));
                    // Sinks hear of it where the app sees a new value (an
                    // IM profile's avatar); the events decide from before/after.
                    let mut event = want.clone();
                    event.checked_at = now;
                    fix.outbox.extend(
                        deps.sinks
                            .outbox_rows(Some(&Previous::from(&record)), &event),
                    );
                    changed = true;
                }
            }
            if let Some(have) = current.get(&record.user_id.to_string())
                && stale(
                    have,
                    &want,
                    mirror_column.is_some(),
                    reauth_column.is_some(),
                )
            {
                fix.write_back.push(want);
                changed = true;
            }
            rewritten += u64::from(changed);
        }
        if !fix.mirror_urls.is_empty() || !fix.write_back.is_empty() {
            deps.db.rewrite(&fix).await?;
        }
    }
    deps.db.set_meta(META_KEY, &fingerprint).await?;
    if rewritten > 0 {
        tracing::info!(
            rewritten,
            "write-back columns and mirror URLs rewritten for the current settings"
        );
    }
    Ok(rewritten)
}

/// Whether the profile row shows other values than the record means.
fn stale(have: &WrittenBack, want: &crate::db::AvatarRecord, mirror: bool, reauth: bool) -> bool {
    (mirror && have.mirror_url != want.mirror_url)
        || (reauth && have.reauth_required != Some(want.reauth_required))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{AvatarRecord, UserId};

    #[test]
    fn a_profile_row_is_stale_only_in_the_columns_that_are_written() {
        let mut want = AvatarRecord::new(
            UserId::Int(1),
            "https://x/a",
            crate::classify::Reason::ValidImage,
            0,
        );
        want.mirror_url = Some("https://new-cdn/k.jpg".into());
        let old = WrittenBack {
            mirror_url: Some("https://old-cdn/k.jpg".into()),
            reauth_required: Some(false),
        };
        assert!(stale(&old, &want, true, true));
        assert!(
            !stale(&old, &want, false, true),
            "the mirror column is not written"
        );
        let unset = WrittenBack {
            mirror_url: Some("https://new-cdn/k.jpg".into()),
            reauth_required: None,
        };
        assert!(stale(&unset, &want, true, true), "a NULL flag is written");
        assert!(!stale(&unset, &want, true, false));
    }
}
