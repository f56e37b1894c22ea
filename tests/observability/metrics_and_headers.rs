//! `/metrics` against the mock cluster: counters that say what happened, sheds and timeouts
//! included; and the `traceparent` record header read back from the leader.

use crate::common;

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use common::{admin, forward, forward_one, read_back, records, request, start, topic, warm_topic};
use leaderlink::proto::v1::{Acks, ForwardRequest, GetStatsRequest, PartitionData};
use prometheus_parse::{Scrape, Value};
use tonic::Code;

/// GETs `/metrics` and returns the body.
async fn scrape_text(addr: SocketAddr) -> String {
    let (status, head, body) =
        tokio::task::spawn_blocking(move || common::http_get(&addr.to_string(), "/metrics"))
            .await
            .unwrap()
            .expect("an HTTP response");
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body
}

/// Scrapes and parses; every sample belongs to a family with a `# TYPE` line.
async fn scrape(addr: SocketAddr) -> Scrape {
    let text = scrape_text(addr).await;
    let typed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap();
        assert!(
            typed.iter().any(|t| name.starts_with(t)),
            "sample without a TYPE: {line}"
        );
        let value = line.rsplit(' ').next().unwrap();
        assert!(
            value.parse::<f64>().is_ok() || value == "+Inf",
            "bad value: {line}"
        );
    }
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text")
}

