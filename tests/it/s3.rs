//! The S3 backend against real S3-protocol servers, driven by the real
//! aws-sdk-s3 client over loopback HTTP: s3s (+ s3s-fs) served in the test
//! process, and Garage, a production S3-compatible store, when scripts/test
//! started one.

use avatar_warden::classify::Status;
use avatar_warden::config::{S3Settings, StorageSettings};
use avatar_warden::media::ImageFormat;
use avatar_warden::storage::{CACHE_CONTROL, ImageWriter, ObjectStore, S3Store};
use hyper_util::rt::{TokioExecutor, TokioIo};
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestApp, sha256_hex};

const ACCESS_KEY: &str = "AKIAWARDENTEST";
const SECRET_KEY: &str = "warden-test-secret-key";
const BUCKET: &str = "avatars";

/// Where a test's objects go: a server and a key prefix of the test's own.
pub struct S3Target {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    pub prefix: String,
    _server: Option<InProcessS3>,
}

pub struct InProcessS3 {
    _root: tempfile::TempDir,
    stop: CancellationToken,
}

impl Drop for InProcessS3 {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Server {
    InProcess,
    Garage,
}

impl S3Target {
    /// `None` (skip) when Garage is not running here; under CI that is a failure.
    pub async fn start(server: Server) -> Option<S3Target> {
        let prefix = format!("t{:012x}/", rand::random::<u64>() >> 16);
        match server {
            Server::InProcess => Some(spawn_in_process(prefix).await),
            Server::Garage => {
                let var = |name: &str| {
                    std::env::var(format!("AVATAR_WARDEN_TEST_GARAGE_{name}"))
                        .ok()
                        .filter(|v| !v.is_empty())
                };
                let Some(endpoint) = var("ENDPOINT") else {
                    crate::helpers::skip(
                        "Garage",
                        "scripts/test --with-tools installs it; scripts/test starts it when installed",
                    );
                    return None;
                };
                Some(S3Target {
                    endpoint,
                    region: "garage".into(),
                    bucket: var("BUCKET").expect("AVATAR_WARDEN_TEST_GARAGE_BUCKET"),
                    access_key: var("KEY_ID").expect("AVATAR_WARDEN_TEST_GARAGE_KEY_ID"),
                    secret_key: var("SECRET").expect("AVATAR_WARDEN_TEST_GARAGE_SECRET"),
                    prefix,
                    _server: None,
                })
            }
        }
    }

    pub fn configure(&self, app: &mut TestApp) {
        app.set("STORAGE__KIND", "s3");
        app.set("STORAGE__BUCKET", &self.bucket);
        app.set("STORAGE__ENDPOINT", &self.endpoint);
        app.set("STORAGE__REGION", &self.region);
        app.set("STORAGE__FORCE_PATH_STYLE", "true");
        app.set("STORAGE__PREFIX", &self.prefix);
        app.set("STORAGE__PUBLIC_BASE_URL", "https://cdn.example.com/");
        app.set("STORAGE__ACCESS_KEY_ID", &self.access_key);
        app.set("STORAGE__SECRET_ACCESS_KEY", &self.secret_key);
    }
}

async fn spawn_in_process(prefix: String) -> S3Target {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join(BUCKET)).unwrap(); // s3s-fs: a bucket is a directory
    let fs = s3s_fs::FileSystem::new(root.path()).unwrap();
    let mut builder = S3ServiceBuilder::new(fs);
    builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
    let service = builder.build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                () = token.cancelled() => return,
                accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
            };
            let service = service.clone();
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    S3Target {
        endpoint,
        region: "us-east-1".into(),
        bucket: BUCKET.into(),
        access_key: ACCESS_KEY.into(),
        secret_key: SECRET_KEY.into(),
        prefix,
        _server: Some(InProcessS3 { _root: root, stop }),
    }
}

fn s3_settings(app: &TestApp) -> S3Settings {
    match app.settings().storage {
        StorageSettings::S3(s) => s,
        other @ StorageSettings::Fs(_) => panic!("expected s3 settings, got {other:?}"),
    }
}

