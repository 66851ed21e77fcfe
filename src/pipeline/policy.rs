//! The policy: what a verdict becomes in the state row (what carries over,
//! expiry confirmations, `gave_up`, when to look again, the re-auth flag). Pure.

use rand::Rng;

use crate::classify::{Reason, Status, Verdict};
use crate::config::{RecheckSettings, WhenMirrorExists};
use crate::db::{AvatarRecord, DueAvatar, Previous, UserId, Validators};
use crate::media::ImageInfo;
use crate::model::saturating_i64;
use crate::storage::StoredObject;

use super::Policy;

/// A newly stored picture: what it is, its sha256, where it went.
pub(crate) type Mirror = (ImageInfo, String, StoredObject);

/// Re-check a URL whose signature expires this long before it does.
const EXPIRY_MARGIN_SECS: i64 = 60;

/// What one check found, as the policy needs it.
#[derive(Debug, Clone)]
pub(crate) struct Found<'a> {
    pub verdict: Verdict,
    /// When a signed URL's signature runs out.
    pub expires_at: Option<i64>,
    /// The picture stored by this check, if any.
    pub mirror: Option<&'a Mirror>,
    /// Its size in bytes.
    pub size: u64,
    /// What the source said in this check (kept with a new mirror, or with
    /// one confirmed `unchanged`).
    pub validators: &'a Validators,
    pub now: i64,
}

#[cfg(test)]
impl<'a> Found<'a> {
    /// A verdict without a new picture or validators (for the tests).
    pub(crate) fn verdict(verdict: Verdict, validators: &'a Validators, now: i64) -> Self {
        Found {
            verdict,
            expires_at: None,
            mirror: None,
            size: 0,
            validators,
            now,
        }
    }
}

/// Turns what a check found into the row to record: what carries over from
/// the last check, when to look again, and whether the user must re-authorize.
pub(crate) fn build_record(
    due: &DueAvatar,
    mut found: Found<'_>,
    policy: &Policy,
    rng: &mut impl Rng,
) -> AvatarRecord {
    let prev = due.previous.as_ref();
    let same_url = prev.is_some_and(|p| p.source_url == due.avatar_url);
    found.verdict = name_the_picture(found.verdict, found.mirror, prev, same_url);
    let mut record = carried_over(due, &found, same_url);
    if let Some((info, sha, stored)) = found.mirror {
        record.mirror_url = Some(stored.url.clone());
        record.object_key = Some(stored.key.clone());
        record.sha256 = Some(sha.clone());
        record.size_bytes = Some(saturating_i64(found.size));
        record.width = Some(i64::from(info.width));
        record.height = Some(i64::from(info.height));
        record.format = Some(info.format.name().to_string());
    }
    let now = found.now;
    match found.verdict.status {
        Status::Mirrored => {
            record.reauth_required = false;
            // A URL that has said "gone" before is dying: look again soon.
            let wait = if record.expiry_signals > 0 {
                saturating_i64(policy.expiry.min_interval_secs)
            } else {
                recheck_wait(policy.recheck.mirrored_secs, 0.1, now, &due.user_id)
            };
            record.next_check_at = Some(now + wait);
        }
        Status::Expired => expired(&mut record, &found, policy),
        Status::Invalid => record.reauth_required = true,
        Status::Failing => {
            let before = if same_url && prev.is_some_and(|p| p.status == Status::Failing) {
                prev.map_or(0, |p| p.attempts)
            } else {
                0
            };
            failing(&mut record, &found, before, policy, rng);
        }
        Status::Blocked | Status::Pending => {}
    }
    // The composed detail quotes remote text: bound it once more as a whole.
    record.reason_detail = record
        .reason_detail
        .map(|d| crate::classify::bounded(d, crate::classify::MAX_DETAIL_BYTES));
    record
}

