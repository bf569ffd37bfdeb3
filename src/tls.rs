//! TLS: HTTPS/WSS and gRPC for clients, mutual TLS between nodes (rustls, ring).
//!
//! - [`generate`] (`raftchat certs`) makes a cluster CA and one certificate per node (server
//!   and client use, the node's addresses as subject alternative names).
//! - [`Tls::load`] reads a node's certificate, key, the CA and the revoked list
//!   (`tls_revoked_file`: SHA-256 fingerprints of certificates, one hex line each, see
//!   [`fingerprint`]) and builds three rustls configurations: the client-facing server
//!   (no client certificate), the peer server (a certificate signed by the CA and not
//!   revoked is required) and the peer client (the same checks on the node it dials).
//! - A revoked or foreign certificate fails the handshake, so such a node can neither
//!   call a peer nor answer one.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName as RustlsDn, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("TLS set-up: {0}")]
    Setup(String),
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File { path: path.to_path_buf(), reason: reason.to_string() }
}

/// Hex SHA-256 of a certificate's DER bytes (what the revoked list holds).
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The fingerprint of the first certificate in a PEM file.
pub fn fingerprint_file(path: &Path) -> Result<String, TlsError> {
    let cert = CertificateDer::from_pem_file(path).map_err(|e| file_err(path, e))?;
    Ok(fingerprint(&cert))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS settings of one node.
#[derive(Clone)]
pub struct Tls {
    /// HTTPS/WSS and client gRPC: a server certificate, no client certificate.
    pub client_facing: Arc<rustls::ServerConfig>,
    /// Peer listener: the caller must present a certificate of the cluster CA, not revoked.
    pub peer_server: Arc<rustls::ServerConfig>,
    /// Dialing peers: this node's certificate, and the same checks on the peer's.
    pub peer_client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(..)")
    }
}

/// Reads a revoked list: one hex fingerprint per line; `#` starts a comment.
pub fn read_revoked(path: &Path) -> Result<HashSet<String>, TlsError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
    let mut out = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let l = line.split('#').next().unwrap_or("").trim().to_ascii_lowercase();
        if l.is_empty() {
            continue;
        }
        if l.len() != 64 || !l.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(file_err(path, format!("line {}: not a SHA-256 fingerprint (64 hex digits)", n + 1)));
        }
        out.insert(l);
    }
    Ok(out)
}

impl Tls {
    pub fn load(cert: &Path, key: &Path, ca: &Path, revoked: Option<&Path>) -> Result<Self, TlsError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| file_err(cert, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_err(cert, e))?;
        if chain.is_empty() {
            return Err(file_err(cert, "no certificate in the file"));
        }
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?;
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).map_err(|e| file_err(ca, e))? {
            roots.add(c.map_err(|e| file_err(ca, e))?).map_err(|e| file_err(ca, e))?;
        }
        if roots.is_empty() {
            return Err(file_err(ca, "no CA certificate in the file"));
        }
        let roots = Arc::new(roots);
        let revoked = Arc::new(match revoked {
            Some(p) => read_revoked(p)?,
            None => HashSet::new(),
        });
        let setup = |e: rustls::Error| TlsError::Setup(e.to_string());
        let versions = |b: rustls::ConfigBuilder<rustls::ServerConfig, rustls::WantsVersions>| {
            b.with_safe_default_protocol_versions().map_err(setup)
        };

        let mut client_facing = versions(rustls::ServerConfig::builder_with_provider(provider()))?
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key_der.clone_key())
            .map_err(setup)?;
        client_facing.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        let webpki_client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Setup(e.to_string()))?;
        let mut peer_server = versions(rustls::ServerConfig::builder_with_provider(provider()))?
            .with_client_cert_verifier(Arc::new(NotRevokedClient { inner: webpki_client, revoked: revoked.clone() }))
            .with_single_cert(chain.clone(), key_der.clone_key())
            .map_err(setup)?;
        peer_server.alpn_protocols = vec![b"h2".to_vec()];

        let webpki_server = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| TlsError::Setup(e.to_string()))?;
        let mut peer_client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(setup)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NotRevokedServer { inner: webpki_server, revoked }))
            .with_client_auth_cert(chain, key_der)
            .map_err(setup)?;
        peer_client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            client_facing: Arc::new(client_facing),
            peer_server: Arc::new(peer_server),
            peer_client: Arc::new(peer_client),
        })
    }
}

fn check_revoked(revoked: &HashSet<String>, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    if revoked.contains(&fingerprint(cert)) {
        return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked));
    }
    Ok(())
}

/// The CA's checks (webpki), then the revoked list.
#[derive(Debug)]
struct NotRevokedClient {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: Arc<HashSet<String>>,
}

