//! Checks of every configuration value; an error names the first bad key.

use super::{Config, ConfigError, bad};

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
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("metadata_max_age_ms", self.metadata_max_age_ms),
            ("metadata_max_idle_ms", self.metadata_max_idle_ms),
            ("retry_backoff_ms", self.retry_backoff_ms),
            ("retry_backoff_max_ms", self.retry_backoff_max_ms),
        ] {
            if v == 0 || v > 24 * 3600 * 1000 {
                return Err(bad(key, "must be 1..=86400000 (milliseconds)"));
            }
        }
        if self.stall_timeout_ms > 24 * 3600 * 1000 {
            return Err(bad(
                "stall_timeout_ms",
                "must be 0..=86400000 (milliseconds; 0 turns the check off)",
            ));
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
        if self.max_batch_bytes > i32::MAX as usize {
            return Err(bad("max_batch_bytes", "must be 0..=2147483647"));
        }
        if self.linger_ms > 60_000 {
            return Err(bad("linger_ms", "must be 0..=60000"));
        }
        if !(1..=1_000_000).contains(&self.http2_max_concurrent_streams) {
            return Err(bad("http2_max_concurrent_streams", "must be 1..=1000000"));
        }
        if !(1..=1_000_000).contains(&self.http2_max_pending_reset_streams) {
            return Err(bad(
                "http2_max_pending_reset_streams",
                "must be 1..=1000000",
            ));
        }
        if self.http2_abuse_penalty_ms > 3_600_000 {
            return Err(bad("http2_abuse_penalty_ms", "must be 0..=3600000"));
        }
        if !(16 * 1024..=i32::MAX as u32).contains(&self.http2_initial_stream_window_bytes) {
            return Err(bad(
                "http2_initial_stream_window_bytes",
                "must be 16384..=2147483647",
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.http2_max_header_list_size) {
            return Err(bad("http2_max_header_list_size", "must be 1024..=16777216"));
        }
        for (key, v) in [
            (
                "http2_keepalive_interval_ms",
                self.http2_keepalive_interval_ms,
            ),
            ("max_connection_age_ms", self.max_connection_age_ms),
            (
                "max_connection_age_grace_ms",
                self.max_connection_age_grace_ms,
            ),
            (
                "idle_connection_timeout_ms",
                self.idle_connection_timeout_ms,
            ),
        ] {
            if v > 24 * 3600 * 1000 {
                return Err(bad(
                    key,
                    "must be 0..=86400000 (milliseconds; 0 turns it off)",
                ));
            }
        }
        if self.http2_keepalive_timeout_ms == 0 || self.http2_keepalive_timeout_ms > 3600 * 1000 {
            return Err(bad(
                "http2_keepalive_timeout_ms",
                "must be 1..=3600000 (milliseconds)",
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_topic_specs_parse() {
        assert_eq!(parse_dev_topic("orders:6").unwrap(), ("orders".into(), 6));
        assert!(parse_dev_topic("orders").is_err());
        assert!(parse_dev_topic("bad name:1").is_err());
        assert!(parse_dev_topic("t:0").is_err());
    }
}
