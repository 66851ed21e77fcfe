use super::*;
use crate::model::UserId;

fn record(status: Status, reason: &str) -> AvatarRecord {
    let r = AvatarRecord::new(UserId::Int(1), "https://x/y", reason.parse().unwrap(), 0);
    assert_eq!(r.status, status);
    r.with_reauth(status.requires_reauth())
}

#[test]
fn outcomes_are_counted_per_status_without_user_labels() {
    let m = Metrics::new();
    m.record_outcome(
        &record(Status::Expired, "provider_notexist"),
        Some("wechat"),
        None,
        0,
    );
    m.record_outcome(&record(Status::Expired, "not_found"), None, None, 0);
    m.record_outcome(&record(Status::Failing, "timeout"), Some("qq"), None, 0);
    assert_eq!(m.processed(Status::Expired), 2);
    assert_eq!(m.processed(Status::Failing), 1);
    let text = m.encode();
    assert!(text.contains(
        "avatar_warden_avatars_processed_total{status=\"expired\",reason=\"provider_notexist\",provider=\"wechat\"} 1"
    ), "{text}");
    assert!(
        text.contains("avatar_warden_reauth_flagged_total 2"),
        "{text}"
    );
    assert!(!text.contains("https://x/y"));
    assert!(text.ends_with("# EOF\n"));
}

#[test]
fn mirror_checks_and_downloads_are_split_by_what_was_found() {
    let m = Metrics::new();
    let head = Reverified { method: "head" };
    m.observe_mirror_check(Some(MirrorKind::First), None, 40_000);
    m.observe_mirror_check(Some(MirrorKind::Unchanged), Some(head), 0);
    m.observe_mirror_check(Some(MirrorKind::Unchanged), Some(head), 0);
    m.observe_mirror_check(None, None, 5_000);
    let text = m.encode();
    for line in [
        "avatar_warden_mirror_checks_total{outcome=\"first_mirror\",method=\"get\"} 1\n",
        "avatar_warden_mirror_checks_total{outcome=\"unchanged\",method=\"head\"} 2\n",
        "avatar_warden_downloaded_bytes_total{outcome=\"first_mirror\"} 40000\n",
        "avatar_warden_downloaded_bytes_total{outcome=\"unchanged\"} 0\n",
        "avatar_warden_downloaded_bytes_total{outcome=\"other\"} 5000\n",
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
}

#[test]
fn prometheus_text_names_counter_families_by_their_samples() {
    let m = Metrics::new();
    m.record_outcome(&record(Status::Mirrored, "valid_image"), None, None, 0);
    m.observe_fetch(Duration::from_millis(20), 4096);
    let text = m.encode_prometheus();
    assert!(
        text.contains("# TYPE avatar_warden_avatars_processed_total counter\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "# HELP avatar_warden_avatars_processed_total Avatars checked, by verdict status, reason and provider"
        ),
        "{text}"
    );
    assert!(text.contains("# TYPE avatar_warden_build_info gauge\n"));
    assert!(text.contains("# TYPE avatar_warden_fetch_duration_seconds histogram\n"));
    assert!(text.contains("avatar_warden_fetch_response_size_bytes_bucket{le=\"4096.0\"} 1\n"));
    assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
    // Every sample line survives unchanged.
    let samples = |t: &str| t.lines().filter(|l| !l.starts_with('#')).count();
    assert_eq!(samples(&text), samples(&m.encode()));
}

#[test]
fn the_oldest_pending_delivery_is_exported_only_while_one_waits() {
    let m = Metrics::new();
    let series = "avatar_warden_outbox_oldest_pending_timestamp_seconds{sink=\"im\"}";
    m.set_outbox("im", 3, 1, Some(1_700_000_000));
    let text = m.encode();
    assert!(text.contains(&format!("{series} 1700000000")), "{text}");
    assert!(
        text.contains("avatar_warden_outbox_dead{sink=\"im\"} 1"),
        "{text}"
    );
    m.set_outbox("im", 0, 1, None);
    let text = m.encode();
    assert!(!text.contains(series), "{text}");
    assert!(
        text.contains("avatar_warden_outbox_pending{sink=\"im\"} 0"),
        "{text}"
    );
}
