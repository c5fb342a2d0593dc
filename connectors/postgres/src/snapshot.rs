//! The initial snapshot: the rows that exist before streaming starts, read without locks.
//!
//! ```text
//!  CREATE_REPLICATION_SLOT … EXPORT_SNAPSHOT ──▶ consistent point C, snapshot S (replication conn idles)
//!  SQL conn: BEGIN REPEATABLE READ; SET TRANSACTION SNAPSHOT S
//!            per table: keyset pages ordered by primary key (a cursor for tables without one)
//!            ──▶ op "r" events ──▶ Item::Commit(PostgresSnapshot{C, done, table, after}) per page
//!  then START_REPLICATION from C: every row exactly once, no gap and no duplicate at the seam.
//! ```
//!
//! Progress is a checkpoint like any other: a page's marker is released only when Kafka acknowledged
//! the page. After a crash the exported snapshot is gone, so the remaining pages are read from a fresh
//! snapshot while streaming still starts at C: rows may then be delivered twice (the page read and the
//! replayed change), never lost, and the last event of each key still carries its latest state.
//!
//! Values are text in the same pinned session settings as the replication stream and go through the
//! same [`ColumnKind::convert`], so snapshot and streamed values agree by construction.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tailgate_core::{
    ChangeEvent, ColumnSchema, Lsn, Op, PgSource as PgSourceInfo, Position, SourceInfo, TableId, TableSchema, Value,
};
use tailgate_pipeline::{Batch, Metrics, SnapshotEmitter};
use tokio::sync::mpsc;
use tokio_postgres::{Client, SimpleQueryMessage};
use tracing::info;

use crate::catalog::{self, TablePredicate};
use crate::error::PgError;
use crate::replication::{ConnInfo, SESSION_SETTINGS, quote_ident, quote_literal};
use crate::types::ColumnKind;

/// Where a snapshot stands (from the offsets file after a restart).
#[derive(Debug, Clone, Default)]
pub struct SnapshotProgress {
    pub done: Vec<String>,
    pub table: Option<String>,
    pub after: Option<Vec<Option<String>>>,
}

pub struct SnapshotJob<'a> {
    pub info: &'a ConnInfo,
    pub publication: &'a str,
    pub tables: Option<&'a TablePredicate>,
    pub fetch_rows: usize,
    /// Cancelled on shutdown: the snapshot stops after the current page (its progress is kept).
    pub stop: &'a tokio_util::sync::CancellationToken,
    pub name: Arc<str>,
    pub db: Arc<str>,
    pub metrics: &'a Metrics,
}

struct SnapTable {
    qualified: String,
    sql_name: String,
    schema: Arc<TableSchema>,
    kinds: Vec<ColumnKind>,
    select_list: String,
    /// Positions of the primary-key columns in the row, in key order.
    pk: Vec<usize>,
    estimate: i64,
}

