//! Tokens valid and not, against each kind of key.

use super::*;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
const ED_PRIVATE: &[u8] = include_bytes!("../../tests/keys/ed25519.pem");
const ED_PUBLIC: &[u8] = include_bytes!("../../tests/keys/ed25519.pub.pem");
const RSA_PRIVATE: &[u8] = include_bytes!("../../tests/keys/rsa.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("../../tests/keys/rsa.pub.pem");
const LEEWAY: Duration = Duration::from_secs(5);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token with these claims, signed by `signer`.
fn token(signer: &Signer, claims: &Claims) -> String {
    jsonwebtoken::encode(&Header::new(signer.algorithm), claims, &signer.key).unwrap()
}

fn claims(sub: &str, exp: u64) -> Claims {
    Claims {
        sub: sub.into(),
        name: None,
        rooms: None,
        exp,
        nbf: None,
        iat: None,
        aud: None,
        iss: None,
    }
}

/// A token with these raw JSON claims, signed with `SECRET`.
fn raw_token(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET).unwrap(),
    )
    .unwrap()
}

#[test]
fn each_kind_of_key_checks_its_own_tokens() {
    let pairs = [
        (
            Signer::hmac(SECRET).unwrap(),
            Auth::hmac(SECRET, LEEWAY).unwrap(),
        ),
        (
            Signer::private_key(ED_PRIVATE).unwrap(),
            Auth::public_key(ED_PUBLIC, LEEWAY).unwrap(),
        ),
        (
            Signer::private_key(RSA_PRIVATE).unwrap(),
            Auth::public_key(RSA_PUBLIC, LEEWAY).unwrap(),
        ),
    ];
    for (signer, auth) in &pairs {
        let signed = signer
            .sign("alice", Duration::from_secs(60), &["lobby".into()])
            .unwrap();
        let identity = auth.check(Some(&signed)).unwrap();
        assert_eq!(identity.name, "alice");
        assert!(identity.may_join("lobby"));
        assert!(!identity.may_join("elsewhere"));
        assert!(identity.lifetime(LEEWAY) > Duration::from_secs(60));
    }
    assert_eq!(pairs[1].1.algorithm(), "EdDSA");
    assert_eq!(pairs[2].1.algorithm(), "RS256");
}

#[test]
fn the_name_claim_wins_over_sub() {
    let signer = Signer::hmac(SECRET).unwrap();
    let mut named = claims("u-17", now() + 60);
    named.name = Some("alice".into());
    let auth = Auth::hmac(SECRET, LEEWAY).unwrap();
    assert_eq!(
        auth.check(Some(&token(&signer, &named))).unwrap().name,
        "alice"
    );
}

#[test]
fn expired_and_early_tokens_are_refused_past_the_leeway() {
    let signer = Signer::hmac(SECRET).unwrap();
    let auth = Auth::hmac(SECRET, LEEWAY).unwrap();
    let expired = token(&signer, &claims("alice", now() - 60));
    assert_eq!(auth.check(Some(&expired)), Err(AuthError::Expired));
    let just_expired = token(&signer, &claims("alice", now() - 2));
    assert!(auth.check(Some(&just_expired)).is_ok(), "within the leeway");
    let mut early = claims("alice", now() + 600);
    early.nbf = Some(now() + 60);
    assert_eq!(
        auth.check(Some(&token(&signer, &early))),
        Err(AuthError::NotYetValid)
    );
    early.nbf = Some(now() + 2);
    assert!(
        auth.check(Some(&token(&signer, &early))).is_ok(),
        "within the leeway"
    );
}

