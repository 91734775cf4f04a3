//! Tokens signed by the store that issued them (Ed25519), valid on every store.
//!
//! A token is `base64url(payload) "." base64url(signature)`; the payload is
//! `version(1) kind(1) issuer(8) revision(8) expiry_ms(8) name(..)`, integers big-endian:
//!
//! - **user tokens** ([`Kind::User`]) are what `Authenticate` answers: `name` is the user,
//!   `revision` the auth revision they were issued at, `expiry_ms` the Unix time (ms) after
//!   which they are refused (`--auth-token-ttl` after issue). Whether the user still exists
//!   and the token is newer than the user's last password change is the auth state's
//!   business ([`super::AuthState::user_of_token`]).
//! - **store tokens** ([`Kind::Store`]) prove a call comes from a storage node of this cluster
//!   (the etcd layer and the stores' own clients calling Atoll's KV service on another store,
//!   after checking the user themselves). `name` is empty.
//!
//! Every store signs with its own key and publishes the public half in its PD store record
//! (`metapb.Store.auth_key`), so any store verifies any store's tokens without a shared
//! secret: forging one takes a store's private key (`<data-dir>/auth-key`, mode 0600).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
pub use ed25519_dalek::SigningKey;
use ed25519_dalek::{Signature, Signer, Verifier, VerifyingKey};

const VERSION: u8 = 1;
const HEADER: usize = 1 + 1 + 8 + 8 + 8;

/// What a token stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    User = 1,
    Store = 2,
}

/// A token's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    pub kind: Kind,
    /// The store that signed it.
    pub issuer: u64,
    /// The auth revision at issue (user tokens).
    pub revision: u64,
    /// Refused after this Unix time, in milliseconds.
    pub expiry_ms: u64,
    /// The user (user tokens); empty for store tokens.
    pub name: String,
}

impl Claims {
    fn payload(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(HEADER + self.name.len());
        p.push(VERSION);
        p.push(self.kind as u8);
        p.extend_from_slice(&self.issuer.to_be_bytes());
        p.extend_from_slice(&self.revision.to_be_bytes());
        p.extend_from_slice(&self.expiry_ms.to_be_bytes());
        p.extend_from_slice(self.name.as_bytes());
        p
    }

    fn from_payload(p: &[u8]) -> Option<Claims> {
        if p.len() < HEADER || p[0] != VERSION {
            return None;
        }
        let kind = match p[1] {
            1 => Kind::User,
            2 => Kind::Store,
            _ => return None,
        };
        let u64_at = |i: usize| u64::from_be_bytes(p[i..i + 8].try_into().expect("8 bytes"));
        Some(Claims {
            kind,
            issuer: u64_at(2),
            revision: u64_at(10),
            expiry_ms: u64_at(18),
            name: String::from_utf8(p[HEADER..].to_vec()).ok()?,
        })
    }

    /// Whether the token has expired at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        now_ms >= self.expiry_ms
    }
}

/// `claims` signed with `key`.
pub fn sign(key: &SigningKey, claims: &Claims) -> String {
    let p = claims.payload();
    let sig = key.sign(&p);
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(&p),
        URL_SAFE_NO_PAD.encode(sig.to_bytes())
    )
}

/// A token split into its claims and what checks them: the payload and the signature. `None`
/// if it is not a token of this form.
pub fn parse(token: &str) -> Option<(Claims, Vec<u8>, Signature)> {
    let (p, s) = token.split_once('.')?;
    let p = URL_SAFE_NO_PAD.decode(p).ok()?;
    let s: [u8; 64] = URL_SAFE_NO_PAD.decode(s).ok()?.try_into().ok()?;
    Some((Claims::from_payload(&p)?, p, Signature::from_bytes(&s)))
}

/// Whether `sig` is `key`'s signature of `payload`.
pub fn signed_by(key: &VerifyingKey, payload: &[u8], sig: &Signature) -> bool {
    key.verify(payload, sig).is_ok()
}

/// The claims of `token` if `key` signed it (expiry not checked).
pub fn verify(key: &VerifyingKey, token: &str) -> Option<Claims> {
    let (c, p, s) = parse(token)?;
    signed_by(key, &p, &s).then_some(c)
}

/// A new random signing key.
pub fn new_key() -> SigningKey {
    SigningKey::from_bytes(&rand::random::<[u8; 32]>())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(name: &str) -> Claims {
        Claims {
            kind: Kind::User,
            issuer: 3,
            revision: 17,
            expiry_ms: 1_000_000,
            name: name.into(),
        }
    }

    #[test]
    fn sign_then_verify() {
        let k = new_key();
        for name in ["alice", "", "a.b.c", "ünï"] {
            let t = sign(&k, &claims(name));
            assert_eq!(verify(&k.verifying_key(), &t), Some(claims(name)));
        }
        let s = Claims {
            kind: Kind::Store,
            ..claims("")
        };
        assert_eq!(verify(&k.verifying_key(), &sign(&k, &s)), Some(s));
    }

    #[test]
    fn forged_or_foreign_tokens_fail() {
        let (k, other) = (new_key(), new_key());
        let t = sign(&k, &claims("alice"));
        assert_eq!(
            verify(&other.verifying_key(), &t),
            None,
            "another store's key"
        );
        // The payload changed (another user), the signature kept.
        let (_, sig) = t.split_once('.').unwrap();
        let forged = format!("{}.{sig}", URL_SAFE_NO_PAD.encode(claims("root").payload()));
        assert_eq!(verify(&k.verifying_key(), &forged), None);
        for junk in ["", ".", "abc", "a.b", "simple.5", &t[1..]] {
            assert_eq!(verify(&k.verifying_key(), junk), None, "{junk:?}");
        }
    }

    #[test]
    fn expiry() {
        let c = claims("alice");
        assert!(!c.expired(999_999));
        assert!(c.expired(1_000_000));
        assert!(c.expired(u64::MAX));
    }
}
