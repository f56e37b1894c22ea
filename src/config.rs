//! Configuration: a TOML file, `LEADERLINK_*` environment variables and flags, merged into one
//! typed [`Config`] (flags override the environment, which overrides the file) and validated
//! before anything starts.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use kafka_protocol::protocol::StrBytes;
use serde::{Deserialize, Serialize};

use crate::{forward::ForwardConfig, kafka::connection::ConnectionConfig};

/// Everything leaderlink can be configured with. Every field is a key of the TOML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the gRPC server listens on.
    pub listen: SocketAddr,
    /// Kafka bootstrap brokers (`host:port`). Empty: start the embedded dev cluster.
    pub bootstrap: Vec<String>,
    /// `client_id` sent to the brokers.
    pub client_id: String,
    /// Most requests awaiting an answer at once on one leader connection. When reached,
    /// further requests for that connection wait in its queue until an answer frees a slot.
    /// `1` reproduces one-request-at-a-time forwarding.
    pub max_in_flight: usize,
    /// Pipelined connections per leader broker. Each partition always uses the same one, so
    /// its requests stay in order on one socket.
    pub connections_per_leader: usize,
    /// Largest response frame accepted from a broker; a larger length prefix poisons the
    /// connection instead of being allocated.
    pub max_frame_bytes: usize,
    /// Largest accepted `ForwardRequest` (encoded); larger ones get INVALID_ARGUMENT. The gRPC
    /// transport itself refuses messages over twice this size.
    pub max_request_bytes: usize,
    /// Deadline of calls whose caller sends no `grpc-timeout`.
    pub default_timeout_ms: u64,
    /// Kafka `timeout_ms` sent to leaders when a request says 0. Always cut to fit inside the
    /// call's deadline.
    pub kafka_timeout_ms: u32,
    /// Age after which the leader map is refreshed even without errors. While no broker can be
    /// reached, refreshes are retried every second and health reports NOT_SERVING.
    pub metadata_max_age_ms: u64,
    /// First pause before a retry; doubles per retry up to `retry_backoff_max_ms`.
    pub retry_backoff_ms: u64,
    /// Longest pause between retries.
    pub retry_backoff_max_ms: u64,
    /// Ask brokers to create unknown topics on first use (Metadata `allow_auto_topic_creation`;
    /// the broker's own `auto.create.topics.enable` still decides).
    pub allow_auto_topic_creation: bool,
    /// Most requests one ForwardStream may have outstanding; further requests are not read
    /// until one completes.
    pub max_stream_in_flight: usize,
    /// The embedded dev cluster, used when `bootstrap` is empty.
    pub dev: DevConfig,
}

/// The embedded dev cluster (librdkafka's mock brokers, in memory).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevConfig {
    /// Number of mock brokers.
    pub brokers: i32,
    /// Topics created at start, as `NAME:PARTITIONS`.
    pub topics: Vec<String>,
    /// Delay added to every mock broker response, in milliseconds (a slow leader).
    pub leader_latency_ms: u64,
}

impl Default for DevConfig {
    fn default() -> Self {
        Self {
            brokers: 3,
            topics: Vec::new(),
            leader_latency_ms: 0,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            bootstrap: Vec::new(),
            client_id: "leaderlink".into(),
            max_in_flight: 1024,
            connections_per_leader: 1,
            max_frame_bytes: 100 * 1024 * 1024,
            max_request_bytes: 8 * 1024 * 1024,
            default_timeout_ms: 30_000,
            kafka_timeout_ms: 30_000,
            metadata_max_age_ms: 30_000,
            retry_backoff_ms: 50,
            retry_backoff_max_ms: 1_000,
            allow_auto_topic_creation: true,
            max_stream_in_flight: 1024,
            dev: DevConfig::default(),
        }
    }
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A key has a value that cannot work.
    #[error("{key}: {reason}")]
    Invalid {
        /// The TOML key (or flag) at fault.
        key: &'static str,
        /// Why.
        reason: String,
    },
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key.
        message: String,
    },
}

