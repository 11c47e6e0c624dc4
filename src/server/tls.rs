//! Optional TLS on the listen port: HTTPS and `wss://` with rustls, for a
//! box that faces clients with no reverse proxy in front. Plain TCP stays
//! the default (a proxy, or loopback-only use).
//!
//! The certificate and key are PEM files, read at start and again on
//! SIGHUP (a renewed certificate is used by the next handshake; open
//! connections keep theirs). The handshake runs inside the same deadline
//! and handshake caps as the HTTP request head, so a client that stalls
//! it costs what a slow head costs. TLS state lives in a box, so plain
//! connections do not grow by it.

use async_io::Async;
use futures_rustls::TlsAcceptor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use rustls::ServerConfig;
use std::cell::RefCell;
use std::io;
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

/// Reads and checks a certificate chain and its key. Blocking (file
/// reads): run it on the pool once the loop is serving.
pub fn load(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let certs = crate::ca::pem_certificates(cert, "server.tls_cert_file")?;
    // Read once, as a secret: its mode checked on the file read.
    let pem = crate::ops::file::read_secret(key, 1 << 20, "server.tls_key_file")?;
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
        format!(
            "server.tls_key_file {}: cannot read a PEM private key: {e}",
            key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!("server.tls_cert_file and server.tls_key_file do not make a usable pair: {e}")
        })?;
    // HTTP/1.1 only: the upgrade to WebSocket needs it.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The server's TLS settings from `server.tls_cert_file` and
/// `tls_key_file`, or `None` for plain TCP (at start and on reload).
pub fn from_config(cfg: &crate::config::Config) -> Result<Option<Arc<ServerConfig>>, String> {
    match (&cfg.server.tls_cert_file, &cfg.server.tls_key_file) {
        (Some(cert), Some(key)) => load(cert, key).map(Some),
        _ => Ok(None),
    }
}

/// The acceptor in use, replaced by a reload.
pub struct Tls {
    acceptor: RefCell<TlsAcceptor>,
}

impl Tls {
    pub fn new(config: Arc<ServerConfig>) -> Tls {
        Tls {
            acceptor: RefCell::new(TlsAcceptor::from(config)),
        }
    }

    pub fn replace(&self, config: Arc<ServerConfig>) {
        *self.acceptor.borrow_mut() = TlsAcceptor::from(config);
    }

    /// Runs the server side of a handshake.
    pub async fn accept(&self, stream: Async<TcpStream>) -> io::Result<Socket> {
        let accept = self.acceptor.borrow().accept(stream);
        Ok(Socket::Tls(Box::new(futures_rustls::TlsStream::Server(
            accept.await?,
        ))))
    }
}

/// A client's byte stream: plain TCP, or TLS over it.
pub use crate::stream::Stream as Socket;
