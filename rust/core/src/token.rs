//! Signed connection tokens (JWT): a connection that brings a valid token is accepted by the
//! broker itself, with no `connection_request` to a backend, so a reconnect storm of token
//! clients never reaches Python.
//!
//! The token comes in the query (`?token=`, what a browser can send) or in
//! `Authorization: Bearer`. It is checked against `jwt_secret` (HS256/384/512) or
//! `jwt_public_key` (RSA, EC or Ed25519 public key in PEM), chosen by the token's `alg` but only
//! among the families the broker has a key for, so a token can never pick its own key type
//! (no `alg: none`, no HMAC keyed with a public key). `exp` is required; `exp` and `nbf` are
//! honoured with `jwt_leeway`; `aud` and `iss` are checked when configured.
//!
//! Claims: `sub` → `user_id`, `room` → the first room (default: the request path, as a backend's
//! accept without `room_id`), `meta` → `metadata` (an object), `cid` → `client_id` (default: a
//! fresh UUID). A claim of the wrong type refuses the token.

use crate::config::{Config, ConfigError};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest token looked at; longer ones are refused without decoding (the request head is
/// bounded anyway, this keeps a header full of token from costing a base64 pass).
pub const MAX_TOKEN: usize = 8 * 1024;

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub client_id: Option<String>,
    pub user_id: Option<String>,
    pub room_id: Option<String>,
    pub metadata: Value,
    /// When the token expires (seconds since the Unix epoch), leeway not included.
    pub expires: Option<f64>,
}

impl Grant {
    /// How long from now until the connection must close (expiry plus leeway); `None` if never.
    pub fn remaining(&self, leeway: Duration) -> Option<Duration> {
        let exp = self.expires?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        Some(Duration::from_secs_f64((exp + leeway.as_secs_f64() - now).clamp(0.0, 1e9)))
    }
}

/// The claims the broker reads; any other claim is ignored (and stays out of `metadata`).
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    room: Option<String>,
    #[serde(default)]
    meta: Option<Map<String, Value>>,
    #[serde(default)]
    cid: Option<String>,
    #[serde(default)]
    exp: Option<f64>,
}

/// Checks tokens with the keys of the broker's settings.
pub struct Verifier {
    secret: Option<DecodingKey>,
    public: Option<(DecodingKey, &'static [Algorithm])>,
    leeway: Duration,
    audience: Option<String>,
    issuer: Option<String>,
    max_id_length: usize,
}

const HMAC: &[Algorithm] = &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
const RSA: &[Algorithm] =
    &[Algorithm::RS256, Algorithm::RS384, Algorithm::RS512, Algorithm::PS256, Algorithm::PS384, Algorithm::PS512];
const EC: &[Algorithm] = &[Algorithm::ES256, Algorithm::ES384];
const ED: &[Algorithm] = &[Algorithm::EdDSA];

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("secret", &self.secret.as_ref().map(|_| "<hidden>"))
            .field("public", &self.public.as_ref().map(|(_, algs)| algs))
            .field("leeway", &self.leeway)
            .finish()
    }
}

impl Verifier {
    /// The verifier of `cfg`, or `None` when neither `jwt_secret` nor `jwt_public_key` is set.
    pub fn from_config(cfg: &Config) -> Result<Option<Verifier>, ConfigError> {
        if cfg.jwt_secret.is_none() && cfg.jwt_public_key.is_none() {
            return Ok(None);
        }
        let secret = cfg.jwt_secret.as_deref().map(|s| DecodingKey::from_secret(s.as_bytes()));
        let public = match cfg.jwt_public_key.as_deref() {
            None => None,
            Some(value) => Some(public_key(value)?),
        };
        Ok(Some(Verifier {
            secret,
            public,
            leeway: cfg.jwt_leeway,
            audience: cfg.jwt_audience.clone(),
            issuer: cfg.jwt_issuer.clone(),
            max_id_length: cfg.max_id_length,
        }))
    }

