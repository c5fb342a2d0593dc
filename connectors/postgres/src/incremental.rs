//! Incremental snapshots on PostgreSQL: reading a chunk and its watermarks, read-only.
//!
//! ```text
//!  chunk conn: BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY
//!              SELECT pg_current_snapshot() …   ── S: the read's snapshot, its in-progress xids,
//!                                                   those of them already committed in the clog
//!              COPY (SELECT … WHERE key > after [AND where] ORDER BY key LIMIT n) TO STDOUT
//!              SELECT pg_current_wal_insert_lsn() ── H: the high watermark
//!              COMMIT
//! ```
//!
//! A chunk is accepted only if no transaction in S's in-progress list is committed in the clog or
//! was emitted by the stream lately ([`RecentXids`]): such a transaction may already have reached
//! the stream (its commit record is written before it becomes visible), and the chunk would then
//! hold a key's state from before a change already delivered. Otherwise the chunk is read again a
//! moment later. Every transaction S sees has its commit record before H, so once the stream passes
//! H, nothing older than the chunk can follow it. See `tailgate_pipeline::incremental`.

use std::collections::VecDeque;
use std::sync::Arc;

use tailgate_core::Lsn;
use tailgate_pipeline::{Chunk, ChunkRequest, Rules};
use tokio_postgres::Client;

use crate::catalog;
use crate::error::PgError;
use crate::replication::{ConnInfo, SESSION_SETTINGS, quote_literal};
use crate::snapshot::{self, SnapTable};

/// Transactions the stream emitted lately, newest last: a chunk whose snapshot still counts one
/// of them as in progress is read again.
#[derive(Debug)]
pub(crate) struct RecentXids {
    xids: VecDeque<u32>,
}

/// How many emitted transactions [`RecentXids`] remembers. A transaction whose commit reached the
/// stream and which stays invisible to new snapshots while this many later ones commit (and which
/// the clog does not yet show committed) is the one case the check cannot see.
const RECENT_XIDS: usize = 16_384;

impl Default for RecentXids {
    fn default() -> Self {
        RecentXids { xids: VecDeque::with_capacity(RECENT_XIDS) }
    }
}

impl RecentXids {
    pub(crate) fn emitted(&mut self, xid: u32) {
        if self.xids.len() == RECENT_XIDS {
            self.xids.pop_front();
        }
        self.xids.push_back(xid);
    }

    fn contains(&self, xid: u32) -> bool {
        self.xids.contains(&xid)
    }
}

/// What reading a chunk gave.
pub(crate) enum ChunkRead {
    /// The rows and the high watermark.
    Rows { chunk: Chunk, high: Lsn },
    /// The read's snapshot could not be placed against the stream: read again shortly.
    Retry { xid: u32 },
    /// The snapshot cannot go on (the table is gone, the filter is not valid SQL).
    Failed(String),
}

/// The connection chunks are read on, and the tables' descriptions.
pub(crate) struct ChunkReader {
    client: Client,
    tables: Vec<(String, Arc<SnapTable>)>,
}

impl ChunkReader {
    pub(crate) async fn connect(info: &ConnInfo) -> Result<ChunkReader, PgError> {
        let client = catalog::connect(info).await?;
        let settings: String =
            SESSION_SETTINGS.iter().map(|(k, v)| format!("SET {k} = {};", quote_literal(v))).collect();
        client.batch_execute(&settings).await?;
        let version: i32 = client.query_one("SELECT current_setting('server_version_num')::int", &[]).await?.get(0);
        if version < 130_000 {
            return Err(PgError::Server {
                code: "0A000".into(),
                message: "incremental snapshots need PostgreSQL 13 or newer (pg_current_snapshot, pg_xact_status)"
                    .into(),
                during: "incremental snapshot",
            });
        }
        Ok(ChunkReader { client, tables: Vec::new() })
    }

