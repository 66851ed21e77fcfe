//! Re-verification (#9): a mirrored avatar is re-checked with headers only
//! where the source allows it, and a new picture behind a stable URL is
//! noticed. Against a loopback origin that honours validators, one that
//! ignores them, and one that rejects HEAD; every request is recorded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use avatar_warden::classify::Status;
use avatar_warden::demo::origin::render_avatar;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;

use crate::helpers::{Backend, TestApp, sha256_hex};

/// One request as the origin saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub if_none_match: Option<String>,
    pub if_modified_since: Option<String>,
    pub status: u16,
    /// Body bytes sent (0 for HEAD and 304).
    pub body_bytes: usize,
}

#[derive(Default)]
struct Pictures {
    /// Bumped to put a new picture behind the same URL.
    version: HashMap<String, u32>,
    /// Answers like WeChat's CDN for a dead avatar: 200 + X-ErrNo.
    expired: std::collections::HashSet<String>,
    seen: Vec<Seen>,
}

/// `/<behaviour>/<name>`: `honours` (ETag, Last-Modified, 304, HEAD),
/// `ignores` (sends validators but always answers 200), `nohead` (405 to
/// HEAD, otherwise like `honours`).
#[derive(Clone)]
pub struct ValidatorOrigin {
    addr: SocketAddr,
    state: Arc<Mutex<Pictures>>,
}

impl ValidatorOrigin {
    pub async fn spawn() -> ValidatorOrigin {
        let state = Arc::new(Mutex::new(Pictures::default()));
        let app = Router::new().fallback(serve).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        ValidatorOrigin { addr, state }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A new picture behind `name`'s URL.
    pub fn change(&self, name: &str) {
        *self
            .state
            .lock()
            .unwrap()
            .version
            .entry(name.into())
            .or_default() += 1;
    }

    pub fn expire(&self, name: &str) {
        self.state.lock().unwrap().expired.insert(name.into());
    }

    /// The bytes `name` serves now.
    pub fn picture(&self, name: &str) -> Vec<u8> {
        let v = self
            .state
            .lock()
            .unwrap()
            .version
            .get(name)
            .copied()
            .unwrap_or(0);
        picture(name, v)
    }

    /// Requests since the last call, in arrival order.
    pub fn take_seen(&self) -> Vec<Seen> {
        std::mem::take(&mut self.state.lock().unwrap().seen)
    }
}

fn picture(name: &str, version: u32) -> Vec<u8> {
    render_avatar(&format!("{name}-v{version}"), 96, image::ImageFormat::Jpeg)
}

async fn serve(
    State(state): State<Arc<Mutex<Pictures>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let path = uri.path().to_string();
    let (behaviour, name) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or(("", ""));
    let (version, expired) = {
        let st = state.lock().unwrap();
        (
            st.version.get(name).copied().unwrap_or(0),
            st.expired.contains(name),
        )
    };
    let body = picture(name, version);
    let etag = format!("\"{}\"", &sha256_hex(&body)[..16]);
    // A date per version: a new picture is newer.
    let last_modified = (chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap()
        + chrono::Duration::days(i64::from(version)))
    .format("%a, %d %b %Y %H:%M:%S GMT")
    .to_string();
    let header_text = |name| {
        headers
            .get(name)
            .map(|v: &header::HeaderValue| v.to_str().unwrap().to_string())
    };
    let (if_none_match, if_modified_since) = (
        header_text(header::IF_NONE_MATCH),
        header_text(header::IF_MODIFIED_SINCE),
    );
    let head = method == Method::HEAD;
    let (status, body, extra): (StatusCode, Vec<u8>, Vec<(&str, String)>) =
        if head && behaviour == "nohead" {
            (StatusCode::METHOD_NOT_ALLOWED, Vec::new(), vec![])
        } else if expired {
            let gray = avatar_warden::demo::origin::gray_placeholder_png();
            (
                StatusCode::OK,
                gray,
                vec![
                    ("x-errno", "-6101".into()),
                    ("x-info", "notexist:-6101".into()),
                ],
            )
        } else {
            let honours = behaviour != "ignores";
            // RFC 9110 13.1.3: If-Modified-Since is ignored when If-None-Match is sent.
            let not_modified = honours
                && match (&if_none_match, &if_modified_since) {
                    (Some(tag), _) => tag.split(',').any(|t| t.trim() == etag),
                    (None, Some(since)) => *since == last_modified,
                    (None, None) => false,
                };
            let validators = vec![
                ("etag", etag.clone()),
                ("last-modified", last_modified.clone()),
            ];
            if not_modified {
                (StatusCode::NOT_MODIFIED, Vec::new(), validators)
            } else {
                (StatusCode::OK, body, validators)
            }
        };
    let length = body.len();
    let sent = if head || status == StatusCode::NOT_MODIFIED {
        0
    } else {
        length
    };
    state.lock().unwrap().seen.push(Seen {
        method: method.to_string(),
        path: path.clone(),
        if_none_match,
        if_modified_since,
        status: status.as_u16(),
        body_bytes: sent,
    });
    let mut response = Response::builder().status(status);
    if status == StatusCode::OK {
        response = response
            .header(header::CONTENT_TYPE, "image/jpeg")
            .header(header::CONTENT_LENGTH, length);
    }
    for (k, v) in extra {
        response = response.header(k, v);
    }
    let body = if head {
        Body::empty()
    } else {
        Body::from(body)
    };
    response.body(body).unwrap()
}

/// An app whose users' avatars are `paths` on `origin` (ids 1, 2, ...).
async fn app_on(backend: Backend, origin: &ValidatorOrigin, paths: &[&str]) -> Option<TestApp> {
    let app = TestApp::empty_on(backend, Default::default()).await?;
    let rows: Vec<(i64, String)> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| (i as i64 + 1, origin.url(p)))
        .collect();
    app.users(&rows).await;
    Some(app)
}

