//! High availability on MySQL and MariaDB: the leadership lease and the shared offsets store, both
//! kept by the source server itself (no other coordinator).
//!
//! **The lease** is a named lock (`GET_LOCK('tailgate:<connector>', 0)`) held by a session of its
//! own whose `wait_timeout` is the lease: the holder pings it every third of that, so a holder that
//! is killed loses the lock at once (its connection closes) and one that is frozen loses it when the
//! server ends its idle session. The binlog dump is a second guard: a new leader registers with the
//! connector's server id, and the server drops the older dump connection.
//!
//! **The store** is a table (`connector`, `position`, `updated_at_ms`, `epoch`, `holder`); a new
//! leader raises the epoch and every save is conditional on it, as on PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use mysql_async::Conn;
use mysql_async::prelude::Queryable;
use tailgate_core::Position;
use tailgate_pipeline::{BoxFuture, Lease, OffsetStore, OffsetsError, StoredOffset};
use tokio::sync::{Mutex, watch};
use tracing::{debug, info, warn};

use crate::catalog;
use crate::error::MyError;
use crate::replication::ConnInfo;

fn lock_name(connector: &str) -> String {
    // Lock names are at most 64 characters.
    let mut name = format!("tailgate:{connector}");
    name.truncate(64);
    name
}

