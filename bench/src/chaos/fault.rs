//! The faults the harness can inject, by name: what `--faults` takes and
//! what the checker's table is keyed by. The schedule that runs them is
//! `faults`; how each is done lives with what it hurts (`topology`,
//! `link`, `world`).

/// The faults, in the order of priority.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Fault {
    /// `CLIENT KILL TYPE pubsub`.
    ClientKill,
    /// `CLIENT KILL TYPE normal`: the publishers' and queries' connections,
    /// maybe after Redis carried out what they sent and before it answered.
    KillPublishers,
    /// `SIGSTOP` of Redis for a few seconds, then `SIGCONT`.
    Stall,
    /// Redis killed and started again empty.
    RestartEmpty,
    /// Redis killed and started again from its append-only file.
    RestartKept,
    /// `kill -9` of an instance (a new one takes its place).
    KillInstance,
    /// Some clients' connections cut; they come back with `since`.
    DropClients,
    /// Sentinel: `SENTINEL FAILOVER`, or the master killed (see `topology`).
    SentinelFailover,
    /// Cluster: a room's master replaced by its replica.
    ClusterFailover,
    /// Cluster: a room's slot moved to another master while in use.
    Migrate,
    /// An instance's link to Redis (or every instance's) cut, then healed
    /// (see `link`).
    LinkCut,
    /// The same link slowed (`netem delay`, or `tbf` without netem).
    LinkSlow,
    /// The same link losing packets (`netem loss`).
    LinkLossy,
}

impl Fault {
    pub(crate) const ALL: [Fault; 13] = [
        Fault::ClientKill,
        Fault::KillPublishers,
        Fault::Stall,
        Fault::RestartEmpty,
        Fault::RestartKept,
        Fault::KillInstance,
        Fault::DropClients,
        Fault::SentinelFailover,
        Fault::ClusterFailover,
        Fault::Migrate,
        Fault::LinkCut,
        Fault::LinkSlow,
        Fault::LinkLossy,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Fault::ClientKill => "client-kill",
            Fault::KillPublishers => "kill-publishers",
            Fault::Stall => "stall",
            Fault::RestartEmpty => "restart-empty",
            Fault::RestartKept => "restart-kept",
            Fault::KillInstance => "kill-instance",
            Fault::DropClients => "drop-clients",
            Fault::SentinelFailover => "sentinel-failover",
            Fault::ClusterFailover => "cluster-failover",
            Fault::Migrate => "migrate",
            Fault::LinkCut => "link-cut",
            Fault::LinkSlow => "link-slow",
            Fault::LinkLossy => "link-lossy",
        }
    }

    /// Whether it needs the harness's own link to Redis (see `link`).
    pub(crate) fn is_link(self) -> bool {
        matches!(self, Fault::LinkCut | Fault::LinkSlow | Fault::LinkLossy)
    }

    pub(crate) fn named(name: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == name)
    }
}