/// An origin and an app whose avatars are mirrored already, checked one at
/// a time (requests arrive in avatar order), with `rules` as provider rules.
async fn mirrored(paths: &[&str], rules: Option<&str>) -> (ValidatorOrigin, TestApp) {
    let origin = ValidatorOrigin::spawn().await;
    let mut app = app_on(Backend::Sqlite, &origin, paths).await.unwrap();
    if let Some(rules) = rules {
        app.provider_rules(rules);
    }
    app.set("FETCH__CONCURRENCY", "1");
    app.scan().await;
    origin.take_seen();
    (origin, app)
}

fn methods(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .map(|s| format!("{} {} {}", s.method, s.path, s.status))
        .collect()
}

fn bytes(seen: &[Seen]) -> u64 {
    seen.iter().map(|s| s.body_bytes as u64).sum()
}

fn mirror_file(app: &TestApp, key: &str) -> std::path::PathBuf {
    app.mirror_root().join(key)
}

crate::on_every_backend!(validators_are_stored_and_a_conditional_get_costs_no_body);

async fn validators_are_stored_and_a_conditional_get_costs_no_body(backend: Backend) {
    let origin = ValidatorOrigin::spawn().await;
    let Some(mut app) = app_on(
        backend,
        &origin,
        &["/honours/a", "/honours/b", "/honours/c"],
    )
    .await
    else {
        return;
    };
    // Sink events wait in the outbox (nothing delivers them in this test).
    app.config_toml(
        "[[sink]]\nkind = \"webhook\"\nurl = \"http://127.0.0.1:9/hook\"\nsecret = \"s\"\n",
    );
    let first = app.scan().await;
    let seen = origin.take_seen();
    assert!(
        seen.iter()
            .all(|s| s.method == "GET" && s.if_none_match.is_none() && s.status == 200),
        "{seen:?}"
    );
    assert_eq!(
        (first.first_mirrors, first.unchanged, first.changed),
        (3, 0, 0)
    );
    assert_eq!(first.bytes_downloaded, bytes(&seen));
    let a = app.state("1").await;
    let etag = format!("\"{}\"", &sha256_hex(&origin.picture("a"))[..16]);
    assert_eq!(a.validators.etag.as_deref(), Some(etag.as_str()));
    assert_eq!(
        a.validators.last_modified.as_deref(),
        Some("Tue, 14 Nov 2023 22:13:20 GMT")
    );
    assert_eq!(a.validators.length, Some(origin.picture("a").len() as i64));

    let last_event = "SELECT event_id FROM avatar_warden_outbox ORDER BY id DESC LIMIT 1";
    let events_after_first = app.text(last_event).await;
    assert!(events_after_first.is_some());

    // A week later nothing changed: three conditional GETs, three 304s, no body.
    app.time_passes().await;
    let before = app.states().await;
    let second = app.scan().await;
    let seen = origin.take_seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for s in &seen {
        assert_eq!((s.method.as_str(), s.status), ("GET", 304), "{s:?}");
        assert!(
            s.if_none_match.is_some() && s.if_modified_since.is_some(),
            "{s:?}"
        );
    }
    assert_eq!(
        seen[0].if_none_match.as_deref().map(|t| t.starts_with('"')),
        Some(true)
    );
    assert_eq!(
        (second.unchanged, second.changed, second.first_mirrors),
        (3, 0, 0)
    );
    assert_eq!(second.bytes_downloaded, 0);
    assert_eq!(second.objects_uploaded + second.objects_deduplicated, 0);
    let now = avatar_warden::app::unix_now();
    for (old, new) in before.iter().zip(app.states().await) {
        assert_eq!(
            (new.status, new.reason.as_str()),
            (Status::Mirrored, "unchanged")
        );
        assert_eq!(
            (
                &new.mirror_url,
                &new.sha256,
                new.size_bytes,
                new.width,
                &new.validators
            ),
            (
                &old.mirror_url,
                &old.sha256,
                old.size_bytes,
                old.width,
                &old.validators
            ),
            "the mirror and what is known of it stay"
        );
        assert!(
            new.next_check_at.unwrap() > now + 86_400,
            "next check moved on"
        );
    }
    assert_eq!(
        app.text(last_event).await,
        events_after_first,
        "unchanged is no news"
    );

    // The picture behind b's stable URL changes: downloaded, stored under its
    // new key, the old object kept. c's URL dies meanwhile (WeChat's headers,
    // answered to the conditional GET): expired as ever, its mirror kept.
    origin.change("b");
    origin.expire("c");
    app.time_passes().await;
    let old_b = app.state("2").await;
    let third = app.scan().await;
    let seen = origin.take_seen();
    assert_eq!(
        {
            let mut m = methods(&seen);
            m.sort();
            m
        },
        vec![
            "GET /honours/a 304",
            "GET /honours/b 200",
            "GET /honours/c 200"
        ]
    );
    assert_eq!((third.unchanged, third.changed), (1, 1));
    let c = app.state("3").await;
    assert_eq!(
        (c.status, c.reason.as_str(), c.reauth_required),
        (Status::Expired, "provider_notexist", true)
    );
    assert!(c.mirror_url.is_some());
    let new_picture = origin.picture("b");
    // The expired answer's placeholder body is never read.
    assert_eq!(third.bytes_downloaded, new_picture.len() as u64);
    let b = app.state("2").await;
    assert_eq!(
        (b.status, b.reason.as_str()),
        (Status::Mirrored, "source_changed")
    );
    assert_eq!(b.sha256.as_deref(), Some(sha256_hex(&new_picture).as_str()));
    let key = b.object_key.clone().unwrap();
    assert!(key.contains(&sha256_hex(&new_picture)));
    assert!(b.mirror_url.as_deref().unwrap().ends_with(&key));
    assert_ne!(b.mirror_url, old_b.mirror_url);
    assert_eq!(std::fs::read(mirror_file(&app, &key)).unwrap(), new_picture);
    assert!(
        mirror_file(&app, old_b.object_key.as_deref().unwrap()).exists(),
        "the old object is not deleted"
    );
    assert_ne!(b.validators.etag, old_b.validators.etag);
    assert_eq!(app.profile(2).await, (b.mirror_url.clone(), false));
    // The sinks hear of the new picture, and why.
    let event = app
        .text(
            "SELECT payload FROM avatar_warden_outbox WHERE user_id = '2' \
             AND kind = 'avatar.mirrored' ORDER BY id DESC LIMIT 1",
        )
        .await
        .unwrap();
    let event: serde_json::Value = serde_json::from_str(&event).unwrap();
    assert_eq!(event["reason"], "source_changed");
    assert_eq!(event["mirror_url"].as_str(), b.mirror_url.as_deref());
}

