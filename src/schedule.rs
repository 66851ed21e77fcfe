//! The `run` loop: a cron schedule around `scan_once`, never two scans at
//! once, missed ticks skipped, and a clean stop on shutdown.

use std::str::FromStr;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::pipeline::{Deps, ScanOptions, scan_once};

#[derive(Debug, thiserror::Error)]
pub(crate) enum ScheduleError {
    #[error("schedule.cron {expr:?}: {message}")]
    Invalid { expr: String, message: String },
}

/// Parses a standard 5-field crontab expression (as Kubernetes CronJobs use:
/// minute hour day-of-month month day-of-week, 0 or 7 = Sunday) or the cron
/// crate's 6/7-field form with seconds first.
pub(crate) fn parse_cron(expr: &str) -> Result<cron::Schedule, ScheduleError> {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let normalized = match fields.len() {
        5 => {
            let dow = crontab_dow(fields[4]).map_err(|message| ScheduleError::Invalid {
                expr: expr.to_string(),
                message,
            })?;
            format!(
                "0 {} {} {} {} {}",
                fields[0], fields[1], fields[2], fields[3], dow
            )
        }
        6 | 7 => fields.join(" "),
        n => {
            return Err(ScheduleError::Invalid {
                expr: expr.to_string(),
                message: format!("expected 5 fields (crontab) or 6 with seconds first, got {n}"),
            });
        }
    };
    cron::Schedule::from_str(&normalized).map_err(|e| ScheduleError::Invalid {
        expr: expr.to_string(),
        message: e.to_string(),
    })
}

/// crontab numbers days 0-7 with Sunday as 0 and 7; the cron crate numbers
/// them 1-7 with Sunday as 1. Names (MON, sun...) mean the same in both.
fn crontab_dow(field: &str) -> Result<String, String> {
    let map = |s: &str| -> Result<String, String> {
        match s.parse::<u32>() {
            Ok(n) if n <= 7 => Ok(((n % 7) + 1).to_string()),
            Ok(n) => Err(format!("day of week {n} is out of range 0-7")),
            Err(_) => Ok(s.to_string()),
        }
    };
    let mut parts = Vec::new();
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (item, None),
        };
        let mapped = match range.split_once('-') {
            // "5-7" (Fri..Sun) would become "6-1": split off Sunday.
            Some((a, "7")) if a != "7" && step.is_none() => format!("{}-7,1", map(a)?),
            Some((a, b)) => format!("{}-{}", map(a)?, map(b)?),
            None => map(range)?,
        };
        parts.push(match step {
            Some(s) => format!("{mapped}/{s}"),
            None => mapped,
        });
    }
    Ok(parts.join(","))
}

/// Runs a scan on every tick until `shutdown` is cancelled. A failed scan is
/// logged and the loop goes on: the next tick may find the database back.
pub(crate) async fn run_until_stopped(deps: Deps, opts: ScanOptions, schedule: cron::Schedule) {
    let shutdown = opts.shutdown.clone();
    loop {
        // Computed after each scan: ticks missed while scanning are skipped, not queued.
        let Some(next) = schedule.upcoming(Utc).next() else {
            tracing::warn!("the schedule has no future fire time; stopping");
            return;
        };
        tracing::info!(next_run = %next.to_rfc3339(), "waiting for the next scheduled scan");
        let wait = (next - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let span = tracing::info_span!("scan", scheduled_for = %next.to_rfc3339());
        let _enter = span.enter();
        match scan_once(&deps, &opts).await {
            Ok(report) => tracing::info!(
                processed = report.processed,
                mirrored = report.count(crate::classify::Status::Mirrored),
                expired = report.count(crate::classify::Status::Expired),
                failing = report.count(crate::classify::Status::Failing),
                duration_secs = report.duration_secs,
                "scan finished"
            ),
            Err(e) => tracing::error!(error = %e, retryable = e.is_retryable(), "scan failed"),
        }
        if shutdown.is_cancelled() {
            return;
        }
    }
}

/// Exit code after a second SIGTERM (128 + 15, the shell's convention).
pub(crate) const EXIT_SECOND_SIGTERM: i32 = 143;
/// Exit code after a second Ctrl-C / SIGINT (128 + 2).
pub(crate) const EXIT_SECOND_SIGINT: i32 = 130;

/// Cancels the token on SIGTERM or Ctrl-C; a second signal exits at once,
/// with 143 (SIGTERM) or 130 (SIGINT): leases of avatars in flight then
/// expire after `scan.lease_secs`, deliveries in flight after `outbox.lease_secs`.
pub(crate) fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!(
            "shutdown requested: finishing avatars in flight (signal again to exit now)"
        );
        t.cancel();
        let second = wait_for_signal().await;
        tracing::warn!(
            "second signal: exiting now; leases of avatars in flight expire after scan.lease_secs"
        );
        std::process::exit(second);
    });
    token
}

/// Waits for SIGTERM or Ctrl-C; returns the exit code a second one means.
async fn wait_for_signal() -> i32 {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            let _ = tokio::signal::ctrl_c().await;
            return EXIT_SECOND_SIGINT;
        };
        tokio::select! {
            _ = term.recv() => EXIT_SECOND_SIGTERM,
            _ = tokio::signal::ctrl_c() => EXIT_SECOND_SIGINT,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        EXIT_SECOND_SIGINT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, TimeZone, Timelike, Weekday};

    fn next_after(expr: &str, after: chrono::DateTime<Utc>) -> chrono::DateTime<Utc> {
        parse_cron(expr).unwrap().after(&after).next().unwrap()
    }

    #[test]
    fn five_field_crontab_fires_on_the_minute() {
        let t0 = Utc.with_ymd_and_hms(2026, 11, 22, 10, 5, 30).unwrap();
        let n = next_after("17 * * * *", t0);
        assert_eq!((n.hour(), n.minute(), n.second()), (10, 17, 0));
        let n = next_after("*/15 * * * *", t0);
        assert_eq!((n.hour(), n.minute()), (10, 15));
    }

    #[test]
    fn six_field_form_with_seconds_is_accepted() {
        let t0 = Utc.with_ymd_and_hms(2026, 11, 22, 10, 5, 30).unwrap();
        let n = next_after("*/10 * * * * *", t0);
        assert_eq!((n.minute(), n.second()), (5, 40));
    }

    #[test]
    fn crontab_sunday_is_zero_or_seven_and_weekdays_keep_their_meaning() {
        // 2026-11-22 is a Sunday.
        let t0 = Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap();
        assert_eq!(next_after("0 3 * * 1", t0).weekday(), Weekday::Mon);
        assert_eq!(next_after("0 3 * * 0", t0).weekday(), Weekday::Sun);
        assert_eq!(next_after("0 3 * * 7", t0).weekday(), Weekday::Sun);
        assert_eq!(next_after("0 3 * * 1-5", t0).weekday(), Weekday::Mon);
        assert_eq!(next_after("0 11 * * 5-7", t0).weekday(), Weekday::Sun);
        assert_eq!(next_after("0 3 * * 6", t0).weekday(), Weekday::Sat);
        assert_eq!(next_after("0 3 * * MON", t0).weekday(), Weekday::Mon);
    }

    #[test]
    fn bad_expressions_name_the_problem() {
        let err = parse_cron("* * *").unwrap_err().to_string();
        assert!(err.contains("expected 5 fields"), "{err}");
        assert!(parse_cron("99 * * * *").is_err());
        assert!(
            parse_cron("0 0 * * 9")
                .unwrap_err()
                .to_string()
                .contains("out of range")
        );
    }
}
