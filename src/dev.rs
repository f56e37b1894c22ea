//! The embedded dev cluster: librdkafka's mock brokers, in-process, data in memory.
//!
//! `MockCluster` is not `Send`, so it lives on a thread of its own; everything else talks to it
//! by sending closures over a channel.

use std::{sync::mpsc, thread, time::Duration};

use rdkafka::{mocking::MockCluster, producer::DefaultProducerContext};

/// The mock cluster type.
pub type Mock = MockCluster<'static, DefaultProducerContext>;

type Cmd = Box<dyn FnOnce(&Mock) + Send>;

/// A running mock cluster. Dropping it stops the brokers.
pub struct DevCluster {
    bootstrap: String,
    brokers: i32,
    tx: Option<mpsc::Sender<Cmd>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl DevCluster {
    /// Starts `brokers` mock brokers on loopback ports.
    pub fn start(brokers: i32) -> Result<DevCluster, String> {
        let (tx, rx) = mpsc::channel::<Cmd>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("dev-cluster".into())
            .spawn(move || {
                let mock = match MockCluster::new(brokers) {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("cannot start the mock cluster: {e}")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(mock.bootstrap_servers()));
                while let Ok(cmd) = rx.recv() {
                    cmd(&mock);
                }
            })
            .map_err(|e| format!("cannot spawn the dev cluster thread: {e}"))?;
        let bootstrap = ready_rx
            .recv()
            .map_err(|_| "the dev cluster thread died".to_string())??;
        Ok(DevCluster {
            bootstrap,
            brokers,
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// `host:port,...` of the mock brokers.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// Runs `f` on the cluster's thread and returns its result (blocking the calling thread
    /// for as long as `f` runs, which is microseconds for mock operations).
    pub fn with<R: Send + 'static>(&self, f: impl FnOnce(&Mock) -> R + Send + 'static) -> R {
        let (tx, rx) = mpsc::channel();
        self.tx
            .as_ref()
            .expect("running")
            .send(Box::new(move |m: &Mock| {
                let _ = tx.send(f(m));
            }))
            .expect("dev cluster thread alive");
        rx.recv().expect("dev cluster thread alive")
    }

    /// Creates a topic, replicated on up to three brokers.
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), String> {
        let name = name.to_string();
        let rf = self.brokers.min(3);
        self.with(move |m| m.create_topic(&name, partitions, rf))
            .map_err(|e| format!("cannot create dev topic: {e}"))
    }

    /// Delays every broker's responses by `delay`.
    pub fn set_leader_latency(&self, delay: Duration) -> Result<(), String> {
        let brokers = self.brokers;
        self.with(move |m| {
            for id in 1..=brokers {
                m.broker_round_trip_time(id, delay)?;
            }
            Ok::<_, rdkafka::error::KafkaError>(())
        })
        .map_err(|e| format!("cannot set broker latency: {e}"))
    }

    /// Makes `broker` the leader of `topic`/`partition`.
    pub fn set_leader(&self, topic: &str, partition: i32, broker: i32) -> Result<(), String> {
        let topic = topic.to_string();
        self.with(move |m| m.partition_leader(&topic, partition, Some(broker)))
            .map_err(|e| format!("cannot move the leader: {e}"))
    }

    /// Number of brokers (ids 1..=n).
    pub fn brokers(&self) -> i32 {
        self.brokers
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