#[tokio::test]
async fn an_origin_that_ignores_validators_is_sent_plain_gets_for_the_rest_of_the_scan() {
    let (origin, app) = mirrored(&["/ignores/x", "/ignores/y", "/ignores/z"], None).await;
    app.time_passes().await;
    let deps = app.deps().await;
    let report = app.scan_with(&deps).await;
    let seen = origin.take_seen();
    let conditional: Vec<bool> = seen.iter().map(|s| s.if_none_match.is_some()).collect();
    assert_eq!(conditional, vec![true, false, false], "{seen:?}");
    assert!(seen.iter().all(|s| s.method == "GET" && s.status == 200));
    // Same bytes: unchanged, but the bytes were paid for.
    assert_eq!((report.unchanged, report.changed), (3, 0));
    assert_eq!(report.bytes_downloaded, bytes(&seen));
    assert!(report.bytes_downloaded > 0);
    assert_eq!(report.objects_uploaded, 0);
    let text = deps.metrics_text();
    for line in [
        "avatar_warden_mirror_checks_total{outcome=\"unchanged\",method=\"conditional\"} 1\n",
        "avatar_warden_mirror_checks_total{outcome=\"unchanged\",method=\"get\"} 2\n",
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
    // A changed picture is still noticed, by its bytes.
    origin.change("y");
    app.time_passes().await;
    let report = app.scan().await;
    assert_eq!((report.unchanged, report.changed), (2, 1));
    let y = app.state("2").await;
    assert_eq!(y.reason, "source_changed");
    assert_eq!(
        y.sha256.as_deref(),
        Some(sha256_hex(&origin.picture("y")).as_str())
    );
}

/// Rules that re-verify the origin's host with HEAD, as WeChat's rule does.
const HEAD_RULE: &str =
    "[[provider]]\nname = \"cdn\"\nhosts = [\"127.0.0.1\"]\nreverify = \"head\"\n";

#[tokio::test]
async fn a_host_that_rejects_head_gets_conditional_gets_for_the_rest_of_the_scan() {
    let (origin, app) = mirrored(&["/nohead/p", "/nohead/q"], Some(HEAD_RULE)).await;
    app.time_passes().await;
    let report = app.scan().await;
    let seen = origin.take_seen();
    assert_eq!(
        methods(&seen),
        vec![
            "HEAD /nohead/p 405",
            "GET /nohead/p 304",
            "GET /nohead/q 304"
        ]
    );
    assert!(seen[1].if_none_match.is_some() && seen[2].if_none_match.is_some());
    assert_eq!((report.unchanged, report.bytes_downloaded), (2, 0));
    assert_eq!(
        report.reverified.get("conditional/unchanged"),
        Some(&2),
        "{:?}",
        report.reverified
    );
    // Remembered for the run only: the next scan tries HEAD again.
    app.time_passes().await;
    app.scan().await;
    assert_eq!(origin.take_seen()[0].method, "HEAD");
}

#[tokio::test]
async fn head_re_verifies_without_a_body_and_catches_the_expiry_headers() {
    let (origin, app) = mirrored(
        &["/honours/same", "/honours/new", "/honours/dead"],
        Some(HEAD_RULE),
    )
    .await;
    let dead_before = app.state("3").await;

    origin.change("new");
    origin.expire("dead");
    app.time_passes().await;
    let report = app.scan().await;
    let seen = origin.take_seen();
    assert_eq!(
        methods(&seen),
        vec![
            "HEAD /honours/same 200",
            "HEAD /honours/new 200",
            // The HEAD showed another ETag: a plain GET, no validators to waste.
            "GET /honours/new 200",
            "HEAD /honours/dead 200",
        ]
    );
    assert!(seen[2].if_none_match.is_none());
    assert_eq!(report.bytes_downloaded, origin.picture("new").len() as u64);
    assert_eq!(
        (report.unchanged, report.changed, report.first_mirrors),
        (1, 1, 0)
    );
    assert_eq!(app.state("1").await.reason, "unchanged");
    let new = app.state("2").await;
    assert_eq!(
        (new.reason.as_str(), new.sha256.clone()),
        ("source_changed", Some(sha256_hex(&origin.picture("new"))))
    );
    // The dead avatar's HEAD carried X-ErrNo: expired as #4, mirror kept, user flagged.
    let dead = app.state("3").await;
    assert_eq!(
        (dead.status, dead.reason.as_str(), dead.reauth_required),
        (Status::Expired, "provider_notexist", true)
    );
    assert_eq!(dead.mirror_url, dead_before.mirror_url);
    assert_eq!(dead.validators, dead_before.validators);
}

#[tokio::test]
async fn a_new_url_is_never_sent_the_old_urls_validators() {
    let (origin, app) = mirrored(&["/honours/old"], None).await;
    app.sql(&[&format!(
        "UPDATE users SET avatar_url = '{}' WHERE id = 1",
        origin.url("/honours/fresh")
    )])
    .await;
    let report = app.scan().await;
    let seen = origin.take_seen();
    assert_eq!(methods(&seen), vec!["GET /honours/fresh 200"]);
    assert!(seen[0].if_none_match.is_none() && seen[0].if_modified_since.is_none());
    assert_eq!(report.first_mirrors, 1);
    assert_eq!(app.state("1").await.reason, "valid_image");
}

#[tokio::test]
async fn redownload_fetches_every_picture_in_full() {
    let (origin, app) = mirrored(&["/honours/r"], None).await;
    let deps = app.deps().await;
    let mut opts = avatar_warden::app::ScanOptions::from_settings(
        &app.settings(),
        tokio_util::sync::CancellationToken::new(),
    );
    opts.redownload = true;
    opts.selection.force = true;
    let report = deps.scan(&opts).await.unwrap();
    let seen = origin.take_seen();
    assert_eq!(methods(&seen), vec!["GET /honours/r 200"]);
    assert!(seen[0].if_none_match.is_none());
    assert_eq!(report.unchanged, 1, "same bytes: unchanged, by sha256");
    assert_eq!(report.bytes_downloaded, origin.picture("r").len() as u64);
}

/// Every file under the mirror root, as keys.
fn stored_keys(app: &TestApp) -> Vec<String> {
    let root = app.mirror_root();
    let mut keys = Vec::new();
    let mut dirs = vec![root.join("avatars")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let key = path.strip_prefix(&root).unwrap().to_str().unwrap();
                keys.push(key.to_string());
            }
        }
    }
    keys.sort();
    keys
}

