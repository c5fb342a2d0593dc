//! Log positions.
//!
//! Positions are typed, never strings: a checkpoint names exactly one engine's position, and the text
//! forms below are what the offsets file stores. They are frozen (see the tests): an upgrade must never
//! strand a user's checkpoint.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::gtid::GtidSet;
use crate::parse::ParsePositionError;

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
///
/// Deliberately not ordered: a snapshot's markers and the stream's positions are different kinds,
/// and a derived order between them once left acknowledged commits waiting forever. Progress is
/// ordered by the sequence in which the run handed commits over (`Checkpoint::seq`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Position {
    /// PostgreSQL: everything that committed before `lsn` (a commit's end LSN, or a keepalive's
    /// WAL end while nothing was in flight) has been delivered.
    Postgres {
        lsn: Lsn,
        /// Incremental snapshots in progress, as delivered up to here.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        incremental: Option<Arc<IncrementalProgress>>,
    },
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
    /// MySQL or MariaDB: everything up to `pos` in `file` (the end of a transaction) has been
    /// delivered; `gtids`, when the server has GTIDs, names the same transactions and is what a
    /// restart asks the server for (it survives a failover, where file names differ).
    Mysql {
        file: BinlogFile,
        pos: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gtids: Option<GtidSet>,
        /// Incremental snapshots in progress, as delivered up to here.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        incremental: Option<Arc<IncrementalProgress>>,
    },
    /// MySQL or MariaDB, during the initial snapshot: the tables in `done` and the rows of `table`
    /// up to the primary key `after` are delivered; streaming must start at `file`/`pos`/`gtids`
    /// (the snapshot's consistent point) once the snapshot is complete.
    MysqlSnapshot {
        file: BinlogFile,
        pos: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gtids: Option<GtidSet>,
        done: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        table: Option<String>,
        /// Primary-key values (text form) of the last row delivered from `table`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<Vec<Option<String>>>,
    },
}

/// Incremental snapshots (tables read in chunks while streaming goes on) and the table rules they
/// were decided under. It travels with every streamed checkpoint, so a restart resumes each
/// snapshot after the last chunk the sink acknowledged, and the checkpoint's table rules tell a
/// restart which tables its own rules newly include.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncrementalProgress {
    /// The id the next requested snapshot gets.
    #[serde(default)]
    pub next_id: u64,
    /// Requested and not finished, in the order they run: the first one not paused is read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<IncrementalSnapshot>,
    /// The table rules in force at this checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captured: Option<CapturedTables>,
}

/// One table's incremental snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncrementalSnapshot {
    pub id: u64,
    /// `schema.table` (MySQL: `database.table`).
    pub table: String,
    /// An SQL predicate limiting the rows read (`--where`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// Key values (text of SQL literals) of the last row delivered; `None`: from the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Vec<Option<String>>>,
    /// Rows delivered so far.
    #[serde(default)]
    pub rows: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

/// Table rules as patterns (`[filter] include_tables`, `exclude_tables`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapturedTables {
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Outbox tables (always captured).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbox: Vec<String>,
}

/// A binlog file name (`mysql-bin.000042`). Ordered by its numeric extension, so that
/// `mysql-bin.999999` comes before `mysql-bin.1000000` as it does on the server.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BinlogFile(pub String);

impl BinlogFile {
    /// The file's sequence number (its numeric extension), 0 when it has none.
    pub fn index(&self) -> u64 {
        self.0.rsplit_once('.').and_then(|(_, n)| n.parse().ok()).unwrap_or(0)
    }

    fn stem(&self) -> &str {
        self.0.rsplit_once('.').map_or(self.0.as_str(), |(stem, _)| stem)
    }
}

impl Ord for BinlogFile {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.stem(), self.index(), &self.0).cmp(&(other.stem(), other.index(), &other.0))
    }
}

impl PartialOrd for BinlogFile {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for BinlogFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Position {
    /// A PostgreSQL streaming position without incremental snapshots.
    pub fn postgres(lsn: Lsn) -> Position {
        Position::Postgres { lsn, incremental: None }
    }

    /// A MySQL/MariaDB streaming position without incremental snapshots.
    pub fn mysql(file: BinlogFile, pos: u64, gtids: Option<GtidSet>) -> Position {
        Position::Mysql { file, pos, gtids, incremental: None }
    }

    /// The incremental snapshots this checkpoint carries.
    pub fn incremental(&self) -> Option<&Arc<IncrementalProgress>> {
        match self {
            Position::Postgres { incremental, .. } | Position::Mysql { incremental, .. } => incremental.as_ref(),
            Position::PostgresSnapshot { .. } | Position::MysqlSnapshot { .. } => None,
        }
    }

