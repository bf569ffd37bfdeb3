//! Bearer tokens: JWTs signed with HS256, verified with the `jsonwebtoken` crate.
//!
//! - Only `alg: HS256` is accepted (no `none`, no algorithm confusion).
//! - `exp`, `iat` and `sub` are required; `nbf` is honoured when present. Clock skew is
//!   allowed up to [`TokenRules::leeway_secs`]; a token issued in the future (beyond the
//!   leeway) or living longer than [`TokenRules::max_ttl_secs`] is refused, so no token is
//!   valid forever.
//! - Key ids: every token names its signing key in `kid` (derived from the key, never the
//!   key itself). The secret file may hold several keys, one per line: the first signs, all
//!   verify. Rotation: put a new key on the first line and restart the nodes one by one;
//!   delete the old line once the longest-lived token it signed has expired. A token
//!   without `kid` is checked against the signing key only.
//! - Claims: `sub` (the user id), `iat`, `exp`, optional `nbf`, and `adm` for operator
//!   tokens that may register users.
//!
//! - External issuers (optional): tokens signed with RS256 or ES256 by the operator's own
//!   login system verify against the public keys of a JWKS file (`jwks_file`), found by
//!   `kid`; `iss` must be `jwks_issuer` and `aud`, when `jwks_audience` is set, must match.
//!   The lifetime rules are the same; such a token is never an operator token. Algorithms
//!   are tied to key kinds (HS256 only with the cluster's keys, RS256 only with RSA keys of
//!   the set, ES256 only with P-256 keys), so no token can pick its own verification path.
//!
//! Peers authenticate to each other with a key derived from the first secret; a peer
//! presenting the key of any listed secret is accepted, so a rotation can roll.

use crate::chat::UserId;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token: send 'Authorization: Bearer <token>'")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf or iat in the future)")]
    NotYetValid,
    #[error("token lives longer than the {max_secs} s this cluster allows")]
    TooLong { max_secs: u64 },
    #[error("token was signed with a key this cluster does not know (kid {0:?})")]
    UnknownKey(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub iat: u64,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adm: bool,
}

/// Who a verified token speaks for, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: UserId,
    pub admin: bool,
    /// The token's `exp` (seconds since the epoch).
    pub exp: u64,
    /// The token's `iat`: a per-user revocation refuses tokens issued before it.
    pub iat: u64,
}

/// Limits every token must keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRules {
    /// Longest `exp - iat` accepted.
    pub max_ttl_secs: u64,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    pub leeway_secs: u64,
}

impl Default for TokenRules {
    fn default() -> Self {
        Self { max_ttl_secs: 30 * 86_400, leeway_secs: 60 }
    }
}

struct Key {
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    peer_token: String,
    /// Signs invites (a key of its own, so an invite is never a bearer token).
    invite_key: Vec<u8>,
}

#[derive(Clone)]
pub struct Keys {
    keys: std::sync::Arc<Vec<Key>>,
    rules: TokenRules,
    external: Option<std::sync::Arc<External>>,
}

/// Public keys of an external issuer, from a JWKS file.
pub struct External {
    keys: Vec<(String, Algorithm, DecodingKey)>,
    issuer: String,
    audience: Option<String>,
}

