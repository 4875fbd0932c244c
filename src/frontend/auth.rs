//! Client authentication: pgway checks the client's password itself, by SCRAM-SHA-256 or
//! md5, against the `[[users]]` entries. The SCRAM verifier is derived once per user at
//! start-up, so a login costs two HMACs, not 4096 PBKDF2 rounds.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// A user's SCRAM-SHA-256 verifier: what PostgreSQL stores in `pg_authid`.
#[derive(Clone)]
pub struct ScramVerifier {
    iterations: u32,
    salt_b64: String,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramVerifier(..)")
    }
}

/// Why a client's authentication failed. Every variant ends as FATAL 28P01 or 08P01.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// The proof or password did not match.
    #[error("password authentication failed")]
    BadPassword,
    /// The SASL exchange was malformed or asked for something unsupported.
    #[error("invalid SCRAM exchange: {0}")]
    Protocol(&'static str),
}

impl ScramVerifier {
    /// Derives a verifier with a fresh random salt.
    pub fn new(password: &str) -> Self {
        let encoded = postgres_protocol::password::scram_sha_256(password.as_bytes());
        Self::parse(&encoded).unwrap_or_else(Self::random)
    }

    /// A verifier no password matches, for unknown users (so they see the same exchange).
    pub fn random() -> Self {
        let mut rng = rand::thread_rng();
        let mut salt = [0u8; 16];
        let mut stored_key = [0u8; 32];
        let mut server_key = [0u8; 32];
        rng.fill_bytes(&mut salt);
        rng.fill_bytes(&mut stored_key);
        rng.fill_bytes(&mut server_key);
        Self {
            iterations: 4096,
            salt_b64: B64.encode(salt),
            stored_key,
            server_key,
        }
    }

    /// The keys to log in to servers with, given the `client_key` a client's proof gave
    /// (see [`ScramExchange::finish`]).
    pub fn keys(&self, client_key: [u8; 32]) -> crate::backend::scram::ScramKeys {
        crate::backend::scram::ScramKeys {
            client_key,
            server_key: self.server_key,
            salt_b64: self.salt_b64.clone(),
            iterations: self.iterations,
        }
    }

    /// Parses `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>` (as in `pg_authid`).
    pub fn parse(encoded: &str) -> Option<Self> {
        let rest = encoded.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iterations, salt_b64) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Self {
            iterations: iterations.parse().ok()?,
            salt_b64: salt_b64.to_owned(),
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }
}

/// HMAC-SHA-256.
pub(crate) fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so new_from_slice cannot fail here.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => return [0; 32],
    };
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// Server side of one SCRAM-SHA-256 exchange (RFC 5802/7677, no channel binding).
pub struct ScramExchange {
    verifier: ScramVerifier,
    client_first_bare: String,
    server_first: String,
    gs2_header: String,
    nonce: String,
}

impl ScramExchange {
    /// Handles the client-first-message; returns the exchange and the server-first-message.
    pub fn start(
        verifier: ScramVerifier,
        client_first: &[u8],
    ) -> Result<(Self, String), AuthError> {
        let text =
            std::str::from_utf8(client_first).map_err(|_| AuthError::Protocol("not UTF-8"))?;
        let (gs2_header, bare) = match text.as_bytes().first() {
            Some(b'n') | Some(b'y') => {
                let mut parts = text.splitn(3, ',');
                let flag = parts.next().unwrap_or_default();
                let authzid = parts
                    .next()
                    .ok_or(AuthError::Protocol("short gs2 header"))?;
                let bare = parts
                    .next()
                    .ok_or(AuthError::Protocol("short gs2 header"))?;
                (format!("{flag},{authzid},"), bare)
            }
            Some(b'p') => return Err(AuthError::Protocol("channel binding is not supported")),
            _ => return Err(AuthError::Protocol("bad gs2 header")),
        };
        let client_nonce = bare
            .split(',')
            .find_map(|attr| attr.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or(AuthError::Protocol("missing nonce"))?;
        let mut server_part = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut server_part);
        let nonce = format!("{client_nonce}{}", B64.encode(server_part));
        let server_first = format!(
            "r={nonce},s={},i={}",
            verifier.salt_b64, verifier.iterations
        );
        Ok((
            Self {
                verifier,
                client_first_bare: bare.to_owned(),
                server_first: server_first.clone(),
                gs2_header,
                nonce,
            },
            server_first,
        ))
    }

