//! A subscription over TLS (`rediss://`): the TLS session that the plain
//! subscription's reads and writes go through instead of the socket.
//!
//! **Why this is simple here.** A client's WebSocket is read by one thread
//! and written by another, and a TLS session — one state machine for both
//! directions — has to be split between them (the server's side of TLS). A
//! subscription is read *and* written by one thread, its listener (it
//! writes `SUBSCRIBE` and the odd `PING`, then reads): rustls's own
//! [`StreamOwned`] (a session and its socket, as `Read + Write`) is all it
//! needs, with no lock.
//!
//! **What stays as it was.** The socket is still the raw `TcpStream`
//! behind an `Arc`: shutting it down from another thread (a canceller, the
//! heartbeat, the failover watcher) still wakes a read blocked in it, which
//! returns the end of the stream — without TLS's `close_notify`, an error,
//! as a loss should be. Timeouts and keepalive are the socket's, as before.
//!
//! **What changes.** TLS decrypts a whole record (up to 16 KiB) at a time,
//! so bytes can wait in the session after the subscription's buffer is
//! full: [`TlsWire::holds_plaintext`] counts them as already here. And the
//! handshake, which the plain path has no need of, is bounded by the
//! connect timeout as a whole ([`TlsWire::handshake`]): a port that accepts
//! and never answers, or answers a byte at a time, fails in that time.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use crate::net::SharedStream;

/// A TLS session with Redis over a shared socket.
pub(super) struct TlsWire(StreamOwned<ClientConnection, SharedStream>);

impl TlsWire {
    /// Makes a TLS session with `host` on `stream`, its certificate checked
    /// as `config` says, within `timeout` in all. The socket's read timeout
    /// is cleared again after (as a plain connection's is never set).
    pub(super) fn handshake(
        stream: &Arc<TcpStream>,
        host: &str,
        port: u16,
        config: &Arc<ClientConfig>,
        timeout: Duration,
    ) -> io::Result<TlsWire> {
        let failed = |e: &dyn std::fmt::Display| {
            io::Error::other(format!("TLS handshake with {host}:{port} failed: {e}"))
        };
        let name = ServerName::try_from(host.to_owned()).map_err(|e| failed(&e))?;
        let session = ClientConnection::new(Arc::clone(config), name).map_err(|e| failed(&e))?;
        let mut tls = StreamOwned::new(session, SharedStream(Arc::clone(stream)));
        let deadline = Instant::now() + timeout;
        while tls.conn.is_handshaking() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "TLS handshake with {host}:{port} took longer than {timeout:?} \
                         (is it a TLS port?)"
                    ),
                ));
            }
            stream.set_read_timeout(Some(left))?;
            stream.set_write_timeout(Some(left))?;
            match tls.conn.complete_io(&mut tls.sock) {
                Ok(_) => {}
                // Timed out: the loop says so, once the deadline has passed.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    // What rustls says of bytes that are not TLS.
                    return Err(failed(&format!("{e} (is it a TLS port?)")));
                }
                Err(e) => return Err(failed(&e)),
            }
        }
        stream.set_read_timeout(None)?;
        // Full, or resumed from an earlier session (the shared
        // configuration keeps their tickets).
        log::trace!(
            "TLS with Redis at {host}:{port}: {:?} handshake",
            tls.conn.handshake_kind()
        );
        Ok(TlsWire(tls))
    }

    /// Whether decrypted bytes wait in the session, not yet read: a read
    /// returns them without touching the socket.
    pub(super) fn holds_plaintext(&self) -> bool {
        // rustls wants to read the socket only when it holds no plaintext.
        !self.0.conn.wants_read()
    }
}