/// Every stored file, last written `days` ago.
fn age_all(app: &TestApp, days: u64) {
    for key in stored_keys(app) {
        crate::helpers::backdate(
            &app.mirror_root().join(&key),
            std::time::Duration::from_secs(days * 86_400),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_removes_only_unreferenced_objects_past_the_grace_period() {
    use crate::cli::{run, stdout};
    let (origin, app) = mirrored(&["/honours/g1", "/honours/g2"], None).await;
    let old = app.state("1").await.object_key.unwrap();
    origin.change("g1");
    app.time_passes().await;
    app.scan().await;
    let current = app.object_keys().await;
    // Something else living in the mirror directory.
    let foreign = app
        .mirror_root()
        .join(format!("{}/notes.txt", &current[0][..10]));
    std::fs::write(&foreign, "not ours").unwrap();
    assert_eq!(stored_keys(&app).len(), 4);

    // Each object is counted once: referenced (whatever its age), or
    // unreferenced and too young, or unreferenced and deletable; how many
    // are referenced does not depend on the grace period.
    let accounted = |args: &[&str]| {
        let out = run(&app, args);
        assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
        let r: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        let n = |k: &str| r[k].as_u64().unwrap();
        assert_eq!(
            n("listed"),
            n("referenced") + n("too_young") + n("unreferenced"),
            "{r}"
        );
        (n("referenced"), n("too_young"), n("unreferenced"))
    };
    // Everything is younger than the default grace period (7 days): nothing to do.
    assert_eq!(accounted(&["gc", "--dry-run", "--json"]), (2, 1, 0));
    assert_eq!(
        accounted(&["gc", "--dry-run", "--json", "--grace-hours", "0"]),
        (2, 0, 1)
    );

    // Ten days later.
    age_all(&app, 10);
    let out = run(&app, &["gc", "--dry-run", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["keys"], serde_json::json!([old]), "{report}");
    assert_eq!(
        (
            report["listed"].as_u64(),
            report["referenced"].as_u64(),
            report["foreign"].as_u64()
        ),
        (Some(3), Some(2), Some(1))
    );
    assert_eq!(report["deleted"].as_u64(), Some(0));
    assert!(
        app.mirror_root().join(&old).exists(),
        "a dry run deletes nothing"
    );

    let out = run(&app, &["gc"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).contains("deleted 1"), "{}", stdout(&out));
    assert!(!app.mirror_root().join(&old).exists());
    for key in &current {
        assert!(app.mirror_root().join(key).exists(), "{key} is referenced");
    }
    assert!(foreign.exists(), "gc touches only objects of its own shape");
}

/// A store whose deletes first let "a scan" start using the object: the race
/// between `gc`'s reference check and its delete, made to happen every time.
struct RacingStore {
    inner: std::sync::Arc<dyn avatar_warden::storage::ObjectStore>,
    db_url: String,
    /// The avatar user 3 has, which "the scan" found already stored.
    url: String,
}

#[async_trait::async_trait]
impl avatar_warden::storage::ObjectStore for RacingStore {
    async fn exists(&self, key: &str) -> Result<bool, avatar_warden::storage::StoreError> {
        self.inner.exists(key).await
    }
    async fn put(
        &self,
        key: &str,
        body: bytes::Bytes,
        content_type: &str,
    ) -> Result<(), avatar_warden::storage::StoreError> {
        self.inner.put(key, body, content_type).await
    }
    fn public_url(&self, key: &str) -> String {
        self.inner.public_url(key)
    }
    async fn ping(&self) -> Result<(), avatar_warden::storage::StoreError> {
        self.inner.ping().await
    }
    fn prefix(&self) -> &str {
        self.inner.prefix()
    }
    async fn list_avatars(
        &self,
        cursor: Option<String>,
    ) -> Result<avatar_warden::storage::ObjectPage, avatar_warden::storage::StoreError> {
        self.inner.list_avatars(cursor).await
    }
    async fn delete(&self, key: &str) -> Result<(), avatar_warden::storage::StoreError> {
        let pool = sqlx::SqlitePool::connect(&self.db_url).await.unwrap();
        sqlx::query(
            "INSERT OR IGNORE INTO avatar_warden_avatars \
             (user_id, source_url, status, reason, object_key, sha256, checked_at, next_check_at) \
             VALUES ('3', ?, 'mirrored', 'valid_image', ?, 'sha', 1, 9999999999)",
        )
        .bind(&self.url)
        .bind(key)
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
        self.inner.delete(key).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_gc_deletes_while_a_scan_starts_using_it_is_stored_again() {
    let (origin, app) = mirrored(&["/honours/h1", "/honours/h2"], None).await;
    origin.change("h1");
    app.time_passes().await;
    app.scan().await;
    age_all(&app, 30);
    // User 3 signs up; a scan of theirs will find the old object in place.
    let url = origin.url("/honours/h3");
    app.sql(&[&format!(
        "INSERT INTO users (id, avatar_url) VALUES (3, '{url}')"
    )])
    .await;
    let store = RacingStore {
        inner: app.settings().storage.open().await.unwrap(),
        db_url: app.db_url.clone(),
        url,
    };
    let db = app.settings().profile.connect().await.unwrap();
    let opts = avatar_warden::gc::GcOptions {
        grace: std::time::Duration::from_secs(7 * 86_400),
        dry_run: false,
    };
    let report =
        avatar_warden::gc::collect_garbage(&db, &store, &opts, avatar_warden::app::unix_now())
            .await
            .unwrap();
    assert_eq!((report.deleted, report.healed), (1, 1));
    let raced = app.state("3").await;
    assert_eq!(raced.sha256, None, "the picture is forgotten");
    assert_eq!(raced.next_check_at, Some(0), "and due at once");
    // The next scan downloads and stores it again: the mirror URL works.
    origin.take_seen();
    app.scan().await;
    let healed = app.state("3").await;
    assert_eq!(
        healed.sha256.as_deref(),
        Some(sha256_hex(&origin.picture("h3")).as_str())
    );
    assert!(app.mirror_root().join(healed.object_key.unwrap()).exists());
    let seen = origin.take_seen();
    assert_eq!(methods(&seen), vec!["GET /honours/h3 200"]);
    assert!(seen[0].if_none_match.is_none());
}
