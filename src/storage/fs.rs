//! A local directory as object store: the embedded default, and what a
//! volume behind nginx needs.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ListedObject, ObjectPage, ObjectStore, StoreError, join_url};
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
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }
}

#[async_trait]
impl ObjectStore for FsStore {
    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let path = self.path(key);
        if self
            .pending
            .lock()
            .expect("pending lock")
            .contains_key(&path)
        {
            return Ok(true);
        }
        Ok(tokio::fs::try_exists(path).await?)
    }

    async fn put(&self, key: &str, body: Bytes, _content_type: &str) -> Result<(), StoreError> {
        let path = self.path(key);
        // Temp files spread over shards like the objects: creating a file
        // locks its directory, and 64 writers in one `.tmp` queued on that
        // lock (the profile in BENCHMARKS.md).
        let tmp = self.root.join(TMP_DIR).join(tmp_shard(key)).join(format!(
            "{}-{}-{:016x}",
            key.replace('/', "_"),
            std::process::id(),
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
        tokio::task::spawn_blocking(move || {
            write_temp(&t, &body, durable_now)?;
            if durable_now {
                publish(&t, &p)?;
            }
            Ok::<_, std::io::Error>(())
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
        if durable_now {
            return Ok(());
        }
        // A second write of the same key replaces the first (same bytes);
        // the first temp file is left for the stale-file sweep.
        self.pending.lock().expect("pending lock").insert(path, tmp);
        Ok(())
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
    if let Some(dir) = tmp.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::File::create(tmp)?;
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
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::rename(tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn temp_file(path: &Path, age: Duration) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let f = std::fs::File::create(path).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
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
