//! High availability on PostgreSQL: the leadership lease and the shared offsets store, both kept by
//! the source database itself (no other coordinator).
//!
//! **The lease** is a session advisory lock (`pg_try_advisory_lock`) held by a connection of its own
//! whose `idle_session_timeout` is the lease: the holder runs a query every third of it, so a
//! holder that is killed loses the lock at once (its connection closes) and one that is frozen
//! (SIGSTOP, a long pause, a partition) loses it when the server ends its idle session. The slot is
//! a second guard: a new leader whose predecessor's walsender still holds it waits (the walsender
//! ends after `wal_sender_timeout` without status updates).
//!
//! **The store** is a table (`connector`, `position`, `updated_at_ms`, `epoch`, `holder`). A new
//! leader raises the connector's `epoch` ([`OffsetStore::take_over`]); every save is conditional on
//! the epoch it read, so a leader that was paused and woke up after a successor took over finds its
//! write refused (`Fenced`) and stops before it checkpoints anything.

use std::sync::Arc;
use std::time::Duration;

use tailgate_core::Position;
use tailgate_pipeline::{BoxFuture, Lease, OffsetStore, OffsetsError, StoredOffset};
use tokio::sync::{Mutex, watch};
use tokio_postgres::Client;
use tracing::{debug, info, warn};

use crate::catalog;
use crate::error::PgError;
use crate::replication::{ConnInfo, quote_ident};

/// The advisory lock key of a connector: stable across versions (PostgreSQL's own `hashtext`).
const LOCK_KEY_SQL: &str = "hashtext('tailgate:' || $1)::bigint";

