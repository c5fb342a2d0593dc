//! The error of every position text form (LSNs, binlog positions, GTID sets): the input and why.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid log position {input:?}: {reason}")]
pub struct ParsePositionError {
    pub input: String,
    pub reason: &'static str,
}
