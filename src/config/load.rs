//! Loading the settings: the embedded defaults, the file layer, the
//! `AVATAR_WARDEN__*` environment overlay, then validation.

use super::*;

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
        let (table, file_layer) = Self::merged(file, env)?;
        let mut settings: Settings = serde_path_to_error::deserialize(Value::Table(table))
            .map_err(|e| {
                let key = e.path().to_string();
                let message = e.into_inner().message().trim().to_string();
                // Name the file when the key came from it (the environment
                // overlay only sets known keys, and names its variable itself).
                match (file, file_layer) {
                    (Some(path), Some(layer)) if sets(&layer, &key) => ConfigError::Key {
                        path: path.to_path_buf(),
                        key,
                        message,
                    },
                    _ => ConfigError::Invalid(format!("{key}: {message}")),
                }
            })?;
        settings.resolve_secrets()?;
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

    /// The layers merged, and the file layer alone (to tell where a bad key came from).
    fn merged(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Table, Option<Table>), ConfigError> {
        let mut table: Table = DEFAULT_TOML
            .parse()
            .map_err(|e| ConfigError::parse("config/default.toml (embedded)", DEFAULT_TOML, &e))?;
        let mut file_layer = None;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let layer: Table = text
                .parse()
                .map_err(|e| ConfigError::parse(path, &text, &e))?;
            merge(&mut table, layer.clone());
            file_layer = Some(layer);
        }
        let mut vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        vars.sort();
        for (var, raw) in vars {
            apply_env(&mut table, &var, &raw)?;
        }
        Ok((table, file_layer))
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

/// Whether `layer` sets the dotted `key` (`fetch.concurrency`, `sink[0].url`) or a table holding it.
fn sets(layer: &Table, key: &str) -> bool {
    let mut here = Some(layer);
    let mut found = false;
    for part in key.split('.') {
        let (name, index) = match part.split_once('[') {
            Some((n, i)) => (n, i.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let Some(table) = here else {
            break;
        };
        let mut value = table.get(name);
        if let (Some(Value::Array(items)), Some(i)) = (value, index) {
            value = items.get(i);
        }
        match value {
            Some(Value::Table(t)) => {
                found = true;
                here = Some(t);
            }
            Some(_) => return true,
            None => return false,
        }
    }
    found
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