/// The same URL downloaded again: name what the picture did.
fn name_the_picture(
    verdict: Verdict,
    mirror: Option<&Mirror>,
    prev: Option<&Previous>,
    same_url: bool,
) -> Verdict {
    match (mirror, prev.and_then(|p| p.sha256.as_deref())) {
        (Some((_, sha, _)), Some(old)) if same_url && verdict.code == Reason::ValidImage => {
            if old.eq_ignore_ascii_case(sha) {
                Verdict::new(Reason::Unchanged).with_detail("get: same sha256")
            } else {
                Verdict::new(Reason::SourceChanged).with_detail(format!("sha256 was {old}"))
            }
        }
        _ => verdict,
    }
}

/// The verdict over what the last check left: the last good mirror stays
/// visible until a new one replaces it; validators belong to their URL.
fn carried_over(due: &DueAvatar, found: &Found<'_>, same_url: bool) -> AvatarRecord {
    let prev = due.previous.as_ref();
    let confirmed = found.verdict.code == Reason::Unchanged;
    AvatarRecord {
        user_id: due.user_id.clone(),
        source_url: due.avatar_url.clone(),
        status: found.verdict.status,
        reason: found.verdict.code,
        reason_detail: found.verdict.detail.clone(),
        mirror_url: prev.and_then(|p| p.mirror_url.clone()),
        object_key: prev.and_then(|p| p.object_key.clone()),
        sha256: prev.and_then(|p| p.sha256.clone()),
        size_bytes: prev.and_then(|p| p.meta.size_bytes),
        width: prev.and_then(|p| p.meta.width),
        height: prev.and_then(|p| p.meta.height),
        format: prev.and_then(|p| p.meta.format.clone()),
        validators: if found.mirror.is_some() || confirmed {
            found.validators.clone()
        } else if same_url {
            prev.map(|p| p.validators.clone()).unwrap_or_default()
        } else {
            Validators::default()
        },
        reauth_required: prev.is_some_and(|p| p.reauth_required),
        attempts: 0,
        expiry_signals: if same_url {
            prev.map_or(0, |p| p.expiry_signals)
        } else {
            0
        },
        checked_at: found.now,
        next_check_at: None,
    }
}

/// `reason (detail)`: the last verdict, quoted in a composed detail.
fn last_said(verdict: &Verdict) -> String {
    match &verdict.detail {
        Some(d) => format!("{} ({d})", verdict.code),
        None => verdict.code.to_string(),
    }
}

/// Gone: confirmed after enough expiry signals, then flagged (unless the
/// policy keeps users with a mirror quiet).
fn expired(record: &mut AvatarRecord, found: &Found<'_>, policy: &Policy) {
    let is_signal = found.verdict.code.is_expiry_signal();
    if is_signal {
        record.expiry_signals += 1;
    }
    if is_signal && record.expiry_signals < policy.expiry.confirmations {
        record.status = Status::Failing;
        record.reason = Reason::ExpiryUnconfirmed;
        record.reason_detail = Some(format!(
            "{} of {} expiry signals; last: {}",
            record.expiry_signals,
            policy.expiry.confirmations,
            last_said(&found.verdict)
        ));
        record.next_check_at = Some(before_expiry(
            found.now + saturating_i64(policy.expiry.min_interval_secs),
            found.expires_at,
            found.now,
        ));
    } else {
        let keep_quiet =
            record.mirror_url.is_some() && policy.when_mirror_exists == WhenMirrorExists::Keep;
        record.reauth_required = !keep_quiet;
    }
}

/// Failing again: back off, or give up after `max_attempts` in a row.
fn failing(
    record: &mut AvatarRecord,
    found: &Found<'_>,
    attempts_before: i64,
    policy: &Policy,
    rng: &mut impl Rng,
) {
    record.attempts = attempts_before + 1;
    if record.attempts >= policy.max_attempts {
        record.reason = Reason::GaveUp;
        record.reason_detail = Some(format!(
            "{} failing checks in a row; last: {}",
            record.attempts,
            last_said(&found.verdict)
        ));
    } else {
        let backoff = backoff_secs(record.attempts, &policy.recheck);
        let next = found.now + jitter(backoff, 0.2, rng);
        record.next_check_at = Some(before_expiry(next, found.expires_at, found.now));
    }
}

