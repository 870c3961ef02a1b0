//! Admission under attack: who gets in, and on what terms, when some
//! clients are hostile. Silent connections from several addresses, a
//! client's own `X-Forwarded-For` line, many connections sharing one
//! message budget, refusals that would flood the log, a trickled message,
//! DNS rebinding, and the page's security headers. (Other addresses are
//! 127.0.0.x: Linux routes all of 127/8 to this machine.)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::support::{Client, PATIENCE, Server};

/// A TCP connection to `server` from the local address `ip`.
fn from(server: &Server, ip: &str) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{ip}:0").parse().unwrap();
    socket.bind(&local.into()).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
}

/// Everything the server answers on `stream` until it closes.
fn answer(mut stream: &TcpStream) -> String {
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `request` sent from `ip`; the whole answer.
fn ask_from(server: &Server, ip: &str, request: &str) -> String {
    let mut stream = from(server, ip);
    stream.write_all(request.as_bytes()).unwrap();
    answer(&stream)
}

/// Silent connections from several addresses cannot keep another
/// address's `/healthz` from being answered: each address may hold only
/// `--max-starting-per-ip` connections in their start (the next ones get
/// 503, after a second's wait that keeps them from reconnecting at once),
/// and once half of the start places are taken, new
/// connections get a short head timeout (408 after 1 s, not the 60 s
/// configured), so the places come free.
#[test]
fn silent_starts_from_several_addresses_do_not_keep_others_out() {
    let server = Server::start(&[
        "--in-process",
        "--max-starting",
        "8",
        "--max-starting-per-ip",
        "2",
        "--handshake-timeout",
        "60",
    ]);
    let addresses = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"];
    // Opened in order, so accepted in order: 2 of each address start (the
    // first four with the full timeout, the next four pressed), the others
    // are refused, at least until the last address, which finds every
    // place taken and waits for one.
    let silent: Vec<Vec<TcpStream>> = addresses
        .iter()
        .map(|ip| (0..4).map(|_| from(&server, ip)).collect())
        .collect();
    for (ip, streams) in addresses[..3].iter().zip(&silent) {
        for stream in &streams[2..] {
            let refused = answer(stream);
            assert!(refused.starts_with("HTTP/1.1 503"), "{ip}: {refused}");
            assert!(refused.contains("still starting"), "{refused}");
        }
    }
    // Every start place is taken by a silent connection; another address
    // is still answered, because the pressed ones are cut after 1 s.
    let health = ask_from(
        &server,
        "127.0.0.9",
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n",
    );
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let pressed = answer(&silent[3][0]);
    assert!(pressed.starts_with("HTTP/1.1 408"), "{pressed}");
    assert!(
        server.metric("threadchat_connections_refused_total{reason=\"starting_per_address\"}") >= 6
    );
}

/// Behind a proxy that appends a header line of its own (HAProxy's
/// `option forwardfor`), the client's own `X-Forwarded-For` line is not
/// believed: the per-address cap applies to the address the proxy added.
#[test]
fn the_proxys_own_forwarded_line_counts() {
    let server = Server::start(&[
        "--in-process",
        "--max-connections-per-ip",
        "2",
        "--trusted-proxy",
        "127.0.0.1",
    ]);
    let mut spoofed = 0;
    let mut via = |ip: &str| {
        spoofed += 1;
        let lines = format!("X-Forwarded-For: 6.6.6.{spoofed}\r\nX-Forwarded-For: {ip}\r\n");
        server.raw_upgrade("/chat/x", &lines)
    };
    let _a = via("10.0.0.1").unwrap();
    let _b = via("10.0.0.1").unwrap();
    let refused = via("10.0.0.1").unwrap_err();
    assert!(refused.contains("503"), "{refused}");
    let _c = via("10.0.0.2").unwrap();
}

/// An IPv6 host holds a whole /64: forwarded addresses in one /64 are one
/// client for the new rooms it may create and the nicknames it may hold,
/// as for its connections; the next /64 is another client.
#[test]
fn an_ipv6_64_is_one_address_for_rooms_and_names() {
    let proxy = ["--in-process", "--trusted-proxy", "127.0.0.1"];
    let via = |server: &Server, ip: &str, path: &str| {
        server.raw_upgrade(path, &format!("X-Forwarded-For: {ip}\r\n"))
    };
    let rooms = Server::start(&[&proxy[..], &["--new-rooms-per-minute", "3"]].concat());
    let _held: Vec<TcpStream> = (1..=3)
        .map(|n| {
            via(
                &rooms,
                &format!("2001:db8:1:2::{n}"),
                &format!("/chat/r?room=new-{n}"),
            )
        })
        .collect::<Result<_, _>>()
        .unwrap();
    let refused = via(&rooms, "2001:db8:1:2::4", "/chat/r?room=new-4").unwrap_err();
    assert!(refused.contains("429"), "{refused}");
    let _other = via(&rooms, "2001:db8:1:3::4", "/chat/r?room=new-4").unwrap();

    let names = Server::start(
        &[
            &proxy[..],
            &["--unique-nicknames", "--max-nicknames-per-ip", "3"],
        ]
        .concat(),
    );
    let _held: Vec<TcpStream> = (1..=3)
        .map(|n| {
            via(
                &names,
                &format!("2001:db8:1:2::{n}"),
                &format!("/chat/n{n}"),
            )
        })
        .collect::<Result<_, _>>()
        .unwrap();
    let refused = via(&names, "2001:db8:1:2:abcd::4", "/chat/n4").unwrap_err();
    assert!(refused.contains("429"), "{refused}");
    let _other = via(&names, "2001:db8:1:3::4", "/chat/n4").unwrap();
}

/// All connections from one address share one message budget: two of them
/// together get the burst once, not twice; another address has its own.
#[test]
fn connections_from_one_address_share_one_budget() {
    // A token every 100 s: within the test, the burst is all there is.
    let server = Server::start(&["--in-process", "--rate-limit", "0.01", "--rate-burst", "4"]);
    let mut bob = Client::connect_from(server.addr, "127.0.0.2", "bob");
    bob.settle();
    let mut a1 = Client::connect_from(server.addr, "127.0.0.3", "a1");
    let mut a2 = Client::connect_from(server.addr, "127.0.0.3", "a2");
    // One after the other: the two connections' reader threads race.
    for (name, client) in [("a1", &mut a1), ("a2", &mut a2)] {
        for i in 0..2 {
            client.send(&format!("{name} {i}"));
            assert_eq!(bob.recv_chat().1, format!("{name} {i}"));
        }
    }
    a2.send("one too many");
    let error = a2.recv_type("error");
    assert!(error.to_string().contains("rate limit"), "{error}");
    let mut carol = Client::connect_from(server.addr, "127.0.0.4", "carol");
    carol.send("from elsewhere");
    assert_eq!(
        bob.recv_chat().1,
        "from elsewhere",
        "the fifth message of 127.0.0.3 was refused, 127.0.0.4's was not"
    );
}

/// Hundreds of refusals make a line or two in the log, and every one is
/// counted in `/metrics`.
#[test]
fn refusals_are_summed_up_in_the_log_and_all_counted() {
    let server = Server::start(&[
        "--in-process",
        "--max-connections-per-ip",
        "1",
        "--handshake-timeout",
        "60",
    ]);
    let _holder = from(&server, "127.0.0.2");
    // All at once: each refusal is answered a second after it is made.
    let refused: Vec<TcpStream> = (0..200).map(|_| from(&server, "127.0.0.2")).collect();
    for stream in &refused {
        let refused = answer(stream);
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    }
    assert_eq!(
        server.metric("threadchat_connections_refused_total{reason=\"per_address\"}"),
        200
    );
    let lines = server.log_count("(--max-connections-per-ip)");
    assert!((1..=2).contains(&lines), "{lines} log lines");
}

/// A client that trickles a frame is closed with the message timeout's
/// reason, even when the idle timeout is shorter: it is sending, not
/// silent.
#[test]
fn a_trickled_message_is_closed_with_its_own_reason() {
    let server = Server::start(&[
        "--in-process",
        "--message-timeout",
        "1.5",
        "--ping-interval",
        "0.3",
        "--idle-timeout",
        "0.6",
    ]);
    let mut stream = server.raw_upgrade("/chat/trickle", "").unwrap();
    let mut writer = stream.try_clone().unwrap();
    // A masked text frame announcing 100 bytes, a byte every 100 ms.
    let trickle = std::thread::spawn(move || {
        let mut frame = vec![0x81, 0x80 | 100, 1, 2, 3, 4];
        frame.extend_from_slice(&[b'a'; 100]);
        let started = Instant::now();
        for byte in frame.chunks(1) {
            if started.elapsed() > PATIENCE || writer.write_all(byte).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let (code, reason) = read_close(&mut stream).expect("a close frame");
    assert_eq!(code, 1008);
    assert!(reason.contains("message not finished"), "{reason}");
    trickle.join().unwrap();
}

/// The code and reason of the server's close frame, skipping the frames
/// before it. (Read by hand: a WebSocket client would answer pings in the
/// middle of the trickled frame.)
fn read_close(stream: &mut TcpStream) -> Option<(u16, String)> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // Server frames are not masked: [op, len, (ext len), payload…].
        let mut at = 0;
        while at + 2 <= bytes.len() {
            let (header, len) = match bytes[at + 1] & 0x7f {
                126 if at + 4 <= bytes.len() => (
                    4,
                    usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]])),
                ),
                126 | 127 => break,
                n => (2, usize::from(n)),
            };
            if at + header + len > bytes.len() {
                break;
            }
            let payload = &bytes[at + header..at + header + len];
            if bytes[at] & 0x0f == 8 && len >= 2 {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                return Some((code, String::from_utf8_lossy(&payload[2..]).into_owned()));
            }
            at += header + len;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
        }
    }
}

