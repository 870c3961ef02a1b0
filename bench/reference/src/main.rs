//! `threadchat-async-reference`: the chat that threadchat's bench scenarios
//! a, b and c use, written the way a competent tokio user would write it, so
//! that `make versus` can set threadchat's threads beside async tasks.
//!
//! What it does, in the usual async shape:
//!
//! * `GET /chat/{nickname}?room={room}` upgrades to a WebSocket
//!   (tokio-tungstenite); the client first gets a `presence` frame, the
//!   room's members on this process (a count and at most 100 names, as
//!   threadchat sends).
//! * A task per client reads its frames (the stream half of a split
//!   WebSocket) and hands each text frame to the client's publisher task,
//!   which publishes what is waiting (up to 64, as threadchat does) as one
//!   pipeline to the room's Redis channel, in order, over one multiplexed
//!   connection shared by the whole process.
//! * One Redis subscription per room per process: a task reads the room's
//!   async `PubSub` stream, serializes each message once into the client
//!   frame, and hands it to a `tokio::sync::broadcast` channel.
//! * A writer task per client (the sink half) receives from the broadcast,
//!   skips the client's own messages (no echo), and `feed`s each frame into
//!   the sink; it flushes when the broadcast has nothing more waiting, so a
//!   burst costs one write.
//! * A client that falls more than [`QUEUE_LIMIT`] frames behind
//!   (broadcast's `Lagged`), or whose writes block [`WRITE_TIMEOUT`], is
//!   closed with 1008, as threadchat closes a client too slow to keep up.
//!
//! The Redis payload and the client's frame have threadchat's shape and
//! about its sizes (`offset`, `epoch`, `conn`, `id`, `ts`; the payload
//! lacks only threadchat's 16-digit log `tag`), so Redis and the kernel
//! move about the same bytes for both.
//!
//! What it leaves out, and why the comparison stays fair (or favours it):
//! no room history or log (threadchat runs with `--history 0`, but still
//! places each message in the room's log with a Lua script, where this
//! server sends a plain `PUBLISH`: less work for Redis and for the
//! server), no presence across instances and no join/leave announcements
//! (less work per connect), no tokens, no TLS, no limits (threadchat's
//! are off in the bench, but it still counts), no pings, no metrics, no
//! graceful shutdown (Ctrl-C ends the process), no reconnecting to Redis.
//! The one setting that is not a default: tungstenite's read buffer is
//! 8 KiB, not 128 KiB, because tungstenite zero-fills it before every read
//! (128 KiB of memset per frame, and of RSS per idle client) — a cost of
//! that library, not of async, and the load generator sets the same.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher, RandomState};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Frames a client may fall behind its room before it is closed as too
/// slow: the broadcast channel's capacity (threadchat's shared
/// subscriptions drop a client 4,096 events behind, too).
const QUEUE_LIMIT: usize = 4096;

/// How long writing a batch to a client may block (its buffers full: it
/// stopped reading) before it is closed as too slow (threadchat's
/// `--write-timeout` default).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The most messages of one client handed to its publisher and not yet
/// published (threadchat's window too).
const PUBLISH_WINDOW: usize = 64;

/// Most nicknames listed in a presence frame (threadchat's limit too).
const PRESENCE_LIST: usize = 100;

/// The room a client joins when its URL names none.
const DEFAULT_ROOM: &str = "general";

#[derive(Parser)]
#[command(
    about = "The bench's chat, written with tokio: what `make versus` compares threadchat with"
)]
struct Args {
    /// The Redis to relay through, e.g. redis://127.0.0.1:6379.
    #[arg(long)]
    redis: String,
    /// The port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
}

/// What every task shares: the Redis client and publishing connection, and
/// the rooms this process has members in.
struct Shared {
    /// Opens a subscription connection for each room.
    redis: redis::Client,
    /// One multiplexed connection for every `PUBLISH` (cloning it is cheap:
    /// the clones share the connection).
    publisher: MultiplexedConnection,
    /// Room name → its broadcast and members. A plain mutex: it is held
    /// only to look up, join or leave, never across an `.await`.
    rooms: Mutex<HashMap<String, Room>>,
    /// This process's id in `conn` (threadchat's: 16 hex digits).
    instance: String,
    /// Stands in for threadchat's log epoch (12 hex digits), for the size.
    epoch: String,
    /// Numbers connections (`conn` is `{instance}-{n}`).
    next_conn: AtomicU64,
    /// Stands in for threadchat's log offset, for the size.
    next_offset: AtomicU64,
}