    /// Describes `table` (`schema.table`) for chunk reads, or says why it cannot be snapshotted.
    pub(crate) async fn describe(
        &mut self,
        table: &str,
        rules: &Rules,
    ) -> Result<Result<Arc<SnapTable>, String>, PgError> {
        if let Some((_, known)) = self.tables.iter().find(|(name, _)| name == table) {
            return Ok(Ok(known.clone()));
        }
        let Some((schema, name)) = table.split_once('.') else {
            return Ok(Err(format!("{table:?}: name the table as schema.table")));
        };
        let row = self
            .client
            .query_opt(
                "SELECT c.oid, greatest(c.reltuples, 0)::bigint FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&schema, &name],
            )
            .await?;
        let Some(row) = row else { return Ok(Err(format!("table {table} does not exist"))) };
        if !rules.table_included(table) {
            return Ok(Err(format!(
                "table {table} is not captured: add it to [filter] include_tables (and reload) first, so that its changes stream"
            )));
        }
        let key_columns = rules.key_columns(table);
        let described =
            snapshot::describe_table(&self.client, row.get(0), schema.into(), name.into(), row.get(1), key_columns)
                .await?;
        if described.pk.is_empty() || key_columns.is_some_and(|k| k.len() != described.pk.len()) {
            return Ok(Err(format!(
                "table {table} has no primary key: name a unique key in [filter.key_columns] \"{table}\" = [\"col\", …] to snapshot it incrementally"
            )));
        }
        let described = Arc::new(described);
        self.tables.push((table.to_owned(), described.clone()));
        Ok(Ok(described))
    }

    /// The server's WAL page size.
    pub(crate) async fn block_size(&self) -> Result<u64, PgError> {
        let size: String = self.client.query_one("SHOW wal_block_size", &[]).await?.get(0);
        Ok(size.parse().unwrap_or(8192))
    }

    /// Whether `table` (`schema.table`) is in `publication`: only then do its changes stream.
    pub(crate) async fn in_publication(&self, table: &str, publication: &str) -> Result<bool, PgError> {
        let (schema, name) = table.split_once('.').unwrap_or(("", table));
        let row = self
            .client
            .query_opt(
                "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&publication, &schema, &name],
            )
            .await?;
        Ok(row.is_some())
    }

