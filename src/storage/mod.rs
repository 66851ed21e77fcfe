//! Content-addressed object storage for mirrored avatars. Keys are derived
//! from the bytes, so identical pictures are stored once, writes are
//! idempotent and objects can be cached forever.

mod fs;
mod s3;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

pub use crate::model::{OpObserver, StoreOp, StoredObject};
pub use fs::FsStore;
pub use s3::S3Store;

use crate::config::StorageSettings;
use crate::media::ImageFormat;
use crate::model::Cause;

/// Objects never change once written: let the CDN keep them forever.
pub const CACHE_CONTROL: &str = "public, max-age=31536000, immutable";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The request did not complete (connection, dispatch, an unreadable reply).
    #[error("storage request failed: {0}")]
    Request(#[source] Cause),
    /// The server is overloaded or failing (5xx, 429): its own words.
    #[error("storage is unavailable: {0}")]
    Unavailable(String),
    #[error("storage rejected the request: {0}")]
    Rejected(String),
    #[error("storage timed out")]
    Timeout,
    #[error("storage is misconfigured: {0}")]
    Config(String),
}

impl StoreError {
    /// Network trouble and timeouts may pass; a refused request or a bad config will not.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Io(_)
                | StoreError::Request(_)
                | StoreError::Unavailable(_)
                | StoreError::Timeout
        )
    }
}

/// Where mirrored avatars live. Implementations must make `put` idempotent.
#[async_trait]
pub trait ObjectStore: Send + Sync {
    async fn exists(&self, key: &str) -> Result<bool, StoreError>;
    async fn put(&self, key: &str, body: Bytes, content_type: &str) -> Result<(), StoreError>;
    /// Stores `body` under `key` unless an object is there already, and says
    /// whether it was (then nothing is written). The default asks, then
    /// writes, timing each: for S3 a HEAD costs less than a PUT of the body,
    /// and several servers ignore `If-None-Match: *`. The fs store checks
    /// inside its write, saving a thread hand-off per picture.
    async fn put_if_absent(
        &self,
        key: &str,
        body: Bytes,
        content_type: &str,
        observe: Option<&OpObserver>,
    ) -> Result<bool, StoreError> {
        if timed(observe, StoreOp::Exists, self.exists(key)).await? {
            return Ok(true);
        }
        timed(observe, StoreOp::Put, self.put(key, body, content_type)).await?;
        Ok(false)
    }
    /// Whether `missing` answers for a page of keys more cheaply than
    /// `exists` key by key (fs: one blocking task for the page instead of a
    /// thread hand-off per key; S3 needs a request per key either way).
    fn checks_in_bulk(&self) -> bool {
        false
    }
    /// Which of `keys` are not stored; a write not yet synced counts as stored.
    async fn missing(&self, keys: Vec<String>) -> Result<HashSet<String>, StoreError> {
        let mut missing = HashSet::new();
        for key in keys {
            if !self.exists(&key).await? {
                missing.insert(key);
            }
        }
        Ok(missing)
    }
    /// The URL the app will show for this key.
    fn public_url(&self, key: &str) -> String;
    /// Cheap reachability check for readiness and start-up.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Key prefix every object key starts with (may be empty).
    fn prefix(&self) -> &str;
    /// Makes every object `put` so far durable. Called before their URLs are
    /// recorded; stores whose `put` is durable on success need nothing.
    async fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Forgets what was written since the last `sync` and removes it
    /// (best effort): the scan that wrote it failed before using it.
    async fn discard_pending(&self) {}
    /// One page of the objects under `<prefix>avatars/`, in key order,
    /// continuing after `cursor` (`gc`).
    async fn list_avatars(&self, cursor: Option<String>) -> Result<ObjectPage, StoreError>;
    /// Removes one object; a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
}

/// A stored object as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    pub key: String,
    pub size: u64,
    /// Unix seconds of the last write.
    pub modified: i64,
}

