//! Configuration: a TOML file, `LEADERLINK_*` environment variables and flags, merged into one
//! typed [`Config`] (flags override the environment, which overrides the file) and validated
//! before anything starts.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use kafka_protocol::protocol::StrBytes;
use serde::{Deserialize, Serialize};

pub use crate::telemetry::LogFormat;
use crate::{
    forward::{ForwardConfig, PartitionOrder},
    kafka::{
        connection::ConnectionConfig,
        security::{Sasl, SaslMechanism, Security, tls_connector},
    },
};

/// Everything leaderlink can be configured with. Every field is a key of the TOML file and can
/// also be set with the environment variable `LEADERLINK_<KEY>` (`dev.topics` →
/// `LEADERLINK_DEV_TOPICS`; lists comma-separated).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the gRPC server (Forwarder, health, reflection) listens on.
    pub listen: SocketAddr,
    /// Address the admin server (Admin, health, reflection) listens on.
    pub admin_listen: SocketAddr,
    /// When set, the mutating admin calls (RefreshMetadata, DrainConnection) require
    /// `authorization: Bearer <token>`. Redacted in GetConfig and `config check`.
    pub admin_token: Option<String>,
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
    /// `"pipelined"` (default): many requests in flight per partition; a retry can reorder
    /// batches of different calls (idempotent batches excepted). `"strict"`: at most one
    /// request in flight per partition, through its retries, so nothing reorders.
    pub ordering: PartitionOrder,
    /// Stamp the batches leaderlink encodes from `records` as an idempotent producer's (one
    /// producer id from InitProducerId, a sequence per partition, at most 5 requests in flight
    /// per partition), so that retries never append a batch twice, as Kafka's Java producer
    /// does by default. `false` sends them without a producer id: retries may then duplicate
    /// (flagged `possibly_duplicated`).
    pub idempotence: bool,
    /// Largest response frame accepted from a broker; a larger length prefix poisons the
    /// connection instead of being allocated.
    pub max_frame_bytes: usize,
    /// Largest accepted `ForwardRequest` (encoded); larger ones get INVALID_ARGUMENT. The gRPC
    /// transport itself refuses messages over twice this size.
    pub max_request_bytes: usize,
    /// Deadline of calls whose caller sends no `grpc-timeout`.
    pub default_timeout_ms: u64,
    /// Longest a new broker connection may take (TCP connect and ApiVersions), within the
    /// call's deadline; an address that takes longer is given up for the next one.
    pub connect_timeout_ms: u64,
    /// Kafka `timeout_ms` sent to leaders when a request says 0. Always cut to fit inside the
    /// call's deadline.
    pub kafka_timeout_ms: u32,
    /// Age after which the leader map is refreshed even without errors. While no broker can be
    /// reached, refreshes are retried every second and health reports NOT_SERVING.
    pub metadata_max_age_ms: u64,
    /// A topic no call has used for this long leaves the leader map at the next refresh
    /// (Kafka's Java producer: `metadata.max.idle.ms`), so the map and every Metadata request
    /// hold only topics in use. A later call for it learns it again, as for a new topic.
    pub metadata_max_idle_ms: u64,
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
    /// Most Forward/ForwardStream calls served at once, across all callers and HTTP/2
    /// connections. A call beyond it is shed at once with RESOURCE_EXHAUSTED ("retry later")
    /// instead of waiting in a queue that grows until memory runs out.
    pub max_concurrent_calls: usize,
    /// Most requests waiting for an in-flight slot on one leader connection. When reached, a
    /// further request for that connection fails with RESOURCE_EXHAUSTED.
    pub max_queued_per_connection: usize,
    /// Most request bytes in flight (written or queued for writing, awaiting an answer) on one
    /// leader connection. Requests beyond it wait in the connection's queue (bounded by
    /// `max_queued_per_connection`); a single request larger than this fails with
    /// RESOURCE_EXHAUSTED.
    pub max_in_flight_bytes_per_connection: usize,
    /// On SIGTERM/SIGINT, how long in-flight calls may take to finish. Calls still running when
    /// it expires get UNAVAILABLE and a warning is logged.
    pub shutdown_grace_ms: u64,
    /// Address of the Prometheus endpoint (`GET /metrics`, text exposition format).
    pub metrics_listen: SocketAddr,
    /// OTLP/gRPC collector (e.g. `http://127.0.0.1:4317`) that spans are exported to. Unset:
    /// the standard `OTEL_EXPORTER_OTLP_ENDPOINT` is used if set; otherwise no spans leave the
    /// process.
    pub otlp_endpoint: Option<String>,
    /// Share of new traces (those whose caller sent no sampled `traceparent`) that are
    /// recorded, 0.0..=1.0. A caller's sampling decision is always followed (parent-based).
    pub trace_sample_ratio: f64,
    /// Add a `traceparent` header to each record leaderlink encodes (from `records`), so
    /// consumers can continue the caller's trace. Raw `record_batch` bytes are never altered.
    pub trace_record_header: bool,
    /// `"text"` (default, for people) or `"json"` (one object per line, for log pipelines).
    pub log_format: LogFormat,
    /// PEM certificate chain of the Forwarder listener. With `tls_key_file`, the listener speaks
    /// TLS only; both files are re-read when they change (certificate rotation without restart).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key for `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA certificates: when set, callers of the Forwarder listener must present a
    /// certificate signed by one of them (mTLS). Re-read when it changes.
    pub tls_client_ca_file: Option<PathBuf>,
    /// Like `tls_cert_file`, for the admin listener (TLS there is configured separately).
    pub admin_tls_cert_file: Option<PathBuf>,
    /// Like `tls_key_file`, for the admin listener.
    pub admin_tls_key_file: Option<PathBuf>,
    /// Like `tls_client_ca_file`, for the admin listener.
    pub admin_tls_client_ca_file: Option<PathBuf>,
    /// How broker connections are secured: `PLAINTEXT` (default), `SSL`, `SASL_PLAINTEXT` or
    /// `SASL_SSL`, as Kafka's `security.protocol`.
    pub kafka_security_protocol: SecurityProtocol,
    /// PEM CA certificates trusted for brokers' certificates (required with SSL and SASL_SSL;
    /// a system bundle such as /etc/ssl/certs/ca-certificates.crt works too).
    pub kafka_tls_ca_file: Option<PathBuf>,
    /// PEM client certificate chain presented to brokers (with `kafka_tls_key_file`).
    pub kafka_tls_cert_file: Option<PathBuf>,
    /// PEM private key for `kafka_tls_cert_file`.
    pub kafka_tls_key_file: Option<PathBuf>,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` (required with SASL_PLAINTEXT and SASL_SSL).
    pub kafka_sasl_mechanism: Option<SaslMechanism>,
    /// SASL user name.
    pub kafka_sasl_username: Option<String>,
    /// SASL password. Redacted in GetConfig and `config check`; prefer
    /// `kafka_sasl_password_file` or `LEADERLINK_KAFKA_SASL_PASSWORD`.
    pub kafka_sasl_password: Option<String>,
    /// File holding the SASL password (trailing newline ignored), read at start.
    pub kafka_sasl_password_file: Option<PathBuf>,
    /// The embedded dev cluster, used when `bootstrap` is empty.
    pub dev: DevConfig,
}

/// Kafka's `security.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SecurityProtocol {
    /// No TLS, no SASL.
    #[default]
    #[serde(rename = "PLAINTEXT")]
    Plaintext,
    /// TLS.
    #[serde(rename = "SSL")]
    Ssl,
    /// SASL without TLS.
    #[serde(rename = "SASL_PLAINTEXT")]
    SaslPlaintext,
    /// SASL over TLS.
    #[serde(rename = "SASL_SSL")]
    SaslSsl,
}

