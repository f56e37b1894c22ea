//! Builds and runs the two gRPC servers — the Forwarder (behind its tower stack) and the
//! Admin service, each with health and reflection — until a shutdown future resolves, then
//! drains. The binary only parses config and calls [`run`]; tests call [`start`] on
//! `127.0.0.1:0`.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
    task::JoinHandle,
    time::Instant,
};
use tonic_health::{
    ServingStatus,
    pb::{
        HealthCheckRequest, HealthCheckResponse, health_check_response,
        health_server::{Health, HealthServer},
    },
    server::{HealthReporter, HealthService},
};
use tower::layer::util::{Identity, Stack};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    admin::AdminService,
    config::Config,
    forward::Forwarder,
    grpc::{
        ForwarderService, abuse::Penalties, conn::CallerIo, idle::IdleLayer,
        layers::forwarder_stack,
    },
    kafka::error::chain,
    proto::{
        self,
        v1::{admin_server::AdminServer, forwarder_server::ForwarderServer},
    },
    telemetry::TASK_TARGET,
    tls::{ServerTls, TlsFiles},
};

/// Name under which health reports the Forwarder service.
pub const FORWARDER_SERVICE: &str = "leaderlink.v1.Forwarder";

/// How long calls cut off by an expired grace get to receive their UNAVAILABLE answer.
const ABORT_FLUSH: Duration = Duration::from_secs(2);

type ServerTask = JoinHandle<Result<(), tonic::transport::Error>>;

/// The servers running in the background.
pub struct Running {
    /// Where the Forwarder listens.
    pub addr: SocketAddr,
    /// Where the Admin service listens.
    pub admin_addr: SocketAddr,
    /// Where `/metrics` is served.
    pub metrics_addr: SocketAddr,
    /// The forwarding core (for inspection).
    pub forwarder: Forwarder,
    reporter: HealthReporter,
    /// Set at shutdown, once health says NOT_SERVING: ends the health Watch streams.
    draining: watch::Sender<bool>,
    stop: Option<(oneshot::Sender<()>, oneshot::Sender<()>)>,
    abort: watch::Sender<bool>,
    task: ServerTask,
    admin_task: ServerTask,
    metrics_task: JoinHandle<std::io::Result<()>>,
    watcher: JoinHandle<()>,
}

/// How a shutdown went.
#[derive(Debug, PartialEq, Eq)]
pub enum Drained {
    /// Every in-flight call finished within the grace.
    Clean,
    /// The grace expired; the calls still running were answered UNAVAILABLE.
    GraceExpired,
}

