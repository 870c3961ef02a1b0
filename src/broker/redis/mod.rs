//! The Redis broker: one `SUBSCRIBE` connection per chat connection (or, in
//! shared mode, per room), and a small shared pool of publishing connections.
//!
//! **Subscribing.** By default each chat connection's subscriber thread opens
//! its own Redis connection and blocks reading it, as the design asks. With
//! `--subscriptions shared` a room's listener thread does that once for all the
//! room's clients on this instance, and its dispatcher fans out over their
//! queues (`SharedFeeds` in `shared.rs`, and [`fanout`](super::fanout)).
//!
//! A subscription is read by hand ([`pubsub`]) rather than
//! with the `redis` crate's `PubSub`, whose blocking `get_message` cannot be
//! interrupted and cannot tell whether more messages are already buffered.
//! Owning the socket, [`Canceller::cancel`](crate::broker::Canceller::cancel) sets a flag and shuts the socket
//! down: the blocked read returns at once. The listener checks the flag only
//! after its socket is registered with the canceller and `SUBSCRIBE` is
//! acknowledged, so a cancel can never fall in a gap. (`CLIENT KILL` would
//! need admin rights, and a read timeout would poll.) A quiet subscription
//! is never pinged: the heartbeat thread checks Redis once for all of them
//! (`sockets.rs`).
//!
//! **Where Redis is** (`nodes.rs`): one seam, built once at start, that
//! every connection asks where to go each time it (re)connects. With one
//! server its answers are constants. Redis Sentinel (a master the
//! sentinels name, followed through a failover) and Redis Cluster (a room
//! lives on the master of its slot, its subscriptions use sharded pub/sub
//! there, and publishers keep a connection per master) answer it too: they
//! are the `redis-ha` Cargo feature (`ha/`, on by default).
//!
//! **Publishing.** Opening a Redis connection per client for publishing would
//! double Redis's client count. Instead [`POOL_SIZE`](settings::POOL_SIZE) publisher threads each
//! own one connection and a bounded job queue (a *lane*). A publisher takes
//! every job that is waiting (up to [`MAX_PIPELINE`](settings::MAX_PIPELINE)) and sends them as one
//! pipeline — one round trip for many messages. A room's messages always
//! take the same lane, and Redis answers one connection's commands in order,
//! so messages reach the room in the order they were queued: a client may
//! have many on their way without any overtaking another.
//! [`Broker::publish`](crate::broker::Broker::publish) returns a [`Receipt`](crate::broker::Receipt) at once; the answer arrives on
//! it when the pipeline has been answered.
//!
//! The same pool runs every other command (history, member lists, health
//! checks), on any lane: a job is a short list of commands and, when the
//! caller waits, a channel for the answer.
//!
//! **Rooms' state in Redis** (key names in [`keys`]). A room's *log* is a
//! list bounded in count and in bytes, with its size in bytes kept in a key
//! beside it and its position (epoch, last offset given, first still held)
//! in a hash. Every chat message, join and leave is given the next offset,
//! logged, and published by one Lua script (`LOG_AND_PUBLISH`, in
//! `scripts.rs`): Redis runs a script whole or not at all, so an event is
//! logged *and* published, or neither — and when Redis refuses writes
//! (`maxmemory` with `noeviction`), the sender is told so truthfully. The
//! same script changes the member list (a hash, connection id → nickname)
//! for a join or a leave, so the list agrees with the log at every offset.
//! A publisher sends a run of one room's events that wait next to each
//! other on its lane as one call of the script (`coalesce.rs`): one
//! `EVALSHA` per message made Redis read too few messages per turn of its
//! event loop. Every instance refreshes a key `threadchat:instance:{id}`
//! (30 s expiry) every 10 s from its heartbeat thread; members whose
//! instance key has expired — the instance crashed or was killed — are
//! left out of member lists and removed (`members.rs`). A live instance's own
//! entries are kept right by itself: leaves and nickname releases that could
//! not reach Redis are sent again, and each heartbeat reconciles its entries
//! with its connections (`ghosts.rs`). Every per-room key expires `--room-ttl` after its last use:
//! each message and join refreshes it, and the heartbeat refreshes the keys
//! of rooms that have members on this instance, so only abandoned rooms
//! expire.
//!
//! **Queries** (history, member lists, joins, health checks) have
//! connections and threads of their own (`tc-query-0` and `-1`, taken in
//! turn), so a flood of them never queues in front of a `PUBLISH`. Two, as
//! for publishing: during a join storm every joiner makes a few queries in a
//! row, and one connection makes them wait for each other.
//!
//! **Shutdown.** Dropping the [`RedisBroker`] stops the heartbeat and drops
//! the job senders; each publisher's `recv()` then fails, it leaves its loop,
//! and the drop joins it.

mod broker;
mod coalesce;
mod gaps;
mod ghosts;
#[cfg(feature = "redis-ha")]
mod ha;
#[cfg(not(feature = "redis-ha"))]
#[path = "without_ha.rs"]
mod ha;
mod heartbeat;
mod idle;
mod job;
mod keys;
mod link;
mod listener;
mod members;
mod nodes;
mod outage;
mod parse_once;
mod place_keys;
mod position;
mod publisher;
mod pubsub;
mod queries;
mod scripts;
mod settings;
mod shared;
mod sockets;

pub use broker::RedisBroker;
