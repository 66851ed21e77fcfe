//! `scan`'s progress: a bar with rate and ETA on a terminal, a log line every
//! few seconds otherwise (CI logs, `kubectl logs`), nothing with `--no-progress`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often a plain log line reports progress.
const LOG_EVERY: Duration = Duration::from_secs(10);
const TICK: Duration = Duration::from_millis(200);

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

/// Stops the display when dropped or finished.
pub(crate) struct Progress {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// Follows `metrics` (avatars finished, due backlog at scan start) until stopped.
    pub(crate) fn start(mode: Mode, metrics: &Metrics, limit: Option<u64>) -> Progress {
        let stop = CancellationToken::new();
        let task = match mode {
            Mode::Off => None,
            Mode::Bar => Some(tokio::spawn(bar(metrics.clone(), limit, stop.clone()))),
            Mode::Log => Some(tokio::spawn(log(metrics.clone(), limit, stop.clone()))),
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

async fn bar(metrics: Metrics, limit: Option<u64>, stop: CancellationToken) {
    let start = metrics.progress();
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} avatars  {per_sec}  ETA {eta}",
        )
        .expect("valid template"),
    );
    loop {
        if let Some(len) = total(&metrics, start, limit) {
            bar.set_length(len);
        }
        bar.set_position(metrics.progress() - start);
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(TICK) => {}
        }
    }
    bar.set_position(metrics.progress() - start);
    bar.finish_and_clear();
}

async fn log(metrics: Metrics, limit: Option<u64>, stop: CancellationToken) {
    let (start, began) = (metrics.progress(), Instant::now());
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(LOG_EVERY) => {}
        }
        let done = metrics.progress() - start;
        let secs = began.elapsed().as_secs_f64();
        let rate = done as f64 / secs.max(0.001);
        let total = total(&metrics, start, limit).map(|t| t - start);
        // Non-negative seconds for display.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let eta_secs =
            total.map(|t| (t.saturating_sub(done) as f64 / rate.max(0.001)).round() as u64);
        tracing::info!(
            done,
            total,
            rate_per_sec = format!("{rate:.1}"),
            eta_secs,
            "progress"
        );
    }
}
