//! The S3 backend against a real S3-protocol server (s3s + s3s-fs) served
//! over loopback HTTP in the test process, driven by the real aws-sdk-s3 client.

use avatar_warden::classify::Status;
use avatar_warden::config::{S3Settings, StorageSettings};
use avatar_warden::storage::{CACHE_CONTROL, S3Store};
use hyper_util::rt::{TokioExecutor, TokioIo};
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestApp, sha256_hex};

const ACCESS_KEY: &str = "AKIAWARDENTEST";
const SECRET_KEY: &str = "warden-test-secret-key";
const BUCKET: &str = "avatars";

pub struct S3Server {
    pub endpoint: String,
    _root: tempfile::TempDir,
    stop: CancellationToken,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn spawn_s3() -> S3Server {
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
                _ = token.cancelled() => return,
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
    S3Server {
        endpoint,
        _root: root,
        stop,
    }
}

fn configure(app: &mut TestApp, s3: &S3Server) {
    app.set("STORAGE__KIND", "s3");
    app.set("STORAGE__BUCKET", BUCKET);
    app.set("STORAGE__ENDPOINT", &s3.endpoint);
    app.set("STORAGE__REGION", "us-east-1");
    app.set("STORAGE__FORCE_PATH_STYLE", "true");
    app.set("STORAGE__PREFIX", "prod/");
    app.set("STORAGE__PUBLIC_BASE_URL", "https://cdn.example.com/");
    app.set("STORAGE__ACCESS_KEY_ID", ACCESS_KEY);
    app.set("STORAGE__SECRET_ACCESS_KEY", SECRET_KEY);
}

fn s3_settings(app: &TestApp) -> S3Settings {
    match app.settings().storage {
        StorageSettings::S3(s) => s,
        other => panic!("expected s3 settings, got {other:?}"),
    }
}

#[tokio::test]
async fn mirrors_round_trip_through_a_real_s3_server() {
    let s3 = spawn_s3().await;
    let mut app = TestApp::spawn().await;
    configure(&mut app, &s3);
    let report = app.scan().await;
    assert_eq!(report.count(Status::Mirrored), 6, "{report:?}");
    assert_eq!(
        (report.objects_uploaded, report.objects_deduplicated),
        (5, 1)
    );

    let client = S3Store::open(&s3_settings(&app)).await.unwrap();
    let client = client.client();
    let alice = app.state("1").await;
    let sha = alice.sha256.clone().unwrap();
    let key = format!("prod/avatars/{}/{sha}.jpg", &sha[..2]);
    assert_eq!(
        alice.mirror_url.as_deref(),
        Some(format!("https://cdn.example.com/{key}").as_str())
    );

    let object = client
        .get_object()
        .bucket(BUCKET)
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
        .bucket(BUCKET)
        .prefix("prod/avatars/")
        .send()
        .await
        .unwrap();
    assert_eq!(
        listed.key_count(),
        Some(5),
        "identical bytes are stored once"
    );
}

#[tokio::test]
async fn an_object_already_in_the_bucket_is_not_uploaded_again() {
    let s3 = spawn_s3().await;
    let mut app = TestApp::spawn().await;
    configure(&mut app, &s3);
    app.scan().await;
    // A second worker with a fresh process state (no in-memory knowledge) over the same bucket.
    app.sql(&["DELETE FROM avatar_warden_avatars"]).await;
    let report = app.scan().await;
    assert_eq!(report.count(Status::Mirrored), 6);
    assert_eq!(report.objects_uploaded, 0, "{report:?}");
    assert_eq!(report.objects_deduplicated, 6);
}

#[tokio::test]
async fn wrong_credentials_fail_at_start_with_a_clear_error() {
    let s3 = spawn_s3().await;
    let mut app = TestApp::spawn().await;
    configure(&mut app, &s3);
    app.set("STORAGE__SECRET_ACCESS_KEY", "not-the-secret");
    let err = match app.settings().storage.open().await {
        Ok(_) => panic!("must refuse"),
        Err(e) => e,
    };
    assert!(!err.is_retryable(), "{err}");
    assert!(err.to_string().contains("403"), "{err}");
}
