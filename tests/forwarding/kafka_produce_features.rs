//! Partition choice and compression against a real Apache Kafka, with Kafka's own Java code and
//! librdkafka (kcat) as the judges:
//! * for 1,000 keys, the partition leaderlink chooses is the one Java's default partitioner
//!   gives (`scripts/kafka/ProduceFeatures.java partitions`);
//! * records compressed with each codec are read back by kcat and by Java's KafkaConsumer with
//!   the same keys, values and headers, and the batches in the leader's log segment carry the
//!   codec.
//!
//! `#[ignore]`d in a plain `cargo test`; the README's test command runs them with
//! `LEADERLINK_KAFKA_BOOTSTRAP` set, kcat installed and Kafka's jars fetched.

use crate::common;

use std::{io::Write, process::Stdio, time::Duration};

use bytes::Bytes;
use leaderlink::{
    kafka::Codec,
    proto::v1::{Acks, Compression, Header, Record},
};

/// 1,000 keys: text keys, and bytes of every length from 0 (the empty key) to 36, each byte
/// of the full range.
fn keys() -> Vec<Vec<u8>> {
    (0..1000u32)
        .map(|i| {
            if i % 2 == 0 {
                format!("customer-{i}").into_bytes()
            } else {
                (0..i % 37)
                    .map(|j| (i.wrapping_mul(2_654_435_761).rotate_left(j) >> 7) as u8)
                    .collect()
            }
        })
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Kafka: LEADERLINK_KAFKA_BOOTSTRAP (scripts/test starts one)"]
async fn kafka_a_key_lands_where_javas_default_partitioner_puts_it() {
    const PARTITIONS: i32 = 7;
    let topic = common::topic("java-partitioner");
    common::kafka::create_topic(&topic, PARTITIONS, &[]).await;
    let (server, mut client) = common::kafka::start(|_| {}).await;
    let keys = keys();

    let mut chosen = Vec::new();
    for (n, chunk) in keys.chunks(100).enumerate() {
        let recs = chunk
            .iter()
            .map(|k| Record {
                key: Some(Bytes::from(k.clone())),
                value: Some(Bytes::from_static(b"v")),
                headers: vec![],
                timestamp_ms: 0,
            })
            .collect();
        let req = common::choose_each(n as u64, Acks::All, &topic, recs);
        let resp = common::forward(&mut client, req).await.unwrap();
        for r in resp.partitions {
            assert_eq!(r.error_code, 0, "{r:?}");
            chosen.push(r.partition);
        }
    }

    let mut java = common::kafka::java("ProduceFeatures.java")
        .args(["partitions", &PARTITIONS.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let input: String = keys.iter().map(|k| hex(k) + "\n").collect();
    java.stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = java.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ProduceFeatures.java partitions failed"
    );
    let javas: Vec<i32> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(javas.len(), keys.len());
    let differ: Vec<(String, i32, i32)> = keys
        .iter()
        .zip(chosen.iter().zip(&javas))
        .filter(|(_, (a, b))| a != b)
        .map(|(k, (a, b))| (hex(k), *a, *b))
        .collect();
    assert!(differ.is_empty(), "(key, leaderlink, Java): {differ:?}");
    let used: std::collections::BTreeSet<i32> = chosen.iter().copied().collect();
    assert_eq!(used.len(), PARTITIONS as usize, "{used:?}");
    server.shutdown(Duration::from_secs(5)).await;
}

/// One record as written and as read back: key, value and headers, hex or "-".
type Seen = (String, String, Vec<(String, String)>);

fn opt_hex(b: Option<&[u8]>) -> String {
    b.map_or("-".into(), hex)
}

/// The records of call `call` for `codec`: keyed and keyless, a tombstone, headers with a
/// repeated key and a null value; values long enough to compress.
fn codec_records(codec: &str, call: usize) -> Vec<Record> {
    (0..20)
        .map(|i| Record {
            key: (i % 5 != 4).then(|| Bytes::from(format!("{codec}-{call}-k{i}"))),
            value: (i != 7).then(|| Bytes::from(format!("{codec} {call} {i} {}", "v".repeat(300)))),
            headers: vec![
                Header {
                    key: "h".into(),
                    value: Some(Bytes::from(format!("{i}"))),
                },
                Header {
                    key: "h".into(),
                    value: None,
                },
            ],
            timestamp_ms: 0,
        })
        .collect()
}

fn seen(r: &Record) -> Seen {
    (
        opt_hex(r.key.as_deref()),
        opt_hex(r.value.as_deref()),
        r.headers
            .iter()
            .map(|h| (hex(h.key.as_bytes()), opt_hex(h.value.as_deref())))
            .collect(),
    )
}

/// TOPIC-0 as kcat (librdkafka 2.x, its JSON envelope) reads it.
fn kcat_reads(topic: &str, count: usize) -> Vec<Seen> {
    let out = std::process::Command::new("kcat")
        // cargo's library path holds the librdkafka the rdkafka crate builds (without zlib or
        // zstd); kcat must load the system's, which it was built with.
        .env_remove("LD_LIBRARY_PATH")
        .args([
            "-C",
            "-b",
            &common::kafka::bootstrap(),
            "-t",
            topic,
            "-p",
            "0",
        ])
        .args([
            "-o",
            "beginning",
            "-c",
            &count.to_string(),
            "-e",
            "-J",
            "-q",
        ])
        .output()
        .expect("kcat (scripts/test installs it from Debian's packages)");
    assert!(
        out.status.success(),
        "kcat: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => hex(s.as_bytes()),
        other => panic!("kcat field {other}"),
    };
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let m: serde_json::Value = serde_json::from_str(l).unwrap();
            let headers = m["headers"]
                .as_array()
                .map(|hs| {
                    hs.chunks(2)
                        .map(|kv| (text(&kv[0]), text(&kv[1])))
                        .collect()
                })
                .unwrap_or_default();
            (text(&m["key"]), text(&m["payload"]), headers)
        })
        .collect()
}

