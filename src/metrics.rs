//! `GET /metrics` in the Prometheus text format.
//!
//! Every value is read at scrape time from the counters the forwarding path keeps anyway
//! ([`crate::stats::Stats`], each connection slot's [`ConnStats`], the metadata client, the span
//! exporter and the caller listeners' abuse watch), so `/metrics` and the admin service cannot disagree and scraping adds
//! nothing to the forwarding path. prometheus-client encodes them.
//!
//! Labels are bounded: `code` and `outcome` (a fixed set), `broker_id` (the cluster's brokers),
//! `event` (three values). No topic or partition labels.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};
use tokio::net::TcpListener;

use crate::{
    forward::Forwarder,
    grpc,
    kafka::{connection::ConnStats, histogram::Histogram},
    stats::{Outcome, Stats, code_name},
    telemetry,
};

/// The registry served at `/metrics`, reading from `forwarder`.
pub fn registry(forwarder: Forwarder) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(ForwarderCollector(forwarder)));
    r
}

/// Renders `registry` in the Prometheus text format (0.0.4).
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, registry);
    out
}

/// Serves `GET /metrics` on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, registry: Registry) -> std::io::Result<()> {
    let registry = Arc::new(registry);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                    )],
                    render(&registry),
                )
            }
        }),
    );
    axum::serve(listener, app).await
}

/// Binds `addr` for [`serve`].
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

struct ForwarderCollector(Forwarder);

impl std::fmt::Debug for ForwarderCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ForwarderCollector")
    }
}

fn counter(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: u64,
) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, unit, MetricType::Counter)?)
}

