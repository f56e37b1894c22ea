//! A real Prometheus scrapes a running leaderlink, and the chart's Grafana dashboard's queries,
//! run by that Prometheus, return what the calls made.
//!
//! `#[ignore]`d: it needs the `prometheus` binary named by `LEADERLINK_PROMETHEUS` (`scripts/test`
//! builds it with `scripts/fetch-tools prometheus` and runs it).

use crate::common;

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{forward_one, free_port, records, request, start, warm_topic};
use leaderlink::proto::v1::Acks;
use serde_json::Value;
use tokio::time::Instant;

/// The labels the scrape adds, standing in for a ServiceMonitor's (the dashboard filters on them).
const NAMESPACE: &str = "observability-test";
const POD: &str = "leaderlink-0";

/// A child process killed when dropped, with its scratch directory.
struct Prometheus {
    child: Child,
    addr: String,
    dir: std::path::PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts Prometheus scraping `target` (host:port) every second, with the labels above.
fn start_prometheus(target: &str) -> Prometheus {
    let bin = std::env::var("LEADERLINK_PROMETHEUS").expect(
        "LEADERLINK_PROMETHEUS: path to the prometheus binary (scripts/fetch-tools prometheus)",
    );
    let dir = std::env::temp_dir().join(format!("leaderlink-prometheus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: leaderlink\n    static_configs:\n\
             \x20     - targets: ['{target}']\n        labels: {{namespace: {NAMESPACE}, pod: {POD}}}\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let child = Command::new(bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus starts");
    let p = Prometheus {
        child,
        addr: format!("127.0.0.1:{port}"),
        dir,
    };
    let started = Instant::now();
    while common::http_get(&p.addr, "/-/ready").is_none_or(|(s, _, _)| s != 200) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "prometheus did not come up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    p
}

/// `s` percent-encoded for a URL query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs an instant PromQL query; the result vector's (labels, value) pairs.
fn query(p: &Prometheus, promql: &str) -> Vec<(Value, f64)> {
    let path = format!("/api/v1/query?query={}", encode(promql));
    let (status, _, body) = common::http_get(&p.addr, &path).expect("an HTTP answer");
    assert_eq!(status, 200, "{promql}: {body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["status"], "success", "{promql}: {body}");
    v["data"]["result"]
        .as_array()
        .expect("a vector")
        .iter()
        .map(|r| {
            let value = r["value"][1].as_str().expect("a sample").parse().unwrap();
            (r["metric"].clone(), value)
        })
        .collect()
}

/// Polls `promql` until it returns the single value `want` (the scrapes catch up), for 30 s.
fn await_value(p: &Prometheus, promql: &str, want: f64) {
    let started = Instant::now();
    loop {
        let got = query(p, promql);
        if got.len() == 1 && got[0].1 == want {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{promql}: {got:?}, want {want}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The dashboard's queries with its variables set to the scrape's labels and a 1-minute rate
/// window: (panel title, legend, PromQL).
fn dashboard_queries() -> Vec<(String, String, String)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/helm/leaderlink/dashboards/leaderlink.json"
    );
    let board: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = Vec::new();
    for panel in board["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$namespace", NAMESPACE)
                .replace("$pod", POD)
                .replace("$__rate_interval", "1m");
            out.push((
                panel["title"].as_str().unwrap().to_string(),
                t["legendFormat"].as_str().unwrap_or_default().to_string(),
                expr,
            ));
        }
    }
    out
}

/// After a known number of forwards, the counters Prometheus scraped equal them, and the
/// dashboard's queries return data: calls by outcome (ok > 0), call latency p50 and p99 within
/// the histogram's range, leader latency per broker, requests in flight per broker, records/s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the prometheus binary in LEADERLINK_PROMETHEUS (scripts/test builds it)"]
async fn prometheus_scrapes_leaderlink_and_the_dashboard_queries_answer() {
    let h = start(|_| {}).await;
    // One warm-up call, of one record.
    let (t, _) = warm_topic(&h, "scraped", 2).await;
    let warmups = 1;
    let p = std::sync::Arc::new(start_prometheus(&h.server.metrics_addr.to_string()));
    let labels = format!("namespace=\"{NAMESPACE}\", pod=\"{POD}\"");
    // The first scrape has the warm-up only: the calls below are what the rates see.
    {
        let (p, q) = (
            p.clone(),
            format!("sum(leaderlink_forward_calls_total{{{labels}, outcome=\"ok\"}})"),
        );
        tokio::task::spawn_blocking(move || await_value(&p, &q, warmups as f64))
            .await
            .unwrap();
    }
    const CALLS: u64 = 40;
    let mut c = h.client.clone();
    for i in 0..CALLS {
        let r = forward_one(
            &mut c,
            request(i, Acks::Leader, &t, (i % 2) as i32, records("p", 3)),
        )
        .await
        .unwrap();
        assert_eq!(r.error_code, 0, "{r:?}");
        // Spread over two seconds, so that several scrapes see the counters grow.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let calls = CALLS + warmups;
    let p2 = p.clone();
    tokio::task::spawn_blocking(move || {
        await_value(
            &p,
            &format!("sum(leaderlink_forward_calls_total{{{labels}, outcome=\"ok\"}})"),
            calls as f64,
        );
        await_value(
            &p,
            &format!("sum(leaderlink_records_forwarded_total{{{labels}}})"),
            (3 * CALLS + warmups) as f64,
        );
        await_value(
            &p,
            &format!("sum(leaderlink_forward_duration_seconds_count{{{labels}}})"),
            calls as f64,
        );
        // A few more scrapes, so that every rate has two samples in its window.
        std::thread::sleep(Duration::from_secs(3));
        for (title, legend, expr) in dashboard_queries() {
            let result = query(&p, &expr);
            match (title.as_str(), legend.as_str()) {
                ("Calls by outcome", _) => {
                    let ok = result
                        .iter()
                        .find(|(m, _)| m["outcome"] == "ok")
                        .map(|(_, v)| *v);
                    assert!(ok.is_some_and(|v| v > 0.0), "{expr}: {result:?}");
                }
                ("Call latency", _) => {
                    assert_eq!(result.len(), 1, "{expr}: {result:?}");
                    let v = result[0].1;
                    assert!(v > 0.0 && v <= 16.777215, "{legend} {v} s: {expr}");
                }
                ("Leader request latency", _) | ("In flight and queued per broker", _) => {
                    assert!(!result.is_empty(), "{expr}: no series");
                    assert!(result.iter().all(|(_, v)| v.is_finite() && *v >= 0.0));
                }
                ("Records and bytes forwarded", _) => {
                    assert_eq!(result.len(), 1, "{expr}: {result:?}");
                    assert!(result[0].1 > 0.0, "{legend}: {expr}: {result:?}");
                }
                // Retries, sheds, drops and connection events: zero or absent here; the
                // query must still be valid, which `query` asserts.
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    drop(p2);
}