/// A page of a listing and where the next one starts.
#[derive(Debug, Clone, Default)]
pub struct ObjectPage {
    pub objects: Vec<ListedObject>,
    pub next: Option<String>,
}

/// Whether `key` is one this worker writes: `<prefix>avatars/<2 hex>/<sha256>.<ext>`.
/// `gc` never touches anything else in a shared bucket or directory.
pub fn is_avatar_key(prefix: &str, key: &str) -> bool {
    let Some(rest) = key
        .strip_prefix(prefix)
        .and_then(|k| k.strip_prefix("avatars/"))
    else {
        return false;
    };
    let Some((shard, file)) = rest.split_once('/') else {
        return false;
    };
    let Some((sha, ext)) = file.split_once('.') else {
        return false;
    };
    let hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    shard.len() == 2
        && sha.len() == 64
        && hex(sha)
        && sha.starts_with(shard)
        && ImageFormat::from_ext(ext).is_some()
}

/// `avatars/<first two hex>/<sha256>.<ext>`: two hex characters spread keys
/// over 256 prefixes, which S3 partitions and directory listings both like.
pub fn object_key(prefix: &str, sha256: &str, format: ImageFormat) -> String {
    format!("{prefix}avatars/{}/{sha256}.{}", &sha256[..2], format.ext())
}

/// Joins a public base URL and a key with exactly one slash.
pub fn join_url(base: &str, key: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        key.trim_start_matches('/')
    )
}

/// Runs one store operation and reports its duration to `observe`.
pub async fn timed<T>(
    observe: Option<&OpObserver>,
    op: StoreOp,
    fut: impl Future<Output = T>,
) -> T {
    let started = std::time::Instant::now();
    let out = fut.await;
    if let Some(observe) = observe {
        observe(op, started.elapsed());
    }
    out
}

/// How many keys a writer remembers as present, to skip existence checks
/// for pictures many users share. Bounded so memory stays flat.
const KNOWN_KEYS_CAP: usize = 16_384;

/// Writes images to a store once per content key, also when many users
/// with the same picture are checked at the same moment.
#[derive(Clone)]
pub struct ImageWriter {
    store: Arc<dyn ObjectStore>,
    state: Arc<Mutex<WriterState>>,
    observe: Option<OpObserver>,
}

#[derive(Default)]
struct WriterState {
    /// Keys durable under their final name (fs: published and synced; S3:
    /// PUT returned and the batch's `sync` passed): safe to skip.
    known: HashSet<String>,
    /// Written or found since the last `sync`: known only once it succeeds.
    unsynced: Vec<String>,
    in_progress: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

impl ImageWriter {
    pub fn new(store: Arc<dyn ObjectStore>) -> Self {
        ImageWriter {
            store,
            state: Arc::default(),
            observe: None,
        }
    }

