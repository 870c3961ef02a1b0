//! A blocking WebSocket client, as a user's would be.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

use super::*;

/// A blocking WebSocket chat client.
pub struct Client {
    pub ws: WebSocket<Wire>,
    /// Messages read to tell a welcome from a refusal, not yet taken.
    unread: std::collections::VecDeque<Message>,
}

impl Client {
    pub fn connect(addr: SocketAddr, nickname: &str) -> Client {
        Client::try_connect(addr, nickname).unwrap_or_else(|e| panic!("connect as {nickname}: {e}"))
    }

    /// A client on `ws`, once the server has said whether it takes it: its
    /// first message is the welcome's (kept, for the test to read) or the
    /// start of a refusal.
    pub fn admitted(mut ws: WebSocket<Wire>) -> Result<Client, Refusal> {
        let first = ws
            .read()
            .unwrap_or_else(|e| panic!("no welcome and no refusal: {e}"));
        let mut unread = std::collections::VecDeque::from([first]);
        if is_error(&unread[0]) {
            let second = ws.read().ok();
            if let Some(refusal) = Refusal::from_messages(&unread[0], second.as_ref()) {
                return Err(refusal);
            }
            unread.extend(second);
        }
        Ok(Client { ws, unread })
    }

    /// A client on `ws`, which must be a chat the server took.
    pub fn on(ws: WebSocket<Wire>) -> Client {
        Client::admitted(ws).unwrap_or_else(|refusal| panic!("refused: {refusal}"))
    }

    /// A client of a server that says nothing when a client joins (the
    /// original app, the minimal example): no welcome to wait for.
    pub fn connect_to_original(addr: SocketAddr, nickname: &str) -> Client {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let wire = Wire::over(stream, addr).unwrap();
        let url = format!("{}://{addr}/chat/{nickname}", wire.scheme());
        let (ws, _) =
            tungstenite::client(url, wire).unwrap_or_else(|e| panic!("connect as {nickname}: {e}"));
        Client {
            ws,
            unread: Default::default(),
        }
    }

    pub fn try_connect(addr: SocketAddr, nickname: &str) -> Result<Client, Refusal> {
        Client::try_connect_path(addr, &format!("/chat/{nickname}"))
    }

    /// A chat client connecting from the local address `ip` (127.0.0.x:
    /// another client address, as far as the server can tell).
    pub fn connect_from(addr: SocketAddr, ip: &str, nickname: &str) -> Client {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let local: SocketAddr = format!("{ip}:0").parse().unwrap();
        socket.bind(&local.into()).unwrap();
        socket.connect(&addr.into()).unwrap();
        let stream = TcpStream::from(socket);
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let wire = Wire::over(stream, addr).unwrap();
        let url = format!("{}://{addr}/chat/{nickname}", wire.scheme());
        let (ws, _) = tungstenite::client(url, wire)
            .unwrap_or_else(|e| panic!("connect as {nickname} from {ip}: {e}"));
        Client::on(ws)
    }

    /// A WebSocket to any path.
    pub fn connect_path(addr: SocketAddr, path: &str) -> Client {
        Client::try_connect_path(addr, path).unwrap_or_else(|e| panic!("connect to {path}: {e}"))
    }

