//! The gRPC surface: health, reflection (v1 and v1alpha), and INVALID_ARGUMENT / UNAVAILABLE /
//! DEADLINE_EXCEEDED for calls that cannot succeed.

use crate::common;

use std::{sync::atomic::Ordering, time::Duration};

use bytes::Bytes;
use common::{forward, forward_one, records, request, start, topic};
use futures::StreamExt;
use leaderlink::{
    config::Config,
    proto::v1::{Acks, ForwardRequest, PartitionData, Record, forwarder_client::ForwarderClient},
};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

async fn channel(url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn health(addr: std::net::SocketAddr, service: &str) -> ServingStatus {
    let mut h = HealthClient::new(channel(&format!("http://{addr}")).await);
    let r = h
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

async fn wait_for(addr: std::net::SocketAddr, want: ServingStatus) {
    for _ in 0..100 {
        if health(addr, "").await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("health never became {want:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_once_metadata_is_fetched() {
    let h = start(|_| {}).await;
    wait_for(h.server.addr, ServingStatus::Serving).await;
    assert_eq!(
        health(h.server.addr, "leaderlink.v1.Forwarder").await,
        ServingStatus::Serving
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_reachable_broker_health_is_not_serving_and_calls_are_unavailable() {
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap().to_string();
    drop(closed);
    let cfg = Config {
        bootstrap: vec![dead],
        ..Config::default()
    };
    let s = common::start_server(&cfg).await;
    assert_eq!(health(s.addr, "").await, ServingStatus::NotServing);
    let mut c = ForwarderClient::connect(format!("http://{}", s.addr))
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let e = forward(&mut c, request(1, Acks::All, "t", 0, records("a", 1)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("connecting to"), "{e:?}");
    // Answered without waiting for the 10 s deadline.
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_on_v1_and_v1alpha() {
    let h = start(|_| {}).await;
    let url = format!("http://{}", h.server.addr);
    {
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut c = ServerReflectionClient::new(channel(&url).await);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = c
            .server_reflection_info(futures::stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            resp.next().await.unwrap().unwrap().message_response
        else {
            panic!("no list")
        };
        let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        for want in [
            "leaderlink.v1.Forwarder",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
    }
    {
        use tonic_reflection::pb::v1alpha::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut c = ServerReflectionClient::new(channel(&url).await);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = c
            .server_reflection_info(futures::stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            resp.next().await.unwrap().unwrap().message_response
        else {
            panic!("no list")
        };
        assert!(
            list.service
                .iter()
                .any(|s| s.name == "leaderlink.v1.Forwarder")
        );
    }
}

fn part(topic: &str, partition: i32) -> PartitionData {
    PartitionData {
        topic: topic.into(),
        partition,
        record_batch: Bytes::new(),
        records: records("v", 1),
    }
}

fn req(parts: Vec<PartitionData>) -> ForwardRequest {
    ForwardRequest {
        call_timeout_ms: 0,
        id: 1,
        acks: Acks::All as i32,
        timeout_ms: 0,
        partitions: parts,
        transactional_id: String::new(),
        compression: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_invalid_argument_naming_the_field_and_reach_no_leader() {
    let h = start(|cfg| cfg.max_request_bytes = 4096).await;
    let t = topic("valid");
    h.dev.create_topic(&t, 1).unwrap();
    let mut c = h.client.clone();
    // Warm up: metadata and the leader connection exist, so counters below are meaningful.
    forward_one(&mut c, request(0, Acks::All, &t, 0, records("w", 1)))
        .await
        .unwrap();
    let sent = |h: &common::Harness| h.server.forwarder.pool().requests_sent();
    let before = sent(&h);

    // A valid batch, to corrupt in each way the validation must catch.
    let good_batch = {
        leaderlink::forward::batch::encode(
            &[Record {
                key: None,
                value: Some(Bytes::from_static(b"v")),
                headers: vec![],
                timestamp_ms: 1,
            }],
            1,
        )
    };
    let with_batch = |b: Bytes| PartitionData {
        topic: t.clone(),
        partition: 0,
        record_batch: b,
        records: vec![],
    };
    let mut corrupt_crc = good_batch.to_vec();
    *corrupt_crc.last_mut().unwrap() ^= 1;
    let mut bad_magic = good_batch.to_vec();
    bad_magic[16] = 1;
    let mut longer = good_batch.to_vec();
    longer.extend_from_slice(&[0; 5]);
    let mut both = with_batch(good_batch.clone());
    both.records = records("v", 1);
    let mut neither = part(&t, 0);
    neither.records.clear();
    let huge = PartitionData {
        topic: t.clone(),
        partition: 0,
        record_batch: Bytes::new(),
        records: vec![Record {
            key: None,
            value: Some(Bytes::from(vec![b'x'; 5000])),
            headers: vec![],
            timestamp_ms: 0,
        }],
    };

    let cases: Vec<(&str, ForwardRequest, &str, &str)> = vec![
        (
            "empty topic",
            req(vec![part("", 0)]),
            "partitions[0].topic",
            "empty",
        ),
        (
            "bad chars",
            req(vec![part("a/b", 0)]),
            "partitions[0].topic",
            "[a-zA-Z0-9._-]",
        ),
        (
            "long topic",
            req(vec![part(&"a".repeat(250), 0)]),
            "partitions[0].topic",
            "249",
        ),
        (
            // -1 asks leaderlink to choose; below it is no partition.
            "negative partition",
            req(vec![part(&t, 0), part(&t, -2)]),
            "partitions[1].partition",
            ">= 0",
        ),
        (
            "both payloads",
            req(vec![both]),
            "partitions[0].record_batch",
            "both",
        ),
        (
            "neither payload",
            req(vec![neither]),
            "partitions[0].records",
            "neither",
        ),
        (
            "short batch",
            req(vec![with_batch(good_batch.slice(..30))]),
            "record_batch",
            "61",
        ),
        (
            "magic",
            req(vec![with_batch(Bytes::from(bad_magic))]),
            "record_batch",
            "magic",
        ),
        (
            "length",
            req(vec![with_batch(Bytes::from(longer))]),
            "record_batch",
            "length field",
        ),
        (
            "crc",
            req(vec![with_batch(Bytes::from(corrupt_crc))]),
            "record_batch",
            "CRC",
        ),
        ("too large", req(vec![huge]), "request", "max_request_bytes"),
        (
            "transactional batch without a transactional id",
            req(vec![with_batch(common::producer_batch(
                &["v"],
                7,
                0,
                0,
                true,
            ))]),
            "transactional_id",
            "partitions[0].record_batch is transactional",
        ),
        (
            "plain batch under a transactional id",
            ForwardRequest {
                transactional_id: "tx-1".into(),
                compression: 0,
                ..req(vec![
                    with_batch(common::producer_batch(&["v"], 7, 0, 0, true)),
                    with_batch(good_batch.clone()),
                ])
            },
            "partitions[1].record_batch",
            "not transactional",
        ),
        (
            "records under a transactional id",
            ForwardRequest {
                transactional_id: "tx-1".into(),
                compression: 0,
                ..req(vec![part(&t, 0)])
            },
            "partitions[0].records",
            "transactional_id",
        ),
        ("no partitions", req(vec![]), "partitions", "at least one"),
        (
            "unknown acks",
            ForwardRequest {
                acks: 9,
                ..req(vec![part(&t, 0)])
            },
            "acks",
            "unknown value",
        ),
    ];
    for (name, r, field, reason) in cases {
        let e = forward(&mut c, r).await.expect_err(name);
        assert_eq!(e.code(), Code::InvalidArgument, "{name}: {e:?}");
        assert!(e.message().contains(field), "{name}: {}", e.message());
        assert!(e.message().contains(reason), "{name}: {}", e.message());
    }
    assert_eq!(sent(&h), before, "no bad request reached a leader");
    // The server is still up and forwarding.
    let r = forward_one(&mut c, request(2, Acks::All, &t, 0, records("w", 1)))
        .await
        .unwrap();
    assert_eq!((r.error_code, r.base_offset), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_shorter_than_the_leader_gets_deadline_exceeded() {
    let h = start(|_| {}).await;
    let t = topic("slow");
    h.dev.create_topic(&t, 1).unwrap();
    let mut c = h.client.clone();
    forward_one(&mut c, request(0, Acks::All, &t, 0, records("w", 1)))
        .await
        .unwrap();
    h.dev
        .set_leader_latency(Duration::from_millis(1500))
        .unwrap();
    let mut r = tonic::Request::new(request(1, Acks::All, &t, 0, records("s", 1)));
    r.set_timeout(Duration::from_millis(300));
    let e = c.forward(r).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    // The timed-out request poisoned its connection; the next call reconnects and succeeds.
    h.dev.set_leader_latency(Duration::ZERO).unwrap();
    let r = forward_one(&mut c, request(2, Acks::All, &t, 0, records("w", 1)))
        .await
        .unwrap();
    assert_eq!(r.error_code, 0, "{r:?}");
    let poisoned: u64 = h
        .server
        .forwarder
        .pool()
        .slots()
        .iter()
        .map(|s| s.stats.poisoned.load(Ordering::Relaxed))
        .sum();
    assert!(poisoned >= 1);
}