/// The value of the sample `name` whose labels include `labels`.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let hits: Vec<f64> = s
        .samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(b) => b.iter().map(|c| c.count).fold(0.0, f64::max),
            Value::Summary(_) => f64::NAN,
        })
        .collect();
    assert_eq!(hits.len(), 1, "{name}{labels:?}: {hits:?}");
    hits[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_forwards_sheds_and_timeouts() {
    let h = start(|cfg| cfg.max_concurrent_calls = 2).await;
    let addr = h.server.metrics_addr;
    let (t, _) = warm_topic(&h, "metrics", 2).await;
    let mut c = h.client.clone();
    const N: u64 = 7;
    for i in 0..N {
        let r = forward_one(&mut c, request(i, Acks::All, &t, 1, records("m", 3)))
            .await
            .unwrap();
        assert_eq!(r.error_code, 0);
    }
    // A Kafka error is data: OK, but counted apart.
    let r = forward_one(&mut c, request(99, Acks::All, &t, 7, records("m", 1)))
        .await
        .unwrap();
    assert_ne!(r.error_code, 0);

    let s = scrape(addr).await;
    let ok = value(
        &s,
        "leaderlink_forward_calls_total",
        &[("code", "OK"), ("outcome", "ok")],
    );
    assert_eq!(ok, (N + 1) as f64, "N forwards and the warm-up");
    let part = value(
        &s,
        "leaderlink_forward_calls_total",
        &[("code", "OK"), ("outcome", "partition_errors")],
    );
    assert_eq!(part, 1.0);
    assert_eq!(
        value(&s, "leaderlink_records_forwarded_total", &[]),
        (3 * N + 1) as f64
    );
    assert_eq!(
        value(&s, "leaderlink_forward_duration_seconds_count", &[]),
        (N + 2) as f64
    );
    assert!(value(&s, "leaderlink_forwarded_bytes_total", &[]) > 0.0);
    assert!(value(&s, "leaderlink_metadata_refreshes_total", &[]) >= 1.0);
    assert_eq!(value(&s, "leaderlink_brokers_stalled", &[]), 0.0);
    assert_eq!(value(&s, "leaderlink_broker_stalls_total", &[]), 0.0);
    // One leader took every request; its histogram counted each answer.
    let leader_requests: f64 = s
        .samples
        .iter()
        .filter(|x| x.metric == "leaderlink_leader_request_duration_seconds_count")
        .map(|x| match x.value {
            Value::Untyped(v) | Value::Counter(v) | Value::Gauge(v) => v,
            _ => 0.0,
        })
        .sum();
    assert!(leader_requests >= (N + 2) as f64, "{leader_requests}");
    // One after the other, each call's records went in a batch of their own.
    let sum = |name: &str| -> f64 {
        s.samples
            .iter()
            .filter(|x| x.metric == name)
            .map(|x| match x.value {
                Value::Counter(v) | Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    assert_eq!(
        sum("leaderlink_leader_records_sent_total"),
        (3 * N + 1) as f64
    );
    assert_eq!(sum("leaderlink_leader_batches_sent_total"), (N + 1) as f64);
    let connects: f64 = s
        .samples
        .iter()
        .filter(|x| {
            x.metric == "leaderlink_leader_connection_events_total"
                && x.labels.get("event") == Some("connect")
        })
        .map(|x| match x.value {
            Value::Counter(v) | Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum();
    assert!(connects >= 1.0, "{connects}");
    assert_eq!(value(&s, "leaderlink_sheds_total", &[]), 0.0);

    // A timeout: the leader takes longer than the caller allows.
    h.dev
        .set_leader_latency(Duration::from_millis(600))
        .unwrap();
    let mut r = tonic::Request::new(request(100, Acks::All, &t, 1, records("slow", 1)));
    r.set_timeout(Duration::from_millis(200));
    let e = c.forward(r).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");

    // A shed: two calls hold both permits, a third is refused at once.
    let slow = |id| {
        let mut c = h.client.clone();
        let t = t.clone();
        tokio::spawn(async move {
            forward(&mut c, request(id, Acks::All, &t, 0, records("s", 1))).await
        })
    };
    let (a, b) = (slow(200), slow(201));
    // Both are in the Forwarder before the third arrives.
    let mut adm = admin(&h).await;
    for _ in 0..200 {
        let st = adm
            .get_stats(GetStatsRequest {})
            .await
            .unwrap()
            .into_inner();
        if st.calls_in_progress == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let e = forward(&mut c, request(202, Acks::All, &t, 0, records("s", 1)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();

    let s = scrape(addr).await;
    assert_eq!(value(&s, "leaderlink_sheds_total", &[]), 1.0);
    let shed = value(
        &s,
        "leaderlink_forward_calls_total",
        &[("code", "RESOURCE_EXHAUSTED"), ("outcome", "shed")],
    );
    assert_eq!(shed, 1.0);
    let timeouts = value(
        &s,
        "leaderlink_forward_calls_total",
        &[("code", "DEADLINE_EXCEEDED"), ("outcome", "timeout")],
    );
    assert_eq!(timeouts, 1.0);
    assert_eq!(
        value(
            &s,
            "leaderlink_forward_calls_total",
            &[("code", "OK"), ("outcome", "ok")]
        ),
        (N + 3) as f64,
        "the two slow calls succeeded"
    );
    assert_eq!(value(&s, "leaderlink_forward_calls_in_progress", &[]), 0.0);
    // No topic labels: label values come from fixed sets and broker ids.
    assert!(!scrape_text(addr).await.contains(&t));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_carry_the_callers_traceparent_and_raw_batches_stay_untouched() {
    let h = start(|_| {}).await;
    let t = topic("trace");
    h.dev.create_topic(&t, 2).unwrap();
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let raw = leaderlink::forward::batch::encode(
        &[leaderlink::proto::v1::Record {
            key: None,
            value: Some(Bytes::from_static(b"raw")),
            headers: vec![],
            timestamp_ms: 1,
        }],
        1,
    );
    let req = ForwardRequest {
        call_timeout_ms: 0,
        id: 1,
        acks: Acks::All as i32,
        timeout_ms: 0,
        partitions: vec![
            PartitionData {
                topic: t.clone(),
                partition: 0,
                record_batch: Bytes::new(),
                records: records("traced", 2),
            },
            PartitionData {
                topic: t.clone(),
                partition: 1,
                record_batch: raw,
                records: vec![],
            },
        ],
        transactional_id: String::new(),
        compression: 0,
    };
    let mut r = tonic::Request::new(req);
    r.set_timeout(Duration::from_secs(10));
    r.metadata_mut()
        .insert("traceparent", caller.parse().unwrap());
    let mut c = h.client.clone();
    let resp = c.forward(r).await.unwrap().into_inner();
    assert!(
        resp.partitions.iter().all(|p| p.error_code == 0),
        "{resp:?}"
    );

    let bootstrap = h.dev.bootstrap().to_string();
    let (t2, bs) = (t.clone(), bootstrap.clone());
    let traced = tokio::task::spawn_blocking(move || read_back(&bs, &t2, 0, 2))
        .await
        .unwrap();
    for (v, tp) in &traced {
        // Without span export, the caller's own context is passed on unchanged.
        assert_eq!(
            tp.as_deref(),
            Some(caller),
            "{}",
            String::from_utf8_lossy(v)
        );
    }
    let untouched = tokio::task::spawn_blocking(move || read_back(&bootstrap, &t, 1, 1))
        .await
        .unwrap();
    assert_eq!(untouched, vec![(b"raw".to_vec(), None)]);

    // Without a traceparent from the caller, and no span export, nothing is added.
    let t3 = topic("untraced");
    h.dev.create_topic(&t3, 1).unwrap();
    forward_one(&mut c, request(2, Acks::All, &t3, 0, records("plain", 1)))
        .await
        .unwrap();
    let bs = h.dev.bootstrap().to_string();
    let plain = tokio::task::spawn_blocking(move || read_back(&bs, &t3, 0, 1))
        .await
        .unwrap();
    assert_eq!(plain[0].1, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_header_can_be_turned_off() {
    let h = start(|cfg| cfg.trace_record_header = false).await;
    let t = topic("noheader");
    h.dev.create_topic(&t, 1).unwrap();
    let mut r = tonic::Request::new(request(1, Acks::All, &t, 0, records("x", 1)));
    r.set_timeout(Duration::from_secs(10));
    r.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    let mut c = h.client.clone();
    c.forward(r).await.unwrap();
    let bs = h.dev.bootstrap().to_string();
    let got = tokio::task::spawn_blocking(move || read_back(&bs, &t, 0, 1))
        .await
        .unwrap();
    assert_eq!(got[0].1, None);
}

/// The metric names in a PromQL expression: every `leaderlink_…` word (a histogram's series as
/// the family's name, without `_bucket`, `_sum` or `_count`).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("leaderlink_") {
        let word: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + word.len()..];
        names.push(word);
    }
    names
}

/// Every query of the chart's Grafana dashboard (helm/leaderlink/dashboards/leaderlink.json)
/// names only metrics that `/metrics` exports (with their `# TYPE`), and the dashboard shows
/// what an operator looks at first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_queries_only_metrics_that_are_exported() {
    let h = start(|_| {}).await;
    let (t, _) = warm_topic(&h, "dashboard", 1).await;
    forward_one(
        &mut h.client.clone(),
        request(1, Acks::Leader, &t, 0, records("d", 1)),
    )
    .await
    .unwrap();
    let text = scrape_text(h.server.metrics_addr).await;
    let families: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/helm/leaderlink/dashboards/leaderlink.json"
    );
    let board: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    for panel in board["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    let mut named = std::collections::BTreeSet::new();
    for e in &exprs {
        let names = metric_names(e);
        assert!(
            !names.is_empty(),
            "a query without a leaderlink metric: {e}"
        );
        for n in names {
            let exported = families.iter().any(|(family, kind)| {
                n == *family
                    || (*kind == "histogram"
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| n.strip_suffix(s) == Some(*family)))
            });
            assert!(
                exported,
                "{n} (in {e}) is not exported by /metrics:\n{text}"
            );
            named.insert(n);
        }
    }
    for wanted in [
        "leaderlink_forward_calls_total",
        "leaderlink_forward_duration_seconds_bucket",
        "leaderlink_leader_request_duration_seconds_bucket",
        "leaderlink_leader_requests_in_flight",
        "leaderlink_leader_requests_queued",
        "leaderlink_leader_connection_events_total",
        "leaderlink_retries_total",
        "leaderlink_sheds_total",
        "leaderlink_trace_spans_dropped_total",
    ] {
        assert!(
            named.contains(wanted),
            "the dashboard does not show {wanted}"
        );
    }
}

/// `leaderlink_cluster_reachable` follows the health check: 1 once cluster metadata was
/// fetched, 0 once no broker answers (the mock cluster stopped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_reachable_follows_the_health_check() {
    let h = start(|cfg| cfg.metadata_max_age_ms = 200).await;
    let addr = h.server.metrics_addr;
    let (_t, _) = warm_topic(&h, "reachable", 1).await;
    assert_eq!(
        value(&scrape(addr).await, "leaderlink_cluster_reachable", &[]),
        1.0
    );
    let common::Harness { server, dev, .. } = h;
    drop(dev);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if value(&scrape(addr).await, "leaderlink_cluster_reachable", &[]) == 0.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still reachable 20 s after the cluster stopped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(server);
}
