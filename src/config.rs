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
    #[error("configuration file {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl ConfigError {
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

/// A secret given as `env:VAR` is read from the environment (Kubernetes
/// secrets arrive that way); anything else is the secret itself.
pub fn resolve_secret(secret: &Secret) -> Result<Secret, ConfigError> {
    match secret.expose().strip_prefix("env:") {
        Some(var) => std::env::var(var)
            .map(Secret::from)
            .map_err(|_| ConfigError::Invalid(format!("sink secret: ${var} is not set"))),
        None => Ok(secret.clone()),
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

impl Settings {
    /// Loads the layers from the real process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::from_layers(Self::file_layer(file).as_deref(), std::env::vars())
    }

    /// The file layer: `--config FILE`, else `config/$AVATAR_WARDEN_ENV.toml`.
    pub fn file_layer(file: Option<&Path>) -> Option<PathBuf> {
        let env_file = std::env::var("AVATAR_WARDEN_ENV")
            .ok()
            .filter(|e| !e.is_empty())
            .map(|e| PathBuf::from(format!("config/{e}.toml")));
        file.map(Path::to_path_buf).or(env_file)
    }

    /// The pure core of `load`, so tests can pass their own environment.
    pub fn from_layers(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let table = Self::merged(file, env)?;
        let settings: Settings = Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.message().to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// The effective configuration as TOML with every secret redacted (the
    /// secret types serialize as `REDACTED`), for `avatar-warden config`.
    /// Fails exactly when loading would.
    pub fn redacted_toml(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<String, ConfigError> {
        let settings = Self::from_layers(file, env)?;
        toml::to_string_pretty(&settings).map_err(|e| ConfigError::Invalid(e.to_string()))
    }

    fn merged(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Table, ConfigError> {
        let mut table: Table =
            DEFAULT_TOML
                .parse()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: "config/default.toml (embedded)".into(),
                    message: e.to_string(),
                })?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let layer: Table = text
                .parse()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: e.message().to_string(),
                })?;
            merge(&mut table, layer);
        }
        let mut vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        vars.sort();
        for (var, raw) in vars {
            apply_env(&mut table, &var, &raw)?;
        }
        Ok(table)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        let mut names = std::collections::HashSet::new();
        for sink in &self.sink {
            if !names.insert(sink.name()) {
                return bad(&format!(
                    "two [[sink]] tables are named {:?}: give one a `name`",
                    sink.name()
                ));
            }
            if matches!(sink, SinkSettings::Sql)
                && self.profile.mirror_url_column.is_none()
                && self.profile.reauth_column.is_none()
            {
                return bad(
                    "[[sink]] kind = \"sql\" writes profile.mirror_url_column / profile.reauth_column: set at least one",
                );
            }
        }
        if self.outbox.batch_size == 0 || self.outbox.concurrency == 0 {
            return bad("outbox.batch_size and outbox.concurrency must be at least 1");
        }
        if self.scan.batch_size == 0 {
            return bad("scan.batch_size must be at least 1");
        }
        if self.scan.lease_secs < self.fetch.timeout_secs.saturating_mul(2) {
            // A lease shorter than a slow fetch would be taken over while the fetch still runs.
            return bad("scan.lease_secs must be at least twice fetch.timeout_secs");
        }
        if self.fetch.concurrency == 0 {
            return bad("fetch.concurrency must be at least 1");
        }
        if self.expiry.confirmations < 1 {
            return bad("expiry.confirmations must be at least 1");
        }
        if self.fetch.per_host_concurrency == 0 {
            return bad("fetch.per_host_concurrency must be at least 1");
        }
        if self.fetch.max_bytes == 0 {
            return bad("fetch.max_bytes must be at least 1");
        }
        if let Some(proxy) = &self.fetch.proxy {
            parse_proxy(proxy.expose()).map_err(ConfigError::Invalid)?;
        }
        if let StorageSettings::S3(s3) = &self.storage
            && let Some(endpoint) = &s3.endpoint
        {
            // The SDK quotes its endpoint in errors, and S3 takes credentials
            // from access keys only: an endpoint must not carry any.
            let ok = url::Url::parse(endpoint.expose()).is_ok_and(|u| {
                u.username().is_empty() && u.password().is_none() && u.query().is_none()
            });
            if !ok {
                return bad(
                    "storage.endpoint must be a plain http(s) URL without user-info or query \
                     (credentials go in storage.access_key_id / storage.secret_access_key)",
                );
            }
        }
        if let StorageSettings::S3(s3) = &self.storage
            && s3.bucket.trim().is_empty()
        {
            return bad("storage.bucket is required when storage.kind = \"s3\"");
        }
        Ok(())
    }
}

/// Proxy schemes reqwest speaks (with its `socks` feature). `socks5`
/// resolves names here, through the guard; `socks5h` lets the proxy resolve.
pub const PROXY_SCHEMES: &[&str] = &["http", "https", "socks4", "socks4a", "socks5", "socks5h"];

/// Checks `fetch.proxy` at start-up: a proxy that cannot work is refused
/// before the first avatar, never discovered by every fetch failing.
pub fn parse_proxy(raw: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(raw.trim()).map_err(|e| format!("fetch.proxy is not a URL: {e}"))?;
    if !PROXY_SCHEMES.contains(&url.scheme()) {
        return Err(format!(
            "fetch.proxy scheme {:?} is not supported (use one of {})",
            url.scheme(),
            PROXY_SCHEMES.join(", ")
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("fetch.proxy has no host".into());
    }
    Ok(url)
}

/// Deep merge: tables merge key by key, anything else is replaced.
fn merge(base: &mut Table, layer: Table) {
    for (key, value) in layer {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(b)), Value::Table(l)) => merge(b, l),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

/// Environment values are text; they take the type of the key they replace,
/// so `AVATAR_WARDEN__STORAGE__BUCKET=123` stays a string and `..._CONCURRENCY=64` a number.
fn apply_env(table: &mut Table, var: &str, raw: &str) -> Result<(), ConfigError> {
    let err = |message: String| ConfigError::Env {
        var: var.to_string(),
        message,
    };
    let path: Vec<String> = var[ENV_PREFIX.len()..]
        .split("__")
        .map(str::to_ascii_lowercase)
        .collect();
    let [section, key] = path.as_slice() else {
        return Err(err(
            "expected AVATAR_WARDEN__<SECTION>__<KEY>, e.g. AVATAR_WARDEN__PROFILE__URL".into(),
        ));
    };
    let Some(Value::Table(section_table)) = table.get_mut(section) else {
        return Err(err(format!("unknown configuration section [{section}]")));
    };
    let Some(current) = section_table.get(key) else {
        return Err(err(format!("unknown configuration key {section}.{key}")));
    };
    let value = match current {
        Value::String(_) => Value::String(raw.to_string()),
        Value::Integer(_) => Value::Integer(
            raw.trim()
                .parse()
                .map_err(|_| err(format!("expected a whole number, got {raw:?}")))?,
        ),
        Value::Float(_) => Value::Float(
            raw.trim()
                .parse()
                .map_err(|_| err(format!("expected a number, got {raw:?}")))?,
        ),
        Value::Boolean(_) => Value::Boolean(match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => return Err(err(format!("expected true or false, got {raw:?}"))),
        }),
        _ => {
            let parsed: Table = format!("v = {raw}")
                .parse()
                .map_err(|e: toml::de::Error| err(e.message().to_string()))?;
            parsed["v"].clone()
        }
    };
    section_table.insert(key.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests;