/// A signed URL must be tried again before its signature runs out.
fn before_expiry(next: i64, expires_at: Option<i64>, now: i64) -> i64 {
    match expires_at {
        Some(t) if t > now => next.min((t - EXPIRY_MARGIN_SECS).max(now + 1)),
        _ => next,
    }
}

/// `initial * 2^(attempts-1)`, capped.
pub(crate) fn backoff_secs(attempts: i64, recheck: &RecheckSettings) -> u64 {
    let exp = u32::try_from(attempts.clamp(1, 41) - 1).unwrap_or(0);
    crate::model::exponential_backoff(recheck.failing_initial_secs, recheck.failing_max_secs, exp)
}

/// The mirrored re-check's wait: a spread drawn once per second (the same
/// for every avatar checked in that second) plus a few minutes that depend
/// on the user. A backfill still comes due spread over +-`fraction` of the
/// interval, second by second, and no two users of a second share a time.
/// One draw per avatar put each `next_check_at` index entry at a random
/// place in an index as large as the table, so each batch dirtied a page per
/// avatar and re-verification slowed as the table grew (BENCHMARKS.md, #19);
/// this keeps one second's entries within a few minutes of each other.
#[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)] // rounded seconds
fn recheck_wait(secs: u64, fraction: f64, now: i64, user: &UserId) -> i64 {
    let unit = |x: u64| (splitmix64(x) >> 11) as f64 / (1_u64 << 53) as f64;
    let spread = secs as f64 * fraction;
    let of_second = spread * (2.0 * unit(now.cast_unsigned()) - 1.0);
    let id_hash = user
        .to_string()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    let of_user = (spread.min(USER_SPREAD_SECS) * (2.0 * unit(id_hash) - 1.0)).round();
    // Within the configured window whatever the user adds.
    let wait = (of_second + of_user).clamp(-spread, spread);
    (secs as f64 + wait).max(1.0) as i64
}

/// How far apart one second's users may come due (+-).
const USER_SPREAD_SECS: f64 = 300.0;