/// Waits until this instance holds the lease of `connector`; `lease` is how long a frozen holder
/// keeps it.
pub async fn acquire_lease(info: &ConnInfo, connector: &str, lease: Duration) -> Result<Box<dyn Lease>, MyError> {
    let lease = lease.max(Duration::from_secs(2));
    let mut waiting_logged = false;
    loop {
        match try_acquire(info, connector, lease).await {
            Ok(Some(held)) => return Ok(held),
            Ok(None) => {
                if !waiting_logged {
                    info!(connector, "standby: another instance holds the lease; waiting");
                    waiting_logged = true;
                }
            }
            Err(e) if e.is_transient() => debug!(error = %e, "lease: server unreachable; retrying"),
            Err(e) => return Err(e),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn try_acquire(info: &ConnInfo, connector: &str, lease: Duration) -> Result<Option<Box<dyn Lease>>, MyError> {
    let mut conn = catalog::connect(info).await?;
    // The server ends this session once it idles for the lease: a frozen holder lets go.
    let secs = lease.as_secs().max(1);
    conn.query_drop(format!("SET SESSION wait_timeout = {secs}, SESSION interactive_timeout = {secs}")).await?;
    let held: Option<i64> = conn.exec_first("SELECT GET_LOCK(?, 0)", (lock_name(connector),)).await?;
    if held != Some(1) {
        let _ = conn.disconnect().await;
        return Ok(None);
    }
    let (lost_tx, lost_rx) = watch::channel(None::<String>);
    let every = lease / 3;
    tokio::spawn(async move {
        let reason = loop {
            tokio::time::sleep(every).await;
            if lost_tx.is_closed() {
                // The lease was dropped: closing the session frees the lock.
                let _ = conn.disconnect().await;
                return;
            }
            if let Err(e) = conn.ping().await {
                break format!("the lease's session ended ({e})");
            }
        };
        let _ = lost_tx.send(Some(reason));
    });
    info!(connector, lease_s = secs, "leader: holding the lease");
    Ok(Some(Box::new(HeldLease { lost: lost_rx })))
}

struct HeldLease {
    lost: watch::Receiver<Option<String>>,
}

impl Lease for HeldLease {
    fn lost(&mut self) -> BoxFuture<'_, String> {
        Box::pin(async move {
            loop {
                if let Some(reason) = self.lost.borrow().clone() {
                    return reason;
                }
                if self.lost.changed().await.is_err() {
                    return "the lease's keep-alive ended".to_owned();
                }
            }
        })
    }
}

/// Offsets in a table of the source server, fenced by an epoch (see the module doc).
pub struct TableStore {
    info: ConnInfo,
    /// `database.table`, quoted for SQL.
    table_sql: String,
    table: String,
    connector: String,
    instance: String,
    conn: Mutex<Option<Conn>>,
    epoch: Mutex<Option<i64>>,
}

fn quote(ident: &str) -> String {
    format!("`{}`", ident.replace('`', "``"))
}

impl TableStore {
    /// `table` is `database.table`; both are created when missing.
    pub fn new(info: &ConnInfo, table: &str, connector: &str, instance: &str) -> Result<Arc<Self>, MyError> {
        let (db, name) = table
            .split_once('.')
            .ok_or_else(|| MyError::Url { detail: format!("offsets.table {table:?} must be database.table") })?;
        Ok(Arc::new(TableStore {
            info: info.clone(),
            table_sql: format!("{}.{}", quote(db), quote(name)),
            table: table.to_owned(),
            connector: connector.to_owned(),
            instance: instance.to_owned(),
            conn: Mutex::new(None),
            epoch: Mutex::new(None),
        }))
    }

    fn store_error(&self, e: impl std::fmt::Display) -> OffsetsError {
        OffsetsError::Store {
            store: self.describe(),
            message: format!("{e}. Fix: make sure the table is reachable and the user may create, read and write it"),
        }
    }

    /// A connection with the table in place, reconnecting (for up to 30 s) while the server is away.
    async fn conn(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Conn>>, OffsetsError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut guard = self.conn.lock().await;
            if guard.is_some() {
                return Ok(guard);
            }
            match catalog::connect(&self.info).await {
                Ok(mut conn) => {
                    let db = self.table.split_once('.').map_or("", |(d, _)| d);
                    conn.query_drop(format!(
                        "CREATE DATABASE IF NOT EXISTS {}; CREATE TABLE IF NOT EXISTS {} (connector VARCHAR(255) \
                         PRIMARY KEY, position TEXT, updated_at_ms BIGINT, epoch BIGINT NOT NULL DEFAULT 0, holder \
                         VARCHAR(255))",
                        quote(db),
                        self.table_sql
                    ))
                    .await
                    .map_err(|e| self.store_error(e))?;
                    *guard = Some(conn);
                    return Ok(guard);
                }
                Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                    drop(guard);
                    warn!(error = %e, "offsets store unreachable; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(self.store_error(e)),
            }
        }
    }

    /// Runs `f` on the connection; a lost connection is reopened and `f` tried again (30 s at most).
    async fn with_conn<T: Send>(
        &self,
        f: impl for<'c> Fn(&'c mut Conn) -> BoxFuture<'c, Result<T, mysql_async::Error>>,
    ) -> Result<T, OffsetsError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut guard = self.conn().await?;
            let Some(conn) = guard.as_mut() else { continue };
            match f(conn).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let transient = MyError::Sql(e).is_transient();
                    *guard = None;
                    drop(guard);
                    if !transient || tokio::time::Instant::now() >= deadline {
                        return Err(self.store_error("a query failed"));
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

impl OffsetStore for TableStore {
    fn describe(&self) -> String {
        format!("table {} on {}", self.table, self.info.addr())
    }

    fn load(&self) -> BoxFuture<'_, Result<Option<StoredOffset>, OffsetsError>> {
        Box::pin(async move {
            let sql = format!("SELECT position, updated_at_ms FROM {} WHERE connector = ?", self.table_sql);
            let connector = self.connector.clone();
            let row: Option<(Option<String>, Option<i64>)> = self
                .with_conn(|c| {
                    let (sql, connector) = (sql.clone(), connector.clone());
                    Box::pin(async move { c.exec_first(sql, (connector,)).await })
                })
                .await?;
            let Some((Some(text), updated)) = row else { return Ok(None) };
            let position: Position = serde_json::from_str(&text)
                .map_err(|e| OffsetsError::Corrupt { path: self.describe().into(), reason: e.to_string() })?;
            Ok(Some(StoredOffset { position, updated_at_ms: updated.unwrap_or(0) as u64 }))
        })
    }

    fn save<'a>(&'a self, position: &'a Position) -> BoxFuture<'a, Result<(), OffsetsError>> {
        Box::pin(async move {
            let Some(epoch) = *self.epoch.lock().await else {
                return Err(OffsetsError::Fenced {
                    connector: self.connector.clone(),
                    holder: "(not taken over)".into(),
                });
            };
            let text = serde_json::to_string(position).map_err(|e| self.store_error(e))?;
            let now = tailgate_pipeline::metrics::now_ms() as i64;
            let sql = format!(
                "UPDATE {} SET position = ?, updated_at_ms = ? WHERE connector = ? AND epoch = ?",
                self.table_sql
            );
            let connector = self.connector.clone();
            let updated = self
                .with_conn(|c| {
                    let (sql, text, connector) = (sql.clone(), text.clone(), connector.clone());
                    Box::pin(async move {
                        c.exec_drop(sql, (text, now, connector, epoch)).await?;
                        Ok(c.affected_rows())
                    })
                })
                .await?;
            // MySQL counts rows changed: an unchanged position (same bytes) is not a refusal.
            let sql = format!("SELECT epoch, holder FROM {} WHERE connector = ?", self.table_sql);
            if updated == 1 {
                return Ok(());
            }
            let row: Option<(i64, Option<String>)> = self
                .with_conn(|c| {
                    let (sql, connector) = (sql.clone(), connector.clone());
                    Box::pin(async move { c.exec_first(sql, (connector,)).await })
                })
                .await?;
            match row {
                Some((current, _)) if current == epoch => Ok(()),
                other => Err(OffsetsError::Fenced {
                    connector: self.connector.clone(),
                    holder: other.and_then(|(_, h)| h).unwrap_or_default(),
                }),
            }
        })
    }

    fn clear(&self) -> BoxFuture<'_, Result<bool, OffsetsError>> {
        Box::pin(async move {
            let sql =
                format!("UPDATE {} SET position = NULL WHERE connector = ? AND position IS NOT NULL", self.table_sql);
            let connector = self.connector.clone();
            let n = self
                .with_conn(|c| {
                    let (sql, connector) = (sql.clone(), connector.clone());
                    Box::pin(async move {
                        c.exec_drop(sql, (connector,)).await?;
                        Ok(c.affected_rows())
                    })
                })
                .await?;
            Ok(n > 0)
        })
    }

    fn take_over(&self) -> BoxFuture<'_, Result<(), OffsetsError>> {
        Box::pin(async move {
            let upsert = format!(
                "INSERT INTO {} (connector, epoch, holder) VALUES (?, 1, ?) ON DUPLICATE KEY UPDATE epoch = epoch + 1, \
                 holder = VALUES(holder)",
                self.table_sql
            );
            let select = format!("SELECT epoch FROM {} WHERE connector = ?", self.table_sql);
            let (connector, instance) = (self.connector.clone(), self.instance.clone());
            // One connection, one transaction: the epoch read is the one this upsert wrote.
            let epoch: Option<i64> = self
                .with_conn(|c| {
                    let (upsert, select, connector, instance) =
                        (upsert.clone(), select.clone(), connector.clone(), instance.clone());
                    Box::pin(async move {
                        let mut tx = c.start_transaction(mysql_async::TxOpts::default()).await?;
                        tx.exec_drop(upsert, (connector.clone(), instance)).await?;
                        let epoch = tx.exec_first(select, (connector,)).await?;
                        tx.commit().await?;
                        Ok(epoch)
                    })
                })
                .await?;
            let epoch = epoch.ok_or_else(|| self.store_error("the connector's row vanished"))?;
            info!(store = %self.describe(), epoch, "took over the connector's checkpoint");
            *self.epoch.lock().await = Some(epoch);
            Ok(())
        })
    }
}
