//! MySQL and MariaDB, as the binary drives them: the source, its checks, the end of the binlog,
//! whether the connector runs (a replica with its server id is connected), and the binlog lag.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context as _;
use tailgate_core::{BinlogFile, Position};
use tailgate_mysql::check::CheckInput;
use tailgate_mysql::replication::ConnInfo;
use tailgate_mysql::{MyError, MysqlSource, MysqlSourceConfig, catalog};
use tailgate_pipeline::{CheckResult, Metrics, Rules};
use tokio::sync::watch;

use crate::config::{Config, MysqlConfig};

/// The source filter follows the live rules (SIGHUP): a table included by a reload is read from its
/// next TABLE_MAP on, while the transform stage switches at the next transaction boundary.
fn table_predicate(rules: &watch::Receiver<Arc<Rules>>) -> Option<tailgate_pipeline::TablePredicate> {
    let rules = rules.clone();
    Some(Arc::new(move |table: &str| {
        let current = rules.borrow();
        !current.filters_tables() || current.table_included(table)
    }))
}

pub fn source(
    config: &Config,
    my: &MysqlConfig,
    stop_at: Option<(BinlogFile, u64)>,
    rules: &watch::Receiver<Arc<Rules>>,
) -> Result<MysqlSource, MyError> {
    MysqlSource::new(MysqlSourceConfig {
        name: config.name.clone(),
        url: my.url.clone(),
        server_id: config.server_id(),
        tables: table_predicate(rules),
        batch_size: my.batch_size,
        heartbeat: Duration::from_millis(my.heartbeat_interval_ms),
        include_query: my.include_query,
        stop_at,
        connect_timeout: Duration::from_millis(my.connect_timeout_ms),
        snapshot: config.snapshot_mode().unwrap_or(tailgate_pipeline::SnapshotMode::Initial),
        snapshot_fetch_rows: my.snapshot_fetch_rows,
        snapshot_parallel: my.snapshot_parallel,
    })
}

pub async fn check(config: &Config, my: &MysqlConfig, checkpoint: Option<&Position>) -> Vec<CheckResult> {
    tailgate_mysql::check::run_checks(&CheckInput { url: &my.url, server_id: config.server_id(), checkpoint }).await
}

/// The end of the binlog now (`offsets reset --to-end`).
pub async fn end_position(my: &MysqlConfig) -> anyhow::Result<Position> {
    let info = ConnInfo::from_url(&my.url)?;
    let mut conn = catalog::connect(&info).await?;
    let facts = catalog::server_facts(&mut conn).await?;
    Ok(catalog::current_position(&mut conn, &facts).await?)
}

/// Refuses when the connector runs: a replica with its server id is connected.
pub async fn ensure_not_running(config: &Config, my: &MysqlConfig) -> anyhow::Result<()> {
    let info = ConnInfo::from_url(&my.url)?;
    let mut conn = catalog::connect(&info).await.context("checking whether the connector runs")?;
    if let Some(host) = tailgate_mysql::check::replica_using(&mut conn, config.server_id()).await {
        anyhow::bail!(
            "a replica with server_id {} is connected ({host}): stop the running connector first",
            config.server_id()
        );
    }
    Ok(())
}

/// Measures, every `every`, how many binlog bytes lie past the checkpoint (`tailgate_source_lag_bytes`).
pub fn spawn_lag_poller(my: &MysqlConfig, metrics: Arc<Metrics>, every: Duration) {
    let Ok(info) = ConnInfo::from_url(&my.url) else { return };
    tokio::spawn(async move {
        let mut conn = None;
        loop {
            if conn.is_none() {
                conn = catalog::connect(&info).await.ok();
            }
            let checkpoint = metrics.checkpoint_position.load(Relaxed);
            if let (Some(c), true) = (&mut conn, checkpoint != 0) {
                match catalog::binlog_lag_bytes(c, checkpoint >> 32, checkpoint & 0xFFFF_FFFF).await {
                    Ok(Some(bytes)) => metrics.source_lag_bytes.store(bytes as i64, Relaxed),
                    Ok(None) => metrics.source_lag_bytes.store(-1, Relaxed),
                    Err(_) => conn = None,
                }
            }
            tokio::time::sleep(every).await;
        }
    });
}

/// Exit code 3 for what the operator must fix on the server, 2 for the config.
pub fn exit_code(e: &MyError) -> Option<u8> {
    if e.is_prerequisite() {
        Some(crate::cli::EXIT_PREREQUISITE)
    } else if matches!(e, MyError::Url { .. }) {
        Some(crate::cli::EXIT_CONFIG)
    } else {
        None
    }
}
