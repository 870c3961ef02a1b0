//! What the fault schedule acts on: the Redis topology, the threadchat
//! instances and where clients find them, the clients' "drop now" flags,
//! and what each room's log held. Its own module so that the faults
//! (`faults`, `link`) take it from below, not from `main`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use super::client;
use super::topology::Topology;
use super::world::{Directory, Instance, Mode};

/// A logged chat message, from `LRANGE` of the room's log.
pub(crate) struct Logged {
    pub(crate) sender: String,
    pub(crate) seq: u64,
    /// Its `(epoch, offset)`.
    pub(crate) place: Option<(String, u64)>,
}

/// What the schedule acts on.
pub(crate) struct Harness {
    pub(crate) topology: Topology,
    pub(crate) instances: Vec<Option<Instance>>,
    pub(crate) directory: Directory,
    /// Each client's "drop now" flag, and its nickname.
    pub(crate) drops: Vec<Arc<AtomicBool>>,
    pub(crate) nicks: Vec<String>,
    /// Each room's logged messages, as read before each restart that
    /// empties Redis and at the end.
    pub(crate) logs: HashMap<String, Vec<Logged>>,
    rooms: usize,
    binary: String,
    wait_replicas: usize,
    log: Arc<Mutex<Vec<String>>>,
}

impl Harness {
    /// A harness with no instance or client yet.
    pub(crate) fn new(
        topology: Topology,
        rooms: usize,
        binary: String,
        wait_replicas: usize,
    ) -> Harness {
        Harness {
            topology,
            instances: Vec::new(),
            directory: Directory::default(),
            drops: Vec::new(),
            nicks: Vec::new(),
            logs: HashMap::new(),
            rooms,
            binary,
            wait_replicas,
            log: Arc::default(),
        }
    }

    /// The instances' warnings and errors, kept for the report.
    pub(crate) fn log(&self) -> &Mutex<Vec<String>> {
        &self.log
    }

    /// Starts an instance for `slot` (whose link to Redis is its own).
    pub(crate) fn start_instance(&self, slot: usize, mode: Mode) -> anyhow::Result<Instance> {
        Instance::start(
            &self.binary,
            &self.topology.url_for(slot),
            mode,
            self.wait_replicas,
            Arc::clone(&self.log),
        )
    }

    /// The rooms' names.
    pub(crate) fn room_names(&self) -> Vec<String> {
        (0..self.rooms).map(|r| format!("chaos{r}")).collect()
    }

    /// Adds what each room's log holds now to [`Harness::logs`], read from
    /// the node that holds it once the topology is whole.
    pub(crate) fn read_logs(&mut self) -> anyhow::Result<()> {
        self.topology.wait_whole()?;
        for room in self.room_names() {
            let mut con = self.topology.room_connection(&room)?;
            let entries: Vec<String> = redis::cmd("LRANGE")
                .arg(format!("threadchat:{{{room}}}:log"))
                .arg(0)
                .arg(-1)
                .query(&mut con)?;
            let logged = self.logs.entry(room).or_default();
            let known: HashSet<(String, u64)> =
                logged.iter().map(|l| (l.sender.clone(), l.seq)).collect();
            for entry in entries {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&entry) else {
                    continue;
                };
                let Some((sender, seq)) = v["message"].as_str().and_then(|m| m.rsplit_once(" #"))
                else {
                    continue;
                };
                let Ok(seq) = seq.parse() else { continue };
                if !known.contains(&(sender.to_owned(), seq)) {
                    logged.push(Logged {
                        sender: sender.to_owned(),
                        seq,
                        place: client::place_of(&v),
                    });
                }
            }
        }
        Ok(())
    }
}
