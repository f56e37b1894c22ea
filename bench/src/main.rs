//! `leaderlink-bench`: load generator comparing leaderlink (over gRPC or as a library) with
//! librdkafka's producer, against an embedded mock cluster or a real one.
//!
//! Each of `-c` workers loops: one call carrying `-b` records of `-s` bytes for one partition
//! (round robin), waits for its answer, records the call's latency in an HDR histogram (no
//! sample dropped), and counts acknowledged records only.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use clap::{CommandFactory, Parser, ValueEnum};
use hdrhistogram::Histogram;
use leaderlink::{
    config::{Config, LogFormat},
    dev::DevCluster,
    forward::Forwarder,
    proto::v1::{
        Acks, ForwardRequest, ForwardResponse, PartitionData, Record,
        forwarder_client::ForwarderClient,
    },
    server::{self, Running},
    telemetry,
};
use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer},
    producer::{FutureProducer, FutureRecord},
};
use tokio::time::Instant;
use tonic::transport::Channel;

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
    /// Calls per second across all workers (0: as fast as answers come). With a rate, each
    /// call waits for its turn from a token bucket filled every millisecond; latency is counted
    /// from the call's start.
    #[arg(long, default_value_t = 0, value_name = "CALLS")]
    rate: u64,
    /// Forwarder mode: each worker sends its calls one at a time on its own long-lived
    /// ForwardStream instead of one unary Forward call each.
    #[arg(long)]
    grpc_stream: bool,
    /// Forwarder mode: HTTP/2 connections the workers share (worker w uses connection w % N).
    #[arg(long, default_value_t = 1, value_name = "N")]
    grpc_connections: usize,
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
}

