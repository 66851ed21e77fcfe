//! `scan`'s progress: a bar with rate and ETA on a terminal, a log line every
//! few seconds otherwise (CI logs, `kubectl logs`), nothing with `--no-progress`.
//! It counts avatars as they are checked (not as their batch is written),
//! and the rate behind the ETA is smoothed over about half a minute, so one
//! slow or fast moment does not swing the estimate.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

const TICK: Duration = Duration::from_millis(200);
/// The rate's memory: an interval this long ago weighs 1/e of the latest.
const SMOOTHING: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Off,
    Bar,
    Log,
}

impl Mode {
    /// A bar when standard error is a terminal, log lines otherwise.
    pub(crate) fn detect(disabled: bool) -> Mode {
        if disabled {
            Mode::Off
        } else if std::io::stderr().is_terminal() {
            Mode::Bar
        } else {
            Mode::Log
        }
    }
}

/// The bar on screen, if any: log lines are written around it (`LogWriter`).
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Standard error for the log: while a bar is drawn, it is cleared for the
/// line and drawn again below it, so no stale bar is left between log lines.
#[derive(Clone, Copy, Default)]
pub(crate) struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = BAR.lock().ok().and_then(|b| b.clone());
        match bar {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        LogWriter
    }
}

/// Stops the display when dropped or finished.
pub(crate) struct Progress {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// Follows `metrics` (avatars checked, due backlog at scan start) until stopped.
    /// Off a terminal, a line every `log_every`.
    pub(crate) fn start(
        mode: Mode,
        metrics: &Metrics,
        limit: Option<u64>,
        log_every: Duration,
    ) -> Progress {
        let stop = CancellationToken::new();
        let task = match mode {
            Mode::Off => None,
            Mode::Bar => Some(tokio::spawn(bar(metrics.clone(), limit, stop.clone()))),
            Mode::Log => Some(tokio::spawn(log(
                metrics.clone(),
                limit,
                log_every,
                stop.clone(),
            ))),
        };
        Progress { stop, task }
    }

    pub(crate) async fn finish(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The expected total: the backlog counted at scan start, capped by `--limit`.
fn total(metrics: &Metrics, start: u64, limit: Option<u64>) -> Option<u64> {
    let backlog = metrics.due_backlog();
    (backlog > 0).then(|| {
        let t = u64::try_from(backlog).unwrap_or(0) + start;
        limit.map_or(t, |l| t.min(start + l))
    })
}

/// An exponentially weighted rate: each observation counts by how much
/// time it covers, so uneven ticks and bursts average out.
#[derive(Debug, Default)]
pub(crate) struct Rate {
    last: Option<(u64, Instant)>,
    per_sec: Option<f64>,
}

impl Rate {
    /// `done` avatars by `now`; returns the smoothed rate.
    pub(crate) fn observe(&mut self, done: u64, now: Instant) -> Option<f64> {
        if let Some((before, at)) = self.last {
            let dt = now.saturating_duration_since(at).as_secs_f64();
            if dt <= 0.0 {
                return self.per_sec;
            }
            #[allow(clippy::cast_precision_loss, reason = "avatar counts")]
            let instant = done.saturating_sub(before) as f64 / dt;
            let weight = 1.0 - (-dt / SMOOTHING.as_secs_f64()).exp();
            self.per_sec = Some(match self.per_sec {
                Some(r) => r + weight * (instant - r),
                None => instant,
            });
        }
        self.last = Some((done, now));
        self.per_sec
    }

    /// Seconds to finish `remaining` at the smoothed rate.
    pub(crate) fn eta_secs(&self, remaining: u64) -> Option<u64> {
        let rate = self.per_sec.filter(|r| *r > 0.0)?;
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a non-negative number of seconds"
        )]
        Some((remaining as f64 / rate).round() as u64)
    }
}

fn human(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m {:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

async fn bar(metrics: Metrics, limit: Option<u64>, stop: CancellationToken) {
    let start = metrics.progress();
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} avatars  {msg}",
        )
        .expect("valid template"),
    );
    if let Ok(mut slot) = BAR.lock() {
        *slot = Some(bar.clone());
    }
    let mut rate = Rate::default();
    loop {
        let done = metrics.progress() - start;
        let total = total(&metrics, start, limit).map(|t| t - start);
        if let Some(len) = total {
            bar.set_length(len);
        }
        bar.set_position(done);
        let per_sec = rate.observe(done, Instant::now());
        let eta = total.and_then(|t| rate.eta_secs(t.saturating_sub(done)));
        bar.set_message(match (per_sec, eta) {
            (Some(r), Some(e)) => format!("{r:.0}/s  ETA {}", human(e)),
            (Some(r), None) => format!("{r:.0}/s"),
            _ => String::new(),
        });
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(TICK) => {}
        }
    }
    if let Ok(mut slot) = BAR.lock() {
        *slot = None;
    }
    bar.finish_and_clear();
}

async fn log(metrics: Metrics, limit: Option<u64>, every: Duration, stop: CancellationToken) {
    let start = metrics.progress();
    let mut rate = Rate::default();
    rate.observe(0, Instant::now());
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let done = metrics.progress() - start;
        let total = total(&metrics, start, limit).map(|t| t - start);
        let per_sec = rate.observe(done, Instant::now()).unwrap_or(0.0);
        let eta_secs = total.and_then(|t| rate.eta_secs(t.saturating_sub(done)));
        // Numbers, so a log shipper can graph them; one decimal is enough.
        let rate_per_sec = (per_sec * 10.0).round() / 10.0;
        tracing::info!(done, total, rate_per_sec, eta_secs, "progress");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_of_a_thousand_do_not_swing_the_eta() {
        // 100 avatars/s on average, arriving as a batch of 1,000 every 10 s,
        // observed every 200 ms (the bar's tick): the raw rate jumps between
        // 0 and 5,000/s; the smoothed ETA for 50,000 avatars stays near 500 s
        // (the raw rate would say 10 s, then never).
        let t0 = Instant::now();
        let mut rate = Rate::default();
        let mut etas = Vec::new();
        for tick in 0..=1500u64 {
            let now = t0 + Duration::from_millis(tick * 200);
            let done = (tick / 50) * 1000;
            rate.observe(done, now);
            if tick >= 500 {
                etas.push(rate.eta_secs(50_000).unwrap_or(u64::MAX));
            }
        }
        let (lo, hi) = (*etas.iter().min().unwrap(), *etas.iter().max().unwrap());
        assert!(lo >= 350 && hi <= 700, "ETA swings from {lo} s to {hi} s");
    }

    #[test]
    fn a_steady_rate_is_reported_as_it_is() {
        let t0 = Instant::now();
        let mut rate = Rate::default();
        let mut last = None;
        for s in 0..=60u64 {
            last = rate.observe(s * 250, t0 + Duration::from_secs(s));
        }
        let r = last.unwrap();
        assert!((r - 250.0).abs() < 0.01, "{r}");
        assert_eq!(rate.eta_secs(1000), Some(4));
        assert_eq!(Rate::default().eta_secs(10), None, "no rate yet, no ETA");
        assert_eq!(human(3725), "1h 02m");
        assert_eq!(human(65), "1m 05s");
    }
}
