//! The write path (#16): nothing marked mirrored without its object.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use avatar_warden::classify::Status;
use avatar_warden::config::StorageSettings;
use avatar_warden::storage::{FsStore, ImageWriter, ObjectPage, ObjectStore, StoreError};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::cli::{run, stdout};
use crate::helpers::TestApp;

/// The real fs store whose next durability barrier fails, as a disk that
/// turns read-only (or fills up) between writing a batch and publishing it.
struct FailingSync {
    inner: FsStore,
    fail_next: AtomicBool,
}

#[async_trait]
impl ObjectStore for FailingSync {
    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.exists(key).await
    }
    async fn put(&self, key: &str, body: Bytes, content_type: &str) -> Result<(), StoreError> {
        self.inner.put(key, body, content_type).await
    }
    fn public_url(&self, key: &str) -> String {
        self.inner.public_url(key)
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    fn prefix(&self) -> &str {
        self.inner.prefix()
    }
    async fn sync(&self) -> Result<(), StoreError> {
        if self.fail_next.swap(false, Ordering::SeqCst) {
            // What a read-only remount does to the publishing step.
            self.inner.discard_pending().await;
            return Err(StoreError::Io(std::io::Error::from_raw_os_error(30)));
        }
        self.inner.sync().await
    }
    async fn discard_pending(&self) {
        self.inner.discard_pending().await;
    }
    async fn list_avatars(&self, cursor: Option<String>) -> Result<ObjectPage, StoreError> {
        self.inner.list_avatars(cursor).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }
}

fn files_under(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| {
                if e.path().is_dir() {
                    files_under(&e.path())
                } else {
                    1
                }
            })
            .sum()
    })
}

fn object_path(app: &TestApp, mirror_url: &str) -> std::path::PathBuf {
    app.mirror_root()
        .join(&mirror_url[mirror_url.find("avatars/").unwrap()..])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_durability_barrier_never_leaves_mirrored_rows_without_objects() {
    let app = TestApp::empty().await;
    app.users(&[
        (1, app.origin.url("/avatar/jpeg/a")),
        (2, app.origin.url("/avatar/png/b")),
        (3, app.origin.url("/avatar/jpeg/c")),
    ])
    .await;
    let mut deps = app.deps().await;
    let StorageSettings::Fs(fs) = &app.settings().storage else {
        panic!("fs store")
    };
    let store = Arc::new(FailingSync {
        inner: FsStore::open(fs).await.unwrap(),
        fail_next: AtomicBool::new(true),
    });
    // One writer for both scans, as `run` keeps it.
    deps.images = ImageWriter::new(store);
    let opts = avatar_warden::cli::scan_options(&app.settings(), CancellationToken::new());

    let failed = avatar_warden::pipeline::scan_once(&deps, &opts).await;
    assert!(failed.is_err(), "the scan fails with its store: {failed:?}");
    assert_eq!(
        files_under(&app.mirror_root().join(".tmp")),
        0,
        "a failed scan removes the temp files it wrote"
    );

    let report = avatar_warden::pipeline::scan_once(&deps, &opts)
        .await
        .unwrap();
    assert_eq!(report.count(Status::Mirrored), 3, "{report:?}");
    for id in ["1", "2", "3"] {
        let s = app.state(id).await;
        let path = object_path(&app, s.mirror_url.as_deref().unwrap());
        assert!(path.is_file(), "user {id}: {} exists", path.display());
    }
    let out = run(&app, &["verify-store"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).contains("0 missing"), "{}", stdout(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_object_is_reported_and_stored_again() {
    let app = TestApp::empty().await;
    app.users(&[
        (1, app.origin.url("/avatar/jpeg/a")),
        (2, app.origin.url("/avatar/jpeg/b")),
    ])
    .await;
    app.scan().await;
    let a = app.state("1").await;
    let b = app.state("2").await;
    let (a_path, b_path) = (
        object_path(&app, a.mirror_url.as_deref().unwrap()),
        object_path(&app, b.mirror_url.as_deref().unwrap()),
    );
    std::fs::remove_file(&a_path).unwrap();

    let out = run(&app, &["verify-store"]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains("1 missing (1 rows)"), "{text}");
    assert!(text.contains(a.object_key.as_deref().unwrap()), "{text}");

    // The next re-verification notices and downloads it again; the other
    // one is still confirmed with headers only.
    app.time_passes().await;
    app.scan().await;
    assert!(a_path.is_file(), "stored again");
    let again = app.state("1").await;
    assert_eq!(
        (again.status, again.sha256.as_deref()),
        (Status::Mirrored, a.sha256.as_deref())
    );
    assert_eq!(app.origin.hits("/avatar/jpeg/a"), 2, "a full download");
    assert_eq!(app.state("2").await.reason, "unchanged");

    // `--repair` makes the avatars of a missing object due at once.
    std::fs::remove_file(&b_path).unwrap();
    let out = run(&app, &["verify-store", "--repair"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).contains("1 avatars made due"), "{}", stdout(&out));
    let report = app.scan().await;
    assert_eq!(report.processed, 1, "only the repaired one was due");
    assert!(b_path.is_file(), "stored again");
    let out = run(&app, &["verify-store", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["missing"], 0);
}
