//! Plain HTTP requests get plain HTTP answers; bad requests affect only
//! their own connection.

use crate::support::{Server, eventually};

#[test]
fn the_root_serves_the_web_client() {
    let server = Server::in_process();
    let (status, body) = server.get("/");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("<title>threadchat</title>"), "{body}");
    assert!(
        !body.contains("http://") && !body.contains("https://"),
        "nothing fetched from elsewhere"
    );
}

#[test]
fn unknown_paths_are_404() {
    let server = Server::in_process();
    for path in ["/nope", "/chat", "/chat/a/b", "/chatx/a"] {
        assert_eq!(server.get(path).0, "HTTP/1.1 404 Not Found", "{path}");
    }
}

/// A WebSocket client refused is told why as it reads frames: websocat
/// prints the `error` frame (here one line of text, as it asked), and the
/// close carries 4000 + the HTTP status and the reason.
#[test]
fn a_refused_websocket_client_reads_why_in_its_own_format() {
    let server = Server::in_process();
    let url = format!("ws://{}/chat/%20x?format=text", server.addr);
    let (mut ws, response) = tungstenite::connect(url).unwrap();
    assert_eq!(response.status(), 101);
    let first = ws.read().unwrap();
    assert_eq!(
        first.to_text().unwrap(),
        "! nickname starts or ends with white space"
    );
    match ws.read().unwrap() {
        tungstenite::Message::Close(Some(close)) => {
            assert_eq!(u16::from(close.code), 4400);
            assert_eq!(close.reason, "nickname starts or ends with white space");
        }
        other => panic!("expected a close, got {other:?}"),
    }
}

/// The page's icon is in the page; `/favicon.ico`, which browsers ask for
/// elsewhere on the site, is the same icon, not a 404.
#[test]
fn the_favicon_is_served() {
    let server = Server::in_process();
    let (status, page) = server.get("/");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(page.contains("<link rel=\"icon\" href=\"data:image/svg+xml,"));
    let (status, icon) = server.get("/favicon.ico");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(icon.starts_with("<svg"), "{icon}");
}

#[test]
fn a_plain_get_of_a_chat_url_is_told_to_upgrade() {
    let server = Server::in_process();
    let (status, body) = server.get("/chat/alice");
    assert_eq!(status, "HTTP/1.1 426 Upgrade Required");
    assert!(body.contains("WebSocket"));
}

#[test]
fn invalid_nicknames_are_refused_with_a_reason_over_websocket_and_http() {
    let server = Server::in_process();
    let cases = [
        ("/chat/", "empty"),
        ("/chat/%20alice", "white space"),
        ("/chat/a%0Ab", "control character"),
        ("/chat/%FF", "UTF-8"),
        ("/chat/%zz", "percent-escape"),
        (&*format!("/chat/{}", "x".repeat(33)), "longer than 32"),
    ];
    for (path, reason) in cases {
        // A WebSocket client reads it in an error frame and the close
        // (code 4400); curl, in a plain 400.
        let refused = server.refusal(path, "").expect("refused");
        assert_eq!(refused.status, 400, "{path}");
        assert!(refused.reason.contains(reason), "{path}: {refused}");
        let (status, body) = server.get(path);
        assert_eq!(status, "HTTP/1.1 400 Bad Request", "{path}");
        assert!(body.contains(reason), "{path}: {body}");
    }
}

#[test]
fn a_broken_upgrade_request_gets_400() {
    let server = Server::in_process();
    let (status, body) =
        server.http("GET /chat/alice HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    assert!(body.contains("WebSocket upgrade"), "{body}");
}

#[test]
fn other_methods_get_405() {
    let server = Server::in_process();
    let (status, _) =
        server.http("POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
}

#[test]
fn malformed_and_oversized_heads_are_refused() {
    let server = Server::in_process();
    assert_eq!(server.http("HELLO\r\n\r\n").0, "HTTP/1.1 400 Bad Request");
    let huge = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(10_000));
    assert_eq!(
        server.http(&huge).0,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    // The server is unharmed.
    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    alice.send("fine");
    assert_eq!(bob.recv_chat().1, "fine");
}

#[test]
fn past_the_connection_cap_new_clients_get_503() {
    let server = Server::start(&["--in-process", "--max-connections", "2"]);
    let _a = server.client("a");
    let _b = server.client("b");
    let (status, body) = server.get("/");
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    assert!(body.contains("full"));
    drop(_a);
    // Once a connection leaves, there is room again.
    eventually("a free slot", || server.get("/").0 == "HTTP/1.1 200 OK");
}