impl Read for TlsWire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for TlsWire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::thread;
    use std::time::Duration;

    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    use super::super::{BUFFER, PubSubConnection, Push, Waited};
    use crate::broker::redis::link::Link;
    use crate::config::{RedisTarget, RedisTls, RedisTlsArgs};

    /// A CA of its own, a certificate it signed for `localhost` (with its
    /// key), and the CA's PEM written to a file for `--redis-ca`.
    struct Pki {
        cert: rustls::pki_types::CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
        ca_file: std::path::PathBuf,
    }

    impl Pki {
        fn new() -> Pki {
            let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
            ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec!["localhost".to_owned()])
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            let ca_file = std::env::temp_dir().join(format!(
                "threadchat-pubsub-ca-{}-{:x}.pem",
                std::process::id(),
                crate::broker::random_u64()
            ));
            std::fs::write(&ca_file, ca.pem()).unwrap();
            Pki {
                cert: cert.der().clone(),
                key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
                ca_file,
            }
        }

        /// What threadchat would make of `--redis rediss://… --redis-ca`.
        fn link(&self, url: &str) -> Link {
            let args = RedisTlsArgs {
                redis_ca: Some(self.ca_file.clone()),
                ..RedisTlsArgs::default()
            };
            Link::new(&RedisTarget::Server {
                url: url.to_owned(),
                tls: Some(RedisTls::load(&args).unwrap()),
            })
        }

        fn server_config(&self) -> std::sync::Arc<rustls::ServerConfig> {
            let provider = crate::tls::provider();
            let config = rustls::ServerConfig::builder_with_provider(provider.into())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![self.cert.clone()], self.key.clone_key())
                .unwrap();
            std::sync::Arc::new(config)
        }
    }

    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.ca_file);
        }
    }

    fn connect(
        port: u16,
        pki: &Pki,
        timeout: Duration,
    ) -> std::io::Result<(PubSubConnection, std::sync::Arc<std::net::TcpStream>)> {
        let url = format!("rediss://localhost:{port}");
        let info = redis::IntoConnectionInfo::into_connection_info(url.as_str()).unwrap();
        PubSubConnection::connect(&info, &pki.link(&url), timeout, 64 * 1024)
    }

    /// A port that accepts and never answers: the handshake gives up when
    /// the connect timeout is spent, and says what it suspects.
    #[test]
    fn a_silent_port_fails_the_handshake_in_time() {
        let pki = Pki::new();
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let error = connect(port, &pki, Duration::from_millis(300))
            .err()
            .unwrap();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
        assert!(error.to_string().contains("is it a TLS port?"), "{error}");
    }

    /// A port that answers in plain RESP: not TLS, said at once.
    #[test]
    fn a_plain_answer_is_not_tls() {
        let pki = Pki::new();
        let plain = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = plain.local_addr().unwrap().port();
        let peer = thread::spawn(move || {
            let (mut socket, _) = plain.accept().unwrap();
            let mut hello = [0; 512];
            let _ = socket.read(&mut hello);
            let _ = socket.write_all(b"-ERR unknown command\r\n");
        });
        let error = connect(port, &pki, Duration::from_secs(5)).err().unwrap();
        assert!(error.to_string().contains("is it a TLS port?"), "{error}");
        peer.join().unwrap();
    }

    /// Redis (scripted here, to put everything in one TLS record) sends a
    /// message that ends exactly where the subscription's buffer does, and
    /// a small one, together: after the first is read, the small one —
    /// decrypted, waiting in the TLS session, not in the buffer — counts as
    /// buffered; after it, nothing does. Then shutting the socket down
    /// wakes a read blocked in the TLS session.
    #[test]
    fn what_tls_decrypted_ahead_counts_as_buffered_and_shutdown_wakes() {
        let pki = Pki::new();
        let config = pki.server_config();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let redis = thread::spawn(move || {
            let (socket, _) = listener.accept().unwrap();
            let session = rustls::ServerConnection::new(config).unwrap();
            let mut tls = rustls::StreamOwned::new(session, socket);
            let mut command = [0; 256];
            let _ = tls.read(&mut command).unwrap(); // SUBSCRIBE ch
            let message = |payload: &str| {
                format!(
                    "*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n${}\r\n{payload}\r\n",
                    payload.len()
                )
            };
            let mut all = "*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n".to_owned();
            // The confirmation and the first message fill the buffer exactly.
            let first = (1..BUFFER)
                .map(|n| "x".repeat(n))
                .find(|payload| all.len() + message(payload).len() == BUFFER)
                .unwrap();
            all += &message(&first);
            all += &message("small");
            // One write: one TLS record (under 16 KiB).
            tls.write_all(all.as_bytes()).unwrap();
            // Hold the connection until the client shuts it down.
            let _ = tls.read(&mut command);
        });
        let (mut con, socket) = connect(port, &pki, Duration::from_secs(5)).unwrap();
        con.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        con.subscribe(&["ch"], false).unwrap();
        con.wait().unwrap();
        match con.next().unwrap() {
            Push::Message { payload, .. } => assert!(payload.len() > BUFFER - 100),
            other => panic!("{other:?}"),
        }
        assert!(con.has_buffered(), "the small message is already here");
        assert_eq!(con.wait().unwrap(), Waited::Buffered);
        assert_eq!(
            con.next().unwrap(),
            Push::Message {
                channel: b"ch".to_vec(),
                payload: b"small".to_vec()
            }
        );
        assert!(!con.has_buffered());

        con.set_read_timeout(None).unwrap();
        let waiting = thread::spawn(move || con.wait().map(|_| ()));
        thread::sleep(Duration::from_millis(100));
        socket.shutdown(std::net::Shutdown::Both).unwrap();
        assert!(waiting.join().unwrap().is_err(), "a shut-down read fails");
        redis.join().unwrap();
    }

    /// What a connection costs, plain and over TLS, against a real
    /// `redis-server` (TLS on one port, plain on another): the
    /// subscription's own path (connect, handshake with the shared
    /// configuration, `SUBSCRIBE` confirmed) and the `redis` crate's
    /// (`get_connection`, which builds a TLS configuration and reads the
    /// system's roots each time). A measurement, not a check:
    /// `cargo test --release --lib connection_costs -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement; run it by name with --ignored --nocapture"]
    fn connection_costs() {
        use std::process::{Command, Stdio};
        use std::time::Instant;

        let pki = Pki::new();
        let dir = pki.ca_file.with_extension("d");
        std::fs::create_dir_all(&dir).unwrap();
        let write_pem = |name: &str, label: &str, der: &[u8]| {
            use base64::Engine;
            let body = base64::engine::general_purpose::STANDARD.encode(der);
            let lines: Vec<&str> = body
                .as_bytes()
                .chunks(64)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect();
            let pem = format!(
                "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
                lines.join("\n")
            );
            std::fs::write(dir.join(name), pem).unwrap();
        };
        write_pem("server.pem", "CERTIFICATE", &pki.cert);
        write_pem("server.key", "PRIVATE KEY", pki.key.secret_der());
        let free = || {
            TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (plain_port, tls_port) = (free(), free());
        let file = |name: &str| dir.join(name).to_str().unwrap().to_owned();
        let mut redis = Command::new("redis-server")
            .args(["--port", &plain_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--tls-port", &tls_port.to_string()])
            .args(["--tls-cert-file", &file("server.pem")])
            .args(["--tls-key-file", &file("server.key")])
            .args(["--tls-auth-clients", "no"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        thread::sleep(Duration::from_millis(500));

        const N: u32 = 200;
        let plain_info = redis::IntoConnectionInfo::into_connection_info(format!(
            "redis://127.0.0.1:{plain_port}"
        ))
        .unwrap();
        let tls_url = format!("rediss://localhost:{tls_port}");
        let tls_info = redis::IntoConnectionInfo::into_connection_info(tls_url.as_str()).unwrap();
        let tls_link = pki.link(&tls_url);
        let subscribe = |info: &redis::ConnectionInfo, link: &dyn Fn() -> Link| {
            let started = Instant::now();
            for _ in 0..N {
                let (mut con, _) =
                    PubSubConnection::connect(info, &link(), Duration::from_secs(5), 1024).unwrap();
                con.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                con.subscribe(&["ch"], false).unwrap();
            }
            started.elapsed() / N
        };
        let plain = subscribe(&plain_info, &Link::default);
        // The configuration shared, as threadchat does: sessions resume.
        let tls = subscribe(&tls_info, &|| tls_link.clone());
        // A configuration made for each connection: every handshake full.
        let unshared = subscribe(&tls_info, &|| pki.link(&tls_url));
        let crate_connection = |client: &redis::Client| {
            let started = Instant::now();
            for _ in 0..N {
                let mut con = client.get_connection().unwrap();
                redis::cmd("PING").query::<String>(&mut con).unwrap();
            }
            started.elapsed() / N
        };
        let crate_plain = crate_connection(
            &Link::default()
                .open(&format!("redis://127.0.0.1:{plain_port}"))
                .unwrap(),
        );
        let crate_tls = crate_connection(&tls_link.open(&tls_url).unwrap());
        println!(
            "per connection, {N} in a row:\n\
             subscription (connect + SUBSCRIBE): plain {plain:?}, TLS {tls:?} \
             (a configuration each time: {unshared:?})\n\
             redis crate (connect + PING):       plain {crate_plain:?}, TLS {crate_tls:?}"
        );
        let _ = redis.kill();
        let _ = redis.wait();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
