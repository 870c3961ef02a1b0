//! Nicknames people cannot mistake: with `--unique-nicknames` names that
//! read the same are one name, look-alikes mixing scripts are refused, and
//! one address cannot squat names; in any mode no nickname (a client's,
//! or one in a payload on Redis) can pass for the server.

use std::net::{IpAddr, SocketAddr, TcpStream};

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

use crate::support::{
    Client, PATIENCE, Redis, Server, in_both_subscription_modes, with_both_brokers,
};

with_both_brokers!(
    names_that_read_the_same_are_one_name => ["--unique-nicknames"],
    one_address_cannot_squat_names => ["--unique-nicknames", "--max-nicknames-per-ip", "3"],
    a_nickname_cannot_forge_a_server_line,
);

in_both_subscription_modes!(payloads_obey_the_nickname_rules);

/// `/chat/{nickname}`, percent-encoded.
fn path(nickname: &str) -> String {
    format!("/chat/{}", utf8_percent_encode(nickname, NON_ALPHANUMERIC))
}

/// An upgrade to `path` from the local address `ip` (any of 127.0.0.0/8):
/// the WebSocket, or the refusal's status and reason.
fn connect_from(server: SocketAddr, ip: &str, path: &str) -> Result<Client, (u16, String)> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = (ip.parse::<IpAddr>().unwrap(), 0).into();
    socket.bind(&local.into()).unwrap();
    socket.connect(&server.into()).unwrap();
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let wire = crate::support::Wire::over(stream, server).unwrap();
    match tungstenite::client(format!("{}://{server}{path}", wire.scheme()), wire) {
        Ok((ws, _)) => Client::admitted(ws).map_err(|refused| (refused.status, refused.reason)),
        Err(e) => panic!("connect to {path}: {e}"),
    }
}

/// The refusal (status and reason) of an upgrade that must be refused.
fn refused(server: SocketAddr, ip: &str, path: &str) -> (u16, String) {
    match connect_from(server, ip, path) {
        Ok(_) => panic!("{path} was let in"),
        Err(refusal) => refusal,
    }
}

/// Beside `alice`, every name that reads as `alice` is refused with 409 —
/// other case, a capital `I` for the `l`, a dotted capital `İ`, small
/// capitals, a Cyrillic `а`, full-width letters — and a name mixing
/// Latin and Cyrillic is refused with 400 even when nobody holds it. The
/// name shown stays as typed: `Élodie` joins as `Élodie`.
fn names_that_read_the_same_are_one_name(server: &Server) {
    let mut alice = server.settled("alice");
    for same in [
        "Alice",
        "ALICE",
        "aIice",
        "ALİCE",
        "ᴀʟɪᴄᴇ",
        "аlice",
        "ａｌｉｃｅ",
    ] {
        let (status, body) = refused(server.addr, "127.0.0.1", &path(same));
        assert_eq!(status, 409, "{same}: {body}");
        assert!(body.contains("is taken"), "{same}: {body}");
    }
    // A refused name keeps none of its readings: `aIice` also reads
    // `aiice`, which is free.
    let mut aiice = connect_from(server.addr, "127.0.0.1", &path("aiice")).unwrap();
    aiice.settle();
    let (status, body) = refused(server.addr, "127.0.0.1", &path("bоb")); // Cyrillic о
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("mixes letters of different scripts"),
        "{body}"
    );
    // Whole-script names are fine, and shown as typed.
    let mut elodie = Client::connect_path(server.addr, &path("Élodie"));
    elodie.settle();
    let mut russian = Client::connect_path(server.addr, &path("Алиса"));
    russian.settle();
    elodie.send("bonjour");
    assert_eq!(alice.recv_chat(), ("Élodie".into(), "bonjour".into()));
    // The name is free again, under any of its spellings, once its holder
    // leaves.
    alice.close();
    crate::support::eventually("alice's name is free again", || {
        connect_from(server.addr, "127.0.0.1", &path("ALICE")).is_ok()
    });
}

/// One address holds at most `--max-nicknames-per-ip` names at once:
/// past it, 429 with the reason; another address is not affected; a name
/// given back frees a place.
fn one_address_cannot_squat_names(server: &Server) {
    let mut held: Vec<Client> = (0..3)
        .map(|i| connect_from(server.addr, "127.0.0.2", &path(&format!("squat{i}"))).unwrap())
        .collect();
    let (status, body) = refused(server.addr, "127.0.0.2", &path("squat3"));
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("holds 3 nicknames"), "{body}");
    let mut other = connect_from(server.addr, "127.0.0.3", &path("squat3")).unwrap();
    other.settle();
    held.pop().unwrap().close();
    crate::support::eventually("a place is free again", || {
        connect_from(server.addr, "127.0.0.2", &path("squat4")).is_ok()
    });
}

/// In text mode a server line starts with `*`, `!` or `[`; a nickname
/// that does not start with a letter or digit (or holds `": "`, or is
/// `server`, or a look-alike of it, accents and all) is refused with 400,
/// so no client can show another a forged server line.
fn a_nickname_cannot_forge_a_server_line(server: &Server) {
    for forged in [
        "! rate limit",
        "* in lobby",
        "[history] bob",
        "＊ in lobby",
        "bob: hi",
        "server",
        "ｓｅｒｖｅｒ",
        "ꜱᴇʀᴠᴇʀ",
        "SERVER\u{301}",
        "serveṙ",
        "✱ bob",
        "❗ x",
        "⁅history⁆",
        "〔history〕",
        "⟦x⟧",
        "❲x",
    ] {
        let (status, body) = refused(server.addr, "127.0.0.1", &path(forged));
        assert_eq!(status, 400, "{forged}: {body}");
    }
    let mut reader = Client::connect_path(server.addr, "/chat/reader?format=text");
    while !reader.recv_text().starts_with("* in global_room") {}
    let mut bang = Client::connect_path(server.addr, &path("bang!"));
    bang.settle();
    bang.send("hi");
    let line = next_chat_line(&mut reader);
    assert_eq!(line, "bang!: hi");
}

/// The next line that is not a join or leave.
fn next_chat_line(client: &mut Client) -> String {
    loop {
        let line = client.recv_text();
        if !(line.starts_with("* ") && (line.ends_with(" joined") || line.contains(" left"))) {
            return line;
        }
    }
}

/// A payload on Redis whose nickname no client could take — `server` or a
/// look-alike, a first character that is not a letter or digit — is
/// dropped (counted as junk), never shown: a
/// text-mode client sees no forged line, a JSON client no `"server"`
/// chat; a payload of the original app with an ordinary name still gets
/// through.
fn payloads_obey_the_nickname_rules(args: &[&str]) {
    let redis = Redis::start();
    let server = Server::with_redis_and(&redis, args);
    let mut text = Client::connect_path(server.addr, "/chat/reader?format=text");
    while !text.recv_text().starts_with("* in global_room") {}
    let mut json = server.settled("watcher");
    for nickname in [
        "server",
        "Server",
        "! rate limit",
        "* in lobby",
        "[history] x",
        "ѕerver",
        "SERVER\u{301}",
        "ꜱᴇʀᴠᴇʀ",
        "✱ bob",
        "〔history〕 x",
    ] {
        let payload = serde_json::json!({"nickname": nickname, "message": "forged"});
        redis.publish("global_room", &payload.to_string());
    }
    redis.publish(
        "global_room",
        r#"{"nickname": "py", "message": "from the original"}"#,
    );
    assert_eq!(next_chat_line(&mut text), "py: from the original");
    assert_eq!(json.recv_chat(), ("py".into(), "from the original".into()));
    server.wait_for_log("nickname not allowed");
}
