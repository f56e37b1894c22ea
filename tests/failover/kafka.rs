//! Against a real 3-broker Apache Kafka (`scripts/kafka-cluster start 3`): load through leaderlink
//! with acks=all while the broker leading the most partitions is killed with `kill -9` and later
//! started again; then every partition is read back from the beginning.
//!
//! These tests need the cluster, so they are `#[ignore]`d in a plain `cargo test`; the README's
//! test command (`scripts/test`) starts the cluster and runs them with
//! `LEADERLINK_KAFKA_BOOTSTRAP` set.

use crate::common;

use std::{
    collections::{HashMap, HashSet},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use leaderlink::{
    forward::PartitionOrder,
    kafka::metadata::TopicState,
    proto::v1::{Acks, Record, forwarder_client::ForwarderClient},
    server::Running,
};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
};
use tokio::time::Instant;
use tonic::transport::Channel;

const PARTITIONS: i32 = 6;

fn cluster(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka-cluster");
    let ok = Command::new(script).args(args).status().unwrap().success();
    assert!(ok, "scripts/kafka-cluster {args:?} failed");
}

async fn create_topic(name: &str) {
    common::kafka::create_topic(name, PARTITIONS, &[("min.insync.replicas", "2")]).await;
}

/// Reads every partition from the beginning to its high watermark: record value → count.
fn consume_all(topic: &str) -> HashMap<String, u32> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", common::kafka::bootstrap())
        .set("group.id", format!("verify-{topic}"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut high = HashMap::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
        let (_, h) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap();
        high.insert(p, h);
    }
    consumer.assign(&tpl).unwrap();
    let mut seen: HashMap<String, u32> = HashMap::new();
    let mut next: HashMap<i32, i64> = (0..PARTITIONS).map(|p| (p, 0)).collect();
    let started = Instant::now();
    while next.iter().any(|(p, o)| *o < high[p]) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "consuming took too long"
        );
        let Some(m) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        // librdkafka reports a broker that is still coming back (the restarted victim) as a
        // transient poll error; the consumer reconnects by itself.
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                eprintln!("consumer: {e} (retrying)");
                continue;
            }
        };
        next.insert(m.partition(), m.offset() + 1);
        let v = String::from_utf8(m.payload().unwrap_or_default().to_vec()).unwrap();
        *seen.entry(v).or_default() += 1;
    }
    seen
}

async fn leaderlink(
    ordering: PartitionOrder,
    idempotence: bool,
) -> (Running, ForwarderClient<Channel>) {
    common::kafka::start(|cfg| {
        cfg.ordering = ordering;
        cfg.idempotence = idempotence;
    })
    .await
}