/// Reads every published (and included) table. `exported`: the snapshot of a slot just created;
/// `None`: a fresh snapshot (resuming after a crash, or a slot that already existed). Returns false
/// when the pipeline went away before the end.
pub async fn run(
    job: &SnapshotJob<'_>,
    exported: Option<&str>,
    consistent: Lsn,
    progress: SnapshotProgress,
    output: &mpsc::Sender<Batch>,
) -> Result<bool, PgError> {
    let client = catalog::connect(job.info).await?;
    let settings: String = SESSION_SETTINGS.iter().map(|(k, v)| format!("SET {k} = {};", quote_literal(v))).collect();
    client.batch_execute(&settings).await?;
    client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
    if let Some(name) = exported {
        client.batch_execute(&format!("SET TRANSACTION SNAPSHOT {}", quote_literal(name))).await?;
    }
    let xmin: i64 = client.query_one("SELECT txid_snapshot_xmin(txid_current_snapshot())", &[]).await?.get(0);
    let tables = list_tables(&client, job).await?;
    let remaining: i64 =
        tables.iter().filter(|t| !progress.done.contains(&t.qualified)).map(|t| t.estimate.max(0)).sum();
    job.metrics.snapshot_rows_remaining.store(remaining, Relaxed);
    info!(
        tables = tables.len(),
        estimated_rows = remaining,
        consistent_point = %consistent,
        exported = exported.is_some(),
        resumed = !progress.done.is_empty() || progress.table.is_some(),
        "snapshot started"
    );
    let source = SourceInfo::Postgres(PgSourceInfo {
        name: job.name.clone(),
        db: job.db.clone(),
        commit_ts_us: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0),
        txid: xmin as u32,
        lsn: consistent.0,
        last_commit_lsn: None,
        snapshot: "true",
    });
    let mut emitter = SnapshotEmitter::new(output, progress.done.is_empty() && progress.table.is_none());
    let mut done = progress.done.clone();
    let started = Instant::now();
    let mut total = 0u64;
    for table in &tables {
        if done.contains(&table.qualified) {
            continue;
        }
        job.metrics.snapshot_table_started(Some((&table.qualified, table.estimate.max(0))));
        let resume_after = match (&progress.table, &progress.after) {
            (Some(t), Some(after)) if *t == table.qualified && !table.pk.is_empty() => Some(after.clone()),
            _ => None,
        };
        let rows = read_table(&client, job, table, resume_after, &source, consistent, &done, &mut emitter).await?;
        let Some(rows) = rows else { return Ok(false) };
        total += rows;
        done.push(table.qualified.clone());
        emitter.marker(Position::PostgresSnapshot { lsn: consistent, done: done.clone(), table: None, after: None });
        info!(table = %table.qualified, rows, "snapshot of table done");
    }
    client.batch_execute("COMMIT").await?;
    job.metrics.snapshot_rows_remaining.store(0, Relaxed);
    job.metrics.snapshot_table_started(None);
    if !emitter.finish(Position::Postgres { lsn: consistent }).await {
        return Ok(false);
    }
    let secs = started.elapsed().as_secs_f64().max(0.001);
    info!(
        rows = total,
        seconds = format!("{secs:.1}"),
        rows_per_s = (total as f64 / secs) as u64,
        "snapshot completed"
    );
    Ok(true)
}

