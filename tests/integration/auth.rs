//! Opt-in token authentication: a token (a JWT signed with the configured
//! key) says who the client is; without a valid one the upgrade and
//! `/members` are refused, with a reason.

use std::path::PathBuf;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::support::{Client, Server, over_ws_and_wss};

const SECRET: &str = "0123456789abcdef0123456789abcdef";

/// A file holding the HMAC secret, for `--auth-secret-file`: one per call,
/// so that no test rewrites a file another's server is reading.
fn secret_file() -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "threadchat-test-secret-{}-{}",
        std::process::id(),
        crate::support::free_port()
    ));
    std::fs::write(&path, format!("{SECRET}\n")).unwrap();
    path
}

fn key(name: &str) -> String {
    format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A server that requires HMAC-signed tokens.
fn hmac_server() -> Server {
    hmac_server_with(&[])
}

/// The same, with extra options (a certificate, for `wss://`).
fn hmac_server_with(extra: &[&str]) -> Server {
    let file = secret_file();
    let mut args = vec!["--in-process", "--auth-secret-file", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    Server::start(&args)
}

over_ws_and_wss!(
    a_valid_token_in_the_query_or_a_header_lets_its_holder_chat,
    invalid_tokens_are_refused_with_401_and_a_reason,
    an_expiring_token_closes_its_connection_unless_refreshed,
);

/// `threadchat token …` with the test secret: what a person would run.
fn token_from_cli(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_threadchat"))
        .arg("token")
        .args(args)
        .env("THREADCHAT_AUTH_SECRET", SECRET)
        .env_remove("THREADCHAT_AUTH_SECRET_FILE")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// `threadchat token` takes the key and claim options on either side of
/// the subcommand: `threadchat token alice --auth-secret-file F` works as
/// a person would type it, and so does the order the server's own flags
/// come in.
#[test]
fn token_takes_its_options_before_or_after_the_subcommand() {
    let secret = secret_file();
    let secret = secret.to_str().unwrap();
    let mint = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_threadchat"))
            .args(args)
            .env_remove("THREADCHAT_AUTH_SECRET")
            .env_remove("THREADCHAT_AUTH_SECRET_FILE")
            .output()
            .unwrap();
        assert!(output.status.success(), "{args:?}: {output:?}");
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    };
    for args in [
        vec![
            "token",
            "alice",
            "--auth-secret-file",
            secret,
            "--auth-issuer",
            "us",
        ],
        vec![
            "--auth-secret-file",
            secret,
            "--auth-issuer",
            "us",
            "token",
            "alice",
        ],
    ] {
        let token = mint(&args);
        let mut validation = jsonwebtoken::Validation::new(Algorithm::HS256);
        validation.set_issuer(&["us"]);
        let key = jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()).unwrap();
        let claims = jsonwebtoken::decode::<serde_json::Value>(&token, &key, &validation)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .claims;
        assert_eq!(claims["sub"], "alice", "{args:?}");
    }
}

/// A token with these claims, signed with the test secret.
fn hmac_token(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// An upgrade to `path` with `extra` headers that must be refused: the
/// status (4000 less the close code) and the reason.
fn upgrade(server: &Server, path: &str, extra: &str) -> (u16, String) {
    let refused = server
        .refusal(path, extra)
        .unwrap_or_else(|| panic!("{path} was let in"));
    (refused.status, refused.reason)
}

/// The same token works in the query (browsers) and in a header (websocat
/// `-H`), and the two clients chat.
fn a_valid_token_in_the_query_or_a_header_lets_its_holder_chat(extra: &[&str]) {
    let server = hmac_server_with(extra);
    let alice = token_from_cli(&["alice"]);
    let mut alice = Client::connect_path(server.addr, &format!("/chat/alice?token={alice}"));
    alice.settle();
    let bob = token_from_cli(&["bob"]);
    let header = format!("Authorization: Bearer {bob}\r\n");
    assert_eq!(server.refusal("/chat/bob", &header), None);
    let mut bob = Client::connect_path(server.addr, &format!("/chat/bob?token={bob}"));
    bob.settle();
    alice.send("hello, verified bob");
    assert_eq!(
        bob.recv_chat(),
        ("alice".to_owned(), "hello, verified bob".to_owned())
    );
}

/// Every way a token can be wrong is a 401 with its reason, and no
/// WebSocket.
fn invalid_tokens_are_refused_with_401_and_a_reason(extra: &[&str]) {
    let server = hmac_server_with(extra);
    let valid = token_from_cli(&["alice"]);
    let mut parts: Vec<String> = valid.split('.').map(str::to_owned).collect();
    // Another payload under alice's signature.
    let forged = hmac_token(json!({"sub": "mallory", "exp": now() + 60}));
    parts[1] = forged.split('.').nth(1).unwrap().to_owned();
    let tampered = parts.join(".");
    let other_key = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "alice", "exp": now() + 60}),
        &EncodingKey::from_secret(b"another secret, also 32 bytes long").unwrap(),
    )
    .unwrap();
    let unsigned = format!(
        "{}.{}.",
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0", // {"alg":"none","typ":"JWT"}
        forged.split('.').nth(1).unwrap()
    );
    let cases = [
        (String::new(), "a token is required"),
        (
            hmac_token(json!({"sub": "alice", "exp": now() - 3600})),
            "expired",
        ),
        (
            hmac_token(json!({"sub": "alice", "exp": now() + 3600, "nbf": now() + 600})),
            "not valid yet",
        ),
        (other_key, "signature"),
        (tampered, "signature"),
        (unsigned, "token"),
        ("garbage".to_owned(), "malformed"),
    ];
    let refused = cases.len() as u64;
    for (token, reason) in cases {
        let path = if token.is_empty() {
            "/chat/alice".to_owned()
        } else {
            format!("/chat/alice?token={token}")
        };
        let (status, body) = upgrade(&server, &path, "");
        assert!(status == 401, "{token}: {status}");
        assert!(body.contains(reason), "{token}: {body}");
    }
    // An operator sees them: counted, and summed up in the log.
    let metric = r#"threadchat_connections_refused_total{reason="token"}"#;
    assert_eq!(server.metric(metric), refused);
    let line = server.wait_for_log("no valid token");
    assert!(line.contains("refused 127.0.0.1:"), "{line}");
}

