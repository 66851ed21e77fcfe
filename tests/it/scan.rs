use avatar_warden::classify::Status;
use avatar_warden::db::{AvatarRecord, UserId};
use avatar_warden::demo::SAMPLE_USERS;

use crate::helpers::{TestApp, sha256_hex};

#[tokio::test]
async fn every_sample_user_gets_the_verdict_the_demo_promises() {
    let app = TestApp::spawn().await;
    let report = app.scan().await;
    let states = app.states().await;
    for user in SAMPLE_USERS {
        let state = states
            .iter()
            .find(|r| r.user_id == UserId::Text(user.id.to_string()));
        match user.avatar {
            None => assert!(
                state.is_none(),
                "user {} has no avatar and must be skipped",
                user.id
            ),
            Some(_) => {
                let state = state.unwrap_or_else(|| panic!("user {} was not recorded", user.id));
                assert_eq!(
                    state.status.as_str(),
                    user.expect,
                    "user {} ({})",
                    user.id,
                    user.nickname
                );
            }
        }
    }
    assert_eq!(report.processed, 13);
    assert_eq!(report.count(Status::Mirrored), 6);
    assert_eq!(report.count(Status::Expired), 3);
    assert_eq!(report.count(Status::Invalid), 3);
    assert_eq!(report.count(Status::Failing), 1);
}

#[tokio::test]
async fn expired_wechat_avatar_flags_user_for_reauth_and_is_never_mirrored() {
    let app = TestApp::spawn().await;
    app.scan().await;
    let gao = app.state("7").await;
    assert_eq!(gao.status, Status::Expired);
    assert_eq!(gao.reason, "provider_notexist");
    assert_eq!(gao.reason_detail.as_deref(), Some("X-ErrNo: -6101"));
    assert!(gao.reauth_required);
    assert_eq!(
        gao.mirror_url, None,
        "the gray placeholder must never be mirrored"
    );
    assert_eq!(
        app.profile(7).await,
        (None, true),
        "write-back flags the user in the profile table"
    );
}

#[tokio::test]
async fn valid_avatar_is_mirrored_byte_for_byte_and_written_back() {
    let app = TestApp::spawn().await;
    app.scan().await;
    let alice = app.state("1").await;
    assert_eq!(alice.status, Status::Mirrored);
    let served = app.origin.image_bytes("jpeg", "alice").unwrap();
    let sha = sha256_hex(&served);
    assert_eq!(alice.sha256.as_deref(), Some(sha.as_str()));
    assert_eq!(alice.format.as_deref(), Some("jpeg"));
    assert_eq!((alice.width, alice.height), (Some(132), Some(132)));
    let key = format!("avatars/{}/{sha}.jpg", &sha[..2]);
    let on_disk = std::fs::read(app.mirror_root().join(&key)).unwrap();
    assert_eq!(sha256_hex(&on_disk), sha);
    let (mirror, reauth) = app.profile(1).await;
    assert!(!reauth);
    let mirror = mirror.expect("mirror url written back");
    assert!(
        mirror.starts_with("file://") && mirror.ends_with(&key),
        "{mirror}"
    );
    assert_eq!(alice.mirror_url.as_deref(), Some(mirror.as_str()));
}

#[tokio::test]
async fn transient_errors_never_flag_the_user() {
    let app = TestApp::spawn().await;
    app.scan().await;
    let jun = app.state("10").await;
    assert_eq!(
        (jun.status, jun.reason.as_str()),
        (Status::Failing, "server_error")
    );
    assert!(!jun.reauth_required);
    assert_eq!(jun.attempts, 1);
    assert!(
        jun.next_check_at.unwrap() > jun.checked_at,
        "failing avatars are retried later"
    );
    assert_eq!(app.profile(10).await, (None, false));
}

#[tokio::test]
async fn invalid_bytes_flag_the_user_with_a_specific_reason() {
    let app = TestApp::spawn().await;
    app.scan().await;
    for (id, reason) in [
        ("11", "not_an_image"),
        ("12", "truncated"),
        ("13", "unsupported_scheme"),
    ] {
        let s = app.state(id).await;
        assert_eq!(
            (s.status, s.reason.as_str()),
            (Status::Invalid, reason),
            "user {id}"
        );
        assert!(s.reauth_required);
    }
    assert_eq!(app.state("11").await.reason_detail.as_deref(), Some("html"));
}

#[tokio::test]
async fn identical_bytes_are_stored_once() {
    let app = TestApp::spawn().await;
    let report = app.scan().await;
    let dan = app.state("4").await;
    let erin = app.state("5").await;
    assert_eq!(dan.mirror_url, erin.mirror_url);
    assert_eq!(report.objects_uploaded, 5);
    assert_eq!(report.objects_deduplicated, 1);
    let files = walk(&app.mirror_root());
    assert_eq!(files.len(), 5, "{files:?}");
}

#[tokio::test]
async fn a_second_scan_right_after_fetches_nothing_already_settled() {
    let app = TestApp::spawn().await;
    let first = app.scan().await;
    let hits = app.origin.total_hits();
    assert_eq!(first.processed, 13);
    assert!(
        hits >= 12,
        "the first scan fetched every http avatar: {hits}"
    );
    let second = app.scan().await;
    assert_eq!(second.processed, 0, "{second:?}");
    assert_eq!(
        app.origin.total_hits(),
        hits,
        "no request on the second scan"
    );
}

