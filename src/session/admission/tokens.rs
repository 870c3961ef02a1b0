//! The `tokens` feature, as a connection meets it: with a key configured,
//! a request's token says who the client is ([`Tokens::admit`]), the user
//! holds so many connections and one rate limit across them
//! ([`per_user`]), and a connection lives on a [`Lease`] until its token
//! expires, unless the client sends a fresh one ([`Lease::renew`]).
//!
//! The admission door holds one `Option<Tokens>`, built once at start:
//! `None` without a key, and always `None` in a build without the feature,
//! where `without_tokens.rs` stands in for this module.

pub mod per_user;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tungstenite::http::StatusCode;

use crate::auth::{Auth, Identity};
use crate::config::Config;
use crate::http;
use crate::protocol::{Member, Room};
pub use per_user::UserSlot;

/// Token authentication, for every connection: the key tokens are checked
/// against, and each user's connections.
pub struct Tokens {
    /// The key, and how tokens are checked against it.
    auth: Arc<Auth>,
    /// Each user's connections and rate limit.
    per_user: Arc<per_user::PerUser>,
}

impl Tokens {
    /// Token authentication as `config` sets it up: `None` without a key.
    pub fn new(config: &Config) -> Option<Tokens> {
        let tokens = config.tokens.as_ref()?;
        let limits = &config.limits;
        Some(Tokens {
            auth: Arc::clone(&tokens.auth),
            per_user: per_user::PerUser::new(
                tokens.max_connections_per_user,
                limits.rate_limit.map(|rate| (rate, limits.rate_burst)),
            ),
        })
    }

    /// Whether the request's token lets it in: to `room`, as `nickname`
    /// for a chat; and who it is. `401` without a valid token, `403` for
    /// a nickname that is not the token's or a room it does not allow.
    fn check(
        &self,
        request: &http::Request,
        nickname: Option<&str>,
        room: &Room,
    ) -> Result<Identity, (StatusCode, String)> {
        let token = request
            .bearer_token()
            .map_err(|reason| (StatusCode::BAD_REQUEST, reason))?;
        let identity = self
            .auth
            .check(token.as_deref())
            .map_err(|e| (StatusCode::UNAUTHORIZED, e.to_string()))?;
        may_speak_as(&identity, nickname, room)
            .map_err(|reason| (StatusCode::FORBIDDEN, reason))?;
        Ok(identity)
    }

    /// Admits a `/members` request for `room` (see [`check`](Self::check)).
    pub(super) fn admit_reader(
        &self,
        request: &http::Request,
        room: &Room,
    ) -> Result<(), (StatusCode, String)> {
        self.check(request, None, room).map(drop)
    }

    /// Admits a chat request as `member`, and records who its token says
    /// it is (see [`check`](Self::check)).
    pub(super) fn admit(
        &self,
        request: &http::Request,
        member: &mut Member,
    ) -> Result<(), (StatusCode, String)> {
        let identity = self.check(request, Some(member.nickname.as_str()), &member.room)?;
        member.identity = Some(identity);
        Ok(())
    }

    /// A place among its user's connections for a connection from `peer`
    /// as `member`, if the user may hold one more (`None` without an
    /// identity); otherwise who it is and why not, for a `429`.
    pub(super) fn seat(
        &self,
        peer: SocketAddr,
        member: &Member,
    ) -> Result<Option<UserSlot>, (String, String)> {
        let Some(identity) = &member.identity else {
            return Ok(None);
        };
        match self.per_user.take(&identity.name) {
            Ok(slot) => Ok(Some(slot)),
            Err(limit) => Err((
                format!("{peer} ({})", identity.name),
                format!(
                    "too many connections for {:?}: at most {limit} on this server",
                    identity.name
                ),
            )),
        }
    }

    /// The lease `member`'s token gives its connection (`None` without
    /// an identity).
    pub(super) fn lease(&self, member: &Member) -> Option<Lease<'_>> {
        let identity = member.identity.as_ref()?;
        Some(Lease {
            tokens: self,
            expires: deadline_in(identity.lifetime(self.auth.leeway())),
        })
    }
}

/// How long a connection may live: until its token expires (leeway
/// included), unless a fresh token renews the lease.
pub struct Lease<'a> {
    tokens: &'a Tokens,
    expires: Instant,
}

impl Lease<'_> {
    /// When the connection's token expires: the connection is closed then.
    pub fn expires(&self) -> Instant {
        self.expires
    }

    /// Renews the lease with a fresh `token` for `member`'s connection, if
    /// it is valid and for the same user and room; returns how long the
    /// new one is valid from now. A token refused leaves the lease as it
    /// was.
    pub fn renew(&mut self, token: &str, member: &Member) -> Result<Duration, String> {
        let auth = &self.tokens.auth;
        let identity = auth.check(Some(token)).map_err(|e| e.to_string())?;
        may_speak_as(&identity, Some(member.nickname.as_str()), &member.room)?;
        let left = identity.lifetime(auth.leeway());
        self.expires = deadline_in(left);
        Ok(left)
    }
}

/// Whether a valid token's `identity` may be `nickname` (if one is asked)
/// in `room`; why not, if not.
fn may_speak_as(identity: &Identity, nickname: Option<&str>, room: &Room) -> Result<(), String> {
    if let Some(nickname) = nickname
        && nickname != identity.name
    {
        return Err(format!(
            "this token is for {:?}, not {nickname:?}: connect to /chat/{}",
            identity.name, identity.name
        ));
    }
    if !identity.may_join(room.name()) {
        return Err(format!("this token does not allow room {:?}", room.name()));
    }
    Ok(())
}

/// The instant `left` from now; now if that is past what `Instant` holds
/// (a token's time is bounded well below that: see `auth::MAX_TIME`).
fn deadline_in(left: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(left).unwrap_or(now)
}