impl External {
    /// Reads a JWKS document (`{"keys": [...]}`); every key needs a `kid` and must be RSA
    /// (used with RS256) or EC P-256 (ES256).
    pub fn from_jwks(json: &[u8], issuer: &str, audience: Option<&str>) -> Result<Self, String> {
        use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
        let set: JwkSet = serde_json::from_slice(json).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let kid = jwk.common.key_id.clone().ok_or("every key of the JWKS needs a kid")?;
            let alg = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
                _ => return Err(format!("key {kid}: only RSA (RS256) and EC P-256 (ES256) keys are accepted")),
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {kid}: {e}"))?;
            keys.push((kid, alg, key));
        }
        if keys.is_empty() {
            return Err("the JWKS has no keys".into());
        }
        Ok(Self { keys, issuer: issuer.to_string(), audience: audience.map(str::to_string) })
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// 32 random bytes, hex-encoded.
pub fn random_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn key(secret: &[u8]) -> Key {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(b"raftchat peer v1");
    let peer_token = B64.encode(mac.finalize().into_bytes());
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(b"raftchat invite v1");
    let invite_key = mac.finalize().into_bytes().to_vec();
    let digest = Sha256::new().chain_update(b"raftchat kid v1").chain_update(secret).finalize();
    let kid = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Key {
        kid,
        encoding: EncodingKey::from_secret(secret),
        decoding: DecodingKey::from_secret(secret),
        peer_token,
        invite_key,
    }
}

impl Keys {
    /// Keys from the contents of a secret file: one key per non-empty line, the first signs.
    pub fn new(secret: &[u8]) -> Self {
        Self::with_rules(secret, TokenRules::default())
    }

    pub fn with_rules(secret: &[u8], rules: TokenRules) -> Self {
        let mut keys: Vec<Key> =
            secret.split(|b| *b == b'\n').map(|l| l.trim_ascii()).filter(|l| !l.is_empty()).map(key).collect();
        if keys.is_empty() {
            keys.push(key(secret));
        }
        Self { keys: std::sync::Arc::new(keys), rules, external: None }
    }

    /// Also accepts tokens of an external issuer (see the module docs).
    pub fn with_external(mut self, external: External) -> Self {
        self.external = Some(std::sync::Arc::new(external));
        self
    }

    pub fn rules(&self) -> TokenRules {
        self.rules
    }

    fn signing(&self) -> &Key {
        &self.keys[0]
    }

    /// Mints a token for `user`, valid for `ttl_secs` (at most the cluster's maximum).
    pub fn mint(&self, user: &UserId, ttl_secs: u64, admin: bool) -> String {
        let now = now_secs();
        let ttl = ttl_secs.min(self.rules.max_ttl_secs);
        let claims = Claims { sub: user.to_string(), iat: now, exp: now.saturating_add(ttl), nbf: None, adm: admin };
        self.sign(&claims)
    }

    /// Mints a token for `user` issued at `iat` (not before now: a node issuing tokens right
    /// after a revocation dates them past its mark).
    pub fn mint_from(&self, user: &UserId, iat: u64, ttl_secs: u64, admin: bool) -> String {
        let iat = iat.max(now_secs());
        let ttl = ttl_secs.min(self.rules.max_ttl_secs);
        let claims = Claims { sub: user.to_string(), iat, exp: iat.saturating_add(ttl), nbf: None, adm: admin };
        self.sign(&claims)
    }

