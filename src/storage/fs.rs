//! A local directory as object store: the embedded default, and what a
//! volume behind nginx needs.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use super::{ObjectStore, StoreError, join_url};
use crate::config::FsSettings;

pub struct FsStore {
    root: PathBuf,
    base_url: String,
}

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
                .map_err(|_| {
                    StoreError::Config(format!("cannot make a file URL of {}", root.display()))
                })?
                .to_string(),
        };
        Ok(FsStore { root, base_url })
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
        Ok(tokio::fs::try_exists(self.path(key)).await?)
    }

    async fn put(&self, key: &str, body: Bytes, _content_type: &str) -> Result<(), StoreError> {
        let path = self.path(key);
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        // Write aside and rename: readers never see half an object, and two
        // writers of the same key both end with the same complete file.
        let tmp = self.root.join(TMP_DIR).join(format!(
            "{}-{}-{:016x}",
            key.replace('/', "_"),
            std::process::id(),
            rand::random::<u64>()
        ));
        let mut file = tokio::fs::File::create(&tmp).await?;
        file.write_all(&body).await?;
        file.sync_data().await?;
        drop(file);
        if let Err(e) = tokio::fs::rename(&tmp, &path).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e.into());
        }
        Ok(())
    }

    fn public_url(&self, key: &str) -> String {
        join_url(&self.base_url, key)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        tokio::fs::metadata(&self.root).await?;
        Ok(())
    }

    fn prefix(&self) -> &str {
        ""
    }
}

async fn remove_stale_temp_files(dir: &Path) {
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let stale = entry
            .metadata()
            .await
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_TMP);
        if stale {
            let _ = tokio::fs::remove_file(entry.path()).await;
        }
    }
}
