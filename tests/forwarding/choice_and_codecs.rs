//! Partition -1 (leaderlink chooses) and compression, against the mock cluster: a key's
//! partition, the keyless sticky partition and its spread, the errors of entries whose partition
//! cannot be chosen, and batches that reach the leader with their codec, merged per codec.
//! Real Kafka (Java's partitioner, Kafka's consumers, the log segment) is in
//! `kafka_produce_features`.

use crate::common;

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use common::{
    choose_each, forward, forward_one, kafka_client::read_batches_with_codec, records, request,
    start, topic,
};
use kafka_protocol::records::Compression as WireCodec;
use leaderlink::{
    forward::partitioner::{STICKY_BATCH_BYTES, for_key},
    kafka::{Codec, metadata::Route},
    proto::v1::{Acks, Compression, Record},
};
use tonic::Code;

fn keyed(key: &str, value: &str) -> Record {
    Record {
        key: Some(Bytes::from(key.to_string())),
        value: Some(Bytes::from(value.to_string())),
        headers: vec![],
        timestamp_ms: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_chooses_its_partition_and_the_result_says_which() {
    let h = start(|_| {}).await;
    let t = topic("keyed");
    h.dev.create_topic(&t, 6).unwrap();
    let mut c = h.client.clone();
    let keys: Vec<String> = (0..120).map(|i| format!("user-{i}")).collect();
    let recs = keys.iter().map(|k| keyed(k, &format!("v-{k}"))).collect();
    let resp = forward(&mut c, choose_each(1, Acks::Leader, &t, recs))
        .await
        .unwrap();
    let mut used = BTreeMap::new();
    for (k, r) in keys.iter().zip(&resp.partitions) {
        assert_eq!(r.error_code, 0, "{r:?}");
        assert_eq!(r.partition, for_key(k.as_bytes(), 6), "{k}: {r:?}");
        *used.entry(r.partition).or_insert(0) += 1;
    }
    assert_eq!(used.len(), 6, "120 keys over 6 partitions: {used:?}");
    // The same key again: the same partition, in a later call too.
    let again = forward_one(
        &mut c,
        request(2, Acks::Leader, &t, -1, vec![keyed("user-7", "x")]),
    )
    .await
    .unwrap();
    assert_eq!(again.partition, resp.partitions[7].partition);
    // Each record sits in the partition its result names, at its offset.
    let map = h.server.forwarder.metadata().leader_map();
    for p in 0..6 {
        let Route::Leader(b, _) = map.route(&t, p) else {
            panic!("no leader for {t}-{p}");
        };
        let log: HashMap<i64, Bytes> = read_batches_with_codec(&b.addr(), &t, p)
            .await
            .into_iter()
            .flat_map(|(_, b)| b)
            .collect();
        for (k, r) in keys
            .iter()
            .zip(&resp.partitions)
            .filter(|(_, r)| r.partition == p)
        {
            assert_eq!(
                log.get(&r.base_offset).map(|v| v.as_ref()),
                Some(format!("v-{k}").as_bytes()),
                "{k} in {t}-{p}"
            );
        }
    }
    h.server.shutdown(std::time::Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_records_stay_on_a_partition_for_a_batch_size_then_spread_over_all() {
    let h = start(|_| {}).await;
    let t = topic("sticky");
    h.dev.create_topic(&t, 4).unwrap();
    let mut c = h.client.clone();
    let value = "v".repeat(1000);
    let mut seq = Vec::new();
    for i in 0..150u64 {
        let rec = Record {
            key: None,
            value: Some(Bytes::from(value.clone())),
            headers: vec![],
            timestamp_ms: 0,
        };
        let r = forward_one(&mut c, request(i, Acks::Leader, &t, -1, vec![rec]))
            .await
            .unwrap();
        assert_eq!(r.error_code, 0, "{r:?}");
        seq.push(r.partition);
    }
    // Each record's batch is a little over 1000 bytes: runs of at most STICKY_BATCH_BYTES / 1000
    // + 1 calls share a partition, each run on the partition after the one before.
    let mut runs: Vec<(i32, usize)> = Vec::new();
    for p in seq {
        match runs.last_mut() {
            Some((q, n)) if *q == p => *n += 1,
            _ => runs.push((p, 1)),
        }
    }
    let longest = STICKY_BATCH_BYTES / 1000 + 1;
    assert!(runs.len() >= 150 / longest, "{runs:?}");
    for (k, w) in runs.windows(2).enumerate() {
        assert_eq!(w[1].0, (w[0].0 + 1) % 4, "run {k}: {runs:?}");
        assert!(
            w[0].1 <= longest && w[0].1 >= longest - 2,
            "run {k}: {runs:?}"
        );
    }
    let partitions: std::collections::BTreeSet<i32> = runs.iter().map(|r| r.0).collect();
    assert_eq!(partitions.len(), 4, "{runs:?}");
    h.server.shutdown(std::time::Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_minus_one_needs_records_with_one_key_and_a_topic_with_a_known_count() {
    let h = start(|cfg| cfg.allow_auto_topic_creation = false).await;
    let mut c = h.client.clone();
    // A topic the cluster does not know: the result says so, with partition -1.
    let unknown = topic("nowhere");
    let r = forward_one(
        &mut c,
        request(1, Acks::Leader, &unknown, -1, records("a", 1)),
    )
    .await
    .unwrap();
    assert_eq!(r.error_name, "UNKNOWN_TOPIC_OR_PARTITION", "{r:?}");
    assert_eq!(r.partition, -1, "{r:?}");
    assert!(r.error_message.contains("partition count"), "{r:?}");

    // Beside it, an entry for a known topic gets its answer.
    let t = topic("known");
    h.dev.create_topic(&t, 2).unwrap();
    let mut both = request(2, Acks::Leader, &unknown, -1, records("b", 1));
    both.partitions
        .push(request(0, Acks::Leader, &t, -1, records("c", 1)).partitions[0].clone());
    let resp = forward(&mut c, both).await.unwrap();
    assert_eq!(resp.partitions[0].error_name, "UNKNOWN_TOPIC_OR_PARTITION");
    assert_eq!(resp.partitions[1].error_code, 0, "{resp:?}");
    assert!((0..2).contains(&resp.partitions[1].partition), "{resp:?}");

    // Records with different keys cannot share one chosen partition.
    let e = forward_one(&mut c, request(3, Acks::Leader, &t, -1, records("d", 2)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .starts_with("invalid partitions[0].partition: is -1, but records[1]"),
        "{}",
        e.message()
    );
    // A raw batch keeps the partition its producer chose.
    let mut raw = request(4, Acks::Leader, &t, -1, vec![]);
    raw.partitions[0].record_batch = common::raw_batch(&["x"], -1, -1);
    let e = forward_one(&mut c, raw).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("only `records` may use"),
        "{}",
        e.message()
    );
    // Below -1 is no partition at all.
    let e = forward_one(&mut c, request(5, Acks::Leader, &t, -2, records("e", 1)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("is -2; must be >= 0, or -1"),
        "{}",
        e.message()
    );
    h.server.shutdown(std::time::Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_compression_value_is_invalid() {
    let h = start(|_| {}).await;
    let mut c = h.client.clone();
    let mut req = request(1, Acks::Leader, &topic("codec"), 0, records("a", 1));
    req.compression = 6;
    let e = forward_one(&mut c, req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .starts_with("invalid compression: unknown value 6;"),
        "{}",
        e.message()
    );
    h.server.shutdown(std::time::Duration::from_secs(5)).await;
}

/// The wire codec of leaderlink's `c`.
fn wire(c: Codec) -> WireCodec {
    match c {
        Codec::None => WireCodec::None,
        Codec::Gzip => WireCodec::Gzip,
        Codec::Snappy => WireCodec::Snappy,
        Codec::Lz4 => WireCodec::Lz4,
        Codec::Zstd => WireCodec::Zstd,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_reach_the_leader_with_the_codec_asked_for_and_merge_only_with_their_own() {
    // The server's default codec is lz4; requests override it, or not (UNSPECIFIED).
    // A linger of 300 ms: calls sent at once share requests and, per codec, record batches.
    let h = start(|cfg| {
        cfg.compression = Codec::Lz4;
        cfg.linger_ms = 300;
    })
    .await;
    // Metadata and the leader connection first: the calls below then reach the leader's queue
    // together, not each after its own setup. The warm-up record is the log's first batch.
    let (t, _) = common::warm_topic(&h, "codecs", 1).await;
    let asked = [
        (Compression::Unspecified, Codec::Lz4),
        (Compression::None, Codec::None),
        (Compression::Gzip, Codec::Gzip),
        (Compression::Snappy, Codec::Snappy),
        (Compression::Lz4, Codec::Lz4),
        (Compression::Zstd, Codec::Zstd),
    ];
    // Two calls per codec asked for, all at once.
    let calls: Vec<_> = asked
        .iter()
        .enumerate()
        .flat_map(|(k, &(ask, _))| (0..2).map(move |j| (k, j, ask)))
        .map(|(k, j, ask)| {
            let mut c = h.client.clone();
            let t = t.clone();
            tokio::spawn(async move {
                let mut req = request((k * 2 + j) as u64, Acks::Leader, &t, 0, records("x", 3));
                for (n, r) in req.partitions[0].records.iter_mut().enumerate() {
                    r.value = Some(Bytes::from(format!("{k}-{j}-{n} {}", "z".repeat(200))));
                }
                req.compression = ask as i32;
                (k, j, forward_one(&mut c, req).await.unwrap())
            })
        })
        .collect();
    let mut results = Vec::new();
    for c in calls {
        results.push(c.await.unwrap());
    }
    let map = h.server.forwarder.metadata().leader_map();
    let Route::Leader(b, _) = map.route(&t, 0) else {
        panic!("no leader");
    };
    let batches = read_batches_with_codec(&b.addr(), &t, 0).await;
    // offset → (codec of its batch, value, index of its batch)
    let mut log = HashMap::new();
    for (n, (codec, recs)) in batches.iter().enumerate() {
        for (off, v) in recs {
            log.insert(*off, (*codec, v.clone(), n));
        }
    }
    for (k, j, r) in &results {
        assert_eq!(r.error_code, 0, "{r:?}");
        let want = wire(asked[*k].1);
        for n in 0..3 {
            let (codec, v, _) = &log[&(r.base_offset + n)];
            assert_eq!(*codec, want, "call {k}-{j}");
            assert!(
                v.starts_with(format!("{k}-{j}-{n} ").as_bytes()),
                "call {k}-{j}"
            );
        }
    }
    // Calls asking for the same codec (Unspecified is the server's lz4) shared record batches:
    // fewer batches than calls, and no batch mixes codecs (each batch has one codec by
    // construction; a batch holding two codecs' calls would have failed the check above).
    assert!(
        batches.len() - 1 < results.len(),
        "{} batches for {} calls",
        batches.len() - 1,
        results.len()
    );
    h.server.shutdown(std::time::Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_compressed_batch_goes_out_as_it_is() {
    // The server compresses what it encodes with zstd; a caller's own batch is never touched.
    let h = start(|cfg| cfg.compression = Codec::Zstd).await;
    let t = topic("raw-gzip");
    h.dev.create_topic(&t, 1).unwrap();
    let raw = common::compressed_batch(&["gzipped-0", "gzipped-1", "gzipped-2"], WireCodec::Gzip);
    let mut c = h.client.clone();
    let mut req = request(1, Acks::Leader, &t, 0, vec![]);
    req.partitions[0].record_batch = raw.clone();
    let r = forward_one(&mut c, req).await.unwrap();
    assert_eq!(r.error_code, 0, "{r:?}");
    let map = h.server.forwarder.metadata().leader_map();
    let Route::Leader(b, _) = map.route(&t, 0) else {
        panic!("no leader");
    };
    let batches = read_batches_with_codec(&b.addr(), &t, 0).await;
    assert_eq!(batches.len(), 1, "{batches:?}");
    assert_eq!(batches[0].0, WireCodec::Gzip);
    let values: Vec<&[u8]> = batches[0].1.iter().map(|(_, v)| v.as_ref()).collect();
    assert_eq!(values, [&b"gzipped-0"[..], b"gzipped-1", b"gzipped-2"]);
    h.server.shutdown(std::time::Duration::from_secs(5)).await;
}
