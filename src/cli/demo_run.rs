//! `demo`: the whole job on sample data against the simulated origin.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use crate::config::{FsSettings, Settings, StorageSettings};
use crate::db::{AvatarRecord, Database};
use crate::demo;
use crate::pipeline::{self, Deps};

use super::EXIT_OK;
use super::output::print_report;
use crate::app::App;
use crate::pipeline::ScanOptions;

/// A folder of our own in the temp dir by default; a folder we did not create is never wiped.
pub(super) fn prepare_demo_dir(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
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

pub(super) async fn run_demo(
    mut settings: Settings,
    dir: Option<PathBuf>,
    serve: bool,
) -> anyhow::Result<u8> {
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

    let deps = App::build(&settings).await?.into_deps();
    let report = pipeline::scan_once(
        &deps,
        &ScanOptions::from_settings(&settings, CancellationToken::new()),
    )
    .await?;
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
            "  AVATAR_WARDEN__FETCH__ALLOW_PRIVATE_NETWORKS=true AVATAR_WARDEN__FETCH__ALLOWED_PORTS='[]' {} check {expired_url}",
            invocation()
        );
        println!("Ctrl-C to stop.");
        let _ = tokio::signal::ctrl_c().await;
    } else {
        println!();
        println!(
            "Run `{} demo --serve` to keep the origin up and try `check` on its URLs.",
            invocation()
        );
    }
    Ok(EXIT_OK)
}

/// How the reader runs this binary again: `cargo run --release --` from a
/// checkout (cargo sets `CARGO_MANIFEST_DIR` for what it runs), the bare
/// name when the shell finds it on the PATH (an install, the image), else
/// its full path.
fn invocation() -> String {
    invocation_from(
        std::env::var_os("CARGO_MANIFEST_DIR").is_some(),
        std::env::current_exe().ok(),
        std::env::var_os("PATH").as_deref(),
    )
}

fn invocation_from(
    under_cargo: bool,
    exe: Option<std::path::PathBuf>,
    path: Option<&std::ffi::OsStr>,
) -> String {
    if under_cargo {
        return "cargo run --release --".to_string();
    }
    let Some(exe) = exe else {
        return "avatar-warden".to_string();
    };
    let on_path = exe.file_name().is_some_and(|name| {
        path.iter().flat_map(std::env::split_paths).any(|dir| {
            std::fs::canonicalize(dir.join(name)).ok() == std::fs::canonicalize(&exe).ok()
        })
    });
    if on_path {
        exe.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    } else {
        exe.display().to_string()
    }
}

/// The demo's second pass: the mirrored avatars come due again and are
/// re-verified with headers only (the origin sends ETags and answers 304).
pub(super) async fn demo_week_later(
    deps: &Deps,
    settings: &Settings,
    db_url: &str,
) -> anyhow::Result<()> {
    let pool = sqlx::SqlitePool::connect(db_url).await?;
    sqlx::query(
        "UPDATE avatar_warden_avatars SET next_check_at = 0 WHERE next_check_at IS NOT NULL",
    )
    .execute(&pool)
    .await?;
    pool.close().await;
    let report = pipeline::scan_once(
        deps,
        &ScanOptions::from_settings(settings, CancellationToken::new()),
    )
    .await?;
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

pub(super) async fn print_demo_users(db: &Database, db_url: &str) -> anyhow::Result<()> {
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
        let mirror = mirror.map_or_else(|| "-".into(), |m| short_mirror(&m));
        println!(
            "{id:<4} {nickname:<8} {status:<9} {reason:<20} {:<8} {mirror}",
            if reauth { "FLAGGED" } else { "" }
        );
    }
    Ok(())
}

pub(super) fn short_mirror(url: &str) -> String {
    match url.find("avatars/") {
        Some(i) => format!("mirror/{}", &url[i..]),
        None => url.to_string(),
    }
}

pub(super) fn print_mirror_files(root: &Path) -> anyhow::Result<()> {
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
    use super::invocation_from;

    #[test]
    fn the_demo_hints_name_the_binary_as_the_reader_runs_it() {
        assert_eq!(invocation_from(true, None, None), "cargo run --release --");
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("avatar-warden");
        std::fs::write(&exe, b"").unwrap();
        assert_eq!(
            invocation_from(false, Some(exe.clone()), Some(dir.path().as_os_str())),
            "avatar-warden",
            "installed on the PATH"
        );
        assert_eq!(
            invocation_from(
                false,
                Some(exe.clone()),
                Some(std::ffi::OsStr::new("/nowhere"))
            ),
            exe.display().to_string(),
            "run by its path"
        );
    }
}
