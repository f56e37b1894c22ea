//! `leaderlink-bench`: load generator comparing leaderlink (over gRPC or as a library) with
//! librdkafka's producer, against an embedded mock cluster or a real one.
//!
//! Each of `-c` workers loops: one call carrying `-b` records of `-s` bytes for one partition
//! (round robin), waits for its answer, records the call's latency in an HDR histogram (no
//! sample dropped), and counts acknowledged records only.

mod attack;
mod load;
mod report;
mod target;
mod values;

use std::{sync::Arc, time::Duration};

use clap::{CommandFactory, Parser, ValueEnum};
use leaderlink::{
    config::{Config, LogFormat},
    dev::DevCluster,
    forward::Forwarder,
    server::{self, Running},
    telemetry,
};
use tokio::time::Instant;

use load::Shared;
use target::{
    CALL_DEADLINE, Target, await_serving, call, grpc_channel, grpc_target, rdkafka_producer,
};

/// mimalloc serves every allocation of the binary: under load glibc's malloc took about a fifth
/// of the forwarder's CPU, much of it waiting on arena locks (see the README's Performance
/// section). Set here, not in the library, so that embedders and the fuzz targets keep theirs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Load goes over gRPC to leaderlink (in-process on a real TCP port, or --forwarder URL).
    Forwarder,
    /// leaderlink's Kafka core used as a library: no gRPC hop.
    Direct,
    /// librdkafka's producer straight to the leaders: the baseline.
    Rdkafka,
}

/// How forwarder mode calls leaderlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ClientArg {
    /// One unary Forward call per call.
    Unary,
    /// Each worker sends its calls one at a time on its own long-lived ForwardStream.
    Stream,
    /// leaderlink-client: the workers' concurrent calls merged onto ForwardBatches streams.
    Batched,
    /// `grpc.health.v1.Health/Check` calls instead of forwards: the server's cost per gRPC
    /// call with no work behind it (records/s is 0; see requests/s).
    Health,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AcksArg {
    #[value(name = "0")]
    Zero,
    #[value(name = "1")]
    One,
    #[value(name = "all")]
    All,
}

