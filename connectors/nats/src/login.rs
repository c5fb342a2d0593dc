//! A NATS client that logs in once.
//!
//! async-nats reconnects by itself after a lost connection, and sends what was published meanwhile
//! (queued inside the client) as soon as it is back. For the publisher that breaks order: records that
//! were on the wire when the connection died are published again only after the reconnect, so the
//! queued later records would be stored ahead of them (an older version of a row after a newer one).
//!
//! So every client the publisher uses may log in exactly once: the credentials are handed over by an
//! auth callback that refuses every login after the first, and a small `max_reconnects` makes the
//! client's connection task end after those refusals (within a second), dropping its queue. The publisher then connects a fresh
//! client and publishes every unacknowledged record again, in order, before anything new.
//!
//! The auth callback replaces every credential async-nats would send by itself, so this module gives
//! them all: `sink.user`/`sink.password`, `sink.token`, `sink.credentials_file` (JWT and nkey seed;
//! the server's nonce signed with the seed; read again for each fresh client, so a renewed JWT is
//! used), or the user, password or token in `sink.url`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_nats::{Auth, AuthError, ConnectOptions, ServerAddr};
use nkeys::KeyPair;
use tailgate_pipeline::SinkError;

use crate::Settings;

/// Every credential a login of this sink sends.
#[derive(Clone, Default)]
pub(crate) struct Credentials {
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
    /// From a `.creds` file: the user JWT, and the seed that signs the server's nonce.
    jwt: Option<(String, Arc<KeyPair>)>,
}

impl Credentials {
    /// Reads the configured credentials (the `.creds` file now, so that a bad one fails at start).
    pub(crate) fn load(settings: &Settings) -> Result<Credentials, SinkError> {
        let auth = &settings.auth;
        if let (Some(user), Some(password)) = (&auth.user, &auth.password) {
            return Ok(Credentials {
                user: Some(user.clone()),
                password: Some(password.clone()),
                ..Default::default()
            });
        }
        if let Some(token) = &auth.token {
            return Ok(Credentials { token: Some(token.clone()), ..Default::default() });
        }
        if let Some(path) = &auth.credentials_file {
            let bad = |why: String| {
                SinkError::Config(format!(
                    "sink.credentials_file {}: {why}. Fix: point it at a readable .creds file (nsc generate creds)",
                    path.display()
                ))
            };
            let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
            let jwt = decorated_block(&text, "JWT").ok_or_else(|| bad("no user JWT in it".into()))?;
            let seed = decorated_block(&text, "SEED").ok_or_else(|| bad("no nkey seed in it".into()))?;
            let key = KeyPair::from_seed(seed).map_err(|e| bad(format!("the nkey seed is not valid: {e}")))?;
            return Ok(Credentials { jwt: Some((jwt.to_owned(), Arc::new(key))), ..Default::default() });
        }
        // The URL's user info (`nats://user:password@host`, or `nats://token@host`), percent-decoded,
        // from the first URL that has one. (async-nats itself sends none of it.)
        let from_url = settings.url.split(',').filter_map(|u| u.trim().parse::<ServerAddr>().ok()).find_map(|addr| {
            let user = percent_decode(addr.username()?);
            Some(match addr.password() {
                Some(password) => {
                    Credentials { user: Some(user), password: Some(percent_decode(password)), ..Default::default() }
                }
                None => Credentials { token: Some(user), ..Default::default() },
            })
        });
        Ok(from_url.unwrap_or_default())
    }

    fn auth(&self, nonce: &[u8]) -> Result<Auth, AuthError> {
        let mut auth = Auth::new();
        auth.username = self.user.clone();
        auth.password = self.password.clone();
        auth.token = self.token.clone();
        if let Some((jwt, key)) = &self.jwt {
            auth.jwt = Some(jwt.clone());
            auth.signature = Some(key.sign(nonce).map_err(|e| AuthError::new(format!("signing the nonce: {e}")))?);
        }
        Ok(auth)
    }
}

