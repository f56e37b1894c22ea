//! Transactional batches through leaderlink, against a real 3-broker Apache Kafka
//! (`scripts/kafka-cluster start 3`).
//!
//! The test plays the transactional producer itself: it finds the transaction coordinator, runs
//! InitProducerId and AddPartitionsToTxn with kafka-protocol, forwards the producer's
//! transactional batches through leaderlink with `transactional_id` set, and ends one
//! transaction with a commit and another with an abort. Plain calls for another partition of the
//! same leader go at the same moment: a Produce request that mixed them with a transactional
//! batch would be refused as a whole by Kafka (TRANSACTIONAL_ID_AUTHORIZATION_FAILED).
//! A read_committed consumer then sees the committed records, not the aborted ones, and every
//! plain record.
//!
//! `#[ignore]`d in a plain `cargo test`; the README's test command runs it with
//! `LEADERLINK_KAFKA_BOOTSTRAP` set.

use crate::common::{self, kafka_client::KafkaClient};

use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use kafka_protocol::{
    messages::{
        AddPartitionsToTxnRequest, EndTxnRequest, FindCoordinatorRequest, InitProducerIdRequest,
        ProducerId, TopicName, TransactionalId,
        add_partitions_to_txn_request::AddPartitionsToTxnTopic,
    },
    protocol::StrBytes,
};
use leaderlink::proto::v1::{Acks, ForwardRequest, PartitionData};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
};
use tokio::time::Instant;

/// Kafka errors a transactional client retries: COORDINATOR_LOAD_IN_PROGRESS,
/// COORDINATOR_NOT_AVAILABLE, NOT_COORDINATOR, CONCURRENT_TRANSACTIONS.
const RETRY: [i16; 4] = [14, 15, 16, 51];

/// Whether to try again after `code`: false on success; true (after a pause) on a retriable
/// coordinator error within 30 s of `started`; a failed assertion otherwise.
async fn again(what: &str, code: i16, started: Instant) -> bool {
    if code == 0 {
        return false;
    }
    assert!(
        RETRY.contains(&code) && started.elapsed() < Duration::from_secs(30),
        "{what}: error {code}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    true
}

/// A transactional producer's coordinator session: its producer id and epoch, and a
/// connection to its coordinator.
struct Txn {
    id: String,
    producer_id: i64,
    epoch: i16,
    coordinator: KafkaClient,
}

impl Txn {
    /// FindCoordinator, then InitProducerId on the coordinator.
    async fn init(transactional_id: &str) -> Txn {
        let mut any =
            KafkaClient::connect(common::kafka::bootstrap().split(',').next().unwrap()).await;
        let started = Instant::now();
        let addr = loop {
            let req = FindCoordinatorRequest::default()
                .with_key(StrBytes::from_string(transactional_id.to_string()))
                .with_key_type(1);
            let r = any.call(3, &req).await;
            if !again("FindCoordinator", r.error_code, started).await {
                break format!("{}:{}", r.host.as_str(), r.port);
            }
        };
        let mut coordinator = KafkaClient::connect(&addr).await;
        let started = Instant::now();
        let (producer_id, epoch) = loop {
            let req = InitProducerIdRequest::default()
                .with_transactional_id(Some(TransactionalId(StrBytes::from_string(
                    transactional_id.to_string(),
                ))))
                .with_transaction_timeout_ms(60_000)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1);
            let r = coordinator.call(3, &req).await;
            if !again("InitProducerId", r.error_code, started).await {
                break (r.producer_id.0, r.producer_epoch);
            }
        };
        Txn {
            id: transactional_id.to_string(),
            producer_id,
            epoch,
            coordinator,
        }
    }

    fn tid(&self) -> TransactionalId {
        TransactionalId(StrBytes::from_string(self.id.clone()))
    }

    /// AddPartitionsToTxn (v3, the client's version) for one partition.
    async fn add_partition(&mut self, topic: &str, partition: i32) {
        let req = AddPartitionsToTxnRequest::default()
            .with_v3_and_below_transactional_id(self.tid())
            .with_v3_and_below_producer_id(ProducerId(self.producer_id))
            .with_v3_and_below_producer_epoch(self.epoch)
            .with_v3_and_below_topics(vec![
                AddPartitionsToTxnTopic::default()
                    .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                    .with_partitions(vec![partition]),
            ]);
        let started = Instant::now();
        loop {
            let r = self.coordinator.call(3, &req).await;
            let code = r
                .results_by_topic_v3_and_below
                .iter()
                .flat_map(|t| &t.results_by_partition)
                .map(|p| p.partition_error_code)
                .find(|&e| e != 0)
                .unwrap_or(0);
            if !again("AddPartitionsToTxn", code, started).await {
                return;
            }
        }
    }

    /// EndTxn: commit or abort.
    async fn end(&mut self, commit: bool) {
        let req = EndTxnRequest::default()
            .with_transactional_id(self.tid())
            .with_producer_id(ProducerId(self.producer_id))
            .with_producer_epoch(self.epoch)
            .with_committed(commit);
        let started = Instant::now();
        while again(
            "EndTxn",
            self.coordinator.call(3, &req).await.error_code,
            started,
        )
        .await
        {}
    }
}

