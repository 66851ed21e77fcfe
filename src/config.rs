//! Layered configuration: the embedded `config/default.toml`, then one file
//! (`--config FILE`, or `config/$AVATAR_WARDEN_ENV.toml`), then environment
//! variables `AVATAR_WARDEN__<SECTION>__<KEY>`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

pub use crate::secret::{REDACTED, Secret, SecretUrl, redact_url};
use toml::{Table, Value};

/// Compiled in so the binary runs with documented defaults from any directory.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");
pub const ENV_PREFIX: &str = "AVATAR_WARDEN__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration file {}{}: invalid TOML: {message}", path.display(), at.map(|(l, c)| format!(", line {l}, column {c}")).unwrap_or_default())]
    Parse {
        path: PathBuf,
        /// Line and column (1-based) where the parser stopped.
        at: Option<(usize, usize)>,
        message: String,
    },
    /// A key the file sets that the settings do not have, or a value of the wrong kind.
    #[error("configuration file {}, {}: {message}", path.display(), section_of(key))]
    Key {
        path: PathBuf,
        /// Dotted, as `fetch.concurrency` or `sink[0].url`.
        key: String,
        message: String,
    },
    #[error("{key}: cannot read secret file {}: {source}", path.display())]
    SecretFile {
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// How a dotted key path reads to someone editing the file.
fn section_of(key: &str) -> String {
    // A path ending in an index is the array table itself (serde reports a
    // bad key inside a `[[sink]]` at the table); otherwise the last part is the key.
    let table = if key.ends_with(']') {
        Some(key)
    } else {
        key.rsplit_once('.').map(|(t, _)| t)
    };
    match table {
        Some(t) => match t.rsplit_once('[') {
            Some((name, i)) => {
                let n = i
                    .trim_end_matches(']')
                    .parse::<usize>()
                    .map_or(0, |i| i + 1);
                format!("[[{name}]] table #{n}")
            }
            None => format!("section [{t}]"),
        },
        None => "top level".to_string(),
    }
}

impl ConfigError {
    /// A TOML syntax error in `text` (read from `path`), with the line and
    /// column it was found at.
    pub fn parse(path: impl Into<PathBuf>, text: &str, e: &toml::de::Error) -> Self {
        let at = e.span().map(|span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            (line, column)
        });
        ConfigError::Parse {
            path: path.into(),
            at,
            message: e.message().trim().to_string(),
        }
    }

    /// Configuration never heals by itself.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub profile: ProfileSettings,
    pub scan: ScanSettings,
    pub fetch: FetchSettings,
    pub media: MediaSettings,
    pub recheck: RecheckSettings,
    pub storage: StorageSettings,
    pub schedule: ScheduleSettings,
    pub metrics: MetricsSettings,
    pub shutdown: ShutdownSettings,
    pub log: LogSettings,
    pub retry: RetrySettings,
    pub expiry: ExpirySettings,
    pub reauth: ReauthSettings,
    pub providers: ProvidersSettings,
    pub outbox: OutboxSettings,
    pub gc: GcSettings,
    /// Where verdicts go besides the state table: `[[sink]]` tables.
    #[serde(default)]
    pub sink: Vec<SinkSettings>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    pub in_run: u32,
    pub backoff_ms: u64,
    pub retry_after_cap_secs: u64,
    pub max_attempts: i64,
    /// The most one avatar may spend in requests and waits within a scan.
    pub budget_secs: u64,
}