/// With a public key, only tokens signed with its private half pass: an
/// HMAC token "signed" with the public key (which anyone can read) is
/// refused — the algorithm is the key's, never the token's.
#[test]
fn a_public_key_takes_only_its_own_algorithm() {
    for (public, private) in [
        ("rsa.pub.pem", "rsa.pem"),
        ("ed25519.pub.pem", "ed25519.pem"),
    ] {
        let server = Server::start(&["--in-process", "--auth-public-key", &key(public)]);
        let output = Command::new(env!("CARGO_BIN_EXE_threadchat"))
            .args(["token", "alice", "--private-key", &key(private)])
            .output()
            .unwrap();
        let signed = String::from_utf8(output.stdout).unwrap().trim().to_owned();
        let mut alice = Client::connect_path(server.addr, &format!("/chat/alice?token={signed}"));
        alice.settle();

        let public_pem = std::fs::read(key(public)).unwrap();
        let confused = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "alice", "exp": now() + 60}),
            &EncodingKey::from_secret(&public_pem).unwrap(),
        )
        .unwrap();
        let (status, body) = upgrade(&server, &format!("/chat/alice?token={confused}"), "");
        assert!(status == 401, "{status}");
        assert!(body.contains("algorithm"), "{body}");
    }
}

/// The token decides who you are: another nickname in the path is
/// refused, not replaced; a `rooms` claim limits where the token goes.
#[test]
fn the_token_decides_the_nickname_and_the_rooms() {
    let server = hmac_server();
    let alice = token_from_cli(&["alice", "--room", "lobby"]);
    let (status, body) = upgrade(
        &server,
        &format!("/chat/mallory?room=lobby&token={alice}"),
        "",
    );
    assert!(status == 403, "{status}");
    assert!(body.contains("for \"alice\""), "{body}");
    let (status, body) = upgrade(
        &server,
        &format!("/chat/alice?room=kitchen&token={alice}"),
        "",
    );
    assert!(status == 403, "{status}");
    assert!(body.contains("does not allow room \"kitchen\""), "{body}");
    let mut ok = Client::connect_path(
        server.addr,
        &format!("/chat/alice?room=lobby&token={alice}"),
    );
    ok.settle();
}

/// With tokens, the start-up line's terminal command carries one: a bare
/// websocat line would only be refused.
#[test]
fn the_start_up_hint_says_a_token_is_needed() {
    let server = hmac_server();
    let line = server.wait_for_log("chat from a terminal");
    assert!(line.contains("?token=$(threadchat token alice"), "{line}");
}

