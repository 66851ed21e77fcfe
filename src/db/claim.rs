//! What a scan claims: the due avatars of one keyset page, re-checked under
//! the row lock, and the controls that narrow it (shard, selection, URL filter).
//! Pure rules; the statements live in `store`.

use std::collections::HashMap;

use super::dialect::Dialect;
use crate::model::{AvatarRecord, Status, UserId, Validators};

/// The mirrored picture as last recorded: carried over while the mirror stays.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MirrorMeta {
    pub size_bytes: Option<i64>,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub format: Option<String>,
}

/// What the last check left behind for an avatar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Previous {
    pub source_url: String,
    pub status: Status,
    pub mirror_url: Option<String>,
    pub object_key: Option<String>,
    pub sha256: Option<String>,
    pub meta: MirrorMeta,
    pub validators: Validators,
    pub attempts: i64,
    pub expiry_signals: i64,
    pub reauth_required: bool,
}

impl From<&AvatarRecord> for Previous {
    /// What a recorded state row leaves behind for the next check.
    fn from(r: &AvatarRecord) -> Self {
        Previous {
            source_url: r.source_url.clone(),
            status: r.status,
            mirror_url: r.mirror_url.clone(),
            object_key: r.object_key.clone(),
            sha256: r.sha256.clone(),
            meta: MirrorMeta {
                size_bytes: r.size_bytes,
                width: r.width,
                height: r.height,
                format: r.format.clone(),
            },
            validators: r.validators.clone(),
            attempts: r.attempts,
            expiry_signals: r.expiry_signals,
            reauth_required: r.reauth_required,
        }
    }
}

/// One avatar this worker holds a lease on and must check now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueAvatar {
    pub user_id: UserId,
    /// Exactly as stored in the profile table.
    pub avatar_url: String,
    pub previous: Option<Previous>,
}

/// What to claim: the next page after `after`, leased to `token` until `lease_until`.
#[derive(Clone)]
pub struct Claim<'a> {
    /// Where the previous page left the walk; `None` starts at the table's first row.
    pub after: Option<&'a WalkCursor>,
    pub now: i64,
    pub limit: usize,
    pub token: &'a str,
    pub lease_until: i64,
    pub shard: Option<Shard>,
    pub selection: &'a Selection,
    /// Only avatar URLs this accepts (e.g. `--provider`).
    pub keep_url: Option<&'a dyn UrlFilter>,
}

/// Decides which avatar URLs a scan takes.
pub trait UrlFilter: Send + Sync {
    fn keep(&self, url: &str) -> bool;
}

impl Claim<'_> {
    /// Drops candidates outside this worker's shard or the URL filter.
    pub(super) fn narrow(&self, candidates: &mut Vec<Candidate>) {
        if let Some(shard) = self.shard {
            candidates.retain(|c| shard.owns(&c.user_id));
        }
        if let Some(keep) = self.keep_url {
            candidates.retain(|c| keep.keep(&c.avatar_url));
        }
    }
}

/// Which avatars a scan takes beyond "everything due" (the backfill controls).
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Ignore `next_check_at`: everything matching is due now.
    pub force: bool,
    /// Only avatars whose recorded status is one of these (`pending` = never checked).
    pub only: Vec<Status>,
    /// Only these user ids.
    pub users: Vec<String>,
    /// Read and report, but claim nothing: no pending rows, no leases.
    pub dry_run: bool,
}

impl Selection {
    /// SQL added to the due query: a term OR-ed into the due condition, and
    /// conditions AND-ed after it. Values are literals from an enum or escaped
    /// text, so the statement needs no extra parameters.
    pub(super) fn sql(&self, d: &impl Dialect) -> (String, String) {
        let due_or = if self.force {
            " OR 1 = 1".to_string()
        } else {
            String::new()
        };
        let mut and = String::new();
        if !self.only.is_empty() {
            let known: Vec<String> = self
                .only
                .iter()
                .map(|s| format!("'{}'", s.as_str()))
                .collect();
            let never_checked = if self.only.contains(&Status::Pending) {
                " OR s.user_id IS NULL"
            } else {
                ""
            };
            and.push_str(&format!(
                " AND (s.status IN ({}){never_checked})",
                known.join(", ")
            ));
        }
        if !self.users.is_empty() {
            let ids: Vec<String> = self.users.iter().filter_map(|u| d.id_literal(u)).collect();
            if ids.is_empty() {
                and.push_str(" AND 1 = 0");
            } else {
                and.push_str(&format!(" AND p.id IN ({})", ids.join(", ")));
            }
        }
        (due_or, and)
    }
}

