//! A local directory as object store: the embedded default, and what a
//! volume behind nginx needs.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ListedObject, ObjectPage, ObjectStore, OpObserver, StoreError, StoreOp, join_url};
use crate::config::FsSettings;

pub struct FsStore {
    root: PathBuf,
    base_url: String,
    /// Writes at once: more only queue on directory and journal locks (and
    /// occupy blocking threads); measured in BENCHMARKS.md (t1).
    writers: tokio::sync::Semaphore,
    /// Written but not yet published: final path → temp file. `sync` makes
    /// them durable and only then renames them into place, so a file under
    /// its final name is always complete, even after a power cut.
    /// Keyed by final path (a map: `exists` asks for every new object).
    pending: std::sync::Mutex<std::collections::HashMap<PathBuf, PathBuf>>,
    /// Names temp files; read once, as `getpid` is a system call each time.
    pid: u32,
}

const PARALLEL_WRITES: usize = 8;

/// Partial writes live here until renamed into place.
const TMP_DIR: &str = ".tmp";
/// A temp file this old was left by a killed writer: remove it.
const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(600);

impl FsStore {
    pub async fn open(settings: &FsSettings) -> Result<Self, StoreError> {
        tokio::fs::create_dir_all(settings.root.join(TMP_DIR)).await?;
        let root = tokio::fs::canonicalize(&settings.root).await?;
        remove_stale_temp_files(&root.join(TMP_DIR)).await;
        let base_url = match &settings.public_base_url {
            Some(base) => base.clone(),
            None => url::Url::from_directory_path(&root)
                .map_err(|()| {
                    StoreError::Config(format!("cannot make a file URL of {}", root.display()))
                })?
                .to_string(),
        };
        Ok(FsStore {
            root,
            base_url,
            writers: tokio::sync::Semaphore::new(PARALLEL_WRITES),
            pending: std::sync::Mutex::new(std::collections::HashMap::new()),
            pid: std::process::id(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn is_pending(&self, path: &Path) -> bool {
        self.pending
            .lock()
            .expect("pending lock")
            .contains_key(path)
    }

    /// Writes `body` aside for `sync` to publish; with `unless_present`,
    /// first returns `true` if the object is already there (published or
    /// pending), writing nothing.
    async fn write(
        &self,
        key: &str,
        body: Bytes,
        unless_present: bool,
    ) -> Result<bool, StoreError> {
        let path = self.path(key);
        if unless_present && self.is_pending(&path) {
            return Ok(true);
        }
        // Temp files spread over shards like the objects: creating a file
        // locks its directory, and 64 writers in one `.tmp` queued on that
        // lock (the profile in BENCHMARKS.md).
        let tmp = self.root.join(TMP_DIR).join(tmp_shard(key)).join(format!(
            "{}-{}-{:016x}",
            key.replace('/', "_"),
            self.pid,
            rand::random::<u64>()
        ));
        // One blocking task for the whole write: each tokio::fs call is a
        // thread hand-off of its own, and the profile (BENCHMARKS.md) showed
        // those wake-ups costing more than the writes.
        let _permit = self.writers.acquire().await.expect("never closed");
        // Linux: durable and published by `sync` (one syncfs per batch);
        // elsewhere fsynced and renamed right here.
        let durable_now = !cfg!(target_os = "linux");
        let (t, p) = (tmp.clone(), path.clone());
        let existed = tokio::task::spawn_blocking(move || {
            if unless_present && p.try_exists()? {
                return Ok(true);
            }
            write_temp(&t, &body, durable_now)?;
            if durable_now {
                publish(&t, &p)?;
            }
            Ok::<_, std::io::Error>(false)
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
        if !existed && !durable_now {
            // A second write of the same key replaces the first (same bytes);
            // the first temp file is left for the stale-file sweep.
            self.pending.lock().expect("pending lock").insert(path, tmp);
        }
        Ok(existed)
    }
}

#[async_trait]
impl ObjectStore for FsStore {
    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let path = self.path(key);
        if self.is_pending(&path) {
            return Ok(true);
        }
        Ok(tokio::fs::try_exists(path).await?)
    }

    async fn put(&self, key: &str, body: Bytes, _content_type: &str) -> Result<(), StoreError> {
        self.write(key, body, false).await.map(|_| ())
    }

    fn checks_in_bulk(&self) -> bool {
        true
    }

    /// One blocking task for the whole page: a re-verification asked per
    /// avatar spent more on the hand-offs than on the `statx` calls
    /// (BENCHMARKS.md, #19: a fifth of its throughput).
    async fn missing(&self, keys: Vec<String>) -> Result<HashSet<String>, StoreError> {
        let unpublished: Vec<String> = {
            let pending = self.pending.lock().expect("pending lock");
            keys.into_iter()
                .filter(|key| !pending.contains_key(&self.path(key)))
                .collect()
        };
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let mut missing = HashSet::new();
            for key in unpublished {
                if !root.join(&key).try_exists()? {
                    missing.insert(key);
                }
            }
            Ok::<_, std::io::Error>(missing)
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
        .map_err(StoreError::Io)
    }

    /// The check rides in the write's blocking task: one hand-off per new
    /// picture instead of two (the first scan's profile in BENCHMARKS.md).
    async fn put_if_absent(
        &self,
        key: &str,
        body: Bytes,
        _content_type: &str,
        observe: Option<&OpObserver>,
    ) -> Result<bool, StoreError> {
        let started = std::time::Instant::now();
        let existed = self.write(key, body, true).await?;
        if let Some(observe) = observe {
            let op = if existed {
                StoreOp::Exists
            } else {
                StoreOp::Put
            };
            observe(op, started.elapsed());
        }
        Ok(existed)
    }

    fn public_url(&self, key: &str) -> String {
        join_url(&self.base_url, key)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        tokio::fs::metadata(&self.root).await?;
        Ok(())
    }

    fn prefix(&self) -> &'static str {
        ""
    }

    /// A page is one shard directory (`avatars/<xx>/`); the cursor names the next.
    async fn list_avatars(&self, cursor: Option<String>) -> Result<ObjectPage, StoreError> {
        let avatars = self.root.join("avatars");
        tokio::task::spawn_blocking(move || list_shard(&avatars, cursor.as_deref()))
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
            .map_err(StoreError::Io)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match tokio::fs::remove_file(self.path(key)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// One `syncfs` for everything written since the last one: an fsync per
    /// object held a check's slot for the disk's flush latency and cut
    /// throughput by a fifth at 100 ms origin latency (BENCHMARKS.md, t2).
    #[cfg(target_os = "linux")]
    async fn sync(&self) -> Result<(), StoreError> {
        let root = self.root.clone();
        let pending = std::mem::take(&mut *self.pending.lock().expect("pending lock"));
        tokio::task::spawn_blocking(move || {
            let published = (|| {
                let dir = std::fs::File::open(&root)?;
                let syncfs = || nix::unistd::syncfs(&dir).map_err(std::io::Error::from);
                // The data, then the names: a crash in between leaves only temp files.
                syncfs()?;
                for (path, tmp) in &pending {
                    publish(tmp, path)?;
                }
                if !pending.is_empty() {
                    syncfs()?;
                }
                Ok::<_, std::io::Error>(())
            })();
            if published.is_err() {
                // The batch that needed them fails: its temp files go now,
                // not ten minutes later (best effort on a failing disk).
                for tmp in pending.values() {
                    let _ = std::fs::remove_file(tmp);
                }
            }
            published
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
        Ok(())
    }

    async fn discard_pending(&self) {
        let pending = std::mem::take(&mut *self.pending.lock().expect("pending lock"));
        if pending.is_empty() {
            return;
        }
        let _ = tokio::task::spawn_blocking(move || {
            for tmp in pending.values() {
                let _ = std::fs::remove_file(tmp);
            }
        })
        .await;
    }
}

/// The objects of the first shard directory at or after `from`, and the next shard's name.
fn list_shard(avatars: &Path, from: Option<&str>) -> std::io::Result<ObjectPage> {
    let entries = match std::fs::read_dir(avatars) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ObjectPage::default()),
        Err(e) => return Err(e),
    };
    let mut shards: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| from.is_none_or(|f| name.as_str() >= f))
        .collect();
    shards.sort();
    let mut shards = shards.into_iter();
    let Some(shard) = shards.next() else {
        return Ok(ObjectPage::default());
    };
    let mut objects = Vec::new();
    for entry in std::fs::read_dir(avatars.join(&shard))?.flatten() {
        let (Ok(meta), Ok(name)) = (entry.metadata(), entry.file_name().into_string()) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| crate::model::saturating_i64(d.as_secs()));
        objects.push(ListedObject {
            key: format!("avatars/{shard}/{name}"),
            size: meta.len(),
            modified,
        });
    }
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(ObjectPage {
        objects,
        next: shards.next(),
    })
}

/// The temp shard of a key: the object's own shard (`avatars/<xx>/…`).
fn tmp_shard(key: &str) -> String {
    key.rsplit('/')
        .nth(1)
        .filter(|s| !s.is_empty() && !s.starts_with('.'))
        .unwrap_or("_")
        .to_string()
}

/// Removes temp files a killed writer left in `.tmp` and its shards.
async fn remove_stale_temp_files(dir: &Path) {
    let dir = dir.to_path_buf();
    let _ = tokio::task::spawn_blocking(move || remove_stale_in(&dir, 1)).await;
}

fn remove_stale_in(dir: &Path, depth: u8) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            if depth > 0 {
                remove_stale_in(&entry.path(), depth - 1);
            }
            continue;
        }
        let stale = meta
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_TMP);
        if stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Writes an object aside, in its temp shard (fsynced when `durable`).
fn write_temp(tmp: &Path, body: &[u8], durable: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = in_dir(tmp, || std::fs::File::create(tmp))?;
    let written = file
        .write_all(body)
        .and_then(|()| if durable { file.sync_data() } else { Ok(()) });
    if written.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    written
}

/// Renames a complete temp file into place: readers never see half an
/// object, and two writers of one key both end with the same complete file.
fn publish(tmp: &Path, path: &Path) -> std::io::Result<()> {
    in_dir(path, || std::fs::rename(tmp, path)).inspect_err(|_| {
        let _ = std::fs::remove_file(tmp);
    })
}

/// Runs `op` on `path`, creating its directory only when `op` finds it
/// missing: the shard directories exist after the first few pictures, and
/// asking first cost two system calls per file (`mkdir`, `statx`).
fn in_dir<T>(path: &Path, op: impl Fn() -> std::io::Result<T>) -> std::io::Result<T> {
    match op() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            op()
        }
        done => done,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    fn temp_file(path: &Path, age: Duration) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let f = std::fs::File::create(path).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
    }

