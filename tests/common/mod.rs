//! Shared test harness: an embedded mock cluster and an in-process leaderlink on 127.0.0.1:0.
#![allow(dead_code)]

use std::{
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use bytes::Bytes;
use leaderlink::{
    config::Config,
    dev::DevCluster,
    proto::v1::{
        Acks, ForwardRequest, ForwardResponse, PartitionData, PartitionResult, Record,
        forwarder_client::ForwarderClient,
    },
    server::{self, Running},
};
use tonic::transport::Channel;

/// A mock cluster with a leaderlink in front of it.
pub struct Harness {
    pub server: Running,
    pub client: ForwarderClient<Channel>,
    pub dev: DevCluster,
}

/// Starts a 3-broker mock cluster and a leaderlink, with `tweak` applied to the config.
pub async fn start(tweak: impl FnOnce(&mut Config)) -> Harness {
    let dev = DevCluster::start(3).expect("mock cluster");
    let mut cfg = Config {
        bootstrap: dev.bootstrap().split(',').map(str::to_string).collect(),
        ..Config::default()
    };
    tweak(&mut cfg);
    cfg.validate().expect("valid test config");
    let server = start_server(&cfg).await;
    let client = ForwarderClient::connect(format!("http://{}", server.addr))
        .await
        .expect("client connects");
    Harness {
        server,
        client,
        dev,
    }
}

/// Starts leaderlink with `cfg` on two free loopback ports.
pub async fn start_server(cfg: &Config) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    server::start(cfg, listener, admin)
        .await
        .expect("server starts")
}

/// A topic name no other test uses.
pub fn topic(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `n` records with values `"{tag}-{i}"`.
pub fn records(tag: &str, n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            key: Some(Bytes::from(format!("k{i}"))),
            value: Some(Bytes::from(format!("{tag}-{i}"))),
            headers: vec![],
            timestamp_ms: 0,
        })
        .collect()
}

/// A one-partition request carrying `records`.
pub fn request(
    id: u64,
    acks: Acks,
    topic: &str,
    partition: i32,
    recs: Vec<Record>,
) -> ForwardRequest {
    ForwardRequest {
        id,
        acks: acks as i32,
        timeout_ms: 0,
        partitions: vec![PartitionData {
            topic: topic.to_string(),
            partition,
            record_batch: Bytes::new(),
            records: recs,
        }],
    }
}

/// Forwards with a deadline and returns the single partition's result.
pub async fn forward_one(
    client: &mut ForwarderClient<Channel>,
    req: ForwardRequest,
) -> Result<PartitionResult, tonic::Status> {
    let mut resp = forward(client, req).await?;
    assert_eq!(resp.partitions.len(), 1);
    Ok(resp.partitions.remove(0))
}

/// Forwards with a 10 s deadline.
pub async fn forward(
    client: &mut ForwarderClient<Channel>,
    req: ForwardRequest,
) -> Result<ForwardResponse, tonic::Status> {
    let mut r = tonic::Request::new(req);
    r.set_timeout(Duration::from_secs(10));
    client.forward(r).await.map(|r| r.into_inner())
}
