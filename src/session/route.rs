//! The router: what each path of the HTTP side answers, with the server's
//! state at hand. Parsing and answering HTTP is [`http`]'s, which knows
//! nothing of the chat; this module knows which path means what.
//!
//! * `/` — the web page (and `/favicon.ico`, its icon); `/healthz` —
//!   whether the relay works; `/metrics` — the counters; `/members?room=`
//!   — who is in a room.
//! * `/chat/{nickname}` — the chat (a WebSocket upgrade); `/echo` — the
//!   echo endpoint, when `--echo-endpoint` is on.
//!
//! Every path but `/healthz` must be asked for under a `Host` the server
//! answers to (`--allowed-host`; 421 otherwise), so that a page on another
//! name, re-pointed at this server by DNS rebinding, can neither chat nor
//! read `/members` or `/metrics`. `/healthz` is left open: probes often
//! send any Host, and it tells nothing but whether the relay works.

use std::io;

use tungstenite::http::StatusCode;

use super::context::Context;
use crate::http::{self, Outcome, Target};
use crate::net::Stream;
use crate::protocol::Room;

/// The web page served at `/`.
const INDEX_HTML: &str = include_str!("web/index.html");

/// The page's security headers. Its Content-Security-Policy allows only
/// what the page is: its own inline script and style (by their hashes),
/// connections to its own origin (`'self'` covers `ws:`/`wss:` to the same
/// host and port), images from `data:` addresses (its icon is drawn in the
/// page), nothing else; it may not be framed.
static PAGE_HEADERS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let script = inline_hash(INDEX_HTML, "<script>", "</script>");
    let style = inline_hash(INDEX_HTML, "<style>", "</style>");
    format!(
        "Content-Security-Policy: default-src 'none'; script-src '{script}'; \
         style-src '{style}'; img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'\r\n\
         X-Frame-Options: DENY\r\n\
         X-Content-Type-Options: nosniff\r\n\
         Referrer-Policy: no-referrer\r\n\
         Cache-Control: no-cache\r\n"
    )
});

/// The page's icon, an SVG it carries itself as a `data:` URI (so the page
/// stays one file and fetches nothing), served again at `/favicon.ico` for
/// whatever asks there: a browser on `/metrics`, a bookmark. `None` if the
/// page has none.
static FAVICON: std::sync::LazyLock<Option<String>> = std::sync::LazyLock::new(|| {
    let (_, rest) = INDEX_HTML.split_once("<link rel=\"icon\" href=\"data:image/svg+xml,")?;
    let (encoded, _) = rest.split_once('"')?;
    crate::protocol::percent_decode(encoded).ok()
});

