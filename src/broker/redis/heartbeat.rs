//! The heartbeat thread (`tc-heartbeat`): every [`HEARTBEAT`] it marks this
//! instance alive, refreshes the keys of rooms with members here (so they
//! do not expire while in use), and checks that Redis answers — on a
//! cluster, every master; when one does not, it restarts the subscriptions
//! connected to it (see [`SubscriptionSockets`]). When all answer, it sends
//! again what this instance's leaves and nickname releases could not get
//! through, and reconciles the member lists and claims of this instance's
//! rooms with its connections (`ghosts.rs`). It also beats as soon as the
//! relay is back after an outage (`Outage::relay_back`): a Redis that came
//! back empty has lost this instance's liveness key and member entries, and
//! other instances' member lists miss its members until they are put back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use super::ghosts::Ghosts;
use super::job::{Job, Reply, Route};
use super::nodes::Nodes;
use super::queries::{Queues, refresh};
use super::sockets::SubscriptionSockets;
use crate::broker::error::BrokerError;
use crate::protocol::Room;

/// How long an instance's liveness key lives without a refresh.
const INSTANCE_TTL_SECS: u64 = 30;
/// How often the heartbeat refreshes it (more often when `--room-ttl` is
/// shorter than three of these).
const HEARTBEAT: Duration = Duration::from_secs(10);

/// Marks an instance alive for [`INSTANCE_TTL_SECS`] more.
pub(super) fn keep_alive(key: &str) -> redis::Cmd {
    let mut set = redis::cmd("SET");
    set.arg(key).arg(1).arg("EX").arg(INSTANCE_TTL_SECS);
    set
}

/// The running heartbeat thread; dropping it stops the thread (after it
/// has queued the deletion of the liveness key) and joins it.
pub(super) struct Heartbeat {
    /// Dropped to stop the thread.
    stop: Option<Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

/// What the heartbeat keeps alive and checks.
pub(super) struct Beat {
    /// The queue it sends its commands on.
    pub(super) lane: Sender<Job>,
    /// This instance's liveness key.
    pub(super) key: String,
    pub(super) subscriptions: Arc<SubscriptionSockets>,
    pub(super) nodes: Arc<dyn Nodes>,
    /// Rooms with members on this instance (and how many).
    pub(super) local_rooms: Arc<Mutex<HashMap<Room, usize>>>,
    pub(super) room_ttl: Duration,
    /// What this instance has in each room, to reconcile Redis with once it
    /// answers (`ghosts.rs`).
    pub(super) ghosts: Arc<Ghosts>,
    /// The broker's queues, for the reconciliation's reads and writes.
    pub(super) queues: Queues,
    /// Told when the relay is back after an outage: beat at once
    /// (`Outage::relay_back`).
    pub(super) relay_back: Receiver<()>,
}

impl Heartbeat {
    /// Starts the thread that keeps this instance's liveness key fresh and
    /// checks that Redis answers (see [`SubscriptionSockets`]).
    pub(super) fn start(beat: Beat) -> Result<Heartbeat, BrokerError> {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let Beat {
            lane,
            key,
            subscriptions,
            nodes,
            local_rooms,
            room_ttl,
            ghosts,
            queues,
            relay_back,
        } = beat;
        // Rooms in use must be refreshed well within their time to live.
        let every = HEARTBEAT.min(room_ttl / 3);
        let handle = thread::Builder::new()
            .name("tc-heartbeat".into())
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn(move || {
                'beat: loop {
                    // This instance is alive, and rooms in use here do not
                    // expire: a job per room (on a cluster each room is in
                    // a slot of its own), one queue slot each.
                    let _ = lane.try_send(Job::commands(
                        Route::key(&key),
                        vec![keep_alive(&key)],
                        Reply::None,
                    ));
                    let rooms: Vec<Room> = {
                        let rooms = local_rooms.lock().unwrap_or_else(|p| p.into_inner());
                        rooms.keys().cloned().collect()
                    };
                    for room in &rooms {
                        let refresh = refresh(room, room_ttl).collect();
                        let job = Job::commands(Route::room(room), refresh, Reply::None);
                        // A full lane waits, not the rooms: on a busy lane
                        // a heartbeat may take its time.
                        if lane.send_timeout(job, every).is_err() {
                            break;
                        }
                    }
                    // Is Redis there — every master of a cluster? A PING
                    // fails only when the connection does (an error reply
                    // to SET, say out of memory, would not mean the
                    // subscriptions are dead). A paused Redis is noticed by
                    // the publisher's I/O timeout.
                    let masters = nodes.masters().unwrap_or_default();
                    let mut answered = !masters.is_empty();
                    for route in masters {
                        let address = match &route {
                            Route::Node(address) => Some(address.clone()),
                            _ => None,
                        };
                        let (answer_tx, answer) = crossbeam_channel::bounded(1);
                        let ping = Job::commands(
                            route,
                            vec![redis::cmd("PING")],
                            Reply::Values(answer_tx),
                        );
                        if lane.try_send(ping).is_err() {
                            answered = false;
                            continue;
                        }
                        crossbeam_channel::select! {
                            recv(answer) -> answer => if let Ok(Err(e)) = answer {
                                answered = false;
                                let n = match &address {
                                    Some(address) => subscriptions.restart_at(address),
                                    None => subscriptions.restart_all(),
                                };
                                let which = address.as_deref().unwrap_or("Redis");
                                // Subscriptions that are down already are
                                // reconnecting: only live ones restart.
                                let restarting = match n {
                                    0 => String::new(),
                                    n => format!("; restarting {n} live subscription(s)"),
                                };
                                super::outage::warn_repeated("heartbeat", || {
                                    format!("{which} did not answer the heartbeat ({e}){restarting}")
                                });
                            },
                            recv(stop_rx) -> _ => break 'beat,
                        }
                    }
                    // Redis answers: what it missed of this instance's
                    // leaves and claims is put right.
                    if answered {
                        ghosts.beat(&queues, room_ttl);
                    }
                    // Failures summed up and gone quiet are counted now.
                    super::outage::flush_repeated();
                    // The next beat: in `every`, or at once when the relay
                    // is back. Shutdown by dropping the sender: recv fails.
                    crossbeam_channel::select! {
                        recv(stop_rx) -> _ => break,
                        recv(relay_back) -> back => {
                            // No outage left to hear (the broker is going):
                            // wait as ever, not in a loop.
                            if back.is_err() && stop_rx.recv_timeout(every).is_err_and(|e| e.is_disconnected()) {
                                break;
                            }
                        }
                        default(every) => {}
                    }
                }
                // Gone on purpose: no need to wait for the key to expire.
                let mut del = redis::cmd("DEL");
                del.arg(&key);
                let _ = lane.try_send(Job::commands(Route::key(&key), vec![del], Reply::None));
            })
            .map_err(|e| BrokerError::Redis(format!("cannot start the heartbeat thread: {e}")))?;
        Ok(Heartbeat {
            stop: Some(stop_tx),
            handle: Some(handle),
        })
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        // Shutdown by dropping the sender: the thread leaves its loop.
        self.stop.take();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}