/// DNS rebinding: a page or upgrade asked for under a name the server does
/// not answer to gets 421; IP literals, `localhost` and `--allowed-host`
/// names (or `THREADCHAT_ALLOWED_HOSTS`) pass; `/healthz` answers any Host.
#[test]
fn only_hosts_the_server_answers_to_are_served() {
    let server = Server::start_with_env(
        &["--in-process", "--allowed-host", "chat.example"],
        &[("THREADCHAT_ALLOWED_HOSTS", "ignored.example")],
    );
    let get = |path: &str, host: &str| {
        server.http(&format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"))
    };
    let port = server.addr.port();
    for path in ["/", "/metrics", "/members"] {
        let (status, body) = get(path, &format!("evil.example:{port}"));
        assert_eq!(status, "HTTP/1.1 421 Misdirected Request", "{path}");
        assert!(body.contains("--allowed-host evil.example"), "{body}");
    }
    let upgrade = format!(
        "GET /chat/alice HTTP/1.1\r\nHost: evil.example:{port}\r\nOrigin: http://evil.example:{port}\r\n\
         Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    assert!(server.http(&upgrade).0.contains("421"));
    assert_eq!(get("/healthz", "evil.example").0, "HTTP/1.1 200 OK");
    for host in [
        server.addr.to_string(),
        "127.0.0.1".into(),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        "chat.example".into(),
    ] {
        assert_eq!(get("/", &host).0, "HTTP/1.1 200 OK", "{host}");
    }
    assert!(get("/", "ignored.example").0.contains("421"));
    // The command line wins over the environment, as for every option;
    // alone, the environment's list counts.
    drop(server);
    let server = Server::start_with_env(
        &["--in-process"],
        &[("THREADCHAT_ALLOWED_HOSTS", "a.example,b.example")],
    );
    let (status, _) = server.http("GET / HTTP/1.1\r\nHost: b.example\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
}

/// A request with two `Host` lines is refused with 400 (RFC 9112: which
/// one counts is anyone's guess), whichever comes first and whatever the
/// request; one `Host` line is served as usual.
#[test]
fn two_host_lines_are_a_bad_request() {
    let server = Server::start(&["--in-process"]);
    for (first, second) in [("127.0.0.1", "evil.example"), ("evil.example", "127.0.0.1")] {
        let upgrade = server.raw_upgrade("/chat/alice", &format!("Host: {second}\r\n"));
        let refused = upgrade.expect_err("an upgrade with two Host lines");
        assert!(refused.contains("400"), "{refused}");
        let (status, body) = server.http(&format!(
            "GET / HTTP/1.1\r\nHost: {first}\r\nHost: {second}\r\n\r\n"
        ));
        assert_eq!(status, "HTTP/1.1 400 Bad Request", "{first}, {second}");
        assert!(body.contains("one Host header"), "{body}");
    }
    server.settled("alice");
}

/// The page says what it may do: nothing but its own script and style and
/// connections to its own origin, never inside a frame.
#[test]
fn the_page_is_served_with_security_headers() {
    let server = Server::in_process();
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(stream, "GET / HTTP/1.1\r\nHost: {}\r\n\r\n", server.addr).unwrap();
    let response = answer(&stream);
    let head = response
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .to_ascii_lowercase();
    let csp = head
        .lines()
        .find_map(|l| l.strip_prefix("content-security-policy: "))
        .unwrap_or_else(|| panic!("no CSP in {head}"));
    for directive in [
        "default-src 'none'",
        "script-src 'sha256-",
        "style-src 'sha256-",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} in {csp}");
    }
    for header in [
        "x-frame-options: deny",
        "x-content-type-options: nosniff",
        "referrer-policy: no-referrer",
    ] {
        assert!(head.contains(header), "{header} in {head}");
    }
}
