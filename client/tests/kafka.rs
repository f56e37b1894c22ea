//! The client's merged requests against a real Apache Kafka, where the leader refuses a batch
//! for one record (INVALID_RECORD) or for its size (MESSAGE_TOO_LARGE): each call gets the answer
//! it would have got alone.
//!
//! `#[ignore]`d in a plain `cargo test`; the README's test command runs them with
//! `LEADERLINK_KAFKA_BOOTSTRAP` set (`scripts/kafka-cluster start 3`).

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use leaderlink::{config::Config, server};
use leaderlink_client::{Acks, Client, Options, Payload, Record};
use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
};
use tokio::time::Instant;

fn bootstrap() -> String {
    std::env::var("LEADERLINK_KAFKA_BOOTSTRAP").expect(
        "LEADERLINK_KAFKA_BOOTSTRAP: run `scripts/kafka-cluster start 3` (scripts/test does)",
    )
}

/// A topic name of its own for this run.
fn topic(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("client-{prefix}-{nanos}")
}

async fn create_topic(name: &str, configs: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    let topic = configs.iter().fold(
        NewTopic::new(name, 1, TopicReplication::Fixed(3)),
        |t, (k, v)| t.set(k, v),
    );
    for r in admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
}

/// leaderlink in front of the real Kafka, with leaderlink's own record merging off (so that
/// only the client merges), and a client of one connection to it.
async fn start() -> (server::Running, Client) {
    let cfg = Config {
        bootstrap: bootstrap().split(',').map(str::to_string).collect(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        max_batch_bytes: 0,
        ..Config::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = server::start(&cfg, listener, admin).await.unwrap();
    let client = Client::connect(
        &[format!("http://{}", running.addr)],
        Options {
            connections: 1,
            ..Options::default()
        },
    )
    .await
    .unwrap();
    (running, client)
}

// One thread: every call is queued before the lane runs, so they share its first message.
#[tokio::test]
#[ignore = "needs a real Kafka: LEADERLINK_KAFKA_BOOTSTRAP (scripts/test starts one)"]
async fn kafka_a_record_error_in_a_merged_request_reaches_only_the_call_that_holds_it() {
    let topic = topic("compacted");
    create_topic(&topic, &[("cleanup.policy", "compact")]).await;
    let (server, client) = start().await;
    // Five calls of two records each, with one deadline: one merged request. Call 3's second
    // record has no key, which a compacted topic refuses.
    let deadline = Instant::now() + Duration::from_secs(20);
    let calls = (1..=5).map(|i| {
        let records = (0..2)
            .map(|j| Record {
                key: (i != 3 || j == 0).then(|| format!("c{i}-{j}").into()),
                value: Some(format!("c{i}-{j}").into()),
                ..Default::default()
            })
            .collect();
        client.forward(&topic, 0, Payload::Records(records), Acks::Leader, deadline)
    });
    let results: Vec<_> = join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for (i, r) in (1..=5).zip(&results) {
        if i == 3 {
            assert_eq!(r.error_name, "INVALID_RECORD", "{r:?}");
            assert_eq!(r.base_offset, -1, "{r:?}");
            assert_eq!(r.record_errors.len(), 1, "{r:?}");
            assert_eq!(
                r.record_errors[0].batch_index, 1,
                "the index in call 3's own records: {r:?}"
            );
            assert!(r.error_message.contains("record 1:"), "{r:?}");
        } else {
            // Refused with the merged request for call 3's record, then sent again alone.
            assert_eq!((r.error_code, r.attempts), (0, 2), "call {i}: {r:?}");
            assert!(r.record_errors.is_empty(), "{r:?}");
        }
    }
    // Each other call's records are at its offsets, in the order the calls were made.
    let back = common::read_back(&bootstrap(), &topic, 0, 8);
    let mut at = 0;
    for (i, r) in (1..=5).zip(&results).filter(|(i, _)| *i != 3) {
        assert_eq!(r.base_offset, at as i64, "call {i}: {r:?}");
        for j in 0..2 {
            let want = format!("c{i}-{j}").into_bytes();
            assert_eq!(back[at], (want.clone(), want), "call {i}");
            at += 1;
        }
    }
    server.shutdown(Duration::from_secs(5)).await;
}

// One thread: every call is queued before the lane runs, so they share its first message.
#[tokio::test]
#[ignore = "needs a real Kafka: LEADERLINK_KAFKA_BOOTSTRAP (scripts/test starts one)"]
async fn kafka_a_merged_request_over_the_topics_size_limit_is_sent_again_call_by_call() {
    let topic = topic("small-batches");
    // Each call's batch fits the topic's limit; four of them together do not.
    create_topic(&topic, &[("max.message.bytes", "2000")]).await;
    let (server, client) = start().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let calls = (0..4u8).map(|i| {
        let record = Record {
            key: Some(vec![b'k', b'0' + i].into()),
            value: Some(vec![b'0' + i; 700].into()),
            ..Default::default()
        };
        client.forward(
            &topic,
            0,
            Payload::Records(vec![record]),
            Acks::Leader,
            deadline,
        )
    });
    let results: Vec<_> = join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for (i, r) in results.iter().enumerate() {
        // One merged request refused, then one request for each call, in their order.
        assert_eq!((r.error_code, r.attempts), (0, 2), "call {i}: {r:?}");
        assert_eq!(r.base_offset, i as i64, "call {i}: {r:?}");
    }
    for (i, (key, value)) in common::read_back(&bootstrap(), &topic, 0, 4)
        .into_iter()
        .enumerate()
    {
        let i = i as u8;
        assert_eq!((key, value), (vec![b'k', b'0' + i], vec![b'0' + i; 700]));
    }
    server.shutdown(Duration::from_secs(5)).await;
}
