//! TLS and mTLS on the gRPC listeners, with certificates generated here (rcgen): who gets in,
//! who does not, and a rotated certificate picked up without a restart.

use crate::common;

use std::{path::PathBuf, sync::Arc, time::Duration};

use common::{records, request, start, topic};
use hyper_util::rt::TokioIo;
use leaderlink::{
    proto::v1::{Acks, forwarder_client::ForwarderClient},
    tls::RELOAD_INTERVAL,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio::net::TcpStream;
use tokio_rustls::{
    TlsConnector,
    rustls::{
        ClientConfig, RootCertStore,
        pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    },
};
use tonic::transport::{Channel, Endpoint};

/// A CA that signs certificates.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate for `names`, with common name `cn`: (cert PEM, key PEM).
    fn leaf(&self, cn: &str, names: &[&str]) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A fresh directory for one test's files.
fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("leaderlink-tls-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes `text` to `path` through a temporary file and a rename, as rotation tools do.
fn write(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A TLS client trusting `ca`, presenting `client` (cert PEM, key PEM) when given.
fn client_config(ca: &str, client: Option<&(String, String)>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let b = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match client {
        Some((cert, key)) => b
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

/// Opens a TLS connection to `addr` and returns the server's certificate (DER).
async fn server_cert(addr: std::net::SocketAddr, cfg: Arc<ClientConfig>) -> Vec<u8> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = TlsConnector::from(cfg)
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// A gRPC channel over TLS with `cfg`.
async fn channel(addr: std::net::SocketAddr, cfg: Arc<ClientConfig>) -> Result<Channel, String> {
    let connector = tower::service_fn(move |_: http::Uri| {
        let cfg = cfg.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            let tls = TlsConnector::from(cfg)
                .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Endpoint::from_static("http://leaderlink")
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("{e:?}"))
}

/// Forwards one record over `ch`; the gRPC result.
async fn forward(ch: Channel, t: &str) -> Result<i64, tonic::Status> {
    let mut r = tonic::Request::new(request(1, Acks::All, t, 0, records("tls", 1)));
    r.set_timeout(Duration::from_secs(10));
    let resp = ForwarderClient::new(ch).forward(r).await?.into_inner();
    Ok(resp.partitions[0].base_offset)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_lets_in_only_clients_with_a_certificate_from_the_client_ca() {
    let d = dir("mtls");
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let rogue_ca = Ca::new("rogue CA");
    let (cert, key) = server_ca.leaf("leaderlink", &["127.0.0.1", "localhost"]);
    write(&d.join("server.pem"), &cert);
    write(&d.join("server.key"), &key);
    write(&d.join("clients.pem"), &client_ca.pem());
    let h = start(|cfg| {
        cfg.tls_cert_file = Some(d.join("server.pem"));
        cfg.tls_key_file = Some(d.join("server.key"));
        cfg.tls_client_ca_file = Some(d.join("clients.pem"));
    })
    .await;
    let t = topic("tls");
    h.dev.create_topic(&t, 1).unwrap();
    let addr = h.server.addr;

    // The right client certificate: in.
    let good = client_ca.leaf("broker-1", &["broker-1"]);
    let ch = channel(addr, client_config(&server_ca.pem(), Some(&good)))
        .await
        .unwrap();
    assert_eq!(forward(ch, &t).await.unwrap(), 0);

    // No client certificate, or one from another CA: refused (the handshake fails, so the
    // call never reaches the Forwarder).
    let rogue = rogue_ca.leaf("intruder", &["intruder"]);
    for client in [None, Some(&rogue)] {
        if let Ok(ch) = channel(addr, client_config(&server_ca.pem(), client)).await {
            let refused = forward(ch, &t).await;
            assert!(
                refused.is_err(),
                "a client without the right certificate got in"
            );
        }
    }
    // Plaintext is refused too.
    let plain = ForwarderClient::connect(format!("http://{addr}")).await;
    if let Ok(mut c) = plain {
        let mut r = tonic::Request::new(request(2, Acks::All, &t, 0, records("x", 1)));
        r.set_timeout(Duration::from_secs(5));
        assert!(c.forward(r).await.is_err());
    }
    // The server still serves the right client.
    let ch = channel(addr, client_config(&server_ca.pem(), Some(&good)))
        .await
        .unwrap();
    assert_eq!(forward(ch, &t).await.unwrap(), 1);
    // The admin listener has its own TLS settings: none here, so it is plaintext.
    common::admin(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let d = dir("rotate");
    let ca = Ca::new("CA");
    let (cert1, key1) = ca.leaf("first", &["127.0.0.1"]);
    write(&d.join("server.pem"), &cert1);
    write(&d.join("server.key"), &key1);
    let h = start(|cfg| {
        cfg.tls_cert_file = Some(d.join("server.pem"));
        cfg.tls_key_file = Some(d.join("server.key"));
    })
    .await;
    let addr = h.server.addr;
    let cfg = client_config(&ca.pem(), None);
    let first = server_cert(addr, cfg.clone()).await;
    let t = topic("rotate");
    h.dev.create_topic(&t, 1).unwrap();
    let ch = channel(addr, cfg.clone()).await.unwrap();
    assert_eq!(forward(ch.clone(), &t).await.unwrap(), 0);

    // Rotate: key first, then certificate (a reload between the two fails to pair them and
    // keeps the old pair; the next check loads the new one).
    let (cert2, key2) = ca.leaf("second", &["127.0.0.1"]);
    write(&d.join("server.key"), &key2);
    write(&d.join("server.pem"), &cert2);
    let started = tokio::time::Instant::now();
    loop {
        let now = server_cert(addr, cfg.clone()).await;
        if now != first {
            let expected: Vec<u8> = CertificateDer::pem_slice_iter(cert2.as_bytes())
                .next()
                .unwrap()
                .unwrap()
                .to_vec();
            assert_eq!(now, expected, "the new certificate is served");
            break;
        }
        assert!(
            started.elapsed() < RELOAD_INTERVAL * 10,
            "the rotated certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A connection opened before the rotation keeps working; new ones work too.
    assert_eq!(forward(ch, &t).await.unwrap(), 1);
    let ch = channel(addr, cfg).await.unwrap();
    assert_eq!(forward(ch, &t).await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_ca_decides_who_gets_in() {
    let d = dir("rotate-ca");
    let server_ca = Ca::new("server CA");
    let old_ca = Ca::new("old client CA");
    let new_ca = Ca::new("new client CA");
    let (cert, key) = server_ca.leaf("leaderlink", &["127.0.0.1"]);
    write(&d.join("server.pem"), &cert);
    write(&d.join("server.key"), &key);
    write(&d.join("clients.pem"), &old_ca.pem());
    let h = start(|cfg| {
        cfg.tls_cert_file = Some(d.join("server.pem"));
        cfg.tls_key_file = Some(d.join("server.key"));
        cfg.tls_client_ca_file = Some(d.join("clients.pem"));
    })
    .await;
    let t = topic("rotate-ca");
    h.dev.create_topic(&t, 1).unwrap();
    let addr = h.server.addr;
    let newcomer = new_ca.leaf("new-broker", &["new-broker"]);
    let newcomer_in = || async {
        match channel(addr, client_config(&server_ca.pem(), Some(&newcomer))).await {
            Ok(ch) => forward(ch, &t).await.is_ok(),
            Err(_) => false,
        }
    };
    assert!(!newcomer_in().await, "not trusted yet");
    write(&d.join("clients.pem"), &new_ca.pem());
    let started = tokio::time::Instant::now();
    while !newcomer_in().await {
        assert!(
            started.elapsed() < RELOAD_INTERVAL * 10,
            "the new client CA was never used"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