async fn mirrors_round_trip_through_a_real_s3_server(server: Server) {
    let Some(s3) = S3Target::start(server).await else {
        return;
    };
    let mut app = TestApp::spawn().await;
    s3.configure(&mut app);
    let report = app.scan().await;
    assert_eq!(report.count(Status::Mirrored), 6, "{report:?}");
    assert_eq!(
        (report.objects_uploaded, report.objects_deduplicated),
        (5, 1)
    );

    let store = S3Store::open(&s3_settings(&app)).await.unwrap();
    let client = store.client();
    let alice = app.state("1").await;
    let sha = alice.sha256.clone().unwrap();
    let key = format!("{}avatars/{}/{sha}.jpg", s3.prefix, &sha[..2]);
    assert_eq!(
        alice.mirror_url.as_deref(),
        Some(format!("https://cdn.example.com/{key}").as_str())
    );

    let object = client
        .get_object()
        .bucket(&s3.bucket)
        .key(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(object.content_type(), Some("image/jpeg"));
    assert_eq!(object.cache_control(), Some(CACHE_CONTROL));
    let body = object.body.collect().await.unwrap().into_bytes();
    assert_eq!(
        sha256_hex(&body),
        sha,
        "the stored bytes are the picture the origin served"
    );
    assert_eq!(body, app.origin.image_bytes("jpeg", "alice").unwrap());

    let listed = client
        .list_objects_v2()
        .bucket(&s3.bucket)
        .prefix(format!("{}avatars/", s3.prefix))
        .send()
        .await
        .unwrap();
    assert_eq!(
        listed.key_count(),
        Some(5),
        "identical bytes are stored once"
    );
}

async fn an_object_already_in_the_bucket_is_not_uploaded_again(server: Server) {
    let Some(s3) = S3Target::start(server).await else {
        return;
    };
    let mut app = TestApp::spawn().await;
    s3.configure(&mut app);
    app.scan().await;
    // A second worker with a fresh process state (no in-memory knowledge) over the same bucket.
    app.sql(&["DELETE FROM avatar_warden_avatars"]).await;
    let report = app.scan().await;
    assert_eq!(report.count(Status::Mirrored), 6);
    assert_eq!(report.objects_uploaded, 0, "{report:?}");
    assert_eq!(report.objects_deduplicated, 6);
}

/// Conditional puts (`If-None-Match: *`) are not honoured everywhere (Garage
/// ignores them), so dedupe must not depend on them: whatever the server does
/// with a conditional put, the writer stores each picture once.
async fn dedupe_does_not_depend_on_conditional_puts(server: Server) {
    let Some(s3) = S3Target::start(server).await else {
        return;
    };
    let mut app = TestApp::spawn().await;
    s3.configure(&mut app);
    let store = std::sync::Arc::new(S3Store::open(&s3_settings(&app)).await.unwrap());
    let client = store.client().clone();
    let probe = format!("{}probe", s3.prefix);
    let put = |body: &'static [u8]| {
        client
            .put_object()
            .bucket(&s3.bucket)
            .key(&probe)
            .if_none_match("*")
            .body(body.to_vec().into())
            .send()
    };
    put(b"first").await.unwrap();
    let honoured = put(b"second").await.is_err();
    eprintln!("{server:?} honours If-None-Match on PutObject: {honoured}");

    let bytes = app.origin.image_bytes("jpeg", "conditional").unwrap();
    let sha = sha256_hex(&bytes);
    for round in 0..2 {
        // A fresh writer each time: no in-memory knowledge of what is stored.
        let writer = ImageWriter::new(store.clone());
        let stored = writer
            .store_image(&sha, ImageFormat::Jpeg, bytes.clone())
            .await
            .unwrap();
        assert_eq!(stored.deduplicated, round == 1, "round {round}");
    }
}

async fn wrong_credentials_fail_at_start_with_a_clear_error(server: Server) {
    let Some(s3) = S3Target::start(server).await else {
        return;
    };
    let mut app = TestApp::spawn().await;
    s3.configure(&mut app);
    app.set("STORAGE__SECRET_ACCESS_KEY", "not-the-secret");
    let Err(err) = app.settings().storage.open().await else {
        panic!("must refuse")
    };
    assert!(!err.is_retryable(), "{err}");
    assert!(err.to_string().contains("403"), "{err}");
}