/// One room with members on this process.
struct Room {
    /// The room's frames, each serialized once, for every member's writer.
    frames: broadcast::Sender<Delivery>,
    /// Becomes `true` once the room's Redis subscription is live; dropped
    /// (an error to waiters) if it could not be made.
    subscribed: watch::Receiver<bool>,
    /// Connection number → nickname, in the order they joined.
    members: BTreeMap<u64, String>,
    /// The task reading the room's subscription, aborted with the last
    /// member's leaving (which drops its Redis connection: `UNSUBSCRIBE`).
    relay: JoinHandle<()>,
}

/// One frame for the members of a room.
#[derive(Clone)]
struct Delivery {
    /// The `conn` of the sender, whom the frame is not written to.
    from: Arc<str>,
    /// The WebSocket text, shared by every member (a reference count).
    frame: Utf8Bytes,
}

/// What is published to a room's channel (threadchat's payload, less its
/// log `tag`).
#[derive(Serialize)]
struct Published<'a> {
    offset: u64,
    epoch: &'a str,
    nickname: &'a str,
    message: &'a str,
    conn: &'a str,
    id: String,
    ts: u64,
}

/// What the room's relay reads from the channel. threadchat's own payloads
/// parse too; its joins and leaves (with a `type`) are skipped.
#[derive(Deserialize)]
struct Received {
    #[serde(rename = "type")]
    kind: Option<String>,
    offset: u64,
    epoch: String,
    nickname: String,
    message: String,
    conn: String,
    ts: u64,
}

/// The chat frame a client receives (threadchat's).
#[derive(Serialize)]
struct ChatFrame<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    nickname: &'a str,
    message: &'a str,
    ts: u64,
    offset: u64,
    epoch: &'a str,
}

/// Why a connection ended other than by the client closing it.
#[derive(Debug)]
enum Ending {
    /// Boxed: tungstenite's error is large, and this one travels every
    /// `?` of a connection's life.
    WebSocket(Box<tokio_tungstenite::tungstenite::Error>),
    Redis(redis::RedisError),
    /// The room's subscription could not be made.
    NotSubscribed,
    /// The client fell [`QUEUE_LIMIT`] frames behind.
    TooSlow,
}

impl From<tokio_tungstenite::tungstenite::Error> for Ending {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        Ending::WebSocket(Box::new(e))
    }
}

impl From<redis::RedisError> for Ending {
    fn from(e: redis::RedisError) -> Self {
        Ending::Redis(e)
    }
}

/// The default runtime: multi-threaded, one worker per core.
#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match serve(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("threadchat-async-reference: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Connects to Redis, binds, and accepts connections, a task each.
async fn serve(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let redis = redis::Client::open(args.redis.as_str())?;
    let publisher = redis.get_multiplexed_async_connection().await?;
    let listener = TcpListener::bind(SocketAddr::new(args.bind, args.port)).await?;
    let addr = listener.local_addr()?;
    // As threadchat says it (the load generator asks /proc instead).
    eprintln!(
        "threadchat-async-reference listening on ws://{addr}/chat/{{nickname}} (relay: Redis at {})",
        args.redis
    );
    let shared = Arc::new(Shared {
        redis,
        publisher,
        rooms: Mutex::new(HashMap::new()),
        instance: format!("{:016x}", random()),
        epoch: format!("{:012x}", random() >> 16),
        next_conn: AtomicU64::new(1),
        next_offset: AtomicU64::new(1),
    });
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                tokio::spawn(handle(Arc::clone(&shared), tcp));
            }
            // Out of descriptors, most likely: wait for some to close.
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One connection, from the upgrade to the end. A closed or reset socket
/// is the usual way out, and a client too slow was told why: neither is
/// logged (as tungstenite's own server example sorts them).
async fn handle(shared: Arc<Shared>, tcp: TcpStream) {
    use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
    match chat(shared, tcp).await {
        Ok(()) | Err(Ending::TooSlow) => {}
        Err(Ending::WebSocket(e)) => match *e {
            WsError::ConnectionClosed
            | WsError::AlreadyClosed
            | WsError::Io(_)
            | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {}
            e => eprintln!("websocket: {e}"),
        },
        Err(Ending::Redis(e)) => eprintln!("redis: {e}"),
        Err(Ending::NotSubscribed) => eprintln!("a room's subscription failed"),
    }
}

