//! The client side of SCRAM-SHA-256 towards a server, with a password (postgres-protocol's
//! client) or with keys recovered from a client's proof (users known through
//! `auth_query`).
//!
//! With keys, pgway never knows the password: the proof it sends is
//! `ClientKey XOR HMAC(StoredKey, AuthMessage)`, with `StoredKey = H(ClientKey)`, and it
//! checks the server's signature with the `ServerKey` of the verifier it read. That only
//! works if the server salts and iterates as that verifier says, which [`KeyExchange`]
//! checks first (a password changed since pgway read it shows up there).

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::frontend::auth::hmac;

/// What a SCRAM verifier and a client's proof give: enough to log in as the client's user
/// to a server that stores that verifier. Its `Debug` shows none of it.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    /// The client's `ClientKey` (`HMAC(SaltedPassword, "Client Key")`).
    pub client_key: [u8; 32],
    /// The verifier's `ServerKey`.
    pub server_key: [u8; 32],
    /// The verifier's salt, base64 as stored.
    pub salt_b64: String,
    /// The verifier's iteration count.
    pub iterations: u32,
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramKeys(..)")
    }
}

/// A step of the exchange the server's message did not allow.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ScramError(String);

/// One exchange, with a password or with keys.
pub enum ScramClient {
    /// postgres-protocol's client.
    Password(Box<ScramSha256>),
    /// Keys from `auth_query`.
    Keys(KeyExchange),
}

impl ScramClient {
    /// Starts with the client-first-message ready in [`Self::message`].
    pub fn with_password(password: &str) -> Self {
        Self::Password(Box::new(ScramSha256::new(
            password.as_bytes(),
            ChannelBinding::unsupported(),
        )))
    }

    /// Starts with keys (see the module doc).
    pub fn with_keys(keys: Arc<ScramKeys>) -> Self {
        Self::Keys(KeyExchange::new(keys))
    }

    /// The message to send next.
    pub fn message(&self) -> &[u8] {
        match self {
            Self::Password(s) => s.message(),
            Self::Keys(k) => &k.message,
        }
    }

    /// Takes the server-first-message; [`Self::message`] is then the client-final one.
    pub fn update(&mut self, server_first: &[u8]) -> Result<(), ScramError> {
        match self {
            Self::Password(s) => s
                .update(server_first)
                .map_err(|e| ScramError(e.to_string())),
            Self::Keys(k) => k.update(server_first),
        }
    }

    /// Checks the server-final-message (the server's signature).
    pub fn finish(&mut self, server_final: &[u8]) -> Result<(), ScramError> {
        match self {
            Self::Password(s) => s
                .finish(server_final)
                .map_err(|e| ScramError(e.to_string())),
            Self::Keys(k) => k.finish(server_final),
        }
    }
}

/// The exchange with keys.
pub struct KeyExchange {
    keys: Arc<ScramKeys>,
    nonce: String,
    /// The message to send next.
    message: Vec<u8>,
    /// Set by `update`: what both sides sign.
    auth_message: Option<String>,
}

impl KeyExchange {
    fn new(keys: Arc<ScramKeys>) -> Self {
        let mut raw = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut raw);
        let nonce = B64.encode(raw);
        Self {
            message: format!("n,,n=,r={nonce}").into_bytes(),
            keys,
            nonce,
            auth_message: None,
        }
    }

    fn update(&mut self, server_first: &[u8]) -> Result<(), ScramError> {
        let text = std::str::from_utf8(server_first)
            .map_err(|_| ScramError("server-first-message is not UTF-8".into()))?;
        let attr = |name: &str| {
            text.split(',')
                .find_map(|a| a.strip_prefix(name))
                .ok_or_else(|| ScramError(format!("server-first-message without {name}")))
        };
        let nonce = attr("r=")?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError("server nonce does not extend pgway's".into()));
        }
        let same_salt = B64.decode(attr("s=")?).ok() == B64.decode(&self.keys.salt_b64).ok();
        if !same_salt || attr("i=")?.parse::<u32>().ok() != Some(self.keys.iterations) {
            return Err(ScramError(
                "the server's SCRAM verifier is not the one auth_query returned (the \
                 password changed?)"
                    .into(),
            ));
        }
        let without_proof = format!("c=biws,r={nonce}");
        let client_first_bare = format!("n=,r={}", self.nonce);
        let auth_message = format!("{client_first_bare},{text},{without_proof}");
        let stored_key: [u8; 32] = Sha256::digest(self.keys.client_key).into();
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = self
            .keys
            .client_key
            .iter()
            .zip(signature)
            .map(|(k, s)| k ^ s)
            .collect();
        self.message = format!("{without_proof},p={}", B64.encode(proof)).into_bytes();
        self.auth_message = Some(auth_message);
        Ok(())
    }

    fn finish(&mut self, server_final: &[u8]) -> Result<(), ScramError> {
        let auth_message = self
            .auth_message
            .as_ref()
            .ok_or_else(|| ScramError("server-final-message before server-first".into()))?;
        let text = std::str::from_utf8(server_final)
            .map_err(|_| ScramError("server-final-message is not UTF-8".into()))?;
        if let Some(error) = text.strip_prefix("e=") {
            return Err(ScramError(format!("the server refused the proof: {error}")));
        }
        let signature = text
            .strip_prefix("v=")
            .and_then(|v| B64.decode(v).ok())
            .ok_or_else(|| ScramError("server-final-message without a signature".into()))?;
        if signature != hmac(&self.keys.server_key, auth_message.as_bytes()) {
            return Err(ScramError("the server's signature does not match".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::auth::{ScramExchange, ScramVerifier};

    /// A client logs in to pgway with its password; pgway then logs in to a "server" that
    /// holds the same verifier, with the keys it recovered.
    #[test]
    fn keys_recovered_from_a_client_log_in_where_the_verifier_is_the_same() {
        let stored = postgres_protocol::password::scram_sha_256(b"s3cret");
        let verifier = ScramVerifier::parse(&stored).expect("verifier");

        let mut client = ScramClient::with_password("s3cret");
        let (exchange, server_first) =
            ScramExchange::start(verifier.clone(), client.message()).expect("start");
        client.update(server_first.as_bytes()).expect("update");
        let (server_final, client_key) = exchange.finish(client.message()).expect("proof");
        client.finish(server_final.as_bytes()).expect("signature");

        let keys = Arc::new(verifier.keys(client_key));
        let mut pgway = ScramClient::with_keys(Arc::clone(&keys));
        let (server, first) =
            ScramExchange::start(verifier.clone(), pgway.message()).expect("start");
        pgway
            .update(first.as_bytes())
            .expect("same salt and iterations");
        let (last, _) = server
            .finish(pgway.message())
            .expect("the server accepts the proof");
        pgway.finish(last.as_bytes()).expect("and proves itself");

        // A server whose verifier changed (a new password: a new salt) is refused early.
        let other = ScramVerifier::parse(&postgres_protocol::password::scram_sha_256(b"new"))
            .expect("verifier");
        let mut pgway = ScramClient::with_keys(keys);
        let (_, first) = ScramExchange::start(other, pgway.message()).expect("start");
        assert!(pgway.update(first.as_bytes()).is_err());
    }
}
