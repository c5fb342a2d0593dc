//! PostgreSQL source for tailgate: logical replication (pgoutput) into change events.
//!
//! - [`replication`]: the replication connection (postgres-protocol over tokio).
//! - [`pgoutput`]: the pgoutput message decoder (no I/O).
//! - [`types`]: text values to Debezium's representation.
//! - [`catalog`]: ordinary SQL: prerequisites, slots, publications.
//! - [`source`]: the [`tailgate_pipeline::Source`] implementation.
//! - [`check`]: the checks behind `tailgate check`.

pub mod catalog;
pub mod check;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod pgoutput;
pub mod replication;
pub mod snapshot;
pub mod source;
pub mod types;

pub use error::PgError;
pub use source::{PostgresSource, PostgresSourceConfig, SnapshotMode};
