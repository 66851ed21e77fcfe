//! One hostile row never stops a run (#15): remote text is bounded before it
//! is stored or sent, and a row the database still refuses is recorded as
//! `record_error` while the rest of its batch lands — on every backend.

use avatar_warden::classify::{MAX_DETAIL_BYTES, Status};
use avatar_warden::demo::OriginOptions;

use crate::helpers::{Backend, TestApp, sql_string};
use crate::on_every_backend;

/// A users table whose avatar column holds more than MySQL's TEXT (64 KiB).
async fn users_with_long_urls(app: &TestApp, rows: &[(i64, String)]) {
    let b = app.backend;
    let long_text = if b == Backend::MySql {
        "MEDIUMTEXT"
    } else {
        "TEXT"
    };
    let mut stmts = vec![format!(
        "CREATE TABLE users (id BIGINT PRIMARY KEY, avatar_url {long_text}, avatar_mirror_url TEXT, \
         avatar_reauth_required {} NOT NULL DEFAULT {})",
        b.boolean(),
        b.false_literal()
    )];
    for (id, url) in rows {
        stmts.push(format!(
            "INSERT INTO users (id, avatar_url) VALUES ({id}, {})",
            sql_string(url)
        ));
    }
    app.sql(&stmts.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
}

/// A webhook sink, so every verdict also becomes an outbox row.
fn with_webhook(app: &mut TestApp) {
    let hook = app.origin.url("/status/204/hook");
    app.config_toml(&format!(
        "[[sink]]\nkind = \"webhook\"\nurl = \"{hook}\"\nsecret = \"s\"\n"
    ));
}

async fn oversized_remote_values_never_stop_a_run(backend: Backend) {
    let Some(mut app) = TestApp::empty_on(backend, OriginOptions::default()).await else {
        return;
    };
    let long_url = format!(
        "{}?{}",
        app.origin.url("/avatar/jpeg/long"),
        "q".repeat(70_000)
    );
    users_with_long_urls(
        &app,
        &[
            (1, app.origin.url("/hostile/errno/a")),
            (2, app.origin.url("/hostile/info/b")),
            (3, app.origin.url("/hostile/validators/c")),
            (4, long_url.clone()),
            (5, app.origin.url("/avatar/jpeg/good")),
        ],
    )
    .await;
    with_webhook(&mut app);
    let report = app.scan().await;
    assert_eq!((report.processed, report.unrecorded), (5, 0), "{report:?}");

    for id in ["1", "2"] {
        let s = app.state(id).await;
        assert_eq!(
            (s.status, s.reason.as_str()),
            (Status::Expired, "provider_notexist")
        );
        let detail = s.reason_detail.unwrap();
        assert!(detail.len() <= MAX_DETAIL_BYTES, "{}", detail.len());
        assert!(detail.contains("cut from 70"), "user {id}: {detail}");
        assert!(
            app.profile(id.parse().unwrap()).await.1,
            "user {id} flagged"
        );
    }
    let c = app.state("3").await;
    assert_eq!(c.status, Status::Mirrored);
    assert_eq!(
        (c.validators.etag, c.validators.last_modified),
        (None, None),
        "validators too long to store are left out"
    );
    let long = app.state("4").await;
    assert_eq!(
        (long.status, long.reason.as_str()),
        (Status::Invalid, "url_too_long")
    );
    assert_eq!(long.source_url, long_url, "the exact URL is kept");
    assert_eq!(app.state("5").await.status, Status::Mirrored);

    // Nothing is stuck: the next run (everything due again) passes too,
    // and what it sends to the sinks is bounded.
    let again = app
        .text("SELECT CAST(MAX(LENGTH(payload)) AS VARCHAR(20)) FROM avatar_warden_outbox")
        .await;
    if let Some(max) = again.and_then(|v| v.parse::<usize>().ok()) {
        assert!(max < 8 * 1024, "outbox payload of {max} bytes");
    }
    app.sql(&["UPDATE avatar_warden_avatars SET next_check_at = 0, source_url = 'changed'"])
        .await;
    let report = app.scan().await;
    assert_eq!((report.processed, report.unrecorded), (5, 0), "{report:?}");
}

/// The second line: the database refuses one row of a batch for a reason
/// nobody bounded (here a constraint the test adds). The other rows land
/// and the refused one is recorded as `failing`/`record_error`.
async fn a_row_the_database_refuses_becomes_record_error_and_the_batch_lands(backend: Backend) {
    let Some(app) = TestApp::empty_on(backend, OriginOptions::default()).await else {
        return;
    };
    app.users(&[
        (1, app.origin.url("/avatar/jpeg/a")),
        (2, app.origin.url("/hostile/poison/b")),
        (3, app.origin.url("/avatar/jpeg/c")),
        (4, app.origin.url("/wechat/expired/d")),
    ])
    .await;
    let deps = app.deps().await;
    deps.database().migrate().await.unwrap();
    let refuse = match backend {
        Backend::Sqlite => vec![
            "CREATE TRIGGER no_hostile_detail BEFORE INSERT ON avatar_warden_avatars \
             WHEN NEW.reason_detail LIKE '%poison%' BEGIN SELECT RAISE(ABORT, 'row refused by test'); END",
        ],
        _ => vec![
            "ALTER TABLE avatar_warden_avatars ADD CONSTRAINT no_hostile_detail \
             CHECK (reason_detail IS NULL OR reason_detail NOT LIKE '%poison%')",
        ],
    };
    app.sql(&refuse).await;
    let report = app.scan_with(&deps).await;
    assert_eq!((report.processed, report.unrecorded), (4, 0), "{report:?}");
    for id in ["1", "3"] {
        assert_eq!(app.state(id).await.status, Status::Mirrored, "user {id}");
    }
    assert_eq!(app.state("4").await.status, Status::Expired);
    let b = app.state("2").await;
    assert_eq!(
        (b.status, b.reason.as_str()),
        (Status::Failing, "record_error"),
        "{b:?}"
    );
    assert!(
        b.reason_detail.unwrap().contains("refused this row"),
        "the detail says the database refused it"
    );
    assert!(!b.reauth_required, "a refused write never flags a user");
    assert!(!app.profile(2).await.1);
    assert_eq!(report.count(Status::Failing), 1, "{report:?}");
}

on_every_backend!(
    oversized_remote_values_never_stop_a_run,
    a_row_the_database_refuses_becomes_record_error_and_the_batch_lands,
);
