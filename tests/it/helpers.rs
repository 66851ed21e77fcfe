use std::path::PathBuf;
use std::sync::Once;

use avatar_warden::app::{App, ScanReport};
use avatar_warden::config::Settings;
use avatar_warden::db::{AvatarRecord, UserId};
use avatar_warden::demo::{Origin, OriginOptions, SAMPLE_USERS};
use sqlx::any::AnyPoolOptions;
use tokio_util::sync::CancellationToken;

/// Logs print only with TEST_LOG=1.
pub fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        sqlx::any::install_default_drivers();
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
                .with_test_writer()
                .try_init();
        }
    });
}

/// The profile databases the suite runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    MySql,
}

impl Backend {
    fn env_var(self) -> Option<&'static str> {
        match self {
            Backend::Sqlite => None,
            Backend::Postgres => Some("AVATAR_WARDEN_TEST_POSTGRES_URL"),
            Backend::MySql => Some("AVATAR_WARDEN_TEST_MYSQL_URL"),
        }
    }

    /// SQL types for test tables.
    pub fn text_key(self) -> &'static str {
        match self {
            Backend::MySql => "VARCHAR(64)",
            _ => "TEXT",
        }
    }

    pub fn boolean(self) -> &'static str {
        match self {
            Backend::Sqlite => "INTEGER",
            _ => "BOOLEAN",
        }
    }

    pub fn false_literal(self) -> &'static str {
        match self {
            Backend::Sqlite => "0",
            _ => "FALSE",
        }
    }
}

/// Marks the running test as skipped for want of `missing`, which `how`
/// installs or starts: a failure under CI; elsewhere said on stderr and
/// recorded in `$AVATAR_WARDEN_TEST_SKIP_LOG` (one line per test) for the
/// summary `scripts/test` prints. Returns nothing: the caller returns early.
pub fn skip(missing: &str, how: &str) {
    assert!(
        !std::env::var("CI").is_ok_and(|v| v == "true"),
        "{missing} is missing: CI must run this test ({how})"
    );
    eprintln!("skipped: {missing} ({how})");
    if let Some(path) = std::env::var_os("AVATAR_WARDEN_TEST_SKIP_LOG") {
        use std::io::Write;
        // libtest names each test's thread after the test.
        let test = std::thread::current()
            .name()
            .unwrap_or("unknown test")
            .to_string();
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            // One write per line: parallel tests append to the same file.
            let _ = f.write_all(format!("{test}\t{missing}\t{how}\n").as_bytes());
        }
    }
}

/// The base URL of a server backend, or `None` (skip) when it is not configured.
/// Under CI a missing service is a failure, never a skip.
pub fn server_url(backend: Backend) -> Option<String> {
    let var = backend.env_var()?;
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            let how = match backend {
                Backend::Postgres => "run scripts/test, which starts PostgreSQL and sets it",
                _ => "run scripts/test, which starts MariaDB and sets it",
            };
            skip(&format!("{backend:?} ({var} is not set)"), how);
            None
        }
    }
}

/// A tool from the PATH; skipped with a reason (and how to install it) when
/// missing, a failure under CI.
pub fn tool(name: &str, install: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        skip(name, install);
    }
    found
}

/// A database of its own for one test, dropped afterwards.
pub struct TestDb {
    pub url: String,
    admin: Option<(String, String)>,
}

impl TestDb {
    async fn create(backend: Backend, dir: &std::path::Path) -> Option<TestDb> {
        let name = format!("aw_test_{:016x}", rand::random::<u64>());
        match backend {
            Backend::Sqlite => Some(TestDb {
                url: format!("sqlite://{}?mode=rwc", dir.join("profiles.db").display()),
                admin: None,
            }),
            Backend::Postgres | Backend::MySql => {
                let base = server_url(backend)?;
                let admin = AnyPoolOptions::new()
                    .max_connections(1)
                    .connect(&base)
                    .await
                    .unwrap();
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&admin)
                    .await
                    .unwrap();
                admin.close().await;
                let (prefix, _) = base.rsplit_once('/').expect("URL with a database path");
                Some(TestDb {
                    url: format!("{prefix}/{name}"),
                    admin: Some((base, name)),
                })
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((base, name)) = self.admin.take() else {
            return;
        };
        // Drop runs outside async: a short-lived runtime on its own thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(admin) = AnyPoolOptions::new()
                    .max_connections(1)
                    .connect(&base)
                    .await
                {
                    let force = if base.starts_with("postgres") {
                        " WITH (FORCE)"
                    } else {
                        ""
                    };
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name}{force}"))
                        .execute(&admin)
                        .await;
                    admin.close().await;
                }
            });
        })
        .join();
    }
}