/// Load generator for leaderlink and its baseline.
#[derive(Debug, Parser)]
#[command(name = "leaderlink-bench", version)]
struct Args {
    /// What carries the load.
    #[arg(long, value_enum, default_value = "forwarder")]
    mode: Mode,
    /// A running leaderlink (e.g. http://127.0.0.1:50051) instead of an in-process one.
    #[arg(long, value_name = "URL")]
    forwarder: Option<String>,
    /// A real cluster's brokers; without it an embedded mock cluster (3 brokers) is used.
    #[arg(long, value_name = "HOSTS")]
    bootstrap: Option<String>,
    /// Mock cluster only: delay every leader response by this many milliseconds.
    #[arg(long, default_value_t = 0, value_name = "N")]
    leader_latency_ms: u64,
    /// Concurrent workers, each with one call outstanding.
    #[arg(short = 'c', long, default_value_t = 64)]
    concurrency: usize,
    /// Bytes per record value.
    #[arg(short = 's', long, default_value_t = 256)]
    record_size: usize,
    /// Records per call (one partition payload).
    #[arg(short = 'b', long, default_value_t = 1)]
    batch_records: usize,
    /// Partitions of the topic (created on the mock cluster; must exist on a real one).
    #[arg(short = 'p', long, default_value_t = 6)]
    partitions: i32,
    /// How long to load, e.g. 10s, 500ms, 2m.
    #[arg(short = 'd', long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Kafka acks.
    #[arg(long, value_enum, default_value = "1")]
    acks: AcksArg,
    /// leaderlink's max_in_flight per leader connection (in-process modes).
    #[arg(long, value_name = "N")]
    max_in_flight: Option<usize>,
    /// leaderlink's connections_per_leader (in-process modes).
    #[arg(long, value_name = "K")]
    connections_per_leader: Option<usize>,
    /// leaderlink's max_batch_bytes (in-process modes); 0 turns record merging off.
    #[arg(long, value_name = "BYTES")]
    max_batch_bytes: Option<usize>,
    /// leaderlink's `compression` (in-process modes): the codec of the batches it encodes.
    /// The report's `leader_produce_bytes` is what went to the leaders.
    #[arg(long, value_enum, value_name = "CODEC")]
    compression: Option<leaderlink::kafka::Codec>,
    /// What record values hold: `repeated` (`-s` bytes of `x`), `text` (JSON-like events, no
    /// two alike) or `random` (incompressible). Compression figures need `text` or `random`.
    #[arg(long, value_enum, default_value = "repeated")]
    values: values::ValueKind,
    /// Calls per second across all workers (0: as fast as answers come). With a rate, each
    /// call waits for its turn from a token bucket filled every millisecond; latency is counted
    /// from the call's start.
    #[arg(long, default_value_t = 0, value_name = "CALLS")]
    rate: u64,
    /// Forwarder mode: each worker sends its calls one at a time on its own long-lived
    /// ForwardStream instead of one unary Forward call each.
    #[arg(long)]
    grpc_stream: bool,
    /// Forwarder mode: how calls reach leaderlink (`--grpc-stream` is `--client stream`).
    #[arg(long, value_enum, default_value = "unary")]
    client: ClientArg,
    /// Forwarder mode: HTTP/2 connections the workers share (worker w uses connection w % N);
    /// with `--client batched`, the client library's connections [default: 1; batched: 4].
    #[arg(long, value_name = "N")]
    grpc_connections: Option<usize>,
    /// `--client batched`: the client library's `max_merge_bytes` (largest request of merged
    /// calls for one partition; 0: every call a request of its own) [default: the library's].
    #[arg(long, value_name = "BYTES")]
    client_merge_bytes: Option<usize>,
    /// Topic to write to.
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Print one JSON object with the results on stdout.
    #[arg(long)]
    json: bool,
    /// forwarder mode, in-process server: export its spans (every call sampled) to this OTLP/gRPC
    /// collector, to measure what tracing costs.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// A leaderlink TOML config laid under the bench's own settings (for the in-process server
    /// and direct mode): e.g. TLS on the listener (tls_*) or to Kafka (kafka_*).
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// rdkafka mode: librdkafka's idempotent producer (`enable.idempotence=true`), to compare
    /// with leaderlink's `idempotence`.
    #[arg(long)]
    rdkafka_idempotence: bool,
    /// rdkafka mode: `linger.ms`. 0 by default: with a closed loop of `-c` callers, lingering
    /// only delays the few records outstanding (librdkafka ships with 5).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    linger_ms: u64,
    /// rdkafka mode: `batch.num.messages` = records per call, so that librdkafka cannot merge
    /// concurrent callers' records into one batch (a handicapped setting, kept to compare with
    /// older measurements). Without it librdkafka batches as it ships.
    #[arg(long)]
    rdkafka_batch_per_call: bool,
    /// forwarder mode: speak TLS to leaderlink, trusting the CAs in FILE (PEM).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// forwarder mode with --forwarder (plaintext): a hostile HTTP/2 caller alongside the load,
    /// on connections of its own (what it costs the load's latency; see `attack.rs`).
    #[arg(long, value_enum, value_name = "KIND")]
    attack: Option<attack::Attack>,
    /// The attacker's source address, as another host would be. Default: 127.0.0.2 when the
    /// forwarder is on a loopback address (leaderlink penalizes the address of an abusive
    /// connection, and the load connects from 127.0.0.1), else the system's choice.
    #[arg(long, value_name = "IP")]
    attack_from: Option<std::net::IpAddr>,
    /// The attacker thread's nice value (Linux). On a machine that also runs the server and the
    /// load, 19 keeps the attacker's own CPU, which in a real attack is another host's, from
    /// slowing them, so that the load's latency shows what the server pays for the attack.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    attack_nice: i32,
    /// How long the attacker runs before the load starts (e.g. 2s): with it, the load meets the
    /// attack in its steady state (1,000 idle connections already open, say) rather than in its
    /// first moments.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    attack_head_start: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 10s, 500ms, 2m"))?;
    Ok(match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        _ => return Err(format!("{s:?}: unit must be ms, s or m")),
    })
}

impl Args {
    /// The client forwarder mode uses.
    fn client(&self) -> ClientArg {
        if self.grpc_stream {
            ClientArg::Stream
        } else {
            self.client
        }
    }
}