    /// The leeway granted on `exp` and `nbf`.
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    /// Checks a token; `Err` says why it is refused (sent to the client as the 401 body).
    pub fn verify(&self, token: &str) -> Result<Grant, String> {
        if token.len() > MAX_TOKEN {
            return Err(format!("token too long (over {MAX_TOKEN} bytes)"));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("malformed token: {e}"))?;
        let alg = header.alg;
        let key = if HMAC.contains(&alg) {
            self.secret.as_ref().ok_or_else(|| format!("token algorithm {alg:?} is not accepted (no jwt_secret)"))?
        } else {
            match &self.public {
                Some((key, algs)) if algs.contains(&alg) => key,
                _ => return Err(format!("token algorithm {alg:?} is not accepted by jwt_public_key")),
            }
        };
        let mut v = Validation::new(alg);
        v.leeway = self.leeway.as_secs();
        v.validate_nbf = true;
        v.validate_exp = true;
        v.validate_aud = self.audience.is_some();
        let mut required = vec!["exp"];
        if let Some(aud) = &self.audience {
            v.set_audience(&[aud]);
            required.push("aud");
        }
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<Claims>(token, key, &v).map_err(|e| refusal(&e))?;
        let c = data.claims;
        let long = |what: &str, id: &Option<String>| -> Result<(), String> {
            match id {
                Some(i) if i.is_empty() => Err(format!("claim {what} must not be empty")),
                Some(i) if i.len() > self.max_id_length => {
                    Err(format!("claim {what} is over {} bytes (max_id_length)", self.max_id_length))
                }
                _ => Ok(()),
            }
        };
        // jsonwebtoken compares whole seconds: a token a fraction of a second past its end would
        // pass and be closed at once (4401) — refuse it here instead.
        if let Some(exp) = c.exp {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
            if exp + self.leeway.as_secs_f64() <= now {
                return Err("token expired".into());
            }
        }
        long("sub", &c.sub)?;
        long("room", &c.room)?;
        if c.cid.as_deref() == Some("") {
            return Err("claim cid must not be empty".into());
        }
        Ok(Grant {
            client_id: c.cid,
            user_id: c.sub,
            room_id: c.room,
            metadata: Value::Object(c.meta.unwrap_or_default()),
            expires: c.exp,
        })
    }
}

/// A short reason for a refused token, never echoing the token or the key.
fn refusal(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "token expired".into(),
        K::ImmatureSignature => "token not yet valid (nbf)".into(),
        K::InvalidSignature => "invalid token signature".into(),
        K::InvalidAudience => "token audience (aud) not accepted".into(),
        K::InvalidIssuer => "token issuer (iss) not accepted".into(),
        K::MissingRequiredClaim(c) => format!("token has no {c} claim"),
        K::InvalidAlgorithm => "token algorithm not accepted".into(),
        K::Json(j) => format!("malformed token claims: {j}"),
        K::Base64(_) | K::Utf8(_) | K::InvalidToken => "malformed token".into(),
        other => format!("invalid token: {other:?}"),
    }
}

/// Reads `jwt_public_key`: PEM text, or the path of a PEM file.
fn public_key(value: &str) -> Result<(DecodingKey, &'static [Algorithm]), ConfigError> {
    let bad = |why: String| ConfigError { setting: "jwt_public_key", value: shorten(value), reason: why };
    let pem = if value.trim_start().starts_with("-----BEGIN") {
        value.as_bytes().to_vec()
    } else {
        std::fs::read(value).map_err(|e| bad(format!("cannot read the PEM file: {e}")))?
    };
    if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((k, RSA));
    }
    if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
        return Ok((k, EC));
    }
    if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
        return Ok((k, ED));
    }
    Err(bad("is not an RSA, EC (P-256/P-384) or Ed25519 public key in PEM".into()))
}

fn shorten(v: &str) -> String {
    if v.trim_start().starts_with("-----BEGIN") {
        "<PEM text>".into()
    } else {
        v.to_string()
    }
}

