//! Per-host politeness for one scan, adaptive in both directions, as TCP
//! congestion control and Netflix's concurrency-limits are: each host starts
//! at `fetch.per_host_concurrency` (the operator's idea of safe, and what a
//! healthy CDN gets at once); a push-back (429, 503, a timeout) halves it,
//! once per congestion event (push-backs to requests sent before the last
//! decrease are that same event, as TCP counts losses); then it grows by one per round of answers again, and
//! only an eighth as fast near the level where the host pushed back, so a
//! host that limits concurrency is met near its limit with few 429s. A
//! smoothed latency far over the host's best also counts as congestion. At a
//! limit of one, a further push-back spaces requests out instead (up to one
//! a minute), and successes bring the spacing back down. `Retry-After`
//! pauses the host. State lasts one scan.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::config::FetchSettings;
pub(crate) use crate::model::HostState;

/// Slowest a host can make us: one request a minute.
pub(crate) const MAX_HOST_INTERVAL: Duration = Duration::from_secs(60);
/// The first spacing when a host pushes back at a limit of one.
const FIRST_INTERVAL: Duration = Duration::from_millis(250);
/// Longest pause a `Retry-After` imposes on the whole host.
const MAX_PAUSE: Duration = Duration::from_secs(60);
/// Smoothed latency this many times the host's best is congestion.
const LATENCY_FACTOR: u32 = 4;
/// Latencies below this are noise, not a baseline.
const LATENCY_FLOOR: Duration = Duration::from_millis(25);

/// What one request told us about its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    /// An answer (any status but 429/503), and how long it took.
    Answered(Duration),
    /// 429 or 503 (with the `Retry-After` it asked for), or a timeout.
    PushBack(Option<Duration>),
    /// Nothing to learn (refused before sending, a connection error).
    Nothing,
}

pub(crate) struct HostLimiter {
    max: f64,
    min_interval: Duration,
    hosts: Mutex<HashMap<String, Arc<HostGate>>>,
}

struct HostGate {
    state: Mutex<GateState>,
    freed: Notify,
    /// Answered 405/501 to a HEAD: re-verify with GET for the rest of the scan.
    rejects_head: AtomicBool,
    /// Answered 200 with the same picture to a conditional GET: stop sending validators.
    ignores_validators: AtomicBool,
}

struct GateState {
    in_flight: usize,
    limit: f64,
    interval: Duration,
    next_start: Instant,
    paused_until: Instant,
    last_decrease: Option<Instant>,
    best: Option<Duration>,
    /// Exponentially smoothed latency (one fifth per sample).
    smoothed: Option<Duration>,
    /// The limit at the last push-back: growth slows near it.
    ceiling: f64,
    push_backs: u64,
}

impl GateState {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // a small positive limit
    fn allowed(&self) -> usize {
        (self.limit.floor() as usize).max(1)
    }

    /// One decrease per congestion event: a burst of 429s to requests sent
    /// before the last decrease is one signal, not twenty; a push-back to a
    /// request sent after it is news (the lower limit is still too high).
    fn may_decrease(&self, sent: Instant) -> bool {
        self.last_decrease.is_none_or(|t| sent > t)
    }

    fn decrease(&mut self, now: Instant, factor: f64) {
        if self.limit <= 1.0 {
            self.interval = (self.interval * 2).clamp(FIRST_INTERVAL, MAX_HOST_INTERVAL);
        }
        self.ceiling = self.limit;
        self.limit = (self.limit * factor).max(1.0);
        self.last_decrease = Some(now);
    }

    fn increase(&mut self, max: f64) {
        let step = if self.limit + 1.0 >= self.ceiling {
            // Probing the level the host pushed back at: slowly.
            0.125 / self.limit
        } else {
            1.0 / self.limit
        };
        self.limit = (self.limit + step).min(max);
    }
}

/// Held while a request to the host is in flight; `done` says how it went.
pub(crate) struct HostPermit {
    gate: Arc<HostGate>,
    /// When the request was let through.
    sent: Instant,
    max: f64,
    min_interval: Duration,
    released: bool,
}