impl Running {
    /// Drains: health turns NOT_SERVING at once, both servers stop accepting calls, in-flight
    /// calls get up to `grace` to finish; those still running then answer UNAVAILABLE.
    pub async fn shutdown(mut self, grace: Duration) -> Drained {
        self.watcher.abort();
        for service in ["", FORWARDER_SERVICE] {
            self.reporter
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
        let _ = self.draining.send(true);
        if let Some((stop, stop_admin)) = self.stop.take() {
            let _ = stop.send(());
            let _ = stop_admin.send(());
        }
        let started = Instant::now();
        let outcome = match tokio::time::timeout(grace, &mut self.task).await {
            Ok(_) => Drained::Clean,
            Err(_) => {
                let in_progress = self
                    .forwarder
                    .stats()
                    .calls_in_progress
                    .load(std::sync::atomic::Ordering::Relaxed);
                warn!(
                    grace_ms = grace.as_millis() as u64,
                    in_progress,
                    "shutdown grace expired; answering the remaining calls UNAVAILABLE"
                );
                let _ = self.abort.send(true);
                if tokio::time::timeout(ABORT_FLUSH, &mut self.task)
                    .await
                    .is_err()
                {
                    self.task.abort();
                }
                Drained::GraceExpired
            }
        };
        let left = grace.saturating_sub(started.elapsed()) + ABORT_FLUSH;
        if tokio::time::timeout(left, &mut self.admin_task)
            .await
            .is_err()
        {
            self.admin_task.abort();
        }
        // Scrapes during the drain still see the final counts; the endpoint goes last.
        self.metrics_task.abort();
        outcome
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.watcher.abort();
        self.task.abort();
        self.admin_task.abort();
        self.metrics_task.abort();
    }
}

/// Keeps the leader map fresh and health in step with it: SERVING once metadata was fetched,
/// NOT_SERVING while no broker answers.
async fn watch_cluster(forwarder: Forwarder, reporter: HealthReporter, cfg: Arc<Config>) {
    let max_age = Duration::from_millis(cfg.metadata_max_age_ms);
    let connect_budget = Duration::from_millis(cfg.default_timeout_ms).min(Duration::from_secs(10));
    let mut serving = None;
    loop {
        let deadline = Instant::now() + connect_budget;
        let ok = match forwarder.metadata().refresh(&[], None, deadline).await {
            Ok(map) => {
                debug!(
                    brokers = map.brokers.len(),
                    topics = map.topics.len(),
                    "metadata refreshed"
                );
                true
            }
            Err(e) => {
                if serving != Some(false) {
                    warn!(cause = %chain(&e), "no broker reachable; health is NOT_SERVING");
                }
                false
            }
        };
        forwarder
            .stats()
            .cluster_reachable
            .store(u64::from(ok), std::sync::atomic::Ordering::Relaxed);
        if serving != Some(ok) {
            let status = if ok {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            reporter.set_service_status(FORWARDER_SERVICE, status).await;
            if ok {
                info!("cluster metadata fetched; health is SERVING");
            }
            serving = Some(ok);
        }
        tokio::time::sleep(if ok { max_age } else { Duration::from_secs(1) }).await;
    }
}

/// How a caller listener takes its connections: their idle timeout (`idle_connection_timeout_ms`)
/// and the abuse penalty (`http2_abuse_penalty_ms`, [`Penalties`]), shared by both listeners so
/// that an address penalized on one is refused on the other too.
#[derive(Clone)]
struct CallerConns {
    idle: Option<Duration>,
    penalties: Option<Arc<Penalties>>,
    /// `http2_max_concurrent_streams`, which the abuse watch allows for.
    max_concurrent_streams: u32,
}

impl CallerConns {
    fn new(cfg: &Config) -> Self {
        let ms = Duration::from_millis;
        Self {
            idle: (cfg.idle_connection_timeout_ms > 0).then(|| ms(cfg.idle_connection_timeout_ms)),
            penalties: (cfg.http2_abuse_penalty_ms > 0)
                .then(|| Penalties::new(ms(cfg.http2_abuse_penalty_ms))),
            max_concurrent_streams: cfg.http2_max_concurrent_streams,
        }
    }

    /// `tcp`, just accepted from `peer`, back unless its address is penalized
    /// ([`Penalties::admit`]).
    fn admit(
        &self,
        tcp: tokio::net::TcpStream,
        peer: Option<SocketAddr>,
    ) -> Option<tokio::net::TcpStream> {
        match &self.penalties {
            Some(p) => p.admit(tcp, peer),
            None => Some(tcp),
        }
    }

    /// `io`, a connection from `peer`, watched for abuse and with the idle timeout.
    fn wrap<IO>(&self, io: IO, peer: Option<SocketAddr>) -> CallerIo<IO> {
        CallerIo::new(
            io,
            peer,
            self.idle,
            self.penalties.clone(),
            self.max_concurrent_streams,
        )
    }
}

/// Plaintext connections from `listener`, with Nagle off (answers are small and latency-bound;
/// the builder's `tcp_nodelay` only applies to listeners tonic binds itself), taken as `conns`
/// says: those from a penalized address are held or closed.
fn plain_incoming(
    listener: TcpListener,
    conns: CallerConns,
) -> impl tokio_stream::Stream<Item = std::io::Result<CallerIo<tokio::net::TcpStream>>> {
    tokio_stream::StreamExt::filter_map(
        tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        move |tcp| match tcp {
            Ok(tcp) => {
                let peer = tcp.peer_addr().ok();
                let tcp = conns.admit(tcp, peer)?;
                Some(Ok(conns.wrap(tcp, peer)))
            }
            Err(e) => Some(Err(e)),
        },
    )
}

/// TLS connections from `listener` (see [`crate::tls::incoming`]), taken as `conns` says: those
/// from a penalized address are held or closed before their handshake.
fn tls_incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    conns: CallerConns,
) -> impl tokio_stream::Stream<Item = std::io::Result<CallerIo<crate::tls::TlsConn>>> {
    let admit = conns.clone();
    tokio_stream::StreamExt::map(
        crate::tls::incoming(listener, tls, move |tcp, peer| admit.admit(tcp, Some(peer))),
        move |conn| {
            conn.map(|conn| {
                let peer = conn.peer();
                conns.wrap(conn, peer)
            })
        },
    )
}

/// The router type of both caller listeners: their services behind [`IdleLayer`].
type Router = tonic::transport::server::Router<Stack<IdleLayer, Identity>>;

/// A listener's TLS from its three config keys (`None`: plaintext).
fn listener_tls(
    cert: &Option<std::path::PathBuf>,
    key: &Option<std::path::PathBuf>,
    client_ca: &Option<std::path::PathBuf>,
    name: &'static str,
) -> std::io::Result<Option<Arc<ServerTls>>> {
    let (Some(cert), Some(key)) = (cert, key) else {
        return Ok(None);
    };
    let files = TlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: client_ca.clone(),
    };
    ServerTls::start(files, name).map(Some).map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{name} TLS: {e}"))
    })
}