#[tokio::test]
async fn a_changed_avatar_url_is_due_at_once_and_clears_the_flag_when_it_mirrors() {
    let app = TestApp::spawn().await;
    app.scan().await;
    assert!(app.state("7").await.reauth_required);
    let new_url = app.origin.url("/avatar/png/gao-new");
    app.sql(&[&format!(
        "UPDATE users SET avatar_url = '{new_url}' WHERE id = 7"
    )])
    .await;
    let report = app.scan().await;
    assert_eq!(report.processed, 1, "only the changed avatar is due");
    let gao = app.state("7").await;
    assert_eq!(
        (gao.status, gao.source_url.as_str()),
        (Status::Mirrored, new_url.as_str())
    );
    assert!(!gao.reauth_required);
    let (mirror, reauth) = app.profile(7).await;
    assert!(!reauth);
    assert!(mirror.unwrap().ends_with(".png"));
}

#[tokio::test]
async fn private_targets_are_blocked_by_default_and_never_contacted() {
    let mut app = TestApp::spawn().await;
    app.set("FETCH__ALLOW_PRIVATE_NETWORKS", "false");
    let report = app.scan().await;
    assert_eq!(
        app.origin.total_hits(),
        0,
        "the guard must refuse before connecting"
    );
    let alice = app.state("1").await;
    assert_eq!(
        (alice.status, alice.reason.as_str()),
        (Status::Blocked, "non_public_address")
    );
    assert_eq!(alice.reason_detail.as_deref(), Some("loopback"));
    assert!(!alice.reauth_required, "our policy is not the user's fault");
    assert_eq!(report.count(Status::Blocked), 12);
    // ftp:// is refused by the URL rules before the guard.
    assert_eq!(app.state("13").await.status, Status::Invalid);
}

#[tokio::test]
async fn a_body_over_max_bytes_is_too_large() {
    let mut app = TestApp::spawn().await;
    app.set("FETCH__MAX_BYTES", "1000");
    app.scan().await;
    let bo = app.state("2").await;
    assert_eq!(
        (bo.status, bo.reason.as_str()),
        (Status::Invalid, "too_large")
    );
}

#[tokio::test]
async fn string_ids_and_a_custom_table_are_supported() {
    let mut app = TestApp::empty().await;
    let ok = app.origin.url("/avatar/jpeg/u-a");
    let gone = app.origin.url("/status/410/u-b");
    app.sql(&[
        "CREATE TABLE members (uid TEXT PRIMARY KEY, face TEXT, face_mirror TEXT, must_relogin INTEGER DEFAULT 0)",
        &format!("INSERT INTO members VALUES ('u-a', '{ok}', NULL, 0), ('u-b', '{gone}', NULL, 0), ('u-c', '', NULL, 0), ('u-d', NULL, NULL, 0)"),
    ])
    .await;
    app.set("PROFILE__TABLE", "members");
    app.set("PROFILE__ID_COLUMN", "uid");
    app.set("PROFILE__AVATAR_COLUMN", "face");
    app.set("PROFILE__MIRROR_URL_COLUMN", "face_mirror");
    app.set("PROFILE__REAUTH_COLUMN", "must_relogin");
    app.set("SCAN__BATCH_SIZE", "1"); // exercise keyset paging over text ids
    let report = app.scan().await;
    assert_eq!(report.processed, 2, "empty and NULL avatars are skipped");
    assert_eq!(app.state("u-a").await.status, Status::Mirrored);
    let b = app.state("u-b").await;
    assert_eq!((b.status, b.reason.as_str()), (Status::Expired, "gone"));
    let pool = sqlx::SqlitePool::connect(&app.db_url).await.unwrap();
    let rows: Vec<(String, Option<String>, bool)> =
        sqlx::query_as("SELECT uid, face_mirror, must_relogin FROM members ORDER BY uid")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(rows[0].1.is_some() && !rows[0].2);
    assert!(rows[1].1.is_none() && rows[1].2);
    assert_eq!(
        (rows[2].1.as_deref(), rows[2].2),
        (None, false),
        "rows without avatar are untouched"
    );
}

#[tokio::test]
async fn replaying_a_batch_succeeds_and_changes_nothing() {
    let app = TestApp::spawn().await;
    app.scan().await;
    let before = app.states().await;
    let db = app.settings().profile.connect().await.unwrap();
    let records: Vec<AvatarRecord> = before
        .iter()
        .map(|r| AvatarRecord {
            user_id: UserId::Int(r.user_id.to_string().parse().unwrap()),
            ..r.clone()
        })
        .collect();
    db.record_batch(&records).await.unwrap();
    db.record_batch(&records).await.unwrap();
    assert_eq!(app.states().await, before);
    assert_eq!(app.profile(7).await, (None, true));
}

#[tokio::test]
async fn unknown_profile_columns_fail_at_start_with_the_column_named() {
    let mut app = TestApp::spawn().await;
    app.set("PROFILE__AVATAR_COLUMN", "avatar; DROP TABLE users");
    let err = match app.settings().profile.connect().await {
        Ok(_) => panic!("must refuse"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("profile.avatar_column"), "{err}");
}

pub fn walk(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}
