//! Bearer tokens: compact JWTs signed with HS256 and the cluster secret.
//!
//! Only `alg: HS256` is accepted (no `none`, no algorithm confusion); `exp` is required.
//! Claims: `sub` (the user id), `iat`, `exp`, and `adm` for operator tokens that may
//! register users. Peers authenticate to each other with a key derived from the same secret.

use crate::chat::UserId;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub iat: u64,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adm: bool,
}

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: UserId,
    pub admin: bool,
}

#[derive(Clone)]
pub struct Keys {
    secret: Vec<u8>,
    peer_token: String,
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

impl Keys {
    pub fn new(secret: &[u8]) -> Self {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
        mac.update(b"raftchat peer v1");
        let peer_token = B64.encode(mac.finalize().into_bytes());
        Self { secret: secret.to_vec(), peer_token }
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.secret).expect("HMAC accepts keys of any length")
    }

    /// Mints a token for `user`, valid for `ttl_secs`.
    pub fn mint(&self, user: &UserId, ttl_secs: u64, admin: bool) -> String {
        let now = now_secs();
        let claims = Claims { sub: user.to_string(), iat: now, exp: now.saturating_add(ttl_secs), adm: admin };
        let header = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = B64.encode(serde_json::to_vec(&claims).expect("claims serialize"));
        let signing_input = format!("{header}.{payload}");
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        let sig = B64.encode(mac.finalize().into_bytes());
        format!("{signing_input}.{sig}")
    }

    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(AuthError::Malformed("expected three dot-separated parts"));
        };
        let header: serde_json::Value = B64
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(AuthError::Malformed("header is not base64url JSON"))?;
        if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
            return Err(AuthError::Malformed("only alg HS256 is accepted"));
        }
        let sig = B64.decode(s).map_err(|_| AuthError::Malformed("signature is not base64url"))?;
        let mut mac = self.mac();
        mac.update(h.as_bytes());
        mac.update(b".");
        mac.update(p.as_bytes());
        mac.verify_slice(&sig).map_err(|_| AuthError::BadSignature)?;
        let claims: Claims = B64
            .decode(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(AuthError::Malformed("payload is not base64url JSON claims"))?;
        if claims.exp <= now_secs() {
            return Err(AuthError::Expired);
        }
        let user = UserId::parse(&claims.sub).map_err(|_| AuthError::Malformed("sub is not a valid user id"))?;
        Ok(Principal { user, admin: claims.adm })
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

    /// The shared key peers present to each other.
    pub fn peer_token(&self) -> &str {
        &self.peer_token
    }

    /// Constant-time check of a peer key.
    pub fn verify_peer(&self, presented: &str) -> bool {
        let a = presented.as_bytes();
        let b = self.peer_token.as_bytes();
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_then_verify_and_reject_tampering() {
        let k = Keys::new(b"secret");
        let alice = UserId::parse("alice").unwrap();
        let t = k.mint(&alice, 60, false);
        assert_eq!(k.verify(&t).unwrap(), Principal { user: alice.clone(), admin: false });
        assert_eq!(k.verify_header(Some(&format!("Bearer {t}"))).unwrap().user, alice);
        assert_eq!(Keys::new(b"other").verify(&t), Err(AuthError::BadSignature));
        // Swap the payload for one naming another user.
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = B64.encode(br#"{"sub":"bob","iat":0,"exp":99999999999}"#);
        parts[1] = &forged;
        assert_eq!(k.verify(&parts.join(".")), Err(AuthError::BadSignature));
        assert!(matches!(k.verify("a.b"), Err(AuthError::Malformed(_))));
        assert_eq!(k.verify_header(None), Err(AuthError::Missing));
        let none_alg = format!("{}.{}.", B64.encode(br#"{"alg":"none"}"#), forged);
        assert!(matches!(k.verify(&none_alg), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn expired_tokens_are_rejected() {
        let k = Keys::new(b"s");
        let t = k.mint(&UserId::parse("a").unwrap(), 0, false);
        assert_eq!(k.verify(&t), Err(AuthError::Expired));
        assert!(k.verify_peer(Keys::new(b"s").peer_token()));
        assert!(!k.verify_peer("nope"));
    }
}
