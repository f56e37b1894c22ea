//! Against the SASL_SSL listener of the real Apache Kafka that `scripts/kafka-cluster` starts
//! (certificates generated at start, user `alice` / `alice-secret` for PLAIN, SCRAM-SHA-256 and
//! SCRAM-SHA-512): forwarding over TLS with each mechanism, and a wrong password answered at
//! once with an error naming authentication. PLAIN user `bob` is known to every node but the
//! last: a call whose partitions that node leads gets SASL_AUTHENTICATION_FAILED for those only.
//! Sessions last 10 s (`connections.max.reauth.ms`): connections are renewed before then.
//!
//! `#[ignore]`d in a plain `cargo test`; `scripts/test` runs them with
//! `LEADERLINK_KAFKA_SECURE_BOOTSTRAP` and `LEADERLINK_KAFKA_TLS_DIR` set.

use crate::common;

use std::{path::PathBuf, time::Duration};

use common::{records, request};
use leaderlink::{
    config::{Config, SecurityProtocol},
    kafka::{metadata::TopicState, security::SaslMechanism},
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real Kafka of scripts/kafka-cluster (scripts/test provides it)"]
async fn connections_are_renewed_before_the_brokers_sasl_session_ends() {
    // The cluster limits SASL sessions to 10 s (connections.max.reauth.ms): a connection still
    // in use after that is closed by the broker at its next request.
    let mut cfg = secure_config(SaslMechanism::Plain, "alice-secret");
    cfg.metadata_max_age_ms = 2_000;
    let (server, mut client) = leaderlink(&cfg).await;
    let topic = format!("secure-renewal-{}", std::process::id());
    let started = Instant::now();
    let mut calls = 0u64;
    let mut last_offset = -1;
    // 26 s: every connection outlives at least two session lifetimes.
    while started.elapsed() < Duration::from_secs(26) {
        let mut r = tonic::Request::new(request(calls, Acks::All, &topic, 0, records("r", 1)));
        r.set_timeout(Duration::from_secs(30));
        let resp = client.forward(r).await.expect("every call succeeds");
        let p = &resp.into_inner().partitions[0];
        assert_eq!(p.error_code, 0, "call {calls}: {p:?}");
        assert_eq!(last_offset + 1, p.base_offset, "call {calls}: {p:?}");
        last_offset = p.base_offset;
        // The first calls may wait for the topic's creation; after that, no call needs a
        // second attempt: no connection was closed under it.
        if calls > 0 {
            assert_eq!(p.attempts, 1, "call {calls}: {p:?}");
            assert!(!p.possibly_duplicated, "call {calls}: {p:?}");
        }
        calls += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let slots = server.forwarder.pool().slots();
    let sum = |f: fn(&leaderlink::kafka::connection::ConnStats) -> u64| -> u64 {
        slots.iter().map(|s| f(&s.stats)).sum()
    };
    let connects = sum(|s| s.connects.load(std::sync::atomic::Ordering::Relaxed));
    let poisoned = sum(|s| s.poisoned.load(std::sync::atomic::Ordering::Relaxed));
    println!("{calls} calls; leader connections opened {connects}, poisoned {poisoned}");
    assert_eq!(poisoned, 0, "a leader connection failed under load");
    assert!(
        connects >= 3,
        "the leader connection was renewed twice: {connects}"
    );
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real Kafka of scripts/kafka-cluster (scripts/test provides it)"]
async fn a_broker_that_refuses_the_credentials_fails_only_its_own_partitions() {
    // PLAIN user "bob" is known to nodes 1 and 2; node 3 refuses him.
    const REFUSING: i32 = 3;
    let topic = format!("secure-partial-{}", std::process::id());
    common::kafka::create_topic(&topic, 6, &[]).await;
    let mut cfg = secure_config(SaslMechanism::Plain, "bob-secret");
    cfg.kafka_sasl_username = Some("bob".into());
    // Bootstrap through node 1 only: the metadata connection needs a broker that takes bob.
    cfg.bootstrap.truncate(1);
    let (server, mut client) = leaderlink(&cfg).await;
    // A partition led by the refusing node and one led by another.
    let (mut refused, mut accepted) = (None, None);
    let started = Instant::now();
    while refused.is_none() || accepted.is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no leaders on both sides"
        );
        server
            .forwarder
            .metadata()
            .refresh(&[&topic], None, Instant::now() + Duration::from_secs(5))
            .await
            .unwrap();
        if let Some(TopicState::Partitions(parts)) =
            server.forwarder.metadata().leader_map().topics.get(&topic)
        {
            for (p, l) in parts.iter().enumerate() {
                match l.leader_id {
                    REFUSING => refused = Some(p as i32),
                    id if id > 0 => accepted = Some(p as i32),
                    _ => {}
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (refused, accepted) = (refused.unwrap(), accepted.unwrap());
    let call = |id: u64, partitions: &[i32]| {
        let mut req = request(id, Acks::All, &topic, partitions[0], records("p", 2));
        for &p in &partitions[1..] {
            let mut more = request(id, Acks::All, &topic, p, records("p", 2));
            req.partitions.append(&mut more.partitions);
        }
        let mut r = tonic::Request::new(req);
        r.set_timeout(Duration::from_secs(20));
        r
    };

    // Nothing of the call can be sent: the call as a whole is UNAVAILABLE, at once.
    let e = client.forward(call(1, &[refused])).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("SASL PLAIN authentication failed"),
        "{}",
        e.message()
    );

    // With a partition the other leaders take: that one is written and answered with its
    // offset, the refused one gets an error of its own.
    let resp = client
        .forward(call(2, &[accepted, refused]))
        .await
        .expect("a partial refusal is not a failed call")
        .into_inner();
    let (ok, no) = (&resp.partitions[0], &resp.partitions[1]);
    assert_eq!((ok.partition, ok.error_code), (accepted, 0), "{ok:?}");
    assert_eq!(ok.base_offset, 0, "{ok:?}");
    assert_eq!(no.partition, refused, "{no:?}");
    assert_eq!(no.error_name, "SASL_AUTHENTICATION_FAILED", "{no:?}");
    assert!(
        no.error_message.contains(&format!("broker {REFUSING}")),
        "{no:?}"
    );
    assert_eq!((no.base_offset, no.attempts), (-1, 0), "{no:?}");

    // The accepted partition's records are in its log: the next batch comes after them.
    let resp = client
        .forward(call(3, &[accepted]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.partitions[0].base_offset, 2, "{resp:?}");
    server.shutdown(Duration::from_secs(5)).await;
}