    /// The position as one number, for metrics. PostgreSQL: the LSN; MySQL: the binlog file's
    /// sequence number in the upper 32 bits and the offset in the lower 32.
    pub fn as_number(&self) -> u64 {
        match self {
            Position::Postgres { lsn, .. } | Position::PostgresSnapshot { lsn, .. } => lsn.0,
            Position::Mysql { file, pos, .. } | Position::MysqlSnapshot { file, pos, .. } => {
                (file.index() << 32) | (pos & 0xFFFF_FFFF)
            }
        }
    }

    /// PostgreSQL: the log position this checkpoint guarantees (streaming resumes from it).
    pub fn lsn(&self) -> Option<Lsn> {
        match self {
            Position::Postgres { lsn, .. } | Position::PostgresSnapshot { lsn, .. } => Some(*lsn),
            Position::Mysql { .. } | Position::MysqlSnapshot { .. } => None,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Postgres { lsn, .. } => write!(f, "lsn {lsn}"),
            Position::PostgresSnapshot { lsn, done, table, .. } => {
                write!(f, "snapshot at lsn {lsn}: {} table(s) done", done.len())?;
                match table {
                    Some(t) => write!(f, ", {t} in progress"),
                    None => Ok(()),
                }
            }
            Position::Mysql { file, pos, gtids, .. } => {
                write!(f, "{file}:{pos}")?;
                match gtids {
                    Some(g) if !g.is_empty() => write!(f, " (gtids {g})"),
                    _ => Ok(()),
                }
            }
            Position::MysqlSnapshot { file, pos, done, table, .. } => {
                write!(f, "snapshot at {file}:{pos}: {} table(s) done", done.len())?;
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
        let p = Position::postgres(Lsn(0x1_0000_002A));
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

        let mysql = Position::mysql(
            BinlogFile("binlog.000003".into()),
            1234,
            Some("3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5".parse().unwrap()),
        );
        let json = serde_json::to_string(&mysql).unwrap();
        assert_eq!(
            json,
            r#"{"type":"mysql","file":"binlog.000003","pos":1234,"gtids":"3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5"}"#
        );
        assert_eq!(serde_json::from_str::<Position>(&json).unwrap(), mysql);
        let maria = r#"{"type":"mysql","file":"mysql-bin.000001","pos":4,"gtids":"0-1-100"}"#;
        assert!(matches!(
            serde_json::from_str::<Position>(maria).unwrap(),
            Position::Mysql { gtids: Some(crate::GtidSet::Mariadb(_)), .. }
        ));
        let snap = Position::MysqlSnapshot {
            file: BinlogFile("mysql-bin.000002".into()),
            pos: 328,
            gtids: Some("0-1-7".parse().unwrap()),
            done: vec!["shop.a".into()],
            table: Some("shop.b".into()),
            after: Some(vec![Some("41".into())]),
        };
        let json = serde_json::to_string(&snap).unwrap();
        assert_eq!(
            json,
            r#"{"type":"mysql_snapshot","file":"mysql-bin.000002","pos":328,"gtids":"0-1-7","done":["shop.a"],"table":"shop.b","after":["41"]}"#
        );
        assert_eq!(serde_json::from_str::<Position>(&json).unwrap(), snap);
        let with_incremental = Position::Postgres {
            lsn: Lsn(0x2A),
            incremental: Some(Arc::new(IncrementalProgress {
                next_id: 3,
                snapshots: vec![IncrementalSnapshot {
                    id: 2,
                    table: "public.orders".into(),
                    filter: Some("id > 5".into()),
                    after: Some(vec![Some("77".into())]),
                    rows: 70,
                    paused: false,
                }],
                captured: Some(CapturedTables { include: vec!["public\\..*".into()], exclude: vec![], outbox: vec![] }),
            })),
        };
        let json = serde_json::to_string(&with_incremental).unwrap();
        assert_eq!(
            json,
            r#"{"type":"postgres","lsn":"0/2A","incremental":{"next_id":3,"snapshots":[{"id":2,"table":"public.orders","filter":"id > 5","after":["77"],"rows":70}],"captured":{"include":["public\\..*"],"exclude":[]}}}"#
        );
        assert_eq!(serde_json::from_str::<Position>(&json).unwrap(), with_incremental);
        let plain = r#"{"type":"mysql","file":"mysql-bin.000001","pos":4}"#;
        assert!(matches!(serde_json::from_str::<Position>(plain).unwrap(), Position::Mysql { gtids: None, .. }));
    }

    #[test]
    fn binlog_files_order_by_sequence_number() {
        let f = |s: &str| BinlogFile(s.into());
        assert!(f("mysql-bin.999999") < f("mysql-bin.1000000"));
        assert!(f("mysql-bin.000002") > f("mysql-bin.000001"));
        assert_eq!(f("mysql-bin.000042").index(), 42);
        assert!((f("b.000001"), 900) < (f("b.000002"), 4));
        let at = |file: &str, pos| Position::mysql(f(file), pos, None);
        assert_eq!(at("b.000002", 4).as_number(), (2 << 32) | 4);
    }
}
