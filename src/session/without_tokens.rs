//! Stands in for the `tokens` feature (`tokens/`) in a build without it:
//! [`Tokens`] and [`UserSlot`] have no values, so the session's
//! `Option<Tokens>` is always `None` and the code that handles `Some`
//! compiles to nothing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tungstenite::http::StatusCode;

use super::Conn;
use super::rate::RateLimiter;
use crate::config::Config;
use crate::http;
use crate::protocol::{Member, Room};

/// No token authentication in this build.
pub enum Tokens {}

/// No user's connections to count in this build.
#[derive(Debug)]
pub enum UserSlot {}

impl Tokens {
    /// Always `None`.
    pub fn new(_config: &Config) -> Option<Tokens> {
        None
    }

    pub(super) fn admit_reader(
        &self,
        _request: &http::Request,
        _room: &Room,
    ) -> Result<(), (StatusCode, String)> {
        match *self {}
    }

    pub(super) fn admit(
        &self,
        _request: &http::Request,
        _member: &mut Member,
    ) -> Result<(), (StatusCode, String)> {
        match *self {}
    }

    pub(super) fn seat(&self, _conn: &Conn, _member: &Member) -> Result<(), (String, String)> {
        match *self {}
    }

    pub(super) fn expires(&self, _member: &Member) -> Option<Instant> {
        match *self {}
    }

    pub(super) fn refresh(
        &self,
        _token: &str,
        _member: &Member,
    ) -> Result<(Instant, Duration), String> {
        match *self {}
    }
}

impl UserSlot {
    pub fn limiter(&self) -> Option<Arc<Mutex<RateLimiter>>> {
        match *self {}
    }
}