    /// Signs `claims` as they are (tests and tools use this to make unusual tokens).
    pub fn sign(&self, claims: &Claims) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.signing().kid.clone());
        jsonwebtoken::encode(&header, claims, &self.signing().encoding).expect("HS256 signing cannot fail")
    }

    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed("header is not a JWT header"))?;
        if matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) && self.external.is_some() {
            return self.verify_external(token, &header);
        }
        if header.alg != Algorithm::HS256 {
            return Err(AuthError::Malformed("only alg HS256 is accepted (RS256/ES256 with an external issuer)"));
        }
        let key = match &header.kid {
            None => self.signing(),
            Some(kid) => self.keys.iter().find(|k| &k.kid == kid).ok_or_else(|| AuthError::UnknownKey(kid.clone()))?,
        };
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = self.rules.leeway_secs;
        v.validate_nbf = true;
        v.validate_aud = false;
        v.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key.decoding, &v).map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidAlgorithm => AuthError::Malformed("only alg HS256 is accepted"),
            ErrorKind::MissingRequiredClaim(_) | ErrorKind::Json(_) => {
                AuthError::Malformed("claims must be JSON with string sub and numeric iat and exp")
            }
            _ => AuthError::Malformed("not a valid JWT"),
        })?;
        self.check_claims(data.claims)
    }

    /// The rules every token keeps whoever signed it: not issued in the future, not living
    /// longer than the cluster allows, a valid user id.
    fn check_claims(&self, c: Claims) -> Result<Principal, AuthError> {
        let now = now_secs();
        if c.iat > now.saturating_add(self.rules.leeway_secs) {
            return Err(AuthError::NotYetValid);
        }
        if c.exp.saturating_sub(c.iat) > self.rules.max_ttl_secs {
            return Err(AuthError::TooLong { max_secs: self.rules.max_ttl_secs });
        }
        let user = UserId::parse(&c.sub).map_err(|_| AuthError::Malformed("sub is not a valid user id"))?;
        Ok(Principal { user, admin: c.adm, exp: c.exp, iat: c.iat })
    }

    /// An external issuer's token: its `kid` names a key of the JWKS of the algorithm's kind.
    fn verify_external(&self, token: &str, header: &Header) -> Result<Principal, AuthError> {
        let ext = self.external.as_ref().ok_or(AuthError::Malformed("no external issuer is configured"))?;
        let kid = header.kid.as_deref().ok_or(AuthError::Malformed("an external token needs a kid"))?;
        let (_, alg, key) = ext
            .keys
            .iter()
            .find(|(k, a, _)| k == kid && *a == header.alg)
            .ok_or_else(|| AuthError::UnknownKey(kid.to_string()))?;
        let mut v = Validation::new(*alg);
        v.leeway = self.rules.leeway_secs;
        v.validate_nbf = true;
        v.set_issuer(&[ext.issuer.as_str()]);
        match &ext.audience {
            Some(a) => v.set_audience(&[a.as_str()]),
            None => v.validate_aud = false,
        }
        v.set_required_spec_claims(&["exp", "sub", "iss"]);
        let data = jsonwebtoken::decode::<Claims>(token, key, &v).map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidIssuer => AuthError::Malformed("token of another issuer"),
            ErrorKind::InvalidAudience => AuthError::Malformed("token for another audience"),
            ErrorKind::MissingRequiredClaim(_) | ErrorKind::Json(_) => {
                AuthError::Malformed("claims must be JSON with string sub and iss and numeric iat and exp")
            }
            _ => AuthError::Malformed("not a valid JWT"),
        })?;
        let mut p = self.check_claims(data.claims)?;
        // Operators come from the cluster's own keys only.
        p.admin = false;
        Ok(p)
    }

    /// Verifies an `Authorization` header value (`Bearer <token>`).
    pub fn verify_header(&self, value: Option<&str>) -> Result<Principal, AuthError> {
        let v = value.ok_or(AuthError::Missing)?;
        let token = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .ok_or(AuthError::Malformed("authorization must be 'Bearer <token>'"))?;
        self.verify(token.trim())
    }

    /// An invite to sign up (registration `invite`): `inv1.<id>.<exp>.<mac>`, valid for
    /// `ttl_secs`, used once (the cluster records its id when an account is made with it).
    /// Returns the invite and its expiry (seconds since the epoch).
    pub fn mint_invite(&self, ttl_secs: u64) -> (String, u64) {
        let id: [u8; 12] = rand::random();
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let exp = now_secs().saturating_add(ttl_secs);
        let body = format!("{id}.{exp}");
        let mac = invite_mac(&self.signing().invite_key, &body);
        (format!("inv1.{body}.{mac}"), exp)
    }

    /// The id of a valid, unexpired invite.
    pub fn verify_invite(&self, invite: &str) -> Result<String, AuthError> {
        let mut parts = invite.trim().split('.');
        let (Some("inv1"), Some(id), Some(exp), Some(mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed("an invite looks like inv1.<id>.<expiry>.<signature>"));
        };
        let body = format!("{id}.{exp}");
        let good = self.keys.iter().any(|k| {
            let want = invite_mac(&k.invite_key, &body);
            want.len() == mac.len() && want.bytes().zip(mac.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
        });
        if !good {
            return Err(AuthError::BadSignature);
        }
        let exp: u64 = exp.parse().map_err(|_| AuthError::Malformed("invite expiry is not a number"))?;
        if exp < now_secs() {
            return Err(AuthError::Expired);
        }
        Ok(id.to_string())
    }

    /// The key this node presents to its peers.
    pub fn peer_token(&self) -> &str {
        &self.signing().peer_token
    }

    /// Constant-time check of a peer key against every listed secret's.
    pub fn verify_peer(&self, presented: &str) -> bool {
        let a = presented.as_bytes();
        self.keys.iter().fold(false, |ok, k| {
            let b = k.peer_token.as_bytes();
            let same = a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
            ok | same
        })
    }
}

