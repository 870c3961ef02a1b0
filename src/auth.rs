//! Who is speaking: signed tokens (JWTs), checked against the key the
//! operator configured.
//!
//! Without a key (the default) anyone who reaches the port picks a
//! nickname, as in the original app. With one, every chat connection and
//! every `/members` request presents a token (`?token=` or `Authorization:
//! Bearer`), and the token says who the client is: its `name` claim, else
//! its `sub`.
//!
//! **The key fixes the algorithm.** An HMAC secret accepts HS256 only, an
//! RSA public key RS256 only, an Ed25519 public key EdDSA only: a token's
//! own `alg` header is never trusted to choose (no `none`, and no HMAC
//! token "signed" with a public key that anyone has). The checking is
//! `jsonwebtoken`'s, a crate made for it; this module only configures it
//! and turns its answers into reasons a person can act on.
//!
//! A token must carry `exp`; `exp` and `nbf` are honoured with
//! [`Auth::leeway`] of clock difference. An `iss` is a string, or the
//! token is malformed. A `rooms` claim, when present,
//! lists the only rooms the token may join.
//!
//! **Audience and issuer.** A shared identity provider signs tokens for
//! many services with one key. With `--auth-audience` (`--auth-issuer`)
//! set, a token must carry that `aud` (`iss`): a token minted for another
//! service is refused, not taken for a login here.
//!
//! **Time claims** (`exp`, `nbf`, `iat`) are whole seconds from 0 to
//! [`MAX_TIME`] (the end of year 9999); anything else is a malformed token,
//! so no later arithmetic on them can overflow.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Who a valid token says the client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user: the token's `name` claim, else its `sub`.
    pub name: String,
    /// The only rooms the token may join (`None`: any).
    pub rooms: Option<Vec<String>>,
    /// When the token expires (its `exp`, in seconds since the Unix epoch;
    /// at most [`MAX_TIME`]).
    pub expires: u64,
}

/// The latest time a token's `exp`, `nbf` or `iat` may name: the end of
/// year 9999, in seconds since the Unix epoch. Far beyond any real token,
/// and far below what `SystemTime` and `Instant` arithmetic can hold.
pub const MAX_TIME: u64 = 253_402_300_799;

/// The most clock difference `--auth-leeway` may allow, in seconds (a
/// day): more would make expiry meaningless.
pub const MAX_LEEWAY: u64 = 86_400;

impl Identity {
    /// Whether the token lets its holder into `room`.
    pub fn may_join(&self, room: &str) -> bool {
        self.rooms
            .as_ref()
            .is_none_or(|rooms| rooms.iter().any(|r| r == room))
    }

    /// How long from now until the token expires, leeway included (zero
    /// if it has). Checked arithmetic: a time past what the clock can hold
    /// counts as expired, never a panic.
    pub fn lifetime(&self, leeway: Duration) -> Duration {
        UNIX_EPOCH
            .checked_add(Duration::from_secs(self.expires))
            .and_then(|end| end.checked_add(leeway))
            .and_then(|end| end.duration_since(SystemTime::now()).ok())
            .unwrap_or_default()
    }
}

