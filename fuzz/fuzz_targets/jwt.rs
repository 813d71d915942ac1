//! Fuzzes the signed-token check (`token::Verifier::verify`, and `token::from_request`, which
//! finds the token in an upgrade request): a token is the one input that can admit a client with
//! no backend asked, so no input may panic it, and nothing but a token signed with the key (with
//! a valid `exp`, the configured `aud`/`iss`, sane claims) may be accepted. Each input is tried
//! as a token as it is, re-signed with the key (so mutated headers and claims get past the
//! signature), and as the JSON claims of a freshly signed HS256 token.
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use pystrands_core::fuzzing::{self, JwtSettings, JwtVerifier, JWT_MAX_TOKEN};
use std::sync::OnceLock;

const SECRET: &str = "fuzz-secret";

fn verifiers() -> &'static [(JwtSettings, JwtVerifier)] {
    static V: OnceLock<Vec<(JwtSettings, JwtVerifier)>> = OnceLock::new();
    V.get_or_init(|| {
        let base =
            JwtSettings { secret: SECRET.into(), leeway_secs: 5, audience: None, issuer: None, max_id_length: 256 };
        let all = [
            base.clone(),
            JwtSettings {
                leeway_secs: 0,
                audience: Some("pystrands".into()),
                issuer: Some("auth".into()),
                ..base.clone()
            },
            // The largest leeway the settings accept.
            JwtSettings { leeway_secs: 1_000_000_000, max_id_length: 8, ..base },
        ];
        all.into_iter()
            .map(|s| {
                let v = JwtVerifier::new(&s).expect("fuzz settings are valid");
                (s, v)
            })
            .collect()
    })
}

fn sign(alg: &str, signing_input: &str) -> String {
    macro_rules! mac {
        ($h:ty) => {{
            let mut m = Hmac::<$h>::new_from_slice(SECRET.as_bytes()).expect("any key length");
            m.update(signing_input.as_bytes());
            B64.encode(m.finalize().into_bytes())
        }};
    }
    match alg {
        "HS384" => mac!(sha2::Sha384),
        "HS512" => mac!(sha2::Sha512),
        _ => mac!(sha2::Sha256),
    }
}

/// The `alg` of a token's header, if it decodes.
fn alg_of(header_b64: &str) -> Option<String> {
    let header = B64.decode(header_b64.trim_end_matches('=')).ok()?;
    let header = std::str::from_utf8(&header).ok()?;
    let at = header.find("\"alg\"")?;
    let rest = header[at + 5..].trim_start().strip_prefix(':')?.trim_start().strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_string())
}

fn check(token: &str, properly_signed: bool) {
    for (s, v) in verifiers() {
        let Ok(g) = v.verify(token) else { continue };
        assert!(token.len() <= JWT_MAX_TOKEN);
        assert!(properly_signed, "a token not signed with the key was accepted: {token:?}");
        assert_eq!(token.split('.').count(), 3, "accepted a token that is not three parts");
        assert!(g.metadata_is_object);
        assert!(g.expires.is_some(), "accepted a token without exp");
        assert!(g.remaining.is_some());
        for id in [&g.user_id, &g.room_id].into_iter().flatten() {
            assert!(!id.is_empty() && id.len() <= s.max_id_length, "bad id {id:?} accepted");
        }
        assert_ne!(g.client_id.as_deref(), Some(""));
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);

    // 1. As it is: only the seeds signed with the key can pass.
    let parts: Vec<&str> = text.split('.').collect();
    let signed_as_is = parts.len() == 3
        && alg_of(parts[0]).is_some_and(|a| sign(&a, &format!("{}.{}", parts[0], parts[1])) == parts[2]);
    check(&text, signed_as_is);

    // 2. Re-signed: its header and claims, whatever they became, with a good signature.
    if parts.len() >= 2 && text.len() <= JWT_MAX_TOKEN {
        let signing_input = format!("{}.{}", parts[0], parts[1]);
        let alg = alg_of(parts[0]).unwrap_or_default();
        check(&format!("{signing_input}.{}", sign(&alg, &signing_input)), true);
    }

    // 3. As the JSON claims of an HS256 token.
    if data.len() <= JWT_MAX_TOKEN {
        let signing_input = format!("{}.{}", B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#), B64.encode(data));
        check(&format!("{signing_input}.{}", sign("HS256", &signing_input)), true);
    }

    // 4. Where the broker looks for it: the query, else `Authorization: Bearer`.
    let (query, header) = text.split_once('\n').unwrap_or((&text, ""));
    let headers = vec![("Authorization".to_string(), header.to_string())];
    if let Some(t) = fuzzing::jwt_from_request(query, &headers) {
        let in_query = query.split('&').any(|p| p.strip_prefix("token=") == Some(t.as_str()));
        assert!(in_query || header.contains(t.as_str()), "token {t:?} found nowhere");
        assert!(in_query || t.trim() == t, "bearer token not trimmed");
    }
});
