//! The run's result: a table on stderr and, with `--json`, one JSON object on stdout.

use std::{sync::atomic::Ordering, time::Duration};

use leaderlink::{forward::Forwarder, telemetry};
use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer},
};

use crate::{
    AcksArg, Args, Mode,
    attack::{self, Attack},
    load::{Shared, merged, merged_ok},
    target::rdkafka_settings,
};

/// Sum of the partitions' high watermarks: how many records the leaders hold.
pub fn records_in_log(bootstrap: &str, topic: &str, partitions: i32) -> Option<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .ok()?;
    let mut sum = 0;
    for p in 0..partitions {
        sum += consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .ok()?
            .1;
    }
    Some(sum)
}

/// Reports a run of `elapsed` seconds. `forwarder` is leaderlink's core when it ran in this
/// process (its leader connections' counters are reported); `in_log` the records the leaders
/// gained.
pub fn report(
    args: &Args,
    shared: &Shared,
    elapsed: f64,
    forwarder: Option<&Forwarder>,
    in_log: Option<i64>,
    attack: Option<(Attack, &attack::Tally)>,
) {
    let h = merged(shared);
    let records = shared.records.load(Ordering::Relaxed);
    let requests = shared.requests.load(Ordering::Relaxed);
    let errors = shared.errors.load(Ordering::Relaxed);
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let ok = merged_ok(shared);
    let ok_ms = |q: f64| ok.value_at_quantile(q) as f64 / 1000.0;
    let leader_peak_in_flight = forwarder.map(|f| {
        f.pool()
            .slots()
            .iter()
            .map(|s| s.stats.peak_in_flight.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    });
    // Requests written to the leaders (warm-up included): below `requests` when calls for
    // different partitions were coalesced into shared Produce requests.
    let leader_requests = forwarder.map(|f| f.pool().requests_sent());
    // Record batches written to the leaders: below `records` / `batch_records` when calls'
    // records for one partition were merged into shared batches.
    let leader_batches = forwarder.map(|f| f.pool().batches_sent());
    // Produce request bytes written to the leaders (warm-up included): with `--compression`,
    // what the codec left of the batches.
    let leader_produce_bytes = forwarder.map(|f| f.pool().produce_bytes_sent());
    let out = serde_json::json!({
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "grpc_api": (args.mode == Mode::Forwarder)
            .then(|| format!("{:?}", args.client).to_lowercase()),
        "acks": match args.acks { AcksArg::Zero => "0", AcksArg::One => "1", AcksArg::All => "all" },
        "concurrency": args.concurrency,
        "record_size": args.record_size,
        "batch_records": args.batch_records,
        "partitions": args.partitions,
        "duration_s": elapsed,
        "records": records,
        "requests": requests,
        "errors": errors,
        "records_per_sec": records as f64 / elapsed,
        "requests_per_sec": requests as f64 / elapsed,
        "mb_per_sec": (records * args.record_size as u64) as f64 / elapsed / 1e6,
        "latency_ms": {
            "p50": ms(0.50), "p90": ms(0.90), "p99": ms(0.99), "p999": ms(0.999),
            "max": h.max() as f64 / 1000.0,
        },
        // Successful calls only (equal to latency_ms without errors).
        "ok_latency_ms": {
            "p50": ok_ms(0.50), "p99": ok_ms(0.99), "max": ok.max() as f64 / 1000.0,
        },
        "leader_peak_in_flight": leader_peak_in_flight,
        "leader_requests": leader_requests,
        "leader_batches": leader_batches.map(|b| b.0),
        "records_per_leader_batch": leader_batches
            .filter(|b| b.0 > 0)
            .map(|(b, r)| r as f64 / b as f64),
        "records_in_log": in_log,
        "values": format!("{:?}", args.values).to_lowercase(),
        "compression": forwarder.map(|f| f.compression().name()),
        "leader_produce_bytes": leader_produce_bytes,
        "leader_produce_bytes_per_record": leader_produce_bytes
            .zip(leader_batches)
            .filter(|(_, (_, r))| *r > 0)
            .map(|(bytes, (_, r))| bytes as f64 / r as f64),
        "spans_exported": args.otlp_endpoint.as_ref().map(|_| telemetry::spans_exported()),
        "spans_dropped": args.otlp_endpoint.as_ref().map(|_| telemetry::spans_dropped()),
        // The hostile caller alongside (`--attack`): what it did, and how often the server
        // closed its connection.
        "attack": attack.map(|(kind, t)| serde_json::json!({
            "kind": format!("{kind:?}"),
            "actions": t.actions.load(Ordering::Relaxed),
            "closed_by_server": t.closed.load(Ordering::Relaxed),
        })),
        // What rdkafka mode passed to librdkafka (null in the other modes).
        "rdkafka_config": (args.mode == Mode::Rdkafka).then(|| {
            rdkafka_settings(args)
                .into_iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::String(v)))
                .collect::<serde_json::Map<_, _>>()
        }),
    });
    eprintln!(
        "\n{:<10} {:>6} {:>4} {:>6} {:>4} {:>12} {:>12} {:>9} {:>9} {:>9} {:>7}",
        "mode",
        "acks",
        "c",
        "size",
        "b",
        "records/s",
        "requests/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "errors"
    );
    eprintln!(
        "{:<10} {:>6} {:>4} {:>6} {:>4} {:>12.0} {:>12.0} {:>9.2} {:>9.2} {:>9.2} {:>7}",
        out["mode"].as_str().unwrap(),
        out["acks"].as_str().unwrap(),
        args.concurrency,
        args.record_size,
        args.batch_records,
        records as f64 / elapsed,
        requests as f64 / elapsed,
        ms(0.5),
        ms(0.99),
        h.max() as f64 / 1000.0,
        errors
    );
    if args.json {
        println!("{out}");
    }
}
