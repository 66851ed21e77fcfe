//! What people and scripts read: summaries, `status`, `check`, `export`.

use std::io::Write;

use serde_json::json;

use crate::check::Checker;
use crate::classify::Status;
use crate::config::Settings;
use crate::db::{AvatarRecord, Database, StatusSummary};
use crate::pipeline::{self, ScanReport};

use super::{EXIT_OK, EXIT_SOME_FAILING};

pub(super) fn print_gc(r: &crate::gc::GcReport, opts: &crate::gc::GcOptions) {
    let hours = opts.grace.as_secs() / 3600;
    println!(
        "objects: {} listed: {} referenced, {} unreferenced but younger than {hours} h (kept), {} unreferenced and older",
        r.listed, r.referenced, r.too_young, r.unreferenced
    );
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    let n = if r.dry_run { r.unreferenced } else { r.deleted };
    println!(
        "unreferenced: {} ({} bytes); {verb} {n}",
        r.unreferenced, r.unreferenced_bytes
    );
    for key in r.keys.iter().take(20) {
        println!("  {key}");
    }
    if r.unreferenced > 20 {
        println!(
            "  … ({} more; --json lists up to 1000)",
            r.unreferenced - 20
        );
    }
    if r.failed > 0 {
        println!("{} deletes failed (logged); run gc again", r.failed);
    }
    if r.healed > 0 {
        println!(
            "{} avatars started using a deleted object meanwhile: due again, the next scan stores their picture",
            r.healed
        );
    }
    if r.foreign > 0 {
        println!("{} other objects under the prefix left alone", r.foreign);
    }
}

pub(super) fn rfc3339(t: i64) -> Option<String> {
    chrono::DateTime::from_timestamp(t, 0).map(|d| d.to_rfc3339())
}

/// `status --json`: times as RFC 3339 next to the unix seconds.
pub(super) fn status_json(s: &StatusSummary, now: i64) -> serde_json::Value {
    json!({
        "counts": s.counts,
        "reauth_required": s.reauth_required,
        "due_backlog": s.due_backlog,
        "oldest_due_at": s.oldest_due_at.and_then(rfc3339),
        "oldest_due_wait_secs": s.oldest_due_at.map(|t| now - t),
        "last_run": s.last_run.as_ref().map(|r| json!({
            "started_at": rfc3339(r.started_at),
            "finished_at": rfc3339(r.finished_at),
            "duration_secs": r.finished_at - r.started_at,
            "result": r.result,
            "processed": r.processed,
            "failing": r.failing,
            "flagged": r.flagged,
            "worker": r.worker,
            "error": r.error,
        })),
        "outbox": s.outbox.iter().map(|b| json!({
            "sink": b.sink,
            "pending": b.pending,
            "dead": b.dead,
            "oldest_pending_at": b.oldest_pending_at.and_then(rfc3339),
        })).collect::<Vec<_>>(),
    })
}

pub(super) fn print_status(s: &StatusSummary, now: i64) {
    println!("avatars by status:");
    for status in Status::ALL {
        let n = s.counts.get(status.as_str()).copied().unwrap_or(0);
        println!("  {:<10} {n:>10}", status.as_str());
    }
    println!("re-auth flagged  {:>10}", s.reauth_required);
    println!(
        "due now          {:>10}  (never checked, URL changed, or re-check time come)",
        s.due_backlog
    );
    match s.oldest_due_at {
        Some(t) => println!(
            "oldest due       {}  (waiting {})",
            rfc3339(t).unwrap_or_default(),
            human_duration(now - t)
        ),
        None => println!("oldest due       -"),
    }
    match &s.last_run {
        Some(r) => println!(
            "last run         {} on {}: {}, {} avatars in {}, {} failing, {} flagged ({} ago)",
            rfc3339(r.finished_at).unwrap_or_default(),
            r.worker,
            r.result,
            r.processed,
            human_duration(r.finished_at - r.started_at),
            r.failing,
            r.flagged,
            human_duration(now - r.finished_at),
        ),
        None => println!("last run         never"),
    }
    if let Some(error) = s.last_run.as_ref().and_then(|r| r.error.as_deref()) {
        println!("last run failed: {}", printable(error));
    }
    for b in &s.outbox {
        let oldest = b
            .oldest_pending_at
            .map(|t| format!(", oldest waiting {}", human_duration(now - t)))
            .unwrap_or_default();
        println!(
            "outbox {:<9} {:>10} pending, {} dead{oldest}",
            b.sink, b.pending, b.dead
        );
    }
}