impl HostPermit {
    /// Releases the slot and adapts the host's limit to what it answered.
    pub(crate) fn done(mut self, signal: Signal) {
        let now = Instant::now();
        {
            let mut st = self.gate.state.lock().expect("host gate lock");
            st.in_flight -= 1;
            match signal {
                Signal::PushBack(retry_after) => {
                    st.push_backs += 1;
                    if let Some(wait) = retry_after {
                        st.paused_until = st.paused_until.max(now + wait.min(MAX_PAUSE));
                    }
                    if st.may_decrease(self.sent) {
                        st.decrease(now, 0.5);
                    }
                }
                Signal::Answered(took) => {
                    let best = st.best.map_or(took, |b| b.min(took));
                    st.best = Some(best);
                    let smoothed = st.smoothed.map_or(took, |s| (s * 4 + took) / 5);
                    st.smoothed = Some(smoothed);
                    let baseline = best.max(LATENCY_FLOOR);
                    if smoothed > baseline * LATENCY_FACTOR {
                        if st.may_decrease(self.sent) {
                            st.decrease(now, 0.8);
                        }
                    } else if st.interval > self.min_interval {
                        // Recovery: spacing first, then more slots.
                        st.interval = (st.interval / 2).max(self.min_interval);
                        if st.interval < FIRST_INTERVAL {
                            st.interval = self.min_interval;
                        }
                    } else if smoothed <= baseline * 2 {
                        st.increase(self.max);
                    }
                }
                Signal::Nothing => {}
            }
        }
        self.released = true;
        self.gate.freed.notify_waiters();
    }
}

impl Drop for HostPermit {
    fn drop(&mut self) {
        if !self.released {
            // Cancelled mid-request: free the slot, learn nothing.
            self.gate.state.lock().expect("host gate lock").in_flight -= 1;
            self.gate.freed.notify_waiters();
        }
    }
}

impl HostLimiter {
    pub(crate) fn new(settings: &FetchSettings) -> Self {
        HostLimiter {
            max: settings.per_host_concurrency.max(1) as f64,
            min_interval: Duration::from_millis(settings.per_host_min_interval_ms),
            hosts: Mutex::new(HashMap::new()),
        }
    }

    fn gate(&self, host: &str) -> Arc<HostGate> {
        let mut hosts = self.hosts.lock().expect("host limiter lock");
        hosts
            .entry(host.to_string())
            .or_insert_with(|| {
                Arc::new(HostGate {
                    state: Mutex::new(GateState {
                        in_flight: 0,
                        limit: self.max,
                        interval: self.min_interval,
                        next_start: Instant::now(),
                        paused_until: Instant::now(),
                        last_decrease: None,
                        best: None,
                        smoothed: None,
                        ceiling: self.max,
                        push_backs: 0,
                    }),
                    freed: Notify::new(),
                    rejects_head: AtomicBool::new(false),
                    ignores_validators: AtomicBool::new(false),
                })
            })
            .clone()
    }

    /// Waits for a slot under the host's current limit and for its pace;
    /// hold the permit during the request and hand it back with `done`.
    pub(crate) async fn acquire(&self, host: &str) -> HostPermit {
        let gate = self.gate(host);
        loop {
            let freed = gate.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let wait_until = {
                let mut st = gate.state.lock().expect("host gate lock");
                let now = Instant::now();
                let start = st.next_start.max(st.paused_until);
                if st.in_flight >= st.allowed() {
                    None
                } else if start <= now {
                    st.in_flight += 1;
                    st.next_start = now + st.interval;
                    return HostPermit {
                        gate: gate.clone(),
                        sent: now,
                        max: self.max,
                        min_interval: self.min_interval,
                        released: false,
                    };
                } else {
                    Some(start)
                }
            };
            match wait_until {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => freed.await,
            }
        }
    }

    /// The host's current concurrency limit (the tests read the state).
    #[cfg(test)]
    pub(crate) fn limit(&self, host: &str) -> f64 {
        self.gate(host).state.lock().expect("host gate lock").limit
    }

    /// The host's current spacing between request starts.
    #[cfg(test)]
    pub(crate) fn interval(&self, host: &str) -> Duration {
        self.gate(host)
            .state
            .lock()
            .expect("host gate lock")
            .interval
    }

    /// Hosts that pushed back during the scan, the most throttled first.
    pub(crate) fn throttled(&self) -> Vec<HostState> {
        let hosts = self.hosts.lock().expect("host limiter lock");
        let mut out: Vec<HostState> = hosts
            .iter()
            .filter_map(|(host, gate)| {
                let st = gate.state.lock().expect("host gate lock");
                (st.push_backs > 0).then(|| HostState {
                    host: host.clone(),
                    provider: None,
                    concurrency: (st.limit * 10.0).round() / 10.0,
                    interval_ms: u64::try_from(st.interval.as_millis()).unwrap_or(u64::MAX),
                    push_backs: st.push_backs,
                })
            })
            .collect();
        out.sort_by(|a, b| b.push_backs.cmp(&a.push_backs).then(a.host.cmp(&b.host)));
        out
    }