/// `/members` needs a token too (and one that allows the room).
#[test]
fn members_needs_a_token() {
    let server = hmac_server();
    let alice = token_from_cli(&["alice"]);
    let mut client = Client::connect_path(server.addr, &format!("/chat/alice?token={alice}"));
    client.settle();
    let (status, body) = server.get("/members");
    assert!(status.contains(" 401 "), "{status}");
    assert!(body.contains("a token is required"), "{body}");
    let (status, body) = server.get(&format!("/members?token={alice}"));
    assert!(status.contains(" 200 "), "{status}");
    assert!(body.contains("\"alice\""), "{body}");
    let (status, _) = server.http(&format!(
        "GET /members HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {alice}\r\n\r\n"
    ));
    assert!(status.contains(" 200 "), "{status}");
}

/// A key that is missing, unreadable or too weak is one clear error at
/// start, and `threadchat token` without a key says what it needs.
#[test]
fn bad_keys_are_one_clear_error() {
    let short = std::env::temp_dir().join(format!("threadchat-test-short-{}", std::process::id()));
    std::fs::write(&short, "short").unwrap();
    for (args, expected) in [
        (
            vec!["--auth-secret-file", "/nonexistent/secret"],
            "cannot read --auth-secret-file",
        ),
        (
            vec!["--auth-secret-file", short.to_str().unwrap()],
            "at least 32",
        ),
        (
            vec!["--auth-public-key", &key("README.md")],
            "not an RSA or Ed25519 public key",
        ),
    ] {
        let mut args = args;
        args.push("--in-process");
        Server::fails_to_start(&args, expected);
    }
    let output = Command::new(env!("CARGO_BIN_EXE_threadchat"))
        .args(["token", "alice"])
        .env_remove("THREADCHAT_AUTH_SECRET")
        .env_remove("THREADCHAT_AUTH_SECRET_FILE")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no key to sign with"));
}

