//! PostgreSQL as an [`Engine`]: the source, its checks, the end of the WAL, whether the connector
//! runs (its slot is active), the slot's lag, the publication on reload, and retiring the slot.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tailgate_core::{Lsn, Position};
use tailgate_pipeline::{
    BoxFuture, CheckResult, Classify, DynSource, Engine, EngineError, ErrorClass, KeyError, Lease, Metrics,
    OffsetStore, Rules, SourceParams,
};

use crate::catalog;
use crate::check::CheckInput;
use crate::config::PostgresConfig;
use crate::error::PgError;
use crate::replication::{ConnInfo, quote_ident};
use crate::source::{PostgresSource, PostgresSourceConfig};

pub struct PostgresEngine {
    name: String,
    config: PostgresConfig,
    info: ConnInfo,
}

impl PostgresEngine {
    /// Validates the `[source]` section of connector `name`.
    pub fn new(name: &str, config: PostgresConfig) -> Result<Self, EngineError> {
        config.validate(name)?;
        let info = ConnInfo::from_url(&config.url)?;
        Ok(PostgresEngine { name: name.to_owned(), config, info })
    }

    fn slot(&self) -> String {
        self.config.slot_name(&self.name)
    }

    fn publication(&self) -> String {
        self.config.publication_name(&self.name)
    }
}

impl Classify for PgError {
    fn class(&self) -> ErrorClass {
        match self {
            e if e.is_transient() => ErrorClass::Transient,
            PgError::WalLevel { .. }
            | PgError::NoReplicationPrivilege { .. }
            | PgError::SlotInUse { .. }
            | PgError::SlotDropped { .. }
            | PgError::SlotUnusable { .. }
            | PgError::NoFreeSlot { .. }
            | PgError::PublicationCreate { .. }
            | PgError::Auth { .. }
            | PgError::UnsupportedAuth { .. } => ErrorClass::Prerequisite,
            PgError::Url { .. } => ErrorClass::Config,
            _ => ErrorClass::Runtime,
        }
    }
}

/// The table predicate for the publication: `None` when the rules select no tables (all captured).
fn table_predicate(rules: &Arc<Rules>) -> Option<catalog::TablePredicate> {
    if !rules.filters_tables() {
        return None;
    }
    let rules = rules.clone();
    Some(Arc::new(move |table: &str| rules.table_included(table)))
}

impl Engine for PostgresEngine {
    fn kind(&self) -> &'static str {
        "PostgreSQL"
    }

    fn source(&self, params: SourceParams) -> Result<Box<dyn DynSource>, EngineError> {
        let stop_at = params.stop_at.as_deref().map(|text| self.parse_position(text)).transpose()?;
        let source = PostgresSource::new(PostgresSourceConfig {
            tables: params.tables,
            name: params.name,
            url: self.config.url.clone(),
            slot: self.slot(),
            publication: self.publication(),
            create_publication: self.config.create_publication,
            batch_size: self.config.batch_size,
            status_interval: Duration::from_millis(self.config.status_interval_ms.max(100)),
            stop_at: stop_at.as_ref().and_then(Position::lsn),
            snapshot: params.snapshot,
            snapshot_fetch_rows: self.config.snapshot_fetch_rows,
            snapshot_parallel: self.config.snapshot_parallel,
            wait_for_slot: params.taking_over,
            incremental: params.incremental,
            incremental_chunk_rows: self.config.incremental_chunk_rows,
            snapshot_new_tables: self.config.snapshot_new_tables,
        })?;
        Ok(Box::new(source))
    }

    fn check<'a>(&'a self, checkpoint: Option<&'a Position>) -> BoxFuture<'a, Vec<CheckResult>> {
        Box::pin(async move {
            let (slot, publication) = (self.slot(), self.publication());
            crate::check::run_checks(&CheckInput {
                url: &self.config.url,
                slot: &slot,
                publication: &publication,
                create_publication: self.config.create_publication,
                checkpoint: checkpoint.and_then(Position::lsn),
            })
            .await
        })
    }

    fn end_position(&self) -> BoxFuture<'_, Result<Position, EngineError>> {
        Box::pin(async move {
            let client = catalog::connect(&self.info).await?;
            let text: String =
                client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.map_err(PgError::from)?.get(0);
            Ok(Position::postgres(self.parse_lsn(&text)?))
        })
    }

    fn parse_position(&self, text: &str) -> Result<Position, EngineError> {
        Ok(Position::postgres(self.parse_lsn(text)?))
    }

    fn ensure_not_running(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            let client = catalog::connect(&self.info).await?;
            let slot = self.slot();
            if let Some(pid) = catalog::slot_state(&client, &slot).await?.and_then(|s| s.active_pid) {
                return Err(EngineError::new(
                    ErrorClass::Prerequisite,
                    format!("slot {slot} is in use by pid {pid}: stop the running connector first"),
                ));
            }
            Ok(())
        })
    }

    fn spawn_lag_poller(&self, metrics: Arc<Metrics>, every: Duration) {
        let (info, slot) = (self.info.clone(), self.slot());
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

    /// Brings a publication tailgate manages in line with the new table rules.
    fn on_reload<'a>(&'a self, rules: &'a Rules) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            if !self.config.create_publication {
                return Ok(());
            }
            let mut client = catalog::connect(&self.info).await?;
            let shared = Arc::new(rules.clone());
            let publication = self.publication();
            let outcome =
                catalog::sync_publication(&mut client, &publication, table_predicate(&shared).as_ref(), true).await?;
            tracing::info!(publication = %publication, ?outcome, "publication checked against the new rules");
            Ok(())
        })
    }

    fn table_columns<'a>(&'a self, table: &'a str) -> BoxFuture<'a, Result<Option<Vec<String>>, EngineError>> {
        Box::pin(async move {
            let Some((schema, name)) = table.split_once('.') else { return Ok(None) };
            let client = catalog::connect(&self.info).await?;
            let rows = client
                .query(
                    "SELECT column_name::text FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 \
                     ORDER BY ordinal_position",
                    &[&schema, &name],
                )
                .await
                .map_err(PgError::from)?;
            Ok((!rows.is_empty()).then(|| rows.iter().map(|r| r.get(0)).collect()))
        })
    }

    fn acquire_lease<'a>(
        &'a self,
        instance: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Box<dyn Lease>, EngineError>> {
        Box::pin(async move {
            let _ = instance;
            Ok(crate::ha::acquire_lease(&self.info, &self.name, lease).await?)
        })
    }

    fn shared_store(&self, table: &str, instance: &str) -> Result<Arc<dyn OffsetStore>, EngineError> {
        Ok(crate::ha::TableStore::new(&self.info, table, &self.name, instance)?)
    }

    fn retire(&self) -> BoxFuture<'_, Result<Vec<String>, EngineError>> {
        Box::pin(async move {
            let (slot, publication) = (self.slot(), self.publication());
            let client = catalog::connect(&self.info).await?;
            let dropped = client
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .map_err(PgError::from)?;
            let mut done = vec![if dropped > 0 { format!("dropped slot {slot}") } else { format!("no slot {slot}") }];
            client
                .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(&publication)))
                .await
                .map_err(PgError::from)?;
            done.push(format!("dropped publication {publication} (if it existed)"));
            Ok(done)
        })
    }
}

impl PostgresEngine {
    fn parse_lsn(&self, text: &str) -> Result<Lsn, EngineError> {
        text.trim().parse::<Lsn>().map_err(|e| {
            EngineError::from(KeyError { key: "position".into(), message: format!("{e} (a PostgreSQL LSN)") })
        })
    }
}