fn main() {
    let mut args = Args::parse();
    if (args.grpc_stream || args.client != ClientArg::Unary) && args.mode != Mode::Forwarder {
        Args::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--grpc-stream needs --mode forwarder (and so does --client)",
            )
            .exit();
    }
    if args.compression.is_some() && (args.mode == Mode::Rdkafka || args.forwarder.is_some()) {
        Args::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--compression sets the in-process leaderlink's codec (forwarder mode without \
                 --forwarder, or direct mode)",
            )
            .exit();
    }
    if args.client() == ClientArg::Batched && args.tls_ca.is_some() {
        Args::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--client batched speaks plaintext only (no --tls-ca)",
            )
            .exit();
    }
    if args.attack.is_some() && (args.forwarder.is_none() || args.tls_ca.is_some()) {
        Args::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--attack needs --forwarder URL (plaintext)",
            )
            .exit();
    }
    args.client = args.client();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    // The mock cluster is not Send; it lives on its own thread inside DevCluster.
    let dev = if args.bootstrap.is_none() && args.forwarder.is_none() {
        let dev = DevCluster::start(3).expect("mock cluster");
        dev.create_topic(&args.topic, args.partitions)
            .expect("topic");
        Some(dev)
    } else {
        None
    };
    let bootstrap = args
        .bootstrap
        .clone()
        .or_else(|| dev.as_ref().map(|d| d.bootstrap().to_string()))
        .unwrap_or_default();
    // The same log and span layers as `leaderlink serve`, so that the cost of span export is
    // measured against a production-like baseline.
    let telemetry = {
        let _rt = runtime.enter();
        telemetry::init(LogFormat::Text, args.otlp_endpoint.as_deref(), 1.0)
            .expect("log and span layers set up")
    };
    runtime.block_on(run(args, bootstrap, dev));
    telemetry.shutdown();
}

/// The bench's leaderlink configuration: `--config` (or the defaults) with the bench's
/// overrides.
fn bench_config(args: &Args, bootstrap: &str) -> Config {
    let mut cfg = match &args.config {
        Some(f) => Config::from_file(f).expect("--config"),
        None => Config::default(),
    };
    // Empty with `--forwarder URL`: the server there has its own cluster.
    cfg.bootstrap = bootstrap
        .split(',')
        .filter(|b| !b.is_empty())
        .map(str::to_string)
        .collect();
    cfg.metrics_listen = "127.0.0.1:0".parse().unwrap();
    cfg.validate().expect("valid config");
    if let Some(n) = args.max_in_flight {
        cfg.max_in_flight = n;
    }
    if let Some(k) = args.connections_per_leader {
        cfg.connections_per_leader = k;
    }
    if let Some(b) = args.max_batch_bytes {
        cfg.max_batch_bytes = b;
    }
    if let Some(c) = args.compression {
        cfg.compression = c;
    }
    // The benchmark measures throughput, not overload protection.
    cfg.max_concurrent_calls = cfg.max_concurrent_calls.max(args.concurrency * 2);
    cfg
}

/// What the workers call, and the in-process leaderlink server behind it, if any.
async fn start_target(args: &Args, cfg: &Config, bootstrap: &str) -> (Target, Option<Running>) {
    match (args.mode, &args.forwarder) {
        (Mode::Forwarder, Some(url)) if args.client == ClientArg::Batched => {
            (batched_target(args, url).await, None)
        }
        (Mode::Forwarder, Some(url)) => (
            grpc_target(args, grpc_channel(url, args.tls_ca.as_deref()).await),
            None,
        ),
        (Mode::Forwarder, None) => {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let r = server::start(cfg, l, a).await.expect("leaderlink starts");
            let url = format!("http://{}", r.addr);
            let target = if args.client == ClientArg::Batched {
                batched_target(args, &url).await
            } else {
                grpc_target(args, grpc_channel(&url, args.tls_ca.as_deref()).await)
            };
            (target, Some(r))
        }
        (Mode::Direct, _) => (
            Target::Direct(Forwarder::new(
                cfg.forward(),
                cfg.connection().expect("connection settings"),
                cfg.bootstrap.clone(),
                true,
            )),
            None,
        ),
        (Mode::Rdkafka, _) => (Target::Rdkafka(rdkafka_producer(args, bootstrap)), None),
    }
}

/// The `--client batched` target: the client library over `--grpc-connections` connections (its
/// own default otherwise), shared by every worker.
async fn batched_target(args: &Args, url: &str) -> Target {
    let mut options = leaderlink_client::Options::default();
    if let Some(n) = args.grpc_connections {
        options.connections = n;
    }
    if let Some(b) = args.client_merge_bytes {
        options.max_merge_bytes = b;
    }
    let client = leaderlink_client::Client::connect(&[url], options)
        .await
        .expect("connect to leaderlink");
    Target::Batched(client)
}

/// The targets the workers share: `target`, plus `--grpc-connections - 1` more HTTP/2
/// connections for the gRPC modes (each `connect` opens its own).
async fn targets(target: &Target, args: &Args, running: Option<&Running>) -> Vec<Target> {
    let mut targets = vec![target.clone()];
    if let Target::Grpc(_) | Target::Stream(_) | Target::Health(_) = target {
        let url = match (&args.forwarder, running) {
            (Some(u), _) => u.clone(),
            (None, Some(r)) => format!("http://{}", r.addr),
            (None, None) => unreachable!("grpc target without a server"),
        };
        for _ in 1..args.grpc_connections.unwrap_or(1).max(1) {
            targets.push(grpc_target(
                args,
                grpc_channel(&url, args.tls_ca.as_deref()).await,
            ));
        }
    }
    targets
}

