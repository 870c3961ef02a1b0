//! The HTTP side's unit tests, and property tests: hostile input never
//! panics.

use super::checks::*;
use super::head::*;

#[test]
fn a_partial_head_asks_for_more() {
    assert!(
        parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .unwrap()
            .is_none()
    );
}

#[test]
fn bytes_after_the_head_are_kept() {
    let (head, rest) =
        parse_head(b"GET /chat/a?x=1 HTTP/1.1\r\nUpgrade: websocket\r\n\r\n\x81\x80")
            .unwrap()
            .unwrap();
    assert_eq!(head.path(), "/chat/a");
    assert_eq!(head.header("upgrade"), Some(&b"websocket"[..]));
    assert_eq!(rest, b"\x81\x80");
}

fn head_with(headers: &[(&str, &str)]) -> RequestHead {
    RequestHead {
        method: "GET".into(),
        version: 1,
        target: "/chat/a".into(),
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect(),
    }
}

#[test]
fn origin_policy() {
    let none: Vec<String> = vec![];
    let http = "http";
    assert!(check_origin(&head_with(&[("Host", "h:1")]), http, &none).is_ok());
    let same = head_with(&[
        ("Host", "chat.example:8000"),
        ("Origin", "http://chat.example:8000"),
    ]);
    assert!(check_origin(&same, http, &none).is_ok());
    let other = head_with(&[
        ("Host", "chat.example:8000"),
        ("Origin", "https://evil.example"),
    ]);
    assert!(
        check_origin(&other, http, &none)
            .unwrap_err()
            .contains("--allow-origin")
    );
    assert!(check_origin(&other, http, &["https://evil.example".into()]).is_ok());
    assert!(check_origin(&other, http, &["*".into()]).is_ok());
}

#[test]
fn origin_compares_scheme_host_and_port() {
    let none: Vec<String> = vec![];
    let check = |host: &str, origin: &str, scheme: &str| {
        check_origin(
            &head_with(&[("Host", host), ("Origin", origin)]),
            scheme,
            &none,
        )
        .is_ok()
    };
    assert!(check("chat.example", "http://chat.example:80", "http"));
    assert!(check("Chat.Example:80", "http://chat.example", "http"));
    assert!(!check(
        "chat.example:8000",
        "https://chat.example:8000",
        "http"
    ));
    assert!(!check(
        "chat.example:8000",
        "http://chat.example:8001",
        "http"
    ));
    assert!(!check("chat.example:8000", "http://chat.example", "http"));
    assert!(check("chat.example", "https://chat.example", "https"));
    assert!(check("[::1]:8000", "http://[::1]:8000", "http"));
    assert!(!check("[::1]:8000", "http://[::1]", "http"));
}

#[test]
fn upgrades_need_http_1_1_a_host_and_no_body() {
    let mut head = head_with(&[("Host", "h")]);
    assert!(check_upgrade_request(&head).is_ok());
    head.version = 0;
    assert!(check_upgrade_request(&head).is_err());
    assert!(check_upgrade_request(&head_with(&[])).is_err());
    assert!(check_upgrade_request(&head_with(&[("Host", "h"), ("Content-Length", "5")])).is_err());
    assert!(check_upgrade_request(&head_with(&[("Host", "h"), ("Content-Length", "0")])).is_ok());
    assert!(
        check_upgrade_request(&head_with(&[
            ("Host", "h"),
            ("Transfer-Encoding", "chunked")
        ]))
        .is_err()
    );
}

#[test]
fn the_proxy_appends_the_last_forwarded_address() {
    let head = head_with(&[("X-Forwarded-For", "6.6.6.6, 10.0.0.7")]);
    assert_eq!(forwarded_client(&head), Some("10.0.0.7".parse().unwrap()));
    assert_eq!(forwarded_client(&head_with(&[])), None);
}

/// A proxy that adds its own line (HAProxy's `option forwardfor`): the
/// client's own line comes first and proves nothing.
#[test]
fn every_forwarded_line_counts_and_the_last_entry_wins() {
    let head = head_with(&[
        ("X-Forwarded-For", "6.6.6.6"),
        ("Host", "h"),
        ("x-forwarded-for", "10.0.0.7"),
    ]);
    assert_eq!(forwarded_client(&head), Some("10.0.0.7".parse().unwrap()));
}

#[test]
fn garbage_is_malformed() {
    assert!(matches!(
        parse_head(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
        Err(HeadError::Malformed(_))
    ));
}

#[test]
fn two_host_lines_are_invalid() {
    assert!(matches!(
        parse_head(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nhost: evil.example\r\n\r\n"),
        Err(HeadError::Invalid(_))
    ));
    assert!(
        parse_head(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .unwrap()
            .is_some()
    );
}

#[test]
fn too_many_headers_is_too_large() {
    let mut req = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..=MAX_HEADERS {
        req.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    assert!(matches!(parse_head(&req), Err(HeadError::TooLarge)));
}

/// Hostile input never panics: arbitrary bytes give a head, "need more", or
/// an error.
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_head(&bytes);
        }

        #[test]
        fn arbitrary_headers_never_panic(
            target in "/[ -~]{0,64}",
            headers in proptest::collection::vec(("[!-9;-~]{1,16}", proptest::collection::vec(any::<u8>(), 0..32)), 0..60),
            rest in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut request = format!("GET {target} HTTP/1.1\r\n").into_bytes();
            for (name, value) in &headers {
                request.extend_from_slice(name.as_bytes());
                request.extend_from_slice(b": ");
                request.extend_from_slice(value);
                request.extend_from_slice(b"\r\n");
            }
            request.extend_from_slice(b"\r\n");
            request.extend_from_slice(&rest);
            if let Ok(Some((head, _))) = parse_head(&request) {
                let _ = head.path();
                let _ = check_origin(&head, "http", &[]);
                let _ = check_upgrade_request(&head);
                let _ = forwarded_client(&head);
                let _ = websocket_response(&head);
            }
        }
    }
}

/// DNS rebinding: only IP literals, `localhost` and allowed names pass.
#[test]
fn hosts_the_server_does_not_answer_to_are_refused() {
    let allowed = vec!["chat.example".to_owned()];
    for good in [
        "127.0.0.1:8000",
        "10.1.2.3",
        "[::1]:8000",
        "[2001:db8::1]",
        "localhost:8000",
        "LOCALHOST",
        "chat.example",
        "Chat.Example.:443",
    ] {
        assert!(
            check_host(&head_with(&[("Host", good)]), &allowed).is_ok(),
            "{good}"
        );
    }
    for bad in [
        "evil.example",
        "evil.example:8000",
        "127.0.0.1.evil.example",
        "x:y",
    ] {
        assert!(
            check_host(&head_with(&[("Host", bad)]), &allowed).is_err(),
            "{bad}"
        );
    }
    assert!(check_host(&head_with(&[("Host", "evil.example")]), &["*".to_owned()]).is_ok());
    assert!(check_host(&head_with(&[]), &[]).is_ok());
}
