//! threadchat's design in its simplest correct form: read this first. The
//! Python tutorial app's protocol (room `global_room` on Redis, JSON with
//! `"nickname"` and `"message"`) on the card's shape: an accept loop; per
//! client a reader thread and a subscriber thread, coordinated by crossbeam
//! channels; one writer per socket. (The card calls the thread blocked on
//! Redis "the reader" and the one blocked on the WebSocket "the writer":
//! here they are the subscriber and the reader.) docs/ARCHITECTURE.md
//! starts here.
//! Run: `cargo run --example minimal -- redis://127.0.0.1:6379 127.0.0.1:8000`

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use serde_json::{Value, json};
use tungstenite::handshake::server::{ErrorResponse, Request};
use tungstenite::{Message, WebSocket, protocol::Role};

const ROOM: &str = "global_room";
type Writer = Arc<Mutex<WebSocket<TcpStream>>>;
type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let redis = redis::Client::open(args.next().unwrap_or("redis://127.0.0.1:6379".into()))?;
    let listener = TcpListener::bind(args.next().unwrap_or("127.0.0.1:8000".into()))?;
    println!("chat at ws://{}/chat/{{nickname}}", listener.local_addr()?);
    // Reader threads are not joined: this loop never ends (the server's does).
    for (n, stream) in listener.incoming().flatten().enumerate() {
        let redis = redis.clone();
        if let Err(e) = spawn(format!("read-{n}"), move || serve(stream, &redis)) {
            eprintln!("client {n}: cannot start its thread: {e}");
        }
    }
    Ok(())
}

/// Starts a named thread with a small stack; its error, if any, is printed.
fn spawn(
    name: String,
    f: impl FnOnce() -> Result<(), Error> + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    let builder = thread::Builder::new().name(name.clone());
    builder
        .stack_size(256 * 1024)
        .spawn(move || f().unwrap_or_else(|e| eprintln!("{name}: {e}")))
}

/// The reader thread: the handshake, then the client's frames, until it goes.
fn serve(stream: TcpStream, redis: &redis::Client) -> Result<(), Error> {
    stream.set_write_timeout(Some(Duration::from_secs(10)))?; // Slow clients can't hold the lock.
    let socket = WebSocket::from_raw_socket(stream.try_clone()?, Role::Server, None);
    let writer: Writer = Arc::new(Mutex::new(socket));
    let (name_tx, name) = crossbeam_channel::bounded(1);
    let read_half = ReadHalf {
        writes: Box::new(stream.try_clone()?),
        stream,
    };
    #[allow(clippy::result_large_err)] // The callback's type is tungstenite's.
    let mut reader = tungstenite::accept_hdr(read_half, move |req: &Request, res| {
        let path = req.uri().path().strip_prefix("/chat/").unwrap_or_default();
        let nickname = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
        if nickname.is_empty() {
            return Err(ErrorResponse::new(Some("use /chat/{nickname}".into())));
        }
        let _ = name_tx.send(nickname.into_owned());
        Ok(res)
    })?;
    reader.get_mut().writes = Box::new(io::sink()); // From now on, the writer writes.
    let nickname: String = name.recv()?;

    // `ready`: the subscription is live (dropped unsent: it failed).
    // `done`: dropped when the client has gone, to stop the subscriber.
    let (ready_tx, ready) = crossbeam_channel::bounded(1);
    let (done, done_rx) = crossbeam_channel::bounded::<()>(0);
    let (redis2, writer2, nickname2) = (redis.clone(), Arc::clone(&writer), nickname.clone());
    let subscriber = spawn(format!("sub-{nickname}"), move || {
        relay_room(&redis2, &nickname2, &writer2, ready_tx, done_rx)
    })?;
    let mut publisher = redis.get_connection()?;
    ready.recv().map_err(|_| "could not subscribe")?; // (The subscriber said why.)
    loop {
        match reader.read() {
            Ok(Message::Text(text)) => {
                // Clients send `{"message": …}` or plain text.
                let parsed = serde_json::from_str::<Value>(&text).unwrap_or_default();
                let message = parsed["message"].as_str().unwrap_or(&text);
                let payload = json!({ "nickname": nickname, "message": message }).to_string();
                redis::cmd("PUBLISH")
                    .arg(ROOM)
                    .arg(payload)
                    .exec(&mut publisher)?;
            }
            Ok(Message::Ping(data)) => writer.lock().unwrap().send(Message::Pong(data))?,
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let mut writer = writer.lock().unwrap(); // The close reply, or our close:
    let _ = writer.close(None).and_then(|()| writer.flush());
    drop((writer, done));
    let _ = subscriber.join();
    Ok(())
}

/// The subscriber thread: what others say in the room, written to the
/// client. Looks at `done` between Redis reads, at least once a second.
fn relay_room(
    redis: &redis::Client,
    nickname: &str,
    writer: &Writer,
    ready: Sender<()>,
    done: Receiver<()>,
) -> Result<(), Error> {
    let mut connection = redis.get_connection()?;
    let mut subscription = connection.as_pubsub();
    subscription.subscribe(ROOM)?;
    subscription.set_read_timeout(Some(Duration::from_secs(1)))?;
    let _ = ready.send(());
    while let Err(TryRecvError::Empty) = done.try_recv() {
        let payload: String = match subscription.get_message() {
            Ok(message) => message.get_payload()?,
            Err(e) if e.is_timeout() => continue,
            Err(e) => return Err(e.into()),
        };
        // Like the original: forward the raw JSON, except our own messages.
        if serde_json::from_str::<Value>(&payload).unwrap_or_default()["nickname"] == nickname {
            continue;
        }
        let mut writer = writer.lock().unwrap();
        if writer.send(Message::text(payload)).is_err() {
            // Gone, or slower than the write timeout: wake the reader too.
            return Ok(writer.get_ref().shutdown(Shutdown::Both)?);
        }
    }
    Ok(())
}

/// The socket as the reader sees it: writes go nowhere after the handshake.
struct ReadHalf {
    stream: TcpStream,
    writes: Box<dyn Write + Send>,
}

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for ReadHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writes.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writes.flush()
    }
}
