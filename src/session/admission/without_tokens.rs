//! Stands in for the `tokens` feature (`tokens.rs`) in a build without it:
//! [`Tokens`], [`UserSlot`] and [`Lease`] have no values, so the admission
//! door's `Option<Tokens>` is always `None` and the code that handles
//! `Some` compiles to nothing.

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tungstenite::http::StatusCode;

use crate::config::Config;
use crate::http;
use crate::protocol::{Member, Room};
use crate::session::rate::SharedLimiter;

/// No token authentication in this build.
pub enum Tokens {}

/// No user's connections to count in this build.
#[derive(Debug)]
pub enum UserSlot {}

/// No token to outlive in this build.
pub struct Lease<'a>(Never, PhantomData<&'a ()>);

/// A value nobody can make.
enum Never {}

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

    pub(super) fn seat(
        &self,
        _peer: SocketAddr,
        _member: &Member,
    ) -> Result<Option<UserSlot>, (String, String)> {
        match *self {}
    }

    pub(super) fn lease(&self, _member: &Member) -> Option<Lease<'_>> {
        match *self {}
    }
}

impl UserSlot {
    pub fn limiter(&self) -> Option<SharedLimiter> {
        match *self {}
    }
}

impl Lease<'_> {
    pub fn expires(&self) -> Instant {
        match self.0 {}
    }

    pub fn renew(&mut self, _token: &str, _member: &Member) -> Result<Duration, String> {
        match self.0 {}
    }
}
