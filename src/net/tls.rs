//! TLS with rustls, for clients (`[client.tls]`) and to the servers (`[server_tls]`).
//!
//! A TLS stream is one more [`Transport`]: [`TlsTransport`] wraps rustls over another
//! transport (TCP in production), so the session, the pools and the control connections
//! read and write through it without knowing. The rustls state (keys, sequence numbers,
//! buffered records) lives beside the inner transport, so a server connection that moves to
//! another worker's reactor ([`Transport::rebind`]) re-registers only its socket and keeps
//! its TLS session.
//!
//! - Clients: [`ClientTls`] holds the policy in force (mode and rustls `ServerConfig`)
//!   behind an [`ArcSwap`], so a reload can swap certificates while sessions run; each new
//!   connection reads it once, when it sees its first packet.
//! - Servers: [`server_connector`] turns `[server_tls]` into a [`Connector`]: TCP, then
//!   PostgreSQL's SSLRequest, then the handshake, with the certificate checked as libpq's
//!   `sslmode` of the same name would.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::transport::{Connecting, Connector, TcpConnector, Transport};
use crate::config::{
    split_host_port, ClientTlsConfig, ClientTlsMode, ServerTlsConfig, ServerTlsMode,
};
use crate::sync::lock;

/// The SSLRequest packet: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Why TLS could not be set up from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{key}: cannot load {path}: {reason}")]
    Load {
        /// The config key that names the file (`client.tls.cert`).
        key: &'static str,
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the material (a key that does not match the certificate, ...).
    #[error("{key}: {source}")]
    Rustls {
        /// The config key at fault.
        key: &'static str,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// The CA file's certificates cannot anchor a chain.
    #[error("server_tls.ca: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
}

/// The crypto provider every config here uses (ring), passed explicitly so nothing
/// depends on a process-wide default.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let failed = |reason: String| TlsError::Load {
        key,
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| failed(e.to_string()))?;
    if certs.is_empty() {
        return Err(failed("no CERTIFICATE in the file".into()));
    }
    Ok(certs)
}

fn load_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Load {
        key,
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

/// What clients are offered: the mode and, unless TLS is off, the certificate.
#[derive(Clone)]
pub struct ClientTlsPolicy {
    mode: ClientTlsMode,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
}

impl fmt::Debug for ClientTlsPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTlsPolicy")
            .field("mode", &self.mode)
            .field("certificate", &self.acceptor.is_some())
            .finish()
    }
}

impl ClientTlsPolicy {
    /// No TLS: every SSLRequest is answered `N`.
    pub fn disabled() -> Self {
        Self {
            mode: ClientTlsMode::Disable,
            acceptor: None,
        }
    }

    /// The policy `[client.tls]` asks for, its certificate and key read now.
    pub fn from_config(config: Option<&ClientTlsConfig>) -> Result<Self, TlsError> {
        let Some(config) = config.filter(|c| c.mode != ClientTlsMode::Disable) else {
            return Ok(Self::disabled());
        };
        let (Some(cert), Some(key)) = (&config.cert, &config.key) else {
            // Config::check requires both; a config built otherwise gets the same answer.
            return Err(TlsError::Load {
                key: "client.tls.cert",
                path: String::new(),
                reason: "client.tls.cert and client.tls.key are required".into(),
            });
        };
        let certs = load_certs("client.tls.cert", cert)?;
        let key = load_key("client.tls.key", key)?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Rustls {
                key: "client.tls",
                source,
            })?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|source| TlsError::Rustls {
                key: "client.tls.key",
                source,
            })?;
        Ok(Self {
            mode: config.mode,
            acceptor: Some(tokio_rustls::TlsAcceptor::from(Arc::new(server))),
        })
    }

    /// The configured mode.
    pub fn mode(&self) -> ClientTlsMode {
        self.mode
    }

    /// The acceptor for an SSLRequest, or `None` when it is to be answered `N`.
    pub fn acceptor(&self) -> Option<&tokio_rustls::TlsAcceptor> {
        self.acceptor.as_ref()
    }

    /// True when a client may log in without TLS.
    pub fn allows_plain(&self) -> bool {
        self.mode != ClientTlsMode::Require
    }
}

