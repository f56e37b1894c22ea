//! Configuration: a TOML file, `LEADERLINK_*` environment variables and flags, merged into one
//! typed [`Config`] (flags override the environment, which overrides the file) and validated
//! before anything starts.
//!
//! One file per job: this one holds the schema, its defaults and the settings derived from it;
//! `sources` reads the file and the environment; `validate` checks every value; `cli` is the
//! command line of `leaderlink serve`.

mod cli;
mod sources;
mod validate;

pub use cli::ServeArgs;
pub use validate::parse_dev_topic;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use kafka_protocol::protocol::StrBytes;
use serde::{Deserialize, Serialize};

pub use crate::telemetry::LogFormat;
use crate::{
    forward::{ForwardConfig, PartitionOrder},
    kafka::{
        connection::ConnectionConfig,
        record_batch::Codec,
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
    /// Codec of the record batches leaderlink encodes from `records`: `"none"` (default),
    /// `"gzip"`, `"snappy"`, `"lz4"` or `"zstd"`. A request's `compression` field overrides
    /// it; callers' raw `record_batch` payloads are sent as they are. Batches are compressed
    /// after the records of concurrent calls are merged, once per batch.
    pub compression: Codec,
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
    /// Longest a new broker connection may wait for the answer to each of its ApiVersions
    /// requests, within `connect_timeout_ms`. A broker whose process is stopped (SIGSTOP, a long GC
    /// pause) still accepts TCP connections through the kernel's backlog but never answers:
    /// this bound gives the dial up early, so that the call can refresh its leaders and try
    /// again while it still has time.
    pub handshake_timeout_ms: u64,
    /// How long the oldest request on a leader connection may wait for its answer before
    /// leaderlink checks the broker over a new connection. A broker that does not answer that
    /// connection's ApiVersions within `handshake_timeout_ms` is stalled (stopped, frozen,
    /// blackholed): its connections are poisoned and their requests retried (on the new leader
    /// once the cluster has elected one), and it is not dialled again until it answers a
    /// probe. A broker that answers is only slow and keeps its requests. `0` turns the check
    /// off: a silent leader then holds its requests until their calls' deadlines.
    pub stall_timeout_ms: u64,
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
    /// Largest record batch leaderlink builds by merging the `records` of concurrent calls for
    /// one partition (record accumulation: calls queued for a leader connection while it is
    /// busy share one batch). A call's records that would take a batch past it start the next
    /// batch; a single call's batch is never split. Keep it at most the topics'
    /// `max.message.bytes` (broker default 1048588), or the leader refuses the merged batch and
    /// each call is retried in a batch of its own. `0` turns merging off.
    pub max_batch_bytes: usize,
    /// How long a leader connection's queue waits, after a call's batches arrive, for more
    /// calls to share its request and record batches, in milliseconds. `0` (default): no
    /// timer; calls share batches only while the connection is busy, and a lone call goes out
    /// at once. A wait never takes more than half the time the earliest waiting call's deadline
    /// leaves.
    pub linger_ms: u64,
    /// Most streams (calls) one caller connection may have open at once. HTTP/2 refuses further
    /// ones with REFUSED_STREAM, which gRPC clients retry; it bounds what one connection can
    /// hold of `max_concurrent_calls`.
    pub http2_max_concurrent_streams: u32,
    /// Most streams a caller connection may have opened and reset before leaderlink accepted
    /// them. Beyond it the connection is closed with GOAWAY (ENHANCE_YOUR_CALM): a rapid-reset
    /// attack (CVE-2023-44487) costs the attacker its connection instead of the server's CPU.
    pub http2_max_pending_reset_streams: usize,
    /// Largest header list a caller may send on one request, in bytes as HTTP/2 counts them
    /// (each name and value plus 32). A larger one is refused before the call starts.
    pub http2_max_header_list_size: u32,
    /// How long a caller's IP address is refused new connections after one of its connections
    /// was closed for abuse, in milliseconds: by HTTP/2 (GOAWAY ENHANCE_YOUR_CALM: rapid reset,
    /// header lists far over the limit, floods of stream errors), or by leaderlink once more than
    /// 20 of the caller's streams were answered 431 by HTTP/2 (header lists over
    /// `http2_max_header_list_size`), or once the caller opened more streams that never became
    /// calls than `http2_max_concurrent_streams` plus 100.
    /// New connections from the address are held unanswered until the penalty ends, before any
    /// HTTP/2 or TLS work; those it already has are not touched. `0`: off (and connections are
    /// not watched).
    pub http2_abuse_penalty_ms: u64,
    /// The HTTP/2 flow-control window leaderlink grants each caller stream, in bytes: how much
    /// of a stream's request data the caller may send before leaderlink has read it. A stream
    /// whose requests pile up unread (one with `max_stream_in_flight` calls in flight, say) thus
    /// holds at most this much; with a larger window a caller that never reads its answers can
    /// stuff tens of thousands of small requests into it before it stalls. A request larger
    /// than the window takes several round trips of window updates.
    pub http2_initial_stream_window_bytes: u32,
    /// How often leaderlink PINGs each caller connection, in milliseconds; `0`: never. A
    /// connection whose PING is not answered within `http2_keepalive_timeout_ms` is closed, so
    /// that callers that vanished without closing (a dead host, a dropped NAT entry) free their
    /// connection.
    pub http2_keepalive_interval_ms: u64,
    /// How long a keepalive PING may go unanswered before its connection is closed.
    pub http2_keepalive_timeout_ms: u64,
    /// A caller connection is sent GOAWAY this long after it opened, in milliseconds; `0`:
    /// never. Its calls in flight finish (within `max_connection_age_grace_ms`), new calls go
    /// to a new connection. Bounds how long any connection lives, the idle ones included, and
    /// spreads long-lived callers over the replicas of a scaled deployment.
    pub max_connection_age_ms: u64,
    /// After the GOAWAY of `max_connection_age_ms`, how long the connection's calls may take
    /// before it is closed.
    pub max_connection_age_grace_ms: u64,
    /// A caller connection with no call in progress for this long is closed, in milliseconds;
    /// `0`: never. Frees the descriptors and memory of callers that connect and go quiet; the
    /// caller's client connects again at its next call (`src/grpc/idle.rs`).
    pub idle_connection_timeout_ms: u64,
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
            compression: Codec::None,
            max_frame_bytes: 100 * 1024 * 1024,
            max_request_bytes: 8 * 1024 * 1024,
            default_timeout_ms: 30_000,
            connect_timeout_ms: 5_000,
            handshake_timeout_ms: 2_000,
            stall_timeout_ms: 1_000,
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
            max_batch_bytes: 1_000_000,
            linger_ms: 0,
            http2_max_concurrent_streams: 200,
            http2_max_pending_reset_streams: 20,
            http2_max_header_list_size: 16 * 1024,
            http2_abuse_penalty_ms: 10_000,
            http2_initial_stream_window_bytes: 64 * 1024,
            http2_keepalive_interval_ms: 60_000,
            http2_keepalive_timeout_ms: 20_000,
            max_connection_age_ms: 0,
            max_connection_age_grace_ms: 30_000,
            idle_connection_timeout_ms: 3_600_000,
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

impl Config {
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
            max_in_flight_bytes: self.max_in_flight_bytes_per_connection,
            max_frame_bytes: self.max_frame_bytes,
            client_id: Some(StrBytes::from_string(self.client_id.clone())),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            stall_timeout: Duration::from_millis(self.stall_timeout_ms),
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
            max_queued_per_connection: self.max_queued_per_connection,
            max_batch_bytes: self.max_batch_bytes,
            linger: Duration::from_millis(self.linger_ms),
            trace_record_header: self.trace_record_header,
            metadata_max_idle: Duration::from_millis(self.metadata_max_idle_ms),
            compression: self.compression,
        }
    }
}