/// SplitMix64: a fixed, well-spread 64-bit value for each input.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Spreads re-tries so a million avatars failing on one day are not all due on the same second.
#[allow(clippy::cast_possible_truncation)] // rounded seconds, at least 1
fn jitter(secs: u64, fraction: f64, rng: &mut impl Rng) -> i64 {
    let spread = secs as f64 * fraction;
    (secs as f64 + rng.random_range(-spread..=spread)).max(1.0) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ExpirySettings;
    use crate::db::{MirrorMeta, Previous, UserId};
    use crate::media::ImageFormat;
    use rand::SeedableRng;

    fn policy() -> Policy {
        Policy {
            recheck: RecheckSettings {
                mirrored_secs: 1000,
                failing_initial_secs: 60,
                failing_max_secs: 86_400,
            },
            expiry: ExpirySettings {
                confirmations: 1,
                min_interval_secs: 600,
            },
            when_mirror_exists: WhenMirrorExists::Flag,
            max_attempts: 10,
        }
    }

    const URL: &str = "https://thirdwx.qlogo.cn/mmopen/a/132";

    fn due(prev: Option<Previous>) -> DueAvatar {
        DueAvatar {
            user_id: UserId::Int(7),
            avatar_url: URL.into(),
            previous: prev,
        }
    }

    fn prev(status: Status, attempts: i64) -> Previous {
        Previous {
            source_url: URL.into(),
            status,
            mirror_url: Some("https://cdn/avatars/ab/ab.jpg".into()),
            object_key: Some("avatars/ab/ab.jpg".into()),
            sha256: Some("ab".into()),
            meta: MirrorMeta {
                size_bytes: Some(4000),
                width: Some(132),
                height: Some(132),
                format: Some("jpeg".into()),
            },
            validators: Validators {
                etag: Some("\"v1\"".into()),
                last_modified: None,
                length: Some(4000),
            },
            attempts,
            expiry_signals: 0,
            reauth_required: false,
        }
    }

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(1)
    }

    fn record(d: &DueAvatar, v: Verdict, p: &Policy) -> AvatarRecord {
        build_record(
            d,
            Found::verdict(v, &Validators::default(), 100),
            p,
            &mut rng(),
        )
    }

    fn mirror() -> Mirror {
        let info = ImageInfo {
            format: ImageFormat::Jpeg,
            width: 132,
            height: 132,
            tolerated: crate::media::Tolerated::default(),
        };
        let stored = StoredObject {
            key: "avatars/cd/cd.jpg".into(),
            url: "https://cdn/avatars/cd/cd.jpg".into(),
            deduplicated: false,
        };
        (info, "cd".to_string(), stored)
    }

    fn expired() -> Verdict {
        Verdict::new(Reason::ProviderNotexist).with_detail("X-ErrNo: -6101")
    }

    #[test]
    fn expired_avatar_flags_user_and_keeps_the_last_mirror() {
        let r = record(&due(Some(prev(Status::Mirrored, 0))), expired(), &policy());
        assert!(r.reauth_required);
        assert_eq!(
            r.mirror_url.as_deref(),
            Some("https://cdn/avatars/ab/ab.jpg")
        );
        assert_eq!(r.next_check_at, None, "expired avatars wait for a new URL");
        assert_eq!(r.expiry_signals, 1);
    }

    #[test]
    fn an_existing_mirror_can_keep_the_user_unflagged_by_policy() {
        let mut p = policy();
        p.when_mirror_exists = WhenMirrorExists::Keep;
        let r = record(&due(Some(prev(Status::Mirrored, 0))), expired(), &p);
        assert_eq!((r.status, r.reauth_required), (Status::Expired, false));
        // Without a mirror there is nothing to show: flag.
        let r = record(&due(None), expired(), &p);
        assert!(r.reauth_required);
    }

    #[test]
    fn one_seconds_avatars_come_due_within_minutes_and_the_seconds_spread_over_the_window() {
        let week = 7 * 86_400_u64;
        let at = |now, user: i64| recheck_wait(week, 0.1, now, &UserId::Int(user));
        let (spread, week) = (
            i64::try_from(week / 10).unwrap(),
            i64::try_from(week).unwrap(),
        );
        // One second: 1,000 users within +-5 minutes of each other, spread over
        // that window (601 possible seconds; a random draw fills ~490).
        let mut second: Vec<i64> = (0..1_000).map(|u| at(1_700_000_000, u)).collect();
        second.sort_unstable();
        assert!(
            second[999] - second[0] <= 600,
            "{} s apart",
            second[999] - second[0]
        );
        second.dedup();
        assert!(second.len() > 450, "only {} distinct times", second.len());
        assert_eq!(at(1_700_000_000, 7), at(1_700_000_000, 7));
        // 2,000 seconds: spread over the whole window, each tenth of it used.
        let waits: Vec<i64> = (0..2_000).map(|s| at(1_700_000_000 + s, s)).collect();
        assert!(
            waits
                .iter()
                .all(|w| (week - spread..=week + spread).contains(w))
        );
        for tenth in 0..10 {
            let lo = week - spread + tenth * spread / 5;
            let hits = waits
                .iter()
                .filter(|w| (lo..lo + spread / 5).contains(w))
                .count();
            assert!((120..=280).contains(&hits), "tenth {tenth}: {hits} of 2000");
        }
    }

    #[test]
    fn mirrored_avatar_clears_the_flag_and_schedules_a_jittered_recheck() {
        let mut p = prev(Status::Expired, 0);
        p.reauth_required = true;
        let m = mirror();
        let r = build_record(
            &due(Some(p)),
            Found {
                mirror: Some(&m),
                size: 5000,
                ..Found::verdict(Verdict::mirrored(), &Validators::default(), 100)
            },
            &policy(),
            &mut rng(),
        );
        assert!(!r.reauth_required);
        assert_eq!(
            r.mirror_url.as_deref(),
            Some("https://cdn/avatars/cd/cd.jpg")
        );
        assert_eq!(
            (r.width, r.height, r.size_bytes),
            (Some(132), Some(132), Some(5000))
        );
        let next = r.next_check_at.unwrap() - 100;
        assert!((900..=1100).contains(&next), "{next}");
    }

    #[test]
    fn expiry_needs_the_configured_confirmations_and_counts_signals_across_valid_answers() {
        let mut p = policy();
        p.expiry.confirmations = 2;
        // First signal: not yet expired, not flagged, re-checked after min_interval.
        let first = record(&due(Some(prev(Status::Mirrored, 0))), expired(), &p);
        assert_eq!(
            (first.status, first.reason.as_str()),
            (Status::Failing, "expiry_unconfirmed")
        );
        assert!(!first.reauth_required);
        assert_eq!(first.next_check_at, Some(100 + 600));
        assert_eq!(first.expiry_signals, 1);
        // A valid answer in between (a node that has not caught up): mirrored, signal kept, looked at again soon.
        let mut after = prev(Status::Failing, 0);
        after.expiry_signals = first.expiry_signals;
        let m = mirror();
        let valid = build_record(
            &due(Some(after.clone())),
            Found {
                mirror: Some(&m),
                size: 1,
                ..Found::verdict(Verdict::mirrored(), &Validators::default(), 100)
            },
            &p,
            &mut rng(),
        );
        assert_eq!((valid.status, valid.expiry_signals), (Status::Mirrored, 1));
        assert_eq!(valid.next_check_at, Some(100 + 600));
        // Second signal: confirmed.
        after.status = Status::Mirrored;
        after.expiry_signals = valid.expiry_signals;
        let second = record(&due(Some(after)), expired(), &p);
        assert_eq!((second.status, second.expiry_signals), (Status::Expired, 2));
        assert!(second.reauth_required);
        // A new URL starts counting from zero.
        let mut changed = prev(Status::Failing, 0);
        changed.source_url = "https://thirdwx.qlogo.cn/old/132".into();
        changed.expiry_signals = 1;
        let r = record(&due(Some(changed)), expired(), &p);
        assert_eq!((r.status, r.expiry_signals), (Status::Failing, 1));
    }

    #[test]
    fn an_unchanged_picture_keeps_its_mirror_and_what_is_known_of_it() {
        let p = prev(Status::Mirrored, 0);
        let seen = Validators {
            etag: Some("\"v1\"".into()),
            last_modified: Some("Tue, 14 Nov 2023 22:13:20 GMT".into()),
            length: Some(4000),
        };
        let r = build_record(
            &due(Some(p.clone())),
            Found::verdict(Verdict::new(Reason::Unchanged), &seen, 100),
            &policy(),
            &mut rng(),
        );
        assert_eq!(
            (r.status, r.reason.as_str()),
            (Status::Mirrored, "unchanged")
        );
        assert_eq!((&r.mirror_url, &r.sha256), (&p.mirror_url, &p.sha256));
        assert_eq!(
            (r.size_bytes, r.width, r.format.as_deref()),
            (Some(4000), Some(132), Some("jpeg"))
        );
        assert_eq!(r.validators, seen, "a 304's news is kept");
        let next = r.next_check_at.unwrap() - 100;
        assert!((900..=1100).contains(&next), "the weekly cadence: {next}");
    }

    #[test]
    fn a_download_of_the_same_url_says_whether_the_picture_changed() {
        let m = mirror(); // sha "cd"; the previous mirror is "ab"
        let fresh = Validators {
            etag: Some("\"v2\"".into()),
            ..Validators::default()
        };
        let build = |p: Previous| {
            build_record(
                &due(Some(p)),
                Found {
                    mirror: Some(&m),
                    size: 5000,
                    ..Found::verdict(Verdict::mirrored(), &fresh, 100)
                },
                &policy(),
                &mut rng(),
            )
        };
        let r = build(prev(Status::Mirrored, 0));
        assert_eq!(r.reason, "source_changed");
        assert_eq!(r.reason_detail.as_deref(), Some("sha256 was ab"));
        assert_eq!((r.sha256.as_deref(), &r.validators), (Some("cd"), &fresh));
        let mut same = prev(Status::Mirrored, 0);
        same.sha256 = Some("cd".into());
        assert_eq!(build(same).reason, "unchanged");
        let mut other_url = prev(Status::Mirrored, 0);
        other_url.source_url = "https://thirdwx.qlogo.cn/mmopen/old/132".into();
        assert_eq!(
            build(other_url).reason,
            "valid_image",
            "a new URL is a first mirror"
        );
    }

    #[test]
    fn validators_stay_with_their_url() {
        // A failing check keeps the mirror's validators for the next try...
        let r = record(
            &due(Some(prev(Status::Mirrored, 0))),
            Verdict::new(Reason::Timeout),
            &policy(),
        );
        assert_eq!(r.validators.etag.as_deref(), Some("\"v1\""));
        // ...but a new URL that failed must not inherit the old URL's.
        let mut moved = prev(Status::Mirrored, 0);
        moved.source_url = "https://thirdwx.qlogo.cn/mmopen/old/132".into();
        let r = record(&due(Some(moved)), Verdict::new(Reason::Timeout), &policy());
        assert_eq!(r.validators, Validators::default());
        assert!(r.mirror_url.is_some(), "the last good mirror stays visible");
    }

    #[test]
    fn failing_avatars_back_off_never_flag_and_give_up_after_max_attempts() {
        let v = Verdict::new(Reason::ServerError);
        let r = record(&due(Some(prev(Status::Failing, 3))), v.clone(), &policy());
        assert_eq!(r.attempts, 4);
        assert!(!r.reauth_required);
        let next = r.next_check_at.unwrap() - 100;
        assert!((384..=576).contains(&next), "60*2^3=480 +-20%: {next}");
        let r = record(&due(None), v.clone(), &policy());
        assert_eq!(r.attempts, 1, "a first failure starts the count");
        let r = record(&due(Some(prev(Status::Failing, 9))), v, &policy());
        assert_eq!(
            (r.status, r.reason.as_str(), r.next_check_at),
            (Status::Failing, "gave_up", None)
        );
        assert!(!r.reauth_required, "giving up is never the user's fault");
        assert!(r.reason_detail.unwrap().contains("server_error"));
    }

    #[test]
    fn a_signed_url_is_retried_before_its_signature_runs_out() {
        let v = Verdict::new(Reason::Timeout);
        // The 6th failure in a row would wait 60 * 2^5 s: the signature runs out sooner.
        let r = build_record(
            &due(Some(prev(Status::Failing, 5))),
            Found {
                expires_at: Some(100 + 400),
                ..Found::verdict(v, &Validators::default(), 100)
            },
            &policy(),
            &mut rng(),
        );
        assert_eq!(r.next_check_at, Some(100 + 400 - EXPIRY_MARGIN_SECS));
    }

    #[test]
    fn a_deprecated_host_keeps_its_new_mirror_and_flags_the_user() {
        let v = Verdict::new(Reason::DeprecatedHost);
        let m = mirror();
        let r = build_record(
            &due(None),
            Found {
                mirror: Some(&m),
                size: 10,
                ..Found::verdict(v, &Validators::default(), 100)
            },
            &policy(),
            &mut rng(),
        );
        assert_eq!((r.status, r.reauth_required), (Status::Expired, true));
        assert_eq!(
            r.mirror_url.as_deref(),
            Some("https://cdn/avatars/cd/cd.jpg")
        );
        assert_eq!(
            r.expiry_signals, 0,
            "a retiring host is not a flapping signal"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let rc = policy().recheck;
        assert_eq!(backoff_secs(1, &rc), 60);
        assert_eq!(backoff_secs(2, &rc), 120);
        assert_eq!(backoff_secs(30, &rc), 86_400);
    }
}
