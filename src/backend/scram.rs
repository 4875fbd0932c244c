//! The client side of SCRAM-SHA-256 towards a server, with a password or with keys
//! recovered from a client's proof (users known through `auth_query`).
//!
//! Both end in the same keys: the proof pgway sends is
//! `ClientKey XOR HMAC(StoredKey, AuthMessage)`, with `StoredKey = H(ClientKey)`, and it
//! checks the server's signature with the `ServerKey`. With keys from `auth_query`, pgway
//! never knows the password, and the exchange only works if the server salts and iterates
//! as the verifier it read says, which [`ScramClient::update`] checks first (a password
//! changed since pgway read it shows up there). With a password, the keys come from
//! `SaltedPassword = PBKDF2(password, salt, iterations)`, 4096 rounds of HMAC-SHA-256 by
//! default: [`PasswordKeys`] keeps the last keys it derived, and every later log-in with
//! the same salt and iteration count (every node of a cluster holds the same verifier)
//! reuses them. A failover, which opens a pool's worth of connections to the new primary
//! at once, then pays for the derivation once instead of once per connection.

use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::frontend::auth::hmac;
use crate::sync::lock;

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

impl ScramKeys {
    /// Whether these keys are for a verifier with `salt` and `iterations`.
    fn fit(&self, salt: &[u8], iterations: u32) -> bool {
        self.iterations == iterations && B64.decode(&self.salt_b64).ok().as_deref() == Some(salt)
    }
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramKeys(..)")
    }
}

/// A password, and the keys last derived from it. Its `Debug` shows neither.
pub struct PasswordKeys {
    password: Box<str>,
    derived: Mutex<Option<Arc<ScramKeys>>>,
}

impl PasswordKeys {
    /// `password`, with no keys derived yet.
    pub fn new(password: &str) -> Self {
        Self {
            password: password.into(),
            derived: Mutex::new(None),
        }
    }

    /// The password itself (for a server that asks for it in clear text or md5).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The keys for a verifier with `salt` (base64 as the server sent it) and
    /// `iterations`: the last ones derived if they fit, else derived now and kept.
    fn keys_for(&self, salt_b64: &str, salt: &[u8], iterations: u32) -> Arc<ScramKeys> {
        let derived = || lock(&self.derived);
        if let Some(keys) = derived().as_ref().filter(|k| k.fit(salt, iterations)) {
            return Arc::clone(keys);
        }
        // Derived outside the lock: two log-ins at once may both derive, and both get keys
        // that work.
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(&normalize(&self.password), salt, iterations, &mut salted);
        let keys = Arc::new(ScramKeys {
            client_key: hmac(&salted, b"Client Key"),
            server_key: hmac(&salted, b"Server Key"),
            salt_b64: salt_b64.to_owned(),
            iterations,
        });
        *derived() = Some(Arc::clone(&keys));
        keys
    }
}

impl std::fmt::Debug for PasswordKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordKeys(..)")
    }
}

/// The password as PostgreSQL hashes it: SASLprep'd where that succeeds, else as it is
/// (PostgreSQL does not require passwords to be valid for SASLprep).
fn normalize(password: &str) -> Vec<u8> {
    match stringprep::saslprep(password) {
        Ok(prepped) => prepped.into_owned().into_bytes(),
        Err(_) => password.as_bytes().to_vec(),
    }
}

/// A step of the exchange the server's message did not allow.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ScramError(String);

/// Where an exchange's keys come from.
enum Source {
    /// A password: keys for whatever verifier the server has.
    Password(Arc<PasswordKeys>),
    /// Keys from `auth_query`: the server must have the verifier they came from.
    Keys(Arc<ScramKeys>),
}

/// One exchange, with a password or with keys.
pub struct ScramClient {
    source: Source,
    nonce: String,
    /// The message to send next.
    message: Vec<u8>,
    /// Set by `update`: what both sides sign, and the keys it was signed with.
    signed: Option<(String, Arc<ScramKeys>)>,
}

impl ScramClient {
    /// Starts with a password, the client-first-message ready in [`Self::message`].
    pub fn with_password(password: Arc<PasswordKeys>) -> Self {
        Self::new(Source::Password(password))
    }

    /// Starts with keys (see the module doc).
    pub fn with_keys(keys: Arc<ScramKeys>) -> Self {
        Self::new(Source::Keys(keys))
    }

