//! The benchmark tool's correctness (not its numbers): the JSON has every field, records
//! counted equal records the leaders hold, `--max-in-flight 1` keeps one request in flight.

use std::process::Command;

use serde_json::Value;

fn bench(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_leaderlink-bench"))
        .args(args)
        .arg("--json")
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("records/s"),
        "progress and table on stderr: {stderr}"
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

#[test]
fn forwarder_mode_reports_every_field_and_counts_what_the_leaders_hold() {
    let v = bench(&[
        "--mode",
        "forwarder",
        "-d",
        "2s",
        "-c",
        "8",
        "-p",
        "3",
        "-b",
        "5",
    ]);
    for key in [
        "mode",
        "acks",
        "concurrency",
        "record_size",
        "batch_records",
        "partitions",
        "duration_s",
        "records",
        "requests",
        "errors",
        "records_per_sec",
        "requests_per_sec",
        "mb_per_sec",
    ] {
        assert!(v.get(key).is_some(), "{key} missing: {v}");
    }
    for q in ["p50", "p90", "p99", "p999", "max"] {
        assert!(v["latency_ms"][q].as_f64().is_some(), "latency_ms.{q}: {v}");
    }
    // Without errors, the successful calls are all the calls.
    for q in ["p50", "p99", "max"] {
        assert_eq!(
            v["ok_latency_ms"][q], v["latency_ms"][q],
            "ok_latency_ms.{q}: {v}"
        );
    }
    assert_eq!(v["mode"], "forwarder");
    assert_eq!(v["grpc_api"], "unary");
    assert_eq!(v["batch_records"], 5);
    assert_eq!(v["errors"], 0);
    let records = v["records"].as_u64().unwrap();
    assert!(records > 0);
    assert_eq!(records, v["requests"].as_u64().unwrap() * 5);
    assert_eq!(
        v["records_in_log"].as_i64().unwrap(),
        records as i64,
        "acknowledged records equal the leaders' offsets: {v}"
    );
}

#[test]
fn max_in_flight_one_keeps_one_request_in_flight() {
    let v = bench(&[
        "--mode",
        "direct",
        "-d",
        "1s",
        "-c",
        "16",
        "-p",
        "1",
        "--max-in-flight",
        "1",
    ]);
    assert_eq!(v["leader_peak_in_flight"], 1, "{v}");
    let v = bench(&["--mode", "direct", "-d", "1s", "-c", "16", "-p", "1"]);
    assert!(v["leader_peak_in_flight"].as_u64().unwrap() > 1, "{v}");
}

#[test]
fn rdkafka_baseline_runs_against_the_same_cluster() {
    let v = bench(&[
        "--mode", "rdkafka", "-d", "1s", "-c", "8", "-p", "2", "--acks", "all",
    ]);
    assert_eq!(v["mode"], "rdkafka");
    assert_eq!(v["acks"], "all");
    assert_eq!(v["errors"], 0);
    assert_eq!(
        v["records_in_log"].as_i64().unwrap(),
        v["records"].as_i64().unwrap()
    );
    // librdkafka batches as it ships: no batch.num.messages, linger 0.
    let cfg = &v["rdkafka_config"];
    assert_eq!(cfg["acks"], "all", "{v}");
    assert_eq!(cfg["linger.ms"], "0", "{v}");
    assert!(cfg.get("batch.num.messages").is_none(), "{v}");
}

#[test]
fn the_old_one_batch_per_call_baseline_is_a_separate_option() {
    let v = bench(&[
        "--mode",
        "rdkafka",
        "-d",
        "1s",
        "-c",
        "4",
        "-b",
        "3",
        "--rdkafka-batch-per-call",
        "--linger-ms",
        "2",
    ]);
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["rdkafka_config"]["batch.num.messages"], "3", "{v}");
    assert_eq!(v["rdkafka_config"]["linger.ms"], "2", "{v}");
    let v = bench(&["--mode", "direct", "-d", "1s", "-c", "4"]);
    assert!(v["rdkafka_config"].is_null(), "{v}");
}

