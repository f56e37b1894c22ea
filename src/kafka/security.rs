//! TLS and SASL on broker connections (metadata and leader connections alike, on every
//! connect and reconnect).
//!
//! TLS is rustls (through tokio-rustls). SASL follows the Kafka protocol: after ApiVersions,
//! `SaslHandshake` v1 names the mechanism, then `SaslAuthenticate` carries the mechanism's
//! messages, all framed as ordinary Kafka requests on the pipelined connection. The mechanisms'
//! messages come from the `sasl` crate (PLAIN, SCRAM-SHA-256); it has no SHA-512 provider, so
//! [`Sha512`] supplies one for SCRAM-SHA-512 from the same hash, HMAC and PBKDF2 crates.

use std::{fmt, path::Path, sync::Arc, time::Duration};

use hmac::{Hmac, Mac, digest::InvalidLength};
use kafka_protocol::{
    messages::{
        ApiKey, SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest,
        SaslHandshakeResponse,
    },
    protocol::StrBytes,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use sasl::{
    client::{Mechanism as _, mechanisms},
    common::{ChannelBinding, Credentials, Password, scram::DeriveError, scram::ScramProvider},
};
use sha2::{Digest, Sha512 as Sha512Hash};
use tokio::{net::TcpStream, time::Instant};
use tokio_rustls::{
    TlsConnector,
    client::TlsStream,
    rustls::{self, ClientConfig, RootCertStore},
};

use super::{
    connection::Connection,
    error::{ConnError, RequestError},
    frame::{decode_response, encode_body},
    versions::Versions,
};

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
pub async fn handshake(
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

/// SASL error codes (Kafka): UNSUPPORTED_SASL_MECHANISM, ILLEGAL_SASL_STATE,
/// SASL_AUTHENTICATION_FAILED.
const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
const SASL_AUTHENTICATION_FAILED: i16 = 58;

fn auth_error(mechanism: SaslMechanism, reason: impl Into<String>) -> ConnError {
    ConnError::Auth {
        mechanism: mechanism.name(),
        reason: reason.into(),
    }
}

async fn request<Resp: kafka_protocol::protocol::Decodable>(
    conn: &Arc<Connection>,
    api: ApiKey,
    version: i16,
    body: bytes::Bytes,
    deadline: Instant,
) -> Result<Resp, ConnError> {
    let answer = async {
        let in_flight = conn.send(api, version, body, true).await?;
        in_flight.wait(deadline).await?.ok_or(RequestError {
            cause: ConnError::Shutdown,
            maybe_sent: true,
        })
    };
    let frame = answer.await.map_err(|e| e.cause)?;
    decode_response::<Resp>(api, version, frame)
}

/// Authenticates a freshly negotiated connection with SASL. Nothing else may be sent on it
/// before this returns Ok. Returns the session's lifetime when the broker limits it
/// (SaslAuthenticate v1+ `session_lifetime_ms`, KIP-368): after it, the broker closes the
/// connection at its next request.
pub async fn authenticate(
    conn: &Arc<Connection>,
    versions: &Versions,
    sasl: &Sasl,
    deadline: Instant,
) -> Result<Option<Duration>, ConnError> {
    let mech = sasl.mechanism;
    if versions.sasl_handshake < 1 || versions.sasl_authenticate < 0 {
        return Err(auth_error(
            mech,
            "the broker offers no SaslHandshake v1 / SaslAuthenticate (is this a SASL listener?)",
        ));
    }
    let handshake =
        SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str(mech.name()));
    let body = encode_body(ApiKey::SaslHandshake, 1, &handshake)?;
    let resp: SaslHandshakeResponse =
        request(conn, ApiKey::SaslHandshake, 1, body, deadline).await?;
    if resp.error_code == UNSUPPORTED_SASL_MECHANISM {
        let offered: Vec<&str> = resp.mechanisms.iter().map(|m| m.as_str()).collect();
        return Err(auth_error(
            mech,
            format!(
                "the broker does not offer it (it offers {})",
                offered.join(", ")
            ),
        ));
    }
    if resp.error_code != 0 {
        return Err(auth_error(
            mech,
            format!("SaslHandshake failed with error code {}", resp.error_code),
        ));
    }
    let creds = Credentials::default()
        .with_username(sasl.username.clone())
        .with_password(sasl.password.clone())
        .with_channel_binding(ChannelBinding::None);
    let mut client: Box<dyn sasl::client::Mechanism + Send> = match mech {
        SaslMechanism::Plain => Box::new(
            mechanisms::Plain::from_credentials(creds)
                .map_err(|e| auth_error(mech, e.to_string()))?,
        ),
        SaslMechanism::ScramSha256 => Box::new(
            mechanisms::Scram::<sasl::common::scram::Sha256>::from_credentials(creds)
                .map_err(|e| auth_error(mech, e.to_string()))?,
        ),
        SaslMechanism::ScramSha512 => Box::new(
            mechanisms::Scram::<Sha512>::from_credentials(creds)
                .map_err(|e| auth_error(mech, e.to_string()))?,
        ),
    };
    let version = versions.sasl_authenticate.min(2);
    let mut out = client.initial();
    // PLAIN takes one round trip, SCRAM two; a broker asking for more is not followed.
    for round in 0..3 {
        let req = SaslAuthenticateRequest::default().with_auth_bytes(bytes::Bytes::from(out));
        let body = encode_body(ApiKey::SaslAuthenticate, version, &req)?;
        let resp: SaslAuthenticateResponse =
            request(conn, ApiKey::SaslAuthenticate, version, body, deadline).await?;
        if resp.error_code != 0 {
            let msg = resp
                .error_message
                .map(|m| m.to_string())
                .unwrap_or_default();
            let what = if resp.error_code == SASL_AUTHENTICATION_FAILED {
                "the broker refused the credentials"
            } else {
                "SaslAuthenticate failed"
            };
            return Err(auth_error(
                mech,
                format!("{what} (error code {}): {msg}", resp.error_code),
            ));
        }
        let done = match mech {
            SaslMechanism::Plain => true,
            // SCRAM: server-first in round 0, server-final (its signature) in round 1.
            _ => round == 1,
        };
        if done {
            if mech != SaslMechanism::Plain {
                client
                    .success(&resp.auth_bytes)
                    .map_err(|e| auth_error(mech, format!("the broker's proof is wrong: {e}")))?;
            }
            let lifetime = u64::try_from(resp.session_lifetime_ms)
                .ok()
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis);
            return Ok(lifetime);
        }
        if mech != SaslMechanism::Plain {
            check_scram_iterations(mech, &resp.auth_bytes)?;
        }
        // SCRAM's answer to the server-first message runs PBKDF2: CPU work that must neither
        // hold a runtime worker nor outlive the deadline.
        let challenge = resp.auth_bytes;
        let step = tokio::task::spawn_blocking(move || {
            let r = client.response(&challenge);
            (client, r)
        });
        let (back, r) = match tokio::time::timeout_at(deadline, step).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => return Err(auth_error(mech, format!("the SASL step failed: {e}"))),
            Err(_) => return Err(auth_error(mech, "the SASL step ran out of time")),
        };
        client = back;
        out = r.map_err(|e| auth_error(mech, e.to_string()))?;
    }
    Err(auth_error(mech, "the exchange did not end"))
}