/// Waits until this instance holds the lease of `connector`; `lease` is how long a frozen holder keeps
/// it. Returns the held lease; `lost()` resolves when it is gone.
pub async fn acquire_lease(info: &ConnInfo, connector: &str, lease: Duration) -> Result<Box<dyn Lease>, PgError> {
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

async fn try_acquire(info: &ConnInfo, connector: &str, lease: Duration) -> Result<Option<Box<dyn Lease>>, PgError> {
    let client = catalog::connect(info).await?;
    // The server ends this session once it idles for the lease: a frozen holder lets go.
    client.batch_execute(&format!("SET idle_session_timeout = '{}ms'", lease.as_millis())).await?;
    let held: bool =
        client.query_one(&format!("SELECT pg_try_advisory_lock({LOCK_KEY_SQL})"), &[&connector]).await?.get(0);
    if !held {
        return Ok(None);
    }
    let (lost_tx, lost_rx) = watch::channel(None::<String>);
    let every = lease / 3;
    tokio::spawn(async move {
        let reason = loop {
            tokio::time::sleep(every).await;
            // Resets the server's idle timer; fails once the session is gone.
            if let Err(e) = client.simple_query("SELECT 1").await {
                break format!("the lease's session ended ({e})");
            }
            if lost_tx.is_closed() {
                // The lease was dropped: dropping the client ends the session and frees the lock.
                return;
            }
        };
        let _ = lost_tx.send(Some(reason));
    });
    info!(connector, lease_ms = lease.as_millis() as u64, "leader: holding the lease");
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

/// Offsets in a table of the source database, fenced by an epoch (see the module doc).
pub struct TableStore {
    info: ConnInfo,
    /// `schema.table`, quoted for SQL.
    table_sql: String,
    table: String,
    connector: String,
    instance: String,
    client: Mutex<Option<Client>>,
    /// The epoch this instance took over with (`None`: not yet; saves then refuse).
    epoch: Mutex<Option<i64>>,
}

impl TableStore {
    /// `table` is `schema.table`; both are created when missing.
    pub fn new(info: &ConnInfo, table: &str, connector: &str, instance: &str) -> Result<Arc<Self>, PgError> {
        let (schema, name) = table
            .split_once('.')
            .ok_or_else(|| PgError::Url { detail: format!("offsets.table {table:?} must be schema.table") })?;
        Ok(Arc::new(TableStore {
            info: info.clone(),
            table_sql: format!("{}.{}", quote_ident(schema), quote_ident(name)),
            table: table.to_owned(),
            connector: connector.to_owned(),
            instance: instance.to_owned(),
            client: Mutex::new(None),
            epoch: Mutex::new(None),
        }))
    }

    fn store_error(&self, e: impl std::fmt::Display) -> OffsetsError {
        OffsetsError::Store {
            store: self.describe(),
            message: format!("{e}. Fix: make sure the table is reachable and the user may create, read and write it"),
        }
    }

    /// Runs `f` on a connection, reconnecting (and retrying for up to 30 s) while the server is away.
    async fn with_client<T>(
        &self,
        f: impl for<'c> Fn(&'c Client) -> BoxFuture<'c, Result<T, tokio_postgres::Error>>,
    ) -> Result<T, OffsetsError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut guard = self.client.lock().await;
            if guard.is_none() {
                match catalog::connect(&self.info).await {
                    Ok(client) => {
                        let schema = self.table.split_once('.').map_or("public", |(s, _)| s);
                        client
                            .batch_execute(&format!(
                                "CREATE SCHEMA IF NOT EXISTS {}; CREATE TABLE IF NOT EXISTS {} (connector text PRIMARY KEY, \
                                 position text, updated_at_ms bigint, epoch bigint NOT NULL DEFAULT 0, holder text)",
                                quote_ident(schema),
                                self.table_sql
                            ))
                            .await
                            .map_err(|e| self.store_error(e))?;
                        *guard = Some(client);
                    }
                    Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                        drop(guard);
                        warn!(error = %e, "offsets store unreachable; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                    Err(e) => return Err(self.store_error(e)),
                }
            }
            let Some(client) = guard.as_ref() else { continue };
            match f(client).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let transient = PgError::from(e).is_transient();
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
        format!("table {} in database {}", self.table, self.info.dbname)
    }

    fn load(&self) -> BoxFuture<'_, Result<Option<StoredOffset>, OffsetsError>> {
        Box::pin(async move {
            let connector = self.connector.clone();
            let sql = format!("SELECT position, updated_at_ms FROM {} WHERE connector = $1", self.table_sql);
            let row = self
                .with_client(|c| {
                    let (sql, connector) = (sql.clone(), connector.clone());
                    Box::pin(async move { c.query_opt(&sql, &[&connector]).await })
                })
                .await?;
            let Some(row) = row else { return Ok(None) };
            let Some(text) = row.get::<_, Option<String>>(0) else { return Ok(None) };
            let position: Position = serde_json::from_str(&text)
                .map_err(|e| OffsetsError::Corrupt { path: self.describe().into(), reason: e.to_string() })?;
            Ok(Some(StoredOffset { position, updated_at_ms: row.get::<_, Option<i64>>(1).unwrap_or(0) as u64 }))
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
                "UPDATE {} SET position = $1, updated_at_ms = $2 WHERE connector = $3 AND epoch = $4",
                self.table_sql
            );
            let connector = self.connector.clone();
            let updated = self
                .with_client(|c| {
                    let (sql, text, connector) = (sql.clone(), text.clone(), connector.clone());
                    Box::pin(async move { c.execute(&sql, &[&text, &now, &connector, &epoch]).await })
                })
                .await?;
            if updated == 1 {
                return Ok(());
            }
            let sql = format!("SELECT holder FROM {} WHERE connector = $1", self.table_sql);
            let holder: Option<String> = self
                .with_client(|c| {
                    let (sql, connector) = (sql.clone(), connector.clone());
                    Box::pin(async move { c.query_opt(&sql, &[&connector]).await })
                })
                .await?
                .and_then(|r| r.get(0));
            Err(OffsetsError::Fenced { connector: self.connector.clone(), holder: holder.unwrap_or_default() })
        })
    }

    fn clear(&self) -> BoxFuture<'_, Result<bool, OffsetsError>> {
        Box::pin(async move {
            let sql =
                format!("UPDATE {} SET position = NULL WHERE connector = $1 AND position IS NOT NULL", self.table_sql);
            let connector = self.connector.clone();
            let n = self
                .with_client(|c| {
                    let (sql, connector) = (sql.clone(), connector.clone());
                    Box::pin(async move { c.execute(&sql, &[&connector]).await })
                })
                .await?;
            Ok(n > 0)
        })
    }

    fn take_over(&self) -> BoxFuture<'_, Result<(), OffsetsError>> {
        Box::pin(async move {
            let sql = format!(
                "INSERT INTO {t} AS o (connector, epoch, holder) VALUES ($1, 1, $2) ON CONFLICT (connector) \
                 DO UPDATE SET epoch = o.epoch + 1, holder = EXCLUDED.holder RETURNING epoch",
                t = self.table_sql
            );
            let (connector, instance) = (self.connector.clone(), self.instance.clone());
            let epoch: i64 = self
                .with_client(|c| {
                    let (sql, connector, instance) = (sql.clone(), connector.clone(), instance.clone());
                    Box::pin(async move { c.query_one(&sql, &[&connector, &instance]).await })
                })
                .await?
                .get(0);
            info!(store = %self.describe(), epoch, "took over the connector's checkpoint");
            *self.epoch.lock().await = Some(epoch);
            Ok(())
        })
    }
}
