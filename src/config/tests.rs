use super::*;

#[test]
fn secrets_can_come_from_the_environment_or_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db-url");
    std::fs::write(&db, "postgres://app:s3cret@db:5432/app\n").unwrap();
    let hook = dir.path().join("hook-secret");
    std::fs::write(&hook, "hmac-key\r\n").unwrap();
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "[profile]\nurl = \"file:{}\"\n[storage]\nkind = \"s3\"\nbucket = \"b\"\naccess_key_id = \"env:PATH\"\nsecret_access_key = \"file:{}\"\n\n[[sink]]\nkind = \"webhook\"\nurl = \"http://hooks/\"\nsecret = \"file:{}\"\n",
            db.display(),
            hook.display(),
            hook.display()
        ),
    )
    .unwrap();
    let s = Settings::from_layers(Some(&config), env(&[])).unwrap();
    assert_eq!(s.profile.url.expose(), "postgres://app:s3cret@db:5432/app");
    let StorageSettings::S3(s3) = &s.storage else {
        panic!("s3")
    };
    assert_eq!(
        s3.access_key_id.as_ref().unwrap().expose(),
        std::env::var("PATH").unwrap()
    );
    assert_eq!(s3.secret_access_key.as_ref().unwrap().expose(), "hmac-key");
    let SinkSettings::Webhook(w) = &s.sink[0] else {
        panic!("webhook")
    };
    assert_eq!(w.secret.expose(), "hmac-key");
    // Printed, the resolved values are still secrets.
    let shown = Settings::redacted_toml(Some(&config), env(&[])).unwrap();
    assert!(
        !shown.contains("s3cret") && !shown.contains("hmac-key"),
        "{shown}"
    );

    // A reference that points nowhere names the key and the file or variable.
    std::fs::write(
        &config,
        "[[sink]]\nkind = \"webhook\"\nurl = \"http://hooks/\"\nsecret = \"file:/run/secrets/nope\"\n",
    )
    .unwrap();
    let err = Settings::from_layers(Some(&config), env(&[]))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("sink[0].secret: cannot read secret file /run/secrets/nope: "),
        "{err}"
    );
    let err = Settings::from_layers(
        None,
        env(&[("AVATAR_WARDEN__PROFILE__URL", "env:AW_NO_SUCH_VARIABLE_X")]),
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "invalid configuration: profile.url: environment variable AW_NO_SUCH_VARIABLE_X is not set"
    );
}