/// `sha256-…` of the text between the first `open` and the next `close`
/// in `page`, as a CSP source.
fn inline_hash(page: &str, open: &str, close: &str) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let text = page
        .split_once(open)
        .and_then(|(_, rest)| rest.split_once(close))
        .map_or("", |(text, _)| text);
    let digest = sha2::Sha256::digest(text.as_bytes());
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// Reads one request (within `head_timeout`) and answers it, unless it is
/// a valid WebSocket upgrade (see [`Outcome::Upgrade`]).
pub(super) fn serve(
    stream: &Stream,
    ctx: &Context,
    head_timeout: std::time::Duration,
) -> io::Result<Outcome> {
    let limits = &ctx.limits;
    let request = match http::read_request(stream, head_timeout)? {
        Ok(request) => request,
        Err(answered) => return Ok(answered),
    };
    if request.path() != "/healthz"
        && let Err(reason) = request.check_host(&limits.allowed_hosts)
    {
        return http::answer(stream, StatusCode::MISDIRECTED_REQUEST, &reason);
    }
    let target = match request.path() {
        "/" => {
            // The page asks for a token when the server requires one.
            let page = if ctx.admission.wants_tokens() {
                INDEX_HTML.replacen("<body>", "<body data-auth=\"required\">", 1)
            } else {
                INDEX_HTML.to_owned()
            };
            return http::answer_with_headers(
                stream,
                StatusCode::OK,
                http::HTML,
                &PAGE_HEADERS,
                &page,
            );
        }
        "/favicon.ico" => {
            return match FAVICON.as_deref() {
                Some(svg) => http::answer_with_headers(
                    stream,
                    StatusCode::OK,
                    "image/svg+xml",
                    // Ours, but an SVG opened by itself could run script:
                    // it may not.
                    "Content-Security-Policy: default-src 'none'\r\n\
                     X-Content-Type-Options: nosniff\r\nCache-Control: max-age=86400\r\n",
                    svg,
                ),
                None => http::answer(stream, StatusCode::NOT_FOUND, "no icon"),
            };
        }
        "/healthz" => {
            return match ctx.broker.health() {
                Ok(()) => http::answer(stream, StatusCode::OK, "ok"),
                Err(reason) => http::answer(stream, StatusCode::SERVICE_UNAVAILABLE, &reason),
            };
        }
        "/metrics" => {
            let text = ctx.metrics.render();
            return http::answer_with(stream, StatusCode::OK, crate::metrics::CONTENT_TYPE, &text);
        }
        "/members" => {
            let room = match http::room_param(request.query()) {
                Ok(room) => room,
                Err(reason) => return http::answer(stream, StatusCode::BAD_REQUEST, &reason),
            };
            if let Err(refused) = ctx.admission.admit_reader(&request, &room) {
                return http::answer(stream, refused.status, &refused.reason);
            }
            return members(stream, ctx, &room, request.query());
        }
        "/echo" if limits.echo_endpoint => Target::Echo,
        // A refused chat is still routed to the upgrade: a WebSocket client
        // is told why in WebSocket (see `Target::Refused`).
        path => match http::chat_target(path, request.query()) {
            Some(Ok(mut member)) => match ctx.admission.identify(&request, &mut member) {
                Ok(()) => Target::Chat(member),
                Err(refusal) => Target::Refused {
                    refusal,
                    format: member.format,
                },
            },
            Some(Err(reason)) => Target::Refused {
                refusal: http::Refusal::new(StatusCode::BAD_REQUEST, reason),
                format: http::requested_format(request.query()),
            },
            None => {
                return http::answer(
                    stream,
                    StatusCode::NOT_FOUND,
                    "not found; chat at /chat/{nickname}",
                );
            }
        },
    };
    http::upgrade(stream, request, target, limits)
}

/// `GET /members?room=…&limit=…`: who is in a room, as JSON: how many, and
/// the sorted nicknames of at most `limit` of them (100 by default,
/// [`MAX_MEMBERS_LIMIT`] at most), `truncated` when that is not everyone.
///
/// Cheap by design, because anyone can ask as often as they like: the list
/// is bounded, answers are cached for a moment (see
/// [`members`](super::members)), and with Redis the question goes over a
/// query connection, never queued behind a `PUBLISH`.
fn members(stream: &Stream, ctx: &Context, room: &Room, query: &str) -> io::Result<Outcome> {
    let limit = match http::query_param(query, "limit") {
        Ok(None) => DEFAULT_MEMBERS_LIMIT,
        Ok(Some(n)) => match n.parse::<usize>() {
            Ok(n) if (1..=MAX_MEMBERS_LIMIT).contains(&n) => n,
            _ => {
                let reason = format!("limit must be a number from 1 to {MAX_MEMBERS_LIMIT}");
                return http::answer(stream, StatusCode::BAD_REQUEST, &reason);
            }
        },
        Err(reason) => return http::answer(stream, StatusCode::BAD_REQUEST, &reason),
    };
    match ctx
        .members
        .get(room, limit, || ctx.broker.presence(room, limit))
    {
        Ok(body) => http::answer_with(stream, StatusCode::OK, http::JSON, &body),
        Err(e) => http::answer(stream, StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// Names a `/members` answer lists unless asked for more.
pub(super) const DEFAULT_MEMBERS_LIMIT: usize = 100;
/// Most names a `/members` answer lists.
pub(super) const MAX_MEMBERS_LIMIT: usize = 1000;
