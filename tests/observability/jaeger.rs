//! Spans in a real Jaeger v2, from the real binary.
//!
//! The Jaeger tests are `#[ignore]`d: they need the `jaeger` binary named by `LEADERLINK_JAEGER`
//! (`scripts/test` builds it with `scripts/fetch-tools jaeger` and runs them). The test of a
//! collector that is down needs only leaderlink and always runs.

use crate::common;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{free_port, read_back};

use leaderlink::proto::v1::{
    Acks, ForwardRequest, PartitionData, Record, forwarder_client::ForwarderClient,
};
use serde_json::Value;
use tokio::time::Instant;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET: status and body.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    common::http_get(addr, path).map(|(status, _, body)| (status, body))
}

struct Jaeger {
    _proc: Proc,
    otlp: String,
    query: String,
}

/// Starts Jaeger v2 (in-memory storage) on free loopback ports, with scripts/jaeger/config.yaml.
fn start_jaeger() -> Jaeger {
    let bin = std::env::var("LEADERLINK_JAEGER")
        .expect("LEADERLINK_JAEGER: path to the jaeger binary (scripts/fetch-tools jaeger)");
    let (otlp, query, query_grpc) = (free_port(), free_port(), free_port());
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/jaeger/config.yaml");
    let child = Command::new(bin)
        .args(["--config", config])
        .env("JAEGER_OTLP_GRPC_PORT", otlp.to_string())
        .env("JAEGER_QUERY_PORT", query.to_string())
        .env("JAEGER_QUERY_GRPC_PORT", query_grpc.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("jaeger starts");
    let j = Jaeger {
        _proc: Proc(child),
        otlp: format!("http://127.0.0.1:{otlp}"),
        query: format!("127.0.0.1:{query}"),
    };
    let started = Instant::now();
    while http_get(&j.query, "/api/services").is_none_or(|(s, _)| s != 200) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "jaeger did not come up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    j
}

struct Leaderlink {
    _proc: Proc,
    client: ForwarderClient<tonic::transport::Channel>,
    metrics: String,
    /// The dev cluster's bootstrap, read from the log.
    bootstrap: String,
}

/// Runs `leaderlink serve` on its dev cluster (topic `traced`, 1 partition) with JSON logs,
/// `extra` flags and `env`; returns once it serves.
async fn start_leaderlink(extra: &[&str], env: &[(&str, &str)]) -> Leaderlink {
    let (p, a, m) = (free_port(), free_port(), free_port());
    let addr = format!("127.0.0.1:{p}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_leaderlink"))
        .args(["serve", "--listen", &addr])
        .args(["--admin-listen", &format!("127.0.0.1:{a}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{m}")])
        .args(["--dev-topics", "traced:1", "--log-format", "json"])
        .args(extra)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let proc = Proc(child);
    // The dev cluster's address is in a warning (JSON: fields.bootstrap); the rest of the log
    // is drained so the child never blocks on a full pipe.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && let Some(b) = v["fields"]["bootstrap"].as_str()
            {
                let _ = tx.send(b.to_string());
            }
        }
    });
    let bootstrap = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("a JSON log line naming the dev cluster's bootstrap");
    let url = format!("http://{addr}");
    let started = Instant::now();
    let client = loop {
        if let Ok(c) = ForwarderClient::connect(url.clone()).await {
            break c;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no gRPC server"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    Leaderlink {
        _proc: proc,
        client,
        metrics: format!("127.0.0.1:{m}"),
        bootstrap,
    }
}

fn traced_request(id: u64, value: &str) -> ForwardRequest {
    ForwardRequest {
        call_timeout_ms: 0,
        id,
        acks: Acks::All as i32,
        timeout_ms: 0,
        partitions: vec![PartitionData {
            topic: "traced".into(),
            partition: 0,
            record_batch: Default::default(),
            records: vec![Record {
                key: None,
                value: Some(value.as_bytes().to_vec().into()),
                headers: vec![],
                timestamp_ms: 0,
            }],
        }],
        transactional_id: String::new(),
        compression: 0,
    }
}

/// Forwards `req` with `traceparent` (if any) in the metadata; the call must succeed.
async fn forward_traced(ll: &mut Leaderlink, req: ForwardRequest, traceparent: Option<&str>) {
    let mut r = tonic::Request::new(req);
    r.set_timeout(Duration::from_secs(10));
    if let Some(tp) = traceparent {
        r.metadata_mut().insert("traceparent", tp.parse().unwrap());
    }
    let resp = ll.client.forward(r).await.unwrap().into_inner();
    assert_eq!(resp.partitions[0].error_code, 0, "{resp:?}");
}