fn reflection(extra: &'static [u8]) -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // Each reflection service also lists the other, so `list` shows both either way.
        .register_encoded_file_descriptor_set(extra)
}

/// The HTTP/2 protections of a caller-facing listener, each set explicitly from its config key
/// rather than left to hyper's defaults (README "Protection against overload").
fn http2_server(cfg: &Config) -> tonic::transport::Server<Stack<IdleLayer, Identity>> {
    let ms = Duration::from_millis;
    let mut server = tonic::transport::Server::builder()
        .max_concurrent_streams(cfg.http2_max_concurrent_streams)
        .http2_max_pending_accept_reset_streams(Some(cfg.http2_max_pending_reset_streams))
        .http2_max_header_list_size(cfg.http2_max_header_list_size)
        .initial_stream_window_size(Some(cfg.http2_initial_stream_window_bytes))
        .http2_keepalive_interval(
            (cfg.http2_keepalive_interval_ms > 0).then(|| ms(cfg.http2_keepalive_interval_ms)),
        )
        .http2_keepalive_timeout(Some(ms(cfg.http2_keepalive_timeout_ms)));
    if cfg.max_connection_age_ms > 0 {
        server = server
            .max_connection_age(ms(cfg.max_connection_age_ms))
            .max_connection_age_grace(ms(cfg.max_connection_age_grace_ms));
    }
    // Counts each connection's calls for its idle timeout (`idle_connection_timeout_ms`).
    server.layer(IdleLayer)
}

/// The health service, whose Watch streams end at shutdown: after the NOT_SERVING that the
/// shutdown sets, a Watch stream sends NOT_SERVING once more (in case the stream had not yet
/// passed that change on) and ends with OK. Without it, a caller watching health (gRPC clients
/// that check health keep a Watch open on every connection) would hold its connection, and so
/// the drain, until `shutdown_grace_ms` expired. The health protocol has clients retry a Watch
/// that ends, which then finds the listener closed.
struct DrainingHealth {
    inner: HealthService,
    draining: watch::Receiver<bool>,
}

type HealthStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send>,
>;

