//! The end-of-scan summary as files: JSON for scripts, Markdown for people
//! (e.g. a CI job summary), and the metrics in node_exporter's textfile format.

use std::io::Write;
use std::path::Path;

use crate::classify::Status;
use crate::model::ScanReport;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReportError {
    #[error("{0}: the report format comes from the extension (.json, .md)")]
    UnknownFormat(String),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Writes the report as JSON or Markdown, chosen by the file's extension.
pub(crate) fn write_report(path: &Path, report: &ScanReport) -> Result<(), ReportError> {
    let text = match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("json") => {
            serde_json::to_string_pretty(report).expect("a report always serialises") + "\n"
        }
        Some("md" | "markdown") => to_markdown(report),
        _ => return Err(ReportError::UnknownFormat(path.display().to_string())),
    };
    write_atomically(path, text.as_bytes())
}

/// Writes aside and renames, so a reader (node_exporter's textfile
/// collector, a CI step) never sees half a file.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    let err = |source| ReportError::Write {
        path: path.display().to_string(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut file = std::fs::File::create(&tmp).map_err(err)?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(err)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

pub(crate) fn to_markdown(r: &ScanReport) -> String {
    let mut out = String::from("# avatar-warden scan\n\n");
    if r.dry_run {
        out.push_str("**Dry run**: nothing was stored or written.\n\n");
    }
    let rate = if r.duration_secs > 0.0 {
        r.processed as f64 / r.duration_secs
    } else {
        0.0
    };
    out.push_str(&format!(
        "{} avatars in {:.2} s ({rate:.1}/s){}.\n\n",
        r.processed,
        r.duration_secs,
        if r.interrupted {
            ", interrupted by shutdown"
        } else {
            ""
        }
    ));
    out.push_str("| status | avatars |\n|---|---:|\n");
    for status in Status::ALL {
        let n = r.count(status);
        if n > 0 {
            out.push_str(&format!("| {status} | {n} |\n"));
        }
    }
    if !r.by_reason.is_empty() {
        out.push_str("\n| status / reason | avatars |\n|---|---:|\n");
        for (reason, n) in &r.by_reason {
            out.push_str(&format!("| {reason} | {n} |\n"));
        }
    }
    if !r.changes.is_empty() {
        out.push_str("\n| change | avatars |\n|---|---:|\n");
        for (change, n) in &r.changes {
            out.push_str(&format!("| {change} | {n} |\n"));
        }
    }
    out.push_str(&format!(
        "\nPictures: {} first mirrors, {} re-verified unchanged, {} changed at the same URL; {} bytes downloaded.\n",
        r.first_mirrors, r.unchanged, r.changed, r.bytes_downloaded
    ));
    out.push_str(&format!(
        "\nObjects: {} uploaded ({} bytes), {} already stored. Users flagged for re-authorization: {}.\n",
        r.objects_uploaded,
        r.bytes_uploaded,
        r.objects_deduplicated,
        r.count(Status::Expired) + r.count(Status::Invalid)
    ));
    if r.rewritten > 0 {
        out.push_str(&format!(
            "\nRewritten for the current settings (nothing fetched): {} users' write-back columns or mirror URLs.\n",
            r.rewritten
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> ScanReport {
        let mut r = ScanReport {
            processed: 3,
            duration_secs: 1.5,
            objects_uploaded: 1,
            bytes_uploaded: 4096,
            ..Default::default()
        };
        r.by_status.insert("mirrored".into(), 2);
        r.by_status.insert("expired".into(), 1);
        r.by_reason.insert("expired/provider_notexist".into(), 1);
        r.changes.insert("new -> mirrored".into(), 2);
        r
    }

    #[test]
    fn markdown_summarises_counts_reasons_changes_and_rate() {
        let md = to_markdown(&report());
        assert!(md.contains("3 avatars in 1.50 s (2.0/s)"), "{md}");
        assert!(md.contains("| mirrored | 2 |"), "{md}");
        assert!(md.contains("| expired/provider_notexist | 1 |"), "{md}");
        assert!(md.contains("| new -> mirrored | 2 |"), "{md}");
        assert!(md.contains("re-authorization: 1."), "{md}");
    }

    #[test]
    fn the_extension_picks_the_format_and_files_appear_whole() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("scan.json");
        write_report(&json, &report()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert_eq!(v["processed"], 3);
        let md = dir.path().join("scan.md");
        write_report(&md, &report()).unwrap();
        assert!(
            std::fs::read_to_string(&md)
                .unwrap()
                .starts_with("# avatar-warden scan")
        );
        let err = write_report(&dir.path().join("scan.txt"), &report()).unwrap_err();
        assert!(err.to_string().contains(".json, .md"), "{err}");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(std::result::Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }
}
