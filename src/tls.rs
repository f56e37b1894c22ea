//! TLS (and mTLS) for the gRPC listeners, with certificates re-read when their files change.
//!
//! tonic's own TLS (`ServerTlsConfig`) loads certificates once; rotating them would need a
//! restart. Here rustls gets the current certificate from a [`Reloading`] resolver and, for
//! mTLS, checks clients with the current CA through a [`ReloadingClientAuth`] verifier; a task
//! polls the files and swaps both when they change. Connections are accepted by our own loop
//! (handshakes run concurrently, bounded, each with a timeout) and handed to tonic as a stream.

use std::{
    fmt, io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        DigitallySignedStruct, DistinguishedName, Error as TlsError, ServerConfig, SignatureScheme,
        client::danger::HandshakeSignatureValid,
        pki_types::{CertificateDer, UnixTime},
        server::{
            ClientHello, ResolvesServerCert, WebPkiClientVerifier,
            danger::{ClientCertVerified, ClientCertVerifier},
        },
        sign::CertifiedKey,
    },
};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::kafka::security::{crypto, load_certs, load_key, root_store};

/// How often the certificate files are checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Longest a client may take to complete its TLS handshake; a slower one is dropped so it
/// cannot hold a handshake slot.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most TLS handshakes in progress at once per listener. Beyond it, accepting waits: a flood
/// of slow handshakes cannot take unbounded memory.
const MAX_HANDSHAKES: usize = 256;

/// The files of one listener's TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CAs whose certificates clients must present (mTLS); `None`: no client certificate.
    pub client_ca: Option<PathBuf>,
}

/// The server certificate in use; swapped on reload.
struct Reloading(RwLock<Arc<CertifiedKey>>);

impl fmt::Debug for Reloading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Reloading")
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// The client-certificate check in use; swapped on reload.
struct ReloadingClientAuth(RwLock<Arc<dyn ClientCertVerifier>>);

impl fmt::Debug for ReloadingClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReloadingClientAuth")
    }
}

impl ReloadingClientAuth {
    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ClientCertVerifier for ReloadingClientAuth {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The hints would borrow from a verifier that a reload may replace; sending none is
        // allowed (clients then offer whichever certificate they have).
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        self.current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

fn load_certified(files: &TlsFiles) -> Result<Arc<CertifiedKey>, String> {
    let chain = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    CertifiedKey::from_der(chain, key, &crypto())
        .map(Arc::new)
        .map_err(|e| format!("{} and {}: {e}", files.cert.display(), files.key.display()))
}

fn load_client_auth(ca: &Path) -> Result<Arc<dyn ClientCertVerifier>, String> {
    WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(ca)?), crypto())
        .build()
        .map_err(|e| format!("{}: {e}", ca.display()))
}

/// Modification time and length of each file: a change in either triggers a reload.
fn fingerprint(files: &TlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| {
        std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())))
    })
    .collect()
}

/// One listener's TLS: the acceptor and the task that reloads its files.
pub struct ServerTls {
    acceptor: TlsAcceptor,
    reloader: tokio::task::JoinHandle<()>,
}

impl Drop for ServerTls {
    fn drop(&mut self) {
        self.reloader.abort();
    }
}

impl ServerTls {
    /// Loads `files` (errors name the file) and starts watching them. `name` labels log lines.
    pub fn start(files: TlsFiles, name: &'static str) -> Result<Arc<Self>, String> {
        let cert = Arc::new(Reloading(RwLock::new(load_certified(&files)?)));
        let client_auth = match &files.client_ca {
            Some(ca) => Some(Arc::new(ReloadingClientAuth(RwLock::new(
                load_client_auth(ca)?,
            )))),
            None => None,
        };
        let builder = ServerConfig::builder_with_provider(crypto())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match &client_auth {
            Some(v) => builder.with_client_cert_verifier(v.clone()),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(cert.clone());
        // gRPC clients (grpc-go since 1.67, for one) insist on ALPN h2.
        config.alpn_protocols = vec![b"h2".to_vec()];
        let reloader = tokio::spawn(async move {
            let mut seen = fingerprint(&files);
            loop {
                tokio::time::sleep(RELOAD_INTERVAL).await;
                let now = fingerprint(&files);
                if now == seen {
                    continue;
                }
                seen = now;
                let loaded = load_certified(&files).and_then(|c| {
                    let v = files
                        .client_ca
                        .as_deref()
                        .map(load_client_auth)
                        .transpose()?;
                    Ok((c, v))
                });
                match loaded {
                    Ok((c, v)) => {
                        *cert.0.write().unwrap_or_else(|p| p.into_inner()) = c;
                        if let (Some(v), Some(auth)) = (v, &client_auth) {
                            *auth.0.write().unwrap_or_else(|p| p.into_inner()) = v;
                        }
                        info!(listener = name, "TLS certificate files changed; reloaded");
                    }
                    // A half-written rotation is retried at the next change; the old
                    // certificate stays in use meanwhile.
                    Err(e) => warn!(
                        listener = name,
                        cause = %e,
                        "TLS certificate files changed but cannot be loaded; keeping the old ones"
                    ),
                }
            }
        });
        Ok(Arc::new(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            reloader,
        }))
    }
}

/// A TLS connection handed to tonic.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: Option<SocketAddr>,
}

impl TlsConn {
    /// The caller's address.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts connections on `listener` and yields those that complete the TLS handshake. A
/// failed handshake (no or wrong client certificate, plaintext, timeout) closes that
/// connection only. Each accepted connection first goes through `admit`, which may keep it (then
/// it gets no handshake). The loop ends when the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    admit: impl Fn(TcpStream, SocketAddr) -> Option<TcpStream> + Send + 'static,
) -> ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: say so, pause, go on.
                        warn!(cause = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let Some(tcp) = admit(tcp, peer) else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tls.acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(inner)) => {
                        let _ = tx
                            .send(Ok(TlsConn {
                                inner,
                                peer: Some(peer),
                            }))
                            .await;
                    }
                    Ok(Err(e)) => debug!(%peer, cause = %e, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