/// TOPIC-0 as Kafka's Java KafkaConsumer reads it.
fn java_reads(topic: &str, count: usize) -> Vec<Seen> {
    let out = common::kafka::java("ProduceFeatures.java")
        .args([
            "read",
            &common::kafka::bootstrap(),
            topic,
            "0",
            &count.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ProduceFeatures.java read: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let headers = f[3]
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| {
                    let (k, v) = h.split_once('=').unwrap();
                    (k.to_string(), v.to_string())
                })
                .collect();
            (f[1].to_string(), f[2].to_string(), headers)
        })
        .collect()
}

/// The codec of every record batch in TOPIC-0's log segments on broker `node` (its log dir
/// under `.cache/kafka-cluster`), with its record count: a segment file is the batches as the
/// leader appended them.
fn segment_codecs(node: i32, topic: &str) -> Vec<(i16, i32)> {
    let dir = format!(
        "{}/.cache/kafka-cluster/node{node}/data/{topic}-0",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut segments: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segments.sort();
    let mut out = Vec::new();
    for s in segments {
        let b = std::fs::read(&s).unwrap();
        let mut at = 0;
        while at + 61 <= b.len() {
            let length = i32::from_be_bytes(b[at + 8..at + 12].try_into().unwrap()) as usize;
            let attributes = i16::from_be_bytes(b[at + 21..at + 23].try_into().unwrap());
            let records = i32::from_be_bytes(b[at + 57..at + 61].try_into().unwrap());
            out.push((attributes & 7, records));
            at += 12 + length;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Kafka: LEADERLINK_KAFKA_BOOTSTRAP (scripts/test starts one)"]
async fn kafka_each_codec_is_read_back_by_kcat_and_java_and_stored_compressed() {
    // The server compresses with gzip unless a request says otherwise.
    let (server, client) = common::kafka::start(|cfg| cfg.compression = Codec::Gzip).await;
    let cases = [
        ("none", Compression::None, 0),
        ("gzip", Compression::Unspecified, 1),
        ("snappy", Compression::Snappy, 2),
        ("lz4", Compression::Lz4, 3),
        ("zstd", Compression::Zstd, 4),
    ];
    for (name, ask, attribute) in cases {
        let topic = common::topic(&format!("codec-{name}"));
        common::kafka::create_topic(&topic, 1, &[]).await;
        // Three calls at once (acks=all: batches stamped with leaderlink's producer id).
        let calls: Vec<_> = (0..3)
            .map(|call| {
                let mut c = client.clone();
                let mut req =
                    common::request(call as u64, Acks::All, &topic, 0, codec_records(name, call));
                req.compression = ask as i32;
                tokio::spawn(async move { common::forward_one(&mut c, req).await.unwrap() })
            })
            .collect();
        let mut written: Vec<(i64, Seen)> = Vec::new();
        let mut leader = -1;
        for (call, c) in calls.into_iter().enumerate() {
            let r = c.await.unwrap();
            assert_eq!(r.error_code, 0, "{name}: {r:?}");
            leader = r.leader_id;
            for (i, rec) in codec_records(name, call).iter().enumerate() {
                written.push((r.base_offset + i as i64, seen(rec)));
            }
        }
        written.sort_by_key(|w| w.0);
        let want: Vec<Seen> = written.into_iter().map(|w| w.1).collect();
        assert_eq!(kcat_reads(&topic, want.len()), want, "{name}: kcat");
        assert_eq!(java_reads(&topic, want.len()), want, "{name}: Java");
        let batches = segment_codecs(leader, &topic);
        assert_eq!(
            batches.iter().map(|b| b.1).sum::<i32>(),
            want.len() as i32,
            "{name}: {batches:?}"
        );
        assert!(
            batches.iter().all(|b| b.0 == attribute),
            "{name}: (codec, records) of the segment's batches: {batches:?}"
        );
        eprintln!("{name}: {batches:?} (codec, records) in broker {leader}'s segment");
    }
    server.shutdown(Duration::from_secs(5)).await;
}
