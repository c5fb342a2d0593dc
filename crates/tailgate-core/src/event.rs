//! The normalized change event.
//!
//! A source emits [`Event`]s in commit order. Each carries its table's schema (shared, so that a
//! schema change mid-stream applies from the next event on, never to events already emitted) and the
//! source metadata Debezium puts in `source`.

use std::fmt;
use std::sync::Arc;

use crate::symbol::Symbol;
use crate::value::Row;

/// Debezium's `op` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Create,
    Update,
    Delete,
    Truncate,
    /// A snapshot read (`r`).
    Read,
}

impl Op {
    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Truncate => "t",
            Op::Read => "r",
        }
    }

    pub fn from_code(code: &str) -> Option<Op> {
        Some(match code {
            "c" => Op::Create,
            "u" => Op::Update,
            "d" => Op::Delete,
            "t" => Op::Truncate,
            "r" => Op::Read,
            _ => return None,
        })
    }
}

/// `schema.table` (PostgreSQL) or `database.table` (MySQL).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableId {
    pub schema: String,
    pub table: String,
}

impl fmt::Display for TableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSchema {
    pub name: String,
    /// Part of the key (PostgreSQL: the replica identity, normally the primary key).
    pub key: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSchema {
    pub id: TableId,
    pub columns: Vec<ColumnSchema>,
}

impl TableSchema {
    pub fn has_key(&self) -> bool {
        self.columns.iter().any(|c| c.key)
    }
}

/// Where an event came from, as Debezium's `source` block describes it.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceInfo {
    Postgres(PgSourceBlock),
    Mysql(MysqlSourceBlock),
}

impl SourceInfo {
    /// Commit time of the event's transaction, microseconds since the Unix epoch.
    pub fn commit_ts_us(&self) -> i64 {
        match self {
            SourceInfo::Postgres(pg) => pg.commit_ts_us,
            SourceInfo::Mysql(my) => my.ts_us,
        }
    }

    /// Marks a snapshot read: `"true"`, `"first"`, `"last"` (or `"false"` for streamed changes).
    pub fn set_snapshot(&mut self, mark: &'static str) {
        match self {
            SourceInfo::Postgres(pg) => pg.snapshot = mark,
            SourceInfo::Mysql(my) => my.snapshot = mark,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PgSourceBlock {
    /// The connector's logical name (`name` in the config).
    pub name: Symbol,
    pub db: Symbol,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_ts_us: i64,
    pub txid: u32,
    /// LSN of the change itself.
    pub lsn: u64,
    /// End LSN of the previous transaction (Debezium's `sequence[0]`).
    pub last_commit_lsn: Option<u64>,
    /// `"true"`, `"first"`, `"last"` or `"false"`.
    pub snapshot: &'static str,
}

/// The `source` block of Debezium's MySQL and MariaDB connectors. The database and table come from
/// the event's [`TableId`].
#[derive(Debug, Clone, PartialEq)]
pub struct MysqlSourceBlock {
    /// `"mysql"` or `"mariadb"`, as Debezium's two connectors call themselves.
    pub connector: &'static str,
    /// The connector's logical name (`name` in the config).
    pub name: Symbol,
    /// When the change was committed, microseconds since the Unix epoch: MySQL's GTID event carries
    /// microseconds (`original_commit_timestamp`); otherwise the event header's seconds.
    pub ts_us: i64,
    /// `"true"`, `"first"`, `"last"` or `"false"`.
    pub snapshot: &'static str,
    /// The server that wrote the event.
    pub server_id: u32,
    /// The transaction's GTID (`uuid:n` on MySQL, `domain-server-seq` on MariaDB), when it has one.
    pub gtid: Option<Arc<str>>,
    pub file: Symbol,
    /// Where the event holding this row starts in `file`.
    pub pos: u64,
    /// The row's index within that event.
    pub row: u32,
    /// The client connection that made the change (from the transaction's BEGIN), when known.
    pub thread: Option<u32>,
    /// The statement, when `include_query` is on and the server logs it.
    pub query: Option<Arc<str>>,
    /// Where the transaction starts in `file` (the transaction id when there is no GTID).
    pub txn_pos: u64,
}

/// One row change.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    pub op: Op,
    pub table: Arc<TableSchema>,
    pub before: Option<Row>,
    pub after: Option<Row>,
    pub source: SourceInfo,
}

impl ChangeEvent {
    /// The row that identifies the event's key: `after` for creates and updates, `before` for deletes.
    pub fn key_row(&self) -> Option<&Row> {
        match self.op {
            Op::Delete => self.before.as_ref(),
            _ => self.after.as_ref().or(self.before.as_ref()),
        }
    }

    /// A lower bound of the bytes its envelope takes, computed without rendering it: a record far
    /// over the size limit (a 1 GB value) is recognised before the renderer allocates it.
    pub fn min_json_len(&self) -> usize {
        let row = |r: &Option<Row>| r.as_ref().map_or(0, |r| r.iter().map(crate::Value::min_json_len).sum());
        row(&self.before) + row(&self.after)
    }
}

/// A PostgreSQL logical decoding message (`pg_logical_emit_message`).
#[derive(Debug, Clone, PartialEq)]
pub struct LogicalMessage {
    pub transactional: bool,
    pub prefix: String,
    pub content: Vec<u8>,
    pub source: SourceInfo,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Change(ChangeEvent),
    Message(LogicalMessage),
}

impl Event {
    pub fn source(&self) -> &SourceInfo {
        match self {
            Event::Change(c) => &c.source,
            Event::Message(m) => &m.source,
        }
    }
}