pub struct TestApp {
    pub backend: Backend,
    pub origin: Origin,
    pub db_url: String,
    /// The overrides that make up this app's configuration, usable as the
    /// environment of the real binary too.
    pub env: Vec<(String, String)>,
    /// A config file layer (for what the environment cannot say: `[[sink]]`).
    pub config_file: Option<PathBuf>,
    _db: TestDb,
    pub dir: tempfile::TempDir,
}

impl TestApp {
    /// SQLite with the demo's sample users.
    pub async fn spawn() -> TestApp {
        Self::spawn_on(Backend::Sqlite).await.unwrap()
    }

    /// The sample users on `backend`; `None` when that backend is not available here.
    pub async fn spawn_on(backend: Backend) -> Option<TestApp> {
        let app = Self::empty_on(backend, OriginOptions::default()).await?;
        app.seed_sample_users().await;
        Some(app)
    }

    /// SQLite, origin and settings, but no profile table yet.
    pub async fn empty() -> TestApp {
        Self::with_origin(OriginOptions::default()).await
    }

    pub async fn with_origin(options: OriginOptions) -> TestApp {
        Self::empty_on(Backend::Sqlite, options).await.unwrap()
    }

    pub async fn empty_on(backend: Backend, options: OriginOptions) -> Option<TestApp> {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::create(backend, dir.path()).await?;
        let origin = Origin::spawn(options).await.unwrap();
        let env = vec![
            ("AVATAR_WARDEN__PROFILE__URL".into(), db.url.clone()),
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
            // The simulated origin listens on an OS-chosen port.
            ("AVATAR_WARDEN__FETCH__ALLOWED_PORTS".into(), "[]".into()),
        ];
        Some(TestApp {
            backend,
            origin,
            db_url: db.url.clone(),
            env,
            config_file: None,
            _db: db,
            dir,
        })
    }

    /// The demo's sample users in a `users` table of this backend's dialect.
    pub async fn seed_sample_users(&self) {
        let b = self.backend;
        let mut stmts = vec![format!(
            "CREATE TABLE users (id BIGINT PRIMARY KEY, nickname {text} NOT NULL, avatar_url TEXT, \
             avatar_mirror_url TEXT, avatar_reauth_required {boolean} NOT NULL DEFAULT {f})",
            text = b.text_key(),
            boolean = b.boolean(),
            f = b.false_literal(),
        )];
        for u in SAMPLE_USERS {
            stmts.push(format!(
                "INSERT INTO users (id, nickname, avatar_url) VALUES ({}, {}, {})",
                u.id,
                sql_string(u.nickname),
                u.avatar_url(&self.origin)
                    .as_deref()
                    .map_or("NULL".into(), sql_string)
            ));
        }
        self.sql(&stmts.iter().map(String::as_str).collect::<Vec<_>>())
            .await;
    }

    /// A `users` table holding exactly these (id, avatar URL) rows.
    pub async fn users(&self, rows: &[(i64, String)]) {
        let b = self.backend;
        let mut stmts = vec![format!(
            "CREATE TABLE users (id BIGINT PRIMARY KEY, avatar_url TEXT, avatar_mirror_url TEXT, \
             avatar_reauth_required {} NOT NULL DEFAULT {})",
            b.boolean(),
            b.false_literal()
        )];
        // Several hundred rows per statement: well inside every server's limits.
        for chunk in rows.chunks(500) {
            let values: Vec<String> = chunk
                .iter()
                .map(|(id, url)| format!("({id}, {})", sql_string(url)))
                .collect();
            stmts.push(format!(
                "INSERT INTO users (id, avatar_url) VALUES {}",
                values.join(", ")
            ));
        }
        self.sql(&stmts.iter().map(String::as_str).collect::<Vec<_>>())
            .await;
    }

    /// An app whose profile table holds users 1..=`n`, user `i`'s avatar at
    /// the origin's `<path>u<i>`, with the worker's tables created.
    pub async fn numbered_users(backend: Backend, n: i64, path: &str) -> Option<TestApp> {
        let app = TestApp::empty_on(backend, Default::default()).await?;
        let rows: Vec<(i64, String)> = (1..=n)
            .map(|i| (i, app.origin.url(&format!("{path}u{i}"))))
            .collect();
        app.users(&rows).await;
        drop(app.deps().await);
        Some(app)
    }

