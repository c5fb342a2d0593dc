//! MySQL and MariaDB source for tailgate: the row binlog into change events.
//!
//! - [`binlog`]: the event and row decoder (no I/O).
//! - [`schema`]: TABLE_MAP events into column names, keys and value decoders.
//! - [`replication`]: the replication connection (the client protocol over tokio).
//! - [`catalog`]: ordinary SQL (`mysql_async`): server facts, prerequisites, positions.
//! - [`snapshot`]: the initial snapshot (consistent point, keyset pages); [`incremental`]: chunks of
//!   incremental snapshots and their watermarks.
//! - [`stream`]: binlog events into change events and commits, without I/O; [`statement`]: what is
//!   read from statement text.
//! - [`source`]: the [`tailgate_pipeline::Source`] implementation (the I/O driver).
//! - [`check`]: the checks behind `tailgate check`.
//! - [`config`]: the `[source]` section; [`engine`]: the [`tailgate_pipeline::Engine`] the binary drives.

pub mod binlog;
pub mod catalog;
pub mod check;
pub mod config;
pub mod engine;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod ha;
pub mod incremental;
pub mod replication;
pub mod schema;
pub mod snapshot;
pub mod source;
pub mod statement;
pub mod stream;

pub use catalog::Flavor;
pub use config::MysqlConfig;
pub use engine::MysqlEngine;
pub use error::MyError;
pub use source::{MysqlSource, MysqlSourceConfig};