/// The client TLS policy in force, swapped as a whole (a reload with new certificates);
/// connections already encrypted keep the session they negotiated.
#[derive(Debug)]
pub struct ClientTls {
    current: ArcSwap<ClientTlsPolicy>,
}

impl ClientTls {
    /// Starts with `policy`.
    pub fn new(policy: ClientTlsPolicy) -> Self {
        Self {
            current: ArcSwap::from_pointee(policy),
        }
    }

    /// The policy for a connection starting now.
    pub fn load(&self) -> Arc<ClientTlsPolicy> {
        self.current.load_full()
    }

    /// Puts `policy` in force for connections that start from now on.
    pub fn replace(&self, policy: ClientTlsPolicy) {
        self.current.store(Arc::new(policy));
    }
}

impl Default for ClientTls {
    fn default() -> Self {
        Self::new(ClientTlsPolicy::disabled())
    }
}

/// Runs the server side of the handshake over `stream` (after pgway answered `S`).
pub async fn accept(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: Box<dyn Transport>,
) -> io::Result<Box<dyn Transport>> {
    let tls = acceptor.accept(stream).await?;
    Ok(Box::new(TlsTransport {
        inner: tokio_rustls::TlsStream::Server(tls),
    }))
}

// ---------------------------------------------------------------------------------------
// The stream
// ---------------------------------------------------------------------------------------

/// A TLS session over another [`Transport`].
///
/// Writes may leave records buffered in rustls: [`super::FramedStream`] flushes after
/// each write.
pub struct TlsTransport {
    inner: tokio_rustls::TlsStream<Box<dyn Transport>>,
}

impl fmt::Debug for TlsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (io, state) = self.inner.get_ref();
        f.debug_struct("TlsTransport")
            .field("io", io)
            .field("protocol", &state.protocol_version())
            .finish()
    }
}

impl AsyncRead for TlsTransport {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsTransport {
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
}

impl Transport for TlsTransport {
    /// Ready at once while rustls holds decrypted bytes (or the peer's close), else when
    /// the socket under it is.
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (io, state) = self.inner.get_mut();
        if !state.wants_read() {
            return Poll::Ready(Ok(()));
        }
        io.poll_readable(cx)
    }

    /// Moves the socket under the session; the TLS state stays as it is.
    fn rebind(mut self: Box<Self>) -> io::Result<Box<dyn Transport>> {
        let (io, _) = self.inner.get_mut();
        let socket = std::mem::replace(io, Box::new(Detached));
        *io = socket.rebind()?;
        Ok(self)
    }
}

/// Stands in for a transport that was taken away for a moment (to be wrapped in TLS, or
/// moved to another reactor): reads see EOF, writes fail.
#[derive(Debug, Default, Clone, Copy)]
pub struct Detached;