    /// Reports every store operation's duration to `observe`.
    pub fn observed(mut self, observe: OpObserver) -> Self {
        self.observe = Some(observe);
        self
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The durability barrier before a batch that points at stored objects.
    /// Keys written before it become known only if it succeeds: a key is
    /// never skipped on the word of a write that was not made durable.
    pub async fn sync(&self) -> Result<(), StoreError> {
        // Taken before the store's own barrier: a key written meanwhile waits
        // for the next one (safe), never the other way round.
        let written = std::mem::take(&mut self.state.lock().expect("writer lock").unsynced);
        self.store.sync().await?;
        let mut st = self.state.lock().expect("writer lock");
        if st.known.len() + written.len() > KNOWN_KEYS_CAP {
            st.known.clear();
        }
        st.known.extend(written);
        Ok(())
    }

    /// After a failed scan: what was written but not made durable is removed,
    /// and none of it counts as stored.
    pub async fn discard_unsynced(&self) {
        self.state.lock().expect("writer lock").unsynced.clear();
        self.store.discard_pending().await;
    }

    /// Stop trusting that `key` is stored (it was found missing).
    pub fn forget(&self, key: &str) {
        self.state.lock().expect("writer lock").known.remove(key);
    }

    /// Forget every known key: at the start of each scan, so a long-running
    /// process never trusts a key across a `gc` run (which may delete an
    /// object no avatar referenced for `gc.grace_hours`) or a lost object.
    pub fn forget_all(&self) {
        self.state.lock().expect("writer lock").known.clear();
    }

    /// Stores an image under its content key unless it is already there.
    /// Existence is checked instead of conditional puts: several S3-compatible
    /// servers (Garage among them) ignore `If-None-Match: *` on PutObject.
    pub async fn store_image(
        &self,
        sha256: &str,
        format: ImageFormat,
        bytes: Bytes,
    ) -> Result<StoredObject, StoreError> {
        let key = object_key(self.store.prefix(), sha256, format);
        let stored = |deduplicated| StoredObject {
            url: self.store.public_url(&key),
            key: key.clone(),
            deduplicated,
        };
        // One writer per key at a time: the second waits, then finds the object.
        let key_lock = {
            let mut st = self.state.lock().expect("writer lock");
            if st.known.contains(&key) {
                return Ok(stored(true));
            }
            st.in_progress.entry(key.clone()).or_default().clone()
        };
        let result = async {
            let _guard = key_lock.lock().await;
            if self.state.lock().expect("writer lock").known.contains(&key) {
                return Ok(true);
            }
            let exists = self
                .store
                .put_if_absent(&key, bytes, format.mime(), self.observe.as_ref())
                .await?;
            self.state
                .lock()
                .expect("writer lock")
                .unsynced
                .push(key.clone());
            Ok(exists)
        }
        .await;
        {
            let mut st = self.state.lock().expect("writer lock");
            if Arc::strong_count(&key_lock) <= 2 {
                st.in_progress.remove(&key);
            }
        }
        result.map(stored)
    }
}

impl StorageSettings {
    /// Opens the configured store and checks that it is reachable.
    pub async fn open(&self) -> Result<Arc<dyn ObjectStore>, StoreError> {
        let store: Arc<dyn ObjectStore> = match self {
            StorageSettings::Fs(fs) => Arc::new(FsStore::open(fs).await?),
            StorageSettings::S3(s3) => Arc::new(S3Store::open(s3).await?),
        };
        store.ping().await?;
        Ok(store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn keys_are_content_addressed_and_sharded_by_two_hex_characters() {
        assert_eq!(
            object_key("", SHA, ImageFormat::Jpeg),
            format!("avatars/9f/{SHA}.jpg")
        );
        assert_eq!(
            object_key("prod/", SHA, ImageFormat::Webp),
            format!("prod/avatars/9f/{SHA}.webp")
        );
    }

    #[test]
    fn only_keys_of_our_own_shape_are_avatar_keys() {
        let ours = object_key("prod/", SHA, ImageFormat::Png);
        assert!(is_avatar_key("prod/", &ours));
        assert!(!is_avatar_key("", &ours), "another prefix's object");
        for other in [
            format!("prod/avatars/9f/{SHA}.exe"),
            format!("prod/avatars/00/{SHA}.jpg"),
            format!("prod/avatars/9f/{}.jpg", &SHA[..63]),
            "prod/avatars/9f/readme.txt".to_string(),
            format!("prod/backups/9f/{SHA}.jpg"),
            format!("prod/avatars/9f/sub/{SHA}.jpg"),
        ] {
            assert!(!is_avatar_key("prod/", &other), "{other}");
        }
    }

    #[test]
    fn public_urls_join_with_exactly_one_slash() {
        assert_eq!(
            join_url("https://cdn.example.com/", "/avatars/a.jpg"),
            "https://cdn.example.com/avatars/a.jpg"
        );
        assert_eq!(
            join_url("https://cdn.example.com", "avatars/a.jpg"),
            "https://cdn.example.com/avatars/a.jpg"
        );
    }
}
