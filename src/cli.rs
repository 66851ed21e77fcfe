//! The binary's glue: argument parsing, wiring, output and exit codes.
//! `anyhow` lives here and only here.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::check::Checker;
use crate::classify::Status;
use crate::config::{FsSettings, LogFormat, Settings, StorageSettings};
use crate::db::StatusSummary;
use crate::db::{AvatarRecord, Database, Selection, Shard};
use crate::metrics::Metrics;
use crate::pipeline::{self, Deps, Policy, ScanOptions, ScanReport};
use crate::storage::ImageWriter;
use crate::{demo, progress, schedule, serve};

/// Exit codes of the contract.
pub const EXIT_OK: u8 = 0;
pub const EXIT_ERROR: u8 = 1;
pub const EXIT_SOME_FAILING: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "avatar-warden",
    version,
    about = "Keeps third-party avatars alive: mirrors valid pictures, flags users whose avatar is gone.",
    long_about = "Scans a profile table for third-party avatar URLs (WeChat, QQ, Douyin, Weibo...), \
detects expired ones (including WeChat's HTTP 200 placeholder marked by X-ErrNo / X-Info: notexist), \
mirrors valid images to S3-compatible storage under their sha256, flags users for re-authorization \
and writes every outcome back to the profile database.\n\n\
Configuration: the built-in defaults, then --config FILE (or config/$AVATAR_WARDEN_ENV.toml), \
then environment variables AVATAR_WARDEN__<SECTION>__<KEY>.\n\n\
Exit codes: 0 all done; 2 done but some avatars are failing; 1 configuration or runtime error."
)]
pub struct Cli {
    /// Configuration file layered over the built-in defaults.
    #[arg(long, global = true, env = "AVATAR_WARDEN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the worker's own tables in the profile database.
    Migrate,
    /// Check every due avatar once and exit (a cron job or a backfill).
    Scan {
        /// Print the summary as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only ids of shard I of N (e.g. `--shard 0/4`), for indexed Jobs.
        #[arg(long, value_name = "I/N")]
        shard: Option<Shard>,
        /// Fetch and classify, but store and write nothing; report what would change.
        #[arg(long)]
        dry_run: bool,
        /// Stop after this many avatars.
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
        /// Only this user id (repeatable).
        #[arg(long = "user", value_name = "ID")]
        users: Vec<String>,
        /// Only avatars of this provider rule (wechat, qq, douyin, ...).
        #[arg(long, value_name = "NAME")]
        provider: Option<String>,
        /// Check now even if the next check is not due yet.
        #[arg(long)]
        force: bool,
        /// Download every mirrored picture again instead of re-verifying it
        /// with headers only (ETag / Last-Modified / HEAD).
        #[arg(long)]
        redownload: bool,
        /// Also write the summary to this file: JSON (.json) or Markdown (.md).
        #[arg(long, value_name = "PATH")]
        report: Option<PathBuf>,
        /// Write the scan's metrics for node_exporter's textfile collector (atomically).
        #[arg(long, value_name = "PATH")]
        metrics_file: Option<PathBuf>,
        /// Push the scan's metrics to this Prometheus Pushgateway when it completes.
        #[arg(long, value_name = "URL", env = "AVATAR_WARDEN_PUSHGATEWAY")]
        pushgateway: Option<String>,
        /// No progress bar (or, off a terminal, no periodic progress lines).
        #[arg(long)]
        no_progress: bool,
        /// Exit code when the scan finished but some avatars are failing
        /// (0 for a Kubernetes Job, where the next run retries them).
        #[arg(long, value_name = "CODE", default_value_t = EXIT_SOME_FAILING)]
        failing_exit_code: u8,
        /// Only avatars whose recorded status is this (repeatable; pending = never checked).
        #[arg(long = "only", value_name = "STATUS", value_parser = parse_status_arg)]
        only: Vec<Status>,
    },
    /// Scan on the cron schedule and serve /metrics until SIGTERM or Ctrl-C.
    Run,
    /// Fetch, classify and validate one URL and print why; writes nothing.
    Check {
        url: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write every avatar's recorded state, one JSON object per line.
    Export {
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Print the effective configuration (all layers applied), secrets redacted.
    Config,
    /// Delete stored objects no avatar points at any more (old pictures
    /// replaced by a changed one), once older than `gc.grace_hours`.
    Gc {
        /// List what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Override `gc.grace_hours`.
        #[arg(long, value_name = "HOURS")]
        grace_hours: Option<u64>,
        /// Print the result as JSON (with up to 1000 keys).
        #[arg(long)]
        json: bool,
    },
    /// Check that every object a row points at is in the store; report the
    /// rows whose object is missing (exit 2), and with `--repair` make them
    /// due so the next scan downloads and stores their picture again.
    VerifyStore {
        /// Make the avatars of missing objects due at once.
        #[arg(long)]
        repair: bool,
        /// Print the result as JSON (with up to 1000 missing keys).
        #[arg(long)]
        json: bool,
    },
    /// Show how many avatars are in each status.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Run the whole job on sample users against a simulated origin on 127.0.0.1.
    Demo {
        /// Where the demo's database and mirrors go (default: a folder in the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the simulated origin running afterwards, so `check` can be tried on its URLs.
        #[arg(long)]
        serve: bool,
    },
    /// Serve the simulated origin alone until stopped (the benchmark runs it
    /// in its own process). Prints its base URL on the first line.
    #[command(hide = true)]
    Origin {
        #[arg(long, default_value = "127.0.0.1:0")]
        bind: std::net::SocketAddr,
        /// Added before every answer.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Approximate size of the `/bench/` JPEGs.
        #[arg(long, default_value_t = 20_000)]
        image_bytes: usize,
        /// Answer 429 when more than this many `/bench/` requests are in flight.
        #[arg(long)]
        limit: Option<u64>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    Jsonl,
}

/// Parses arguments, runs the command, and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", cause_chain(&e));
            ExitCode::from(EXIT_ERROR)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    if let Command::Origin {
        bind,
        latency_ms,
        image_bytes,
        limit,
    } = cli.command
    {
        let origin = demo::Origin::spawn(demo::OriginOptions {
            latency: std::time::Duration::from_millis(latency_ms),
            bind,
            bench_image_bytes: image_bytes,
            bench_limit: limit,
            ..demo::OriginOptions::default()
        })
        .await?;
        println!("http://{}", origin.addr());
        std::io::stdout().flush()?;
        schedule::shutdown_on_signals().cancelled().await;
        return Ok(EXIT_OK);
    }
    if let Command::Config = cli.command {
        let file = Settings::file_layer(cli.config.as_deref());
        let env: Vec<(String, String)> = std::env::vars().collect();
        print!("{}", Settings::redacted_toml(file.as_deref(), env)?);
        return Ok(EXIT_OK);
    }
    let settings = Settings::load(cli.config.as_deref()).context("loading configuration")?;
    let quiet = !matches!(cli.command, Command::Run | Command::Scan { .. });
    init_logging(settings.log.format, if quiet { "warn" } else { "info" });
    match cli.command {
        Command::Migrate => {
            let db = settings.profile.connect().await?;
            let applied = db.migrate().await?;
            if applied.is_empty() {
                println!("migrations: already up to date");
            } else {
                println!("migrations: applied {applied:?}");
            }
            Ok(EXIT_OK)
        }
        Command::Scan {
            json,
            shard,
            dry_run,
            limit,
            users,
            provider,
            force,
            redownload,
            only,
            report: report_path,
            metrics_file,
            pushgateway,
            no_progress,
            failing_exit_code,
        } => {
            let deps = build_deps(&settings).await?;
            if let Some(name) = &provider
                && !deps.checker.providers().names().any(|n| n == name)
            {
                let known: Vec<&str> = deps.checker.providers().names().collect();
                bail!(
                    "unknown provider {name:?}; the rules know: {}",
                    known.join(", ")
                );
            }
            let shutdown = schedule::shutdown_on_signals();
            let mut opts = scan_options(&settings, shutdown.clone());
            opts.shard = shard;
            opts.limit = limit;
            opts.provider = provider;
            opts.redownload = redownload;
            opts.selection = Selection {
                force,
                only,
                users,
                dry_run,
            };
            let progress = progress::Progress::start(
                progress::Mode::detect(no_progress || json),
                deps.metrics.clone(),
                limit,
            );
            let deliverer = crate::app::deliverer(&deps, &settings.outbox)
                .filter(|_| !dry_run)
                .map(|d| d.stop_with(&shutdown, opts.grace));
            let report = crate::app::scan_with_deliveries(&deps, &opts, deliverer).await;
            progress.finish().await;
            let report = report?;
            if let Some(path) = &report_path {
                crate::report::write_report(path, &report)?;
            }
            if let Some(path) = &metrics_file {
                let text = deps.metrics.encode_prometheus();
                crate::report::write_atomically(path, text.as_bytes())?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_report(&report);
            }
            if let Some(base) = &pushgateway {
                push_metrics(&settings, &deps, &report, base, shard).await?;
            }
            Ok(if report.count(Status::Failing) > 0 {
                failing_exit_code
            } else {
                EXIT_OK
            })
        }
        Command::Run => {
            let cron = schedule::parse_cron(&settings.schedule.cron)?;
            let deps = build_deps(&settings).await?;
            let shutdown = schedule::shutdown_on_signals();
            let addr = serve::spawn(&settings.metrics.listen, deps.clone(), shutdown.clone())
                .await
                .with_context(|| format!("binding metrics.listen {}", settings.metrics.listen))?;
            tracing::info!(%addr, cron = %settings.schedule.cron, "serving /metrics, /healthz and /readyz");
            // Deliveries run for the life of the process, between scans too.
            let grace = std::time::Duration::from_secs(settings.shutdown.grace_secs);
            let delivering = crate::app::deliverer(&deps, &settings.outbox).map(|d| {
                let stop = shutdown.clone();
                let d = d.stop_with(&shutdown, grace);
                tokio::spawn(async move { d.run(stop).await })
            });
            schedule::run_until_stopped(deps, scan_options(&settings, shutdown), cron).await;
            if let Some(h) = delivering {
                let _ = h.await;
            }
            tracing::info!("stopped");
            Ok(EXIT_OK)
        }
        Command::Check { url, json } => check(&settings, &url, json).await,
        Command::Export {
            format: ExportFormat::Jsonl,
            output,
        } => {
            let db = settings.profile.connect().await?;
            let count = match output {
                Some(path) => {
                    let file = std::fs::File::create(&path)
                        .with_context(|| format!("creating {}", path.display()))?;
                    export_jsonl(&db, std::io::BufWriter::new(file)).await?
                }
                None => export_jsonl(&db, std::io::stdout().lock()).await?,
            };
            tracing::info!(count, "exported");
            Ok(EXIT_OK)
        }
        Command::Status { json } => {
            let db = settings.profile.connect().await?;
            db.migrate()
                .await
                .context("migrating the worker's tables")?;
            let now = pipeline::unix_now();
            let summary = db.status(now).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status_json(&summary, now))?
                );
            } else {
                print_status(&summary, now);
            }
            Ok(EXIT_OK)
        }
        Command::VerifyStore { repair, json } => {
            let db = settings.profile.connect().await?;
            db.migrate()
                .await
                .context("migrating the worker's tables")?;
            let store = settings.storage.open().await?;
            let report = crate::gc::verify_store(&db, store.as_ref(), repair).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{} rows point at {} objects: {} missing ({} rows){}",
                    report.rows,
                    report.objects,
                    report.missing,
                    report.missing_rows,
                    if repair {
                        format!(
                            "; {} avatars made due to store their picture again",
                            report.repaired
                        )
                    } else if report.missing > 0 {
                        "; `verify-store --repair` makes them due again".to_string()
                    } else {
                        String::new()
                    }
                );
                for key in &report.keys {
                    println!("missing: {key}");
                }
                if report.failed > 0 {
                    println!(
                        "{} objects could not be checked (see the log)",
                        report.failed
                    );
                }
            }
            Ok(if report.failed > 0 {
                EXIT_ERROR
            } else if report.missing > 0 && !repair {
                EXIT_SOME_FAILING
            } else {
                EXIT_OK
            })
        }
        Command::Gc {
            dry_run,
            grace_hours,
            json,
        } => {
            let db = settings.profile.connect().await?;
            db.migrate()
                .await
                .context("migrating the worker's tables")?;
            let store = settings.storage.open().await?;
            let opts = crate::gc::GcOptions {
                grace: std::time::Duration::from_secs(
                    grace_hours.unwrap_or(settings.gc.grace_hours) * 3600,
                ),
                dry_run,
            };
            let report =
                crate::gc::collect_garbage(&db, store.as_ref(), &opts, pipeline::unix_now())
                    .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_gc(&report, &opts);
            }
            Ok(if report.failed > 0 {
                EXIT_ERROR
            } else {
                EXIT_OK
            })
        }
        Command::Demo { dir, serve } => run_demo(settings, dir, serve).await,
        Command::Config | Command::Origin { .. } => {
            unreachable!("handled before logging starts")
        }
    }
}

