use std::path::PathBuf;
use std::sync::Once;

use avatar_warden::config::Settings;
use avatar_warden::db::{AvatarRecord, UserId};
use avatar_warden::demo::{self, Origin, OriginOptions};
use avatar_warden::pipeline::{self, Deps, ScanOptions, ScanReport};
use tokio_util::sync::CancellationToken;

/// Logs print only with TEST_LOG=1.
pub fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
                .with_test_writer()
                .try_init();
        }
    });
}

pub struct TestApp {
    pub dir: tempfile::TempDir,
    pub origin: Origin,
    pub db_url: String,
    /// The overrides that make up this app's configuration, usable as the
    /// environment of the real binary too.
    pub env: Vec<(String, String)>,
}

impl TestApp {
    /// A profile table of the demo's sample users, write-back columns configured.
    pub async fn spawn() -> TestApp {
        let app = Self::empty().await;
        demo::seed_profiles(&app.db_url, &app.origin).await.unwrap();
        app
    }

    /// Database, origin and settings, but no profile table yet.
    pub async fn empty() -> TestApp {
        Self::with_origin(OriginOptions::default()).await
    }

    pub async fn with_origin(options: OriginOptions) -> TestApp {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let origin = Origin::spawn(options).await.unwrap();
        let db_url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("profiles.db").display()
        );
        let env = vec![
            ("AVATAR_WARDEN__PROFILE__URL".into(), db_url.clone()),
            (
                "AVATAR_WARDEN__PROFILE__MIRROR_URL_COLUMN".into(),
                "avatar_mirror_url".into(),
            ),
            (
                "AVATAR_WARDEN__PROFILE__REAUTH_COLUMN".into(),
                "avatar_reauth_required".into(),
            ),
            (
                "AVATAR_WARDEN__STORAGE__ROOT".into(),
                dir.path().join("mirror").display().to_string(),
            ),
            (
                "AVATAR_WARDEN__FETCH__ALLOW_PRIVATE_NETWORKS".into(),
                "true".into(),
            ),
        ];
        TestApp {
            dir,
            origin,
            db_url,
            env,
        }
    }

    pub fn set(&mut self, key: &str, value: &str) {
        let key = format!("AVATAR_WARDEN__{key}");
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value.to_string()));
    }

    pub fn mirror_root(&self) -> PathBuf {
        self.dir.path().join("mirror")
    }

    pub fn settings(&self) -> Settings {
        Settings::from_layers(None, self.env.clone()).unwrap()
    }

    pub async fn deps(&self) -> Deps {
        avatar_warden::cli::build_deps(&self.settings())
            .await
            .unwrap()
    }

    pub async fn scan(&self) -> ScanReport {
        self.scan_with(&self.deps().await).await
    }

    pub async fn scan_with(&self, deps: &Deps) -> ScanReport {
        let s = self.settings();
        let opts = ScanOptions {
            batch_size: s.scan.batch_size,
            concurrency: s.fetch.concurrency,
            shutdown: CancellationToken::new(),
        };
        pipeline::scan_once(deps, &opts).await.unwrap()
    }

    /// Runs SQL against the profile database (to create custom tables, change URLs...).
    pub async fn sql(&self, statements: &[&str]) {
        let pool = sqlx::SqlitePool::connect(&self.db_url).await.unwrap();
        for s in statements {
            sqlx::query(s).execute(&pool).await.unwrap();
        }
        pool.close().await;
    }

    /// The users table's write-back columns for one id.
    pub async fn profile(&self, id: i64) -> (Option<String>, bool) {
        let pool = sqlx::SqlitePool::connect(&self.db_url).await.unwrap();
        let row: (Option<String>, bool) = sqlx::query_as(
            "SELECT avatar_mirror_url, avatar_reauth_required FROM users WHERE id = ?",
        )
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
        pool.close().await;
        row
    }

    /// Every recorded state row.
    pub async fn states(&self) -> Vec<AvatarRecord> {
        let db = self.settings().profile.connect().await.unwrap();
        db.export_page(None, 10_000).await.unwrap()
    }

    pub async fn state(&self, user_id: &str) -> AvatarRecord {
        self.states()
            .await
            .into_iter()
            .find(|r| r.user_id == UserId::Text(user_id.into()))
            .unwrap_or_else(|| panic!("no state row for user {user_id}"))
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
