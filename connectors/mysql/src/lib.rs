//! MySQL and MariaDB source for tailgate: the row binlog into change events.
//!
//! - [`binlog`]: the event and row decoder (no I/O).
//! - [`schema`]: TABLE_MAP events into column names, keys and value decoders.
//! - [`replication`]: the replication connection (the client protocol over tokio).
//! - [`catalog`]: ordinary SQL (`mysql_async`): server facts, prerequisites, positions.
//! - [`snapshot`]: the initial snapshot (consistent point, keyset pages).
//! - [`source`]: the [`tailgate_pipeline::Source`] implementation.
//! - [`check`]: the checks behind `tailgate check`.

pub mod binlog;
pub mod catalog;
pub mod check;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod replication;
pub mod schema;
pub mod snapshot;
pub mod source;

pub use catalog::Flavor;
pub use error::MyError;
pub use source::{MysqlSource, MysqlSourceConfig};
