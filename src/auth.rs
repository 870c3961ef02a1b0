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
//! [`Auth::leeway`] of clock difference. A `rooms` claim, when present,
//! lists the only rooms the token may join.

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
    /// When the token expires (its `exp`, in seconds since the Unix epoch).
    pub expires: u64,
}

impl Identity {
    /// Whether the token lets its holder into `room`.
    pub fn may_join(&self, room: &str) -> bool {
        self.rooms
            .as_ref()
            .is_none_or(|rooms| rooms.iter().any(|r| r == room))
    }

    /// How long from now until the token expires, leeway included (zero
    /// if it has).
    pub fn lifetime(&self, leeway: Duration) -> Duration {
        let end = UNIX_EPOCH + Duration::from_secs(self.expires) + leeway;
        end.duration_since(SystemTime::now()).unwrap_or_default()
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
        validation.leeway = leeway.as_secs();
        validation.validate_nbf = true;
        // No audience is configured: a token's `aud` is not checked.
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Auth {
            decoding,
            algorithm,
            validation,
            leeway,
        }
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
                _ => AuthError::Malformed(e.to_string()),
            })?;
        let claims = data.claims;
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
}

impl Signer {
    /// Signs with an HMAC `secret` (HS256).
    pub fn hmac(secret: &[u8]) -> Result<Signer, String> {
        EncodingKey::from_secret(secret)
            .map(|key| Signer {
                key,
                algorithm: Algorithm::HS256,
            })
            .map_err(|e| e.to_string())
    }

    /// Signs with a PEM private key: Ed25519 (EdDSA) or RSA (RS256).
    pub fn private_key(pem: &[u8]) -> Result<Signer, String> {
        if let Ok(key) = EncodingKey::from_ed_pem(pem) {
            return Ok(Signer {
                key,
                algorithm: Algorithm::EdDSA,
            });
        }
        EncodingKey::from_rsa_pem(pem)
            .map(|key| Signer {
                key,
                algorithm: Algorithm::RS256,
            })
            .map_err(|e| format!("not an RSA or Ed25519 private key in PEM form ({e})"))
    }

    /// A token for `name`, valid for `lifetime` from now, limited to
    /// `rooms` if any are given.
    pub fn sign(&self, name: &str, lifetime: Duration, rooms: &[String]) -> Result<String, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let claims = Claims {
            sub: name.to_owned(),
            name: None,
            rooms: (!rooms.is_empty()).then(|| rooms.to_vec()),
            exp: (now + lifetime).as_secs(),
            nbf: None,
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