/// The broker leading most of `topic`'s partitions, per leaderlink's leader map.
async fn busiest_leader(server: &Running, topic: &str) -> i32 {
    for _ in 0..100 {
        let map = server.forwarder.metadata().leader_map();
        if let Some(TopicState::Partitions(parts)) = map.topics.get(topic)
            && parts.len() == PARTITIONS as usize
            && parts.iter().all(|p| p.leader_id >= 0)
        {
            let mut count: HashMap<i32, usize> = HashMap::new();
            for p in parts {
                *count.entry(p.leader_id).or_default() += 1;
            }
            return count.into_iter().max_by_key(|(id, n)| (*n, -id)).unwrap().0;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no complete leader map for {topic}");
}

#[derive(Default)]
struct Tally {
    calls: u64,
    acked: HashSet<String>,
    possibly_duplicated: HashSet<String>,
    unacked: HashSet<String>,
    failed: HashMap<String, u64>,
    longest: Duration,
    /// Calls answered in each second of the load (printed: where a run loses its pace).
    per_second: Vec<u32>,
}

/// Runs `callers` loops of one-record Forward calls (acks=all, 15 s deadline) until `stop`.
/// Caller c writes to partition `partition_of(c, seq)` the value `c-seq`.
async fn load(
    client: ForwarderClient<Channel>,
    topic: String,
    callers: u32,
    partition_of: fn(u32, u64) -> i32,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
) {
    let began = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|c| {
            let mut client = client.clone();
            let (topic, stop, tally) = (topic.clone(), stop.clone(), tally.clone());
            tokio::spawn(async move {
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("{c}-{seq}");
                    let partition = partition_of(c, seq);
                    let rec = Record {
                        key: None,
                        value: Some(Bytes::from(id.clone())),
                        headers: vec![],
                        timestamp_ms: 0,
                    };
                    let mut req = tonic::Request::new(common::request(
                        seq,
                        Acks::All,
                        &topic,
                        partition,
                        vec![rec],
                    ));
                    req.set_timeout(Duration::from_secs(15));
                    let started = Instant::now();
                    let out = client.forward(req).await;
                    let took = started.elapsed();
                    let mut t = tally.lock().unwrap();
                    t.calls += 1;
                    t.longest = t.longest.max(took);
                    let second = began.elapsed().as_secs() as usize;
                    if t.per_second.len() <= second {
                        t.per_second.resize(second + 1, 0);
                    }
                    t.per_second[second] += 1;
                    match out {
                        Ok(resp) => {
                            let r = &resp.get_ref().partitions[0];
                            if r.error_code == 0 {
                                t.acked.insert(id.clone());
                                if r.possibly_duplicated {
                                    t.possibly_duplicated.insert(id);
                                }
                            } else {
                                *t.failed.entry(r.error_name.clone()).or_default() += 1;
                                t.unacked.insert(id);
                            }
                        }
                        Err(s) => {
                            *t.failed.entry(format!("{:?}", s.code())).or_default() += 1;
                            t.unacked.insert(id);
                        }
                    }
                    seq += 1;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// Load for `secs` s; kill -9 the busiest leader at `kill_at` s, start it again at `restart_at`.
async fn run_with_failover(
    server: &Running,
    client: ForwarderClient<Channel>,
    topic: &str,
    callers: u32,
    partition_of: fn(u32, u64) -> i32,
) -> (Tally, i32) {
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let job = tokio::spawn(load(
        client,
        topic.to_string(),
        callers,
        partition_of,
        stop.clone(),
        tally.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(8)).await;
    let victim = busiest_leader(server, topic).await;
    eprintln!("kill -9 broker {victim}");
    cluster(&["kill", &victim.to_string()]);
    tokio::time::sleep(Duration::from_secs(12)).await;
    eprintln!("restart broker {victim}");
    cluster(&["restart", &victim.to_string()]);
    tokio::time::sleep(Duration::from_secs(12)).await;
    stop.store(true, Ordering::Relaxed);
    job.await.unwrap();
    let t = std::mem::take(&mut *tally.lock().unwrap());
    eprintln!(
        "calls answered per second (kill at 8 s, restart at 20 s): {:?}",
        t.per_second
    );
    (t, victim)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs scripts/kafka-cluster start 3 (scripts/test runs it)"]
async fn nothing_acknowledged_is_lost_when_a_leader_is_killed() {
    // Batches without a producer id: a retry may duplicate, and each duplicate is flagged.
    let topic = common::topic("failover");
    create_topic(&topic).await;
    let (server, client) = leaderlink(PartitionOrder::Pipelined, false).await;
    let (t, victim) = run_with_failover(&server, client, &topic, 16, |c, seq| {
        ((seq + u64::from(c)) % 6) as i32
    })
    .await;
    let consumed = consume_all(&topic);
    let missing: Vec<&String> = t
        .acked
        .iter()
        .filter(|id| !consumed.contains_key(*id))
        .collect();
    let duplicates: Vec<(&String, &u32)> = consumed.iter().filter(|(_, n)| **n > 1).collect();
    let unexplained: Vec<&String> = duplicates
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !t.possibly_duplicated.contains(*id) && !t.unacked.contains(*id))
        .collect();
    let failed: u64 = t.failed.values().sum();
    eprintln!(
        "failover, idempotence off (broker {victim} killed): calls {}, acked {}, consumed {} \
         distinct, missing {}, duplicates {} (flagged possibly_duplicated: {}), failed calls \
         {failed} {:?}, longest call {:?}",
        t.calls,
        t.acked.len(),
        consumed.len(),
        missing.len(),
        duplicates.len(),
        t.possibly_duplicated.len(),
        t.failed,
        t.longest
    );
    assert!(t.calls > 1000, "the load ran: {} calls", t.calls);
    assert!(
        missing.is_empty(),
        "acknowledged but not in the log: {missing:?}"
    );
    assert!(
        unexplained.is_empty(),
        "duplicates without possibly_duplicated: {unexplained:?}"
    );
    assert!(
        failed * 100 <= t.calls,
        "at least 99% of calls succeed: {failed} of {} failed",
        t.calls
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs scripts/kafka-cluster start 3 (scripts/test runs it)"]
async fn strict_ordering_keeps_each_partition_in_order_through_a_leader_kill() {
    let topic = common::topic("strict");
    create_topic(&topic).await;
    let (server, client) = leaderlink(PartitionOrder::Strict, true).await;
    // Two callers per partition, so requests for one partition are concurrent.
    let (t, victim) = run_with_failover(&server, client, &topic, 12, |c, _| (c % 6) as i32).await;
    let consumed = consume_all(&topic);
    let missing = t
        .acked
        .iter()
        .filter(|id| !consumed.contains_key(*id))
        .count();
    assert_eq!(missing, 0, "acknowledged but not in the log");
    // Per caller (each writes to one partition), sequence numbers must appear in the log in
    // increasing order.
    let out_of_order = out_of_order(&topic);
    eprintln!(
        "strict (broker {victim} killed): calls {}, acked {}, out of order {out_of_order}, \
         failed {:?}, longest call {:?}",
        t.calls,
        t.acked.len(),
        t.failed,
        t.longest
    );
    assert_eq!(out_of_order, 0);
    assert!(t.acked.len() > 100);
}

/// With idempotence on (the default), leaderlink stamps its producer id and a sequence on every
/// batch: through a leader killed with `kill -9`, no record is in the log twice, each caller's
/// records keep their order, and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs scripts/kafka-cluster start 3 (scripts/test runs it)"]
async fn an_idempotent_forwarder_writes_each_record_once_in_order_through_a_leader_kill() {
    let topic = common::topic("idempotent");
    create_topic(&topic).await;
    let (server, client) = leaderlink(PartitionOrder::Pipelined, true).await;
    let (t, victim) = run_with_failover(&server, client, &topic, 16, |c, seq| {
        ((seq + u64::from(c)) % 6) as i32
    })
    .await;
    let consumed = consume_all(&topic);
    let missing = t
        .acked
        .iter()
        .filter(|id| !consumed.contains_key(*id))
        .count();
    let duplicates: Vec<(&String, &u32)> = consumed.iter().filter(|(_, n)| **n > 1).collect();
    // Per caller and partition, sequence numbers appear in the log in increasing order (a
    // caller's calls follow one another).
    let out_of_order = out_of_order(&topic);
    let failed: u64 = t.failed.values().sum();
    eprintln!(
        "failover, idempotence on (broker {victim} killed): calls {}, acked {}, consumed {} \
         distinct, missing {missing}, duplicates {}, flagged possibly_duplicated {}, out of \
         order {out_of_order}, failed calls {failed} {:?}, longest call {:?}",
        t.calls,
        t.acked.len(),
        consumed.len(),
        duplicates.len(),
        t.possibly_duplicated.len(),
        t.failed,
        t.longest
    );
    assert!(t.calls > 1000, "the load ran: {} calls", t.calls);
    assert_eq!(missing, 0, "acknowledged but not in the log");
    assert!(duplicates.is_empty(), "in the log twice: {duplicates:?}");
    assert_eq!(out_of_order, 0, "a caller's records out of order");
    assert!(
        failed * 100 <= t.calls,
        "at least 99% of calls succeed: {failed} of {} failed",
        t.calls
    );
    drop(server);
}

/// Records whose caller's sequence number is lower than one of the same caller written earlier
/// to the same partition (values are `caller-seq`).
fn out_of_order(topic: &str) -> usize {
    let mut last: HashMap<(u32, i32), i64> = HashMap::new();
    let mut out_of_order = 0;
    for (p, v) in read_in_log_order_by_partition(topic) {
        let (c, seq) = v.split_once('-').unwrap();
        let (c, seq): (u32, i64) = (c.parse().unwrap(), seq.parse().unwrap());
        let prev = last.entry((c, p)).or_insert(-1);
        if seq < *prev {
            out_of_order += 1;
        }
        *prev = (*prev).max(seq);
    }
    out_of_order
}

/// (partition, record value) of every partition, each partition in offset order.
fn read_in_log_order_by_partition(topic: &str) -> Vec<(i32, String)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", common::kafka::bootstrap())
        .set("group.id", format!("log-{topic}"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut out = Vec::new();
    for p in 0..PARTITIONS {
        let (_, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let mut next = 0;
        let started = Instant::now();
        while next < high {
            assert!(started.elapsed() < Duration::from_secs(60));
            let Some(m) = consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("consumer: {e} (retrying)");
                    continue;
                }
            };
            next = m.offset() + 1;
            out.push((
                p,
                String::from_utf8(m.payload().unwrap_or_default().to_vec()).unwrap(),
            ));
        }
    }
    out
}