impl RetrySettings {
    pub fn budget(&self) -> Duration {
        Duration::from_secs(self.budget_secs.max(1))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpirySettings {
    pub confirmations: i64,
    pub min_interval_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenMirrorExists {
    Flag,
    Keep,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReauthSettings {
    pub when_mirror_exists: WhenMirrorExists,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProvidersSettings {
    #[serde(deserialize_with = "empty_is_none")]
    pub file: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileSettings {
    /// May carry a password: printed redacted.
    pub url: SecretUrl,
    pub table: String,
    pub id_column: String,
    pub avatar_column: String,
    #[serde(deserialize_with = "empty_is_none")]
    pub mirror_url_column: Option<String>,
    #[serde(deserialize_with = "empty_is_none")]
    pub reauth_column: Option<String>,
    /// SQL condition on the profile table, from the operator (trusted).
    #[serde(deserialize_with = "empty_is_none")]
    pub filter: Option<String>,
    /// 0: the backend's default (1 for SQLite, 8 for a server).
    pub max_connections: u32,
    pub connect_timeout_secs: u64,
    pub statement_timeout_secs: u64,
}

impl ProfileSettings {
    pub fn statement_timeout(&self) -> Duration {
        Duration::from_secs(self.statement_timeout_secs.max(1))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScanSettings {
    pub batch_size: usize,
    pub lease_secs: u64,
    /// A finished result waits at most this long before it is written.
    pub flush_secs: f64,
}

impl ScanSettings {
    pub fn flush(&self) -> Duration {
        Duration::from_secs_f64(self.flush_secs.clamp(0.05, 3600.0))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FetchSettings {
    pub timeout_secs: u64,
    pub connect_timeout_secs: u64,
    pub max_bytes: u64,
    pub concurrency: usize,
    pub max_redirects: usize,
    pub allow_private_networks: bool,
    #[serde(deserialize_with = "empty_is_none")]
    pub user_agent: Option<String>,
    pub per_host_concurrency: usize,
    pub per_host_min_interval_ms: u64,
    pub allowed_ports: Vec<u16>,
    pub allowed_hosts: Vec<String>,
    pub denied_hosts: Vec<String>,
    /// May carry credentials (`http://user:pw@proxy:3128`).
    #[serde(deserialize_with = "empty_url_is_none")]
    pub proxy: Option<SecretUrl>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    Structure,
    Decode,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MediaSettings {
    pub verify: VerifyMode,
    pub max_width: u32,
    pub max_height: u32,
    pub max_pixels: u64,
    pub max_frames: u32,
    pub strip_metadata: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RecheckSettings {
    pub mirrored_secs: u64,
    pub failing_initial_secs: u64,
    pub failing_max_secs: u64,
}

/// Which object store mirrors go to; each variant builds its own store.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StorageSettings {
    Fs(FsSettings),
    S3(S3Settings),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct FsSettings {
    pub root: PathBuf,
    #[serde(deserialize_with = "empty_is_none")]
    pub public_base_url: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct S3Settings {
    pub bucket: String,
    /// May carry credentials in its user-info or query.
    #[serde(deserialize_with = "empty_url_is_none")]
    pub endpoint: Option<SecretUrl>,
    pub region: String,
    pub force_path_style: bool,
    pub prefix: String,
    #[serde(deserialize_with = "empty_is_none")]
    pub public_base_url: Option<String>,
    #[serde(deserialize_with = "empty_secret_is_none")]
    pub access_key_id: Option<Secret>,
    #[serde(deserialize_with = "empty_secret_is_none")]
    pub secret_access_key: Option<Secret>,
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSettings {
    pub cron: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    pub listen: String,
    /// Pushgateway grouping key `job` for `scan --pushgateway`.
    pub push_job: String,
    /// Grouping key `instance`; empty: the shard (`0-of-4`) or `all`.
    pub push_instance: String,
    pub push_timeout_secs: u64,
}

/// `gc`: removal of objects no avatar references.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GcSettings {
    /// Only objects last written longer ago than this are deleted.
    pub grace_hours: u64,
}

/// The delivery loop that drains the outbox to the sinks.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxSettings {
    pub poll_interval_ms: u64,
    pub batch_size: usize,
    /// Deliveries in flight per sink.
    pub concurrency: usize,
    pub max_attempts: i64,
    pub backoff_initial_secs: u64,
    pub backoff_max_secs: u64,
    /// How long `scan` keeps delivering after its last avatar.
    pub drain_secs: u64,
    pub lease_secs: u64,
}

/// One `[[sink]]` table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SinkSettings {
    /// The profile table's write-back columns (`profile.mirror_url_column`,
    /// `profile.reauth_column`), written in the verdict's transaction.
    Sql,
    Openim(OpenImSettings),
    Yunxin(YunxinSettings),
    Webhook(WebhookSettings),
}

/// What an IM sink does when the avatar is gone (`expired`/`invalid`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExpired {
    /// Leave the IM profile alone (it keeps the last mirror, if any).
    #[default]
    Keep,
    /// Set the avatar to the empty string.
    Clear,
}

fn default_timeout() -> u64 {
    10
}

fn default_openim_admin() -> String {
    "imAdmin".into()
}

fn default_yunxin_base() -> SecretUrl {
    "https://api.netease.im/nimserver".into()
}

fn default_signature_header() -> String {
    "X-Avatar-Warden-Signature".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OpenImSettings {
    /// Outbox and metrics label; defaults to the kind.
    pub name: Option<String>,
    /// `http://openim-api:10002`
    pub api: SecretUrl,
    /// `secret` of OpenIM's share.yml (or `env:VAR`).
    pub secret: Secret,
    #[serde(default = "default_openim_admin")]
    pub admin_user_id: String,
    #[serde(default)]
    pub on_expired: OnExpired,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct YunxinSettings {
    pub name: Option<String>,
    #[serde(default = "default_yunxin_base")]
    pub base_url: SecretUrl,
    pub app_key: String,
    /// AppSecret (or `env:VAR`).
    pub app_secret: Secret,
    #[serde(default)]
    pub on_expired: OnExpired,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    pub name: Option<String>,
    /// May carry a token in its query: printed redacted, logged without query.
    pub url: SecretUrl,
    /// HMAC-SHA256 key (or `env:VAR`).
    pub secret: Secret,
    /// Event types to send; empty = all.
    #[serde(default)]
    pub events: Vec<String>,
    #[serde(default = "default_signature_header")]
    pub signature_header: String,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

impl SinkSettings {
    pub fn kind(&self) -> &'static str {
        match self {
            SinkSettings::Sql => "sql",
            SinkSettings::Openim(_) => "openim",
            SinkSettings::Yunxin(_) => "yunxin",
            SinkSettings::Webhook(_) => "webhook",
        }
    }

    /// The sink's name in the outbox, `status` and metrics.
    pub fn name(&self) -> String {
        let named = match self {
            SinkSettings::Sql => None,
            SinkSettings::Openim(s) => s.name.clone(),
            SinkSettings::Yunxin(s) => s.name.clone(),
            SinkSettings::Webhook(s) => s.name.clone(),
        };
        named.unwrap_or_else(|| self.kind().to_string())
    }
}

/// A secret value given by reference: `env:VAR` is read from the
/// environment, `file:/path` from a file (a Kubernetes secret volume, a
/// Docker secret; one trailing newline is dropped, as editors and
/// `kubectl create secret --from-file` leave one). Anything else is the
/// value itself. Errors name the key and the variable or path, never a value.
fn dereference(key: &str, raw: &str) -> Result<Option<String>, ConfigError> {
    if let Some(var) = raw.strip_prefix("env:") {
        return std::env::var(var).map(Some).map_err(|_| {
            ConfigError::Invalid(format!("{key}: environment variable {var} is not set"))
        });
    }
    if let Some(path) = raw.strip_prefix("file:") {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
            key: key.to_string(),
            path: PathBuf::from(path),
            source,
        })?;
        let value = text.strip_suffix('\n').unwrap_or(&text);
        return Ok(Some(value.strip_suffix('\r').unwrap_or(value).to_string()));
    }
    Ok(None)
}

fn resolve_secret(key: &str, secret: &mut Secret) -> Result<(), ConfigError> {
    if let Some(value) = dereference(key, secret.expose())? {
        *secret = Secret::from(value);
    }
    Ok(())
}

fn resolve_url(key: &str, url: &mut SecretUrl) -> Result<(), ConfigError> {
    if let Some(value) = dereference(key, url.expose())? {
        *url = SecretUrl::from(value);
    }
    Ok(())
}

impl Settings {
    /// Replaces every `env:`/`file:` reference among the secret-bearing
    /// keys by what it points at, once, at load.
    pub(crate) fn resolve_secrets(&mut self) -> Result<(), ConfigError> {
        resolve_url("profile.url", &mut self.profile.url)?;
        if let Some(proxy) = &mut self.fetch.proxy {
            resolve_url("fetch.proxy", proxy)?;
        }
        if let StorageSettings::S3(s3) = &mut self.storage {
            if let Some(endpoint) = &mut s3.endpoint {
                resolve_url("storage.endpoint", endpoint)?;
            }
            if let Some(id) = &mut s3.access_key_id {
                resolve_secret("storage.access_key_id", id)?;
            }
            if let Some(key) = &mut s3.secret_access_key {
                resolve_secret("storage.secret_access_key", key)?;
            }
        }
        for (i, sink) in self.sink.iter_mut().enumerate() {
            let at = |field: &str| format!("sink[{i}].{field}");
            match sink {
                SinkSettings::Sql => {}
                SinkSettings::Openim(s) => {
                    resolve_url(&at("api"), &mut s.api)?;
                    resolve_secret(&at("secret"), &mut s.secret)?;
                }
                SinkSettings::Yunxin(s) => {
                    resolve_url(&at("base_url"), &mut s.base_url)?;
                    resolve_secret(&at("app_secret"), &mut s.app_secret)?;
                }
                SinkSettings::Webhook(s) => {
                    resolve_url(&at("url"), &mut s.url)?;
                    resolve_secret(&at("secret"), &mut s.secret)?;
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    /// After SIGTERM, how long avatars in flight may take to finish.
    pub grace_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
}

fn empty_is_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    Ok(s.filter(|s| !s.trim().is_empty()))
}

fn empty_secret_is_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    Ok(empty_is_none(d)?.map(Secret::from))
}

fn empty_url_is_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SecretUrl>, D::Error> {
    Ok(empty_is_none(d)?.map(SecretUrl::from))
}

mod load;

pub use load::{PROXY_SCHEMES, parse_proxy};

#[cfg(test)]
mod tests;