    pub(crate) fn rejects_head(&self, host: &str) -> bool {
        self.gate(host).rejects_head.load(Ordering::Relaxed)
    }

    pub(crate) fn mark_rejects_head(&self, host: &str) {
        self.gate(host).rejects_head.store(true, Ordering::Relaxed);
    }

    pub(crate) fn ignores_validators(&self, host: &str) -> bool {
        self.gate(host).ignores_validators.load(Ordering::Relaxed)
    }

    pub(crate) fn mark_ignores_validators(&self, host: &str) {
        self.gate(host)
            .ignores_validators
            .store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // AIMD steps (halving, +1) are exact in f64
mod tests {
    use super::*;

    fn settings(per_host: usize) -> FetchSettings {
        let mut s = crate::config::Settings::from_layers(None, Vec::new())
            .unwrap()
            .fetch;
        s.per_host_concurrency = per_host;
        s.per_host_min_interval_ms = 0;
        s
    }

    const FAST: Signal = Signal::Answered(Duration::from_millis(30));

    #[tokio::test]
    async fn push_back_halves_a_host_once_per_window_and_successes_win_it_back() {
        let hosts = HostLimiter::new(&settings(8));
        assert_eq!(hosts.limit("a"), 8.0, "the setting, at first");
        // Eight concurrent requests all answered 429: one halving, not eight.
        let permits: Vec<_> = futures::future::join_all((0..8).map(|_| hosts.acquire("a"))).await;
        for p in permits {
            p.done(Signal::PushBack(None));
        }
        assert_eq!(hosts.limit("a"), 4.0);
        assert_eq!(hosts.limit("b"), 8.0, "only that host");
        // Additive increase: one slot per round of successes, slower near 8.
        for _ in 0..15 {
            hosts.acquire("a").await.done(FAST);
        }
        let limit = hosts.limit("a");
        assert!((6.0..7.5).contains(&limit), "{limit}");
        for _ in 0..200 {
            hosts.acquire("a").await.done(FAST);
        }
        assert_eq!(hosts.limit("a"), 8.0, "recovered, capped at the setting");
    }

    #[tokio::test]
    async fn at_one_slot_a_host_is_spaced_out_and_the_spacing_recovers() {
        let hosts = HostLimiter::new(&settings(1));
        hosts.acquire("a").await.done(Signal::PushBack(None));
        assert_eq!(hosts.interval("a"), FIRST_INTERVAL);
        tokio::time::sleep(Duration::from_millis(60)).await;
        hosts.acquire("a").await.done(Signal::PushBack(None));
        assert_eq!(hosts.interval("a"), FIRST_INTERVAL * 2);
        hosts.acquire("a").await.done(FAST);
        hosts.acquire("a").await.done(FAST);
        assert_eq!(hosts.interval("a"), Duration::ZERO, "back to full speed");
    }

    #[tokio::test]
    async fn the_limit_caps_requests_in_flight() {
        let hosts = HostLimiter::new(&settings(2));
        let a = hosts.acquire("h").await;
        let _b = hosts.acquire("h").await;
        let third = tokio::time::timeout(Duration::from_millis(50), hosts.acquire("h")).await;
        assert!(third.is_err(), "a third request to the same host must wait");
        let _other = tokio::time::timeout(Duration::from_millis(50), hosts.acquire("other"))
            .await
            .unwrap();
        a.done(FAST);
        let _again = tokio::time::timeout(Duration::from_millis(50), hosts.acquire("h"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn retry_after_pauses_the_host() {
        let hosts = HostLimiter::new(&settings(4));
        hosts
            .acquire("h")
            .await
            .done(Signal::PushBack(Some(Duration::from_millis(300))));
        let started = Instant::now();
        hosts.acquire("h").await.done(FAST);
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert_eq!(hosts.throttled()[0].push_backs, 1);
    }

    #[tokio::test]
    async fn latency_far_over_the_best_counts_as_congestion() {
        let hosts = HostLimiter::new(&settings(10));
        for _ in 0..10 {
            hosts.acquire("h").await.done(FAST);
        }
        assert_eq!(hosts.limit("h"), 10.0);
        // One slow answer is noise; a host that stays slow is congested.
        hosts
            .acquire("h")
            .await
            .done(Signal::Answered(Duration::from_millis(400)));
        assert_eq!(hosts.limit("h"), 10.0, "one slow answer");
        for _ in 0..4 {
            hosts
                .acquire("h")
                .await
                .done(Signal::Answered(Duration::from_millis(900)));
        }
        assert!(hosts.limit("h") < 10.0, "{}", hosts.limit("h"));
    }
}