    /// Checks the client-final-message; returns the server-final-message and the client's
    /// `ClientKey` (proof XOR ClientSignature, whose hash the proof was checked against).
    pub fn finish(self, client_final: &[u8]) -> Result<(String, [u8; 32]), AuthError> {
        let text =
            std::str::from_utf8(client_final).map_err(|_| AuthError::Protocol("not UTF-8"))?;
        let (without_proof, proof_b64) = text
            .rsplit_once(",p=")
            .ok_or(AuthError::Protocol("missing proof"))?;
        let mut channel = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(v) = attr.strip_prefix("c=") {
                channel = Some(v);
            } else if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            }
        }
        if channel != Some(B64.encode(self.gs2_header.as_bytes()).as_str()) {
            return Err(AuthError::Protocol("channel binding mismatch"));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(AuthError::Protocol("nonce mismatch"));
        }
        let proof = B64
            .decode(proof_b64)
            .map_err(|_| AuthError::Protocol("bad proof encoding"))?;
        if proof.len() != 32 {
            return Err(AuthError::Protocol("bad proof length"));
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for ((key, p), s) in client_key.iter_mut().zip(&proof).zip(signature) {
            *key = p ^ s;
        }
        let computed: [u8; 32] = Sha256::digest(client_key).into();
        if !constant_time_eq(&computed, &self.verifier.stored_key) {
            return Err(AuthError::BadPassword);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok((format!("v={}", B64.encode(server_signature)), client_key))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks an md5 PasswordMessage (`md5` + hex) against the user's password and salt.
pub fn md5_matches(user: &str, password: &str, salt: [u8; 4], response: &[u8]) -> bool {
    let expected =
        postgres_protocol::authentication::md5_hash(user.as_bytes(), password.as_bytes(), salt);
    constant_time_eq(expected.as_bytes(), response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn run(server_password: &str, client_password: &str) -> Result<(), AuthError> {
        let verifier = ScramVerifier::new(server_password);
        let mut client =
            ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
        let (exchange, server_first) = ScramExchange::start(verifier, client.message())?;
        client
            .update(server_first.as_bytes())
            .map_err(|_| AuthError::Protocol("client rejected server-first"))?;
        let (server_final, _) = exchange.finish(client.message())?;
        client
            .finish(server_final.as_bytes())
            .map_err(|_| AuthError::Protocol("client rejected server signature"))
    }

    #[test]
    fn scram_accepts_right_password_and_proves_itself() {
        assert_eq!(run("app-secret", "app-secret"), Ok(()));
    }

    #[test]
    fn scram_rejects_wrong_password() {
        assert_eq!(run("app-secret", "nope"), Err(AuthError::BadPassword));
    }

    #[test]
    fn scram_rejects_garbage() {
        let v = ScramVerifier::random();
        assert!(ScramExchange::start(v.clone(), b"").is_err());
        assert!(ScramExchange::start(v.clone(), b"p=tls-server-end-point,,n=,r=abc").is_err());
        assert!(ScramExchange::start(v.clone(), b"n,,n=,").is_err());
        let (ex, _) = ScramExchange::start(v, b"n,,n=,r=abc").expect("start");
        assert!(ex.finish(b"c=biws,r=wrong,p=AAAA").is_err());
    }

    #[test]
    fn md5_checks() {
        let salt = [1, 2, 3, 4];
        let good = postgres_protocol::authentication::md5_hash(b"u", b"pw", salt);
        assert!(md5_matches("u", "pw", salt, good.as_bytes()));
        assert!(!md5_matches("u", "other", salt, good.as_bytes()));
        assert!(!md5_matches("u", "pw", [0; 4], good.as_bytes()));
    }
}