fn print_gc(r: &crate::gc::GcReport, opts: &crate::gc::GcOptions) {
    let hours = opts.grace.as_secs() / 3600;
    println!(
        "objects: {} listed, {} referenced, {} younger than {hours} h (kept)",
        r.listed, r.referenced, r.too_young
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

/// Pushes a completed scan's metrics. An interrupted scan pushes nothing: its
/// `scan_last_success_timestamp_seconds` would be 0 and hide the last good run.
async fn push_metrics(
    settings: &Settings,
    deps: &Deps,
    report: &ScanReport,
    base: &str,
    shard: Option<Shard>,
) -> anyhow::Result<()> {
    if report.interrupted {
        tracing::warn!("scan interrupted: not pushing, the gateway keeps the last completed run");
        return Ok(());
    }
    let m = &settings.metrics;
    let grouping = crate::push::Grouping::new(
        &m.push_job,
        &m.push_instance,
        shard.map(|s| (s.index, s.count)),
    );
    let url = crate::push::push(
        base,
        &grouping,
        deps.metrics.encode_prometheus(),
        std::time::Duration::from_secs(m.push_timeout_secs),
    )
    .await?;
    tracing::info!(%url, "metrics pushed");
    Ok(())
}

fn rfc3339(t: i64) -> Option<String> {
    chrono::DateTime::from_timestamp(t, 0).map(|d| d.to_rfc3339())
}

/// `status --json`: times as RFC 3339 next to the unix seconds.
fn status_json(s: &StatusSummary, now: i64) -> serde_json::Value {
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

fn print_status(s: &StatusSummary, now: i64) {
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

fn human_duration(secs: i64) -> String {
    let secs = secs.max(0);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{}h", secs / 86400, secs % 86400 / 3600),
    }
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

pub fn scan_options(settings: &Settings, shutdown: CancellationToken) -> ScanOptions {
    ScanOptions {
        batch_size: settings.scan.batch_size,
        concurrency: settings.fetch.concurrency,
        lease_secs: settings.scan.lease_secs,
        flush: settings.scan.flush(),
        shard: None,
        selection: Selection::default(),
        limit: None,
        provider: None,
        shutdown,
        grace: std::time::Duration::from_secs(settings.shutdown.grace_secs),
        redownload: false,
    }
}

/// Wires the pipeline from settings; reads as a sentence on purpose.
pub async fn build_deps(settings: &Settings) -> anyhow::Result<Deps> {
    if settings.fetch.allow_private_networks {
        tracing::warn!(
            "fetch.allow_private_networks = true: avatar URLs may reach loopback, private and link-local addresses"
        );
    }
    let db = settings.profile.connect().await?;
    db.migrate()
        .await
        .context("migrating the worker's tables")?;
    db.check_profile().await?;
    let checker = Checker::new(settings)?;
    let store = settings
        .storage
        .open()
        .await
        .context("opening the object store")?;
    let metrics = Metrics::new();
    Ok(Deps {
        db: Arc::new(db),
        checker,
        images: ImageWriter::new(store).observed(metrics.storage_observer()),
        policy: Policy::from_settings(settings),
        metrics,
        sinks: crate::sinks::Sinks::from_settings(settings).context("configuring the sinks")?,
    })
}

async fn check(settings: &Settings, url: &str, json: bool) -> anyhow::Result<u8> {
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
            "fetched_url": exam.fetched_url.as_ref().map(|u| u.as_str()),
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

/// An error and its causes, each said once: our error types often quote
/// their source in their own message, so a cause already said is skipped.
fn cause_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Remote text for a terminal: control characters (C0, DEL, C1 such as
/// U+009B CSI, hence ANSI escapes) are shown escaped, never sent raw.
fn printable(text: &str) -> std::borrow::Cow<'_, str> {
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
async fn export_jsonl(db: &Database, mut out: impl Write) -> anyhow::Result<u64> {
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
pub fn export_object(r: &AvatarRecord) -> serde_json::Value {
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

fn parse_status_arg(s: &str) -> Result<Status, String> {
    s.parse()
}

fn print_report(report: &ScanReport) {
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

/// A folder of our own in the temp dir by default; a folder we did not create is never wiped.
fn prepare_demo_dir(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    const MARKER: &str = ".avatar-warden-demo";
    let dir = dir.unwrap_or_else(|| std::env::temp_dir().join("avatar-warden-demo"));
    if dir.exists() {
        let empty = std::fs::read_dir(&dir)?.next().is_none();
        if !empty && !dir.join(MARKER).exists() {
            bail!(
                "{} exists and was not made by the demo; pass another --dir",
                dir.display()
            );
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        dir.join(MARKER),
        "made by avatar-warden demo; safe to delete\n",
    )?;
    Ok(std::fs::canonicalize(&dir)?)
}

async fn run_demo(mut settings: Settings, dir: Option<PathBuf>, serve: bool) -> anyhow::Result<u8> {
    let dir = prepare_demo_dir(dir)?;
    let origin = demo::Origin::spawn(demo::OriginOptions::default())
        .await
        .context("starting the simulated origin")?;
    let db_path = dir.join("profiles.db");
    let db_url = format!("sqlite://{}?mode=rwc", db_path.display());
    demo::seed_profiles(&db_url, &origin)
        .await
        .context("creating sample users")?;

    settings.profile.url = db_url.clone().into();
    settings.profile.table = "users".into();
    settings.profile.id_column = "id".into();
    settings.profile.avatar_column = "avatar_url".into();
    settings.profile.mirror_url_column = Some("avatar_mirror_url".into());
    settings.profile.reauth_column = Some("avatar_reauth_required".into());
    let mirror_root = dir.join("mirror");
    settings.storage = StorageSettings::Fs(FsSettings {
        root: mirror_root.clone(),
        public_base_url: None,
    });
    // The simulated origin lives on 127.0.0.1, which the guard refuses by default.
    settings.fetch.allow_private_networks = true;
    settings.fetch.allowed_ports.clear(); // and on an OS-chosen port

    println!("avatar-warden demo");
    println!("  simulated origin: http://{}", origin.addr());
    println!("  profile database: {}", db_path.display());
    println!("  mirror directory: {}", mirror_root.display());
    println!();

    let deps = build_deps(&settings).await?;
    let report =
        pipeline::scan_once(&deps, &scan_options(&settings, CancellationToken::new())).await?;
    print_report(&report);
    println!();
    print_demo_users(&deps.db, &db_url).await?;
    print_mirror_files(&mirror_root)?;
    demo_week_later(&deps, &settings, &db_url).await?;

    let expired_url = origin.url("/wechat/expired/gao");
    if serve {
        println!();
        println!("The simulated origin keeps running; in another terminal try:");
        println!(
            "  AVATAR_WARDEN__FETCH__ALLOW_PRIVATE_NETWORKS=true AVATAR_WARDEN__FETCH__ALLOWED_PORTS='[]' cargo run --release -- check {expired_url}"
        );
        println!("Ctrl-C to stop.");
        let _ = tokio::signal::ctrl_c().await;
    } else {
        println!();
        println!(
            "Run `cargo run --release -- demo --serve` to keep the origin up and try `check` on its URLs."
        );
    }
    Ok(EXIT_OK)
}

/// The demo's second pass: the mirrored avatars come due again and are
/// re-verified with headers only (the origin sends ETags and answers 304).
async fn demo_week_later(deps: &Deps, settings: &Settings, db_url: &str) -> anyhow::Result<()> {
    let pool = sqlx::SqlitePool::connect(db_url).await?;
    sqlx::query(
        "UPDATE avatar_warden_avatars SET next_check_at = 0 WHERE next_check_at IS NOT NULL",
    )
    .execute(&pool)
    .await?;
    pool.close().await;
    let report =
        pipeline::scan_once(deps, &scan_options(settings, CancellationToken::new())).await?;
    println!();
    println!(
        "A week later, {} avatars were due again: {} re-verified unchanged, {} changed, {} mirrored for the first time; {} bytes downloaded.",
        report.processed,
        report.unchanged,
        report.changed,
        report.first_mirrors,
        report.bytes_downloaded
    );
    Ok(())
}

async fn print_demo_users(db: &Database, db_url: &str) -> anyhow::Result<()> {
    let mut rows: Vec<AvatarRecord> = db.export_page(None, 1000).await?;
    rows.sort_by_key(|r| r.user_id.to_string().parse::<i64>().unwrap_or(i64::MAX));
    // Read the write-back columns from the profile table itself, as the app would.
    let pool = sqlx::SqlitePool::connect(db_url).await?;
    let profile: Vec<(i64, String, Option<String>, bool)> = sqlx::query_as(
        "SELECT id, nickname, avatar_mirror_url, avatar_reauth_required FROM users ORDER BY id",
    )
    .fetch_all(&pool)
    .await?;
    pool.close().await;
    println!(
        "{:<4} {:<8} {:<9} {:<20} {:<8} mirror (users.avatar_mirror_url)",
        "id", "user", "status", "reason", "re-auth"
    );
    for (id, nickname, mirror, reauth) in profile {
        let state = rows
            .iter()
            .find(|r| r.user_id.to_string() == id.to_string());
        let (status, reason) = match state {
            Some(r) => (r.status.to_string(), r.reason.to_string()),
            None => ("-".into(), "no avatar: skipped".into()),
        };
        let mirror = mirror
            .map(|m| short_mirror(&m))
            .unwrap_or_else(|| "-".into());
        println!(
            "{id:<4} {nickname:<8} {status:<9} {reason:<20} {:<8} {mirror}",
            if reauth { "FLAGGED" } else { "" }
        );
    }
    Ok(())
}

fn short_mirror(url: &str) -> String {
    match url.find("avatars/") {
        Some(i) => format!("mirror/{}", &url[i..]),
        None => url.to_string(),
    }
}

fn print_mirror_files(root: &Path) -> anyhow::Result<()> {
    let mut files = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            } else {
                files.push((entry.path(), entry.metadata()?.len()));
            }
        }
    }
    files.sort();
    println!();
    println!("{} mirrored objects under {}:", files.len(), root.display());
    for (path, len) in files {
        println!(
            "  {} ({len} bytes)",
            path.strip_prefix(root).unwrap_or(&path).display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_said_once() {
        // DbError quotes its source and also names it as `source()`.
        let e = anyhow::Error::new(crate::db::DbError::Query(sqlx::Error::RowNotFound))
            .context("reading the last run");
        let said = cause_chain(&e);
        assert_eq!(
            said,
            "reading the last run: database error: no rows returned by a query that expected to return at least one row"
        );
        assert_eq!(said.matches("no rows returned").count(), 1, "{said}");
    }
}