/// The claims threadchat reads (and `threadchat token` writes).
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The user's id.
    pub sub: String,
    /// The user's display name, if it differs from `sub`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The only rooms the token may join.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
    /// Expiry, in seconds since the Unix epoch.
    pub exp: u64,
    /// Not valid before, in seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// When it was issued, in seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Who it is for (written by `threadchat token`; when checking,
    /// `jsonwebtoken` reads it, as a string or a list).
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Who issued it (written by `threadchat token`; when checking,
    /// `jsonwebtoken` compares it with `--auth-issuer`). Read here too, so
    /// that an `iss` that is not a string (RFC 7519: one StringOrURI; say
    /// a list) makes the token malformed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

/// Why a token was refused, in words for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token at all.
    #[error("a token is required: pass ?token=… or an Authorization: Bearer header")]
    Missing,
    /// Past its `exp` (and the leeway).
    #[error("the token has expired")]
    Expired,
    /// Before its `nbf` (and the leeway).
    #[error("the token is not valid yet")]
    NotYetValid,
    /// Signed with another algorithm than the configured key's.
    #[error("the token is signed with an algorithm this server does not accept (it takes {0})")]
    WrongAlgorithm(&'static str),
    /// The signature does not match (another key, or a changed payload).
    #[error("the token's signature is not valid")]
    BadSignature,
    /// `--auth-audience` is set and the token is for someone else.
    #[error("the token is not for this server: its aud is not {0:?}")]
    WrongAudience(String),
    /// `--auth-issuer` is set and someone else issued the token.
    #[error("the token is not from the expected issuer: its iss is not {0:?}")]
    WrongIssuer(String),
    /// A claim this server requires is missing (`exp`, `sub`, and `aud` or
    /// `iss` when configured).
    #[error("the token has no {0:?} claim, which this server requires")]
    MissingClaim(String),
    /// Not a JWT, or without the claims threadchat needs.
    #[error("the token is malformed: {0}")]
    Malformed(String),
}

/// A configured key, and how tokens are checked against it.
pub struct Auth {
    decoding: DecodingKey,
    algorithm: Algorithm,
    validation: Validation,
    leeway: Duration,
    /// The `aud` a token must carry (`--auth-audience`), if any.
    audience: Option<String>,
    /// The `iss` a token must carry (`--auth-issuer`), if any.
    issuer: Option<String>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        write!(f, "Auth({}, leeway {:?})", self.algorithm(), self.leeway)
    }
}

impl Auth {
    /// Checks tokens signed with an HMAC `secret` (HS256).
    pub fn hmac(secret: &[u8], leeway: Duration) -> Result<Auth, String> {
        if secret.len() < 32 {
            return Err(format!(
                "the HMAC secret is {} bytes; use at least 32 (e.g. `openssl rand -hex 32`)",
                secret.len()
            ));
        }
        let decoding = DecodingKey::from_secret(secret).map_err(|e| e.to_string())?;
        Ok(Auth::with(decoding, Algorithm::HS256, leeway))
    }

    /// Checks tokens against a PEM public key: RSA (RS256) or Ed25519
    /// (EdDSA), whichever it is.
    pub fn public_key(pem: &[u8], leeway: Duration) -> Result<Auth, String> {
        if let Ok(key) = DecodingKey::from_ed_pem(pem) {
            return Ok(Auth::with(key, Algorithm::EdDSA, leeway));
        }
        match DecodingKey::from_rsa_pem(pem) {
            Ok(key) => Ok(Auth::with(key, Algorithm::RS256, leeway)),
            Err(e) => Err(format!(
                "not an RSA or Ed25519 public key in PEM form ({e})"
            )),
        }
    }

    fn with(decoding: DecodingKey, algorithm: Algorithm, leeway: Duration) -> Auth {
        let mut validation = Validation::new(algorithm);
        // `jsonwebtoken` subtracts the leeway from the time now.
        validation.leeway = leeway.as_secs().min(MAX_LEEWAY);
        // `nbf` is checked in `check`, after its range: an `nbf` past the
        // year 9999 is a malformed token, not one that is "not valid yet".
        validation.validate_nbf = false;
        // Until an audience is configured (`expecting`), `aud` is not checked.
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Auth {
            decoding,
            algorithm,
            validation,
            leeway: Duration::from_secs(leeway.as_secs().min(MAX_LEEWAY)),
            audience: None,
            issuer: None,
        }
    }

    /// Requires tokens to carry this `aud` (one of its values, if a list)
    /// and this `iss`, for each that is given.
    pub fn expecting(mut self, audience: Option<&str>, issuer: Option<&str>) -> Auth {
        let mut required = vec!["exp", "sub"];
        if let Some(audience) = audience {
            self.validation.set_audience(&[audience]);
            self.validation.validate_aud = true;
            required.push("aud");
        }
        if let Some(issuer) = issuer {
            self.validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        self.validation.set_required_spec_claims(&required);
        self.audience = audience.map(str::to_owned);
        self.issuer = issuer.map(str::to_owned);
        self
    }

    /// How much clock difference `exp` and `nbf` allow.
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    /// The algorithm tokens must be signed with.
    pub fn algorithm(&self) -> &'static str {
        algorithm_name(self.algorithm)
    }

