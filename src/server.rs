//! Builds the gRPC server (Forwarder, health, reflection v1 and v1alpha) and runs it until a
//! shutdown future resolves. The binary only parses config and calls [`run`]; tests call
//! [`start`] on `127.0.0.1:0`.

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle, time::Instant};
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    config::Config,
    forward::Forwarder,
    grpc::ForwarderService,
    kafka::error::chain,
    proto::{self, v1::forwarder_server::ForwarderServer},
};

/// Name under which health reports the Forwarder service.
pub const FORWARDER_SERVICE: &str = "leaderlink.v1.Forwarder";

/// A server running in the background.
pub struct Running {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The forwarding core it serves (for inspection).
    pub forwarder: Forwarder,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    watcher: JoinHandle<()>,
}

impl Running {
    /// Stops accepting calls, lets in-flight ones finish, and waits for the server to end.
    pub async fn stop(mut self) -> Result<(), tonic::transport::Error> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.watcher.abort();
        (&mut self.task).await.unwrap_or(Ok(()))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.watcher.abort();
        self.task.abort();
    }
}

/// Keeps the leader map fresh and health in step with it: SERVING once metadata was fetched,
/// NOT_SERVING while no broker answers.
async fn watch_cluster(forwarder: Forwarder, reporter: HealthReporter, cfg: Config) {
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

/// Starts serving on `listener` in the background.
pub async fn start(cfg: &Config, listener: TcpListener) -> std::io::Result<Running> {
    let addr = listener.local_addr()?;
    let forwarder = Forwarder::new(
        cfg.forward(),
        cfg.connection(),
        cfg.bootstrap.clone(),
        cfg.allow_auto_topic_creation,
    );
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    reporter
        .set_service_status(FORWARDER_SERVICE, ServingStatus::NotServing)
        .await;
    let watcher = tokio::spawn(
        watch_cluster(forwarder.clone(), reporter, cfg.clone())
            .instrument(info_span!("cluster_watch")),
    );

    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Each reflection service also lists the other, so `list` shows both on either protocol.
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(std::io::Error::other)?;
    // grpcurl 1.8.x speaks only v1alpha.
    let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(std::io::Error::other)?;

    let service = ForwarderService::new(
        forwarder.clone(),
        Duration::from_millis(cfg.default_timeout_ms),
        cfg.max_stream_in_flight,
    );
    let forwarder_server = ForwarderServer::new(service)
        // Requests between max_request_bytes and twice that reach validation, which answers
        // INVALID_ARGUMENT naming the limit; larger ones are refused by the transport.
        .max_decoding_message_size(cfg.max_request_bytes.saturating_mul(2));

    let (tx, rx) = oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(forwarder_server);
    let task = tokio::spawn(
        router
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = rx.await;
            })
            .instrument(info_span!("grpc", %addr)),
    );
    Ok(Running {
        addr,
        forwarder,
        shutdown: Some(tx),
        task,
        watcher,
    })
}

/// Serves until `shutdown` resolves, then stops accepting and lets in-flight calls finish.
pub async fn run(
    cfg: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let running = start(cfg, listener).await?;
    info!(addr = %running.addr, "leaderlink serving");
    shutdown.await;
    info!("shutting down");
    running.stop().await?;
    Ok(())
}
