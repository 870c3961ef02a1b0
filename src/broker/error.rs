//! How a relay fails: [`BrokerError`].

/// Why the relay failed. `Clone`, because one failed pipeline answers many
/// waiting publishers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// Could not connect; the relay is unreachable. The URL is shown
    /// without its password, however the error was made.
    #[error("cannot reach Redis at {}: {reason}", redact(.url))]
    Connect {
        /// Where we tried.
        url: String,
        /// What the OS or Redis said.
        reason: String,
    },
    /// An established connection failed or Redis answered with an error.
    #[error("Redis failed: {0}")]
    Redis(String),
    /// The subscriber could not keep up and was dropped by the relay.
    #[error("fell too far behind the room")]
    Lagged,
    /// Redis answered the command with an error (out of memory, a missing
    /// script, a read-only replica…): it was not carried out.
    #[error("Redis refused it: {0}")]
    Refused(String),
    /// Redis did not answer: the command may or may not have been carried
    /// out (a paused or overloaded Redis carries it out later; a Redis
    /// killed after carrying it out never answers). Or it answered, but
    /// fewer replicas than `--wait-replicas` asks for confirmed it: a
    /// failover may lose it. The text says why.
    #[error("{0}")]
    Uncertain(String),
    /// A Redis Cluster serves the room's slot elsewhere now (a resharding
    /// or a failover): the subscription is made again there.
    #[error("the Redis Cluster moved the room to another master")]
    Moved,
    /// The relay is shutting down.
    #[error("the relay is shutting down")]
    Closed,
    /// Taking this client would pass the process's budget of threads or
    /// descriptors (see [`crate::capacity`]): it is refused, nobody else
    /// is hurt.
    #[error("server full: {0}")]
    Full(String),
}

impl BrokerError {
    /// True when the command may have been carried out all the same: the
    /// sender must not be told flatly that its message was not delivered.
    pub fn is_uncertain(&self) -> bool {
        matches!(self, BrokerError::Uncertain(_))
    }
}

/// Hides a password in a Redis URL before it is logged.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***{}", &url[..scheme_end], &url[at..])
        }
        _ => url.to_owned(),
    }
}