#[test]
fn every_default_key_is_documented_in_the_readme() {
    let readme = include_str!("../../README.md");
    let defaults: toml::Table = DEFAULT_TOML.parse().unwrap();
    let mut missing = Vec::new();
    for (section, table) in &defaults {
        for key in table.as_table().into_iter().flat_map(|t| t.keys()) {
            let name = format!("{section}.{key}");
            if !readme.contains(&format!("`{name}`")) && !readme.contains(&format!("{name}`")) {
                missing.push(name);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "README.md does not document: {missing:?}"
    );
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn embedded_defaults_load_and_are_safe() {
    let s = Settings::from_layers(None, env(&[])).unwrap();
    assert!(!s.fetch.allow_private_networks);
    assert_eq!(s.scan.batch_size, 1000);
    assert!(matches!(s.storage, StorageSettings::Fs(_)));
    assert_eq!(s.profile.mirror_url_column, None);
}

#[test]
fn environment_overrides_take_the_type_of_the_key() {
    let s = Settings::from_layers(
        None,
        env(&[
            ("AVATAR_WARDEN__FETCH__CONCURRENCY", "64"),
            ("AVATAR_WARDEN__FETCH__ALLOW_PRIVATE_NETWORKS", "true"),
            ("AVATAR_WARDEN__PROFILE__MIRROR_URL_COLUMN", "avatar_mirror"),
            ("AVATAR_WARDEN__STORAGE__KIND", "s3"),
            ("AVATAR_WARDEN__STORAGE__BUCKET", "123"),
            ("UNRELATED", "x"),
        ]),
    )
    .unwrap();
    assert_eq!(s.fetch.concurrency, 64);
    assert!(s.fetch.allow_private_networks);
    assert_eq!(
        s.profile.mirror_url_column.as_deref(),
        Some("avatar_mirror")
    );
    let StorageSettings::S3(s3) = s.storage else {
        panic!("expected s3")
    };
    assert_eq!(s3.bucket, "123");
}

#[test]
fn a_typo_in_an_environment_variable_is_a_clear_error() {
    let err = Settings::from_layers(None, env(&[("AVATAR_WARDEN__FETCH__CONCURENCY", "4")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("AVATAR_WARDEN__FETCH__CONCURENCY"), "{err}");
    assert!(
        err.contains("unknown configuration key fetch.concurency"),
        "{err}"
    );
    let err = Settings::from_layers(None, env(&[("AVATAR_WARDEN__FETCH__CONCURRENCY", "many")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("whole number"), "{err}");
}

#[test]
fn a_file_layer_overrides_defaults_and_env_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("site.toml");
    std::fs::write(
        &path,
        "[profile]\nurl = \"sqlite://x.db\"\ntable = \"members\"\n[fetch]\nconcurrency = 7\n",
    )
    .unwrap();
    let s = Settings::from_layers(
        Some(&path),
        env(&[("AVATAR_WARDEN__FETCH__CONCURRENCY", "9")]),
    )
    .unwrap();
    assert_eq!(s.profile.table, "members");
    assert_eq!(s.profile.url.expose(), "sqlite://x.db");
    assert_eq!(s.fetch.concurrency, 9);
    // Untouched keys keep their defaults.
    assert_eq!(s.profile.id_column, "id");
}

#[test]
fn unknown_keys_in_a_file_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[fetch]\ntimeout = 3\n").unwrap();
    let err = Settings::from_layers(Some(&path), env(&[]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `timeout`"), "{err}");
}

#[test]
fn s3_without_bucket_is_rejected() {
    let err = Settings::from_layers(None, env(&[("AVATAR_WARDEN__STORAGE__KIND", "s3")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("storage.bucket is required"), "{err}");
}

#[test]
fn the_container_environment_loads_production_on_top_of_defaults() {
    // What the Dockerfile sets up: WORKDIR with config/, AVATAR_WARDEN_ENV=production.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/production.toml");
    let s = Settings::from_layers(
        Some(&path),
        env(&[("AVATAR_WARDEN__STORAGE__BUCKET", "avatars")]),
    )
    .unwrap();
    assert_eq!(s.log.format, LogFormat::Json);
    let StorageSettings::S3(s3) = s.storage else {
        panic!("production stores in s3")
    };
    assert_eq!(s3.bucket, "avatars");
}

#[test]
fn the_effective_configuration_is_printed_with_secrets_redacted() {
    let text = Settings::redacted_toml(
        None,
        env(&[
            (
                "AVATAR_WARDEN__PROFILE__URL",
                "postgres://warden:hunter2@db:5432/app?sslmode=require&password=x2",
            ),
            ("AVATAR_WARDEN__STORAGE__SECRET_ACCESS_KEY", "s3cr3t-key"),
            ("AVATAR_WARDEN__STORAGE__ACCESS_KEY_ID", "AKIAEXAMPLE"),
        ]),
    )
    .unwrap();
    for secret in ["hunter2", "x2", "s3cr3t-key", "AKIAEXAMPLE"] {
        assert!(!text.contains(secret), "{secret} leaked:\n{text}");
    }
    assert!(
        text.contains("postgres://warden:REDACTED@db:5432/app?sslmode=require&password=REDACTED"),
        "{text}"
    );
    assert!(text.contains("batch_size = 1000"), "{text}");
}

#[test]
fn secrets_are_not_printed_by_debug() {
    let s = Settings::from_layers(
        None,
        env(&[("AVATAR_WARDEN__PROFILE__URL", "postgres://u:hunter2@db/app")]),
    )
    .unwrap();
    assert!(!format!("{s:?}").contains("hunter2"));
}

fn file_error(toml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("worker.toml");
    std::fs::write(&path, toml).unwrap();
    let err = Settings::from_layers(Some(&path), Vec::new()).unwrap_err();
    err.to_string()
        .replace(&path.display().to_string(), "worker.toml")
}

#[test]
fn a_toml_syntax_error_names_the_file_line_and_column() {
    let err = file_error("[profile]\nurl = \"sqlite://x.db\"\ntable = \n");
    assert!(
        err.starts_with("configuration file worker.toml, line 3, column 9: invalid TOML: "),
        "{err}"
    );
}

#[test]
fn an_unknown_or_mistyped_key_names_the_file_and_its_section() {
    let err = file_error("[fetch]\nconcurrencyy = 3\n");
    assert!(
        err.starts_with(
            "configuration file worker.toml, section [fetch]: unknown field `concurrencyy`"
        ),
        "{err}"
    );
    let err = file_error("[fetchh]\nx = 1\n");
    assert!(
        err.starts_with("configuration file worker.toml, top level: unknown field `fetchh`"),
        "{err}"
    );
    let err = file_error(
        "[[sink]]\nkind = \"webhook\"\nurl = \"http://a/\"\nsecret = \"s\"\n\n[[sink]]\nkind = \"webhook\"\nname = \"b\"\nsecret = \"s\"\nurll = \"x\"\n",
    );
    assert!(
        err.starts_with("configuration file worker.toml, [[sink]] table #2: unknown field `urll`"),
        "{err}"
    );
    let err = file_error("[[sink]]\nkind = \"webhook\"\nurl = \"http://a/\"\n");
    assert!(
        err.starts_with(
            "configuration file worker.toml, [[sink]] table #1: missing field `secret`"
        ),
        "{err}"
    );
    let err = file_error("[fetch]\nconcurrency = \"many\"\n");
    assert!(
        err.starts_with("configuration file worker.toml, section [fetch]: invalid type"),
        "{err}"
    );
}
