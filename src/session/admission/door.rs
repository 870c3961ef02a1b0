//! The admission wing's one door. A connection meets admission at three
//! moments, always through the [`Admission`] built once at start:
//!
//! * **At accept** ([`Admission::arrive`]), before a thread is spent on
//!   it: its place in its address's count (`--max-connections-per-ip`; a
//!   trusted proxy's clients are counted later, by the address it
//!   forwards) and among the connections still starting. They make its
//!   [`Pass`], which its `Conn` keeps.
//! * **With its request** ([`Admission::identify`],
//!   [`Admission::admit_reader`], for the router): with tokens, who the
//!   client is and what it may join.
//! * **Before its upgrade** ([`Admission::admit`]): the forwarded address's
//!   count, its user's connections, a new room's cost, its address's share
//!   of the rate limit, its claim on its nickname. What it takes goes on
//!   its pass.
//!
//! Every place and claim is a guard held by the pass: when the
//! connection's last thread ends, its `Conn` drops, and with it all of
//! them. The read loop asks the pass for its rate limiter
//! ([`Pass::limiter`]) and the door for the token's [`Lease`], knowing
//! nothing of where either comes from.

use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tungstenite::http::StatusCode;

use super::address_rate::{AddressLimiters, AddressShare};
use super::new_rooms::NewRooms;
use super::per_ip::{PerIp, Slot};
use super::refusals::{Refusal, Refusals};
use super::starting::{StartSlot, Starting};
use super::tokens::{Lease, Tokens, UserSlot};
use super::unique::{NicknameClaim, Unique};
use crate::broker::Broker;
use crate::config::Config;
use crate::http;
use crate::metrics::Metrics;
use crate::protocol::{ConnId, Member, Room};
use crate::session::rate::SharedLimiter;

/// Everything admission keeps across connections: built once, from the
/// configuration.
pub struct Admission {
    /// Where nickname claims live, and where a room's log says it exists.
    broker: Arc<dyn Broker>,
    /// Where refusals are counted.
    metrics: Arc<Metrics>,
    /// Proxies whose clients are counted by the address they forward
    /// (`--trusted-proxy`).
    trusted_proxies: Vec<IpAddr>,
    /// Connections per client address (`--max-connections-per-ip`).
    per_ip: Arc<PerIp>,
    /// Connections in their start, per address (`--max-starting-per-ip`).
    starting: Arc<Starting>,
    /// Counts refusals and keeps them from flooding the log.
    refusals: Refusals,
    /// With a key configured, tokens and each user's connections.
    tokens: Option<Tokens>,
    /// Rooms each address may still create (`--new-rooms-per-minute`).
    new_rooms: NewRooms,
    /// With a rate limit, each address's limiter, shared by its
    /// connections (users have theirs in `tokens`).
    address_rates: Option<Arc<AddressLimiters>>,
    /// With `--unique-nicknames`, the claims and how many each address
    /// holds.
    unique: Option<Unique>,
}

/// What one connection holds of admission; every place and claim in it is
/// given back when it is dropped, with the connection's `Conn`.
#[derive(Debug)]
pub struct Pass {
    /// Its place in its address's count: taken at accept, or, through a
    /// trusted proxy, once the forwarded address is known (never both).
    address: OnceLock<Slot>,
    /// Its place among the connections in their start, until its request
    /// is read.
    start: Mutex<Option<StartSlot>>,
    /// What its request took, once admitted.
    admitted: OnceLock<Admitted>,
}

/// What a request's admission took.
#[derive(Debug, Default)]
struct Admitted {
    /// With tokens, its place among its user's connections, with the
    /// user's rate limiter.
    user: Option<UserSlot>,
    /// With a rate limit and no token, its share of its address's limiter.
    address_rate: Option<AddressShare>,
    /// With `--unique-nicknames`, its claim on its nickname in its room.
    nickname: Option<NicknameClaim>,
}

/// A request refused: the HTTP status and the reason to answer with.
pub use crate::http::Refusal as Refused;

impl Admission {
    /// Admission as `config` sets it up, with nickname claims kept in
    /// `broker` and refusals counted in `metrics`.
    pub fn new(config: &Config, broker: Arc<dyn Broker>, metrics: Arc<Metrics>) -> Admission {
        Refusals::register(&metrics);
        let limits = &config.limits;
        Admission {
            trusted_proxies: limits.trusted_proxies.clone(),
            per_ip: PerIp::new(limits.max_connections_per_ip),
            starting: Starting::new(
                limits.max_starting,
                limits.max_starting_per_ip,
                limits.handshake_timeout,
            ),
            refusals: Refusals::default(),
            tokens: Tokens::new(config),
            new_rooms: NewRooms::new(limits.new_rooms_per_minute),
            address_rates: limits
                .rate_limit
                .map(|rate| AddressLimiters::new(rate, limits.rate_burst)),
            unique: limits
                .unique_nicknames
                .then(|| Unique::new(Arc::clone(&broker), limits.max_nicknames_per_ip)),
            broker,
            metrics,
        }
    }