/// Upgrades, joins the room, then reads and writes until either side ends.
async fn chat(shared: Arc<Shared>, tcp: TcpStream) -> Result<(), Ending> {
    tcp.set_nodelay(true)
        .map_err(|e| Ending::WebSocket(Box::new(e.into())))?;
    let mut wanted = None;
    let config = WebSocketConfig::default().read_buffer_size(8 << 10);
    // The callback's type is tungstenite's (its refusal is an HTTP response).
    #[allow(clippy::result_large_err)]
    let ws = tokio_tungstenite::accept_hdr_async_with_config(
        tcp,
        |request: &Request, response: Response| match parse_target(request) {
            Some(target) => {
                wanted = Some(target);
                Ok(response)
            }
            None => {
                let mut refused = ErrorResponse::new(Some("not found".into()));
                *refused.status_mut() = StatusCode::NOT_FOUND;
                Err(refused)
            }
        },
        Some(config),
    )
    .await?;
    let (nickname, room) = wanted.expect("set by an accepted upgrade");
    let number = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let conn: Arc<str> = format!("{}-{number}", shared.instance).into();

    let (membership, frames, mut subscribed, presence) =
        Membership::join(&shared, &room, number, &nickname);
    // Nothing published before the subscription is live would arrive.
    subscribed
        .wait_for(|live| *live)
        .await
        .map_err(|_| Ending::NotSubscribed)?;
    let (mut sink, stream) = ws.split();
    sink.send(Message::text(presence)).await?;

    let mut writer = tokio::spawn(write_room(sink, frames, Arc::clone(&conn)));
    let reading = read_and_publish(stream, &shared, &membership, &conn, &nickname);
    let ending = tokio::select! {
        read = reading => read,
        written = &mut writer => written.unwrap_or(Ok(())),
    };
    writer.abort();
    ending
}

/// `/chat/{nickname}?room={room}` → (nickname, room); `None` for any other
/// path. (No percent-decoding: the bench's names are plain.)
fn parse_target(request: &Request) -> Option<(String, String)> {
    let nickname = request.uri().path().strip_prefix("/chat/")?;
    if nickname.is_empty() || nickname.contains('/') {
        return None;
    }
    let room = request
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("room="))
        .filter(|room| !room.is_empty())
        .unwrap_or(DEFAULT_ROOM);
    Some((nickname.to_owned(), room.to_owned()))
}

/// A client's place in a room; leaving is its drop, however the
/// connection ends.
struct Membership {
    shared: Arc<Shared>,
    room: String,
    number: u64,
}