/// Static sharding for indexed Jobs: this worker takes ids whose shard is `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    /// Integer ids shard by value, text ids by a stable FNV-1a hash.
    pub fn owns(&self, id: &UserId) -> bool {
        let bucket = match id {
            UserId::Int(i) => u32::try_from(i.rem_euclid(i64::from(self.count))).unwrap_or(0),
            UserId::Text(s) => {
                let h = s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                });
                u32::try_from(h % u64::from(self.count)).unwrap_or(0)
            }
        };
        bucket == self.index
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (i, n) = s.split_once('/').ok_or("expected I/N, e.g. 0/4")?;
        let index: u32 = i
            .trim()
            .parse()
            .map_err(|_| format!("bad shard index {i:?}"))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("bad shard count {n:?}"))?;
        if count == 0 || index >= count {
            return Err(format!("shard {index}/{count}: need 0 <= I < N"));
        }
        Ok(Shard { index, count })
    }
}

/// Profile rows one statement of the walk reads at most (a window). The idle
/// benchmark at 1M rows spent about 20 ms (SQLite) and 35 ms (PostgreSQL) per
/// window, so a table of any size is walked in statements far inside
/// `profile.statement_timeout_secs`.
pub const WALK_WINDOW: usize = 10_000;

/// One page of the keyset walk: what was claimed, and where the walk goes on.
#[derive(Debug, Clone, Default)]
pub struct ClaimedPage {
    pub claimed: Vec<DueAvatar>,
    /// Where the next page starts; `None` when the walk is over.
    pub cursor: Option<WalkCursor>,
}

/// Where the keyset walk goes on: after the last id read (claimed or not),
/// and, when that lies inside a window an earlier page measured, that
/// window's end, so the next page does not measure it again (a first scan
/// fills many pages per window).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalkCursor {
    pub(super) after: UserId,
    pub(super) window: WindowEnd,
}

/// The end of the window a cursor lies in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum WindowEnd {
    /// Not measured yet: the cursor is a window's end.
    Unknown,
    /// Its last row.
    At(UserId),
    /// The window runs to the table's end (or the walk has no windows).
    TableEnd,
}

/// A due candidate from the keyset query, before its lease is taken.
#[derive(Debug, Clone)]
pub(super) struct Candidate {
    pub(super) user_id: UserId,
    pub(super) avatar_url: String,
    pub(super) has_state: bool,
}

/// A state row as locked while claiming.
#[derive(Debug, Clone)]
pub(super) struct Locked {
    pub(super) user_id: String,
    pub(super) previous: Previous,
    pub(super) next_check_at: Option<i64>,
    pub(super) lease_expires_at: Option<i64>,
}

/// Re-checked under the row lock: another worker may have taken or finished it
/// since the page was read.
fn claimable(now: i64, url: &str, locked: &Locked, force: bool) -> bool {
    let lease_free = locked.lease_expires_at.is_none_or(|t| t <= now);
    let due = force
        || locked.previous.source_url != url
        || locked.next_check_at.is_some_and(|t| t <= now);
    lease_free && due
}

/// A dry run claims nothing: candidates with what the state table says of them.
pub(super) fn unclaimed(candidates: Vec<Candidate>, locked: Vec<Locked>) -> Vec<DueAvatar> {
    let mut by_id: HashMap<String, Locked> =
        locked.into_iter().map(|l| (l.user_id.clone(), l)).collect();
    candidates
        .into_iter()
        .map(|c| DueAvatar {
            previous: by_id.remove(&c.user_id.to_string()).map(|l| l.previous),
            user_id: c.user_id,
            avatar_url: c.avatar_url,
        })
        .collect()
}