    async fn open_store(dir: &Path) -> FsStore {
        FsStore::open(&FsSettings {
            root: dir.to_path_buf(),
            public_base_url: Some("https://cdn.example.com".into()),
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn put_if_absent_writes_a_picture_once_and_says_when_it_was_there() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path()).await;
        let ops = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = ops.clone();
        let observe: OpObserver = Arc::new(move |op, _| seen.lock().unwrap().push(op));
        let key = "avatars/ab/abcdef.jpg";
        let put = |body: &'static [u8]| {
            store.put_if_absent(key, Bytes::from_static(body), "image/jpeg", Some(&observe))
        };
        assert!(
            !put(b"first").await.unwrap(),
            "a new key was reported present"
        );
        // Pending (written, not yet published) counts as present.
        assert!(put(b"second").await.unwrap());
        store.sync().await.unwrap();
        assert!(put(b"third").await.unwrap());
        assert_eq!(std::fs::read(dir.path().join(key)).unwrap(), b"first");
        assert_eq!(
            *ops.lock().unwrap(),
            [StoreOp::Put, StoreOp::Exists, StoreOp::Exists]
        );
        let tmp_shard = std::fs::read_dir(dir.path().join(TMP_DIR).join("ab")).unwrap();
        assert_eq!(tmp_shard.count(), 0, "a skipped write left a temp file");
    }

