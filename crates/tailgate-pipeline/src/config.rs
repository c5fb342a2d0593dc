//! What every config section shares: errors that name the offending key and the fix.
//!
//! Sections belong to their owners (an engine's `[source]`, a sink's `[sink]`, the rules); each
//! validates its own values and reports with [`KeyError`], so that the operator always reads which
//! key is wrong and what to write instead.

/// A config value that cannot work, named by its key (`source.slot`, `sink.brokers`,
/// `outbox[0].payload`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct KeyError {
    pub key: String,
    pub message: String,
}

pub fn key_error(key: impl Into<String>, message: impl Into<String>) -> KeyError {
    KeyError { key: key.into(), message: message.into() }
}

impl crate::engine::Classify for KeyError {
    fn class(&self) -> crate::engine::ErrorClass {
        crate::engine::ErrorClass::Config
    }
}
