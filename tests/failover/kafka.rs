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

pub(super) fn cluster(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka-cluster");
    let ok = Command::new(script).args(args).status().unwrap().success();
    assert!(ok, "scripts/kafka-cluster {args:?} failed");
}

pub(super) async fn create_topic(name: &str) {
    common::kafka::create_topic(name, PARTITIONS, &[("min.insync.replicas", "2")]).await;
}

/// Reads every partition from the beginning to its high watermark: record value → count.
pub(super) fn consume_all(topic: &str) -> HashMap<String, u32> {
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

/// The broker leading most of `topic`'s partitions, per leaderlink's leader map, among the
/// brokers other than `not`; `not` itself when it leads them all (after a run of faults Kafka
/// may have moved every leader to one broker, and it moves them back only at its next leader
/// rebalance, minutes later).
pub(super) async fn busiest_leader_but(server: &Running, topic: &str, not: Option<i32>) -> i32 {
    for _ in 0..100 {
        let map = server.forwarder.metadata().leader_map();
        if let Some(TopicState::Partitions(parts)) = map.topics.get(topic)
            && parts.len() == PARTITIONS as usize
            && parts.iter().all(|p| p.leader_id >= 0)
        {
            let mut count: HashMap<i32, usize> = HashMap::new();
            for p in parts.iter().filter(|p| Some(p.leader_id) != not) {
                *count.entry(p.leader_id).or_default() += 1;
            }
            if let Some((id, _)) = count.into_iter().max_by_key(|(id, n)| (*n, -id)) {
                return id;
            }
            if let Some(only) = not {
                eprintln!("broker {only} leads every partition of {topic}: the victim after all");
                return only;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leaders = match server.forwarder.metadata().leader_map().topics.get(topic) {
        Some(TopicState::Partitions(parts)) => format!(
            "{:?}",
            parts
                .iter()
                .map(|p| (p.leader_id, p.leader_epoch))
                .collect::<Vec<_>>()
        ),
        other => format!("{:?}", other.is_some()),
    };
    panic!("no complete leader map for {topic} after 10 s: (leader, epoch) {leaders}");
}

#[derive(Default)]
pub(super) struct Tally {
    pub(super) calls: u64,
    pub(super) acked: HashSet<String>,
    pub(super) possibly_duplicated: HashSet<String>,
    pub(super) unacked: HashSet<String>,
    pub(super) failed: HashMap<String, u64>,
    pub(super) longest: Duration,
    /// Calls answered in each second of the load (printed: where a run loses its pace).
    pub(super) per_second: Vec<u32>,
    /// Each successful call: when it started, when it was answered, its partition.
    pub(super) successes: Vec<(Instant, Instant, i32)>,
}

impl Tally {
    /// Acknowledged records not in `consumed`.
    pub(super) fn missing(&self, consumed: &HashMap<String, u32>) -> usize {
        self.acked
            .iter()
            .filter(|id| !consumed.contains_key(*id))
            .count()
    }

    /// The longest time one of `partitions` went without a successful call between `from` and
    /// `to` (a partition without any counts from `from` to `to`).
    pub(super) fn longest_gap(&self, partitions: &[i32], from: Instant, to: Instant) -> Duration {
        partitions
            .iter()
            .map(|p| {
                let mut at: Vec<Instant> = self
                    .successes
                    .iter()
                    .filter(|(_, a, q)| q == p && *a >= from && *a <= to)
                    .map(|(_, a, _)| *a)
                    .collect();
                at.sort();
                at.push(to);
                at.iter()
                    .scan(from, |last, a| {
                        let gap = *a - *last;
                        *last = *a;
                        Some(gap)
                    })
                    .max()
                    .unwrap_or_default()
            })
            .max()
            .unwrap_or_default()
    }

    /// The outage of `partitions` after a fault at `at`: from `at` to the first success of a
    /// call to them that started after it, the longest over the partitions (`None` if one of
    /// them never had such a success).
    pub(super) fn outage(&self, partitions: &[i32], at: Instant) -> Option<Duration> {
        partitions
            .iter()
            .map(|p| {
                self.successes
                    .iter()
                    .filter(|(started, _, q)| q == p && *started >= at)
                    .map(|(_, answered, _)| *answered - at)
                    .min()
            })
            .try_fold(Duration::ZERO, |worst, o| o.map(|o| worst.max(o)))
    }
}

/// Runs `callers` loops of one-record Forward calls (acks=all, `deadline` each) until `stop`.
/// Caller c writes to partition `partition_of(c, seq)` the value `c-seq`.
async fn load(
    client: ForwarderClient<Channel>,
    topic: String,
    callers: u32,
    partition_of: fn(u32, u64) -> i32,
    deadline: Duration,
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
                    req.set_timeout(deadline);
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
                                t.successes.push((started, Instant::now(), partition));
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

/// A way to make or undo a fault on one broker.
#[derive(Clone, Copy)]
pub(super) enum Lever {
    /// `scripts/kafka-cluster CMD ID`.
    Cluster(&'static str),
    /// `scripts/toxiproxy cli ARGS… broker<ID>`: a toxic on the broker's proxy.
    Proxy(&'static [&'static str]),
    /// `scripts/kafka/Leadership.java BOOTSTRAP CMD TOPIC ID`: leadership moved with Kafka's
    /// Admin client.
    Admin(&'static str),
    /// Every broker in turn: a controlled shutdown (SIGTERM), a restart, and a wait until it is
    /// back in the ISR of the topic's partitions.
    Roll,
}

/// Runs `scripts/kafka/Leadership.java` (Kafka's Admin client) with the cluster's jars.
fn leadership(args: &[&str]) {
    let ok = common::kafka::java("Leadership.java")
        .arg(common::kafka::bootstrap())
        .args(args)
        .status()
        .unwrap()
        .success();
    assert!(ok, "Leadership.java {args:?} failed");
}

impl Lever {
    fn pull(self, victim: i32, topic: &str) {
        match self {
            Lever::Cluster(cmd) => cluster(&[cmd, &victim.to_string()]),
            Lever::Admin(cmd) => leadership(&[cmd, topic, &victim.to_string()]),
            Lever::Roll => {
                for node in 1..=3 {
                    let id = node.to_string();
                    eprintln!("controlled shutdown of broker {node}");
                    cluster(&["stop-node", &id]);
                    cluster(&["restart", &id]);
                    leadership(&["await-isr", topic, &id]);
                }
            }
            Lever::Proxy(args) => {
                let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/toxiproxy");
                let proxy = format!("broker{victim}");
                let ok = Command::new(script)
                    .arg("cli")
                    .args(args)
                    .arg(&proxy)
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "scripts/toxiproxy cli {args:?} {proxy} failed");
            }
        }
    }
}

/// One fault on one broker under load: `inject` on the victim 8 s into the load, `heal`
/// `lasts` later, then `after` more load.
pub(super) struct Fault {
    pub(super) inject: &'static [Lever],
    pub(super) heal: &'static [Lever],
    pub(super) lasts: Duration,
    pub(super) after: Duration,
    /// Deadline of each call of the load.
    pub(super) deadline: Duration,
    /// Whether the victim may be the node that leads the controller quorum.
    pub(super) controller_may_be_victim: bool,
}

/// What a [`Fault`] run saw: the calls, the victim, the partitions it led, when the fault began.
pub(super) struct Run {
    pub(super) tally: Tally,
    pub(super) victim: i32,
    pub(super) led: Vec<i32>,
    /// When the fault's commands started, and when they were done (the fault is in place).
    pub(super) started: Instant,
    pub(super) fault_at: Instant,
    /// When the heal's commands were done.
    pub(super) healed_at: Instant,
    /// After how long leaderlink's leader map named other leaders for all the victim's
    /// partitions (`None`: not while the fault lasted).
    pub(super) moved: Option<Duration>,
    /// The topic's leader epochs in leaderlink's map when the fault began and after the heal.
    pub(super) epochs: (Vec<i32>, Vec<i32>),
}

/// The leader epoch of each of `topic`'s partitions in leaderlink's map.
fn epochs(server: &Running, topic: &str) -> Vec<i32> {
    match server.forwarder.metadata().leader_map().topics.get(topic) {
        Some(TopicState::Partitions(parts)) => parts.iter().map(|p| p.leader_epoch).collect(),
        _ => Vec::new(),
    }
}

/// Pulls `levers` on `victim` off the runtime's threads (a command may take a minute).
async fn pull_all(levers: &'static [Lever], victim: i32, topic: &str) {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        for lever in levers {
            lever.pull(victim, &topic);
        }
    })
    .await
    .unwrap();
}

/// One fault inflicted (see [`inflict`]): on which broker, and when.
pub(super) struct Inflicted {
    pub(super) victim: i32,
    /// The partitions the victim led when the fault began.
    pub(super) led: Vec<i32>,
    /// When the fault's commands started, and when they were done (the fault is in place).
    pub(super) started: Instant,
    pub(super) fault_at: Instant,
    /// When the heal's commands were done.
    pub(super) healed_at: Instant,
    /// After how long leaderlink found the victim stalled (`None`: not while the fault lasted).
    pub(super) stalled: Option<Duration>,
    /// After how long leaderlink's leader map named other leaders for all the victim's
    /// partitions (`None`: not while the fault lasted).
    pub(super) moved: Option<Duration>,
}

/// Inflicts `fault` on the busiest leader of `topic` (not the active controller unless the
/// fault allows it), holds it for `fault.lasts`, and heals it.
pub(super) async fn inflict(server: &Running, topic: &str, fault: &Fault) -> Inflicted {
    let not = match fault.controller_may_be_victim {
        true => None,
        false => Some(active_controller().await),
    };
    let victim = busiest_leader_but(server, topic, not).await;
    let led = led_by(server, topic, victim);
    eprintln!("fault on broker {victim} (leads {led:?})");
    let stalls_before = server.forwarder.pool().suspects().marked();
    let started = Instant::now();
    pull_all(fault.inject, victim, topic).await;
    // Once the command is done: calls answered while the script starts are not the outage's.
    let fault_at = Instant::now();
    // When leaderlink found the victim stalled, and when its leader map named other leaders for
    // all the victim's partitions (printed, to tell leaderlink's delays from the cluster's).
    let (mut stalled, mut moved) = (None, None);
    loop {
        if stalled.is_none() && server.forwarder.pool().suspects().marked() > stalls_before {
            stalled = Some(fault_at.elapsed());
        }
        if moved.is_none() && led_by(server, topic, victim).is_empty() {
            moved = Some(fault_at.elapsed());
        }
        if fault_at.elapsed() >= fault.lasts {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "broker {victim}: found stalled after {stalled:?}, its partitions led elsewhere in \
         leaderlink's map after {moved:?}; healing"
    );
    pull_all(fault.heal, victim, topic).await;
    Inflicted {
        victim,
        led,
        started,
        fault_at,
        healed_at: Instant::now(),
        stalled,
        moved,
    }
}

/// The load of [`load`], running until [`Load::stop`].
pub(super) struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    job: tokio::task::JoinHandle<()>,
}

impl Load {
    /// Starts `callers` loops of calls (see [`load`]).
    pub(super) fn start(
        client: ForwarderClient<Channel>,
        topic: &str,
        callers: u32,
        partition_of: fn(u32, u64) -> i32,
        deadline: Duration,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let job = tokio::spawn(load(
            client,
            topic.to_string(),
            callers,
            partition_of,
            deadline,
            stop.clone(),
            tally.clone(),
        ));
        Load { stop, tally, job }
    }

    /// Stops the callers once their calls are answered; what they saw.
    pub(super) async fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        self.job.await.unwrap();
        std::mem::take(&mut *self.tally.lock().unwrap())
    }
}

/// `fault` under `callers` loops of calls (see [`load`]), 8 s into the load; the victim is the
/// busiest leader.
pub(super) async fn run_with_fault(
    server: &Running,
    client: ForwarderClient<Channel>,
    topic: &str,
    callers: u32,
    partition_of: fn(u32, u64) -> i32,
    fault: Fault,
) -> Run {
    let load = Load::start(client, topic, callers, partition_of, fault.deadline);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let epochs_before = epochs(server, topic);
    let f = inflict(server, topic, &fault).await;
    // The map learns of the last changes within a refresh or a leader hint.
    tokio::time::sleep(fault.after).await;
    let epochs_after = epochs(server, topic);
    let tally = load.stop().await;
    eprintln!(
        "calls answered per second (fault at 8 s, healed {:?} later): {:?}",
        fault.lasts, tally.per_second
    );
    Run {
        tally,
        victim: f.victim,
        led: f.led,
        started: f.started,
        fault_at: f.fault_at,
        healed_at: f.healed_at,
        moved: f.moved,
        epochs: (epochs_before, epochs_after),
    }
}

/// `kill -9` of the busiest leader 8 s into the load (15 s deadlines), started again 12 s later.
async fn run_with_failover(
    server: &Running,
    client: ForwarderClient<Channel>,
    topic: &str,
    callers: u32,
    partition_of: fn(u32, u64) -> i32,
) -> (Tally, i32) {
    let fault = Fault {
        inject: &[Lever::Cluster("kill")],
        heal: &[Lever::Cluster("restart")],
        lasts: Duration::from_secs(12),
        after: Duration::from_secs(12),
        deadline: Duration::from_secs(15),
        controller_may_be_victim: true,
    };
    let run = run_with_fault(server, client, topic, callers, partition_of, fault).await;
    (run.tally, run.victim)
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
    let missing = t.missing(&consumed);
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
    let missing = t.missing(&consumed);
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

/// The partitions of `topic` that `broker` leads, per leaderlink's leader map.
pub(super) fn led_by(server: &Running, topic: &str, broker: i32) -> Vec<i32> {
    match server.forwarder.metadata().leader_map().topics.get(topic) {
        Some(TopicState::Partitions(parts)) => (0..)
            .zip(parts)
            .filter(|(_, p)| p.leader_id == broker)
            .map(|(i, _)| i)
            .collect(),
        _ => Vec::new(),
    }
}

/// The node that leads the KRaft controller quorum now (DescribeQuorum, which a broker forwards
/// to the controllers).
pub(super) async fn active_controller() -> i32 {
    use kafka_protocol::{
        messages::{
            DescribeQuorumRequest, TopicName,
            describe_quorum_request::{PartitionData, TopicData},
        },
        protocol::StrBytes,
    };
    let first = common::kafka::bootstrap();
    let first = first.split(',').next().unwrap().to_string();
    let mut client = common::kafka_client::KafkaClient::connect(&first).await;
    let req = DescribeQuorumRequest::default().with_topics(vec![
        TopicData::default()
            .with_topic_name(TopicName(StrBytes::from_static_str("__cluster_metadata")))
            .with_partitions(vec![PartitionData::default().with_partition_index(0)]),
    ]);
    let resp = client.call(1, &req).await;
    assert_eq!(resp.error_code, 0, "{resp:?}");
    resp.topics[0].partitions[0].leader_id.0
}