fn gauge(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    g.encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn histogram_values(h: &Histogram) -> (f64, u64, Vec<(f64, u64)>) {
    let buckets = h.prometheus_buckets();
    let count = buckets.iter().map(|b| b.1).sum();
    (h.sum().as_secs_f64(), count, buckets)
}

impl Collector for ForwarderCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let f = &self.0;
        let s = f.stats();
        {
            let mut m = e.encode_descriptor(
                "leaderlink_forward_calls",
                "Forward calls and ForwardStream requests answered, by gRPC code and outcome.",
                None,
                MetricType::Counter,
            )?;
            for o in Outcome::ALL {
                let labels = [("code", code_name(o.code())), ("outcome", o.name())];
                ConstCounter::new(s.calls(o)).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let (sum, count, buckets) = histogram_values(&s.call_latency);
            e.encode_descriptor(
                "leaderlink_forward_duration",
                "Time from receiving a call (or stream request) to its answer, all outcomes.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        gauge(
            &mut e,
            "leaderlink_cluster_reachable",
            "1 while the last metadata fetch of the health check succeeded (health SERVING), \
             0 while no broker answers.",
            Stats::get(&s.cluster_reachable),
        )?;
        gauge(
            &mut e,
            "leaderlink_forward_calls_in_progress",
            "Forward calls and stream requests being served now.",
            Stats::get(&s.calls_in_progress),
        )?;
        counter(
            &mut e,
            "leaderlink_records_forwarded",
            "Records acknowledged by leaders (or written, with ACKS_NONE).",
            None,
            Stats::get(&s.records_forwarded),
        )?;
        counter(
            &mut e,
            "leaderlink_forwarded",
            "Record batch bytes acknowledged by leaders (or written, with ACKS_NONE).",
            Some(&Unit::Bytes),
            Stats::get(&s.bytes_forwarded),
        )?;
        counter(
            &mut e,
            "leaderlink_retries",
            "Partition batches sent again after a failed attempt.",
            None,
            Stats::get(&s.retries),
        )?;
        counter(
            &mut e,
            "leaderlink_sheds",
            "Calls refused at once by the global concurrency limit (max_concurrent_calls).",
            None,
            Stats::get(&s.sheds),
        )?;
        counter(
            &mut e,
            "leaderlink_metadata_refreshes",
            "Successful metadata refreshes.",
            None,
            f.metadata().refreshes(),
        )?;
        gauge(
            &mut e,
            "leaderlink_brokers_stalled",
            "Brokers not dialled now because they stopped answering (a stall check or a dial \
             timed out); each is probed until it answers.",
            f.pool().suspects().len() as u64,
        )?;
        counter(
            &mut e,
            "leaderlink_broker_stalls",
            "Times a broker was found not answering and avoided until it answered a probe.",
            None,
            f.pool().suspects().marked(),
        )?;
        counter(
            &mut e,
            "leaderlink_caller_penalties",
            "Penalties given to caller addresses, one per connection closed for abuse (http2_abuse_penalty_ms).",
            None,
            grpc::abuse::penalties(),
        )?;
        gauge(
            &mut e,
            "leaderlink_caller_connections_held",
            "Connections from penalized caller addresses held unanswered now.",
            grpc::abuse::connections_held(),
        )?;
        counter(
            &mut e,
            "leaderlink_caller_connections_closed_at_accept",
            "Connections from penalized caller addresses closed as accepted, the held ones being at their maximum.",
            None,
            grpc::abuse::connections_closed(),
        )?;
        counter(
            &mut e,
            "leaderlink_trace_spans_exported",
            "Spans the OTLP collector accepted.",
            None,
            telemetry::spans_exported(),
        )?;
        counter(
            &mut e,
            "leaderlink_trace_spans_dropped",
            "Spans lost: export queue full, or the collector refused them or did not answer.",
            None,
            telemetry::spans_dropped(),
        )?;
        encode_brokers(f, &mut e)
    }
}

/// One broker's slots, summed.
#[derive(Default)]
struct Broker {
    in_flight: u64,
    queued: u64,
    sent: u64,
    batches: u64,
    records: u64,
    connects: u64,
    poisoned: u64,
    timeouts: u64,
    latency: Histogram,
}

fn encode_brokers(f: &Forwarder, e: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
    let mut brokers: BTreeMap<i32, Broker> = BTreeMap::new();
    for slot in f.pool().slots() {
        let b = brokers.entry(slot.broker_id).or_default();
        let st: &ConnStats = &slot.stats;
        b.in_flight += Stats::get(&st.in_flight);
        b.queued += Stats::get(&st.queued);
        b.sent += Stats::get(&st.sent);
        b.batches += Stats::get(&st.batches);
        b.records += Stats::get(&st.records);
        b.connects += Stats::get(&st.connects);
        b.poisoned += Stats::get(&st.poisoned);
        b.timeouts += Stats::get(&st.timeouts);
        b.latency.add(&st.latency);
    }
    let ids: Vec<(i32, String)> = brokers.keys().map(|id| (*id, id.to_string())).collect();
    let label = |id: &str| [("broker_id", id.to_string())];
    {
        let mut m = e.encode_descriptor(
            "leaderlink_leader_request_duration",
            "Time from queueing a request on a leader connection to its answer, per broker.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (id, name) in &ids {
            let (sum, count, buckets) = histogram_values(&brokers[id].latency);
            let labels = label(name);
            m.encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
    }
    for (metric, help, kind, read) in [
        (
            "leaderlink_leader_requests_in_flight",
            "Requests written or being written to a broker and awaiting its answer.",
            MetricType::Gauge,
            (|b: &Broker| b.in_flight) as fn(&Broker) -> u64,
        ),
        (
            "leaderlink_leader_requests_queued",
            "Requests waiting for an in-flight slot on a broker's connections.",
            MetricType::Gauge,
            |b: &Broker| b.queued,
        ),
        (
            "leaderlink_leader_requests_sent",
            "Requests written to a broker.",
            MetricType::Counter,
            |b: &Broker| b.sent,
        ),
        (
            "leaderlink_leader_batches_sent",
            "Record batches in the Produce requests written to a broker; the records of \
             concurrent calls for one partition share one.",
            MetricType::Counter,
            |b: &Broker| b.batches,
        ),
        (
            "leaderlink_leader_records_sent",
            "Records in the batches written to a broker (with leaderlink_leader_batches_sent: \
             records per batch).",
            MetricType::Counter,
            |b: &Broker| b.records,
        ),
    ] {
        let mut m = e.encode_descriptor(metric, help, None, kind)?;
        for (id, name) in &ids {
            let v = read(&brokers[id]);
            let labels = label(name);
            let fam = m.encode_family(&labels)?;
            if kind == MetricType::Counter {
                ConstCounter::new(v).encode(fam)?;
            } else {
                ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)).encode(fam)?;
            }
        }
    }
    let mut m = e.encode_descriptor(
        "leaderlink_leader_connection_events",
        "Connection events per broker: connect (a connection opened), poison (a connection \
         failed and every request on it was failed), timeout (a request's deadline passed \
         while it awaited the broker's answer).",
        None,
        MetricType::Counter,
    )?;
    for (id, name) in &ids {
        let b = &brokers[id];
        for (event, v) in [
            ("connect", b.connects),
            ("poison", b.poisoned),
            ("timeout", b.timeouts),
        ] {
            let labels = [("broker_id", name.clone()), ("event", event.to_string())];
            ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
        }
    }
    Ok(())
}
