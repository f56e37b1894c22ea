//! The real Kafka that `scripts/kafka-cluster` runs (the test command starts it).

use leaderlink::{config::Config, proto::v1::forwarder_client::ForwarderClient, server::Running};
use tonic::transport::Channel;

/// The PLAINTEXT bootstrap of the real Kafka that `scripts/kafka-cluster` runs.
pub fn bootstrap() -> String {
    std::env::var("LEADERLINK_KAFKA_BOOTSTRAP").expect(
        "LEADERLINK_KAFKA_BOOTSTRAP: run `scripts/kafka-cluster start 3` (scripts/test does)",
    )
}

/// Creates `name` on that Kafka with `partitions` partitions, replication factor 3 and the
/// topic configs `configs`, with librdkafka's admin client.
pub async fn create_topic(name: &str, partitions: i32, configs: &[(&str, &str)]) {
    use rdkafka::{
        ClientConfig,
        admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
        client::DefaultClientContext,
    };
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    let topic = configs.iter().fold(
        NewTopic::new(name, partitions, TopicReplication::Fixed(3)),
        |t, (k, v)| t.set(k, v),
    );
    for r in admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
}

/// Starts leaderlink in front of that Kafka, with `tweak` applied to the config, and connects a
/// client to it.
pub async fn start(tweak: impl FnOnce(&mut Config)) -> (Running, ForwarderClient<Channel>) {
    let mut cfg = Config {
        bootstrap: bootstrap().split(',').map(str::to_string).collect(),
        ..Config::default()
    };
    tweak(&mut cfg);
    super::start_with_client(&cfg).await
}

/// `java -cp <Kafka's jars> scripts/kafka/<program>`: a single-file Java program run with the
/// jars `scripts/kafka-cluster` fetched (Kafka's own clients and admin classes).
pub fn java(program: &str) -> std::process::Command {
    let root = env!("CARGO_MANIFEST_DIR");
    let libs = std::fs::read_dir(format!("{root}/.cache/kafka"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("libs"))
        .find(|p| p.join(".complete").exists())
        .expect("Kafka's jars in .cache/kafka (scripts/kafka-cluster fetches them)");
    let mut cmd = std::process::Command::new("java");
    cmd.arg("-cp")
        .arg(format!("{}/*", libs.display()))
        .arg(format!("{root}/scripts/kafka/{program}"));
    cmd
}
