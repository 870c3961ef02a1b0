//! What a test client's WebSocket runs on: a TCP socket, or TLS over one
//! for a server started with `--tls-cert` (see [`trust`]). Tests written
//! against `Client::connect(server.addr, …)` run unchanged over `wss://`.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A client's byte stream.
#[derive(Debug)]
pub enum Wire {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Wire {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Wire::Plain(tcp) => tcp,
            #[cfg(feature = "tls")]
            Wire::Tls(tls) => tls.get_ref(),
        }
    }

    pub fn set_read_timeout(&self, wait: Option<Duration>) -> io::Result<()> {
        self.tcp().set_read_timeout(wait)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().local_addr()
    }

    /// `ws` or `wss`.
    pub fn scheme(&self) -> &'static str {
        match self {
            Wire::Plain(_) => "ws",
            #[cfg(feature = "tls")]
            Wire::Tls(_) => "wss",
        }
    }

    /// `tcp`, wrapped in TLS if the server at `addr` speaks it.
    pub fn over(tcp: TcpStream, addr: SocketAddr) -> io::Result<Wire> {
        #[cfg(feature = "tls")]
        if let Some(config) = TRUSTED.lock().unwrap().get(&addr).cloned() {
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let conn = rustls::ClientConnection::new(config, name).map_err(io::Error::other)?;
            return Ok(Wire::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))));
        }
        let _ = addr;
        Ok(Wire::Plain(tcp))
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Wire::Plain(tcp) => tcp.read(buf),
            #[cfg(feature = "tls")]
            Wire::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Wire::Plain(tcp) => tcp.write(buf),
            #[cfg(feature = "tls")]
            Wire::Tls(tls) => tls.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Wire::Plain(tcp) => tcp.flush(),
            #[cfg(feature = "tls")]
            Wire::Tls(tls) => tls.flush(),
        }
    }
}

/// The servers of this test process that speak TLS, and how to trust each.
#[cfg(feature = "tls")]
static TRUSTED: Trusted = std::sync::LazyLock::new(Default::default);

#[cfg(feature = "tls")]
type Trusted = std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<SocketAddr, std::sync::Arc<rustls::ClientConfig>>>,
>;

/// From now on, clients of `addr` speak TLS and trust the CA in `ca_pem`.
#[cfg(feature = "tls")]
pub fn trust(addr: SocketAddr, ca_pem: &[u8]) {
    TRUSTED.lock().unwrap().insert(addr, client_config(ca_pem));
}

/// Clients of `addr` speak plain TCP again (its server is gone).
#[cfg(feature = "tls")]
pub fn distrust(addr: SocketAddr) {
    TRUSTED.lock().unwrap().remove(&addr);
}

/// A rustls client that trusts only the CA in `ca_pem`.
#[cfg(feature = "tls")]
pub fn client_config(ca_pem: &[u8]) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    std::sync::Arc::new(config)
}
