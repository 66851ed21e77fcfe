//! The avatars each scan holds a lease on and has not settled yet, so the
//! heartbeat and the final release name their rows by primary key. Finding
//! them by lease token needed an index on `lease_token`, and every claim
//! and settle then moved an index entry: no update could be HOT, and
//! PostgreSQL rewrote every index of the row twice per avatar (#19).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

/// Claimed, unsettled user ids per lease token: at most the pages in flight.
#[derive(Default)]
pub(super) struct Held {
    by_token: Mutex<HashMap<String, HashSet<String>>>,
}

impl Held {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, HashSet<String>>) -> T) -> T {
        // A panic elsewhere while holding the lock leaves a usable map: every
        // change is a single insert or remove.
        let mut map = self
            .by_token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut map)
    }

    /// `token` now holds `ids`.
    pub(super) fn claimed(&self, token: &str, ids: impl IntoIterator<Item = String>) {
        self.with(|map| map.entry(token.to_string()).or_default().extend(ids));
    }

    /// `ids` were written (their leases cleared with them) or were found
    /// taken over: `token` no longer holds them.
    pub(super) fn settled(&self, token: &str, ids: impl IntoIterator<Item = String>) {
        self.with(|map| {
            if let Some(held) = map.get_mut(token) {
                for id in ids {
                    held.remove(&id);
                }
                if held.is_empty() {
                    map.remove(token);
                }
            }
        });
    }

    /// What `token` holds now, for the heartbeat.
    pub(super) fn ids(&self, token: &str) -> Vec<String> {
        self.with(|map| {
            map.get(token)
                .map(|held| held.iter().cloned().collect())
                .unwrap_or_default()
        })
    }

    /// Everything `token` holds, forgotten here: for the final release.
    pub(super) fn take(&self, token: &str) -> Vec<String> {
        self.with(|map| {
            map.remove(token)
                .map(|held| held.into_iter().collect())
                .unwrap_or_default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids<const N: usize>(ids: [&str; N]) -> impl Iterator<Item = String> {
        ids.into_iter().map(str::to_string)
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    #[test]
    fn a_token_holds_what_it_claimed_until_settled_or_taken() {
        let held = Held::default();
        held.claimed("a", ids(["1", "2", "3"]));
        held.claimed("b", ids(["9"]));
        held.settled("a", ids(["2"]));
        assert_eq!(sorted(held.ids("a")), ["1", "3"]);
        // Another token's settle never drops this one's ids.
        held.settled("b", ids(["1"]));
        assert_eq!(sorted(held.ids("a")), ["1", "3"]);
        assert_eq!(sorted(held.take("a")), ["1", "3"]);
        assert!(held.ids("a").is_empty());
        assert_eq!(held.take("b"), ["9"]);
    }

    #[test]
    fn a_fully_settled_token_leaves_nothing_behind() {
        let held = Held::default();
        held.claimed("a", ids(["1"]));
        held.settled("a", ids(["1"]));
        assert!(held.with(|map| map.is_empty()));
    }
}
