//! The command line: commands, flags and their help (the CLI contract).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::classify::Status;
use crate::db::Shard;

use super::EXIT_SOME_FAILING;

#[derive(Debug, Parser)]
#[command(
    name = "avatar-warden",
    version = VERSION,
    about = "Keeps third-party avatars alive: mirrors valid pictures, flags users whose avatar is gone.",
    long_about = "Scans a profile table for third-party avatar URLs (WeChat, QQ, Douyin, Weibo...), \
detects expired ones (including WeChat's HTTP 200 placeholder marked by X-ErrNo / X-Info: notexist), \
mirrors valid images to S3-compatible storage under their sha256, flags users for re-authorization \
and writes every outcome back to the profile database.\n\n\
Configuration: the built-in defaults, then --config FILE (or config/$AVATAR_WARDEN_ENV.toml), \
then environment variables AVATAR_WARDEN__<SECTION>__<KEY>.\n\n\
Exit codes: 0 all done; 2 done but some avatars are failing; 1 configuration or runtime error; \
64 usage error; 143 (SIGTERM) or 130 (Ctrl-C) after a second signal."
)]
pub(crate) struct Cli {
    /// Configuration file layered over the built-in defaults.
    #[arg(long, global = true, env = "AVATAR_WARDEN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
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
        #[arg(long, value_name = "PATH", value_parser = report_path)]
        report: Option<PathBuf>,
        /// Write the scan's metrics for node_exporter's textfile collector (atomically).
        #[arg(long, value_name = "PATH", value_parser = path_in_existing_dir)]
        metrics_file: Option<PathBuf>,
        /// Push the scan's metrics to this Prometheus Pushgateway when it completes.
        #[arg(long, value_name = "URL", env = "AVATAR_WARDEN_PUSHGATEWAY", value_parser = http_url)]
        pushgateway: Option<String>,
        /// No progress bar (or, off a terminal, no periodic progress lines).
        #[arg(long)]
        no_progress: bool,
        /// Off a terminal, seconds between progress log lines.
        #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        progress_every: u64,
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
        /// The avatar URL to check.
        url: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write every avatar's recorded state, one JSON object per line.
    Export {
        /// Output format (JSON Lines: one object per avatar).
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
    /// Show how many avatars are in each status, the backlog, the last run and the outbox.
    Status {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Exit 0 when the running worker's /healthz (or, with --ready, /readyz)
    /// answers 200 on `metrics.listen`: a container health check (the image
    /// has no curl).
    Healthcheck {
        /// Ask /readyz (database and store answer) instead of /healthz (the process answers).
        #[arg(long)]
        ready: bool,
        /// Seconds to wait for the answer.
        #[arg(long, value_name = "SECS", default_value_t = 5)]
        timeout: u64,
    },
    /// Print shell completions for bash, zsh or fish to standard output.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
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
        /// Serve 640x640 JPEGs of 20-120 KB (median ~45 KB) instead, as real avatars are.
        #[arg(long, conflicts_with = "image_bytes")]
        realistic_images: bool,
        /// Answer 429 when more than this many `/bench/` requests are in flight.
        #[arg(long)]
        limit: Option<u64>,
    },
}

/// The version and the commit it was built from (`build.rs`).
pub(crate) const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("AVATAR_WARDEN_COMMIT"),
    ")"
);

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum ExportFormat {
    Jsonl,
}

fn parse_status_arg(s: &str) -> Result<Status, String> {
    s.parse()
        .map_err(|e: crate::model::UnknownCode| e.to_string())
}

/// A file to write at the end of a scan: its directory must exist now,
/// not be found missing after an hour of work.
fn path_in_existing_dir(raw: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(raw);
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if dir.is_dir() {
        Ok(path)
    } else {
        Err(format!("directory {} does not exist", dir.display()))
    }
}

/// A report path: the format comes from the extension.
fn report_path(raw: &str) -> Result<PathBuf, String> {
    let path = path_in_existing_dir(raw)?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("json" | "md" | "markdown") => Ok(path),
        _ => Err("the report format comes from the extension: .json or .md".into()),
    }
}

/// An http(s) URL (the Pushgateway's).
fn http_url(raw: &str) -> Result<String, String> {
    match url::Url::parse(raw) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && !u.cannot_be_a_base() => {
            Ok(raw.to_owned())
        }
        _ => Err("not an http(s) URL".into()),
    }
}
