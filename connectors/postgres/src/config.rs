//! `[source]` with `type = "postgres"`: every key with its default (docs/configuration.md).

use serde::Deserialize;
use tailgate_pipeline::{KeyError, key_error};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/database`
    pub url: String,
    /// Default `tailgate_<name>`; created when missing.
    pub slot: Option<String>,
    /// Default `tailgate_<name>`; created when missing (FOR ALL TABLES, or the tables the rules name).
    pub publication: Option<String>,
    /// Create the publication when it is missing and keep it in line with the table rules (needs
    /// the table owner's rights). Default true.
    #[serde(default = "yes")]
    pub create_publication: bool,
    /// `initial` (default): snapshot once, then stream | `never` | `when_needed` (again when the
    /// slot is gone) | `initial_only` (snapshot, then exit 0).
    #[serde(default = "default_snapshot")]
    pub snapshot: String,
    /// Rows per snapshot page. Default 10000.
    #[serde(default = "default_snapshot_fetch_rows")]
    pub snapshot_fetch_rows: usize,
    /// Tables read at the same time, each on its own connection sharing the exported snapshot.
    /// Default 1.
    #[serde(default = "one")]
    pub snapshot_parallel: usize,
    /// Events handed to the pipeline per batch, at most. Default 2048.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Standby status update interval in milliseconds. Default 1000.
    #[serde(default = "default_status_interval_ms")]
    pub status_interval_ms: u64,
    /// Rows per incremental snapshot chunk. Default 1024.
    #[serde(default = "default_incremental_chunk_rows")]
    pub incremental_chunk_rows: usize,
    /// Snapshot a table incrementally when a reload or restart newly includes it. Default true.
    #[serde(default = "yes")]
    pub snapshot_new_tables: bool,
}

fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn default_snapshot() -> String {
    "initial".into()
}
fn default_snapshot_fetch_rows() -> usize {
    10_000
}
fn default_batch_size() -> usize {
    2048
}
fn default_incremental_chunk_rows() -> usize {
    tailgate_pipeline::incremental::DEFAULT_CHUNK_ROWS
}
fn default_status_interval_ms() -> u64 {
    1000
}

impl PostgresConfig {
    /// The replication slot: `slot`, else `tailgate_<name>` (lower case, `-` and `.` as `_`).
    pub fn slot_name(&self, connector: &str) -> String {
        self.slot.clone().unwrap_or_else(|| default_name(connector))
    }

    /// The publication: `publication`, else `tailgate_<name>`.
    pub fn publication_name(&self, connector: &str) -> String {
        self.publication.clone().unwrap_or_else(|| default_name(connector))
    }

    /// The values the TOML shape cannot check; errors name the key.
    pub fn validate(&self, connector: &str) -> Result<(), KeyError> {
        for (key, value) in
            [("source.slot", self.slot_name(connector)), ("source.publication", self.publication_name(connector))]
        {
            if value.is_empty()
                || value.len() > 63
                || !value.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(key_error(
                    key,
                    format!(
                        "{value:?} is not a valid PostgreSQL slot/publication name: use at most 63 lower-case letters, digits and '_'"
                    ),
                ));
            }
        }
        if !self.url.starts_with("postgres://") && !self.url.starts_with("postgresql://") {
            return Err(key_error(
                "source.url",
                "must start with postgres:// (e.g. postgres://user:pass@127.0.0.1:5432/db)",
            ));
        }
        if self.snapshot_fetch_rows == 0 {
            return Err(key_error("source.snapshot_fetch_rows", "must be at least 1"));
        }
        if self.snapshot_parallel == 0 {
            return Err(key_error("source.snapshot_parallel", "must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(key_error("source.batch_size", "must be at least 1"));
        }
        if self.incremental_chunk_rows == 0 || self.incremental_chunk_rows > 1_000_000 {
            return Err(key_error("source.incremental_chunk_rows", "must be between 1 and 1000000"));
        }
        tailgate_pipeline::SnapshotMode::parse(&self.snapshot)?;
        Ok(())
    }
}

fn default_name(connector: &str) -> String {
    let cleaned: String =
        connector.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
    format!("tailgate_{cleaned}")
}