/// The token of an upgrade request: `?token=` in the query, else `Authorization: Bearer`.
pub fn from_request<'a>(query: &'a str, headers: &'a [(String, String)]) -> Option<&'a str> {
    let from_query = query.split('&').find_map(|pair| pair.strip_prefix("token="));
    from_query.or_else(|| {
        headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("authorization")).and_then(|(_, v)| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    use hmac::{Hmac, Mac};

    fn now() -> f64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
    }

    fn hs256(secret: &str, header: &str, claims: &Value) -> String {
        let signing = format!("{}.{}", B64.encode(header), B64.encode(claims.to_string()));
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(signing.as_bytes());
        format!("{signing}.{}", B64.encode(mac.finalize().into_bytes()))
    }

    fn verifier() -> Verifier {
        let cfg = Config { jwt_secret: Some("k".into()), ..Config::default() };
        Verifier::from_config(&cfg).unwrap().unwrap()
    }

    const HS: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

    #[test]
    fn a_valid_token_grants_its_claims() {
        let t = hs256("k", HS, &serde_json::json!({"sub": "u1", "room": "r", "meta": {"a": 1}, "exp": now() + 60.0}));
        let g = verifier().verify(&t).unwrap();
        assert_eq!(g.user_id.as_deref(), Some("u1"));
        assert_eq!(g.room_id.as_deref(), Some("r"));
        assert_eq!(g.metadata, serde_json::json!({"a": 1}));
        assert!(g.remaining(Duration::ZERO).unwrap() > Duration::from_secs(50));
    }

    #[test]
    fn bad_tokens_are_refused_with_a_reason() {
        let v = verifier();
        let exp = now() + 60.0;
        let cases = [
            (hs256("other", HS, &serde_json::json!({"exp": exp})), "signature"),
            (hs256("k", HS, &serde_json::json!({"exp": now() - 100.0})), "expired"),
            (hs256("k", HS, &serde_json::json!({"exp": exp, "nbf": now() + 100.0})), "not yet valid"),
            (hs256("k", HS, &serde_json::json!({"sub": "u"})), "no exp"),
            (hs256("k", HS, &serde_json::json!({"exp": exp, "sub": 5})), "claims"),
            (hs256("k", HS, &serde_json::json!({"exp": exp, "meta": [1]})), "claims"),
            (hs256("k", HS, &serde_json::json!({"exp": exp, "sub": ""})), "empty"),
            (hs256("k", r#"{"alg":"none"}"#, &serde_json::json!({"exp": exp})), "malformed"),
            (hs256("k", r#"{"alg":"RS256"}"#, &serde_json::json!({"exp": exp})), "not accepted"),
            ("a.b".to_string(), "malformed"),
            ("x".repeat(MAX_TOKEN + 1), "too long"),
        ];
        for (token, why) in cases {
            let e = v.verify(&token).unwrap_err();
            assert!(e.contains(why), "{why:?} not in {e:?}");
        }
        let unsigned = format!("{}.{}.", B64.encode(r#"{"alg":"none"}"#), B64.encode(format!("{{\"exp\":{exp}}}")));
        assert!(v.verify(&unsigned).is_err());
    }

    #[test]
    fn leeway_admits_a_just_expired_token() {
        let cfg = Config { jwt_secret: Some("k".into()), jwt_leeway: Duration::from_secs(30), ..Config::default() };
        let v = Verifier::from_config(&cfg).unwrap().unwrap();
        assert!(v.verify(&hs256("k", HS, &serde_json::json!({"exp": now() - 10.0}))).is_ok());
    }

    #[test]
    fn audience_and_issuer_are_checked_when_set() {
        let cfg = Config {
            jwt_secret: Some("k".into()),
            jwt_audience: Some("chat".into()),
            jwt_issuer: Some("me".into()),
            ..Config::default()
        };
        let v = Verifier::from_config(&cfg).unwrap().unwrap();
        let exp = now() + 60.0;
        assert!(v.verify(&hs256("k", HS, &serde_json::json!({"exp": exp, "aud": "chat", "iss": "me"}))).is_ok());
        assert!(v.verify(&hs256("k", HS, &serde_json::json!({"exp": exp, "aud": "other", "iss": "me"}))).is_err());
        assert!(v.verify(&hs256("k", HS, &serde_json::json!({"exp": exp, "aud": "chat"}))).is_err());
    }

    #[test]
    fn the_token_is_found_in_the_query_or_the_header() {
        let h = vec![("Authorization".to_string(), "Bearer abc".to_string())];
        assert_eq!(from_request("a=1&token=xyz", &h), Some("xyz"));
        assert_eq!(from_request("a=1", &h), Some("abc"));
        assert_eq!(from_request("", &[("authorization".into(), "Basic abc".into())]), None);
    }

    #[test]
    fn a_public_key_that_is_not_one_is_a_config_error() {
        let cfg = Config {
            jwt_public_key: Some("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".into()),
            ..Config::default()
        };
        let e = Verifier::from_config(&cfg).unwrap_err();
        assert_eq!(e.setting, "jwt_public_key");
        let cfg = Config { jwt_public_key: Some("/nonexistent.pem".into()), ..Config::default() };
        assert!(Verifier::from_config(&cfg).unwrap_err().reason.contains("cannot read"));
    }
}