/// A re-verification must not confirm a mirror whose object left the
/// bucket: it downloads and stores the picture again. S3 is asked per
/// avatar (the fs store answers per page; tests/it/writepath.rs).
async fn an_object_lost_from_the_bucket_is_stored_again(server: Server) {
    let Some((_s3, app, store)) = scanned_sample(server).await else {
        return;
    };
    let alice = app.state("1").await;
    let key = alice.object_key.clone().unwrap();
    store.delete(&key).await.unwrap();
    assert!(!store.exists(&key).await.unwrap());

    app.time_passes().await;
    app.scan().await;
    assert!(store.exists(&key).await.unwrap(), "{key} stored again");
    let again = app.state("1").await;
    assert_eq!(
        (again.status, again.sha256.as_deref()),
        (Status::Mirrored, alice.sha256.as_deref())
    );
    let bob = app.state("2").await;
    assert_eq!(
        bob.reason, "unchanged",
        "the others are confirmed by headers"
    );
}

/// The sample users scanned once into `server`, and the store they went to.
async fn scanned_sample(
    server: Server,
) -> Option<(S3Target, TestApp, std::sync::Arc<dyn ObjectStore>)> {
    let s3 = S3Target::start(server).await?;
    let mut app = TestApp::spawn().await;
    s3.configure(&mut app);
    app.scan().await;
    let store = app.settings().storage.open().await.unwrap();
    Some((s3, app, store))
}

async fn gc_deletes_unreferenced_objects_and_nothing_else(server: Server) {
    let Some((s3, app, store)) = scanned_sample(server).await else {
        return;
    };
    let referenced = app.object_keys().await;
    assert!(referenced.len() >= 3);
    let orphan_bytes = b"an old picture".to_vec();
    let orphan = avatar_warden::storage::object_key(
        &s3.prefix,
        &sha256_hex(&orphan_bytes),
        ImageFormat::Png,
    );
    store
        .put(&orphan, orphan_bytes.into(), "image/png")
        .await
        .unwrap();
    let foreign = format!("{}avatars/README.txt", s3.prefix);
    store
        .put(&foreign, "not an avatar".into(), "text/plain")
        .await
        .unwrap();
    let db = app.settings().profile.connect().await.unwrap();
    // Everything counts as old: the grace period is over for all of them.
    let later = avatar_warden::app::unix_now() + 60;
    let mut opts = avatar_warden::gc::GcOptions {
        grace: std::time::Duration::ZERO,
        dry_run: true,
    };
    let dry = avatar_warden::gc::collect_garbage(&db, store.as_ref(), &opts, later)
        .await
        .unwrap();
    assert_eq!(dry.keys, vec![orphan.clone()]);
    assert_eq!((dry.deleted, dry.foreign), (0, 1));
    assert!(store.exists(&orphan).await.unwrap());
    opts.dry_run = false;
    let done = avatar_warden::gc::collect_garbage(&db, store.as_ref(), &opts, later)
        .await
        .unwrap();
    assert_eq!((done.deleted, done.failed), (1, 0));
    assert!(!store.exists(&orphan).await.unwrap());
    assert!(store.exists(&foreign).await.unwrap());
    for key in &referenced {
        assert!(store.exists(key).await.unwrap(), "{key} is referenced");
    }
    // A second pass finds nothing left.
    let again = avatar_warden::gc::collect_garbage(&db, store.as_ref(), &opts, later)
        .await
        .unwrap();
    assert_eq!(again.unreferenced, 0);
}

macro_rules! on_every_s3_server {
    ($($name:ident),* $(,)?) => {
        mod in_process {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Server::InProcess).await })*
        }
        mod garage {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Server::Garage).await })*
        }
    };
}

on_every_s3_server!(
    mirrors_round_trip_through_a_real_s3_server,
    an_object_already_in_the_bucket_is_not_uploaded_again,
    dedupe_does_not_depend_on_conditional_puts,
    an_object_lost_from_the_bucket_is_stored_again,
    wrong_credentials_fail_at_start_with_a_clear_error,
    gc_deletes_unreferenced_objects_and_nothing_else,
);