fn bad(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// Parses one `NAME:PARTITIONS` dev topic spec.
pub fn parse_dev_topic(spec: &str) -> Result<(String, i32), String> {
    let (name, parts) = spec
        .rsplit_once(':')
        .ok_or_else(|| format!("{spec:?} is not NAME:PARTITIONS"))?;
    crate::forward::validate::check_topic(name).map_err(|r| format!("topic {name:?} {r}"))?;
    let n: i32 = parts
        .parse()
        .map_err(|_| format!("{spec:?}: partitions must be a number"))?;
    if !(1..=10_000).contains(&n) {
        return Err(format!("{spec:?}: partitions must be 1..=10000"));
    }
    Ok((name.to_string(), n))
}

impl Config {
    /// Reads a TOML file (unknown keys are errors).
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })
    }

    /// Checks every value; the error names the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for b in &self.bootstrap {
            let ok = b
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                return Err(bad("bootstrap", format!("{b:?} is not host:port")));
            }
        }
        if self.client_id.len() > i16::MAX as usize {
            return Err(bad("client_id", "too long"));
        }
        if !(1..=65_536).contains(&self.max_in_flight) {
            return Err(bad("max_in_flight", "must be 1..=65536"));
        }
        if !(1..=64).contains(&self.connections_per_leader) {
            return Err(bad("connections_per_leader", "must be 1..=64"));
        }
        if !(1024..=i32::MAX as usize).contains(&self.max_frame_bytes) {
            return Err(bad("max_frame_bytes", "must be 1024..=2147483647"));
        }
        if !(1024..=1024 * 1024 * 1024).contains(&self.max_request_bytes) {
            return Err(bad("max_request_bytes", "must be 1024..=1073741824"));
        }
        for (key, v) in [
            ("default_timeout_ms", self.default_timeout_ms),
            ("metadata_max_age_ms", self.metadata_max_age_ms),
            ("retry_backoff_ms", self.retry_backoff_ms),
            ("retry_backoff_max_ms", self.retry_backoff_max_ms),
        ] {
            if v == 0 || v > 24 * 3600 * 1000 {
                return Err(bad(key, "must be 1..=86400000 (milliseconds)"));
            }
        }
        if self.retry_backoff_max_ms < self.retry_backoff_ms {
            return Err(bad("retry_backoff_max_ms", "must be >= retry_backoff_ms"));
        }
        if self.kafka_timeout_ms == 0 || self.kafka_timeout_ms > i32::MAX as u32 {
            return Err(bad("kafka_timeout_ms", "must be 1..=2147483647"));
        }
        if !(1..=1_000_000).contains(&self.max_stream_in_flight) {
            return Err(bad("max_stream_in_flight", "must be 1..=1000000"));
        }
        if !(1..=16).contains(&self.dev.brokers) {
            return Err(bad("dev.brokers", "must be 1..=16"));
        }
        for t in &self.dev.topics {
            parse_dev_topic(t).map_err(|r| bad("dev.topics", r))?;
        }
        if self.dev.leader_latency_ms > 60_000 {
            return Err(bad("dev.leader_latency_ms", "must be <= 60000"));
        }
        Ok(())
    }

    /// Settings of each leader connection.
    pub fn connection(&self) -> ConnectionConfig {
        ConnectionConfig {
            max_in_flight: self.max_in_flight,
            max_frame_bytes: self.max_frame_bytes,
            client_id: Some(StrBytes::from_string(self.client_id.clone())),
        }
    }

    /// Settings of the forwarding core.
    pub fn forward(&self) -> ForwardConfig {
        ForwardConfig {
            max_request_bytes: self.max_request_bytes,
            kafka_timeout_ms: self.kafka_timeout_ms,
            retry_backoff: Duration::from_millis(self.retry_backoff_ms),
            retry_backoff_max: Duration::from_millis(self.retry_backoff_max_ms),
            connections_per_leader: self.connections_per_leader,
        }
    }
}