/// `%XX` escapes decoded (a URL's user info); text that does not decode to UTF-8 is kept as written.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%').then(|| text.get(i + 1..i + 3)).flatten();
        match escaped.and_then(|hex| u8::from_str_radix(hex, 16).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| text.to_owned())
}

/// The text between the `-----BEGIN ... <what>-----` line and the next `------END` line of a `.creds`
/// file (the format `nsc` writes), trimmed.
fn decorated_block<'a>(text: &'a str, what: &str) -> Option<&'a str> {
    let mut lines = text.lines().map(str::trim);
    lines.find(|l| l.starts_with("-----BEGIN") && l.trim_end_matches('-').ends_with(what))?;
    lines.take_while(|l| !l.starts_with("------END") && !l.starts_with("-----END")).find(|l| !l.is_empty())
}

/// Whether a client has logged in; after that, its auth callback refuses.
#[derive(Clone, Default)]
pub(crate) struct LoginOnce(Arc<AtomicBool>);

impl LoginOnce {
    /// Called once the client's first connection is up: every later login is refused.
    pub(crate) fn close(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Options (to build on) whose client logs in once with `credentials` (see the module docs).
pub(crate) fn login_once(credentials: Credentials, once: LoginOnce) -> ConnectOptions {
    ConnectOptions::with_auth_callback(move |nonce: Vec<u8>| {
        let result = if once.0.load(Ordering::Acquire) {
            Err(AuthError::new("this client has logged in once; the sink reconnects with a fresh client"))
        } else {
            credentials.auth(&nonce)
        };
        async move { result }
    })
    // The first connection may try up to this many servers of `sink.url`; after a lost connection
    // every attempt is refused (or finds no server), and then the client's task ends.
    .max_reconnects(8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(section: serde_json::Value) -> Settings {
        serde_json::from_value::<crate::NatsConfig>(section).unwrap().settings("t")
    }

    fn creds_file(jwt: &str, seed: &str) -> String {
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        )
    }

    #[test]
    fn a_creds_file_signs_the_nonce_with_its_seed_and_sends_its_jwt() {
        let key = KeyPair::new_user();
        let text = creds_file("eyJ0eXAi.e30.sig", &key.seed().unwrap());
        assert_eq!(decorated_block(&text, "JWT"), Some("eyJ0eXAi.e30.sig"));
        assert_eq!(decorated_block("no blocks here", "JWT"), None);
        let path = std::env::temp_dir().join(format!("tailgate-login-{}.creds", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let section = serde_json::json!({"url": "nats://127.0.0.1:4222", "credentials_file": path});
        let credentials = Credentials::load(&settings(section)).unwrap();
        std::fs::remove_file(&path).ok();
        let auth = credentials.auth(b"nonce-from-the-server").unwrap();
        assert_eq!(auth.jwt.as_deref(), Some("eyJ0eXAi.e30.sig"));
        key.verify(b"nonce-from-the-server", &auth.signature.unwrap()).expect("signed with the file's seed");
    }

    #[test]
    fn url_credentials_are_read_and_percent_decoded() {
        let with = |url: &str| Credentials::load(&settings(serde_json::json!({ "url": url }))).unwrap();
        let c = with("nats://alice:s3cret@127.0.0.1:4222");
        assert_eq!((c.user.as_deref(), c.password.as_deref()), (Some("alice"), Some("s3cret")));
        let c = with("nats://al%40ice:p%40ss%2Fw@127.0.0.1:4222");
        assert_eq!((c.user.as_deref(), c.password.as_deref()), (Some("al@ice"), Some("p@ss/w")));
        assert_eq!(with("nats://t0ken@127.0.0.1:4222").token.as_deref(), Some("t0ken"));
        assert!(with("nats://127.0.0.1:4222").auth(b"n").unwrap().username.is_none());
    }

    #[test]
    fn a_bad_creds_file_names_the_setting() {
        let section = serde_json::json!({"url": "nats://127.0.0.1:4222", "credentials_file": "/nonexistent/x.creds"});
        let e = Credentials::load(&settings(section)).err().unwrap().to_string();
        assert!(e.contains("sink.credentials_file") && e.contains("/nonexistent/x.creds"), "{e}");
    }
}
