//! Where a [`Config`] comes from: the TOML file, then `LEADERLINK_*` environment variables laid
//! over it (flags come last, in `cli`).

use std::path::PathBuf;

use serde::Deserialize;

use super::{Config, ConfigError};

/// Sets `table[key]` from `LEADERLINK_<KEY>` for every key of `defaults` (recursing into
/// sub-tables: `dev.topics` ← `LEADERLINK_DEV_TOPICS`), parsed as the default's type.
fn overlay_env(
    table: &mut toml::Table,
    defaults: &toml::Table,
    prefix: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    for (key, default) in defaults {
        let var = format!("{prefix}{}", key.to_uppercase());
        if let toml::Value::Table(sub_defaults) = default {
            let sub = table
                .entry(key.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(sub) = sub {
                overlay_env(sub, sub_defaults, &format!("{var}_"), env)?;
            }
            continue;
        }
        let Some(raw) = env(&var) else { continue };
        let bad = |reason: String| ConfigError::Env {
            var: var.clone(),
            reason,
        };
        let value = match default {
            toml::Value::Integer(_) => toml::Value::Integer(
                raw.trim()
                    .parse()
                    .map_err(|_| bad(format!("{raw:?} is not a whole number")))?,
            ),
            toml::Value::Float(_) => toml::Value::Float(
                raw.trim()
                    .parse()
                    .map_err(|_| bad(format!("{raw:?} is not a number")))?,
            ),
            toml::Value::Boolean(_) => toml::Value::Boolean(
                raw.trim()
                    .parse()
                    .map_err(|_| bad(format!("{raw:?} is not true or false")))?,
            ),
            toml::Value::Array(_) => toml::Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_string()))
                    .collect(),
            ),
            _ => toml::Value::String(raw),
        };
        table.insert(key.clone(), value);
    }
    Ok(())
}

/// Keys of `Option<String>` fields.
const OPTIONAL_STRING_KEYS: &[&str] = &[
    "admin_token",
    "otlp_endpoint",
    "tls_cert_file",
    "tls_key_file",
    "tls_client_ca_file",
    "admin_tls_cert_file",
    "admin_tls_key_file",
    "admin_tls_client_ca_file",
    "kafka_tls_ca_file",
    "kafka_tls_cert_file",
    "kafka_tls_key_file",
    "kafka_sasl_mechanism",
    "kafka_sasl_username",
    "kafka_sasl_password",
    "kafka_sasl_password_file",
];

/// Keys whose values are secrets: never printed.
const SECRET_KEYS: &[&str] = &["admin_token", "kafka_sasl_password"];

impl Config {
    /// Reads a TOML file (unknown keys are errors).
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        Self::from_sources(Some(path), &|_| None)
    }

    /// The file (if any) with `LEADERLINK_*` variables from `env` laid over it, not yet
    /// validated.
    pub fn from_sources(
        path: Option<&std::path::Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                toml::from_str::<toml::Table>(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: e.to_string().trim_end().to_string(),
                })?
            }
            None => toml::Table::new(),
        };
        let mut defaults = toml::Table::try_from(Config::default()).expect("defaults serialize");
        // Optional strings have no default to serialize; name them so the environment can set them.
        for key in OPTIONAL_STRING_KEYS {
            defaults.insert(key.to_string(), toml::Value::String(String::new()));
        }
        overlay_env(&mut table, &defaults, "LEADERLINK_", env)?;
        let origin = path.map_or_else(|| PathBuf::from("environment"), |p| p.to_path_buf());
        Config::deserialize(table).map_err(|e| ConfigError::Parse {
            path: origin,
            message: e.to_string().trim_end().to_string(),
        })
    }

    /// The configuration as TOML, secrets replaced by `"<redacted>"`.
    pub fn redacted_toml(&self) -> String {
        let mut table = toml::Table::try_from(self).expect("config serializes");
        for key in SECRET_KEYS {
            if table.contains_key(*key) {
                table.insert(key.to_string(), toml::Value::String("<redacted>".into()));
            }
        }
        toml::to_string(&table).expect("table serializes")
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_and_the_rest_round_trips() {
        let cfg = Config {
            admin_token: Some("s3cret".into()),
            ..Config::default()
        };
        let text = cfg.redacted_toml();
        assert!(!text.contains("s3cret"));
        assert!(text.contains("admin_token = \"<redacted>\""));
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back.max_in_flight, cfg.max_in_flight);
    }
}