/// A connection whose token expires is closed with a reason; one that sent
/// a fresh token first stays; a fresh token for someone else is refused
/// and changes nothing.
fn an_expiring_token_closes_its_connection_unless_refreshed(extra: &[&str]) {
    let server = hmac_server_with(&[&["--auth-leeway", "0"], extra].concat());
    let short = token_from_cli(&["alice", "--lifetime", "2"]);
    let mut expiring = Client::connect_path(server.addr, &format!("/chat/alice?token={short}"));
    expiring.settle();
    let short = token_from_cli(&["bob", "--lifetime", "2"]);
    let mut refreshed = Client::connect_path(server.addr, &format!("/chat/bob?token={short}"));
    refreshed.settle();

    let carol = token_from_cli(&["carol"]);
    refreshed.send(&json!({"type": "token", "token": carol}).to_string());
    let refused = refreshed.recv_server("error");
    assert!(refused.contains("for \"carol\""), "{refused}");
    let fresh = token_from_cli(&["bob", "--lifetime", "60"]);
    refreshed.send(&json!({"type": "token", "token": fresh}).to_string());
    assert!(refreshed.recv_notice().contains("token refreshed"));

    match expiring.recv_close() {
        crate::support::Closed::Frame(code, reason) => {
            assert_eq!(code, 1008);
            assert!(reason.contains("token expired"), "{reason}");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    refreshed.send("still here");
    refreshed.expect_nothing(std::time::Duration::from_millis(1500));
    let mut dave = Client::connect_path(
        server.addr,
        &format!("/chat/dave?token={}", token_from_cli(&["dave"])),
    );
    dave.settle();
    refreshed.send("after alice's token ran out");
    assert_eq!(dave.recv_chat().1, "after alice's token ran out");
}

/// Limits count per user, across its connections: a third connection is
/// refused (429), and the rate limit is one budget for all of them, while
/// another user has its own.
#[test]
fn limits_are_per_user_across_connections() {
    let file = secret_file();
    let server = Server::start(&[
        "--in-process",
        "--auth-secret-file",
        file.to_str().unwrap(),
        "--max-connections-per-user",
        "2",
        "--rate-limit",
        "0.1",
        "--rate-burst",
        "2",
    ]);
    let alice = token_from_cli(&["alice"]);
    let path = format!("/chat/alice?token={alice}");
    let mut first = Client::connect_path(server.addr, &path);
    first.settle();
    let mut second = Client::connect_path(server.addr, &path);
    second.settle();
    let (status, body) = upgrade(&server, &path, "");
    assert!(status == 429, "{status}");
    assert!(body.contains("at most 2"), "{body}");

    let bob = token_from_cli(&["bob"]);
    let mut bob = Client::connect_path(server.addr, &format!("/chat/bob?token={bob}"));
    bob.settle();
    // Alice's burst of 2 is spent by her first connection…
    first.send("one");
    first.send("two");
    assert_eq!(bob.recv_chat().1, "one");
    assert_eq!(bob.recv_chat().1, "two");
    // …so her second connection has none left; Bob's budget is his own.
    second.send("three");
    let refused = second.recv_type("error");
    assert!(
        refused["message"].as_str().unwrap().contains("rate limit"),
        "{refused}"
    );
    bob.send("bob's own");
    assert_eq!(first.recv_chat().1, "bob's own");

    // A connection closed gives its place back.
    first.close();
    crate::support::eventually("alice's place is free again", || {
        Client::try_connect_path(server.addr, &path).is_ok()
    });
}

/// Without authentication, `--unique-nicknames` keeps a nickname to one
/// connection per room, across instances on one Redis: a second gets 409;
/// another room is fine; the name is free again once its holder leaves.
/// Without the flag, nothing changes: two connections may share a name.
#[test]
fn unique_nicknames_are_one_connection_per_room_across_instances() {
    let redis = crate::support::Redis::start();
    let url = redis.url();
    let first = Server::start(&["--redis", &url, "--unique-nicknames"]);
    let second = Server::start(&["--redis", &url, "--unique-nicknames"]);
    let mut alice = Client::connect_path(first.addr, "/chat/alice?room=lobby");
    alice.settle();
    for server in [&first, &second] {
        let (status, body) = upgrade(server, "/chat/alice?room=lobby", "");
        assert!(status == 409, "{status}");
        assert!(body.contains("\"alice\" is taken in lobby"), "{body}");
    }
    let mut elsewhere = Client::connect_path(second.addr, "/chat/alice?room=kitchen");
    elsewhere.settle();
    alice.close();
    crate::support::eventually("alice is free again in the lobby", || {
        Client::try_connect_path(second.addr, "/chat/alice?room=lobby").is_ok()
    });

    let plain = Server::with_redis(&redis);
    let mut one = Client::connect_path(plain.addr, "/chat/bob");
    one.settle();
    let mut two = Client::connect_path(plain.addr, "/chat/bob");
    two.settle();
}

/// The same in-process.
#[test]
fn unique_nicknames_in_process() {
    let server = Server::start(&["--in-process", "--unique-nicknames"]);
    let mut alice = Client::connect_path(server.addr, "/chat/alice");
    alice.settle();
    let (status, _) = upgrade(&server, "/chat/alice", "");
    assert!(status == 409, "{status}");
    alice.close();
    crate::support::eventually("alice is free again", || {
        Client::try_connect_path(server.addr, "/chat/alice").is_ok()
    });
}

/// Without authentication nothing changes: a frame that looks like a token
/// refresh is a chat message like any other.
#[test]
fn without_tokens_a_token_frame_is_just_a_message() {
    let server = Server::start(&["--in-process"]);
    let mut alice = server.settled("alice");
    let mut bob = server.settled("bob");
    let frame = json!({"type": "token", "token": "x"}).to_string();
    alice.send(&frame);
    assert_eq!(bob.recv_chat().1, frame);
}

/// Time claims no clock can hold (`exp` 2^63, a huge `nbf` or `iat`) are a
/// 401 saying the token is malformed (not "expired" or "not valid yet"),
/// never a panic: nothing is counted in
/// `threadchat_panics_total`, and the server goes on serving.
#[test]
fn absurd_time_claims_are_401_never_a_panic() {
    let server = hmac_server();
    let huge = 1u64 << 63;
    for claims in [
        json!({"sub": "alice", "exp": huge}),
        json!({"sub": "alice", "exp": u64::MAX}),
        json!({"sub": "alice", "exp": -1}),
        json!({"sub": "alice", "exp": now() + 60, "nbf": -1}),
        json!({"sub": "alice", "exp": now() + 60, "nbf": huge}),
        json!({"sub": "alice", "exp": now() + 60, "iat": huge}),
    ] {
        let token = hmac_token(claims.clone());
        let (status, body) = upgrade(&server, &format!("/chat/alice?token={token}"), "");
        assert!(status == 401, "{claims}: {status}");
        assert!(body.contains("malformed"), "{claims}: {body}");
    }
    let mut alice = Client::connect_path(
        server.addr,
        &format!("/chat/alice?token={}", token_from_cli(&["alice"])),
    );
    alice.settle();
    // A refresh with such a token is refused the same way, on the open
    // connection.
    let absurd = hmac_token(json!({"sub": "alice", "exp": huge}));
    alice.send(&json!({"type": "token", "token": absurd}).to_string());
    let refused = alice.recv_server("error");
    assert!(refused.contains("malformed"), "{refused}");
    assert_eq!(server.metric("threadchat_panics_total"), 0);
}

/// With `--auth-audience` and `--auth-issuer`, a token minted for another
/// service (or by another issuer, or without the claims) is a 401 saying
/// so; `threadchat token`, configured the same way, mints tokens that pass.
#[test]
fn audience_and_issuer_are_enforced_when_set() {
    let file = secret_file();
    let server = Server::start_with_env(
        &[
            "--in-process",
            "--auth-secret-file",
            file.to_str().unwrap(),
            "--auth-audience",
            "chat",
        ],
        &[("THREADCHAT_AUTH_ISSUER", "https://id.example")],
    );
    let exp = now() + 60;
    for (claims, reason) in [
        (
            json!({"sub": "alice", "exp": exp, "aud": "wiki", "iss": "https://id.example"}),
            "its aud is not \"chat\"",
        ),
        (
            json!({"sub": "alice", "exp": exp, "aud": "chat", "iss": "https://other.example"}),
            "its iss is not \"https://id.example\"",
        ),
        (
            json!({"sub": "alice", "exp": exp, "iss": "https://id.example"}),
            "no \"aud\" claim",
        ),
        (
            json!({"sub": "alice", "exp": exp, "aud": "chat"}),
            "no \"iss\" claim",
        ),
        // An issuer is one string, not a list holding it.
        (
            json!({"sub": "alice", "exp": exp, "aud": "chat", "iss": ["https://id.example"]}),
            "malformed",
        ),
    ] {
        let token = hmac_token(claims.clone());
        let (status, body) = upgrade(&server, &format!("/chat/alice?token={token}"), "");
        assert!(status == 401, "{claims}: {status}");
        assert!(body.contains(reason), "{claims}: {body}");
    }
    let plain = token_from_cli(&["alice"]);
    let (status, _) = upgrade(&server, &format!("/chat/alice?token={plain}"), "");
    assert!(status == 401, "{status}");
    let output = Command::new(env!("CARGO_BIN_EXE_threadchat"))
        .args([
            "--auth-audience",
            "chat",
            "--auth-issuer",
            "https://id.example",
        ])
        .args(["token", "alice"])
        .env("THREADCHAT_AUTH_SECRET", SECRET)
        .env_remove("THREADCHAT_AUTH_SECRET_FILE")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stamped = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    let mut alice = Client::connect_path(server.addr, &format!("/chat/alice?token={stamped}"));
    alice.settle();
}

/// A token refresh is a frame like a message: it takes from the same rate
/// limit, is refused past it (with the same error, once), and a client
/// that keeps sending refreshes into an empty budget is closed as a
/// flooder.
#[test]
fn token_refreshes_count_against_the_rate_limit() {
    let file = secret_file();
    let server = Server::start(&[
        "--in-process",
        "--auth-secret-file",
        file.to_str().unwrap(),
        "--rate-limit",
        "0.1",
        "--rate-burst",
        "2",
    ]);
    let token = token_from_cli(&["alice"]);
    let mut alice = Client::connect_path(server.addr, &format!("/chat/alice?token={token}"));
    alice.settle();
    let refresh = json!({"type": "token", "token": token}).to_string();
    alice.send(&refresh);
    alice.send(&refresh);
    assert!(alice.recv_notice().contains("token refreshed"));
    assert!(alice.recv_notice().contains("token refreshed"));
    alice.send(&refresh);
    let refused = alice.recv_server("error");
    assert!(refused.contains("rate limit"), "{refused}");
    assert!(refused.contains("this token was not read"), "{refused}");
    for _ in 0..20 {
        alice.send(&refresh);
    }
    match alice.recv_close() {
        crate::support::Closed::Frame(code, reason) => {
            assert_eq!(code, 1008);
            assert!(reason.contains("flooding"), "{reason}");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert!(server.metric("threadchat_rate_limited_total") >= 3);
}