    fn new(source: Source) -> Self {
        let mut raw = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut raw);
        let nonce = B64.encode(raw);
        Self {
            message: format!("n,,n=,r={nonce}").into_bytes(),
            source,
            nonce,
            signed: None,
        }
    }

    /// The message to send next.
    pub fn message(&self) -> &[u8] {
        &self.message
    }

    /// Takes the server-first-message; [`Self::message`] is then the client-final one.
    pub fn update(&mut self, server_first: &[u8]) -> Result<(), ScramError> {
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
        let salt_b64 = attr("s=")?;
        let salt = B64
            .decode(salt_b64)
            .map_err(|_| ScramError("the server's salt is not base64".into()))?;
        let iterations = attr("i=")?
            .parse::<u32>()
            .ok()
            .filter(|&i| i > 0)
            .ok_or_else(|| ScramError("the server's iteration count is not a number".into()))?;
        let keys = match &self.source {
            Source::Password(password) => password.keys_for(salt_b64, &salt, iterations),
            Source::Keys(keys) if keys.fit(&salt, iterations) => Arc::clone(keys),
            Source::Keys(_) => {
                return Err(ScramError(
                    "the server's SCRAM verifier is not the one auth_query returned (the \
                     password changed?)"
                        .into(),
                ))
            }
        };
        let without_proof = format!("c=biws,r={nonce}");
        let client_first_bare = format!("n=,r={}", self.nonce);
        let auth_message = format!("{client_first_bare},{text},{without_proof}");
        let stored_key: [u8; 32] = Sha256::digest(keys.client_key).into();
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = keys
            .client_key
            .iter()
            .zip(signature)
            .map(|(k, s)| k ^ s)
            .collect();
        self.message = format!("{without_proof},p={}", B64.encode(proof)).into_bytes();
        self.signed = Some((auth_message, keys));
        Ok(())
    }

    /// Checks the server-final-message (the server's signature).
    pub fn finish(&mut self, server_final: &[u8]) -> Result<(), ScramError> {
        let (auth_message, keys) = self
            .signed
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
        if signature != hmac(&keys.server_key, auth_message.as_bytes()) {
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

        let mut client = ScramClient::with_password(Arc::new(PasswordKeys::new("s3cret")));
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

    /// Logs in with `password` to a "server" holding `stored`; whether the server took the
    /// proof and the client the server's signature.
    fn log_in(password: &Arc<PasswordKeys>, stored: &str) -> bool {
        let verifier = ScramVerifier::parse(stored).expect("verifier");
        let mut client = ScramClient::with_password(Arc::clone(password));
        let (exchange, first) = ScramExchange::start(verifier, client.message()).expect("start");
        client.update(first.as_bytes()).expect("update");
        match exchange.finish(client.message()) {
            Ok((last, _)) => client.finish(last.as_bytes()).is_ok(),
            Err(_) => false,
        }
    }

    fn derived(password: &PasswordKeys) -> Option<Arc<ScramKeys>> {
        lock(&password.derived).clone()
    }

    #[test]
    fn a_password_derives_its_keys_once_per_verifier() {
        let password = Arc::new(PasswordKeys::new("s3cret"));
        let stored = postgres_protocol::password::scram_sha_256(b"s3cret");
        assert!(log_in(&password, &stored));
        let first = derived(&password).expect("keys kept after a log-in");
        assert!(log_in(&password, &stored));
        let again = derived(&password).expect("keys");
        assert!(
            Arc::ptr_eq(&first, &again),
            "the same verifier reuses the keys"
        );

        // The same password under a new salt (set again on the server): new keys that work.
        let reset = postgres_protocol::password::scram_sha_256(b"s3cret");
        assert!(log_in(&password, &reset));
        let renewed = derived(&password).expect("keys");
        assert!(!Arc::ptr_eq(&first, &renewed));
        assert_ne!(first.salt_b64, renewed.salt_b64);

        // A wrong password is refused by the server, kept keys or not.
        let other = postgres_protocol::password::scram_sha_256(b"other");
        assert!(!log_in(&password, &other));
        assert!(!log_in(&password, &other));
    }

    #[test]
    fn a_password_is_saslprepped_as_postgresql_does() {
        // A soft hyphen maps to nothing under SASLprep; a lone control character makes
        // SASLprep fail, and the password is then used as it is.
        let stored = postgres_protocol::password::scram_sha_256("I\u{AD}X".as_bytes());
        assert!(log_in(&Arc::new(PasswordKeys::new("IX")), &stored));
        let raw = postgres_protocol::password::scram_sha_256("a\u{7}b".as_bytes());
        assert!(log_in(&Arc::new(PasswordKeys::new("a\u{7}b")), &raw));
        assert!(!log_in(&Arc::new(PasswordKeys::new("ab")), &raw));
    }
}