/// Pairs candidates with their locked rows and keeps the claimable ones.
pub(super) fn select_claims(
    now: i64,
    candidates: Vec<Candidate>,
    locked: Vec<Locked>,
    force: bool,
) -> Vec<DueAvatar> {
    let mut by_id: HashMap<String, Locked> =
        locked.into_iter().map(|l| (l.user_id.clone(), l)).collect();
    candidates
        .into_iter()
        .filter_map(|c| {
            let l = by_id.remove(&c.user_id.to_string())?;
            let due = claimable(now, &c.avatar_url, &l, force);
            due.then_some(DueAvatar {
                user_id: c.user_id,
                avatar_url: c.avatar_url,
                previous: Some(l.previous),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::mysql::MySql;
    use crate::db::postgres::Postgres;
    use crate::db::sqlite::Sqlite;

    fn locked(url: &str, next: Option<i64>, lease: Option<i64>) -> Locked {
        Locked {
            user_id: "1".into(),
            previous: Previous {
                source_url: url.into(),
                status: Status::Mirrored,
                mirror_url: None,
                object_key: None,
                sha256: None,
                meta: MirrorMeta::default(),
                validators: Validators::default(),
                attempts: 0,
                expiry_signals: 0,
                reauth_required: false,
            },
            next_check_at: next,
            lease_expires_at: lease,
        }
    }

    #[test]
    fn a_row_is_claimable_only_when_due_and_not_leased() {
        let now = 1000;
        let c =
            |url: &str, next, lease, force| claimable(now, url, &locked("u", next, lease), force);
        assert!(c("u", Some(999), None, false), "due by time");
        assert!(c("new", None, None, false), "url changed");
        assert!(!c("u", Some(2000), None, false), "not due yet");
        assert!(
            c("u", Some(2000), None, true),
            "--force ignores next_check_at"
        );
        assert!(!c("u", None, None, false), "settled until the url changes");
        assert!(
            !c("u", Some(999), Some(1500), true),
            "leased by another worker, even with --force"
        );
        assert!(
            c("u", Some(999), Some(1000), false),
            "an expired lease is free"
        );
    }

    #[test]
    fn selection_sql_uses_only_escaped_literals() {
        let sel = Selection {
            force: true,
            only: vec![Status::Failing, Status::Pending],
            users: vec!["42".into(), "o'brien\\x".into()],
            dry_run: false,
        };
        let (due_or, and) = sel.sql(&Sqlite);
        assert_eq!(due_or, " OR 1 = 1");
        assert_eq!(
            and,
            " AND (s.status IN ('failing', 'pending') OR s.user_id IS NULL) AND p.id IN (42, 'o''brien\\x')"
        );
        let (_, and) = sel.sql(&MySql::with_int_ids(true));
        assert!(and.ends_with("p.id IN (42, 'o''brien\\\\x')"), "{and}");
        let (_, and) = sel.sql(&Postgres::with_id_type("TEXT"));
        assert!(
            and.ends_with("p.id IN (CAST('42' AS TEXT), CAST('o''brien\\x' AS TEXT))"),
            "{and}"
        );
        let (_, and) = sel.sql(&Postgres::with_id_type("INT8"));
        assert!(
            and.ends_with("p.id IN (CAST('42' AS INT8))"),
            "a text id cannot exist in an integer column: {and}"
        );
        let only_text = Selection {
            users: vec!["abc".into()],
            ..Default::default()
        };
        assert_eq!(
            only_text.sql(&Postgres::with_id_type("INT4")).1,
            " AND 1 = 0"
        );
        assert_eq!(
            Selection::default().sql(&Sqlite),
            (String::new(), String::new())
        );
    }

    #[test]
    fn shards_split_ids_without_overlap() {
        let shards: Vec<Shard> = (0..4).map(|i| format!("{i}/4").parse().unwrap()).collect();
        for id in (0..200)
            .map(UserId::Int)
            .chain((0..200).map(|i| UserId::Text(format!("u{i}"))))
        {
            assert_eq!(shards.iter().filter(|s| s.owns(&id)).count(), 1, "{id}");
        }
        assert!("4/4".parse::<Shard>().is_err());
        assert!("1".parse::<Shard>().is_err());
    }
}