impl SecurityProtocol {
    fn tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }

    fn sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
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
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 50052)),
            admin_token: None,
            bootstrap: Vec::new(),
            client_id: "leaderlink".into(),
            max_in_flight: 1024,
            connections_per_leader: 1,
            ordering: PartitionOrder::Pipelined,
            idempotence: true,
            max_frame_bytes: 100 * 1024 * 1024,
            max_request_bytes: 8 * 1024 * 1024,
            default_timeout_ms: 30_000,
            connect_timeout_ms: 5_000,
            kafka_timeout_ms: 30_000,
            metadata_max_age_ms: 30_000,
            metadata_max_idle_ms: 300_000,
            retry_backoff_ms: 50,
            retry_backoff_max_ms: 1_000,
            allow_auto_topic_creation: true,
            max_stream_in_flight: 1024,
            max_concurrent_calls: 4096,
            max_queued_per_connection: 4096,
            max_in_flight_bytes_per_connection: 64 * 1024 * 1024,
            shutdown_grace_ms: 20_000,
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            otlp_endpoint: None,
            trace_sample_ratio: 1.0,
            trace_record_header: true,
            log_format: LogFormat::Text,
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            admin_tls_cert_file: None,
            admin_tls_key_file: None,
            admin_tls_client_ca_file: None,
            kafka_security_protocol: SecurityProtocol::Plaintext,
            kafka_tls_ca_file: None,
            kafka_tls_cert_file: None,
            kafka_tls_key_file: None,
            kafka_sasl_mechanism: None,
            kafka_sasl_username: None,
            kafka_sasl_password: None,
            kafka_sasl_password_file: None,
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
    /// An environment variable holds a value of the wrong type.
    #[error("{var}: {reason}")]
    Env {
        /// The variable.
        var: String,
        /// Why.
        reason: String,
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
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("metadata_max_age_ms", self.metadata_max_age_ms),
            ("metadata_max_idle_ms", self.metadata_max_idle_ms),
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
        if !(1..=1_000_000).contains(&self.max_concurrent_calls) {
            return Err(bad("max_concurrent_calls", "must be 1..=1000000"));
        }
        if !(1..=1_000_000).contains(&self.max_queued_per_connection) {
            return Err(bad("max_queued_per_connection", "must be 1..=1000000"));
        }
        if !(1024..=1usize << 40).contains(&self.max_in_flight_bytes_per_connection) {
            return Err(bad(
                "max_in_flight_bytes_per_connection",
                "must be 1024..=1099511627776",
            ));
        }
        if self.max_in_flight_bytes_per_connection < self.max_request_bytes {
            return Err(bad(
                "max_in_flight_bytes_per_connection",
                "must be >= max_request_bytes, or a valid request could never be sent",
            ));
        }
        if self.shutdown_grace_ms > 3600 * 1000 {
            return Err(bad("shutdown_grace_ms", "must be <= 3600000 (one hour)"));
        }
        if self
            .admin_token
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err(bad("admin_token", "must not be empty when set"));
        }
        if self.admin_listen == self.listen {
            return Err(bad("admin_listen", "must differ from listen"));
        }
        if self.metrics_listen == self.listen || self.metrics_listen == self.admin_listen {
            return Err(bad(
                "metrics_listen",
                "must differ from listen and admin_listen",
            ));
        }
        if let Some(e) = &self.otlp_endpoint {
            let ok = e.parse::<http::Uri>().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
            });
            if !ok {
                return Err(bad(
                    "otlp_endpoint",
                    format!("{e:?} is not an http:// or https:// URL"),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.trace_sample_ratio) {
            return Err(bad("trace_sample_ratio", "must be 0.0..=1.0"));
        }
        self.validate_security()?;
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

    /// Consistency of the TLS and SASL keys (files are read when serving, not here, so that a
    /// file meant for another machine can be checked).
    fn validate_security(&self) -> Result<(), ConfigError> {
        for (cert, key, ca, names) in [
            (
                &self.tls_cert_file,
                &self.tls_key_file,
                &self.tls_client_ca_file,
                ("tls_cert_file", "tls_key_file", "tls_client_ca_file"),
            ),
            (
                &self.admin_tls_cert_file,
                &self.admin_tls_key_file,
                &self.admin_tls_client_ca_file,
                (
                    "admin_tls_cert_file",
                    "admin_tls_key_file",
                    "admin_tls_client_ca_file",
                ),
            ),
        ] {
            if cert.is_some() != key.is_some() {
                return Err(bad(
                    names.0,
                    format!("{} and {} go together", names.0, names.1),
                ));
            }
            if ca.is_some() && cert.is_none() {
                return Err(bad(names.2, format!("needs {} and {}", names.0, names.1)));
            }
        }
        let p = self.kafka_security_protocol;
        if p.tls() && self.kafka_tls_ca_file.is_none() {
            return Err(bad(
                "kafka_tls_ca_file",
                "required when kafka_security_protocol is SSL or SASL_SSL",
            ));
        }
        if !p.tls()
            && (self.kafka_tls_ca_file.is_some()
                || self.kafka_tls_cert_file.is_some()
                || self.kafka_tls_key_file.is_some())
        {
            return Err(bad(
                "kafka_security_protocol",
                "kafka_tls_* files are set but the protocol has no TLS; use SSL or SASL_SSL",
            ));
        }
        if self.kafka_tls_cert_file.is_some() != self.kafka_tls_key_file.is_some() {
            return Err(bad(
                "kafka_tls_cert_file",
                "kafka_tls_cert_file and kafka_tls_key_file go together",
            ));
        }
        let sasl_set = self.kafka_sasl_mechanism.is_some()
            || self.kafka_sasl_username.is_some()
            || self.kafka_sasl_password.is_some()
            || self.kafka_sasl_password_file.is_some();
        if p.sasl() {
            if self.kafka_sasl_mechanism.is_none() {
                return Err(bad(
                    "kafka_sasl_mechanism",
                    "required with SASL_PLAINTEXT and SASL_SSL: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
                ));
            }
            if self
                .kafka_sasl_username
                .as_deref()
                .is_none_or(str::is_empty)
            {
                return Err(bad("kafka_sasl_username", "required with SASL"));
            }
            if self.kafka_sasl_password.is_some() == self.kafka_sasl_password_file.is_some() {
                return Err(bad(
                    "kafka_sasl_password",
                    "set exactly one of kafka_sasl_password and kafka_sasl_password_file",
                ));
            }
        } else if sasl_set {
            return Err(bad(
                "kafka_security_protocol",
                "kafka_sasl_* keys are set but the protocol has no SASL; use SASL_PLAINTEXT or SASL_SSL",
            ));
        }
        Ok(())
    }

    /// How broker connections are secured: reads the CA, client certificate and password files.
    pub fn kafka_security(&self) -> Result<Security, ConfigError> {
        let p = self.kafka_security_protocol;
        let tls = match (&self.kafka_tls_ca_file, p.tls()) {
            (Some(ca), true) => {
                let client = self
                    .kafka_tls_cert_file
                    .as_deref()
                    .zip(self.kafka_tls_key_file.as_deref());
                Some(tls_connector(ca, client).map_err(|r| bad("kafka_tls_ca_file", r))?)
            }
            _ => None,
        };
        let sasl = match (self.kafka_sasl_mechanism, p.sasl()) {
            (Some(mechanism), true) => {
                let password = match (&self.kafka_sasl_password, &self.kafka_sasl_password_file) {
                    (Some(p), _) => p.clone(),
                    (None, Some(f)) => std::fs::read_to_string(f)
                        .map_err(|e| {
                            bad(
                                "kafka_sasl_password_file",
                                format!("cannot read {}: {e}", f.display()),
                            )
                        })?
                        .trim_end_matches(['\n', '\r'])
                        .to_string(),
                    (None, None) => String::new(),
                };
                Some(Sasl {
                    mechanism,
                    username: self.kafka_sasl_username.clone().unwrap_or_default(),
                    password,
                })
            }
            _ => None,
        };
        Ok(Security { tls, sasl })
    }

    /// Settings of each leader connection, with TLS and SASL loaded from their files.
    pub fn connection(&self) -> Result<ConnectionConfig, ConfigError> {
        Ok(ConnectionConfig {
            max_in_flight: self.max_in_flight,
            max_queued: self.max_queued_per_connection,
            max_in_flight_bytes: self.max_in_flight_bytes_per_connection,
            max_frame_bytes: self.max_frame_bytes,
            client_id: Some(StrBytes::from_string(self.client_id.clone())),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            security: self.kafka_security()?,
        })
    }

    /// Settings of the forwarding core.
    pub fn forward(&self) -> ForwardConfig {
        ForwardConfig {
            ordering: self.ordering,
            idempotence: self.idempotence,
            max_request_bytes: self.max_request_bytes,
            kafka_timeout_ms: self.kafka_timeout_ms,
            retry_backoff: Duration::from_millis(self.retry_backoff_ms),
            retry_backoff_max: Duration::from_millis(self.retry_backoff_max_ms),
            connections_per_leader: self.connections_per_leader,
            trace_record_header: self.trace_record_header,
            metadata_max_idle: Duration::from_millis(self.metadata_max_idle_ms),
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
    /// Address the admin server listens on [default: 127.0.0.1:50052].
    #[arg(long, env = "LEADERLINK_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
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
    /// Most calls served at once; more are shed with RESOURCE_EXHAUSTED [default: 4096].
    #[arg(long, env = "LEADERLINK_MAX_CONCURRENT_CALLS", value_name = "N")]
    pub max_concurrent_calls: Option<usize>,
    /// Grace for in-flight calls on SIGTERM/SIGINT, in milliseconds [default: 20000].
    #[arg(long, env = "LEADERLINK_SHUTDOWN_GRACE_MS", value_name = "MS")]
    pub shutdown_grace_ms: Option<u64>,
    /// Ordering of each partition's batches [default: pipelined].
    #[arg(long, env = "LEADERLINK_ORDERING", value_enum)]
    pub ordering: Option<PartitionOrder>,
    /// Stamp the batches leaderlink encodes as an idempotent producer's [default: true].
    #[arg(long, env = "LEADERLINK_IDEMPOTENCE", value_name = "BOOL")]
    pub idempotence: Option<bool>,
    /// Pipelined connections per leader broker [default: 1].
    #[arg(long, env = "LEADERLINK_CONNECTIONS_PER_LEADER", value_name = "K")]
    pub connections_per_leader: Option<usize>,
    /// Deadline of calls that carry none, in milliseconds [default: 30000].
    #[arg(long, env = "LEADERLINK_DEFAULT_TIMEOUT_MS", value_name = "MS")]
    pub default_timeout_ms: Option<u64>,
    /// Largest accepted ForwardRequest in bytes [default: 8388608].
    #[arg(long, env = "LEADERLINK_MAX_REQUEST_BYTES", value_name = "BYTES")]
    pub max_request_bytes: Option<usize>,
    /// Address of the Prometheus /metrics endpoint [default: 127.0.0.1:9464].
    #[arg(long, env = "LEADERLINK_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// OTLP/gRPC endpoint to export spans to (also read from OTEL_EXPORTER_OTLP_ENDPOINT).
    #[arg(long, env = "LEADERLINK_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Log line format [default: text].
    #[arg(long, env = "LEADERLINK_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
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

    #[test]
    fn dev_topic_specs_parse() {
        assert_eq!(parse_dev_topic("orders:6").unwrap(), ("orders".into(), 6));
        assert!(parse_dev_topic("orders").is_err());
        assert!(parse_dev_topic("bad name:1").is_err());
        assert!(parse_dev_topic("t:0").is_err());
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