impl AsyncRead for Detached {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Detached {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::ErrorKind::NotConnected.into()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Transport for Detached {
    fn rebind(self: Box<Self>) -> io::Result<Box<dyn Transport>> {
        Ok(self)
    }
}

// ---------------------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------------------

/// The connector `[server_tls]` asks for: [`TcpConnector`] for `disable`, else a
/// [`TlsConnector`] with the CA file read now.
pub fn server_connector(config: &ServerTlsConfig) -> Result<Arc<dyn Connector>, TlsError> {
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = match config.mode {
        ServerTlsMode::Disable => return Ok(Arc::new(TcpConnector)),
        ServerTlsMode::Require => Arc::new(AnyCertificate(Arc::clone(&provider))),
        ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull => {
            let Some(ca) = &config.ca else {
                return Err(TlsError::Load {
                    key: "server_tls.ca",
                    path: String::new(),
                    reason: "required by verify-ca and verify-full".into(),
                });
            };
            let mut roots = RootCertStore::empty();
            for cert in load_certs("server_tls.ca", ca)? {
                roots.add(cert).map_err(|source| TlsError::Rustls {
                    key: "server_tls.ca",
                    source,
                })?;
            }
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                    .build()?;
            if config.mode == ServerTlsMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
    };
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            key: "server_tls",
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(TlsConnector {
        mode: config.mode,
        tls: tokio_rustls::TlsConnector::from(Arc::new(client)),
        failures: Mutex::default(),
    }))
}

/// TCP, SSLRequest, then a TLS handshake: pgway's connections to servers under
/// `[server_tls]` (pools, control connections, the cache's replication stream).
pub struct TlsConnector {
    mode: ServerTlsMode,
    tls: tokio_rustls::TlsConnector,
    /// Per node, why its last handshake failed (cleared by a handshake that succeeds).
    failures: Mutex<HashMap<String, String>>,
}

impl fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConnector")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// A failure to set up TLS with a server, as the I/O error a [`Connector`] returns (its
/// text names the server and what went wrong).
fn tls_failure(addr: &str, what: impl fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("TLS with server {addr} failed: {what}"),
    )
}

impl TlsConnector {
    /// SSLRequest and the handshake over `stream`, a new TCP connection to `addr`.
    async fn handshake(
        &self,
        addr: &str,
        mut stream: Box<dyn Transport>,
    ) -> io::Result<Box<dyn Transport>> {
        let host = split_host_port(addr)
            .map(|(host, _)| host)
            .ok_or_else(|| tls_failure(addr, "the address is not host:port"))?;
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| tls_failure(addr, format!("{host:?} is not a server name: {e}")))?;
        stream.write_all(&SSL_REQUEST).await?;
        stream.flush().await?;
        // Exactly one byte: anything after it belongs to the handshake (reading more would
        // accept plain text an attacker slipped in before it).
        match stream.read_u8().await? {
            b'S' => {}
            b'N' => {
                return Err(tls_failure(
                    addr,
                    "the server does not accept SSL (is ssl = on in its postgresql.conf?)",
                ))
            }
            other => {
                return Err(tls_failure(
                    addr,
                    format!("unexpected answer {:?} to SSLRequest", other as char),
                ))
            }
        }
        let tls = self.tls.connect(name, stream).await.map_err(|e| {
            // rustls's refusals (the certificate) are InvalidData; a reset stays a reset.
            io::Error::new(e.kind(), format!("TLS with server {addr} failed: {e}"))
        })?;
        Ok(Box::new(TlsTransport {
            inner: tokio_rustls::TlsStream::Client(tls),
        }))
    }

    /// Remembers a failure waiting will not cure (InvalidData: a certificate refused, a
    /// server without SSL); a success forgets it.
    fn record(&self, addr: &str, result: Result<(), &io::Error>) {
        let mut failures = lock(&self.failures);
        match result {
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                failures.insert(addr.to_owned(), e.to_string());
            }
            Err(_) => {}
            Ok(()) => {
                failures.remove(addr);
            }
        }
    }
}

impl Connector for TlsConnector {
    fn connect<'a>(&'a self, addr: &'a str) -> Connecting<'a> {
        Box::pin(async move {
            let stream = TcpConnector.connect(addr).await?;
            let result = self.handshake(addr, stream).await;
            self.record(addr, result.as_ref().map(|_| ()));
            result
        })
    }

    fn lasting_failure(&self, addr: &str) -> Option<String> {
        let failures = lock(&self.failures);
        failures.get(addr).cloned()
    }
}

/// `verify-ca`: the chain must lead to `server_tls.ca`; the names in the certificate are
/// not compared with the host.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain first and the name last: a name mismatch means the chain
        // was good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `require`: any certificate is accepted (as libpq's `sslmode=require` without a root