/// A Forwarder client for `url`; over TLS (ALPN h2, server name from the URL's host) when
/// `tls_ca` is given.
async fn grpc_client(url: &str, tls_ca: Option<&std::path::Path>) -> ForwarderClient<Channel> {
    let Some(ca) = tls_ca else {
        return ForwarderClient::connect(url.to_string())
            .await
            .expect("connect to leaderlink");
    };
    let uri: http::Uri = url.parse().expect("URL");
    let host = uri.host().expect("URL host").to_string();
    let port = uri.port_u16().expect("URL port");
    let roots = leaderlink::kafka::security::root_store(ca).expect("--tls-ca");
    let mut tls = tokio_rustls::rustls::ClientConfig::builder_with_provider(
        leaderlink::kafka::security::crypto(),
    )
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tls = Arc::new(tls);
    let connector = tower::service_fn(move |_: http::Uri| {
        let (tls, host) = (tls.clone(), host.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name =
                rustls_pki_types::ServerName::try_from(host).map_err(std::io::Error::other)?;
            let s = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
        }
    });
    let ch = tonic::transport::Endpoint::from_shared(url.replace("https://", "http://"))
        .expect("URL")
        .connect_with_connector(connector)
        .await
        .expect("connect to leaderlink over TLS");
    ForwarderClient::new(ch)
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

/// What one call sends.
#[derive(Clone)]
enum Target {
    Grpc(ForwarderClient<Channel>),
    Stream(Box<StreamTarget>),
    Direct(Forwarder),
    Rdkafka(FutureProducer),
}

/// A worker's ForwardStream, opened on its first call (and again after a failure).
struct StreamTarget {
    client: ForwarderClient<Channel>,
    open: Option<(
        tokio::sync::mpsc::Sender<ForwardRequest>,
        tonic::Streaming<ForwardResponse>,
    )>,
}

impl Clone for StreamTarget {
    /// The clone opens its own stream.
    fn clone(&self) -> Self {
        StreamTarget {
            client: self.client.clone(),
            open: None,
        }
    }
}

impl StreamTarget {
    /// Sends `req` on the stream and waits for its answer (the only one outstanding).
    async fn call(&mut self, req: ForwardRequest) -> Result<ForwardResponse, String> {
        let (tx, rx) = match &mut self.open {
            Some(o) => o,
            None => {
                let (tx, requests) = tokio::sync::mpsc::channel(1);
                let answers = self
                    .client
                    .forward_stream(tokio_stream::wrappers::ReceiverStream::new(requests))
                    .await
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                    .into_inner();
                self.open.insert((tx, answers))
            }
        };
        let answer = match tx.send(req).await {
            Ok(()) => match rx.message().await {
                Ok(Some(r)) if r.status_code == 0 => Ok(r),
                Ok(Some(r)) => Err(format!("status {}: {}", r.status_code, r.status_message)),
                Ok(None) => Err("the stream ended".to_string()),
                Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
            },
            Err(_) => Err("the stream is closed".to_string()),
        };
        if answer.is_err() {
            self.open = None;
        }
        answer
    }
}

struct Shared {
    records: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
    stop: AtomicBool,
    /// One histogram per worker, locked by its worker per sample and by the reporter once a
    /// second.
    hists: Vec<Mutex<Histogram<u64>>>,
}

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 1 h with 3 significant digits; `record` saturates above.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

fn merged(shared: &Shared) -> Histogram<u64> {
    let mut all = new_hist();
    for h in &shared.hists {
        all.add(&*h.lock().unwrap_or_else(|p| p.into_inner()))
            .expect("same bounds");
    }
    all
}

fn acks_proto(a: AcksArg) -> Acks {
    match a {
        AcksArg::Zero => Acks::None,
        AcksArg::One => Acks::Leader,
        AcksArg::All => Acks::All,
    }
}

/// Sends one call; returns the records acknowledged.
async fn call(
    target: &mut Target,
    args: &Args,
    partition: i32,
    value: &Bytes,
    deadline: Duration,
) -> Result<u64, String> {
    let n = args.batch_records;
    match target {
        Target::Grpc(_) | Target::Stream(_) | Target::Direct(_) => {
            let req = ForwardRequest {
                id: 0,
                acks: acks_proto(args.acks) as i32,
                timeout_ms: 0,
                partitions: vec![PartitionData {
                    topic: args.topic.clone(),
                    partition,
                    record_batch: Bytes::new(),
                    records: (0..n)
                        .map(|_| Record {
                            key: None,
                            value: Some(value.clone()),
                            headers: vec![],
                            timestamp_ms: 0,
                        })
                        .collect(),
                }],
                transactional_id: String::new(),
            };
            let resp = match target {
                Target::Grpc(c) => {
                    let mut r = tonic::Request::new(req);
                    r.set_timeout(deadline);
                    c.forward(r)
                        .await
                        .map(|r| r.into_inner())
                        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                }
                Target::Stream(s) => s.call(req).await?,
                Target::Direct(f) => f
                    .forward(req, Instant::now() + deadline, None, None)
                    .await
                    .map_err(|e| e.to_string())?,
                Target::Rdkafka(_) => unreachable!(),
            };
            match resp.partitions.first() {
                Some(p) if p.error_code == 0 => Ok(n as u64),
                Some(p) => Err(p.error_name.clone()),
                None => Err("answer without partition results".into()),
            }
        }
        Target::Rdkafka(producer) => {
            let sends: Vec<_> = (0..n)
                .map(|_| {
                    producer.send(
                        FutureRecord::<(), [u8]>::to(&args.topic)
                            .partition(partition)
                            .payload(&value[..]),
                        deadline,
                    )
                })
                .collect();
            let results = futures::future::join_all(sends).await;
            // A call fails if any of its records failed; the error says how many were
            // delivered, and those are not counted as acknowledged.
            let ok = results.iter().filter(|r| r.is_ok()).count() as u64;
            match results.into_iter().find_map(|r| r.err()) {
                None => Ok(ok),
                Some((e, _)) => Err(format!("{e} ({ok} of {n} records delivered)")),
            }
        }
    }
}

/// The forwarder-mode target: unary calls, or a ForwardStream per worker (`--grpc-stream`).
fn grpc_target(args: &Args, client: ForwarderClient<Channel>) -> Target {
    if args.grpc_stream {
        Target::Stream(Box::new(StreamTarget { client, open: None }))
    } else {
        Target::Grpc(client)
    }
}

/// The settings rdkafka mode passes to librdkafka (besides `bootstrap.servers`): librdkafka as a
/// broker embedding it would run it, batching concurrent records as it ships
/// (`batch.num.messages` and `batch.size` at their defaults), unless
/// `--rdkafka-batch-per-call` asks for one call's records per batch.
fn rdkafka_settings(args: &Args) -> Vec<(&'static str, String)> {
    let acks = match args.acks {
        AcksArg::Zero => "0",
        AcksArg::One => "1",
        AcksArg::All => "all",
    };
    let mut s = vec![
        ("acks", acks.to_string()),
        ("linger.ms", args.linger_ms.to_string()),
        ("enable.idempotence", args.rdkafka_idempotence.to_string()),
        ("compression.type", "none".to_string()),
        // The default (100,000) is below what -b 100 runs keep queued; a full queue would show
        // as errors, not as speed.
        ("queue.buffering.max.messages", "2000000".to_string()),
    ];
    if args.rdkafka_batch_per_call {
        s.push(("batch.num.messages", args.batch_records.max(1).to_string()));
    }
    if let Some(n) = args.max_in_flight {
        s.push(("max.in.flight.requests.per.connection", n.to_string()));
    }
    s
}

fn rdkafka_producer(args: &Args, bootstrap: &str) -> FutureProducer {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap);
    for (k, v) in rdkafka_settings(args) {
        cfg.set(k, v);
    }
    cfg.create().expect("rdkafka producer")
}