/// Flags of `leaderlink serve`. Each may also come from the environment variable named in its
/// help; both override the `--config` file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "LEADERLINK_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address the gRPC server listens on [default: 127.0.0.1:50051].
    #[arg(long, env = "LEADERLINK_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Kafka bootstrap brokers, comma-separated. Without it, the embedded dev cluster starts.
    #[arg(
        long,
        env = "LEADERLINK_BOOTSTRAP",
        value_name = "HOST:PORT,...",
        value_delimiter = ','
    )]
    pub bootstrap: Option<Vec<String>>,
    /// Most requests in flight per leader connection [default: 1024]; 1 = one at a time.
    #[arg(long, env = "LEADERLINK_MAX_IN_FLIGHT", value_name = "N")]
    pub max_in_flight: Option<usize>,
    /// Pipelined connections per leader broker [default: 1].
    #[arg(long, env = "LEADERLINK_CONNECTIONS_PER_LEADER", value_name = "K")]
    pub connections_per_leader: Option<usize>,
    /// Deadline of calls that carry none, in milliseconds [default: 30000].
    #[arg(long, env = "LEADERLINK_DEFAULT_TIMEOUT_MS", value_name = "MS")]
    pub default_timeout_ms: Option<u64>,
    /// Largest accepted ForwardRequest in bytes [default: 8388608].
    #[arg(long, env = "LEADERLINK_MAX_REQUEST_BYTES", value_name = "BYTES")]
    pub max_request_bytes: Option<usize>,
    /// Dev cluster: topics to create at start, as NAME:PARTITIONS,...
    #[arg(
        long,
        env = "LEADERLINK_DEV_TOPICS",
        value_name = "NAME:PARTITIONS,...",
        value_delimiter = ','
    )]
    pub dev_topics: Option<Vec<String>>,
    /// Dev cluster: delay every mock broker response by this many milliseconds.
    #[arg(long, env = "LEADERLINK_DEV_LEADER_LATENCY_MS", value_name = "MS")]
    pub dev_leader_latency_ms: Option<u64>,
}

impl ServeArgs {
    /// The effective configuration: the file (if any), then these flags/environment values,
    /// validated.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let mut cfg = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(v) = self.listen {
            cfg.listen = v;
        }
        if let Some(v) = &self.bootstrap {
            cfg.bootstrap = v
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
        if let Some(v) = self.max_in_flight {
            cfg.max_in_flight = v;
        }
        if let Some(v) = self.connections_per_leader {
            cfg.connections_per_leader = v;
        }
        if let Some(v) = self.default_timeout_ms {
            cfg.default_timeout_ms = v;
        }
        if let Some(v) = self.max_request_bytes {
            cfg.max_request_bytes = v;
        }
        if let Some(v) = &self.dev_topics {
            cfg.dev.topics = v.clone();
        }
        if let Some(v) = self.dev_leader_latency_ms {
            cfg.dev.leader_latency_ms = v;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_bad_values_name_their_key() {
        let dir = std::env::temp_dir().join(format!("leaderlink-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.toml");
        std::fs::write(
            &f,
            "max_in_flight = 7\nbootstrap = [\"h:9092\"]\n[dev]\nbrokers = 2\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(f.clone()),
            max_in_flight: Some(9),
            ..Default::default()
        };
        let cfg = args.resolve().unwrap();
        assert_eq!(cfg.max_in_flight, 9);
        assert_eq!(cfg.bootstrap, vec!["h:9092".to_string()]);
        assert_eq!(cfg.dev.brokers, 2);

        std::fs::write(&f, "max_in_flight = 0\n").unwrap();
        let err = ServeArgs {
            config: Some(f.clone()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().starts_with("max_in_flight:"), "{err}");

        std::fs::write(&f, "max_in_flite = 3\n").unwrap();
        let err = ServeArgs {
            config: Some(f.clone()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("max_in_flite"), "{err}");

        let err = ServeArgs {
            bootstrap: Some(vec!["nohost".into()]),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().starts_with("bootstrap:"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn dev_topic_specs_parse() {
        assert_eq!(parse_dev_topic("orders:6").unwrap(), ("orders".into(), 6));
        assert!(parse_dev_topic("orders").is_err());
        assert!(parse_dev_topic("bad name:1").is_err());
        assert!(parse_dev_topic("t:0").is_err());
    }
}
