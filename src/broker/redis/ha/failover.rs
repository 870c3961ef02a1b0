//! The Sentinel watcher (`tc-sentinel`): hears of a failover the moment
//! the sentinels make it, and moves every subscription to the new master.
//!
//! **Why a thread.** A failover that keeps the old master alive turns it
//! into a replica of the new one. The sentinels then kill its ordinary
//! clients (so publishers reconnect, and ask for the master again), but
//! not its subscribers — and a subscriber of a replica keeps receiving
//! what is published on the master, through replication, while nothing
//! tells it that it is on the wrong server. So one thread per process
//! subscribes to the sentinels' `+switch-master` channel, blocking like any
//! subscriber; when the master it watches moves, it forgets the old
//! master and shuts down every subscription's socket that is connected
//! elsewhere ([`SubscriptionSockets::restart_away_from`]): each reconnects
//! to the new master, and its clients get the usual "lost" and
//! "reconnected" notices.
//!
//! It listens to one sentinel at a time, the next one when that one fails,
//! waiting [`RETRY`] after a round where none answered. Dropping the
//! [`Watcher`] shuts its socket down and joins the thread.

use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::broker::error::BrokerError;
use crate::broker::redis::link::Link;
use crate::broker::redis::outage::fit;
use crate::broker::redis::pubsub::{PubSubConnection, Push};
use crate::broker::redis::settings::CONNECT_TIMEOUT;
use crate::broker::redis::sockets::SubscriptionSockets;

/// The channel on which sentinels announce a new master:
/// `NAME OLD_IP OLD_PORT NEW_IP NEW_PORT`.
const SWITCH_MASTER: &str = "+switch-master";
/// Wait after a round in which no sentinel could be listened to.
const RETRY: Duration = Duration::from_secs(1);

/// The running watcher; dropping it stops it.
pub struct Watcher {
    stopping: Arc<AtomicBool>,
    socket: Arc<Mutex<Option<Arc<TcpStream>>>>,
    /// Dropped to end a wait between rounds.
    stop: Option<Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Starts listening to the sentinels at `addresses` for moves of the
    /// master they call `master_name`; `moved` is called at each one.
    pub fn start(
        addresses: Vec<String>,
        master_name: String,
        link: Link,
        moved: Box<dyn Fn() + Send>,
        subscriptions: &Arc<SubscriptionSockets>,
    ) -> Result<Watcher, BrokerError> {
        let stopping = Arc::new(AtomicBool::new(false));
        let socket: Arc<Mutex<Option<Arc<TcpStream>>>> = Arc::default();
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let watch = Watch {
            moved,
            subscriptions: Arc::clone(subscriptions),
            addresses,
            master_name,
            link,
            stopping: Arc::clone(&stopping),
            socket: Arc::clone(&socket),
        };
        let handle = thread::Builder::new()
            .name("tc-sentinel".into())
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn(move || watch.run(&stopped))
            .map_err(|e| BrokerError::Redis(format!("cannot start the Sentinel watcher: {e}")))?;
        Ok(Watcher {
            stopping,
            socket,
            stop: Some(stop),
            handle: Some(handle),
        })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(socket) = &*self.socket.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = socket.shutdown(Shutdown::Both);
        }
        self.stop.take();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// The watcher thread's state.
struct Watch {
    /// Tells the sentinels' master that it moved.
    moved: Box<dyn Fn() + Send>,
    subscriptions: Arc<SubscriptionSockets>,
    addresses: Vec<String>,
    master_name: String,
    /// How the sentinels are reached (plain TCP, or TLS).
    link: Link,
    stopping: Arc<AtomicBool>,
    socket: Arc<Mutex<Option<Arc<TcpStream>>>>,
}

impl Watch {
    /// The thread's body: listen to each sentinel in turn until stopped.
    ///
    /// A round in which no sentinel could be listened to is logged once
    /// (until then a failover would go unnoticed), and so is the first
    /// sentinel listened to after it: one line when deaf, one when back.
    fn run(self, stopped: &Receiver<()>) {
        let mut deaf: Option<Deaf> = None;
        // When a sentinel was last heard (or the watcher started).
        let mut heard_at = Instant::now();
        while !self.stopping.load(Ordering::SeqCst) {
            // Whether any sentinel was listened to this round, and the
            // last error.
            let (mut heard_any, mut last) = (false, String::new());
            for address in &self.addresses {
                if self.stopping.load(Ordering::SeqCst) {
                    return;
                }
                // The one place this thread's errors are logged.
                if let Err((heard, e)) = self.listen(address, &mut deaf) {
                    log::debug!("Sentinel {address}: {e}; trying the next one");
                    if heard {
                        (heard_any, heard_at) = (true, Instant::now());
                    }
                    last = format!("{address}: {e}");
                }
            }
            if !heard_any && deaf.is_none() && !self.stopping.load(Ordering::SeqCst) {
                deaf = Some(Deaf::since(heard_at, &self.master_name, &last));
            }
            if stopped
                .recv_timeout(RETRY)
                .is_err_and(|e| e.is_disconnected())
            {
                return;
            }
        }
    }