    /// A connection from `ip` is accepted: its places (in its address's
    /// count, and among the connections in their start), or why not and
    /// what to answer.
    pub fn arrive(&self, ip: IpAddr) -> Result<Pass, (Refusal, &'static str)> {
        // A trusted proxy's clients are counted by the address it
        // forwards, once their request is read (see `admit`).
        let proxy = self.trusted_proxies.contains(&ip);
        let address = if proxy {
            None
        } else {
            self.per_ip.take(ip).ok_or((
                Refusal::PerAddress,
                "too many connections from your address; try again later",
            ))?
        };
        let start = self.starting.take(ip, !proxy).ok_or((
            Refusal::StartingPerAddress,
            "too many connections from your address are still starting \
             (not sending their request); try again later",
        ))?;
        Ok(Pass {
            address: address.map(OnceLock::from).unwrap_or_default(),
            start: Mutex::new(Some(start)),
            admitted: OnceLock::new(),
        })
    }

    /// Counts one refusal of `who` and logs it if its reason is due a line
    /// (see `refusals`).
    pub fn refused(&self, reason: Refusal, who: &dyn Display) {
        self.refusals.refused(&self.metrics, reason, who);
    }

    /// Whether requests must carry a token (the web page then asks for one).
    pub fn wants_tokens(&self) -> bool {
        self.tokens.is_some()
    }

    /// Whether a `/members` request for `room` may be answered: with
    /// tokens, only with one that allows the room.
    pub fn admit_reader(&self, request: &http::Request, room: &Room) -> Result<(), Refused> {
        match &self.tokens {
            Some(tokens) => tokens
                .admit_reader(request, room)
                .map_err(|(status, reason)| Refused::new(status, reason)),
            None => Ok(()),
        }
    }

    /// With tokens, checks a chat request's token and records on `member`
    /// who it says the client is.
    pub fn identify(&self, request: &http::Request, member: &mut Member) -> Result<(), Refused> {
        match &self.tokens {
            Some(tokens) => tokens
                .admit(request, member)
                .map_err(|(status, reason)| Refused::new(status, reason)),
            None => Ok(()),
        }
    }

    /// Admits an upgrade from `peer` (for a client at `forwarded_for`,
    /// through a trusted proxy), as `member` for a chat: every place and
    /// claim it takes goes on `pass`. Refused, it takes nothing, and the
    /// answer says why.
    pub fn admit(
        &self,
        pass: &Pass,
        peer: SocketAddr,
        forwarded_for: Option<IpAddr>,
        member: Option<&Member>,
        conn: &ConnId,
    ) -> Result<(), Refused> {
        let address = forwarded_for.unwrap_or(peer.ip());
        // Through a trusted proxy: count the client by its own address.
        if let Some(ip) = forwarded_for {
            match self.per_ip.take(ip) {
                Some(slot) => {
                    if let Some(slot) = slot {
                        let _ = pass.address.set(slot);
                    }
                }
                None => {
                    self.refused(Refusal::PerAddress, &format!("{ip} (via {peer})"));
                    return Err(Refused::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "too many connections from your address; try again later",
                    ));
                }
            }
        }
        let mut admitted = Admitted::default();
        // An authenticated user: one more of its connections, if it may.
        if let (Some(tokens), Some(member)) = (&self.tokens, member) {
            admitted.user = tokens.seat(peer, member).map_err(|(who, reason)| {
                self.refused(Refusal::PerUser, &who);
                Refused::new(StatusCode::TOO_MANY_REQUESTS, reason)
            })?;
        }
        // A new room costs one of its address's new rooms.
        if let Some(member) = member {
            self.new_rooms
                .admit(&*self.broker, &member.room, address)
                .map_err(|reason| Refused::new(StatusCode::TOO_MANY_REQUESTS, reason))?;
        }
        // Without a token, a client's messages share its address's budget.
        if admitted.user.is_none()
            && let Some(rates) = &self.address_rates
        {
            admitted.address_rate = Some(rates.share(address));
        }
        // One connection per nickname in a room, if asked.
        if let (Some(unique), Some(member)) = (&self.unique, member) {
            let claim = unique
                .admit(peer, member, conn, address)
                .map_err(|(status, reason)| {
                    // Redis could not be asked: one of the clients refused
                    // while the relay is away, summed up with the others.
                    if status == StatusCode::SERVICE_UNAVAILABLE {
                        self.refused(Refusal::RelayDown, &peer);
                    }
                    Refused::new(status, reason)
                })?;
            admitted.nickname = Some(claim);
        }
        let _ = pass.admitted.set(admitted);
        Ok(())
    }

    /// With tokens, how long `member`'s connection may live: until its
    /// token expires, unless the client renews the lease.
    pub fn lease(&self, member: &Member) -> Option<Lease<'_>> {
        self.tokens.as_ref()?.lease(member)
    }
}

impl Pass {
    /// How long the connection has to send its request head (shorter when
    /// many connections were starting as it came: see `starting`), until
    /// it has.
    pub fn head_timeout(&self) -> Option<Duration> {
        let start = self.start.lock().unwrap_or_else(|p| p.into_inner());
        start.as_ref().map(|slot| slot.head_timeout)
    }

    /// Its request has been read: gives its start place back.
    pub fn request_read(&self) {
        let start = self.start.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(start);
    }

    /// The rate limiter its messages take from, shared with its user's (or,
    /// without a token, its address's) other connections; `None` without a
    /// rate limit.
    pub fn limiter(&self) -> Option<SharedLimiter> {
        let admitted = self.admitted.get()?;
        match &admitted.user {
            Some(user) => user.limiter(),
            None => admitted
                .address_rate
                .as_ref()
                .map(|share| Arc::clone(&share.limiter)),
        }
    }
}