    /// A chat client on `path`, or how the server refused it (as a plain
    /// HTTP status, or over the WebSocket: see [`Refusal`]).
    pub fn try_connect_path(addr: SocketAddr, path: &str) -> Result<Client, Refusal> {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let wire = Wire::over(stream, addr).unwrap();
        let url = format!("{}://{addr}{path}", wire.scheme());
        match tungstenite::client(url, wire) {
            // Only a chat has a welcome to wait for.
            Ok((ws, _)) if path.starts_with("/chat/") => Client::admitted(ws),
            Ok((ws, _)) => Ok(Client {
                ws,
                unread: Default::default(),
            }),
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
                let body = response.body().as_deref().unwrap_or_default();
                Err(Refusal {
                    status: response.status().as_u16(),
                    reason: String::from_utf8_lossy(body).trim_end().to_owned(),
                })
            }
            Err(e) => panic!("connect to {path}: {e}"),
        }
    }

    pub fn send(&mut self, text: &str) {
        self.ws.send(Message::text(text)).unwrap();
    }

    pub fn send_message(&mut self, message: Message) {
        self.ws.send(message).unwrap();
    }

    /// The next message, as tungstenite reads it, past interruptions. A
    /// read on a socket with a read timeout is never restarted after a
    /// signal (signal(7)), whatever the handler asks: it fails with
    /// `Interrupted`, which says nothing about the server.
    fn read(&mut self) -> tungstenite::Result<Message> {
        if let Some(message) = self.unread.pop_front() {
            return Ok(message);
        }
        loop {
            match self.ws.read() {
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    /// The next data frame, parsed as JSON (control frames are skipped).
    pub fn recv(&mut self) -> Value {
        loop {
            match self.read() {
                Ok(Message::Text(text)) => {
                    return serde_json::from_str(text.as_str())
                        .unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
                }
                Ok(Message::Binary(b)) => panic!("unexpected binary frame {b:?}"),
                Ok(Message::Close(frame)) => {
                    panic!("closed while waiting for a message: {frame:?}")
                }
                Ok(_) => continue,
                Err(e) => panic!("error while waiting for a message: {e}"),
            }
        }
    }

    /// The next frame of type `kind` (`"chat"`, `"join"`, …), skipping
    /// any other.
    pub fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.recv();
            if frame["type"] == kind {
                return frame;
            }
        }
    }

    /// The next frame that is not a room event (someone joining or leaving,
    /// the member list, the history sent at join).
    pub fn recv_live(&mut self) -> Value {
        loop {
            let frame = self.recv();
            let room_event = matches!(frame["type"].as_str(), Some("join" | "leave" | "presence"))
                || frame["history"] == true;
            if !room_event {
                return frame;
            }
        }
    }

    /// The next frame, which must be from the server and of the given type
    /// (`notice` or `error`), skipping room events; returns its text.
    pub fn recv_server(&mut self, kind: &str) -> String {
        let frame = self.recv_live();
        assert_eq!(frame["type"], kind, "expected a {kind} frame, got {frame}");
        assert_eq!(frame["nickname"], "server");
        frame["message"].as_str().unwrap().to_owned()
    }

    /// The next notice's text, past any "not delivered" errors: a message
    /// in flight when the relay was lost cannot be confirmed, so its sender
    /// is told too.
    pub fn recv_notice(&mut self) -> String {
        loop {
            let frame = self.recv_live();
            match frame["type"].as_str() {
                Some("notice") => return frame["message"].as_str().unwrap().to_owned(),
                Some("error") => {
                    let text = frame["message"].as_str().unwrap();
                    assert!(text.contains("not delivered"), "{text}");
                }
                _ => panic!("expected a notice, got {frame}"),
            }
        }
    }

    /// Reads up to the member list sent at join: from then on, the client is
    /// fully in the room (history and member list delivered).
    pub fn settle(&mut self) -> &mut Client {
        while self.recv()["type"] != "presence" {}
        self
    }

    /// Reads up to the member list sent at join, and returns the history
    /// frames sent before it, oldest first.
    pub fn recv_history(&mut self) -> Vec<Value> {
        let mut history = Vec::new();
        loop {
            let frame = self.recv();
            if frame["type"] == "presence" {
                return history;
            }
            if frame["history"] == true {
                history.push(frame);
            }
        }
    }

    /// The next text frame as it is (for `?format=text`).
    pub fn recv_text(&mut self) -> String {
        loop {
            match self.read() {
                Ok(Message::Text(text)) => return text.as_str().to_owned(),
                Ok(Message::Close(frame)) => panic!("closed while waiting for text: {frame:?}"),
                Ok(_) => continue,
                Err(e) => panic!("error while waiting for text: {e}"),
            }
        }
    }

    /// The next live chat message as (nickname, message), skipping room
    /// events.
    pub fn recv_chat(&mut self) -> (String, String) {
        let frame = self.recv_live();
        assert_eq!(frame["type"], "chat", "expected a chat frame, got {frame}");
        (
            frame["nickname"].as_str().unwrap().to_owned(),
            frame["message"].as_str().unwrap().to_owned(),
        )
    }

    /// The next live frame if one arrives within `wait` (room events are
    /// skipped).
    pub fn recv_live_within(&mut self, wait: Duration) -> Option<Value> {
        let live = |frame: &Value| {
            !matches!(frame["type"].as_str(), Some("join" | "leave" | "presence"))
                && frame["history"] != true
        };
        match self.read_within(wait, live) {
            Ok(Message::Text(text)) => Some(serde_json::from_str(text.as_str()).unwrap()),
            _ => None,
        }
    }

    /// Asserts that no chat, notice or error frame arrives within `quiet`
    /// (room events — joins, leaves, presence — are allowed).
    pub fn expect_nothing(&mut self, quiet: Duration) {
        let wanted =
            |frame: &Value| !matches!(frame["type"].as_str(), Some("join" | "leave" | "presence"));
        match self.read_within(quiet, wanted) {
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }

    /// The first message within `wait` that is not a text frame `wanted`
    /// passes over (or the error, a timeout among them).
    fn read_within(
        &mut self,
        wait: Duration,
        wanted: impl Fn(&Value) -> bool,
    ) -> tungstenite::Result<Message> {
        self.ws.get_ref().set_read_timeout(Some(wait)).unwrap();
        let result = loop {
            match self.read() {
                Ok(Message::Text(text)) => {
                    let frame: Value = serde_json::from_str(text.as_str()).unwrap();
                    if wanted(&frame) {
                        break Ok(Message::Text(text));
                    }
                }
                other => break other,
            }
        };
        self.ws.get_ref().set_read_timeout(Some(PATIENCE)).unwrap();
        result
    }

    /// Reads until the server closes; returns how.
    pub fn recv_close(&mut self) -> Closed {
        loop {
            match self.read() {
                Ok(Message::Close(Some(CloseFrame { code, reason }))) => {
                    return Closed::Frame(u16::from(code), reason.as_str().to_owned());
                }
                Ok(Message::Close(None)) => return Closed::Frame(1005, String::new()),
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("the server did not close the connection")
                }
                Err(_) => return Closed::Dropped,
            }
        }
    }

    /// A clean close from the client side.
    pub fn close(mut self) {
        let _ = self.ws.close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        }));
        // Wait for the server's close reply (or the connection's end).
        while self.read().is_ok() {}
    }

    /// Drops the TCP connection without any close frame.
    pub fn drop_abruptly(self) {
        let wire = self.ws.into_inner();
        let _ = wire.tcp().shutdown(std::net::Shutdown::Both);
    }
}