    /// Every user table, as `schema.table`.
    pub(crate) async fn user_tables(&self) -> Result<Vec<String>, PgError> {
        let rows = self
            .client
            .query(
                "SELECT n.nspname::text || '.' || c.relname::text FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
                 AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' \
                 ORDER BY 1",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Forgets table descriptions (after DDL or a reload, columns may have changed).
    pub(crate) fn forget(&mut self, table: &str) {
        self.tables.retain(|(name, _)| name != table);
    }

    /// Checks that `filter` is one valid predicate on `table`, without reading rows.
    pub(crate) async fn check_filter(&self, table: &SnapTable, filter: &str) -> Result<Result<(), String>, PgError> {
        if let Some(why) = tailgate_pipeline::incremental::filter_refused(filter, &["--", "/*"]) {
            return Ok(Err(why));
        }
        let query = format!("EXPLAIN SELECT 1 FROM {} WHERE ({filter})", table.sql_name);
        match self.client.simple_query(&query).await {
            Ok(_) => Ok(Ok(())),
            Err(e) if e.as_db_error().is_some() => Ok(Err(format!(
                "--where {filter:?} on {}: {}",
                table.qualified,
                e.as_db_error().map_or("", |d| d.message())
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads the chunk `request` asks for (see the module doc).
    pub(crate) async fn read(
        &mut self,
        request: &ChunkRequest,
        rules: &Rules,
        recent: &RecentXids,
    ) -> Result<ChunkRead, PgError> {
        let table = match self.describe(&request.table, rules).await? {
            Ok(table) => table,
            Err(why) => return Ok(ChunkRead::Failed(why)),
        };
        let client = &self.client;
        client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
        let result = read_in_transaction(client, &table, request, recent).await;
        // Read-only: ending it either way changes nothing.
        let end = client.batch_execute("ROLLBACK").await;
        let read = result?;
        end?;
        Ok(read)
    }
}

async fn read_in_transaction(
    client: &Client,
    table: &SnapTable,
    request: &ChunkRequest,
    recent: &RecentXids,
) -> Result<ChunkRead, PgError> {
    // The first statement fixes the transaction's snapshot S.
    let row = client
        .query_one(
            "SELECT ARRAY(SELECT x::text FROM pg_snapshot_xip(s) x), \
                    ARRAY(SELECT x::text FROM pg_snapshot_xip(s) x WHERE pg_xact_status(x) = 'committed') \
             FROM pg_current_snapshot() s",
            &[],
        )
        .await?;
    let in_progress: Vec<String> = row.get(0);
    let committed: Vec<String> = row.get(1);
    // xid8 carries the epoch in its upper half; the stream knows 32-bit xids.
    let xid32 = |text: &String| text.parse::<u64>().map(|x| x as u32).unwrap_or(0);
    if let Some(xid) = committed.iter().map(xid32).next() {
        return Ok(ChunkRead::Retry { xid });
    }
    if let Some(xid) = in_progress.iter().map(xid32).find(|x| recent.contains(*x)) {
        return Ok(ChunkRead::Retry { xid });
    }
    let order: Vec<String> =
        table.pk.iter().map(|&i| crate::replication::quote_ident(&table.schema.columns[i].name)).collect();
    let mut conditions = Vec::new();
    if let Some(after) = &request.after {
        conditions.push(snapshot::after_condition(table, after));
    }
    if let Some(filter) = &request.filter {
        conditions.push(format!("({filter})"));
    }
    let filter = if conditions.is_empty() { String::new() } else { format!(" WHERE {}", conditions.join(" AND ")) };
    let query = format!(
        "SELECT {} FROM {}{filter} ORDER BY {} LIMIT {}",
        table.select_list,
        table.sql_name,
        order.join(", "),
        request.limit
    );
    let (rows, last_key) = match snapshot::copy_rows(client, table, &query).await {
        Ok(read) => read,
        // The table was dropped or altered under us, the filter fails on a row: tell the operator.
        Err(PgError::Sql(e)) if e.as_db_error().is_some() && !crate::error::transient_sql(&e) => {
            return Ok(ChunkRead::Failed(format!(
                "reading {}: {}",
                table.qualified,
                e.as_db_error().map_or("", |d| d.message())
            )));
        }
        Err(e) => return Err(e),
    };
    let high: String = client.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await?.get(0);
    let high: Lsn = high.parse().map_err(|_| PgError::Server {
        code: "XX000".into(),
        message: format!("pg_current_wal_insert_lsn() returned {high:?}"),
        during: "incremental snapshot",
    })?;
    let key = table.pk.clone();
    Ok(ChunkRead::Rows { chunk: Chunk { schema: table.schema.clone(), key, rows, last_key }, high })
}

/// Whether the stream, having emitted everything before `emitted`, has passed `high`: a WAL insert
/// position just after a page header (the start of the next record) counts as reached once the
/// stream is at that page's start, since no record ends inside a header.
pub(crate) fn passed(emitted: Lsn, high: Lsn, block_size: u64) -> bool {
    if emitted >= high {
        return true;
    }
    let into_page = high.0 % block_size.max(1);
    // A long page header (at a segment start) is 40 bytes, a short one 24.
    into_page <= 40 && emitted.0 >= high.0 - into_page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_high_watermark_counts_as_passed_at_a_page_start() {
        assert!(passed(Lsn(100), Lsn(100), 8192));
        assert!(!passed(Lsn(99), Lsn(100), 8192));
        // H just after the header of the page at 8192: a stream at 8192 passed it.
        assert!(passed(Lsn(8192), Lsn(8192 + 24), 8192));
        assert!(!passed(Lsn(8191), Lsn(8192 + 24), 8192));
        assert!(!passed(Lsn(8192), Lsn(8192 + 100), 8192));
    }

    #[test]
    fn recent_xids_forget_the_oldest() {
        let mut recent = RecentXids::default();
        for xid in 0..(RECENT_XIDS as u32 + 5) {
            recent.emitted(xid);
        }
        assert!(!recent.contains(4));
        assert!(recent.contains(5));
        assert!(recent.contains(RECENT_XIDS as u32 + 4));
    }
}