#[test]
fn a_wrong_key_or_a_changed_payload_is_a_bad_signature() {
    let auth = Auth::hmac(SECRET, LEEWAY).unwrap();
    let other = Signer::hmac(b"another secret of at least 32 bytes!").unwrap();
    let signed = other.sign("alice", Duration::from_secs(60), &[]).unwrap();
    assert_eq!(auth.check(Some(&signed)), Err(AuthError::BadSignature));

    let signed = Signer::hmac(SECRET)
        .unwrap()
        .sign("alice", Duration::from_secs(60), &[])
        .unwrap();
    let parts: Vec<&str> = signed.split('.').collect();
    let forged = base64_url(&serde_json::to_vec(&claims("mallory", now() + 60)).unwrap());
    let tampered = format!("{}.{forged}.{}", parts[0], parts[2]);
    assert_eq!(auth.check(Some(&tampered)), Err(AuthError::BadSignature));
}

#[test]
fn the_key_fixes_the_algorithm() {
    // `alg: none`, unsigned.
    let auth = Auth::hmac(SECRET, LEEWAY).unwrap();
    let header = base64_url(br#"{"alg":"none","typ":"JWT"}"#);
    let body = base64_url(&serde_json::to_vec(&claims("alice", now() + 60)).unwrap());
    let unsigned = format!("{header}.{body}.");
    assert!(auth.check(Some(&unsigned)).is_err());

    // An HMAC token "signed" with the public key, which anyone has: the
    // classic algorithm confusion.
    let rsa = Auth::public_key(RSA_PUBLIC, LEEWAY).unwrap();
    let confused = Signer::hmac(RSA_PUBLIC)
        .unwrap()
        .sign("alice", Duration::from_secs(60), &[])
        .unwrap();
    assert_eq!(
        rsa.check(Some(&confused)),
        Err(AuthError::WrongAlgorithm("RS256"))
    );
    // An EdDSA token against an RSA key.
    let ed = Signer::private_key(ED_PRIVATE)
        .unwrap()
        .sign("alice", Duration::from_secs(60), &[])
        .unwrap();
    assert_eq!(
        rsa.check(Some(&ed)),
        Err(AuthError::WrongAlgorithm("RS256"))
    );
}

#[test]
fn missing_malformed_and_weak() {
    let auth = Auth::hmac(SECRET, LEEWAY).unwrap();
    assert_eq!(auth.check(None), Err(AuthError::Missing));
    assert_eq!(auth.check(Some("")), Err(AuthError::Missing));
    assert!(matches!(
        auth.check(Some("not.a.jwt")),
        Err(AuthError::Malformed(_))
    ));
    assert!(Auth::hmac(b"short", LEEWAY).is_err());
    assert!(Auth::public_key(b"-----BEGIN NOTHING-----", LEEWAY).is_err());
}

/// Time claims out of range (`exp` 2^63, past `u64`, negative, a
/// fraction; the same for `nbf` and `iat`) are refused as malformed, and
/// nothing computed from an accepted token can overflow.
#[test]
fn time_claims_out_of_range_are_refused_never_a_panic() {
    use serde_json::json;
    let auth = Auth::hmac(SECRET, LEEWAY).unwrap();
    let later = now() + 60;
    let cases = [
        json!({"sub": "a", "exp": 1u64 << 63}),
        json!({"sub": "a", "exp": u64::MAX}),
        json!({"sub": "a", "exp": 1e30}),
        json!({"sub": "a", "exp": -1}),
        json!({"sub": "a", "exp": later as f64 + 0.5}),
        json!({"sub": "a", "exp": MAX_TIME + 1}),
        json!({"sub": "a", "exp": later, "nbf": -5}),
        json!({"sub": "a", "exp": later, "nbf": u64::MAX}),
        json!({"sub": "a", "exp": later, "nbf": 1u64 << 63}),
        json!({"sub": "a", "exp": later, "nbf": MAX_TIME + 1}),
        json!({"sub": "a", "exp": later, "iat": 1u64 << 63}),
        json!({"sub": "a", "exp": later, "iat": -1}),
    ];
    for claims in cases {
        let refused = auth.check(Some(&raw_token(claims.clone())));
        assert!(
            matches!(refused, Err(AuthError::Malformed(_))),
            "{claims}: {refused:?}"
        );
    }
    // The latest time allowed is fine, and its lifetime is computed.
    let identity = auth
        .check(Some(&raw_token(json!({"sub": "a", "exp": MAX_TIME}))))
        .unwrap();
    assert!(identity.lifetime(LEEWAY) > Duration::from_secs(200 * 365 * 86_400));
    // Even an `Identity` made by hand with an absurd time does not panic.
    let absurd = Identity {
        name: "a".into(),
        rooms: None,
        expires: u64::MAX,
    };
    assert_eq!(absurd.lifetime(Duration::MAX), Duration::ZERO);
}

/// With an audience and an issuer configured, a token must carry both:
/// one for another service, from another issuer, or without them is
/// refused with the reason; `Signer::stamping` writes what is needed.
#[test]
fn audience_and_issuer_are_enforced_when_configured() {
    use serde_json::json;
    let auth = Auth::hmac(SECRET, LEEWAY)
        .unwrap()
        .expecting(Some("threadchat"), Some("https://id.example"));
    let exp = now() + 60;
    let good = raw_token(
        json!({"sub": "a", "exp": exp, "aud": "threadchat", "iss": "https://id.example"}),
    );
    assert!(auth.check(Some(&good)).is_ok());
    let listed = raw_token(
        json!({"sub": "a", "exp": exp, "aud": ["wiki", "threadchat"], "iss": "https://id.example"}),
    );
    assert!(
        auth.check(Some(&listed)).is_ok(),
        "one of several audiences"
    );
    let cases = [
        (
            json!({"sub": "a", "exp": exp, "aud": "wiki", "iss": "https://id.example"}),
            AuthError::WrongAudience("threadchat".into()),
        ),
        (
            json!({"sub": "a", "exp": exp, "aud": "threadchat", "iss": "https://evil.example"}),
            AuthError::WrongIssuer("https://id.example".into()),
        ),
        (
            json!({"sub": "a", "exp": exp, "iss": "https://id.example"}),
            AuthError::MissingClaim("aud".into()),
        ),
        (
            json!({"sub": "a", "exp": exp, "aud": "threadchat"}),
            AuthError::MissingClaim("iss".into()),
        ),
    ];
    for (claims, expected) in cases {
        assert_eq!(
            auth.check(Some(&raw_token(claims.clone()))),
            Err(expected),
            "{claims}"
        );
    }
    let stamped = Signer::hmac(SECRET)
        .unwrap()
        .stamping(Some("threadchat"), Some("https://id.example"))
        .sign("alice", Duration::from_secs(60), &[])
        .unwrap();
    assert_eq!(auth.check(Some(&stamped)).unwrap().name, "alice");
    let plain = Signer::hmac(SECRET)
        .unwrap()
        .sign("alice", Duration::from_secs(60), &[])
        .unwrap();
    assert!(auth.check(Some(&plain)).is_err());
    // An `iss` is one string: a list is malformed, even one holding the
    // expected issuer, and with no issuer configured too.
    for iss in [json!(["https://id.example"]), json!(7), json!({"x": 1})] {
        let claims = json!({"sub": "a", "exp": exp, "aud": "threadchat", "iss": iss});
        let refused = auth.check(Some(&raw_token(claims.clone())));
        assert!(
            matches!(refused, Err(AuthError::Malformed(_))),
            "{claims}: {refused:?}"
        );
        let bare = raw_token(json!({"sub": "a", "exp": exp, "iss": iss}));
        let refused = Auth::hmac(SECRET, LEEWAY).unwrap().check(Some(&bare));
        assert!(
            matches!(refused, Err(AuthError::Malformed(_))),
            "{iss}: {refused:?}"
        );
    }
    // Without configuration, neither is checked (as before).
    let open = Auth::hmac(SECRET, LEEWAY).unwrap();
    assert!(open.check(Some(&stamped)).is_ok());
    assert!(open.check(Some(&plain)).is_ok());
}

/// Base64url without padding, as JWTs use.
fn base64_url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}
