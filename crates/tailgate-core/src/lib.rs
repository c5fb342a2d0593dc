//! tailgate's vocabulary, shared by every connector and sink. No I/O lives here.
//!
//! - [`position`]: typed log positions ([`Lsn`], [`Position`]) and their stable text forms.
//! - [`value`]: column values already converted to Debezium's logical representation.
//! - [`event`]: the normalized [`ChangeEvent`] a source emits for each committed row change.
//! - [`envelope`]: rendering of keys and values as Debezium's JSON converter (schemas disabled) writes them.

pub mod envelope;
pub mod event;
pub mod position;
pub mod value;

pub use envelope::{DecimalHandling, FormatOptions};
pub use event::{ChangeEvent, ColumnSchema, Event, LogicalMessage, Op, PgSource, SourceInfo, TableId, TableSchema};
pub use position::{Lsn, ParsePositionError, Position};
pub use value::{Decimal, Row, Value};

/// The version written into `source.version` of every event.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
