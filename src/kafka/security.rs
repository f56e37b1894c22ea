//! TLS and SASL settings of broker connections (metadata and leader connections alike, on
//! every connect and reconnect), and the TLS handshake. TLS is rustls (through
//! tokio-rustls); the SASL exchange itself runs on the fresh connection (see `dial.rs`).

use std::{fmt, path::Path, sync::Arc};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::{net::TcpStream, time::Instant};
use tokio_rustls::{
    TlsConnector,
    client::TlsStream,
    rustls::{self, ClientConfig, RootCertStore},
};

use super::error::ConnError;

/// A SASL mechanism Kafka offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SaslMechanism {
    /// Username and password in the clear (use it with TLS).
    #[serde(rename = "PLAIN")]
    Plain,
    /// RFC 7677 SCRAM with SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM with SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The name Kafka knows it by.
    pub fn name(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// SASL credentials for broker connections.
#[derive(Clone)]
pub struct Sasl {
    /// The mechanism.
    pub mechanism: SaslMechanism,
    /// User name.
    pub username: String,
    /// Password; never printed (see the `Debug` impl).
    pub password: String,
}

impl fmt::Debug for Sasl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sasl")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// How broker connections are secured. The default is plaintext without SASL.
#[derive(Clone, Default)]
pub struct Security {
    /// TLS, when the protocol is SSL or SASL_SSL.
    pub tls: Option<TlsConnector>,
    /// SASL, when the protocol is SASL_PLAINTEXT or SASL_SSL.
    pub sasl: Option<Sasl>,
}

impl fmt::Debug for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Security")
            .field("tls", &self.tls.is_some())
            .field("sasl", &self.sasl)
            .finish()
    }
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("{}: no usable private key: {e}", path.display()))
}

/// A trust store of every CA certificate in a PEM file.
pub fn root_store(ca_file: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca_file)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", ca_file.display()))?;
    }
    Ok(roots)
}

/// The rustls crypto provider leaderlink uses everywhere (ring).
pub fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS client trusting the CAs in `ca_file`, presenting `client` (certificate chain and key
/// files) when given.
pub fn tls_connector(
    ca_file: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<TlsConnector, String> {
    let builder = ClientConfig::builder_with_provider(crypto())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(root_store(ca_file)?);
    let config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| format!("{}: {e}", cert.display()))?,
        None => builder.with_no_client_auth(),
    };
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Runs the TLS handshake on `tcp`, verifying the broker's certificate against the host of
/// `addr` (a name or an IP address).
pub async fn tls_handshake(
    connector: &TlsConnector,
    addr: &str,
    tcp: TcpStream,
    deadline: Instant,
) -> Result<TlsStream<TcpStream>, ConnError> {
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = ServerName::try_from(host.to_string()).map_err(|e| ConnError::Tls {
        addr: addr.to_string(),
        reason: format!("{host:?} is not a valid server name: {e}"),
    })?;
    match tokio::time::timeout_at(deadline, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(ConnError::Tls {
            addr: addr.to_string(),
            reason: e.to_string(),
        }),
        Err(_) => Err(ConnError::TimedOut),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_not_printed() {
        let s = Sasl {
            mechanism: SaslMechanism::Plain,
            username: "alice".into(),
            password: "alice-secret".into(),
        };
        assert!(!format!("{s:?}").contains("alice-secret"));
    }
}
