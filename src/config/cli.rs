//! The command line of `leaderlink serve`: flags laid over the file and the environment (which
//! `sources` reads).

use std::{net::SocketAddr, path::PathBuf};

use super::{Config, ConfigError, LogFormat};
use crate::{forward::PartitionOrder, kafka::record_batch::Codec};

/// Flags of `leaderlink serve`. They override the environment variable named in each one's
/// help, which overrides the `--config` file. The variables are read once, with every other
/// `LEADERLINK_*` configuration key, by `Config::from_sources`; only `LEADERLINK_CONFIG`,
/// which names the file, is read here.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "LEADERLINK_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address the gRPC server listens on [default: 127.0.0.1:50051].
    /// [env: LEADERLINK_LISTEN]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Address the admin server listens on [default: 127.0.0.1:50052].
    /// [env: LEADERLINK_ADMIN_LISTEN]
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// Kafka bootstrap brokers, comma-separated. Without it, the embedded dev cluster starts.
    /// [env: LEADERLINK_BOOTSTRAP]
    #[arg(long, value_name = "HOST:PORT,...", value_delimiter = ',')]
    pub bootstrap: Option<Vec<String>>,
    /// Most requests in flight per leader connection [default: 1024]; 1 = one at a time.
    /// [env: LEADERLINK_MAX_IN_FLIGHT]
    #[arg(long, value_name = "N")]
    pub max_in_flight: Option<usize>,
    /// Most calls served at once; more are shed with RESOURCE_EXHAUSTED [default: 4096].
    /// [env: LEADERLINK_MAX_CONCURRENT_CALLS]
    #[arg(long, value_name = "N")]
    pub max_concurrent_calls: Option<usize>,
    /// Grace for in-flight calls on SIGTERM/SIGINT, in milliseconds [default: 20000].
    /// [env: LEADERLINK_SHUTDOWN_GRACE_MS]
    #[arg(long, value_name = "MS")]
    pub shutdown_grace_ms: Option<u64>,
    /// Ordering of each partition's batches [default: pipelined].
    /// [env: LEADERLINK_ORDERING]
    #[arg(long, value_enum)]
    pub ordering: Option<PartitionOrder>,
    /// Codec of the record batches leaderlink encodes from `records` [default: none]; a
    /// request's `compression` field overrides it, raw `record_batch` payloads are never
    /// recompressed. [env: LEADERLINK_COMPRESSION]
    #[arg(long, value_enum)]
    pub compression: Option<Codec>,
    /// Stamp the batches leaderlink encodes as an idempotent producer's [default: true].
    /// [env: LEADERLINK_IDEMPOTENCE]
    #[arg(long, value_name = "BOOL")]
    pub idempotence: Option<bool>,
    /// Pipelined connections per leader broker [default: 1].
    /// [env: LEADERLINK_CONNECTIONS_PER_LEADER]
    #[arg(long, value_name = "K")]
    pub connections_per_leader: Option<usize>,
    /// Deadline of calls that carry none, in milliseconds [default: 30000].
    /// [env: LEADERLINK_DEFAULT_TIMEOUT_MS]
    #[arg(long, value_name = "MS")]
    pub default_timeout_ms: Option<u64>,
    /// Largest accepted ForwardRequest in bytes [default: 8388608].
    /// [env: LEADERLINK_MAX_REQUEST_BYTES]
    #[arg(long, value_name = "BYTES")]
    pub max_request_bytes: Option<usize>,
    /// Address of the Prometheus /metrics endpoint [default: 127.0.0.1:9464].
    /// [env: LEADERLINK_METRICS_LISTEN]
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// OTLP/gRPC endpoint to export spans to (also read from OTEL_EXPORTER_OTLP_ENDPOINT).
    /// [env: LEADERLINK_OTLP_ENDPOINT]
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Log line format [default: text].
    /// [env: LEADERLINK_LOG_FORMAT]
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Dev cluster: topics to create at start, as NAME:PARTITIONS,...
    /// [env: LEADERLINK_DEV_TOPICS]
    #[arg(long, value_name = "NAME:PARTITIONS,...", value_delimiter = ',')]
    pub dev_topics: Option<Vec<String>>,
    /// Dev cluster: delay every mock broker response by this many milliseconds.
    /// [env: LEADERLINK_DEV_LEADER_LATENCY_MS]
    #[arg(long, value_name = "MS")]
    pub dev_leader_latency_ms: Option<u64>,
}

