//! Writes the seed corpora under `fuzz/corpus/<target>/seed-*`: small valid inputs encoded
//! with kafka-protocol and prost, in each target's input layout.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example seeds` (from the repository root).

use std::{fs, path::Path};

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::{
    messages::{
        ApiKey, ApiVersionsResponse, BrokerId, MetadataResponse, ProduceResponse, ResponseHeader,
        TopicName,
        api_versions_response::{ApiVersion, SupportedFeatureKey},
        metadata_response::{
            MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
        },
        produce_response::{
            BatchIndexAndErrorMessage, LeaderIdAndEpoch, NodeEndpoint, PartitionProduceResponse,
            TopicProduceResponse,
        },
    },
    protocol::{Encodable, StrBytes},
    records::{
        Compression, Record as KRecord, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    },
};
use leaderlink::proto::v1::{Acks, ForwardRequest, Header, PartitionData, Record};
use prost::Message;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

fn s(v: &'static str) -> StrBytes {
    StrBytes::from_static_str(v)
}

/// A response frame (header + body, no length prefix) in response_decode's layout.
fn response<T: Encodable>(api: ApiKey, selector: u8, lo: i16, version: i16, body: &T) -> Vec<u8> {
    let mut f = BytesMut::new();
    f.put_u8(selector);
    f.put_u8((version - lo) as u8);
    ResponseHeader::default()
        .with_correlation_id(7)
        .encode(&mut f, api.response_header_version(version))
        .unwrap();
    body.encode(&mut f, version).unwrap();
    f.to_vec()
}

fn produce_response(v: i16) -> ProduceResponse {
    let mut p = PartitionProduceResponse::default()
        .with_index(1)
        .with_base_offset(42)
        .with_log_append_time_ms(-1)
        .with_log_start_offset(0);
    if v >= 8 {
        p = p
            .with_error_code(87)
            .with_record_errors(vec![
                BatchIndexAndErrorMessage::default()
                    .with_batch_index(0)
                    .with_batch_index_error_message(Some(s("bad"))),
            ])
            .with_error_message(Some(s("INVALID_RECORD")));
    }
    if v >= 10 {
        p = p.with_current_leader(
            LeaderIdAndEpoch::default()
                .with_leader_id(BrokerId(2))
                .with_leader_epoch(3),
        );
    }
    let mut r = ProduceResponse::default().with_responses(vec![
        TopicProduceResponse::default()
            .with_name(TopicName(s("orders")))
            .with_partition_responses(vec![p]),
    ]);
    if v >= 10 {
        r = r.with_node_endpoints(vec![
            NodeEndpoint::default()
                .with_node_id(BrokerId(2))
                .with_host(s("b2"))
                .with_port(9092),
        ]);
    }
    r
}

fn metadata_response() -> MetadataResponse {
    MetadataResponse::default()
        .with_brokers(vec![
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(1))
                .with_host(s("b1"))
                .with_port(9092),
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(2))
                .with_host(s("b2"))
                .with_port(9092),
        ])
        .with_controller_id(BrokerId(1))
        .with_topics(vec![
            MetadataResponseTopic::default()
                .with_name(Some(TopicName(s("orders"))))
                .with_partitions(vec![
                    MetadataResponsePartition::default()
                        .with_partition_index(0)
                        .with_leader_id(BrokerId(1))
                        .with_replica_nodes(vec![BrokerId(1), BrokerId(2)])
                        .with_isr_nodes(vec![BrokerId(1)]),
                ]),
            MetadataResponseTopic::default()
                .with_error_code(3)
                .with_name(Some(TopicName(s("missing")))),
        ])
}

fn api_versions_response(v: i16) -> ApiVersionsResponse {
    let mut r = ApiVersionsResponse::default().with_api_keys(vec![
        ApiVersion::default()
            .with_api_key(0)
            .with_min_version(3)
            .with_max_version(12),
        ApiVersion::default()
            .with_api_key(3)
            .with_min_version(1)
            .with_max_version(12),
        ApiVersion::default()
            .with_api_key(18)
            .with_min_version(0)
            .with_max_version(3),
    ]);
    if v >= 3 {
        r = r
            .with_supported_features(vec![
                SupportedFeatureKey::default()
                    .with_name(s("metadata.version"))
                    .with_min_version(1)
                    .with_max_version(20),
            ])
            .with_finalized_features_epoch(5);
    }
    r
}

