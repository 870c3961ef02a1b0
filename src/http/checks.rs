//! What makes an upgrade request acceptable beyond tungstenite's own
//! checks: HTTP/1.1 with a `Host` and no body, a browser origin we allow,
//! and, through a trusted proxy, the client's forwarded address.

use std::net::IpAddr;

use tungstenite::handshake::server::create_response;
use tungstenite::http;

use super::head::RequestHead;

/// What an upgrade request must be beyond what tungstenite checks:
/// HTTP/1.1 (RFC 6455 section 4.1), with a `Host`, and without a body (the
/// bytes after the head are the client's first frames, not a body someone
/// could smuggle past the server).
pub(super) fn check_upgrade_request(head: &RequestHead) -> Result<(), &'static str> {
    if head.version < 1 {
        return Err("a WebSocket upgrade needs HTTP/1.1");
    }
    if head
        .header("Host")
        .is_none_or(|h| h.trim_ascii().is_empty())
    {
        return Err("a WebSocket upgrade needs a Host header");
    }
    let has_body = head.header("Transfer-Encoding").is_some()
        || head
            .header("Content-Length")
            .is_some_and(|len| len.trim_ascii() != b"0");
    if has_body {
        return Err("a WebSocket upgrade has no body (Content-Length or Transfer-Encoding)");
    }
    Ok(())
}

/// The client's address as the trusted proxy saw it: the last entry of
/// `X-Forwarded-For` (the one that proxy appended; entries before it were
/// written by the client and prove nothing). Every line of the header
/// counts, joined in order: a proxy that adds a line of its own (HAProxy's
/// `option forwardfor`) puts the client's address last, after whatever
/// line the client sent itself.
pub(super) fn forwarded_client(head: &RequestHead) -> Option<IpAddr> {
    let value = head.header_list("X-Forwarded-For")?;
    let last = value.rsplit(',').next()?.trim();
    last.parse()
        .ok()
        .or_else(|| last.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
}

/// The Host policy, against DNS rebinding: a page on the attacker's name,
/// re-pointed at this server, is same-origin with itself, so the browser
/// sends its own name as `Host` (and as `Origin`, which then passes
/// [`check_origin`]). So a request must name a host this server answers
/// to: any IP literal (a rebinding attack always uses a name), `localhost`,
/// or a name in `allowed` (`--allowed-host`; `*`: any). Without `Host`
/// (HTTP/1.0), nothing to check: browsers always send one.
pub(super) fn check_host(head: &RequestHead, allowed: &[String]) -> Result<(), String> {
    let Some(host) = head.header("Host") else {
        return Ok(());
    };
    let host = String::from_utf8_lossy(host);
    let host = host.trim();
    let name = match host_and_port(host, "http") {
        Some((name, _)) => name,
        None => return Err(format!("Host {host:?} is not host[:port]")),
    };
    let name = name.trim_end_matches('.');
    let literal = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    if literal.parse::<IpAddr>().is_ok()
        || name == "localhost"
        || allowed.iter().any(|a| a == "*" || a == name)
    {
        return Ok(());
    }
    Err(format!(
        "this server does not answer to {name:?} (start it with --allowed-host {name})"
    ))
}

/// The browser-origin policy. Browsers send `Origin` with every WebSocket
/// request, and any page on the web can open one to any server: without this
/// check, a malicious page could chat in the user's name. Allowed: requests
/// without `Origin` (websocat, scripts, servers), pages served by this server
/// itself, and `--allow-origin`.
///
/// "Served by this server" means the same scheme, host and port: the
/// origin's scheme is `scheme` (`http`, or what a trusted proxy says), its
/// host and port those of the request's `Host` (a port left out is the
/// scheme's default). `https://chat.example` is not `http://chat.example`,
/// nor `http://chat.example:8080`.
pub(super) fn check_origin(
    head: &RequestHead,
    scheme: &str,
    allowed: &[String],
) -> Result<(), String> {
    let Some(origin) = head.header("Origin") else {
        return Ok(());
    };
    let origin = String::from_utf8_lossy(origin);
    let origin = origin.trim().trim_end_matches('/');
    if allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        return Ok(());
    }
    let host = head.header("Host").map(String::from_utf8_lossy);
    let same = match (origin.split_once("://"), host) {
        (Some((origin_scheme, origin_host)), Some(host)) => {
            origin_scheme.eq_ignore_ascii_case(scheme)
                && host_and_port(origin_host, scheme) == host_and_port(host.trim(), scheme)
        }
        _ => false,
    };
    if same {
        return Ok(());
    }
    Err(format!(
        "origin {origin} is not allowed (start the server with --allow-origin {origin})"
    ))
}

/// `host[:port]` as (lower-case host, port), the port defaulting to the
/// scheme's; `None` if the port is not a number.
pub(super) fn host_and_port(authority: &str, scheme: &str) -> Option<(String, u16)> {
    let default = if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        80
    };
    // An IPv6 literal is bracketed: `[::1]:8000`.
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (authority, None),
    };
    let port = match port {
        Some(port) => port.parse().ok()?,
        None => default,
    };
    Some((host.to_ascii_lowercase(), port))
}

/// Lets tungstenite check the upgrade headers and compute
/// `Sec-WebSocket-Accept`; its error becomes the 400's reason.
pub(super) fn websocket_response(head: &RequestHead) -> Result<http::Response<()>, String> {
    let mut builder = http::Request::builder()
        .method(head.method.as_str())
        .uri(head.target.as_str())
        .version(http::Version::HTTP_11);
    for (name, value) in &head.headers {
        builder = builder.header(name.as_str(), value.as_slice());
    }
    let request = builder
        .body(())
        .map_err(|e| format!("malformed request: {e}"))?;
    create_response(&request).map_err(|e| format!("not a valid WebSocket upgrade: {e}"))
}
