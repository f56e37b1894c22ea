//! The `leaderlink` binary: parses configuration, sets up logging, runs the server.

use std::process::ExitCode;

use clap::{Parser, Subcommand, error::ErrorKind};
#[cfg(feature = "dev-cluster")]
use leaderlink::{config::parse_dev_topic, dev::DevCluster};
use leaderlink::{
    config::{Config, ServeArgs},
    kafka::error::chain,
    server, telemetry,
};
#[cfg(feature = "dev-cluster")]
use tracing::warn;
use tracing::{error, info};

/// mimalloc serves every allocation of the binary: under load glibc's malloc took about a fifth
/// of the forwarder's CPU, much of it waiting on arena locks (see the README's Performance
/// section). Set here, not in the library, so that embedders and the fuzz targets keep theirs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for bad configuration or usage (sysexits EX_USAGE).
const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "leaderlink",
    version,
    about = "Forward produce requests over gRPC to Kafka partition leaders"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// What `serve --help` says about the produce contract beyond the flags.
const SERVE_AFTER_HELP: &str = "\
Produce features (README, \"The contract\"):
  Partition chosen by leaderlink: an entry with partition -1 goes where Kafka's Java producer
    would put it: toPositive(murmur2(key)) % partition count when its records share a key, the
    topic's sticky partition (moving on after 16 KiB) when none has one. The result's
    `partition` says which. Not for raw record_batch entries (INVALID_ARGUMENT).
  Compression: --compression (or a request's `compression`) compresses the batches leaderlink
    encodes from `records` with none, gzip, snappy, lz4 or zstd; raw batches are sent as they are.
  Per-record errors: when a leader refuses a batch for some of its records (Produce v8+, e.g.
    INVALID_RECORD), the result's `record_errors` name each by its index in the entry's records.";

#[derive(Subcommand)]
enum Command {
    /// Run the forwarder. Without --bootstrap, it starts an embedded dev cluster (in memory).
    #[command(after_long_help = SERVE_AFTER_HELP)]
    Serve(Box<ServeArgs>),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate FILE (with any LEADERLINK_* variables laid over it, as `serve` would) and print
    /// the effective configuration as TOML, secrets redacted. Exit code 64 names the bad key.
    Check {
        /// The TOML file.
        file: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(EX_USAGE),
            };
        }
    };
    match cli.command {
        Command::Config(ConfigCommand::Check { file }) => {
            let checked = Config::from_sources(Some(&file), &|v| std::env::var(v).ok())
                .and_then(|cfg| cfg.validate().map(|()| cfg));
            match checked {
                Ok(cfg) => {
                    print!("{}", cfg.redacted_toml());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("leaderlink: invalid configuration: {}", chain(&e));
                    ExitCode::from(EX_USAGE)
                }
            }
        }
        Command::Serve(args) => {
            let cfg = match args.resolve() {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("leaderlink: invalid configuration: {}", chain(&e));
                    return ExitCode::from(EX_USAGE);
                }
            };
            serve(cfg)
        }
    }
}

fn serve(cfg: Config) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("leaderlink: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The span exporter's gRPC client lives on this runtime.
    let telemetry = {
        let _rt = runtime.enter();
        telemetry::init(
            cfg.log_format,
            cfg.otlp_endpoint.as_deref(),
            cfg.trace_sample_ratio,
        )
    };
    let telemetry = match telemetry {
        Ok(t) => t,
        Err(e) => {
            eprintln!("leaderlink: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(endpoint) = &cfg.otlp_endpoint {
        info!(%endpoint, sample_ratio = cfg.trace_sample_ratio, "exporting spans over OTLP");
    }
    let code = serve_on(&runtime, cfg);
    // Flush queued spans while the runtime still drives the exporter.
    telemetry.shutdown();
    code
}

fn serve_on(runtime: &tokio::runtime::Runtime, #[allow(unused_mut)] mut cfg: Config) -> ExitCode {
    #[cfg(not(feature = "dev-cluster"))]
    if cfg.bootstrap.is_empty() {
        error!(
            "no --bootstrap given, and this build has no embedded dev cluster (it was built \
             without the `dev-cluster` feature): give --bootstrap HOST:PORT,..."
        );
        return ExitCode::FAILURE;
    }
    // The dev cluster must outlive the server; it is dropped at the end of this function.
    #[cfg(feature = "dev-cluster")]
    let _dev = if cfg.bootstrap.is_empty() {
        match start_dev(&cfg) {
            Ok(dev) => {
                cfg.bootstrap = dev.bootstrap().split(',').map(str::to_string).collect();
                Some(dev)
            }
            Err(e) => {
                error!("{e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    runtime.block_on(async {
        let bind = |addr| async move {
            tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                error!(addr = %addr, cause = %e, "cannot listen");
            })
        };
        let (Ok(listener), Ok(admin_listener)) =
            (bind(cfg.listen).await, bind(cfg.admin_listen).await)
        else {
            return ExitCode::FAILURE;
        };
        match server::run(&cfg, listener, admin_listener, shutdown_signal()).await {
            // Both a clean drain and an expired grace end the process normally; the latter
            // was logged as a warning.
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                error!(cause = %e, "server failed");
                ExitCode::FAILURE
            }
        }
    })
}

#[cfg(feature = "dev-cluster")]
fn start_dev(cfg: &Config) -> Result<DevCluster, String> {
    let dev = DevCluster::start(cfg.dev.brokers)?;
    for spec in &cfg.dev.topics {
        let (name, partitions) = parse_dev_topic(spec)?;
        dev.create_topic(&name, partitions)?;
        info!(topic = %name, partitions, "dev topic created");
    }
    if cfg.dev.leader_latency_ms > 0 {
        dev.set_leader_latency(std::time::Duration::from_millis(cfg.dev.leader_latency_ms))?;
        info!(
            latency_ms = cfg.dev.leader_latency_ms,
            "dev brokers delay every response"
        );
    }
    warn!(
        bootstrap = %dev.bootstrap(),
        "no --bootstrap given: started the embedded dev cluster (librdkafka mock brokers); \
         its data lives in memory and is gone when leaderlink stops"
    );
    Ok(dev)
}

/// Resolves on SIGINT or SIGTERM (what Kubernetes sends).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
