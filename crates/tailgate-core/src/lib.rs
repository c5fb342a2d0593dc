//! tailgate's vocabulary, shared by every connector and sink. No I/O lives here.
//!
//! - [`position`]: typed log positions ([`Lsn`], [`BinlogFile`], [`Position`]) and their stable text forms.
//! - [`gtid`]: MySQL and MariaDB GTID sets; [`parse`]: the error of their text forms.
//! - [`value`]: column values already converted to Debezium's logical representation.
//! - [`event`]: the normalized [`ChangeEvent`] a source emits for each committed row change.
//! - [`envelope`]: rendering of keys and values as Debezium's JSON converter (schemas disabled) writes them.
//! - [`symbol`]: interned names that every event repeats (connector, database).
//! - [`temporal`]: calendar arithmetic and Debezium's ISO-8601 forms.

pub mod envelope;
pub mod event;
pub mod gtid;
pub mod parse;
pub mod position;
pub mod symbol;
pub mod temporal;
pub mod value;

pub use envelope::{BigIntUnsignedHandling, DecimalHandling, FormatOptions, ValueFormat};
pub use event::{
    ChangeEvent, ColumnSchema, Event, LogicalMessage, MysqlSourceBlock, Op, PgSourceBlock, SourceInfo, TableId,
    TableSchema,
};
pub use gtid::{GtidSet, MariadbGtidList, MysqlGtidSet, Uuid};
pub use parse::ParsePositionError;
pub use position::{BinlogFile, CapturedTables, IncrementalProgress, IncrementalSnapshot, Lsn, Position};
pub use symbol::Symbol;
pub use value::{Decimal, Row, Value};

/// The version written into `source.version` of every event.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