impl ServeArgs {
    /// The effective configuration: the file (if any), then `LEADERLINK_*` variables, then
    /// these flags, validated.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        self.resolve_with(&|var| std::env::var(var).ok())
    }

    /// [`Self::resolve`] with the environment given as a function.
    pub fn resolve_with(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut cfg = Config::from_sources(self.config.as_deref(), env)?;
        if let Some(v) = self.listen {
            cfg.listen = v;
        }
        if let Some(v) = self.admin_listen {
            cfg.admin_listen = v;
        }
        if let Some(v) = self.ordering {
            cfg.ordering = v;
        }
        if let Some(v) = self.compression {
            cfg.compression = v;
        }
        if let Some(v) = self.idempotence {
            cfg.idempotence = v;
        }
        if let Some(v) = self.max_concurrent_calls {
            cfg.max_concurrent_calls = v;
        }
        if let Some(v) = self.shutdown_grace_ms {
            cfg.shutdown_grace_ms = v;
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
        if let Some(v) = self.metrics_listen {
            cfg.metrics_listen = v;
        }
        if let Some(v) = &self.otlp_endpoint {
            cfg.otlp_endpoint = Some(v.clone());
        }
        // The standard OpenTelemetry variable, when leaderlink's own settings name none.
        if cfg.otlp_endpoint.is_none() {
            cfg.otlp_endpoint = env("OTEL_EXPORTER_OTLP_ENDPOINT").filter(|e| !e.trim().is_empty());
        }
        if let Some(v) = self.log_format {
            cfg.log_format = v;
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
        let cfg = args.resolve_with(&|_| None).unwrap();
        assert_eq!(cfg.max_in_flight, 9);
        // The environment overrides the file, flags override the environment.
        let env = |v: &str| match v {
            "LEADERLINK_MAX_IN_FLIGHT" => Some("11".to_string()),
            "LEADERLINK_DEV_TOPICS" => Some("a:1, b:2".to_string()),
            "LEADERLINK_ALLOW_AUTO_TOPIC_CREATION" => Some("false".to_string()),
            _ => None,
        };
        let from_env = ServeArgs {
            config: Some(f.clone()),
            ..Default::default()
        }
        .resolve_with(&env)
        .unwrap();
        assert_eq!(from_env.max_in_flight, 11);
        assert_eq!(
            from_env.dev.topics,
            vec!["a:1".to_string(), "b:2".to_string()]
        );
        assert!(!from_env.allow_auto_topic_creation);
        assert_eq!(args.resolve_with(&env).unwrap().max_in_flight, 9);
        let err = ServeArgs::default()
            .resolve_with(&|v: &str| (v == "LEADERLINK_MAX_IN_FLIGHT").then(|| "many".to_string()))
            .unwrap_err();
        assert!(
            err.to_string().starts_with("LEADERLINK_MAX_IN_FLIGHT:"),
            "{err}"
        );
        assert_eq!(cfg.bootstrap, vec!["h:9092".to_string()]);
        assert_eq!(cfg.dev.brokers, 2);

        std::fs::write(&f, "max_in_flight = 0\n").unwrap();
        let err = ServeArgs {
            config: Some(f.clone()),
            ..Default::default()
        }
        .resolve_with(&|_| None)
        .unwrap_err();
        assert!(err.to_string().starts_with("max_in_flight:"), "{err}");

        std::fs::write(&f, "max_in_flite = 3\n").unwrap();
        let err = ServeArgs {
            config: Some(f.clone()),
            ..Default::default()
        }
        .resolve_with(&|_| None)
        .unwrap_err();
        assert!(err.to_string().contains("max_in_flite"), "{err}");

        let err = ServeArgs {
            bootstrap: Some(vec!["nohost".into()]),
            ..Default::default()
        }
        .resolve_with(&|_| None)
        .unwrap_err();
        assert!(err.to_string().starts_with("bootstrap:"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