    /// Listens to one sentinel until its connection fails (the error,
    /// and whether it was listened to first) or the watcher stops; hearing
    /// again after `deaf` is logged.
    fn listen(&self, address: &str, deaf: &mut Option<Deaf>) -> Result<(), (bool, io::Error)> {
        let unheard = |e: io::Error| (false, e);
        let client = self
            .link
            .client(address, None, None)
            .map_err(|e| unheard(io::Error::other(e)))?;
        let info = client.get_connection_info();
        let (mut con, socket) =
            PubSubConnection::connect(info, &self.link, CONNECT_TIMEOUT, 4096).map_err(unheard)?;
        *self.socket.lock().unwrap_or_else(|p| p.into_inner()) = Some(socket);
        // Checked after the socket is where `drop` can shut it down.
        if self.stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        con.subscribe(&[SWITCH_MASTER], false).map_err(unheard)?;
        if let Some(deaf) = deaf.take() {
            deaf.heard(address);
        }
        let heard = |e: io::Error| (true, e);
        loop {
            con.wait().map_err(heard)?;
            if let Push::Message { channel, payload } = con.next().map_err(heard)?
                && channel == SWITCH_MASTER.as_bytes()
            {
                self.switched(&String::from_utf8_lossy(&payload));
            }
        }
    }

    /// A `+switch-master` message: if it is about our master, move.
    fn switched(&self, message: &str) {
        let words: Vec<&str> = message.split_whitespace().collect();
        let [name, old_ip, old_port, new_ip, new_port] = words[..] else {
            return;
        };
        if name != self.master_name {
            return;
        }
        // Publishers and queries reopen their connections.
        (self.moved)();
        // Those that reconnected to the new master already (the old one
        // died, and took them with it) stay.
        let n = self
            .subscriptions
            .restart_away_from(&format!("{new_ip}:{new_port}"));
        // None left behind: they were lost with the old master, and went
        // to the new one on their own.
        let moving = match n {
            0 => String::new(),
            n => format!("; moving {n} subscription(s) there"),
        };
        log::warn!(
            "Redis Sentinel: master {name:?} moved from {old_ip}:{old_port} to \
             {new_ip}:{new_port}{moving}"
        );
    }
}

/// The watcher hears no sentinel: since when (logged when it is over).
struct Deaf {
    since: Instant,
}

impl Deaf {
    /// No sentinel of `master` answered since one was last heard, at
    /// `since` (`last`: the last one's error).
    fn since(since: Instant, master: &str, last: &str) -> Deaf {
        let head = format!(
            "Redis Sentinel: no sentinel of {master:?} answers, so a failover \
             would go unnoticed ("
        );
        log::warn!("{}", fit(&head, last, "); retrying"));
        Deaf { since }
    }

    /// Listening to the sentinel at `address` again.
    fn heard(self, address: &str) {
        log::info!(
            "Redis Sentinel: listening to {address} again, after {:.1} s without a sentinel",
            self.since.elapsed().as_secs_f64()
        );
    }
}