async fn run(args: Args, bootstrap: String, dev: Option<DevCluster>) {
    let cfg = bench_config(&args, &bootstrap);
    let (target, running) = start_target(&args, &cfg, &bootstrap).await;
    let values = values::Values::new(args.values, args.record_size);

    // Warm up: metadata, connections, one call per partition (not measured).
    let mut warm = target.clone();
    if let Target::Health(client) = &mut warm
        && let Err(e) = await_serving(client, CALL_DEADLINE).await
    {
        eprintln!("warm-up: {e}");
        std::process::exit(1);
    }
    let mut warm_records = 0;
    for p in 0..args.partitions {
        match call(&mut warm, &args, p, &values, p as u64, CALL_DEADLINE).await {
            Ok(n) => warm_records += n,
            Err(e) => {
                eprintln!("warm-up call to partition {p} failed: {e}");
                std::process::exit(1);
            }
        }
    }
    if let Some(d) = &dev
        && args.leader_latency_ms > 0
    {
        d.set_leader_latency(Duration::from_millis(args.leader_latency_ms))
            .expect("latency");
    }

    // The attacker starts with the load and stops with it.
    let attack_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attacker = match (args.attack, &args.forwarder) {
        (Some(kind), Some(url)) => {
            let uri: http::Uri = url.parse().expect("--forwarder URL");
            let addr = format!(
                "{}:{}",
                uri.host().expect("URL host"),
                uri.port_u16().expect("URL port")
            );
            let from = args.attack_from.or_else(|| {
                let loopback = uri
                    .host()
                    .and_then(|h| h.parse::<std::net::IpAddr>().ok())
                    .is_some_and(|ip| ip.is_loopback());
                loopback.then(|| std::net::Ipv4Addr::new(127, 0, 0, 2).into())
            });
            let (job, tally) = attack::spawn(
                kind,
                attack::Origin {
                    to: addr,
                    from,
                    nice: args.attack_nice,
                },
                args.topic.clone(),
                attack_stop.clone(),
            );
            // The load starts once the attack is under way: what it measures is the attack
            // going on, not only its first moments.
            tokio::time::sleep(args.attack_head_start).await;
            Some((kind, job, tally))
        }
        _ => None,
    };
    let shared = Arc::new(Shared::new(args.concurrency));
    let args = Arc::new(args);
    let started = Instant::now();
    let tokens = load::pacer(&args, &shared);
    let targets = targets(&target, &args, running.as_ref()).await;
    let workers = load::spawn_workers(&args, &shared, &targets, tokens, &values);
    load::progress(&args, &shared, started).await;
    shared
        .stop
        .store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        if let Err(e) = w.await {
            eprintln!("a worker died: {e}");
        }
    }
    // Measured after the last call ended, so every counted record falls inside the time.
    let elapsed = started.elapsed().as_secs_f64();
    attack_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let attack = match attacker {
        Some((kind, job, tally)) => {
            // An attacker blocked on the server (a stream without window) is not waited for
            // longer than a second; its thread ends with the process.
            let waited = tokio::task::spawn_blocking(move || job.join());
            let _ = tokio::time::timeout(Duration::from_secs(1), waited).await;
            Some((kind, tally))
        }
        None => None,
    };

    let forwarder = running
        .as_ref()
        .map(|r| r.forwarder.clone())
        .or(match &target {
            Target::Direct(f) => Some(f.clone()),
            _ => None,
        });
    // Offsets say how many records the leaders hold (when the topic was fresh, minus warm-up).
    let in_log = if dev.is_some() {
        report::records_in_log(&bootstrap, &args.topic, args.partitions)
            .map(|n| n - warm_records as i64)
    } else {
        None
    };
    report::report(
        &args,
        &shared,
        elapsed,
        forwarder.as_ref(),
        in_log,
        attack.as_ref().map(|(k, t)| (*k, &**t)),
    );
    if let Some(r) = running {
        r.shutdown(Duration::from_secs(5)).await;
    }
    drop(dev);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_against_another_leaderlink_needs_no_bootstrap() {
        let args = Args::parse_from(["leaderlink-bench", "--forwarder", "http://127.0.0.1:1"]);
        assert!(bench_config(&args, "").bootstrap.is_empty());
        let cfg = bench_config(&args, "a:1,b:2");
        assert_eq!(cfg.bootstrap, ["a:1", "b:2"]);
    }
}