    /// Provider rules of the test's own (e.g. for the origin's host), used by the app.
    pub fn provider_rules(&mut self, toml: &str) {
        let path = self.dir.path().join("providers.toml");
        std::fs::write(&path, toml).unwrap();
        self.set("PROVIDERS__FILE", path.to_str().unwrap());
    }

    /// A config file for this app (e.g. `[[sink]]` tables).
    pub fn config_toml(&mut self, toml: &str) {
        let path = self.dir.path().join("config.toml");
        std::fs::write(&path, toml).unwrap();
        self.config_file = Some(path);
    }

    /// Makes every scheduled re-check due now ("time passes").
    pub async fn time_passes(&self) {
        self.sql(&[
            "UPDATE avatar_warden_avatars SET next_check_at = 0 WHERE next_check_at IS NOT NULL",
        ])
        .await;
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
        Settings::from_layers(self.config_file.as_deref(), self.env.clone()).unwrap()
    }

    /// The worker wired from this app's settings, as the commands wire it.
    pub async fn deps(&self) -> App {
        avatar_warden::app::App::build(&self.settings())
            .await
            .unwrap()
    }

    pub async fn scan(&self) -> ScanReport {
        self.scan_with(&self.deps().await).await
    }

    pub async fn scan_with(&self, deps: &App) -> ScanReport {
        let opts = avatar_warden::app::ScanOptions::from_settings(
            &self.settings(),
            CancellationToken::new(),
        );
        deps.scan(&opts).await.unwrap()
    }

    async fn pool(&self) -> sqlx::AnyPool {
        AnyPoolOptions::new()
            .max_connections(1)
            .connect(&self.db_url)
            .await
            .unwrap()
    }

    /// Runs SQL against the profile database (to create tables, change URLs...).
    pub async fn sql(&self, statements: &[&str]) {
        let pool = self.pool().await;
        for s in statements {
            sqlx::query(s)
                .execute(&pool)
                .await
                .unwrap_or_else(|e| panic!("{s}: {e}"));
        }
        pool.close().await;
    }

    /// One text value (or NULL) from a query.
    pub async fn text(&self, sql: &str) -> Option<String> {
        let pool = self.pool().await;
        let row = sqlx::query(sql).fetch_one(&pool).await.unwrap();
        pool.close().await;
        use sqlx::Row;
        // MySQL hands long text to the Any driver as BLOB.
        row.try_get::<Option<String>, _>(0).unwrap_or_else(|_| {
            let bytes: Option<Vec<u8>> = row.try_get(0).unwrap();
            bytes.map(|b| String::from_utf8(b).unwrap())
        })
    }

    /// The users table's write-back columns for one id.
    pub async fn profile(&self, id: i64) -> (Option<String>, bool) {
        let mirror = self
            .text(&format!(
                "SELECT avatar_mirror_url FROM users WHERE id = {id}"
            ))
            .await;
        let flag = self
            .text(&format!(
                "SELECT CASE WHEN avatar_reauth_required THEN 'yes' ELSE 'no' END FROM users WHERE id = {id}"
            ))
            .await;
        (mirror, flag.as_deref() == Some("yes"))
    }

    /// Every recorded state row.
    pub async fn states(&self) -> Vec<AvatarRecord> {
        let db = self.settings().profile.connect().await.unwrap();
        db.export_page(None, 100_000).await.unwrap()
    }

    /// The object keys the state table points at.
    pub async fn object_keys(&self) -> Vec<String> {
        self.states()
            .await
            .into_iter()
            .filter_map(|r| r.object_key)
            .collect()
    }

    pub async fn state(&self, user_id: &str) -> AvatarRecord {
        self.states()
            .await
            .into_iter()
            .find(|r| r.user_id == UserId::Text(user_id.into()))
            .unwrap_or_else(|| panic!("no state row for user {user_id}"))
    }
}

/// A SQL string literal (test data only).
/// Sets a file's modification time `age` into the past (an object stored long ago).
pub fn backdate(path: &std::path::Path, age: std::time::Duration) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - age)
        .unwrap();
}

pub fn sql_string(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Runs each named `async fn(Backend)` once per backend, as its own test.
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::helpers::Backend::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::helpers::Backend::Postgres).await })*
        }
        mod mysql {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::helpers::Backend::MySql).await })*
        }
    };
}
