//! The Kafka-wire side: framing, the pipelined connection, version negotiation, the shape guard
//! run before decoding, the connection pool and the leader map. Nothing in here knows about gRPC.

pub mod coalesce;
pub mod connection;
pub mod error;
pub mod frame;
pub mod guard;
pub mod histogram;
pub mod metadata;
pub mod pool;
pub mod produce;
pub mod producer_id;
pub mod security;
pub mod versions;

use std::sync::Arc;

use tokio::{net::TcpStream, time::Instant};
use tracing::Span;

use connection::{ConnStats, Connection, ConnectionConfig};
use error::ConnError;

/// Dials `addr`, starts a pipelined connection on it (over TLS when configured), negotiates
/// API versions and authenticates with SASL when configured.
///
/// Everything (TCP connect, TLS, ApiVersions, SASL) must finish before `deadline` and within
/// `config.connect_timeout`.
pub async fn connect(
    addr: &str,
    config: &ConnectionConfig,
    stats: Arc<ConnStats>,
    deadline: Instant,
    span: Span,
) -> Result<Arc<Connection>, ConnError> {
    let started = Instant::now();
    let deadline = deadline.min(started + config.connect_timeout);
    let stream = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(ConnError::Connect {
                addr: addr.to_string(),
                source: Arc::new(e),
            });
        }
        Err(_) => {
            return Err(ConnError::ConnectTimeout {
                addr: addr.to_string(),
                after: started.elapsed(),
            });
        }
    };
    // Produce requests are latency-bound; the writer already batches frames per flush.
    stream.set_nodelay(true).map_err(ConnError::io)?;
    let conn = match &config.security.tls {
        None => {
            let (r, w) = stream.into_split();
            Connection::start(r, w, config, stats, span)
        }
        Some(tls) => {
            let tls = security::handshake(tls, addr, stream, deadline)
                .await
                .map_err(|e| timed_out(e, addr, started))?;
            let (r, w) = tokio::io::split(tls);
            Connection::start(r, w, config, stats, span)
        }
    };
    let versions = versions::negotiate(&conn, deadline)
        .await
        .map_err(|e| timed_out(e.cause, addr, started))?;
    if let Some(sasl) = &config.security.sasl {
        match security::authenticate(&conn, &versions, sasl, deadline).await {
            // Like Kafka's Java client (KIP-368), at a random point between 85% and 95% of the
            // session's lifetime, counted from before the handshake began (the broker counts
            // from its end), so that connections made together are not all renewed together.
            Ok(Some(lifetime)) => {
                conn.set_renew_at(started + lifetime.mul_f64(0.85 + rand::random::<f64>() / 10.0))
            }
            Ok(None) => {}
            Err(e) => {
                let e = timed_out(e, addr, started);
                conn.poison(e.clone());
                return Err(e);
            }
        }
    }
    conn.set_versions(versions);
    Ok(conn)
}

/// A deadline passing while connecting (waiting for an answer, or to write a request of the
/// handshake) is reported as a connect timeout.
fn timed_out(e: ConnError, addr: &str, started: Instant) -> ConnError {
    match e {
        ConnError::TimedOut | ConnError::NotSentInTime => ConnError::ConnectTimeout {
            addr: addr.to_string(),
            after: started.elapsed(),
        },
        other => other,
    }
}