pub(super) fn human_duration(secs: i64) -> String {
    let secs = secs.max(0);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{}h", secs / 86400, secs % 86400 / 3600),
    }
}

/// Remote text for a terminal: control characters (C0, DEL, C1 such as
/// U+009B CSI, hence ANSI escapes) are shown escaped, never sent raw.
pub(super) fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// One JSON object per avatar, streamed page by page.
pub(super) async fn export_jsonl(db: &Database, mut out: impl Write) -> anyhow::Result<u64> {
    let mut after: Option<String> = None;
    let mut count = 0;
    loop {
        let page = db.export_page(after.as_deref(), 1000).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.user_id.to_string());
        for r in &page {
            serde_json::to_writer(&mut out, &export_object(r))?;
            out.write_all(b"\n")?;
            count += 1;
        }
    }
    out.flush()?;
    Ok(count)
}

/// The `export` contract: `user_id, source_url, status, reason, mirror_url,
/// sha256, reauth_required, checked_at`, plus detail fields and the source's
/// validators (`source_etag`, `source_last_modified`, `source_length`).
pub(crate) fn export_object(r: &AvatarRecord) -> serde_json::Value {
    let time = |t: i64| chrono::DateTime::from_timestamp(t, 0).map(|d| d.to_rfc3339());
    json!({
        "user_id": r.user_id.to_string(),
        "source_url": r.source_url,
        "status": r.status.as_str(),
        "reason": r.reason,
        "reason_detail": r.reason_detail,
        "mirror_url": r.mirror_url,
        "sha256": r.sha256,
        "reauth_required": r.reauth_required,
        "checked_at": time(r.checked_at),
        "next_check_at": r.next_check_at.and_then(time),
        "format": r.format,
        "width": r.width,
        "height": r.height,
        "size_bytes": r.size_bytes,
        "attempts": r.attempts,
        "source_etag": r.validators.etag,
        "source_last_modified": r.validators.last_modified,
        "source_length": r.validators.length,
    })
}

