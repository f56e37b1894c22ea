//! A minimal Kafka client over one connection, for tests that play a Kafka client's side
//! themselves (a transactional producer's coordinator calls, a Fetch that shows the leader's
//! record batches) with kafka-protocol's messages.

use bytes::{Bytes, BytesMut};
use kafka_protocol::{
    messages::{
        FetchRequest, RequestHeader, ResponseHeader, TopicName,
        fetch_request::{FetchPartition, FetchTopic},
    },
    protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes},
    records::{Compression, RecordBatchDecoder},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// One connection; one request at a time.
pub struct KafkaClient {
    stream: TcpStream,
    next_id: i32,
}

impl KafkaClient {
    pub async fn connect(addr: &str) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.unwrap(),
            next_id: 1,
        }
    }

    pub async fn call<R: Request>(&mut self, version: i16, req: &R) -> R::Response {
        let id = self.next_id;
        self.next_id += 1;
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(id)
            .with_client_id(Some(StrBytes::from_static_str("leaderlink-test")));
        let mut buf = BytesMut::new();
        header.encode(&mut buf, R::header_version(version)).unwrap();
        req.encode(&mut buf, version).unwrap();
        self.stream.write_i32(buf.len() as i32).await.unwrap();
        self.stream.write_all(&buf).await.unwrap();
        let len = self.stream.read_i32().await.unwrap();
        let mut body = vec![0; len as usize];
        self.stream.read_exact(&mut body).await.unwrap();
        let mut body = Bytes::from(body);
        let h = ResponseHeader::decode(
            &mut body,
            <R::Response as HeaderVersion>::header_version(version),
        )
        .unwrap();
        assert_eq!(h.correlation_id, id);
        R::Response::decode(&mut body, version).unwrap()
    }
}

/// The record batches `partition` of `topic` holds on its leader at `leader` (`host:port`),
/// from offset 0 on: per batch, its records' (offset, value). See [`read_batches_with_codec`].
pub async fn read_batches(leader: &str, topic: &str, partition: i32) -> Vec<Vec<(i64, Bytes)>> {
    read_batches_with_codec(leader, topic, partition)
        .await
        .into_iter()
        .map(|(_, b)| b)
        .collect()
}

/// The record batches `partition` of `topic` holds on its leader at `leader` (`host:port`),
/// from offset 0 on: per batch, its codec and its records' (offset, value). Fetch v4 (no
/// ApiVersions needed) from the end of the last batch read until nothing more comes (the mock
/// cluster answers one batch per Fetch).
pub async fn read_batches_with_codec(
    leader: &str,
    topic: &str,
    partition: i32,
) -> Vec<(Compression, Vec<(i64, Bytes)>)> {
    let mut client = KafkaClient::connect(leader).await;
    let mut out: Vec<(Compression, Vec<(i64, Bytes)>)> = Vec::new();
    loop {
        let from = out.last().and_then(|b| b.1.last()).map_or(0, |r| r.0 + 1);
        let req = FetchRequest::default()
            .with_max_wait_ms(0)
            .with_min_bytes(0)
            .with_max_bytes(16 * 1024 * 1024)
            .with_topics(vec![
                FetchTopic::default()
                    .with_topic(TopicName(StrBytes::from_string(topic.to_string())))
                    .with_partitions(vec![
                        FetchPartition::default()
                            .with_partition(partition)
                            .with_fetch_offset(from)
                            .with_partition_max_bytes(16 * 1024 * 1024),
                    ]),
            ]);
        let resp = client.call(4, &req).await;
        let p = &resp.responses[0].partitions[0];
        assert_eq!(p.error_code, 0, "Fetch of {topic}-{partition}: {p:?}");
        let mut records = p.records.clone().unwrap_or_default();
        let before = out.len();
        for set in RecordBatchDecoder::decode_all(&mut records).expect("whole v2 batches") {
            let batch: Vec<(i64, Bytes)> = set
                .records
                .into_iter()
                .map(|r| (r.offset, r.value.unwrap_or_default()))
                .collect();
            // A Fetch may start with the batch that holds `from`.
            if batch.last().is_some_and(|r| r.0 >= from) {
                out.push((set.compression, batch));
            }
        }
        if out.len() == before {
            return out;
        }
    }
}
