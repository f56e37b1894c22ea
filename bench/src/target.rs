//! What a worker calls: leaderlink over gRPC (unary or a stream), leaderlink as a library, or
//! librdkafka's producer.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use leaderlink::{
    forward::Forwarder,
    proto::v1::{
        Acks, ForwardRequest, ForwardResponse, PartitionData, Record,
        forwarder_client::ForwarderClient,
    },
};
use rdkafka::{
    ClientConfig,
    producer::{FutureProducer, FutureRecord},
};
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{AcksArg, Args, values::Values};

/// Deadline of every call the bench makes (warm-up and measured).
pub const CALL_DEADLINE: Duration = Duration::from_secs(30);

/// An HTTP/2 connection to leaderlink at `url`; over TLS (ALPN h2, server name from the URL's
/// host) when `tls_ca` is given.
pub async fn grpc_channel(url: &str, tls_ca: Option<&std::path::Path>) -> Channel {
    let Some(ca) = tls_ca else {
        return tonic::transport::Endpoint::from_shared(url.to_string())
            .expect("URL")
            .connect()
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
    tonic::transport::Endpoint::from_shared(url.replace("https://", "http://"))
        .expect("URL")
        .connect_with_connector(connector)
        .await
        .expect("connect to leaderlink over TLS")
}
/// What one call sends.
#[derive(Clone)]
pub enum Target {
    Grpc(ForwarderClient<Channel>),
    Stream(Box<StreamTarget>),
    Direct(Forwarder),
    Rdkafka(FutureProducer),
    /// leaderlink-client, shared by the workers (it merges their calls).
    Batched(leaderlink_client::Client),
    /// `grpc.health.v1.Health/Check` instead of a forward: the server's floor per gRPC call.
    Health(HealthClient<Channel>),
}

/// A worker's ForwardStream, opened on its first call (and again after a failure).
pub struct StreamTarget {
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
fn acks_proto(a: AcksArg) -> Acks {
    match a {
        AcksArg::Zero => Acks::None,
        AcksArg::One => Acks::Leader,
        AcksArg::All => Acks::All,
    }
}

/// One `grpc.health.v1.Health/Check` of the whole server, with `deadline`: its status.
async fn health_status(
    client: &mut HealthClient<Channel>,
    deadline: Duration,
) -> Result<i32, String> {
    let mut r = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    r.set_timeout(deadline);
    Ok(client
        .check(r)
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner()
        .status)
}

/// Waits until the server's health is SERVING, checking every 50 ms for at most `limit`.
///
/// A server reports NOT_SERVING until it has fetched the cluster's metadata once, which it
/// does in the background after it starts listening; `--client health` counts every other
/// status as an error, so its warm-up waits for this first.
pub async fn await_serving(
    client: &mut HealthClient<Channel>,
    limit: Duration,
) -> Result<(), String> {
    let give_up = Instant::now() + limit;
    loop {
        let status = health_status(client, limit).await?;
        if status == ServingStatus::Serving as i32 {
            return Ok(());
        }
        if Instant::now() >= give_up {
            return Err(format!("health status {status} after {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends one call; returns the records acknowledged.
pub async fn call(
    target: &mut Target,
    args: &Args,
    partition: i32,
    values: &Values,
    seq: u64,
    deadline: Duration,
) -> Result<u64, String> {
    let n = args.batch_records;
    // Call `seq`'s record `i`: the values of a run go round the pool.
    let value = |i: usize| values.get(seq.wrapping_mul(n as u64).wrapping_add(i as u64));
    match target {
        Target::Grpc(_) | Target::Stream(_) | Target::Direct(_) => {
            let req = ForwardRequest {
                call_timeout_ms: 0,
                id: 0,
                acks: acks_proto(args.acks) as i32,
                timeout_ms: 0,
                partitions: vec![PartitionData {
                    topic: args.topic.clone(),
                    partition,
                    record_batch: Bytes::new(),
                    records: (0..n)
                        .map(|i| Record {
                            key: None,
                            value: Some(value(i)),
                            headers: vec![],
                            timestamp_ms: 0,
                        })
                        .collect(),
                }],
                transactional_id: String::new(),
                compression: 0,
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
                Target::Rdkafka(_) | Target::Batched(_) | Target::Health(_) => unreachable!(),
            };
            match resp.partitions.first() {
                Some(p) if p.error_code == 0 => Ok(n as u64),
                Some(p) => Err(p.error_name.clone()),
                None => Err("answer without partition results".into()),
            }
        }
        Target::Batched(client) => {
            let records = (0..n)
                .map(|i| leaderlink_client::Record {
                    value: Some(value(i)),
                    ..Default::default()
                })
                .collect();
            let acks = match args.acks {
                AcksArg::Zero => leaderlink_client::Acks::None,
                AcksArg::One => leaderlink_client::Acks::Leader,
                AcksArg::All => leaderlink_client::Acks::All,
            };
            let p = client
                .forward(
                    &args.topic,
                    partition,
                    leaderlink_client::Payload::Records(records),
                    acks,
                    Instant::now() + deadline,
                )
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
            if p.error_code == 0 {
                Ok(n as u64)
            } else {
                Err(p.error_name)
            }
        }
        Target::Health(client) => {
            let status = health_status(client, deadline).await?;
            // No records go anywhere: a check counts as a request only.
            if status == ServingStatus::Serving as i32 {
                Ok(0)
            } else {
                Err(format!("health status {status}"))
            }
        }
        Target::Rdkafka(producer) => {
            let vals: Vec<Bytes> = (0..n).map(value).collect();
            let sends: Vec<_> = vals
                .iter()
                .map(|v| {
                    producer.send(
                        FutureRecord::<(), [u8]>::to(&args.topic)
                            .partition(partition)
                            .payload(&v[..]),
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

/// The forwarder-mode target on `channel`: unary calls, a ForwardStream per worker
/// (`--client stream`) or health checks (`--client health`).
pub fn grpc_target(args: &Args, channel: Channel) -> Target {
    let client = ForwarderClient::new(channel.clone());
    match args.client {
        crate::ClientArg::Stream => Target::Stream(Box::new(StreamTarget { client, open: None })),
        crate::ClientArg::Health => Target::Health(HealthClient::new(channel)),
        crate::ClientArg::Unary | crate::ClientArg::Batched => Target::Grpc(client),
    }
}

/// The settings rdkafka mode passes to librdkafka (besides `bootstrap.servers`): librdkafka as a
/// broker embedding it would run it, batching concurrent records as it ships
/// (`batch.num.messages` and `batch.size` at their defaults), unless
/// `--rdkafka-batch-per-call` asks for one call's records per batch.
pub fn rdkafka_settings(args: &Args) -> Vec<(&'static str, String)> {
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

pub fn rdkafka_producer(args: &Args, bootstrap: &str) -> FutureProducer {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap);
    for (k, v) in rdkafka_settings(args) {
        cfg.set(k, v);
    }
    cfg.create().expect("rdkafka producer")
}