pub(super) fn print_report(report: &ScanReport) {
    if report.dry_run {
        println!("DRY RUN: nothing was stored or written");
    }
    println!(
        "scanned {} avatars in {:.2}s{}",
        report.processed,
        report.duration_secs,
        if report.interrupted {
            " (interrupted by shutdown)"
        } else {
            ""
        }
    );
    for status in Status::ALL {
        let n = report.count(status);
        if n > 0 {
            println!("  {:<10} {:>8}", status.as_str(), n);
        }
    }
    if !report.changes.is_empty() {
        println!(
            "{}:",
            if report.dry_run {
                "would change"
            } else {
                "changes"
            }
        );
        for (change, n) in &report.changes {
            println!("  {change:<40} {n:>8}");
        }
    }
    if !report.by_reason.is_empty() {
        println!("by reason:");
        for (reason, n) in &report.by_reason {
            println!("  {reason:<40} {n:>8}");
        }
    }
    println!(
        "pictures: {} first mirrors, {} re-verified unchanged, {} changed at the same URL",
        report.first_mirrors, report.unchanged, report.changed
    );
    if !report.reverified.is_empty() {
        let by: Vec<String> = report
            .reverified
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        println!("re-verified by: {}", by.join(", "));
    }
    println!(
        "objects: {} uploaded ({} bytes), {} already stored; {} bytes downloaded",
        report.objects_uploaded,
        report.bytes_uploaded,
        report.objects_deduplicated,
        report.bytes_downloaded
    );
    if report.duration_secs > 0.0 && report.processed > 0 {
        println!(
            "rate: {:.1} avatars/s",
            report.processed as f64 / report.duration_secs
        );
    }
    if report.abandoned > 0 {
        println!(
            "{} avatars abandoned when the shutdown grace period ran out (not recorded; due again)",
            report.abandoned
        );
    }
    if report.rewritten > 0 {
        println!(
            "rewritten: {} users' write-back columns or mirror URLs, for the current settings (nothing fetched)",
            report.rewritten
        );
    }
    if report.lease_lost > 0 {
        println!(
            "{} results not written: their lease had passed to another worker",
            report.lease_lost
        );
    }
    for h in &report.hosts {
        println!(
            "host {} pushed back {} times (429/503/timeouts): ended at {} requests at once{}",
            h.host,
            h.push_backs,
            h.concurrency,
            if h.interval_ms > 0 {
                format!(", one every {} ms", h.interval_ms)
            } else {
                String::new()
            }
        );
    }
    if report.unrecorded > 0 {
        println!(
            "{} results refused by the database even as record_error: not written, due again (see the log for their users)",
            report.unrecorded
        );
    }
    let d = report.deliveries;
    if d.delivered + d.retried + d.dead + d.released > 0 {
        println!(
            "sinks: {} delivered, {} failed and will be retried, {} given up (see `status`){}",
            d.delivered,
            d.retried,
            d.dead,
            if d.released > 0 {
                format!(
                    "; {} given back unattempted when time ran out (they wait in the outbox)",
                    d.released
                )
            } else {
                String::new()
            }
        );
    }
}

pub(super) async fn check(settings: &Settings, url: &str, json: bool) -> anyhow::Result<u8> {
    let checker = Checker::new(settings)?;
    let exam = checker
        .examine(url, pipeline::unix_now(), &checker.host_limiter())
        .await;
    let v = &exam.verdict;
    let image = exam.image.as_ref().map(|(info, body)| {
        json!({
            "format": info.format.name(),
            "width": info.width,
            "height": info.height,
            "bytes": body.bytes.len(),
            "sha256": body.sha256,
        })
    });
    if json {
        let out = json!({
            "url": url,
            "status": v.status.as_str(),
            "reason": v.code.as_str(),
            "detail": v.detail,
            "decided_by": exam.decided_by,
            "provider": exam.provider,
            "requests": exam.requests,
            "http_status": exam.http_status.map(|s| s.as_u16()),
            "fetched_url": exam.fetched_url.as_ref().map(reqwest::Url::as_str),
            "signature_expires_at": exam.expires_at.and_then(|t| chrono::DateTime::from_timestamp(t, 0)).map(|d| d.to_rfc3339()),
            "headers": exam.headers.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "image": image,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("url:        {}", printable(url));
        println!("verdict:    {}", v.status);
        println!("reason:     {}", v.code);
        if let Some(d) = &v.detail {
            println!("detail:     {}", printable(d));
        }
        println!("decided by: {}", exam.decided_by);
        if let Some(p) = &exam.provider {
            println!("provider:   {p}");
        }
        if let Some(s) = exam.http_status {
            println!("http:       {s} ({} request(s))", exam.requests);
        }
        if let Some(u) = exam.fetched_url.as_ref().filter(|u| u.as_str() != url) {
            println!("fetched:    {u}");
        }
        for (name, value) in &exam.headers {
            println!("header:     {name}: {}", printable(value));
        }
        if let Some((info, body)) = &exam.image {
            println!(
                "image:      {} {}x{}, {} bytes, sha256 {}",
                info.format.name(),
                info.width,
                info.height,
                body.bytes.len(),
                body.sha256
            );
        }
    }
    Ok(if v.status == Status::Failing {
        EXIT_SOME_FAILING
    } else {
        EXIT_OK
    })
}
