//! Log positions.
//!
//! Positions are typed, never strings: a checkpoint names exactly one engine's position, and the text
//! forms below are what the offsets file stores. They are frozen (see the tests): an upgrade must never
//! strand a user's checkpoint.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A PostgreSQL write-ahead-log position, shown as PostgreSQL shows it (`16/B374D848`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid log position {input:?}: {reason}")]
pub struct ParsePositionError {
    pub input: String,
    pub reason: &'static str,
}

impl FromStr for Lsn {
    type Err = ParsePositionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParsePositionError { input: s.to_owned(), reason };
        let (hi, lo) = s.split_once('/').ok_or_else(|| err("expected HI/LO in hexadecimal, e.g. 16/B374D848"))?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err("the part before '/' is not a 32-bit hex number"))?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err("the part after '/' is not a 32-bit hex number"))?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A resumable position in one source's log. Checkpoints hold the position *after* a fully
/// acknowledged transaction.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Position {
    /// PostgreSQL: everything that committed before `lsn` (a commit's end LSN, or a keepalive's
    /// WAL end while nothing was in flight) has been delivered.
    Postgres { lsn: Lsn },
    /// PostgreSQL, during the initial snapshot: the tables in `done` and the rows of `table` up to
    /// the primary key `after` are delivered; streaming must start at `lsn` (the slot's consistent
    /// point) once the snapshot is complete.
    PostgresSnapshot {
        lsn: Lsn,
        done: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        table: Option<String>,
        /// Primary-key values (text form) of the last row delivered from `table`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<Vec<Option<String>>>,
    },
}

impl Position {
    /// The position as one number, for metrics (PostgreSQL: the LSN).
    pub fn as_number(&self) -> u64 {
        match self {
            Position::Postgres { lsn } | Position::PostgresSnapshot { lsn, .. } => lsn.0,
        }
    }

    /// The log position this checkpoint guarantees: streaming resumes from it.
    pub fn lsn(&self) -> Lsn {
        match self {
            Position::Postgres { lsn } | Position::PostgresSnapshot { lsn, .. } => *lsn,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Postgres { lsn } => write!(f, "lsn {lsn}"),
            Position::PostgresSnapshot { lsn, done, table, .. } => {
                write!(f, "snapshot at lsn {lsn}: {} table(s) done", done.len())?;
                match table {
                    Some(t) => write!(f, ", {t} in progress"),
                    None => Ok(()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_postgres_text_form() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn::ZERO);
        assert!("16B374D848".parse::<Lsn>().is_err());
        assert!("x/1".parse::<Lsn>().is_err());
    }

    /// Frozen: the offsets file stores exactly this. Changing it strands users' checkpoints.
    #[test]
    fn position_json_is_frozen() {
        let p = Position::Postgres { lsn: Lsn(0x1_0000_002A) };
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, r#"{"type":"postgres","lsn":"1/2A"}"#);
        let back: Position = serde_json::from_str(r#"{"type":"postgres","lsn":"1/2A"}"#).unwrap();
        assert_eq!(back, p);

        let snap = Position::PostgresSnapshot {
            lsn: Lsn(0x2A),
            done: vec!["public.a".into()],
            table: Some("public.b".into()),
            after: Some(vec![Some("41".into()), None]),
        };
        let json = serde_json::to_string(&snap).unwrap();
        assert_eq!(
            json,
            r#"{"type":"postgres_snapshot","lsn":"0/2A","done":["public.a"],"table":"public.b","after":["41",null]}"#
        );
        assert_eq!(serde_json::from_str::<Position>(&json).unwrap(), snap);
    }
}