#[tonic::async_trait]
impl Health for DrainingHealth {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        self.inner.check(request).await
    }

    type WatchStream = HealthStream;

    async fn watch(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthStream>, tonic::Status> {
        use futures::StreamExt;
        let statuses = self.inner.watch(request).await?.into_inner();
        let mut draining = self.draining.clone();
        // Also ends if the servers are dropped without a shutdown (the sender is gone).
        let drained = async move {
            let _ = draining.wait_for(|d| *d).await;
        };
        let last = HealthCheckResponse {
            status: health_check_response::ServingStatus::NotServing as i32,
        };
        let stream = statuses
            .take_until(drained)
            .chain(futures::stream::once(async move { Ok(last) }));
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

/// A router with the health service and both reflection versions (grpcurl 1.8.x speaks only
/// v1alpha), to which the listener's own service is added.
fn with_health_and_reflection(
    cfg: &Config,
    health: HealthServer<impl Health>,
) -> std::io::Result<Router> {
    let v1 = reflection(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(std::io::Error::other)?;
    let v1alpha = reflection(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(std::io::Error::other)?;
    Ok(http2_server(cfg)
        .add_service(health)
        .add_service(v1)
        .add_service(v1alpha))
}

/// Serves `router` on `listener`, over TLS when `tls` is set, with the idle timeout `idle`, in
/// a task instrumented with `span`, until the returned sender fires (or is dropped).
fn serve(
    router: Router,
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    conns: CallerConns,
    span: tracing::Span,
) -> (oneshot::Sender<()>, ServerTask) {
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let stopped = async {
        let _ = stop_rx.await;
    };
    let task = match tls {
        None => tokio::spawn(
            router
                .serve_with_incoming_shutdown(plain_incoming(listener, conns), stopped)
                .instrument(span),
        ),
        Some(tls) => tokio::spawn(
            router
                .serve_with_incoming_shutdown(tls_incoming(listener, tls, conns), stopped)
                .instrument(span),
        ),
    };
    (stop_tx, task)
}

/// Starts both servers in the background: the Forwarder on `listener`, the Admin service on
/// `admin_listener`; and `/metrics` on `cfg.metrics_listen`.
pub async fn start(
    cfg: &Config,
    listener: TcpListener,
    admin_listener: TcpListener,
) -> std::io::Result<Running> {
    let cfg = Arc::new(cfg.clone());
    let addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let metrics_listener = crate::metrics::bind(cfg.metrics_listen)
        .await
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("metrics_listen {}: {e}", cfg.metrics_listen),
            )
        })?;
    let metrics_addr = metrics_listener.local_addr()?;
    let connection = cfg
        .connection()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let forwarder = Forwarder::new(
        cfg.forward(),
        connection,
        cfg.bootstrap.clone(),
        cfg.allow_auto_topic_creation,
    );
    let (reporter, _) = tonic_health::server::health_reporter();
    for service in ["", FORWARDER_SERVICE] {
        reporter
            .set_service_status(service, ServingStatus::NotServing)
            .await;
    }
    let (draining, draining_rx) = watch::channel(false);
    let health = HealthServer::new(DrainingHealth {
        inner: HealthService::from_health_reporter(reporter.clone()),
        draining: draining_rx,
    });
    let watcher = tokio::spawn(
        watch_cluster(forwarder.clone(), reporter.clone(), cfg.clone())
            .instrument(info_span!(target: TASK_TARGET, "cluster_watch")),
    );

    let (abort_tx, abort_rx) = watch::channel(false);
    let calls = Arc::new(tokio::sync::Semaphore::new(cfg.max_concurrent_calls));
    let service = ForwarderService::new(
        forwarder.clone(),
        Duration::from_millis(cfg.default_timeout_ms),
        cfg.max_stream_in_flight,
        abort_rx,
        calls.clone(),
    );
    let forwarder_server = ForwarderServer::new(service)
        // Requests between max_request_bytes and twice that reach validation, which answers
        // INVALID_ARGUMENT naming the limit; larger ones are refused by the transport.
        .max_decoding_message_size(cfg.max_request_bytes.saturating_mul(2));
    let stack = forwarder_stack(
        forwarder_server,
        forwarder.stats().clone(),
        calls,
        Duration::from_millis(cfg.default_timeout_ms),
    );
    let forwarder_tls = listener_tls(
        &cfg.tls_cert_file,
        &cfg.tls_key_file,
        &cfg.tls_client_ca_file,
        "forwarder",
    )?;
    let admin_tls = listener_tls(
        &cfg.admin_tls_cert_file,
        &cfg.admin_tls_key_file,
        &cfg.admin_tls_client_ca_file,
        "admin",
    )?;

    let span = info_span!(target: TASK_TARGET, "grpc", %addr, tls = forwarder_tls.is_some());
    let router = with_health_and_reflection(&cfg, health.clone())?.add_service(stack);
    let conns = CallerConns::new(&cfg);
    let (stop_tx, task) = serve(router, listener, forwarder_tls, conns.clone(), span);
    let span =
        info_span!(target: TASK_TARGET, "admin", addr = %admin_addr, tls = admin_tls.is_some());
    let admin = with_health_and_reflection(&cfg, health)?.add_service(AdminServer::new(
        AdminService::new(forwarder.clone(), cfg.clone()),
    ));
    let (stop_admin_tx, admin_task) = serve(admin, admin_listener, admin_tls, conns, span);
    let metrics_task = tokio::spawn(
        crate::metrics::serve(
            metrics_listener,
            crate::metrics::registry(forwarder.clone()),
        )
        .instrument(info_span!(target: TASK_TARGET, "metrics", addr = %metrics_addr)),
    );
    Ok(Running {
        addr,
        admin_addr,
        metrics_addr,
        forwarder,
        reporter,
        draining,
        stop: Some((stop_tx, stop_admin_tx)),
        abort: abort_tx,
        task,
        admin_task,
        metrics_task,
        watcher,
    })
}

/// Serves until `shutdown` resolves, then drains within `shutdown_grace_ms`.
pub async fn run(
    cfg: &Config,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<Drained> {
    let running = start(cfg, listener, admin_listener).await?;
    info!(
        addr = %running.addr,
        admin = %running.admin_addr,
        metrics = %running.metrics_addr,
        "leaderlink serving"
    );
    shutdown.await;
    info!(
        grace_ms = cfg.shutdown_grace_ms,
        "shutting down: health NOT_SERVING, no new calls, draining in-flight calls"
    );
    let drained = running
        .shutdown(Duration::from_millis(cfg.shutdown_grace_ms))
        .await;
    if drained == Drained::Clean {
        info!("every in-flight call finished; bye");
    }
    Ok(drained)
}