impl Membership {
    /// Joins `room`, opening its subscription if it is the room's first
    /// member here. Returns the room's frames from now on, the
    /// subscription's state, and the `presence` frame for the new member.
    fn join(
        shared: &Arc<Shared>,
        room: &str,
        number: u64,
        nickname: &str,
    ) -> (
        Membership,
        broadcast::Receiver<Delivery>,
        watch::Receiver<bool>,
        String,
    ) {
        let mut rooms = shared.rooms.lock().expect("no panics under the lock");
        let entry = rooms.entry(room.to_owned()).or_insert_with(|| {
            let (frames, _) = broadcast::channel(QUEUE_LIMIT);
            let (live, subscribed) = watch::channel(false);
            let relay = tokio::spawn(relay_room(
                shared.redis.clone(),
                channel_of(room),
                frames.clone(),
                live,
            ));
            Room {
                frames,
                subscribed,
                members: BTreeMap::new(),
                relay,
            }
        });
        entry.members.insert(number, nickname.to_owned());
        // Like threadchat's: in a big room, a count and the first names.
        let count = entry.members.len();
        let members: Vec<&str> = entry
            .members
            .values()
            .take(PRESENCE_LIST)
            .map(String::as_str)
            .collect();
        let names = members.join(", ");
        let message = if count > members.len() {
            format!("in {room}: {count} people, among them {names}")
        } else {
            format!("in {room}: {names}")
        };
        let presence = serde_json::json!({
            "type": "presence",
            "nickname": "server",
            "message": message,
            "room": room,
            "members": members,
            "count": count,
            "offset": shared.next_offset.load(Ordering::Relaxed),
            "epoch": shared.epoch,
        })
        .to_string();
        let membership = Membership {
            shared: Arc::clone(shared),
            room: room.to_owned(),
            number,
        };
        (
            membership,
            entry.frames.subscribe(),
            entry.subscribed.clone(),
            presence,
        )
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let mut rooms = self.shared.rooms.lock().expect("no panics under the lock");
        if let Some(room) = rooms.get_mut(&self.room) {
            room.members.remove(&self.number);
            if room.members.is_empty() {
                room.relay.abort();
                rooms.remove(&self.room);
            }
        }
    }
}

/// The Redis channel of a room (threadchat's name for it).
fn channel_of(room: &str) -> String {
    format!("threadchat:room:{room}")
}

/// Reads the client's frames and hands each text to the client's
/// publisher task, in order, until the client closes; then waits for what
/// it handed over to be published.
async fn read_and_publish(
    mut stream: SplitStream<WebSocketStream<TcpStream>>,
    shared: &Shared,
    membership: &Membership,
    conn: &str,
    nickname: &str,
) -> Result<(), Ending> {
    // Room for a window's worth: a client further ahead waits (its socket
    // fills), as it would for threadchat.
    let (to_publish, waiting) = mpsc::channel(PUBLISH_WINDOW);
    let publisher = tokio::spawn(publish(
        shared.publisher.clone(),
        channel_of(&membership.room),
        waiting,
    ));
    let mut sent = 0u64;
    while let Some(message) = stream.next().await {
        let text = match message? {
            Message::Text(text) => text,
            Message::Close(_) => break,
            // Pings are answered by tungstenite; the rest is ignored.
            _ => continue,
        };
        sent += 1;
        let payload = Published {
            offset: shared.next_offset.fetch_add(1, Ordering::Relaxed),
            epoch: &shared.epoch,
            nickname,
            message: text.as_str(),
            conn,
            id: format!("{conn}:{sent}"),
            ts: unix_millis(),
        };
        let payload = serde_json::to_string(&payload).expect("plain fields serialize");
        if to_publish.send(payload).await.is_err() {
            break; // The publisher failed: its error is below.
        }
    }
    drop(to_publish);
    publisher.await.unwrap_or(Ok(()))
}

/// A client's publisher: takes what the reader has handed over, up to
/// [`PUBLISH_WINDOW`] messages, and publishes them as one pipeline (one
/// write, one round trip, in order), until the reader is done.
///
/// This is how threadchat publishes too (up to 64 of a client's messages
/// in flight). Awaiting each `PUBLISH` alone would cost a round trip per
/// message; sending several at once from concurrent futures would not keep
/// them in order.
async fn publish(
    mut connection: MultiplexedConnection,
    channel: String,
    mut waiting: mpsc::Receiver<String>,
) -> Result<(), Ending> {
    let mut batch = Vec::with_capacity(PUBLISH_WINDOW);
    while waiting.recv_many(&mut batch, PUBLISH_WINDOW).await > 0 {
        let mut pipeline = redis::pipe();
        for payload in batch.drain(..) {
            pipeline.publish(&channel, payload).ignore();
        }
        let () = pipeline.query_async(&mut connection).await?;
    }
    Ok(())
}

