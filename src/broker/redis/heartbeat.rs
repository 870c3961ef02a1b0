//! The heartbeat thread (`tc-heartbeat`): every [`HEARTBEAT`] it marks this
//! instance alive, refreshes the keys of rooms with members here (so they
//! do not expire while in use), and checks that Redis answers — on a
//! cluster, every master; when one does not, it restarts the subscriptions
//! connected to it (see [`SubscriptionSockets`](super::listener::SubscriptionSockets)).

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::RedisBroker;
use super::cluster::Route;
use super::keys;
use super::publisher::{Job, Reply};
use crate::broker::BrokerError;
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

impl RedisBroker {
    /// Starts the thread that keeps this instance's liveness key fresh and
    /// checks that Redis answers (see [`SubscriptionSockets`](super::listener::SubscriptionSockets)).
    pub(super) fn start_heartbeat(&mut self) -> Result<(), BrokerError> {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let lane = self.lanes[0].clone();
        let key = keys::instance(&self.instance_id());
        let subscriptions = Arc::clone(&self.subscriptions);
        let topology = Arc::clone(&self.topology);
        let local_rooms = Arc::clone(&self.local_rooms);
        let room_ttl = self.settings.room_ttl;
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
                        let refresh = RedisBroker::refresh(room, room_ttl).collect();
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
                    for (address, route) in topology.masters().unwrap_or_default() {
                        let (answer_tx, answer) = crossbeam_channel::bounded(1);
                        let ping = Job::commands(
                            route,
                            vec![redis::cmd("PING")],
                            Reply::Values(answer_tx),
                        );
                        if lane.try_send(ping).is_err() {
                            continue;
                        }
                        crossbeam_channel::select! {
                            recv(answer) -> answer => if let Ok(Err(e)) = answer {
                                let n = match &address {
                                    Some(address) => subscriptions.restart_at(address),
                                    None => subscriptions.restart_all(),
                                };
                                let which = address.as_deref().unwrap_or("Redis");
                                log::warn!(
                                    "{which} did not answer the heartbeat ({e}); \
                                     restarting {n} subscription(s)"
                                );
                            },
                            recv(stop_rx) -> _ => break 'beat,
                        }
                    }
                    // Shutdown by dropping the sender: recv fails at once.
                    if let Err(crossbeam_channel::RecvTimeoutError::Disconnected) =
                        stop_rx.recv_timeout(every)
                    {
                        break;
                    }
                }
                // Gone on purpose: no need to wait for the key to expire.
                let mut del = redis::cmd("DEL");
                del.arg(&key);
                let _ = lane.try_send(Job::commands(Route::key(&key), vec![del], Reply::None));
            })
            .map_err(|e| BrokerError::Redis(format!("cannot start the heartbeat thread: {e}")))?;
        self.heartbeat_stop = Some(stop_tx);
        self.heartbeat = Some(handle);
        Ok(())
    }
}