impl ClientCertVerifier for NotRevokedClient {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[RustlsDn] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        check_revoked(&self.revoked, end_entity)?;
        Ok(ok)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct NotRevokedServer {
    inner: Arc<WebPkiServerVerifier>,
    revoked: Arc<HashSet<String>>,
}

impl ServerCertVerifier for NotRevokedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        check_revoked(&self.revoked, end_entity)?;
        Ok(ok)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "raftchat cluster CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

fn write_private(path: &Path, text: &str) -> Result<(), TlsError> {
    let _ = std::fs::remove_file(path);
    crate::config::write_private(path, text.as_bytes()).map_err(|e| file_err(path, e))
}

/// Writes `ca.pem`/`ca.key` under `dir` (kept if they exist) and, for each `(name, SANs)`,
/// `<name>.pem`/`<name>.key` signed by the CA. Keys are written 0600. Returns the files
/// written.
pub fn generate(dir: &Path, certs: &[(String, Vec<String>)]) -> Result<Vec<PathBuf>, TlsError> {
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let (ca_pem, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let mut written = Vec::new();
    let key = if ca_key.exists() {
        let text = std::fs::read_to_string(&ca_key).map_err(|e| file_err(&ca_key, e))?;
        KeyPair::from_pem(&text).map_err(|e| file_err(&ca_key, e))?
    } else {
        let key = KeyPair::generate().map_err(|e| TlsError::Setup(e.to_string()))?;
        let cert = ca_params().self_signed(&key).map_err(|e| TlsError::Setup(e.to_string()))?;
        write_private(&ca_key, &key.serialize_pem())?;
        std::fs::write(&ca_pem, cert.pem()).map_err(|e| file_err(&ca_pem, e))?;
        written.extend([ca_pem.clone(), ca_key.clone()]);
        key
    };
    let issuer = Issuer::new(ca_params(), key);
    for (name, sans) in certs {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)) {
            return Err(TlsError::Setup(format!("certificate name {name:?}: use letters, digits, '_', '-', '.'")));
        }
        let mut p = CertificateParams::new(sans.clone()).map_err(|e| TlsError::Setup(format!("{name}: {e}")))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("raftchat {name}"));
        p.distinguished_name = dn;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().map_err(|e| TlsError::Setup(e.to_string()))?;
        let cert = p.signed_by(&key, &issuer).map_err(|e| TlsError::Setup(e.to_string()))?;
        let (cp, kp) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        std::fs::write(&cp, cert.pem()).map_err(|e| file_err(&cp, e))?;
        write_private(&kp, &key.serialize_pem())?;
        written.extend([cp, kp]);
    }
    Ok(written)
}

/// A client configuration that trusts the CA certificates in `ca` (a cluster's own CA) and
/// presents no certificate: for clients of HTTPS/WSS.
pub fn trusting(ca: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| file_err(ca, e))? {
        roots.add(c.map_err(|e| file_err(ca, e))?).map_err(|e| file_err(ca, e))?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// `b` also trusting the CA certificate in `ca`, when given.
pub fn trust_ca(b: reqwest::ClientBuilder, ca: Option<&Path>) -> Result<reqwest::ClientBuilder, TlsError> {
    let Some(ca) = ca else { return Ok(b) };
    let pem = std::fs::read(ca).map_err(|e| file_err(ca, e))?;
    Ok(b.add_root_certificate(reqwest::Certificate::from_pem(&pem).map_err(|e| file_err(ca, e))?))
}

/// TLS connections accepted from `tcp` with `cfg`, for tonic's `serve_with_incoming`. Each
/// handshake runs in its own task (bounded to 10 s), so a slow or failing client holds up
/// no one; failed handshakes are logged and dropped.
pub fn incoming(
    mut tcp: tonic::transport::server::TcpIncoming,
    cfg: Arc<rustls::ServerConfig>,
) -> impl futures::Stream<Item = Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>> {
    use futures::StreamExt;
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        while let Some(conn) = tcp.next().await {
            let sock = match conn {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(cause = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let peer = sock.peer_addr().ok();
                match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(sock)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(s)).await;
                    }
                    Ok(Err(e)) => tracing::info!(?peer, cause = %e, "TLS handshake refused"),
                    Err(_) => tracing::debug!(?peer, "TLS handshake timed out"),
                }
            });
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
}

/// Dials `uri`'s host and port with TLS (`cfg`): the connector of a peer channel.
pub async fn connect(
    cfg: Arc<rustls::ClientConfig>,
    uri: http::Uri,
) -> Result<hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>, std::io::Error> {
    let host = uri.host().ok_or_else(|| std::io::Error::other("peer address without a host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(443);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(host).map_err(std::io::Error::other)?;
    let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await?;
    Ok(hyper_util::rt::TokioIo::new(tls))
}