/// Sum of the partitions' high watermarks: how many records the leaders hold.
fn records_in_log(bootstrap: &str, topic: &str, partitions: i32) -> Option<i64> {
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

fn main() {
    let args = Args::parse();
    if args.grpc_stream && args.mode != Mode::Forwarder {
        Args::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--grpc-stream needs --mode forwarder",
            )
            .exit();
    }
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

async fn run(args: Args, bootstrap: String, dev: Option<DevCluster>) {
    let mut cfg = match &args.config {
        Some(f) => Config::from_file(f).expect("--config"),
        None => Config::default(),
    };
    cfg.bootstrap = bootstrap.split(',').map(str::to_string).collect();
    cfg.metrics_listen = "127.0.0.1:0".parse().unwrap();
    cfg.validate().expect("valid config");
    if let Some(n) = args.max_in_flight {
        cfg.max_in_flight = n;
    }
    if let Some(k) = args.connections_per_leader {
        cfg.connections_per_leader = k;
    }
    // The benchmark measures throughput, not overload protection.
    cfg.max_concurrent_calls = cfg.max_concurrent_calls.max(args.concurrency * 2);
    let mut running: Option<Running> = None;
    let target = match (args.mode, &args.forwarder) {
        (Mode::Forwarder, Some(url)) => {
            grpc_target(&args, grpc_client(url, args.tls_ca.as_deref()).await)
        }
        (Mode::Forwarder, None) => {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let r = server::start(&cfg, l, a).await.expect("leaderlink starts");
            let url = format!("http://{}", r.addr);
            running = Some(r);
            grpc_target(&args, grpc_client(&url, args.tls_ca.as_deref()).await)
        }
        (Mode::Direct, _) => Target::Direct(Forwarder::new(
            cfg.forward(),
            cfg.connection().expect("connection settings"),
            cfg.bootstrap.clone(),
            true,
        )),
        (Mode::Rdkafka, _) => Target::Rdkafka(rdkafka_producer(&args, &bootstrap)),
    };
    let value = Bytes::from(vec![b'x'; args.record_size]);
    let deadline = Duration::from_secs(30);

    // Warm up: metadata, connections, one call per partition (not measured).
    let mut warm = target.clone();
    for p in 0..args.partitions {
        if let Err(e) = call(&mut warm, &args, p, &value, deadline).await {
            eprintln!("warm-up call to partition {p} failed: {e}");
            std::process::exit(1);
        }
    }
    let warm_records = (args.partitions as u64) * args.batch_records as u64;
    if let Some(d) = &dev
        && args.leader_latency_ms > 0
    {
        d.set_leader_latency(Duration::from_millis(args.leader_latency_ms))
            .expect("latency");
    }

    let shared = Arc::new(Shared {
        records: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        hists: (0..args.concurrency)
            .map(|_| Mutex::new(new_hist()))
            .collect(),
    });
    let args = Arc::new(args);
    let started = Instant::now();
    // Open-loop pacing: a bucket of call tokens refilled every millisecond.
    let tokens = (args.rate > 0).then(|| Arc::new(tokio::sync::Semaphore::new(0)));
    if let Some(tokens) = tokens.clone() {
        let (rate, shared) = (args.rate, shared.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            let mut owed = 0.0f64;
            while !shared.stop.load(Ordering::Relaxed) {
                tick.tick().await;
                owed += rate as f64 / 1000.0;
                let whole = owed.floor();
                owed -= whole;
                // Bounded: a backlog larger than one second of calls is not kept.
                if tokens.available_permits() < rate as usize {
                    tokens.add_permits(whole as usize);
                }
            }
            tokens.close();
        });
    }
    // Extra HTTP/2 connections for the gRPC modes (each `connect` opens its own).
    let mut targets = vec![target.clone()];
    if let Target::Grpc(_) | Target::Stream(_) = &target {
        let url = match (&args.forwarder, &running) {
            (Some(u), _) => u.clone(),
            (None, Some(r)) => format!("http://{}", r.addr),
            (None, None) => unreachable!("grpc target without a server"),
        };
        for _ in 1..args.grpc_connections.max(1) {
            targets.push(grpc_target(
                &args,
                grpc_client(&url, args.tls_ca.as_deref()).await,
            ));
        }
    }
    let workers: Vec<_> = (0..args.concurrency)
        .map(|w| {
            let (shared, args, value) = (shared.clone(), args.clone(), value.clone());
            let mut target = targets[w % targets.len()].clone();
            let tokens = tokens.clone();
            tokio::spawn(async move {
                let mut n = w as u64;
                while !shared.stop.load(Ordering::Relaxed) {
                    if let Some(tokens) = &tokens {
                        match tokens.acquire().await {
                            Ok(t) => t.forget(),
                            Err(_) => break,
                        }
                    }
                    let partition = (n % args.partitions as u64) as i32;
                    n += args.concurrency as u64;
                    shared.in_flight.fetch_add(1, Ordering::Relaxed);
                    let t = Instant::now();
                    let r = call(&mut target, &args, partition, &value, deadline).await;
                    let micros = t.elapsed().as_micros().max(1) as u64;
                    shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                    shared.hists[w]
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .saturating_record(micros);
                    shared.requests.fetch_add(1, Ordering::Relaxed);
                    match r {
                        Ok(k) => {
                            shared.records.fetch_add(k, Ordering::Relaxed);
                        }
                        Err(e) => {
                            if shared.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("call failed: {e}");
                            }
                        }
                    }
                }
            })
        })
        .collect();

    // Progress once a second on stderr.
    let mut last = 0;
    while started.elapsed() < args.duration {
        let left = args.duration.saturating_sub(started.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        let now = shared.records.load(Ordering::Relaxed);
        let p99 = merged(&shared).value_at_quantile(0.99) as f64 / 1000.0;
        eprintln!(
            "[{:>5.1}s] {:>10} records/s  in flight {:>5}  p99 so far {:.2} ms",
            started.elapsed().as_secs_f64(),
            now - last,
            shared.in_flight.load(Ordering::Relaxed),
            p99
        );
        last = now;
    }
    shared.stop.store(true, Ordering::Relaxed);
    for w in workers {
        if let Err(e) = w.await {
            eprintln!("a worker died: {e}");
        }
    }
    // Measured after the last call ended, so every counted record falls inside the time.
    let elapsed = started.elapsed().as_secs_f64();

    let h = merged(&shared);
    let records = shared.records.load(Ordering::Relaxed);
    let requests = shared.requests.load(Ordering::Relaxed);
    let errors = shared.errors.load(Ordering::Relaxed);
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let peak_in_flight = running
        .as_ref()
        .map(|r| r.forwarder.clone())
        .or(match &target {
            Target::Direct(f) => Some(f.clone()),
            _ => None,
        });
    let leader_peak_in_flight = peak_in_flight.as_ref().map(|f| {
        f.pool()
            .slots()
            .iter()
            .map(|s| s.stats.peak_in_flight.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    });
    // Requests written to the leaders (warm-up included): below `requests` when calls for
    // different partitions were coalesced into shared Produce requests.
    let leader_requests = peak_in_flight.map(|f| f.pool().requests_sent());
    // Offsets say how many records the leaders hold (when the topic was fresh, minus warm-up).
    let in_log = if dev.is_some() {
        records_in_log(&bootstrap, &args.topic, args.partitions).map(|n| n - warm_records as i64)
    } else {
        None
    };
    let out = serde_json::json!({
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "grpc_api": (args.mode == Mode::Forwarder)
            .then_some(if args.grpc_stream { "stream" } else { "unary" }),
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
        "leader_peak_in_flight": leader_peak_in_flight,
        "leader_requests": leader_requests,
        "records_in_log": in_log,
        "spans_exported": args.otlp_endpoint.as_ref().map(|_| telemetry::spans_exported()),
        "spans_dropped": args.otlp_endpoint.as_ref().map(|_| telemetry::spans_dropped()),
        // What rdkafka mode passed to librdkafka (null in the other modes).
        "rdkafka_config": (args.mode == Mode::Rdkafka).then(|| {
            rdkafka_settings(&args)
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
    if let Some(r) = running {
        r.shutdown(Duration::from_secs(5)).await;
    }
    drop(dev);
}
