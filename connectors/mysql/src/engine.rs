//! MySQL and MariaDB as an [`Engine`]: the source, its checks, the end of the binlog, whether the
//! connector runs (a replica with its server id is connected), and the binlog lag.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use tailgate_core::{BinlogFile, Position};
use tailgate_pipeline::{
    BoxFuture, CheckResult, Classify, DynSource, Engine, EngineError, ErrorClass, KeyError, Lease, Metrics,
    OffsetStore, Rules, SourceParams,
};

use crate::catalog;
use crate::check::CheckInput;
use crate::config::MysqlConfig;
use crate::error::MyError;
use crate::replication::ConnInfo;
use crate::source::{MysqlSource, MysqlSourceConfig};

pub struct MysqlEngine {
    name: String,
    config: MysqlConfig,
    info: ConnInfo,
}

impl MysqlEngine {
    /// Validates the `[source]` section of connector `name`.
    pub fn new(name: &str, config: MysqlConfig) -> Result<Self, EngineError> {
        config.validate()?;
        let info = ConnInfo::from_url(&config.url)?;
        Ok(MysqlEngine { name: name.to_owned(), config, info })
    }

    fn server_id(&self) -> u32 {
        self.config.server_id(&self.name)
    }
}

impl Classify for MyError {
    fn class(&self) -> ErrorClass {
        if self.is_transient() {
            ErrorClass::Transient
        } else if self.is_prerequisite() {
            ErrorClass::Prerequisite
        } else if matches!(self, MyError::Url { .. }) {
            ErrorClass::Config
        } else {
            ErrorClass::Runtime
        }
    }
}

impl Engine for MysqlEngine {
    fn kind(&self) -> &'static str {
        "MySQL"
    }

    fn source(&self, params: SourceParams) -> Result<Box<dyn DynSource>, EngineError> {
        let stop_at = match params.stop_at.as_deref().map(|text| self.parse_position(text)).transpose()? {
            Some(Position::Mysql { file, pos, .. }) => Some((file, pos)),
            _ => None,
        };
        let source = MysqlSource::new(MysqlSourceConfig {
            name: params.name,
            url: self.config.url.clone(),
            server_id: self.server_id(),
            // The source filter follows the live rules (SIGHUP): a table included by a reload is
            // read from its next TABLE_MAP on.
            tables: Some(params.tables.live_predicate()),
            rules: params.tables,
            batch_size: self.config.batch_size,
            heartbeat: Duration::from_millis(self.config.heartbeat_interval_ms),
            include_query: self.config.include_query,
            stop_at,
            connect_timeout: Duration::from_millis(self.config.connect_timeout_ms),
            snapshot: params.snapshot,
            snapshot_fetch_rows: self.config.snapshot_fetch_rows,
            snapshot_parallel: self.config.snapshot_parallel,
            incremental: params.incremental,
            incremental_chunk_rows: self.config.incremental_chunk_rows,
            snapshot_new_tables: self.config.snapshot_new_tables,
        })?;
        Ok(Box::new(source))
    }

    fn check<'a>(&'a self, checkpoint: Option<&'a Position>) -> BoxFuture<'a, Vec<CheckResult>> {
        Box::pin(async move {
            crate::check::run_checks(&CheckInput { url: &self.config.url, server_id: self.server_id(), checkpoint })
                .await
        })
    }

    fn end_position(&self) -> BoxFuture<'_, Result<Position, EngineError>> {
        Box::pin(async move {
            let mut conn = catalog::connect(&self.info).await?;
            let facts = catalog::server_facts(&mut conn).await?;
            Ok(catalog::current_position(&mut conn, &facts).await?)
        })
    }

    /// `FILE:POS`, the end of a transaction (e.g. `mysql-bin.000003:4711`).
    fn parse_position(&self, text: &str) -> Result<Position, EngineError> {
        let (file, pos) = parse_binlog_position(text.trim()).ok_or_else(|| {
            EngineError::from(KeyError {
                key: "position".into(),
                message: format!("{text:?} is not FILE:POS, e.g. mysql-bin.000003:4711"),
            })
        })?;
        Ok(Position::mysql(BinlogFile(file.0), pos, None))
    }

    fn ensure_not_running(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            let mut conn = catalog::connect(&self.info).await?;
            if let Some(host) = crate::check::replica_using(&mut conn, self.server_id()).await {
                return Err(EngineError::new(
                    ErrorClass::Prerequisite,
                    format!(
                        "a replica with server_id {} is connected ({host}): stop the running connector first",
                        self.server_id()
                    ),
                ));
            }
            Ok(())
        })
    }

    fn spawn_lag_poller(&self, metrics: Arc<Metrics>, every: Duration) {
        let info = self.info.clone();
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

    /// Nothing on the server follows the rules: the source reads them live.
    fn on_reload<'a>(&'a self, _rules: &'a Rules) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn table_columns<'a>(&'a self, table: &'a str) -> BoxFuture<'a, Result<Option<Vec<String>>, EngineError>> {
        Box::pin(async move {
            let Some((schema, name)) = table.split_once('.') else { return Ok(None) };
            let mut conn = catalog::connect(&self.info).await?;
            let columns: Vec<String> = conn
                .exec(
                    "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? \
                     ORDER BY ORDINAL_POSITION",
                    (schema, name),
                )
                .await
                .map_err(MyError::from)?;
            let _ = conn.disconnect().await;
            Ok((!columns.is_empty()).then_some(columns))
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
        Box::pin(std::future::ready(Err(EngineError::new(
            ErrorClass::Config,
            "MySQL sources have no slot: the server keeps binlogs by binlog_expire_logs_seconds whatever tailgate \
             does. To start over, run `tailgate offsets reset`",
        ))))
    }
}

/// `file:pos` as given on the command line (`run --stop-at`).
pub fn parse_binlog_position(text: &str) -> Option<(BinlogFile, u64)> {
    let (file, pos) = text.rsplit_once(':')?;
    Some((BinlogFile(file.to_owned()), pos.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binlog_positions_parse() {
        assert_eq!(parse_binlog_position("binlog.000003:1234"), Some((BinlogFile("binlog.000003".into()), 1234)));
        assert_eq!(parse_binlog_position("nope"), None);
    }
}