/// Most PBKDF2 iterations a SCRAM server-first message may ask for: Apache Kafka's own upper
/// bound for SCRAM credentials. The client pays for every iteration; a broker asking for more
/// is refused rather than followed for minutes of CPU.
pub const MAX_SCRAM_ITERATIONS: u32 = 16_384;

/// Refuses a SCRAM server-first message (`r=…,s=…,i=N`) whose iteration count is missing, not
/// a number, or above [`MAX_SCRAM_ITERATIONS`].
fn check_scram_iterations(mech: SaslMechanism, server_first: &[u8]) -> Result<(), ConnError> {
    let text = String::from_utf8_lossy(server_first);
    let Some(i) = text.split(',').find_map(|attr| attr.strip_prefix("i=")) else {
        return Err(auth_error(
            mech,
            "the broker's SCRAM message names no iteration count",
        ));
    };
    match i.parse::<u32>() {
        Ok(n) if n <= MAX_SCRAM_ITERATIONS => Ok(()),
        _ => Err(auth_error(
            mech,
            format!(
                "the broker asks for {i} PBKDF2 iterations; at most {MAX_SCRAM_ITERATIONS} are \
                 computed"
            ),
        )),
    }
}

/// SCRAM-SHA-512 for the `sasl` crate, which ships SHA-1 and SHA-256 only.
pub struct Sha512;

/// The secret type the `sasl` crate asks a provider to name (unused on the client side).
pub struct Pbkdf2Sha512;

impl sasl::secret::Secret for Pbkdf2Sha512 {}

impl ScramProvider for Sha512 {
    type Secret = Pbkdf2Sha512;

