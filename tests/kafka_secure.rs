//! Against the SASL_SSL listener of the real Apache Kafka that `scripts/kafka-cluster` starts
//! (certificates generated at start, user `alice` / `alice-secret` for PLAIN, SCRAM-SHA-256 and
//! SCRAM-SHA-512): forwarding over TLS with each mechanism, and a wrong password answered at
//! once with an error naming authentication.
//!
//! `#[ignore]`d in a plain `cargo test`; `scripts/test` runs them with
//! `LEADERLINK_KAFKA_SECURE_BOOTSTRAP` and `LEADERLINK_KAFKA_TLS_DIR` set.

mod common;

use std::{path::PathBuf, time::Duration};

use common::{records, request};
use leaderlink::{
    config::{Config, SecurityProtocol},
    kafka::security::SaslMechanism,
    proto::v1::{Acks, forwarder_client::ForwarderClient},
    server::Running,
};
use tokio::time::Instant;
use tonic::{Code, transport::Channel};

fn env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var}: run `scripts/kafka-cluster start 3` (scripts/test sets it)")
    })
}

fn secure_config(mechanism: SaslMechanism, password: &str) -> Config {
    let tls_dir = PathBuf::from(env("LEADERLINK_KAFKA_TLS_DIR"));
    Config {
        bootstrap: env("LEADERLINK_KAFKA_SECURE_BOOTSTRAP")
            .split(',')
            .map(str::to_string)
            .collect(),
        kafka_security_protocol: SecurityProtocol::SaslSsl,
        kafka_tls_ca_file: Some(tls_dir.join("ca.pem")),
        kafka_sasl_mechanism: Some(mechanism),
        kafka_sasl_username: Some("alice".into()),
        kafka_sasl_password: Some(password.into()),
        ..Config::default()
    }
}

async fn leaderlink(cfg: &Config) -> (Running, ForwarderClient<Channel>) {
    cfg.validate().expect("valid config");
    let server = common::start_server(cfg).await;
    let client = ForwarderClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap();
    (server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real Kafka of scripts/kafka-cluster (scripts/test provides it)"]
async fn forwards_over_sasl_ssl_with_each_mechanism() {
    for mechanism in [
        SaslMechanism::ScramSha512,
        SaslMechanism::Plain,
        SaslMechanism::ScramSha256,
    ] {
        let (server, mut client) = leaderlink(&secure_config(mechanism, "alice-secret")).await;
        let topic = format!(
            "secure-{}-{}",
            mechanism.name().to_lowercase(),
            std::process::id()
        );
        // The topic is created on first use; its leader may take a moment to be elected.
        let mut offsets = Vec::new();
        for i in 0..3 {
            let mut r = tonic::Request::new(request(i, Acks::All, &topic, 0, records("s", 2)));
            r.set_timeout(Duration::from_secs(30));
            let resp = client
                .forward(r)
                .await
                .unwrap_or_else(|e| panic!("{}: {e:?}", mechanism.name()))
                .into_inner();
            let p = &resp.partitions[0];
            assert_eq!(p.error_code, 0, "{}: {p:?}", mechanism.name());
            offsets.push(p.base_offset);
        }
        assert_eq!(offsets, vec![0, 2, 4], "{}", mechanism.name());
        // Metadata and leader connections both authenticated: at least one leader connection.
        assert!(
            server.forwarder.pool().slots().iter().any(|s| s
                .stats
                .completed
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0)
        );
        server.shutdown(Duration::from_secs(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real Kafka of scripts/kafka-cluster (scripts/test provides it)"]
async fn a_wrong_password_is_an_authentication_error_at_once() {
    let (server, mut client) = leaderlink(&secure_config(
        SaslMechanism::ScramSha512,
        "not-the-password",
    ))
    .await;
    for i in 0..3 {
        let started = Instant::now();
        let mut r = tonic::Request::new(request(i, Acks::All, "secure-denied", 0, records("x", 1)));
        r.set_timeout(Duration::from_secs(20));
        let e = client.forward(r).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(
            e.message()
                .contains("SASL SCRAM-SHA-512 authentication failed"),
            "{}",
            e.message()
        );
        // Answered long before the deadline: no retrying until it runs out.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
    }
    // Nothing got through: no leader connection was ever opened.
    assert!(
        server
            .forwarder
            .pool()
            .slots()
            .iter()
            .all(|s| { s.stats.connects.load(std::sync::atomic::Ordering::Relaxed) == 0 })
    );
}