#[allow(clippy::too_many_arguments)]
async fn read_table(
    client: &Client,
    job: &SnapshotJob<'_>,
    table: &SnapTable,
    mut after: Option<Vec<Option<String>>>,
    source: &SourceInfo,
    consistent: Lsn,
    done: &[String],
    emitter: &mut SnapshotEmitter<'_>,
) -> Result<Option<u64>, PgError> {
    let mut rows_done = 0u64;
    let mut last_log = Instant::now();
    let started = Instant::now();
    let order: Vec<String> = table.pk.iter().map(|&i| quote_ident(&table.schema.columns[i].name)).collect();
    let keyset = !table.pk.is_empty();
    if !keyset {
        // No primary key: one cursor over the table (a resumed snapshot reads it again from the start).
        client
            .batch_execute(&format!(
                "DECLARE tailgate_snap NO SCROLL CURSOR FOR SELECT {} FROM {}",
                table.select_list, table.sql_name
            ))
            .await?;
    }
    loop {
        let sql = if keyset {
            let filter = match &after {
                Some(values) => format!(
                    " WHERE ({}) > ({})",
                    order.join(", "),
                    values
                        .iter()
                        .map(|v| v.as_deref().map_or("NULL".to_owned(), quote_literal))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None => String::new(),
            };
            format!(
                "SELECT {} FROM {}{filter} ORDER BY {} LIMIT {}",
                table.select_list,
                table.sql_name,
                order.join(", "),
                job.fetch_rows
            )
        } else {
            format!("FETCH FORWARD {} FROM tailgate_snap", job.fetch_rows)
        };
        let mut page = 0usize;
        let mut last_key = None;
        for message in client.simple_query(&sql).await? {
            let SimpleQueryMessage::Row(row) = message else { continue };
            let mut values = Vec::with_capacity(table.kinds.len());
            for (i, kind) in table.kinds.iter().enumerate() {
                values.push(match row.get(i) {
                    None => Value::Null,
                    Some(text) => kind.convert(text).ok_or_else(|| PgError::Value {
                        table: table.qualified.clone(),
                        column: table.schema.columns[i].name.clone(),
                        oid: 0,
                        value: text.to_owned(),
                    })?,
                });
            }
            if keyset {
                last_key = Some(table.pk.iter().map(|&i| row.get(i).map(str::to_owned)).collect::<Vec<_>>());
            }
            emitter.event(ChangeEvent {
                op: Op::Read,
                table: table.schema.clone(),
                before: None,
                after: Some(values),
                source: source.clone(),
            });
            page += 1;
        }
        rows_done += page as u64;
        job.metrics.snapshot_rows.fetch_add(page as u64, Relaxed);
        job.metrics.snapshot_rows_remaining.fetch_sub(page as i64, Relaxed);
        if keyset && last_key.is_some() {
            after = last_key;
            emitter.marker(Position::PostgresSnapshot {
                lsn: consistent,
                done: done.to_vec(),
                table: Some(table.qualified.clone()),
                after: after.clone(),
            });
        }
        if !emitter.flush().await || job.stop.is_cancelled() {
            return Ok(None);
        }
        if last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            let rate = rows_done as f64 / started.elapsed().as_secs_f64().max(0.001);
            let left = (table.estimate - rows_done as i64).max(0);
            info!(
                table = %table.qualified,
                rows = rows_done,
                estimated = table.estimate,
                rows_per_s = rate as u64,
                eta_s = (left as f64 / rate.max(1.0)) as u64,
                "snapshot progress"
            );
        }
        if page < job.fetch_rows {
            break;
        }
    }
    if !keyset {
        client.batch_execute("CLOSE tailgate_snap").await?;
    }
    Ok(Some(rows_done))
}

/// The tables the publication covers (and the rules include), with their columns as pgoutput
/// sends them: in attribute order, without dropped or generated columns.
async fn list_tables(client: &Client, job: &SnapshotJob<'_>) -> Result<Vec<SnapTable>, PgError> {
    let rows = client
        .query(
            "SELECT c.oid, p.schemaname::text, p.tablename::text, greatest(c.reltuples, 0)::bigint \
             FROM pg_publication_tables p \
             JOIN pg_namespace n ON n.nspname = p.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
             WHERE p.pubname = $1 ORDER BY 2, 3",
            &[&job.publication],
        )
        .await?;
    let mut tables = Vec::new();
    for row in rows {
        let (oid, schema, name, estimate): (u32, String, String, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let qualified = format!("{schema}.{name}");
        if job.tables.is_some_and(|accept| !accept(&qualified)) {
            continue;
        }
        let columns = client
            .query(
                "SELECT attname::text, atttypid, atttypmod FROM pg_attribute \
                 WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
                &[&oid],
            )
            .await?;
        let pk_names = catalog::primary_key(client, oid).await?;
        let names: Vec<String> = columns.iter().map(|c| c.get(0)).collect();
        let pk = pk_names.iter().filter_map(|k| names.iter().position(|n| n == k)).collect();
        let schema_arc = Arc::new(TableSchema {
            id: TableId { schema: schema.clone(), table: name.clone() },
            columns: names.iter().map(|n| ColumnSchema { name: n.clone(), key: pk_names.contains(n) }).collect(),
        });
        let kinds = columns.iter().map(|c| ColumnKind::of(c.get::<_, u32>(1), c.get::<_, i32>(2))).collect();
        // No casts: the simple protocol already returns each type's text output, as pgoutput does.
        let select_list = names.iter().map(|n| quote_ident(n)).collect::<Vec<_>>().join(", ");
        tables.push(SnapTable {
            sql_name: format!("{}.{}", quote_ident(&schema), quote_ident(&name)),
            qualified,
            schema: schema_arc,
            kinds,
            select_list,
            pk,
            estimate,
        });
    }
    Ok(tables)
}