/// Writes the room's frames to one client, but its own, a batch at a
/// time. Ends when the room's relay is gone, when the socket fails, or
/// when the client is too slow: [`QUEUE_LIMIT`] frames behind, or a batch
/// blocked [`WRITE_TIMEOUT`] on a client that stopped reading.
async fn write_room(
    mut sink: SplitSink<WebSocketStream<TcpStream>, Message>,
    mut frames: broadcast::Receiver<Delivery>,
    conn: Arc<str>,
) -> Result<(), Ending> {
    loop {
        let first = frames.recv().await;
        let batch = write_batch(&mut sink, &mut frames, first, &conn);
        match tokio::time::timeout(WRITE_TIMEOUT, batch).await {
            Ok(Ok(Written::More)) => {}
            Ok(Ok(Written::RoomGone)) => return Ok(()),
            Ok(Err(Ending::TooSlow)) | Err(_) => return close_too_slow(sink).await,
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// What a batch left behind.
enum Written {
    /// The room goes on: wait for more.
    More,
    /// The room's broadcast is gone (its relay ended).
    RoomGone,
}

/// `feed`s `first` and every frame already waiting into the sink, then
/// flushes them with one write.
async fn write_batch(
    sink: &mut SplitSink<WebSocketStream<TcpStream>, Message>,
    frames: &mut broadcast::Receiver<Delivery>,
    first: Result<Delivery, RecvError>,
    conn: &Arc<str>,
) -> Result<Written, Ending> {
    let mut next = Some(first);
    while let Some(received) = next {
        match received {
            Ok(delivery) => {
                if delivery.from != *conn {
                    sink.feed(Message::Text(delivery.frame)).await?;
                }
            }
            Err(RecvError::Lagged(_)) => return Err(Ending::TooSlow),
            Err(RecvError::Closed) => return Ok(Written::RoomGone),
        }
        next = match frames.try_recv() {
            Ok(delivery) => Some(Ok(delivery)),
            Err(TryRecvError::Lagged(n)) => Some(Err(RecvError::Lagged(n))),
            Err(TryRecvError::Closed) => Some(Err(RecvError::Closed)),
            Err(TryRecvError::Empty) => None,
        };
    }
    sink.flush().await?;
    Ok(Written::More)
}

/// Closes a client too slow with 1008, waiting at most a second for the close to be written (its buffers may
/// well be full).
async fn close_too_slow(
    mut sink: SplitSink<WebSocketStream<TcpStream>, Message>,
) -> Result<(), Ending> {
    let close = Message::Close(Some(CloseFrame {
        code: CloseCode::Policy,
        reason: "too slow: not reading messages".into(),
    }));
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(close)).await;
    Err(Ending::TooSlow)
}

/// The task that reads a room's subscription: subscribes, says so on
/// `live`, then turns each message into the client frame once and
/// broadcasts it. It ends when aborted (the room's last member left) or
/// when the subscription fails (the members then get nothing more: this
/// server does not reconnect).
async fn relay_room(
    redis: redis::Client,
    channel: String,
    frames: broadcast::Sender<Delivery>,
    live: watch::Sender<bool>,
) {
    let relayed = async {
        let mut pubsub = redis.get_async_pubsub().await?;
        pubsub.subscribe(&channel).await?;
        live.send_replace(true);
        let mut messages = pubsub.into_on_message();
        while let Some(message) = messages.next().await {
            let Ok(received) = serde_json::from_slice::<Received>(message.get_payload_bytes())
            else {
                continue;
            };
            if received.kind.is_some() {
                continue;
            }
            let frame = ChatFrame {
                kind: "chat",
                nickname: &received.nickname,
                message: &received.message,
                ts: received.ts,
                offset: received.offset,
                epoch: &received.epoch,
            };
            let frame = serde_json::to_string(&frame).expect("plain fields serialize");
            // An error only means no member is listening right now.
            let _ = frames.send(Delivery {
                from: received.conn.into(),
                frame: frame.into(),
            });
        }
        Ok::<(), redis::RedisError>(())
    };
    if let Err(e) = relayed.await {
        eprintln!("subscription to {channel}: {e}");
    }
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A random number, from the standard library's randomly keyed hasher.
fn random() -> u64 {
    RandomState::new().build_hasher().finish()
}