/// A client's place in a room's log: the offset and epoch of a chat, join
/// or leave frame.
pub fn place_of(frame: &Value) -> (u64, String) {
    (
        frame["offset"].as_u64().expect("an offset"),
        frame["epoch"].as_str().expect("an epoch").to_owned(),
    )
}

impl Client {
    /// Connects `nickname` to `addr` (`query`: more of the query string, or
    /// empty), resuming from `place`.
    pub fn resume(
        addr: std::net::SocketAddr,
        nickname: &str,
        query: &str,
        (since, epoch): &(u64, String),
    ) -> Client {
        Client::connect_path(
            addr,
            &format!("/chat/{nickname}?since={since}&epoch={epoch}{query}"),
        )
    }

    /// Reads until the `recovery` frame; returns the chat messages before
    /// it as (nickname, message), and the recovery frame.
    pub fn recovered(&mut self) -> (Vec<(String, String)>, Value) {
        let mut chats = Vec::new();
        loop {
            let frame = self.recv();
            match frame["type"].as_str() {
                Some("recovery") => return (chats, frame),
                Some("chat") => chats.push((
                    frame["nickname"].as_str().unwrap().to_owned(),
                    frame["message"].as_str().unwrap().to_owned(),
                )),
                _ => {}
            }
        }
    }
}