/// Two partitions of `topic` with the same leader.
fn two_partitions_of_one_leader(topic: &str) -> (i32, i32) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", common::kafka::bootstrap())
        .create()
        .unwrap();
    let started = Instant::now();
    loop {
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        let parts = md.topics()[0].partitions();
        for a in parts {
            for b in parts {
                if a.id() < b.id() && a.leader() == b.leader() && a.leader() >= 0 {
                    return (a.id(), b.id());
                }
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no leader leads two partitions"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Values of `topic`/`partition` as a read_committed consumer sees them, up to the end.
///
/// EndTxn answers before the coordinator has written the transaction markers to the
/// partitions, so the end is where the consumer has nothing more to hand over and its position
/// has reached the high watermark as it is now (a transaction still without its marker holds the
/// position back).
fn read_committed(topic: &str, partition: i32) -> Vec<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", common::kafka::bootstrap())
        .set("group.id", format!("committed-{topic}-{partition}"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "read {out:?} of {topic}-{partition}"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                out.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
                continue;
            }
            Some(Err(e)) => {
                eprintln!("consumer: {e} (retrying)");
                continue;
            }
            None => {}
        }
        let (_, high) = consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .unwrap();
        let at = consumer
            .position()
            .unwrap()
            .find_partition(topic, partition)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        if at.is_some_and(|o| o >= high) {
            return out;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Kafka: LEADERLINK_KAFKA_BOOTSTRAP (scripts/test starts one)"]
async fn a_committed_transaction_is_read_an_aborted_one_is_not_and_plain_calls_are_untouched() {
    let topic = common::topic("txn");
    common::kafka::create_topic(&topic, 6, &[]).await;
    let (tx_partition, plain_partition) = two_partitions_of_one_leader(&topic);

    let suffix = common::topic("id");
    let mut commit = Txn::init(&format!("commit-{suffix}")).await;
    let mut abort = Txn::init(&format!("abort-{suffix}")).await;
    commit.add_partition(&topic, tx_partition).await;
    abort.add_partition(&topic, tx_partition).await;

    let (_server, client) = common::kafka::start(|_| {}).await;

    let tx_request = |txn: &Txn, tag: &str| ForwardRequest {
        call_timeout_ms: 0,
        compression: 0,
        id: 0,
        acks: Acks::All as i32,
        timeout_ms: 0,
        partitions: vec![PartitionData {
            topic: topic.clone(),
            partition: tx_partition,
            record_batch: common::producer_batch(
                &[
                    &format!("{tag}-0"),
                    &format!("{tag}-1"),
                    &format!("{tag}-2"),
                ],
                txn.producer_id,
                txn.epoch,
                0,
                true,
            ),
            records: vec![],
        }],
        transactional_id: txn.id.clone(),
    };
    // Both transactions' batches and 32 plain calls for the other partition of that leader, all
    // at once: they meet in the leader connection's queue.
    const PLAIN: usize = 32;
    let mut calls = vec![
        tx_request(&commit, "committed"),
        tx_request(&abort, "aborted"),
    ];
    for i in 0..PLAIN {
        calls.push(common::request(
            i as u64,
            Acks::All,
            &topic,
            plain_partition,
            vec![leaderlink::proto::v1::Record {
                key: None,
                value: Some(Bytes::from(format!("plain-{i}"))),
                headers: vec![],
                timestamp_ms: 0,
            }],
        ));
    }
    let results = join_all(calls.into_iter().map(|r| {
        let mut c = client.clone();
        async move { common::forward_one(&mut c, r).await }
    }))
    .await;
    for (i, r) in results.iter().enumerate() {
        let r = r.as_ref().unwrap_or_else(|e| panic!("call {i}: {e:?}"));
        assert_eq!(r.error_code, 0, "call {i}: {r:?}");
        assert!(r.base_offset >= 0, "call {i}: {r:?}");
    }

    commit.end(true).await;
    abort.end(false).await;

    assert_eq!(
        read_committed(&topic, tx_partition),
        vec!["committed-0", "committed-1", "committed-2"],
        "read_committed sees the committed transaction's records only"
    );
    let mut plain = read_committed(&topic, plain_partition);
    plain.sort();
    let mut expected: Vec<String> = (0..PLAIN).map(|i| format!("plain-{i}")).collect();
    expected.sort();
    assert_eq!(plain, expected, "every plain call's record, once");
    println!(
        "transactions: committed 3 records, aborted 3, {PLAIN} plain calls beside them all \
         answered"
    );
}