/// Polls Jaeger until the trace `id` has at least `spans` spans.
fn wait_for_trace(j: &Jaeger, id: &str, spans: usize) -> Value {
    let started = Instant::now();
    loop {
        if let Some((200, body)) = http_get(&j.query, &format!("/api/traces/{id}")) {
            let v: Value = serde_json::from_str(&body).unwrap();
            if v["data"][0]["spans"]
                .as_array()
                .is_some_and(|s| s.len() >= spans)
            {
                return v["data"][0].clone();
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "trace {id} with {spans} spans never reached Jaeger"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn tag<'a>(span: &'a Value, key: &str) -> &'a Value {
    span["tags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["key"] == key)
        .map_or(&Value::Null, |t| &t["value"])
}

fn span_named<'a>(trace: &'a Value, name: &str) -> &'a Value {
    trace["spans"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["operationName"] == name)
        .unwrap_or_else(|| panic!("no span {name:?} in {trace:#}"))
}

fn parent_of(span: &Value) -> &str {
    span["references"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["refType"] == "CHILD_OF")
        .and_then(|r| r["spanID"].as_str())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Jaeger: LEADERLINK_JAEGER (scripts/test provides it)"]
async fn a_forward_is_one_trace_with_the_caller_in_jaeger() {
    let j = start_jaeger();
    // RUST_LOG=warn quiets the log lines, not the exported spans.
    let mut ll = start_leaderlink(&["--otlp-endpoint", &j.otlp], &[("RUST_LOG", "warn")]).await;
    let caller = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    forward_traced(&mut ll, traced_request(7, "hello"), Some(&caller)).await;

    // The first call for the topic also refreshes metadata.
    let trace = wait_for_trace(&j, TRACE_ID, 3);
    let server = span_named(&trace, "leaderlink.v1.Forwarder/Forward");
    let send = span_named(&trace, "send traced");
    let refresh = span_named(&trace, "metadata refresh");
    let process = &trace["processes"][server["processID"].as_str().unwrap()];
    assert_eq!(process["serviceName"], "leaderlink");

    // The server span continues the caller's trace.
    assert_eq!(parent_of(server), CALLER_SPAN);
    assert_eq!(tag(server, "span.kind"), "server");
    assert_eq!(tag(server, "rpc.system"), "grpc");
    assert_eq!(tag(server, "rpc.service"), "leaderlink.v1.Forwarder");
    assert_eq!(tag(server, "rpc.method"), "Forward");
    assert_eq!(tag(server, "rpc.grpc.status_code"), 0);
    assert_eq!(tag(server, "leaderlink.outcome"), "ok");

    // The leader request is its child, with the messaging attributes.
    assert_eq!(parent_of(send), server["spanID"].as_str().unwrap());
    assert_eq!(tag(send, "span.kind"), "client");
    assert_eq!(tag(send, "messaging.system"), "kafka");
    assert_eq!(tag(send, "messaging.operation.type"), "send");
    assert_eq!(tag(send, "messaging.destination.name"), "traced");
    assert_eq!(tag(send, "messaging.destination.partition.id"), "0");
    assert_eq!(tag(send, "messaging.batch.message_count"), 1);
    assert_eq!(tag(send, "server.address"), "127.0.0.1");
    assert!(tag(send, "server.port").as_i64().is_some_and(|p| p > 0));
    assert!(tag(send, "leaderlink.leader_id").as_i64().is_some());
    assert_eq!(tag(send, "leaderlink.attempt"), 1);
    assert_eq!(tag(send, "leaderlink.acks"), -1);
    assert!(tag(send, "leaderlink.correlation_id").as_i64().is_some());
    assert_eq!(tag(send, "leaderlink.request_partitions"), 1);
    assert_eq!(*tag(send, "leaderlink.kafka_error_code"), Value::Null);

    // So is the metadata refresh the call made.
    assert_eq!(parent_of(refresh), server["spanID"].as_str().unwrap());
    assert!(
        tag(refresh, "leaderlink.topics_asked")
            .as_i64()
            .is_some_and(|n| n >= 1)
    );

    // Jaeger lists it under the service too.
    let (status, body) = http_get(&j.query, "/api/traces?service=leaderlink&limit=50").unwrap();
    assert_eq!(status, 200);
    let found: Value = serde_json::from_str(&body).unwrap();
    assert!(
        found["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["traceID"] == TRACE_ID),
        "{found:#}"
    );

    // Consumers continue the trace from leaderlink's server span.
    let bootstrap = ll.bootstrap.clone();
    let header =
        tokio::task::spawn_blocking(move || read_back(&bootstrap, "traced", 0, 1)[0].1.clone())
            .await
            .unwrap();
    assert_eq!(
        header,
        Some(format!(
            "00-{TRACE_ID}-{}-01",
            server["spanID"].as_str().unwrap()
        ))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Jaeger: LEADERLINK_JAEGER (scripts/test provides it)"]
async fn a_retry_is_an_event_on_the_server_span() {
    let j = start_jaeger();
    let mut ll = start_leaderlink(&["--otlp-endpoint", &j.otlp], &[]).await;
    // Once "traced" (one partition) is known, a call for its partition 7 refreshes the metadata
    // and is retried, then answered with UNKNOWN_TOPIC_OR_PARTITION.
    forward_traced(&mut ll, traced_request(8, "x"), None).await;
    let trace_id = "7bf92f3577b34da6a3ce929d0e0e4736";
    let mut req = traced_request(9, "x");
    req.partitions[0].partition = 7;
    let mut r = tonic::Request::new(req);
    r.set_timeout(Duration::from_secs(10));
    r.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{CALLER_SPAN}-01").parse().unwrap(),
    );
    let resp = ll.client.forward(r).await.unwrap().into_inner();
    assert_eq!(resp.partitions[0].error_name, "UNKNOWN_TOPIC_OR_PARTITION");

    let trace = wait_for_trace(&j, trace_id, 2);
    let server = span_named(&trace, "leaderlink.v1.Forwarder/Forward");
    let retry = server["logs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| {
            l["fields"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["key"] == "event" && f["value"] == "retrying partitions")
        })
        .unwrap_or_else(|| panic!("no retry event on {server:#}"));
    let field = |k: &str| {
        retry["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["key"] == k)
            .map(|f| f["value"].clone())
    };
    assert_eq!(field("leaderlink.pending"), Some(Value::from(1)));
    assert!(field("leaderlink.backoff_ms").is_some_and(|b| b.as_i64().is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Jaeger: LEADERLINK_JAEGER (scripts/test provides it)"]
async fn sampling_follows_the_caller_and_the_service_name_can_be_set() {
    let j = start_jaeger();
    let mut ll = start_leaderlink(
        &["--otlp-endpoint", &j.otlp],
        &[
            ("OTEL_SERVICE_NAME", "leaderlink-canary"),
            ("LEADERLINK_TRACE_SAMPLE_RATIO", "0"),
        ],
    )
    .await;
    // Ratio 0 samples no new trace, but a caller's sampled trace is followed...
    let sampled = "5bf92f3577b34da6a3ce929d0e0e4736";
    forward_traced(
        &mut ll,
        traced_request(1, "a"),
        Some(&format!("00-{sampled}-{CALLER_SPAN}-01")),
    )
    .await;
    // ... and so is its decision not to sample.
    let unsampled = "6bf92f3577b34da6a3ce929d0e0e4736";
    forward_traced(
        &mut ll,
        traced_request(2, "b"),
        Some(&format!("00-{unsampled}-{CALLER_SPAN}-00")),
    )
    .await;
    forward_traced(&mut ll, traced_request(3, "c"), None).await;

    let trace = wait_for_trace(&j, sampled, 2);
    let server = span_named(&trace, "leaderlink.v1.Forwarder/Forward");
    let process = &trace["processes"][server["processID"].as_str().unwrap()];
    assert_eq!(process["serviceName"], "leaderlink-canary");
    // The sampled trace is in; give the others the same time to arrive, then check they did not.
    std::thread::sleep(Duration::from_secs(2));
    let (_, body) = http_get(&j.query, &format!("/api/traces/{unsampled}")).unwrap();
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["data"].as_array().is_none_or(|d| d.is_empty()),
        "an unsampled caller's trace was recorded: {v:#}"
    );
    let (_, body) = http_get(&j.query, "/api/traces?service=leaderlink-canary&limit=50").unwrap();
    let all: Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["traceID"].as_str())
        .collect();
    assert_eq!(ids, vec![sampled], "only the sampled caller's trace");
}

/// Reads one counter from `/metrics`.
fn metric(addr: &str, name: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics").expect("metrics answer");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_dropped_and_counted_when_the_collector_is_down() {
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let mut ll = start_leaderlink(&["--otlp-endpoint", &nobody], &[]).await;
    // Forwarding goes on without the collector.
    for i in 0..5 {
        forward_traced(&mut ll, traced_request(i, "x"), None).await;
    }
    // Each call has a server span and a leader-request span; all are lost, and counted.
    let started = Instant::now();
    while metric(&ll.metrics, "leaderlink_trace_spans_dropped_total") < 10.0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "dropped spans not counted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        metric(&ll.metrics, "leaderlink_trace_spans_exported_total"),
        0.0
    );
}
