//! PostgreSQL, as the binary drives it: the source, its checks, the end of the WAL, whether the
//! connector runs (its slot is active), the slot's lag, the publication on reload, `slot drop`.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context as _;
use tailgate_core::{Lsn, Position};
use tailgate_pipeline::{CheckResult, Metrics, Rules};
use tailgate_postgres::check::CheckInput;
use tailgate_postgres::replication::ConnInfo;
use tailgate_postgres::{PgError, PostgresSource, PostgresSourceConfig, catalog};

use crate::config::{Config, PostgresConfig};

/// The table predicate for the publication: `None` when the rules select no tables (all captured).
fn table_predicate(rules: &Arc<Rules>) -> Option<catalog::TablePredicate> {
    if !rules.filters_tables() {
        return None;
    }
    let rules = rules.clone();
    Some(Arc::new(move |table: &str| rules.table_included(table)))
}

pub fn source(
    config: &Config,
    pg: &PostgresConfig,
    stop_at: Option<Lsn>,
    rules: &tokio::sync::watch::Receiver<Arc<Rules>>,
) -> Result<PostgresSource, PgError> {
    PostgresSource::new(PostgresSourceConfig {
        tables: tailgate_pipeline::TableRules::new(rules.clone()),
        name: config.name.clone(),
        url: pg.url.clone(),
        slot: config.slot_name(),
        publication: config.publication_name(),
        create_publication: pg.create_publication,
        batch_size: pg.batch_size,
        status_interval: Duration::from_millis(pg.status_interval_ms.max(100)),
        stop_at,
        snapshot: config.snapshot_mode().unwrap_or(tailgate_postgres::SnapshotMode::Initial),
        snapshot_fetch_rows: pg.snapshot_fetch_rows,
        snapshot_parallel: pg.snapshot_parallel,
    })
}

pub async fn check(config: &Config, pg: &PostgresConfig, checkpoint: Option<&Position>) -> Vec<CheckResult> {
    let slot = config.slot_name();
    let publication = config.publication_name();
    tailgate_postgres::check::run_checks(&CheckInput {
        url: &pg.url,
        slot: &slot,
        publication: &publication,
        create_publication: pg.create_publication,
        checkpoint: checkpoint.and_then(Position::lsn),
    })
    .await
}

/// The server's current WAL position (`offsets reset --to-end`).
pub async fn end_position(pg: &PostgresConfig) -> anyhow::Result<Position> {
    let info = ConnInfo::from_url(&pg.url)?;
    let client = catalog::connect(&info).await?;
    let text: String = client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
    Ok(Position::Postgres { lsn: text.parse()? })
}

/// Refuses when the connector runs: its slot is active.
pub async fn ensure_not_running(config: &Config, pg: &PostgresConfig) -> anyhow::Result<()> {
    let info = ConnInfo::from_url(&pg.url)?;
    let client = catalog::connect(&info).await.context("checking whether the connector runs")?;
    let slot = config.slot_name();
    if let Some(state) = catalog::slot_state(&client, &slot).await?
        && let Some(pid) = state.active_pid
    {
        anyhow::bail!("slot {slot} is in use by pid {pid}: stop the running connector first");
    }
    Ok(())
}

/// Measures, every `every`, how many WAL bytes the slot has not confirmed (`tailgate_source_lag_bytes`).
pub fn spawn_lag_poller(config: &Config, pg: &PostgresConfig, metrics: Arc<Metrics>, every: Duration) {
    let Ok(info) = ConnInfo::from_url(&pg.url) else { return };
    let slot = config.slot_name();
    tokio::spawn(async move {
        let mut client = None;
        loop {
            if client.is_none() {
                client = catalog::connect(&info).await.ok();
            }
            if let Some(c) = &client {
                match catalog::slot_lag_bytes(c, &slot).await {
                    Ok(Some(bytes)) => metrics.source_lag_bytes.store(bytes, Relaxed),
                    Ok(None) => metrics.source_lag_bytes.store(-1, Relaxed),
                    Err(_) => client = None,
                }
            }
            tokio::time::sleep(every).await;
        }
    });
}

/// After a reload: bring a publication tailgate manages in line with the new table rules.
pub async fn on_reload(running: &Config, pg: &PostgresConfig, rules: &Rules) -> anyhow::Result<()> {
    if !pg.create_publication {
        return Ok(());
    }
    let info = ConnInfo::from_url(&pg.url)?;
    let mut client = catalog::connect(&info).await?;
    let shared = Arc::new(rules.clone());
    let outcome =
        catalog::sync_publication(&mut client, &running.publication_name(), table_predicate(&shared).as_ref(), true)
            .await?;
    tracing::info!(publication = %running.publication_name(), ?outcome, "publication checked against the new rules");
    Ok(())
}

/// `slot drop`: the slot and the publication.
pub async fn drop_slot(config: &Config, pg: &PostgresConfig) -> anyhow::Result<()> {
    let slot = config.slot_name();
    let publication = config.publication_name();
    let info = ConnInfo::from_url(&pg.url)?;
    let client = catalog::connect(&info).await?;
    let dropped = client
        .execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await?;
    println!("{}", if dropped > 0 { format!("dropped slot {slot}") } else { format!("no slot {slot}") });
    let quoted = tailgate_postgres::replication::quote_ident(&publication);
    client.batch_execute(&format!("DROP PUBLICATION IF EXISTS {quoted}")).await?;
    println!("dropped publication {publication} (if it existed)");
    Ok(())
}

/// Exit code 3 for what the operator must fix on the server, 2 for the config.
pub fn exit_code(e: &PgError) -> Option<u8> {
    match e {
        PgError::WalLevel { .. }
        | PgError::NoReplicationPrivilege { .. }
        | PgError::SlotInUse { .. }
        | PgError::SlotDropped { .. }
        | PgError::SlotUnusable { .. }
        | PgError::NoFreeSlot { .. }
        | PgError::PublicationCreate { .. }
        | PgError::Auth { .. }
        | PgError::UnsupportedAuth { .. } => Some(crate::cli::EXIT_PREREQUISITE),
        PgError::Url { .. } => Some(crate::cli::EXIT_CONFIG),
        _ => None,
    }
}