#[test]
fn a_rate_caps_the_calls_made() {
    // 100 calls/s for 2 s: the token bucket cannot hand out more than ~one second of backlog
    // on top of what the elapsed time allows.
    let v = bench(&[
        "--mode", "direct", "-d", "2s", "-c", "16", "-p", "1", "--rate", "100",
    ]);
    let requests = v["requests"].as_u64().unwrap();
    let secs = v["duration_s"].as_f64().unwrap();
    assert!(requests > 0);
    assert!(
        (requests as f64) <= 100.0 * secs + 100.0 + 16.0,
        "{requests} calls in {secs} s"
    );
}

#[test]
fn grpc_stream_sends_every_call_on_forward_streams_and_counts_what_the_leaders_hold() {
    let v = bench(&[
        "--mode",
        "forwarder",
        "--grpc-stream",
        "-d",
        "2s",
        "-c",
        "8",
        "-p",
        "3",
        "-b",
        "2",
    ]);
    assert_eq!(v["grpc_api"], "stream");
    assert_eq!(v["errors"], 0);
    let records = v["records"].as_u64().unwrap();
    assert!(records > 0);
    assert_eq!(records, v["requests"].as_u64().unwrap() * 2);
    assert_eq!(v["records_in_log"].as_i64().unwrap(), records as i64, "{v}");

    let refused = Command::new(env!("CARGO_BIN_EXE_leaderlink-bench"))
        .args(["--mode", "direct", "--grpc-stream", "-d", "1s"])
        .output()
        .expect("runs");
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--grpc-stream needs --mode forwarder"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[test]
fn client_batched_merges_the_workers_calls_and_counts_what_the_leaders_hold() {
    let v = bench(&[
        "--mode",
        "forwarder",
        "--client",
        "batched",
        "-d",
        "2s",
        "-c",
        "8",
        "-p",
        "3",
        "-b",
        "2",
    ]);
    assert_eq!(v["grpc_api"], "batched");
    assert_eq!(v["errors"], 0);
    let records = v["records"].as_u64().unwrap();
    assert!(records > 0);
    assert_eq!(v["records_in_log"].as_i64().unwrap(), records as i64, "{v}");
    assert!(
        v["records_per_leader_batch"].as_f64().unwrap() >= 2.0,
        "{v}"
    );
}

#[test]
fn client_health_makes_health_checks_and_forwards_nothing() {
    let v = bench(&[
        "--mode",
        "forwarder",
        "--client",
        "health",
        "-d",
        "1s",
        "-c",
        "4",
        "-p",
        "2",
    ]);
    assert_eq!(v["grpc_api"], "health");
    assert_eq!(v["errors"], 0);
    assert!(v["requests"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["records"], 0, "{v}");
    // Only the warm-up's health checks ran; nothing reached the leaders.
    assert_eq!(v["records_in_log"].as_i64().unwrap(), 0, "{v}");
}

/// `--attack` runs a hostile HTTP/2 caller alongside the load against `--forwarder`: a rapid
/// reset attacker resets streams and has its connection closed by the server (GOAWAY past
/// `http2_max_pending_reset_streams`), while the load's calls all succeed.
#[test]
fn an_attack_runs_alongside_the_load_and_is_reported() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dev = leaderlink::dev::DevCluster::start(1).expect("mock cluster");
    dev.create_topic("bench", 1).expect("topic");
    let cfg = leaderlink::config::Config {
        bootstrap: vec![dev.bootstrap().to_string()],
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    let server = runtime.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        leaderlink::server::start(&cfg, l, a)
            .await
            .expect("leaderlink starts")
    });
    let url = format!("http://{}", server.addr);
    let v = bench(&[
        "--forwarder",
        &url,
        "--attack",
        "rapid-reset",
        "-d",
        "2s",
        "-c",
        "4",
        "-p",
        "1",
    ]);
    assert_eq!(v["errors"], 0, "{v}");
    assert!(v["requests"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["attack"]["kind"], "RapidReset", "{v}");
    assert!(v["attack"]["actions"].as_u64().unwrap() > 20, "{v}");
    assert!(
        v["attack"]["closed_by_server"].as_u64().unwrap() >= 1,
        "{v}"
    );
    drop(server);
    drop(dev);
}