fn raw_batch(producer_id: i64) -> Bytes {
    let recs: Vec<KRecord> = (0..2)
        .map(|i| KRecord {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id,
            producer_epoch: if producer_id < 0 { -1 } else { 0 },
            timestamp_type: TimestampType::Creation,
            offset: i,
            sequence: i as i32,
            timestamp: 1_700_000_000_000 + i,
            key: Some(Bytes::from_static(b"k")),
            value: Some(Bytes::from(format!("v{i}"))),
            headers: [(s("h"), Some(Bytes::from_static(b"1")))]
                .into_iter()
                .collect(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &recs,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .unwrap();
    buf.freeze()
}

/// A forward_validate input: limit, clock, flags, then the request.
fn forward(max: u32, now_ms: i64, traceparent: bool, req: &ForwardRequest) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&max.to_be_bytes());
    f.extend_from_slice(&now_ms.to_be_bytes());
    f.push(u8::from(traceparent));
    f.extend_from_slice(&req.encode_to_vec());
    f
}

fn main() {
    // frame_decode: max_frame_bytes, largest chunk, chunking seed, stream.
    let frame = |body: &[u8]| {
        let mut f = (body.len() as i32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    };
    let mut two = frame(&[0, 0, 0, 7, 1, 2, 3]);
    two.extend(frame(&[0, 0, 0, 8]));
    two.extend_from_slice(&[0, 0]); // the start of a third length prefix
    for (name, max, chunk, stream) in [
        ("two-frames-whole", 1024u32, 0u8, two.clone()),
        ("two-frames-trickled", 1024, 3, two.clone()),
        ("exact-limit", 7, 1, frame(&[0, 0, 0, 9, 4, 5, 6])),
        ("over-limit", 6, 0, frame(&[0, 0, 0, 9, 4, 5, 6])),
        ("short-length", 1024, 2, vec![0, 0, 0, 3, 0, 0, 0]),
        ("negative-length", 1024, 0, vec![0xff, 0xff, 0xff, 0xfb]),
        (
            "huge-prefix",
            u32::MAX,
            5,
            vec![0x7f, 0xff, 0xff, 0xff, 1, 2, 3],
        ),
    ] {
        let mut f = max.to_be_bytes().to_vec();
        f.push(chunk);
        f.extend_from_slice(&[0x12, 0x34]);
        f.extend(stream);
        write("frame_decode", name, &f);
    }

    // response_decode: API selector (0 Produce, 1 Metadata, 2 ApiVersions), version offset.
    for v in [3, 7, 8, 9, 10, 12] {
        let f = response(ApiKey::Produce, 0, 3, v, &produce_response(v));
        write("response_decode", &format!("produce-v{v}"), &f);
    }
    for v in [1, 4, 7, 9, 10, 12] {
        let f = response(ApiKey::Metadata, 1, 1, v, &metadata_response());
        write("response_decode", &format!("metadata-v{v}"), &f);
    }
    for v in 0..=3 {
        let f = response(ApiKey::ApiVersions, 2, 0, v, &api_versions_response(v));
        write("response_decode", &format!("api-versions-v{v}"), &f);
    }
    // A broker that does not know ApiVersions v3 answers UNSUPPORTED_VERSION with a v0 body.
    let mut f = response(
        ApiKey::ApiVersions,
        2,
        0,
        0,
        &ApiVersionsResponse::default()
            .with_error_code(35)
            .with_api_keys(vec![
                ApiVersion::default().with_api_key(18).with_max_version(2),
            ]),
    );
    f[1] = 3;
    write("response_decode", "api-versions-v3-unsupported", &f);

    // forward_validate.
    let now = 1_700_000_000_000;
    let records = ForwardRequest {
        id: 7,
        acks: Acks::All as i32,
        timeout_ms: 1500,
        partitions: vec![
            PartitionData {
                topic: "orders".into(),
                partition: 0,
                record_batch: Bytes::new(),
                records: vec![
                    Record {
                        key: Some(Bytes::from_static(b"k1")),
                        value: Some(Bytes::from_static(b"v1")),
                        headers: vec![
                            Header {
                                key: "h".into(),
                                value: Some(Bytes::from_static(b"x")),
                            },
                            Header {
                                key: "h".into(),
                                value: None,
                            },
                        ],
                        timestamp_ms: 0,
                    },
                    Record {
                        key: None,
                        value: None,
                        headers: vec![],
                        timestamp_ms: now + 5,
                    },
                ],
            },
            PartitionData {
                topic: "orders.v2_x-1".into(),
                partition: 3,
                record_batch: Bytes::new(),
                records: vec![Record {
                    key: Some(Bytes::new()),
                    value: Some(Bytes::from_static(b"only")),
                    headers: vec![Header {
                        key: "traceparent".into(),
                        value: Some(Bytes::from_static(b"mine")),
                    }],
                    timestamp_ms: 1,
                }],
            },
        ],
        transactional_id: String::new(),
        compression: 0,
        call_timeout_ms: 0,
    };
    write(
        "forward_validate",
        "records",
        &forward(1 << 20, now, true, &records),
    );
    let raw = |producer_id| ForwardRequest {
        id: 8,
        acks: Acks::Leader as i32,
        timeout_ms: 0,
        partitions: vec![PartitionData {
            topic: "orders".into(),
            partition: 1,
            record_batch: raw_batch(producer_id),
            records: vec![],
        }],
        transactional_id: String::new(),
        compression: 0,
        call_timeout_ms: 0,
    };
    write(
        "forward_validate",
        "raw-batch",
        &forward(1 << 20, now, false, &raw(-1)),
    );
    write(
        "forward_validate",
        "raw-batch-idempotent",
        &forward(1 << 20, now, true, &raw(42)),
    );
    let mut both = raw(-1);
    both.partitions[0].records = records.partitions[1].records.clone();
    both.acks = 9;
    write(
        "forward_validate",
        "invalid-both",
        &forward(64, now, false, &both),
    );
}