/// certificate); the handshake's signatures are still checked, so the session is
/// encrypted with whoever holds the certificate's key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use tokio::net::TcpListener;

    /// A CA and a server certificate it signed for `names`, as PEM files in `dir`.
    struct Pki {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    }

    fn pki(dir: &Path, tag: &str, names: &[&str]) -> Pki {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("pgway test CA {tag}"));
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let files = Pki {
            ca: dir.join(format!("{tag}-ca.crt")),
            cert: dir.join(format!("{tag}.crt")),
            key: dir.join(format!("{tag}.key")),
        };
        std::fs::write(&files.ca, ca.pem()).unwrap();
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    fn acceptor(pki: &Pki) -> tokio_rustls::TlsAcceptor {
        let policy = ClientTlsPolicy::from_config(Some(&ClientTlsConfig {
            cert: Some(pki.cert.clone()),
            key: Some(pki.key.clone()),
            mode: ClientTlsMode::Require,
        }))
        .unwrap();
        assert!(!policy.allows_plain());
        policy.acceptor().cloned().unwrap()
    }

    /// A server on loopback that answers one SSLRequest with `answer` and, after `S`,
    /// echoes what it reads over TLS until the client leaves.
    async fn fake_server(pki: &Pki, answer: u8) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let acceptor = acceptor(pki);
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 8];
            socket.read_exact(&mut request).await.unwrap();
            assert_eq!(request, SSL_REQUEST);
            socket.write_all(&[answer]).await.unwrap();
            if answer != b'S' {
                return;
            }
            let Ok(mut tls) = accept(&acceptor, Box::new(socket)).await else {
                return;
            };
            let mut buf = [0u8; 1024];
            while let Ok(n @ 1..) = tls.read(&mut buf).await {
                tls.write_all(&buf[..n]).await.unwrap();
                tls.flush().await.unwrap();
            }
        });
        addr
    }

    fn connector(mode: ServerTlsMode, ca: Option<&Path>) -> Arc<dyn Connector> {
        server_connector(&ServerTlsConfig {
            mode,
            ca: ca.map(Path::to_path_buf),
        })
        .unwrap()
    }

    async fn echo(stream: &mut Box<dyn Transport>, text: &[u8]) {
        stream.write_all(text).await.unwrap();
        stream.flush().await.unwrap();
        let mut back = vec![0u8; text.len()];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(back, text);
    }

    #[tokio::test]
    async fn each_mode_checks_what_libpq_checks() {
        let dir = tempfile::tempdir().unwrap();
        let good = pki(dir.path(), "good", &["localhost", "127.0.0.1"]);
        let other = pki(dir.path(), "other", &["localhost", "127.0.0.1"]);
        let named = pki(dir.path(), "named", &["db.example"]);

        for (mode, ca, server, ok) in [
            (ServerTlsMode::Require, None, &good, true),
            (ServerTlsMode::Require, None, &named, true),
            (ServerTlsMode::VerifyCa, Some(&good.ca), &good, true),
            (ServerTlsMode::VerifyCa, Some(&named.ca), &named, true),
            (ServerTlsMode::VerifyCa, Some(&other.ca), &good, false),
            (ServerTlsMode::VerifyFull, Some(&good.ca), &good, true),
            (ServerTlsMode::VerifyFull, Some(&named.ca), &named, false),
            (ServerTlsMode::VerifyFull, Some(&other.ca), &good, false),
        ] {
            let addr = fake_server(server, b'S').await;
            let result = connector(mode, ca.map(PathBuf::as_path))
                .connect(&addr)
                .await;
            match (result, ok) {
                (Ok(mut stream), true) => echo(&mut stream, b"hello").await,
                (Err(e), false) => {
                    let text = e.to_string();
                    assert!(
                        text.contains(&addr) && text.contains("certificate"),
                        "{mode:?}: {text}"
                    );
                }
                (Ok(_), false) => panic!("{mode:?} with {ca:?} must refuse the certificate"),
                (Err(e), true) => panic!("{mode:?} with {ca:?}: {e}"),
            }
        }
    }

    #[tokio::test]
    async fn a_server_without_ssl_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = pki(dir.path(), "good", &["127.0.0.1"]);
        let addr = fake_server(&good, b'N').await;
        let err = connector(ServerTlsMode::Require, None)
            .connect(&addr)
            .await
            .expect_err("'N' is a refusal");
        assert!(err.to_string().contains("does not accept SSL"), "{err}");
    }

    #[tokio::test]
    async fn disable_is_plain_tcp() {
        let plain = connector(ServerTlsMode::Disable, None);
        assert!(format!("{plain:?}").contains("TcpConnector"), "{plain:?}");
    }

    #[tokio::test]
    async fn a_session_keeps_its_keys_when_the_socket_is_rebound() {
        let dir = tempfile::tempdir().unwrap();
        let good = pki(dir.path(), "good", &["127.0.0.1"]);
        let addr = fake_server(&good, b'S').await;
        let mut stream = connector(ServerTlsMode::VerifyFull, Some(&good.ca))
            .connect(&addr)
            .await
            .unwrap();
        echo(&mut stream, b"before").await;
        let mut stream = stream.rebind().unwrap();
        echo(&mut stream, b"after the move").await;
        assert!(!stream.is_stale());
    }

    #[tokio::test]
    async fn decrypted_bytes_not_yet_read_count_as_readable() {
        let dir = tempfile::tempdir().unwrap();
        let good = pki(dir.path(), "good", &["127.0.0.1"]);
        let addr = fake_server(&good, b'S').await;
        let mut stream = connector(ServerTlsMode::VerifyFull, Some(&good.ca))
            .connect(&addr)
            .await
            .unwrap();
        stream.write_all(b"0123456789").await.unwrap();
        stream.flush().await.unwrap();
        let mut first = [0u8; 4];
        stream.read_exact(&mut first).await.unwrap();
        // The rest is decrypted inside rustls, the socket has nothing more: still readable.
        let ready = std::future::poll_fn(|cx| Poll::Ready(stream.poll_readable(cx))).await;
        assert!(matches!(ready, Poll::Ready(Ok(()))), "{ready:?}");
        let mut rest = [0u8; 6];
        stream.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"456789");
    }

    #[test]
    fn files_that_cannot_be_used_are_named_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let good = pki(dir.path(), "good", &["127.0.0.1"]);
        let other = pki(dir.path(), "other", &["127.0.0.1"]);
        let client = |cert: &Path, key: &Path| {
            ClientTlsPolicy::from_config(Some(&ClientTlsConfig {
                cert: Some(cert.to_path_buf()),
                key: Some(key.to_path_buf()),
                mode: ClientTlsMode::Allow,
            }))
        };
        let missing = dir.path().join("missing.pem");
        for (result, key) in [
            (client(&missing, &good.key).map(|_| ()), "client.tls.cert"),
            (client(&good.key, &good.key).map(|_| ()), "client.tls.cert"),
            (client(&good.cert, &missing).map(|_| ()), "client.tls.key"),
            (client(&good.cert, &other.key).map(|_| ()), "client.tls.key"),
            (
                server_connector(&ServerTlsConfig {
                    mode: ServerTlsMode::VerifyCa,
                    ca: Some(missing.clone()),
                })
                .map(|_| ()),
                "server_tls.ca",
            ),
        ] {
            let err = result.expect_err(key);
            assert!(err.to_string().starts_with(key), "{key}: {err}");
        }
        let allow = client(&good.cert, &good.key).unwrap();
        assert!(allow.allows_plain() && allow.acceptor().is_some());
        let off = ClientTlsPolicy::from_config(None).unwrap();
        assert!(off.allows_plain() && off.acceptor().is_none());
    }

    #[test]
    fn the_policy_is_swapped_whole() {
        let tls = ClientTls::default();
        assert_eq!(tls.load().mode(), ClientTlsMode::Disable);
        let dir = tempfile::tempdir().unwrap();
        let good = pki(dir.path(), "good", &["127.0.0.1"]);
        let before = tls.load();
        tls.replace(
            ClientTlsPolicy::from_config(Some(&ClientTlsConfig {
                cert: Some(good.cert.clone()),
                key: Some(good.key.clone()),
                mode: ClientTlsMode::Require,
            }))
            .unwrap(),
        );
        assert_eq!(tls.load().mode(), ClientTlsMode::Require);
        assert_eq!(
            before.mode(),
            ClientTlsMode::Disable,
            "a loaded policy stays"
        );
    }
}
