//! The binary's glue: argument parsing, wiring, output and exit codes.
//! `anyhow` lives here and only here.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;

use crate::app::App;
use crate::classify::Status;
use crate::config::{LogFormat, Settings};
use crate::db::{Selection, Shard};
use crate::pipeline::{self, Deps, ScanOptions, ScanReport};
use crate::{demo, progress, schedule, serve};

mod args;
mod demo_run;
mod output;

pub(crate) use args::{Cli, Command, ExportFormat};
use demo_run::run_demo;
use output::{check, export_jsonl, print_gc, print_report, print_status, status_json};

/// Exit codes of the contract.
pub(crate) const EXIT_OK: u8 = 0;

pub(crate) const EXIT_ERROR: u8 = 1;

pub(crate) const EXIT_SOME_FAILING: u8 = 2;

/// A usage error (unknown flag, bad value): EX_USAGE of sysexits, never 2,
/// which means "done, some avatars failing".
pub(crate) const EXIT_USAGE: u8 = 64;

/// Parses arguments, runs the command, and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // `--help` and `--version` print to stdout and succeed.
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
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
            let said = cause_chain(&e);
            // With JSON logs a log shipper parses every stderr line, this one too.
            if LOG_FORMAT.get() == Some(&LogFormat::Json) {
                tracing::error!(error = %said, "fatal");
            } else {
                eprintln!("error: {said}");
            }
            ExitCode::from(EXIT_ERROR)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    if let Command::Origin {
        bind,
        latency_ms,
        image_bytes,
        realistic_images,
        limit,
    } = cli.command
    {
        let origin = demo::Origin::spawn(demo::OriginOptions {
            latency: std::time::Duration::from_millis(latency_ms),
            bind,
            bench_image_bytes: image_bytes,
            bench_realistic: realistic_images,
            bench_limit: limit,
            ..demo::OriginOptions::default()
        })
        .await?;
        println!("http://{}", origin.addr());
        std::io::stdout().flush()?;
        schedule::shutdown_on_signals().cancelled().await;
        return Ok(EXIT_OK);
    }
    if let Command::Completions { shell } = cli.command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "avatar-warden", &mut std::io::stdout());
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
            progress_every,
            failing_exit_code,
        } => {
            let deps = App::build(&settings).await?.into_deps();
            if let Some(name) = &provider
                && !deps.checker.providers().names().any(|n| n == name)
            {
                let known: Vec<&str> = deps.checker.providers().names().collect();
                bail!(
                    "unknown provider {name:?}; the rules know: {}",
                    known.join(", ")
                );
            }
            let missing = deps.db.missing_users(&users).await?;
            if !missing.is_empty() {
                bail!(
                    "no user with id {} in profile.table {:?}{}",
                    missing.join(", "),
                    settings.profile.table,
                    if settings.profile.filter.is_some() {
                        " (as narrowed by profile.filter)"
                    } else {
                        ""
                    }
                );
            }
            let shutdown = schedule::shutdown_on_signals();
            let mut opts = ScanOptions::from_settings(&settings, shutdown.clone());
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
                &deps.metrics,
                limit,
                std::time::Duration::from_secs(progress_every),
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
            let deps = App::build(&settings).await?.into_deps();
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
            schedule::run_until_stopped(
                deps,
                ScanOptions::from_settings(&settings, shutdown),
                cron,
            )
            .await;
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
            db.require_migrated().await?;
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
            db.require_migrated().await?;
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
            let db = connect_for(&settings, repair).await?;
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
            let db = connect_for(&settings, !dry_run).await?;
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
        Command::Healthcheck { ready, timeout } => {
            let path = if ready { "/readyz" } else { "/healthz" };
            let timeout = std::time::Duration::from_secs(timeout.max(1));
            match serve::probe(&settings.metrics.listen, path, timeout).await {
                Ok(()) => Ok(EXIT_OK),
                Err(why) => {
                    eprintln!("unhealthy: {why}");
                    Ok(EXIT_ERROR)
                }
            }
        }
        Command::Config | Command::Origin { .. } | Command::Completions { .. } => {
            unreachable!("handled before logging starts")
        }
    }
}

/// Connects for a command that writes the worker's tables (migrating them
/// first) or only reads them (never creating anything: it may run as a
/// SELECT-only role, and on an empty database says to run `migrate`).
async fn connect_for(settings: &Settings, writes: bool) -> anyhow::Result<crate::db::Database> {
    let db = settings.profile.connect().await?;
    if writes {
        db.migrate()
            .await
            .context("migrating the worker's tables")?;
    } else {
        db.require_migrated().await?;
    }
    Ok(db)
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

/// The log format once logging is set up (before that, errors are plain text).
static LOG_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Colour only on a terminal, and never when `NO_COLOR` is set to anything
/// but the empty string (no-color.org).
fn use_color(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let color = use_color(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR"),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(color)
        // Log lines go around the progress bar, never through it.
        .with_writer(progress::LogWriter);
    let _ = LOG_FORMAT.set(format);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_color_turns_colour_off_unless_empty() {
        assert!(use_color(true, None));
        assert!(!use_color(false, None), "never off a terminal");
        assert!(!use_color(true, Some("1".into())));
        assert!(use_color(true, Some("".into())), "empty means unset");
    }

    #[test]
    fn every_argument_of_every_command_has_help() {
        use clap::CommandFactory;
        fn walk(cmd: &clap::Command, missing: &mut Vec<String>) {
            if cmd.is_hide_set() {
                return;
            }
            if cmd.get_about().is_none() && cmd.get_name() != "avatar-warden" {
                missing.push(format!("command {}", cmd.get_name()));
            }
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && !arg.is_hide_set() && arg.get_help().is_none() {
                    missing.push(format!("{} {}", cmd.get_name(), arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), &mut missing);
        assert!(missing.is_empty(), "without help: {missing:?}");
    }

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
