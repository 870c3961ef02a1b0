//! The load generator's TLS (`--tls`): what `wss://` costs the server.
//!
//! Two parts, both as small as the measurement allows:
//!
//! * [`Certs`] — a CA and a server certificate it signed, made at start
//!   (rcgen) in a temporary directory, so the server is started with
//!   `--tls-cert`/`--tls-key` and the clients trust only that CA: the same
//!   chain of trust as in production, without a key committed anywhere.
//! * [`Stream`] — what a bench client's WebSocket runs on: a plain socket,
//!   or a rustls client session over one. A session is one state machine
//!   for both directions, and a sending client has two users at once (its
//!   sender thread writes, a receiver thread reads), so the session sits
//!   behind a `Mutex` that is never held across a wait: once the socket
//!   is non-blocking, reading is `read_tls` → `process_new_packets` →
//!   `reader()` until the socket says `WouldBlock`, and writing is
//!   `writer()` → `write_tls` until it does. The receivers' `epoll` design
//!   is unchanged: they wait on the raw socket and drain the session.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore};

/// A CA, the server certificate it signed (for `127.0.0.1`), and the client
/// configuration that trusts the CA. The files are removed on drop.
pub(crate) struct Certs {
    dir: PathBuf,
    /// What every client connects with (shared: building it parses the CA).
    pub(crate) client: Arc<ClientConfig>,
}

impl Certs {
    /// Makes a fresh CA and server certificate (ECDSA P-256, rcgen's
    /// default: what a certificate authority issues most today).
    pub(crate) fn new() -> anyhow::Result<Certs> {
        let dir = std::env::temp_dir().join(format!("loadgen-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;

        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "threadchat bench CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;

        let mut server = CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
        server
            .distinguished_name
            .push(DnType::CommonName, "threadchat bench");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = server.signed_by(&key, &ca)?;
        std::fs::write(dir.join("server.pem"), cert.pem())?;
        std::fs::write(dir.join("server.key"), key.serialize_pem())?;

        let mut roots = RootCertStore::empty();
        roots.add(ca.der().clone())?;
        let mut client = ClientConfig::builder_with_provider(Arc::new(provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Every connection a full handshake, as in a storm of first visits
        // or after a restart (the server forgets its sessions): resuming a
        // session the server remembers would skip the certificate and its
        // signature, and the bench's clients would resume each other's.
        client.resumption = rustls::client::Resumption::disabled();
        Ok(Certs {
            dir,
            client: Arc::new(client),
        })
    }

    /// The server's options: `--tls-cert FILE --tls-key FILE`.
    pub(crate) fn server_args(&self) -> Vec<String> {
        let path = |name: &str| self.dir.join(name).to_string_lossy().into_owned();
        vec![
            "--tls-cert".into(),
            path("server.pem"),
            "--tls-key".into(),
            path("server.key"),
        ]
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The cryptography: *ring*, as the server uses (see `src/tls/mod.rs`).
#[allow(deprecated)]
fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// A bench client's byte stream: plain, or TLS (see the module doc).
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(TlsStream),
}

impl Stream {
    /// Connects over `tcp` (blocking), running the TLS handshake first when
    /// `tls` is given.
    pub(crate) fn connect(tcp: TcpStream, tls: Option<&Arc<ClientConfig>>) -> anyhow::Result<Self> {
        let Some(config) = tls else {
            return Ok(Stream::Plain(tcp));
        };
        let name = ServerName::try_from("127.0.0.1")?;
        let mut conn = ClientConnection::new(Arc::clone(config), name)?;
        let mut socket = &tcp;
        while conn.is_handshaking() {
            conn.complete_io(&mut socket).context("TLS handshake")?;
        }
        Ok(Stream::Tls(TlsStream {
            session: Arc::new(Mutex::new(conn)),
            tcp,
        }))
    }

    /// The socket under the stream (for timeouts, non-blocking, `epoll`).
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => &tls.tcp,
        }
    }

    /// A second handle on the same connection, for a sender thread (the TLS
    /// session is shared, not copied: see the module doc).
    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Plain(tcp) => Stream::Plain(tcp.try_clone()?),
            Stream::Tls(tls) => Stream::Tls(TlsStream {
                session: Arc::clone(&tls.session),
                tcp: tls.tcp.try_clone()?,
            }),
        })
    }
}

/// A rustls client session and its socket.
pub(crate) struct TlsStream {
    session: Arc<Mutex<ClientConnection>>,
    tcp: TcpStream,
}

impl TlsStream {
    fn lock(&self) -> MutexGuard<'_, ClientConnection> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Hands queued records to the socket until none is left (`Ok`) or the
/// socket is full (`WouldBlock`, on a non-blocking socket).
fn send_queued(conn: &mut ClientConnection, mut tcp: &TcpStream) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(&mut tcp)?;
    }
    Ok(())
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let tls = match self {
            Stream::Plain(tcp) => return tcp.read(buf),
            Stream::Tls(tls) => tls,
        };
        let mut conn = tls.lock();
        loop {
            match conn.reader().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The server closed without a close_notify: an ordinary
                // end for a WebSocket, whose close frame says the rest.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                done => return done,
            }
            // Nothing decrypted is waiting: more records from the socket
            // (`WouldBlock` ends the drain of a non-blocking one).
            if conn.read_tls(&mut &tls.tcp)? == 0 {
                return Ok(0);
            }
            let processed = conn.process_new_packets();
            // An alert or a key update's answer: out with the next write if
            // the socket cannot take it now.
            let _ = send_queued(&mut conn, &tls.tcp);
            processed.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
    }
}

impl Write for Stream {
    /// Takes new plaintext only once earlier records are out, so a sender
    /// that outruns the server waits (`WouldBlock`) instead of queueing
    /// without bound in the session.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let tls = match self {
            Stream::Plain(tcp) => return tcp.write(buf),
            Stream::Tls(tls) => tls,
        };
        let mut conn = tls.lock();
        send_queued(&mut conn, &tls.tcp)?;
        let n = conn.writer().write(buf)?;
        match send_queued(&mut conn, &tls.tcp) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(n),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(tcp) => tcp.flush(),
            Stream::Tls(tls) => send_queued(&mut tls.lock(), &tls.tcp),
        }
    }
}