    fn name() -> &'static str {
        "SHA-512"
    }

    fn hash(data: &[u8]) -> Vec<u8> {
        Sha512Hash::digest(data).to_vec()
    }

    fn hmac(data: &[u8], key: &[u8]) -> Result<Vec<u8>, InvalidLength> {
        let mut mac = Hmac::<Sha512Hash>::new_from_slice(key)?;
        mac.update(data);
        Ok(mac.finalize().into_bytes().to_vec())
    }

    fn derive(password: &Password, salt: &[u8], iterations: u32) -> Result<Vec<u8>, DeriveError> {
        match password {
            Password::Plain(plain) => {
                let mut out = vec![0; 64];
                pbkdf2::pbkdf2::<Hmac<Sha512Hash>>(plain.as_bytes(), salt, iterations, &mut out)?;
                Ok(out)
            }
            // Only plain passwords are ever configured.
            Password::Pbkdf2 { method, .. } => Err(DeriveError::IncompatibleHashingMethod(
                method.clone(),
                Self::name().to_string(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677's SCRAM-SHA-256 example shapes the test; for SHA-512 the values are checked
    /// against a second, independent computation of the client proof.
    #[test]
    fn sha512_provider_derives_like_pbkdf2_hmac_sha512() {
        let salted = Sha512::derive(&Password::Plain("pencil".into()), b"salt", 4096).unwrap();
        assert_eq!(salted.len(), 64);
        let mut expected = vec![0; 64];
        pbkdf2::pbkdf2::<Hmac<Sha512Hash>>(b"pencil", b"salt", 4096, &mut expected).unwrap();
        assert_eq!(salted, expected);
        let key = Sha512::hmac(b"Client Key", &salted).unwrap();
        assert_eq!(key.len(), 64);
        assert_eq!(Sha512::hash(b"abc").len(), 64);
        // SHA-512("abc") from FIPS 180-2.
        assert_eq!(
            &Sha512::hash(b"abc")[..8],
            &[0xdd, 0xaf, 0x35, 0xa1, 0x93, 0x61, 0x7a, 0xba]
        );
    }

    /// A broker whose SCRAM server-first message asks for 2^31 - 1 PBKDF2 iterations: the
    /// handshake fails at once with a message naming the count, instead of computing for
    /// minutes on a runtime worker past the deadline.
    #[tokio::test]
    async fn a_scram_iteration_count_beyond_the_bound_is_refused() {
        use kafka_protocol::{
            messages::{RequestHeader, ResponseHeader},
            protocol::{Decodable, Encodable},
        };
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let (ours, mut peer) = tokio::io::duplex(64 * 1024);
        let (r, w) = tokio::io::split(ours);
        let cfg = super::super::connection::ConnectionConfig {
            max_in_flight: 4,
            max_queued: 4,
            max_in_flight_bytes: 1 << 20,
            max_frame_bytes: 1 << 20,
            client_id: None,
            connect_timeout: std::time::Duration::from_secs(5),
            security: Default::default(),
        };
        let conn = Connection::start(r, w, &cfg, Arc::default(), tracing::Span::none());
        // The broker: SaslHandshake accepted, then a server-first message with i=2147483647.
        let broker = tokio::spawn(async move {
            for _ in 0..2 {
                let len = peer.read_i32().await.unwrap();
                let mut buf = vec![0; len as usize];
                peer.read_exact(&mut buf).await.unwrap();
                let mut b = bytes::Bytes::from(buf);
                let key = i16::from_be_bytes([b[0], b[1]]);
                let version = i16::from_be_bytes([b[2], b[3]]);
                let api = ApiKey::try_from(key).unwrap();
                let h = RequestHeader::decode(&mut b, api.request_header_version(version)).unwrap();
                let mut out = bytes::BytesMut::new();
                ResponseHeader::default()
                    .with_correlation_id(h.correlation_id)
                    .encode(&mut out, api.response_header_version(version))
                    .unwrap();
                if api == ApiKey::SaslHandshake {
                    SaslHandshakeResponse::default()
                        .encode(&mut out, version)
                        .unwrap();
                } else {
                    SaslAuthenticateResponse::default()
                        .with_auth_bytes(bytes::Bytes::from_static(
                            b"r=clientnonceservernonce,s=c2FsdA==,i=2147483647",
                        ))
                        .encode(&mut out, version)
                        .unwrap();
                }
                peer.write_i32(out.len() as i32).await.unwrap();
                peer.write_all(&out).await.unwrap();
            }
            peer
        });
        let versions = Versions {
            sasl_handshake: 1,
            sasl_authenticate: 2,
            ..Versions::UNNEGOTIATED
        };
        let sasl = Sasl {
            mechanism: SaslMechanism::ScramSha256,
            username: "alice".into(),
            password: "alice-secret".into(),
        };
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            authenticate(&conn, &versions, &sasl, deadline),
        )
        .await
        .expect("refused at once, not computed");
        match r {
            Err(ConnError::Auth { reason, .. }) => {
                assert!(reason.contains("2147483647 PBKDF2 iterations"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let _peer = broker.await.unwrap();
    }

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
