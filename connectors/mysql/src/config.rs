//! `[source]` with `type = "mysql"` (MySQL and MariaDB; the flavor is detected from the server):
//! every key with its default (docs/configuration.md).

use serde::Deserialize;
use tailgate_pipeline::{KeyError, key_error};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MysqlConfig {
    /// `mysql://user:password@host:3306/database`; a database limits capture to it, none captures
    /// every database but the server's own (mysql, sys, performance_schema, information_schema).
    pub url: String,
    /// This replica's id on the server: unique among the server and its replicas. Default: a number
    /// derived from the connector's name, stable across restarts.
    pub server_id: Option<u32>,
    /// As for PostgreSQL: `initial` (default) | `never` | `when_needed` | `initial_only`.
    #[serde(default = "default_snapshot")]
    pub snapshot: String,
    /// Rows per snapshot chunk. Default 10000.
    #[serde(default = "default_snapshot_fetch_rows")]
    pub snapshot_fetch_rows: usize,
    /// Tables read at the same time, each on its own connection with the same read view (opened
    /// without locks where the server allows; otherwise fewer readers). Default 1.
    #[serde(default = "one")]
    pub snapshot_parallel: usize,
    /// Events handed to the pipeline per batch, at most. Default 2048.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How often an idle server sends a heartbeat, in milliseconds; three missed heartbeats mean the
    /// connection is dead and tailgate reconnects. Default 5000.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_interval_ms: u64,
    /// Fill `source.query` with the statement behind each change (Debezium's `include.query`;
    /// MySQL also needs `binlog_rows_query_log_events = ON`). Default false.
    #[serde(default)]
    pub include_query: bool,
    /// Connection timeout in milliseconds. Default 10000.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
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
fn default_incremental_chunk_rows() -> usize {
    tailgate_pipeline::incremental::DEFAULT_CHUNK_ROWS
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
fn default_heartbeat_ms() -> u64 {
    5000
}
fn default_connect_timeout_ms() -> u64 {
    10_000
}

impl MysqlConfig {
    /// This replica's server id: configured, or derived from the connector's name (FNV-1a into
    /// 1,000,000..1,999,999,999, far from the small ids servers usually have).
    pub fn server_id(&self, connector: &str) -> u32 {
        self.server_id.unwrap_or_else(|| {
            let hash = connector.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
            1_000_000 + hash % 1_999_000_000
        })
    }

    /// The values the TOML shape cannot check; errors name the key.
    pub fn validate(&self) -> Result<(), KeyError> {
        if !self.url.starts_with("mysql://") && !self.url.starts_with("mariadb://") {
            return Err(key_error(
                "source.url",
                "must start with mysql:// (e.g. mysql://cdc:secret@127.0.0.1:3306/shop)",
            ));
        }
        if self.server_id == Some(0) {
            return Err(key_error("source.server_id", "must be at least 1 (0 means \"not a replica\" to MySQL)"));
        }
        if self.heartbeat_interval_ms < 100 {
            return Err(key_error("source.heartbeat_interval_ms", "must be at least 100"));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> MysqlConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn incremental_keys_default_and_are_validated() {
        let config = parse(r#"{"url": "mysql://cdc@127.0.0.1:3306/shop"}"#);
        assert_eq!(config.incremental_chunk_rows, 1024);
        assert!(config.snapshot_new_tables);
        assert!(config.validate().is_ok());
        for rows in [0, 1_000_001] {
            let config = parse(&format!(r#"{{"url": "mysql://x@h/db", "incremental_chunk_rows": {rows}}}"#));
            let err = config.validate().unwrap_err();
            assert_eq!(err.key, "source.incremental_chunk_rows", "{err:?}");
        }
        let config = parse(r#"{"url": "mysql://x@h/db", "snapshot_new_tables": false}"#);
        assert!(!config.snapshot_new_tables);
    }
}