    /// Who `token` says the client is, if it is valid now.
    pub fn check(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    AuthError::WrongAlgorithm(self.algorithm())
                }
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAudience => {
                    AuthError::WrongAudience(self.audience.clone().unwrap_or_default())
                }
                ErrorKind::InvalidIssuer => {
                    AuthError::WrongIssuer(self.issuer.clone().unwrap_or_default())
                }
                ErrorKind::MissingRequiredClaim(claim) => AuthError::MissingClaim(claim.clone()),
                _ => AuthError::Malformed(e.to_string()),
            })?;
        let claims = data.claims;
        for (claim, time) in [
            ("exp", Some(claims.exp)),
            ("nbf", claims.nbf),
            ("iat", claims.iat),
        ] {
            if time.is_some_and(|t| t > MAX_TIME) {
                return Err(AuthError::Malformed(format!(
                    "its {claim} is past the year 9999"
                )));
            }
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        if claims
            .nbf
            .is_some_and(|nbf| nbf > now.saturating_add(self.leeway.as_secs()))
        {
            return Err(AuthError::NotYetValid);
        }
        let name = claims.name.unwrap_or(claims.sub);
        if name.is_empty() {
            return Err(AuthError::Malformed("its name is empty".into()));
        }
        Ok(Identity {
            name,
            rooms: claims.rooms,
            expires: claims.exp,
        })
    }
}

/// Signs tokens (for `threadchat token`): with the HMAC secret, or with a
/// PEM private key (RSA or Ed25519).
pub struct Signer {
    key: EncodingKey,
    algorithm: Algorithm,
    /// The `aud` written into tokens, if any.
    audience: Option<String>,
    /// The `iss` written into tokens, if any.
    issuer: Option<String>,
}

impl Signer {
    /// Signs with an HMAC `secret` (HS256).
    pub fn hmac(secret: &[u8]) -> Result<Signer, String> {
        EncodingKey::from_secret(secret)
            .map(|key| Signer::with(key, Algorithm::HS256))
            .map_err(|e| e.to_string())
    }

    /// Signs with a PEM private key: Ed25519 (EdDSA) or RSA (RS256).
    pub fn private_key(pem: &[u8]) -> Result<Signer, String> {
        if let Ok(key) = EncodingKey::from_ed_pem(pem) {
            return Ok(Signer::with(key, Algorithm::EdDSA));
        }
        EncodingKey::from_rsa_pem(pem)
            .map(|key| Signer::with(key, Algorithm::RS256))
            .map_err(|e| format!("not an RSA or Ed25519 private key in PEM form ({e})"))
    }

    fn with(key: EncodingKey, algorithm: Algorithm) -> Signer {
        Signer {
            key,
            algorithm,
            audience: None,
            issuer: None,
        }
    }

    /// Writes this `aud` and `iss` into every token, for each that is
    /// given (what a server with `--auth-audience`/`--auth-issuer` needs).
    pub fn stamping(mut self, audience: Option<&str>, issuer: Option<&str>) -> Signer {
        self.audience = audience.map(str::to_owned);
        self.issuer = issuer.map(str::to_owned);
        self
    }

    /// A token for `name`, valid for `lifetime` from now, limited to
    /// `rooms` if any are given.
    pub fn sign(&self, name: &str, lifetime: Duration, rooms: &[String]) -> Result<String, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let exp = now.saturating_add(lifetime.as_secs());
        if exp > MAX_TIME {
            return Err(format!(
                "a lifetime of {}s ends past the year 9999",
                lifetime.as_secs()
            ));
        }
        let claims = Claims {
            sub: name.to_owned(),
            name: None,
            rooms: (!rooms.is_empty()).then(|| rooms.to_vec()),
            exp,
            nbf: None,
            iat: Some(now),
            aud: self.audience.clone(),
            iss: self.issuer.clone(),
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, &self.key)
            .map_err(|e| e.to_string())
    }
}

fn algorithm_name(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::HS256 => "HS256",
        Algorithm::RS256 => "RS256",
        Algorithm::EdDSA => "EdDSA",
        _ => "another algorithm",
    }
}

#[cfg(test)]
mod tests;