fn invite_mac(key: &[u8], body: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(body.as_bytes());
    B64.encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ES256 key pair as an issuer would have it: the private key (PKCS#8 DER) and its
    /// public key as a JWKS entry.
    fn es256_issuer(kid: &str) -> (EncodingKey, serde_json::Value) {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let point = pair.public_key_raw(); // 0x04 || X || Y
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
            "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65]),
        });
        (EncodingKey::from_ec_der(&pair.serialize_der()), jwk)
    }

    #[test]
    fn an_external_issuers_es256_tokens_verify_against_its_jwks_and_nothing_else_does() {
        let (sk, jwk) = es256_issuer("idp-1");
        let (other_sk, _) = es256_issuer("idp-1");
        let jwks = serde_json::json!({ "keys": [jwk] }).to_string();
        let ext = External::from_jwks(jwks.as_bytes(), "https://login.example", Some("raftchat")).unwrap();
        let k = Keys::new(b"secret").with_external(ext);
        let now = now_secs();
        let token = |key: &EncodingKey, kid: &str, claims: serde_json::Value| {
            let mut h = Header::new(Algorithm::ES256);
            h.kid = Some(kid.into());
            jsonwebtoken::encode(&h, &claims, key).unwrap()
        };
        let good = serde_json::json!({"sub": "alice", "iat": now, "exp": now + 600, "iss": "https://login.example", "aud": "raftchat", "adm": true});
        let p = k.verify(&token(&sk, "idp-1", good.clone())).unwrap();
        assert_eq!(p.user, alice());
        assert!(!p.admin, "an external token is never an operator's");
        // Wrong signer, unknown kid, other issuer, other audience, too long, missing iss.
        assert_eq!(k.verify(&token(&other_sk, "idp-1", good.clone())), Err(AuthError::BadSignature));
        assert!(matches!(k.verify(&token(&sk, "idp-2", good.clone())), Err(AuthError::UnknownKey(_))));
        let mut c = good.clone();
        c["iss"] = "https://evil.example".into();
        assert!(k.verify(&token(&sk, "idp-1", c)).is_err());
        let mut c = good.clone();
        c["aud"] = "someone-else".into();
        assert!(k.verify(&token(&sk, "idp-1", c)).is_err());
        let mut c = good.clone();
        c["exp"] = (now + 365 * 86_400).into();
        assert!(matches!(k.verify(&token(&sk, "idp-1", c)), Err(AuthError::TooLong { .. })));
        let mut c = good.clone();
        c.as_object_mut().unwrap().remove("iss");
        assert!(k.verify(&token(&sk, "idp-1", c)).is_err());
        // HS256 tokens of the cluster still work; an HS256 token cannot name the external kid.
        assert!(k.verify(&k.mint(&alice(), 60, false)).is_ok());
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("idp-1".into());
        let forged = jsonwebtoken::encode(&h, &good, &EncodingKey::from_secret(b"guess")).unwrap();
        assert!(k.verify(&forged).is_err());
        // Without an external issuer, ES256 is refused outright.
        assert!(Keys::new(b"secret").verify(&token(&sk, "idp-1", good)).is_err());
        // Symmetric keys in a JWKS are refused.
        let oct = serde_json::json!({"keys": [{"kty": "oct", "kid": "x", "k": "c2VjcmV0"}]}).to_string();
        assert!(External::from_jwks(oct.as_bytes(), "i", None).is_err());
    }

    #[test]
    fn invites_verify_only_unchanged_unexpired_and_signed_by_the_cluster() {
        let k = Keys::new(b"secret");
        let (inv, _) = k.mint_invite(60);
        let id = k.verify_invite(&inv).unwrap();
        assert_eq!(id.len(), 24);
        assert!(Keys::new(b"other").verify_invite(&inv).is_err());
        let forged = inv.replacen(&id, "000000000000000000000000", 1);
        assert_eq!(k.verify_invite(&forged), Err(AuthError::BadSignature));
        let (old, _) = k.mint_invite(0);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(k.verify_invite(&old), Err(AuthError::Expired));
        assert!(k.verify_invite("nonsense").is_err());
        // An invite is not a bearer token.
        assert!(k.verify(&inv).is_err());
    }

    fn alice() -> UserId {
        UserId::parse("alice").unwrap()
    }

    #[test]
    fn mint_then_verify_and_reject_tampering() {
        let k = Keys::new(b"secret");
        let t = k.mint(&alice(), 60, false);
        let p = k.verify(&t).unwrap();
        assert_eq!((p.user.clone(), p.admin), (alice(), false));
        assert_eq!(k.verify_header(Some(&format!("Bearer {t}"))).unwrap().user, alice());
        assert!(matches!(Keys::new(b"other").verify(&t), Err(AuthError::UnknownKey(_))));
        // Swap the payload for one naming another user.
        let mut parts: Vec<&str> = t.split('.').collect();
        let now = now_secs();
        let forged = B64.encode(format!(r#"{{"sub":"bob","iat":{now},"exp":{}}}"#, now + 60));
        parts[1] = &forged;
        assert_eq!(k.verify(&parts.join(".")), Err(AuthError::BadSignature));
        assert!(matches!(k.verify("a.b"), Err(AuthError::Malformed(_))));
        assert_eq!(k.verify_header(None), Err(AuthError::Missing));
        let none_alg = format!("{}.{}.", B64.encode(br#"{"alg":"none"}"#), forged);
        assert!(matches!(k.verify(&none_alg), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn time_claims_are_bounded() {
        let k = Keys::new(b"s");
        let now = now_secs();
        let c = |iat: u64, exp: u64, nbf: Option<u64>| Claims { sub: "alice".into(), iat, exp, nbf, adm: false };
        assert_eq!(k.verify(&k.sign(&c(now - 7200, now - 3600, None))), Err(AuthError::Expired));
        // Expired, but within the leeway: accepted.
        assert!(k.verify(&k.sign(&c(now - 100, now - 10, None))).is_ok());
        // A token that never expires.
        assert_eq!(
            k.verify(&k.sign(&c(now, u64::MAX, None))),
            Err(AuthError::TooLong { max_secs: TokenRules::default().max_ttl_secs })
        );
        assert_eq!(k.verify(&k.sign(&c(now + 3600, now + 7200, None))), Err(AuthError::NotYetValid));
        assert_eq!(k.verify(&k.sign(&c(now, now + 7200, Some(now + 3600)))), Err(AuthError::NotYetValid));
        assert!(k.verify(&k.sign(&c(now, now + 60, Some(now)))).is_ok());
        // mint caps the lifetime instead of making an unusable token.
        assert!(k.verify(&k.mint(&alice(), u64::MAX, false)).is_ok());
    }

    #[test]
    fn rotated_keys_verify_until_removed() {
        let old = Keys::new(b"old-key");
        let t = old.mint(&alice(), 60, false);
        let rotated = Keys::new(b"new-key\nold-key\n");
        assert_eq!(rotated.verify(&t).unwrap().user, alice());
        assert!(rotated.verify_peer(old.peer_token()));
        let fresh = rotated.mint(&alice(), 60, false);
        assert!(matches!(old.verify(&fresh), Err(AuthError::UnknownKey(_))));
        let retired = Keys::new(b"new-key");
        assert!(matches!(retired.verify(&t), Err(AuthError::UnknownKey(_))));
        assert!(!retired.verify_peer(old.peer_token()));
        assert!(!retired.verify_peer("nope"));
    }
}
