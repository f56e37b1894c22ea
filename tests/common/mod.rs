//! Shared test harnesses: an embedded mock cluster with an in-process leaderlink on 127.0.0.1:0
//! (here), the scripted fake broker (`fake_broker`), the real Kafka of
//! `scripts/kafka-cluster` (`kafka`), and a minimal Kafka client (`kafka_client`).
#![allow(dead_code)]

pub mod fake_broker;
pub mod kafka;
pub mod kafka_client;

use std::{
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use bytes::Bytes;
use leaderlink::{
    config::Config,
    dev::DevCluster,
    proto::v1::{
        Acks, ForwardRequest, ForwardResponse, LeaderConnection, ListConnectionsRequest,
        PartitionData, PartitionResult, Record, admin_client::AdminClient,
        forwarder_client::ForwarderClient,
    },
    server::{self, Running},
};
use tonic::transport::Channel;

/// Tests of one binary that sample the process (RSS, open descriptors) take this exclusively;
/// the other tests of that binary hold it shared, so nothing else runs while they sample.
pub static PROCESS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

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
    let (server, client) = start_with_client(&cfg).await;
    Harness {
        server,
        client,
        dev,
    }
}

/// Starts leaderlink with `cfg` (see [`start_server`]) and connects a client to it.
pub async fn start_with_client(cfg: &Config) -> (Running, ForwarderClient<Channel>) {
    let server = start_server(cfg).await;
    let client = ForwarderClient::connect(format!("http://{}", server.addr))
        .await
        .expect("client connects");
    (server, client)
}

/// Starts leaderlink with `cfg` on free loopback ports (gRPC, admin and metrics).
pub async fn start_server(cfg: &Config) -> Running {
    logs();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = cfg.clone();
    cfg.metrics_listen = "127.0.0.1:0".parse().unwrap();
    server::start(&cfg, listener, admin)
        .await
        .expect("server starts")
}

/// Logs of the in-process leaderlink on stderr, filtered by `LEADERLINK_TEST_LOG` (a tracing
/// filter such as `leaderlink=debug`) when it is set: for reading a failed run by hand.
pub fn logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    if let Ok(filter) = std::env::var("LEADERLINK_TEST_LOG") {
        ONCE.call_once(|| {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_ansi(false)
                .with_writer(std::io::stderr)
                .try_init();
        });
    }
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
        call_timeout_ms: 0,
        id,
        acks: acks as i32,
        timeout_ms: 0,
        partitions: vec![PartitionData {
            topic: topic.to_string(),
            partition,
            record_batch: Bytes::new(),
            records: recs,
        }],
        transactional_id: String::new(),
        compression: 0,
    }
}

/// A request with one entry of partition -1 (leaderlink chooses) per record of `recs`.
pub fn choose_each(id: u64, acks: Acks, topic: &str, recs: Vec<Record>) -> ForwardRequest {
    let mut req = request(id, acks, topic, -1, vec![]);
    req.partitions = recs
        .into_iter()
        .map(|r| PartitionData {
            topic: topic.to_string(),
            partition: -1,
            record_batch: Bytes::new(),
            records: vec![r],
        })
        .collect();
    req
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

/// Creates a fresh topic with `partitions` and forwards one record to partition 0, so the
/// leader map and the leader connection exist before a test's load. Returns the topic and that
/// first result.
pub async fn warm_topic(h: &Harness, prefix: &str, partitions: i32) -> (String, PartitionResult) {
    let t = topic(prefix);
    h.dev.create_topic(&t, partitions).unwrap();
    let mut c = h.client.clone();
    let r = forward_one(&mut c, request(0, Acks::Leader, &t, 0, records("warm", 1)))
        .await
        .unwrap();
    assert_eq!(r.error_code, 0, "warm-up: {r:?}");
    (t, r)
}

/// A client of the harness's Admin service.
pub async fn admin(h: &Harness) -> AdminClient<Channel> {
    AdminClient::connect(format!("http://{}", h.server.admin_addr))
        .await
        .unwrap()
}

/// Admin/ListConnections.
pub async fn connections(a: &mut AdminClient<Channel>) -> Vec<LeaderConnection> {
    a.list_connections(ListConnectionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .connections
}

/// One v2 record batch built with kafka-protocol's encoder: `values` as records, with
/// `producer_id` (-1 for none) and sequences from `first_sequence`.
pub fn raw_batch(values: &[&str], producer_id: i64, first_sequence: i32) -> Bytes {
    let epoch = if producer_id < 0 { -1 } else { 0 };
    producer_batch(values, producer_id, epoch, first_sequence, false)
}

/// [`raw_batch`] with the producer epoch and the transactional flag (attributes bit 0x10) set
/// as given: a batch of an idempotent or transactional producer.
pub fn producer_batch(
    values: &[&str],
    producer_id: i64,
    producer_epoch: i16,
    first_sequence: i32,
    transactional: bool,
) -> Bytes {
    encode_batch(
        values,
        producer_id,
        producer_epoch,
        first_sequence,
        transactional,
        kafka_protocol::records::Compression::None,
    )
}

/// A batch of `values` without producer id, compressed with `compression` by kafka-protocol.
pub fn compressed_batch(
    values: &[&str],
    compression: kafka_protocol::records::Compression,
) -> Bytes {
    encode_batch(values, -1, -1, -1, false, compression)
}

fn encode_batch(
    values: &[&str],
    producer_id: i64,
    producer_epoch: i16,
    first_sequence: i32,
    transactional: bool,
    compression: kafka_protocol::records::Compression,
) -> Bytes {
    use kafka_protocol::{
        protocol::StrBytes,
        records::{Record as KRecord, RecordBatchEncoder, RecordEncodeOptions, TimestampType},
    };
    let recs: Vec<KRecord> = values
        .iter()
        .enumerate()
        .map(|(i, v)| KRecord {
            transactional,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id,
            producer_epoch,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            // kafka-protocol starts a new batch unless offset - sequence stays constant.
            sequence: first_sequence + i as i32,
            timestamp: 1_700_000_000_000 + i as i64,
            key: None,
            value: Some(Bytes::from(v.to_string())),
            headers: [(
                StrBytes::from_static_str("h"),
                Some(Bytes::from_static(b"1")),
            )]
            .into_iter()
            .collect(),
        })
        .collect();
    let mut buf = bytes::BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &recs,
        &RecordEncodeOptions {
            version: 2,
            compression,
        },
    )
    .unwrap();
    buf.freeze()
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A blocking GET over HTTP/1.0 (so the answer is neither chunked nor kept alive): status,
/// header block and body; `None` when nothing answers.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, head.to_string(), body.to_string()))
}

/// Reads `n` messages of `topic`/`partition` from the beginning with an rdkafka consumer:
/// (value, `traceparent` header).
pub fn read_back(
    bootstrap: &str,
    topic: &str,
    partition: i32,
    n: usize,
) -> Vec<(Vec<u8>, Option<String>)> {
    use rdkafka::{
        ClientConfig, Message, Offset, TopicPartitionList,
        consumer::{BaseConsumer, Consumer},
        message::Headers,
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("read-{topic}"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let started = tokio::time::Instant::now();
    while out.len() < n {
        assert!(started.elapsed() < Duration::from_secs(30), "read {out:?}");
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.unwrap();
        let tp = m.headers().and_then(|hs| {
            hs.iter()
                .find(|h| h.key == "traceparent")
                .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
        });
        out.push((m.payload().unwrap_or_default().to_vec(), tp));
    }
    out
}
