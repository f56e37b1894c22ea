//! Choosing the partition of an entry whose `partition` is -1, as Kafka's Java producer does
//! (its `BuiltInPartitioner`, docs/design.md §3.22):
//!
//! * **a key**: `toPositive(murmur2(key)) % partition count` over all the topic's partitions,
//!   so that a key lands where a Java producer (and librdkafka's `murmur2_random`) puts it;
//! * **no key**: the topic's sticky partition (KIP-480, with KIP-794's rule for when it moves):
//!   keyless batches go to one partition until about [`STICKY_BATCH_BYTES`] went there, then to
//!   the next. Concurrent keyless calls thus share a partition, and so a record batch (record
//!   accumulation), while over time every partition gets its share. Only partitions with a
//!   leader are chosen while there is one.

use std::{collections::HashMap, sync::Mutex};

use crate::kafka::metadata::PartitionLeader;

/// Bytes of keyless batches after which a topic's sticky partition moves on: the default
/// `batch.size` of Kafka's Java producer, after which its built-in partitioner switches
/// (KIP-794). Smaller spreads a burst over more partitions; larger lets more of it share one
/// record batch.
pub const STICKY_BATCH_BYTES: usize = 16 * 1024;

/// Topics whose sticky partition is remembered. Beyond it the memory is dropped and each topic
/// starts again at a random partition, which costs nothing but a switch: a bound against
/// callers who send to very many topic names.
const MAX_STICKY_TOPICS: usize = 16 * 1024;

/// The partition of `key` among `partitions` (> 0): Java's `Utils.toPositive(Utils.murmur2(key))
/// % partitions`. The `murmur2` crate's `murmur2` with Kafka's seed is the same function as
/// Java's `Utils.murmur2` (little-endian words, seed 0x9747b28c).
pub fn for_key(key: &[u8], partitions: usize) -> i32 {
    let hash = murmur2::murmur2(key, murmur2::KAFKA_SEED) & 0x7fff_ffff;
    (hash as usize % partitions.max(1)) as i32
}

/// Per topic, the sticky partition of keyless batches.
#[derive(Debug, Default)]
pub struct Sticky {
    topics: Mutex<HashMap<String, Current>>,
}

#[derive(Debug, Clone, Copy)]
struct Current {
    partition: usize,
    /// Bytes of batches given this partition since it became the sticky one.
    bytes: usize,
}

impl Sticky {
    /// The partition for a keyless batch of `bytes` for `topic`, whose partitions are `parts`
    /// (not empty). The batch counts towards the partition's share; once the share reaches
    /// [`STICKY_BATCH_BYTES`], the next batch goes to the next partition with a leader.
    pub fn choose(&self, topic: &str, parts: &[PartitionLeader], bytes: usize) -> i32 {
        let n = parts.len().max(1);
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        if topics.len() >= MAX_STICKY_TOPICS && !topics.contains_key(topic) {
            topics.clear();
        }
        let led = |p: usize| parts.get(p).is_some_and(|l| l.leader_id >= 0);
        let any_led = parts.iter().any(|l| l.leader_id >= 0);
        // The first partition with a leader from `from` on (any partition when none has one).
        let next_led = |from: usize| {
            (0..n)
                .map(|k| (from + k) % n)
                .find(|&p| !any_led || led(p))
                .unwrap_or(from % n)
        };
        let cur = topics.entry(topic.to_string()).or_insert_with(|| Current {
            partition: next_led(rand::random_range(0..n)),
            bytes: 0,
        });
        if cur.partition >= n || cur.bytes >= STICKY_BATCH_BYTES || (any_led && !led(cur.partition))
        {
            let from = if cur.partition >= n {
                0
            } else {
                cur.partition + 1
            };
            *cur = Current {
                partition: next_led(from),
                bytes: 0,
            };
        }
        cur.bytes = cur.bytes.saturating_add(bytes);
        cur.partition as i32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn led(n: usize) -> Vec<PartitionLeader> {
        vec![
            PartitionLeader {
                leader_id: 1,
                leader_epoch: 0,
                error_code: 0,
            };
            n
        ]
    }

    #[test]
    fn keys_hash_as_javas_utils_murmur2() {
        // Values of org.apache.kafka.common.utils.Utils.murmur2 (its own unit test's vectors);
        // the test suite compares 1,000 more keys with Java itself.
        let cases: [(&[u8], i32); 4] = [
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
        ];
        for (key, java) in cases {
            assert_eq!(
                murmur2::murmur2(key, murmur2::KAFKA_SEED) as i32,
                java,
                "{key:?}"
            );
            assert_eq!(
                for_key(key, 7),
                ((java & 0x7fff_ffff) % 7),
                "{:?}",
                std::str::from_utf8(key)
            );
        }
    }

    #[test]
    fn a_sticky_partition_moves_on_after_a_batch_size_and_visits_every_partition() {
        let s = Sticky::default();
        let parts = led(4);
        let first = s.choose("t", &parts, 1000);
        // 1000-byte batches: 17 share the partition (16 KiB reached after the 17th).
        let mut seq = vec![first];
        for _ in 0..(17 * 8 - 1) {
            seq.push(s.choose("t", &parts, 1000));
        }
        for (k, run) in seq.chunks(17).enumerate() {
            assert!(run.iter().all(|&p| p == run[0]), "run {k}: {run:?}");
            assert_eq!(run[0], (first + k as i32) % 4, "run {k}");
        }
        // Another topic has its own.
        let _ = s.choose("u", &parts, 1_000_000);
        assert_eq!(s.choose("t", &parts, 1000), (first + 8) % 4);
    }

    #[test]
    fn a_sticky_partition_skips_partitions_without_a_leader() {
        let s = Sticky::default();
        let mut parts = led(3);
        parts[0].leader_id = -1;
        parts[2].leader_id = -1;
        for _ in 0..50 {
            assert_eq!(s.choose("t", &parts, STICKY_BATCH_BYTES), 1);
        }
        // None has a leader: any partition rather than none.
        let none = vec![
            PartitionLeader {
                leader_id: -1,
                leader_epoch: -1,
                error_code: 5,
            };
            3
        ];
        let p = s.choose("v", &none, 1);
        assert!((0..3).contains(&p));
    }
}