    #[tokio::test]
    async fn missing_answers_for_many_keys_and_counts_unsynced_writes_as_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path()).await;
        assert!(store.checks_in_bulk());
        let body = || Bytes::from_static(b"jpeg");
        let (synced, unsynced, never) = (
            "avatars/ab/ab01.jpg",
            "avatars/cd/cd01.jpg",
            "avatars/ef/ef01.jpg",
        );
        store.put(synced, body(), "image/jpeg").await.unwrap();
        store.sync().await.unwrap();
        store.put(unsynced, body(), "image/jpeg").await.unwrap();
        let keys = [synced, unsynced, never].map(str::to_owned).to_vec();
        let missing = store.missing(keys.clone()).await.unwrap();
        assert_eq!(missing, HashSet::from([never.to_owned()]));
        std::fs::remove_file(dir.path().join(synced)).unwrap();
        let missing = store.missing(keys).await.unwrap();
        assert_eq!(
            missing,
            HashSet::from([never.to_owned(), synced.to_owned()])
        );
    }

    #[tokio::test]
    async fn a_shard_directory_removed_while_running_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path()).await;
        let body = || Bytes::from_static(b"jpeg");
        store
            .put("avatars/ab/ab01.jpg", body(), "image/jpeg")
            .await
            .unwrap();
        store.sync().await.unwrap();
        // An operator empties the store by hand while the worker runs.
        std::fs::remove_dir_all(dir.path().join("avatars")).unwrap();
        std::fs::remove_dir_all(dir.path().join(TMP_DIR)).unwrap();
        for key in ["avatars/ab/ab02.jpg", "avatars/cd/cd01.jpg"] {
            assert!(
                !store
                    .put_if_absent(key, body(), "image/jpeg", None)
                    .await
                    .unwrap()
            );
        }
        store.sync().await.unwrap();
        for key in ["avatars/ab/ab02.jpg", "avatars/cd/cd01.jpg"] {
            assert_eq!(
                std::fs::read(dir.path().join(key)).unwrap(),
                b"jpeg",
                "{key}"
            );
        }
    }

    #[tokio::test]
    async fn put_leaves_no_temp_files_and_open_removes_only_stale_ones() {
        let dir = tempfile::tempdir().unwrap();
        let settings = FsSettings {
            root: dir.path().to_path_buf(),
            public_base_url: Some("https://cdn.example.com".into()),
        };
        let store = FsStore::open(&settings).await.unwrap();
        let key = "avatars/ab/abcdef.jpg";
        store
            .put(key, Bytes::from_static(b"jpeg"), "image/jpeg")
            .await
            .unwrap();
        assert!(store.exists(key).await.unwrap());
        if cfg!(target_os = "linux") {
            // Not under its final name until it is durable.
            assert!(!dir.path().join(key).exists());
        }
        store.sync().await.unwrap();
        assert_eq!(std::fs::read(dir.path().join(key)).unwrap(), b"jpeg");
        assert!(store.exists(key).await.unwrap());
        let tmp = dir.path().join(TMP_DIR);
        let leftovers: Vec<_> = std::fs::read_dir(tmp.join("ab")).unwrap().collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        let old = Duration::from_secs(3600);
        temp_file(&tmp.join("ab/killed-writer"), old);
        temp_file(&tmp.join("legacy-flat-file"), old);
        temp_file(&tmp.join("cd/being-written"), Duration::ZERO);
        FsStore::open(&settings).await.unwrap();
        assert!(!tmp.join("ab/killed-writer").exists());
        assert!(!tmp.join("legacy-flat-file").exists());
        assert!(
            tmp.join("cd/being-written").exists(),
            "a live write was removed"
        );
        assert_eq!(std::fs::read(dir.path().join(key)).unwrap(), b"jpeg");
    }
}
