//! PostgreSQL source for tailgate: logical replication (pgoutput) into change events.
//!
//! - [`replication`]: the replication connection (postgres-protocol over tokio).
//! - [`tls`]: `sslmode` and friends, for the replication connection and tokio-postgres alike.
//! - [`pgoutput`]: the pgoutput message decoder (no I/O).
//! - [`types`]: text and binary values to Debezium's representation.
//! - [`geometry`]: the geometric types among them.
//! - [`catalog`]: ordinary SQL: prerequisites, slots, publications.
//! - [`ha`]: the leadership lease and the shared offsets table.
//! - [`stream`]: pgoutput messages into change events and commits, without I/O.
//! - [`source`]: the [`tailgate_pipeline::Source`] implementation (the I/O driver).
//! - [`check`]: the checks behind `tailgate check`.
//! - [`config`]: the `[source]` section; [`engine`]: the [`tailgate_pipeline::Engine`] the binary drives.

pub mod catalog;
pub mod check;
pub mod config;
pub mod engine;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod geometry;
pub mod ha;
pub mod incremental;
pub mod pgoutput;
pub mod replication;
pub mod snapshot;
pub mod source;
pub mod stream;
pub mod tls;
pub mod types;

pub use config::PostgresConfig;
pub use engine::PostgresEngine;
pub use error::PgError;
pub use source::{PostgresSource, PostgresSourceConfig, SnapshotMode};
