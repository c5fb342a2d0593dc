//! The initial snapshot: the rows that exist before streaming starts, read without blocking writers.
//!
//! ```text
//!  SQL conn: START TRANSACTION WITH CONSISTENT SNAPSHOT ──▶ consistent point C (binlog file, pos, GTIDs)
//!            per table: one streamed SELECT ordered by primary key (unordered without a usable key)
//!            ──▶ op "r" events ──▶ Item::Commit(MysqlSnapshot{C, done, table, after}) per
//!                `snapshot_fetch_rows` rows (a resumed table starts after `after`)
//!  then the binlog from C (by GTID set when the server has GTIDs): every row exactly once.
//! ```
//!
//! How C is found, best first ([`PointMethod`]):
//! - **MariaDB**: `binlog_snapshot_file` / `binlog_snapshot_position` are, by the server's contract,
//!   the binlog position of the transaction's snapshot. Exact and lock-free.
//! - **MySQL with `gtid_mode = ON`**: the executed GTID set read just before the snapshot opens (G1)
//!   and just after (G2). MySQL adds a GTID to `gtid_executed` only after the transaction committed in
//!   the engine, so everything in G1 is in the snapshot, and streaming the GTIDs not in G1 never
//!   loses a change. When G1 = G2 nothing committed in between; otherwise (a busy server, after a few
//!   tries) a transaction committing in that instant may arrive twice: once read, once streamed.
//! - **MySQL without GTIDs**: `FLUSH TABLES WITH READ LOCK` for as long as opening the snapshot and
//!   reading the binlog position take (milliseconds), as Debezium's `minimal` locking does. The lock
//!   request gives up after 1 s (`lock_wait_timeout`) and is retried, so writers never wait longer.
//!
//! Progress is a checkpoint like any other: a page's marker is released only when Kafka acknowledged
//! the page. After a crash the snapshot transaction is gone, so the remaining pages are read from a
//! fresh snapshot while streaming still starts at C: rows changed meanwhile may be delivered twice (the
//! page read and the replayed change), never lost, and the last event of each key carries its latest
//! state.
//!
//! Values are read with the text protocol in a pinned session (`utf8mb4`, `time_zone = '+00:00'`)
//! and converted by the same [`ColumnCodec`] as binlog rows ([`rows::from_text`]), so snapshot and
//! streamed values agree (the type tests compare them). FLOAT columns are read as `col + 0e0`: the
//! text protocol rounds FLOAT to 6 digits, the double of it is exact.
//!
//! The snapshot transaction holds shared metadata locks on the tables it has read until it ends: an
//! `ALTER TABLE` on one of them waits for the snapshot (docs/operations.md says so).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Row};
use tailgate_core::{
    BinlogFile, ChangeEvent, ColumnSchema, GtidSet, MysqlGtidSet, MysqlSourceBlock as SourceBlock, Op, Position,
    SourceInfo, Symbol, TableId, TableSchema, Value,
};
use tailgate_pipeline::{
    AfterRow, Batch, Metrics, ParallelReaders, ReaderEnd, SnapshotEmitter, TablePages, TablePredicate,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::binlog::rows::{self, Charset, ColumnCodec, ColumnDecoder};
use crate::catalog::{self, Flavor, ServerFacts};
use crate::error::MyError;
use crate::replication::ConnInfo;
use crate::schema::{self, CatalogColumn};

/// Where a snapshot stands: its consistent point once known, and the tables (and rows) delivered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotState {
    /// Where streaming starts after the snapshot (`Position::Mysql`); `None` until it is opened.
    pub consistent: Option<Position>,
    pub done: Vec<String>,
    /// The table being read, and the primary key (stored text form) of the last row delivered.
    pub table: Option<String>,
    pub after: Option<Vec<Option<String>>>,
}

impl SnapshotState {
    /// The state an interrupted snapshot left in the offsets file.
    pub fn from_position(position: &Position) -> Option<SnapshotState> {
        let Position::MysqlSnapshot { file, pos, gtids, done, table, after } = position else { return None };
        Some(SnapshotState {
            consistent: Some(Position::mysql(file.clone(), *pos, gtids.clone())),
            done: done.clone(),
            table: table.clone(),
            after: after.clone(),
        })
    }

    fn started(&self) -> bool {
        !self.done.is_empty() || self.table.is_some()
    }

    /// Records `table` as read completely; returns the checkpoint that says so.
    fn table_done(&mut self, table: &str) -> Position {
        self.done.push(table.to_owned());
        if self.table.as_deref() == Some(table) {
            self.table = None;
            self.after = None;
        }
        self.marker()
    }

    /// The checkpoint that records this state.
    fn marker(&self) -> Position {
        let (file, pos, gtids) = match &self.consistent {
            Some(Position::Mysql { file, pos, gtids, .. }) => (file.clone(), *pos, gtids.clone()),
            _ => (BinlogFile(String::new()), 0, None),
        };
        Position::MysqlSnapshot {
            file,
            pos,
            gtids,
            done: self.done.clone(),
            table: self.table.clone(),
            after: self.after.clone(),
        }
    }
}

/// How the consistent point was found (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointMethod {
    MariadbSnapshotStatus,
    /// `exact`: no transaction committed between the two reads of the GTID set.
    MysqlGtids {
        exact: bool,
    },
    GlobalReadLock {
        held: Duration,
    },
    /// Resuming: a fresh snapshot, the consistent point of the interrupted one.
    Resumed,
}

pub struct SnapshotJob<'a> {
    pub info: &'a ConnInfo,
    pub facts: &'a ServerFacts,
    /// The URL's database: only its tables are read.
    pub database: Option<&'a str>,
    pub tables: Option<&'a TablePredicate>,
    pub fetch_rows: usize,
    /// Tables read at the same time, each on its own connection with the same read view.
    pub parallel: usize,
    /// Cancelled on shutdown: the snapshot stops after the current page (its progress is kept).
    pub stop: &'a CancellationToken,
    pub name: Symbol,
    pub metrics: &'a Metrics,
}

/// Reads every captured table, then sends the consistent point, where streaming starts. A state
/// without a consistent point opens a new one; otherwise the snapshot resumes after `state`'s
/// progress from a fresh read view. `state` follows every marker handed to the pipeline, so that
/// a retry after an error resumes exactly there. Returns false when stopped (or the pipeline went
/// away) before the end.
pub async fn run(
    job: &SnapshotJob<'_>,
    state: &mut SnapshotState,
    output: &mpsc::Sender<Batch>,
) -> Result<bool, MyError> {
    let mut conn = open_session(job.info).await?;
    let (consistent, method) = match &state.consistent {
        Some(point) => {
            conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY").await?;
            (point.clone(), PointMethod::Resumed)
        }
        None => {
            let (point, method) = open_consistent_snapshot(&mut conn, job.facts).await?;
            state.consistent = Some(point.clone());
            (point, method)
        }
    };
    let Position::Mysql { file, pos, .. } = &consistent else {
        return Err(MyError::Protocol(format!(
            "a snapshot's consistent point must be a binlog position, not {consistent}"
        )));
    };
    let tables = list_tables(&mut conn, job).await?;
    let pending: Vec<&SnapTable> = tables.iter().filter(|t| !state.done.contains(&t.qualified)).collect();
    let remaining: i64 = pending.iter().map(|t| t.estimate).sum();
    job.metrics.snapshot_rows_remaining.store(remaining, Relaxed);
    // More readers, each with exactly this read view, as far as they can be opened.
    let mut readers = vec![conn];
    for _ in 1..job.parallel.clamp(1, pending.len().max(1)) {
        match open_aligned_reader(job, &consistent, method).await? {
            Some(reader) => readers.push(reader),
            None => break,
        }
    }
    info!(
        tables = tables.len(),
        estimated_rows = remaining,
        consistent_point = %consistent,
        method = ?method,
        resumed = state.started(),
        readers = readers.len(),
        "snapshot started"
    );
    if method == (PointMethod::MysqlGtids { exact: false }) {
        warn!(
            "transactions kept committing while the snapshot opened: one committing at that instant may be delivered \
             twice (read by the snapshot and streamed); none is lost"
        );
    }
    let source = SourceBlock {
        connector: job.facts.flavor.connector(),
        name: job.name,
        ts_us: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64),
        snapshot: "true",
        server_id: 0,
        gtid: None,
        file: file.0.as_str().into(),
        pos: *pos,
        row: 0,
        thread: None,
        query: None,
        txn_pos: *pos,
    };
    let first = !state.started();
    let started = Instant::now();
    let (mut emitter, total) = if readers.len() == 1 {
        let conn = &mut readers[0];
        let mut emitter = SnapshotEmitter::new(output, first);
        let mut total = 0u64;
        for table in pending {
            job.metrics.snapshot_table_started(Some((&table.qualified, table.estimate)));
            let after = resume_point(state, table);
            match read_table(conn, job, table, after, Some(&mut *state), &source, &mut emitter).await {
                Ok(Some(rows)) => {
                    total += rows;
                    emitter.marker(state.table_done(&table.qualified));
                    info!(table = %table.qualified, rows, "snapshot of table done");
                }
                Ok(None) => {
                    emitter.release().await;
                    return Ok(false);
                }
                Err(e) => {
                    // The pipeline gets exactly what the last marker (and so `state`) covers: the
                    // retry reads on from there.
                    emitter.abandon().await;
                    return Err(e);
                }
            }
        }
        (emitter, total)
    } else {
        let shared = ParallelReaders::new(pending, readers.len(), std::mem::take(state));
        let runs = readers.iter_mut().enumerate().map(|(r, conn)| {
            let emitter = SnapshotEmitter::new(output, first && r == 0);
            read_tables(conn, job, &shared, &source, emitter)
        });
        let ended = futures_util::future::try_join_all(runs).await;
        let rows = shared.rows();
        // A retry goes on from the tables whose events were all sent.
        *state = shared.into_progress();
        let mut last = None;
        for end in ended? {
            match end {
                ReaderEnd::Last(emitter) => last = Some(emitter),
                ReaderEnd::Done => {}
                ReaderEnd::Stopped => return Ok(false),
            }
        }
        let Some(emitter) = last else {
            return Err(MyError::Protocol("parallel snapshot: no reader ended the last table (a bug)".into()));
        };
        (emitter, rows)
    };
    // Every row is read, and the last one is still held for the end to mark it `last`: nothing may
    // fail between here and `finish` (a retry would start streaming without that row). The read
    // views were read-only, so ending them can fail harmlessly: the server drops them with the
    // connection.
    for mut conn in readers {
        if let Err(e) = conn.query_drop("COMMIT").await {
            debug!(error = %e, "ending a snapshot read view failed (harmless: it was read-only)");
        }
        let _ = conn.disconnect().await;
    }
    job.metrics.snapshot_rows_remaining.store(0, Relaxed);
    job.metrics.snapshot_table_started(None);
    if !emitter.finish(consistent).await {
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

/// A connection for reading rows: text values in one character set and UTC, as `rows::from_text`
/// expects; long network timeouts, so that a pipeline waiting on a slow sink does not make the server
/// drop it halfway through a result.
pub(crate) async fn open_session(info: &ConnInfo) -> Result<Conn, MyError> {
    let mut conn = catalog::connect(info).await?;
    conn.query_drop(
        "SET NAMES utf8mb4, time_zone = '+00:00', SESSION net_write_timeout = 3600, SESSION net_read_timeout = 3600",
    )
    .await?;
    conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ").await?;
    Ok(conn)
}

/// Another reader whose snapshot sees exactly what the first one sees, or `None` when that cannot be
/// had without a lock (the snapshot then goes on with the readers it has):
/// - MariaDB: its `binlog_snapshot_file/position` equals the consistent point;
/// - MySQL with GTIDs: `gtid_executed` did not move while it opened and equals the consistent point's;
/// - a resumed snapshot reads from fresh views anyway (at least once): any reader will do;
/// - behind a global read lock, or after an inexact GTID point: none.
async fn open_aligned_reader(
    job: &SnapshotJob<'_>,
    consistent: &Position,
    method: PointMethod,
) -> Result<Option<Conn>, MyError> {
    const START: &str = "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY";
    let Position::Mysql { file, pos, gtids, .. } = consistent else { return Ok(None) };
    let mut conn = match method {
        PointMethod::Resumed | PointMethod::MariadbSnapshotStatus | PointMethod::MysqlGtids { exact: true } => {
            open_session(job.info).await?
        }
        PointMethod::MysqlGtids { exact: false } | PointMethod::GlobalReadLock { .. } => return Ok(None),
    };
    for _ in 0..20 {
        let aligned = match method {
            PointMethod::MariadbSnapshotStatus => {
                conn.query_drop(START).await?;
                let status: Vec<(String, String)> = conn.query("SHOW STATUS LIKE 'binlog_snapshot_%'").await?;
                let get =
                    |name: &str| status.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone());
                get("binlog_snapshot_file").as_deref() == Some(file.0.as_str())
                    && get("binlog_snapshot_position") == Some(pos.to_string())
            }
            PointMethod::MysqlGtids { .. } => {
                let read = |v: Option<String>| v.unwrap_or_default().parse::<MysqlGtidSet>().ok();
                let before = read(conn.query_first("SELECT @@GLOBAL.gtid_executed").await?);
                conn.query_drop(START).await?;
                let after = read(conn.query_first("SELECT @@GLOBAL.gtid_executed").await?);
                matches!(gtids, Some(GtidSet::Mysql(point)) if before.as_ref() == Some(point) && after.as_ref() == Some(point))
            }
            _ => {
                conn.query_drop(START).await?;
                true
            }
        };
        if aligned {
            return Ok(Some(conn));
        }
        conn.query_drop("ROLLBACK").await?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    info!("writes kept moving the binlog while more snapshot readers opened: reading with fewer");
    let _ = conn.disconnect().await;
    Ok(None)
}

/// Where a table's read starts: after the key stored for it by an interrupted snapshot.
fn resume_point(state: &SnapshotState, table: &SnapTable) -> Option<Vec<Option<String>>> {
    match (&state.table, &state.after) {
        (Some(t), Some(after)) if *t == table.qualified && !table.keyset.is_empty() => Some(after.clone()),
        _ => None,
    }
}

/// One parallel reader: takes whole tables until none is left ([`ParallelReaders`] states the
/// contract). Tables in progress have no markers of their own: after a crash they are read again
/// from their start (duplicates, never a gap).
async fn read_tables<'a>(
    conn: &mut Conn,
    job: &SnapshotJob<'_>,
    shared: &ParallelReaders<&SnapTable, SnapshotState>,
    source: &SourceBlock,
    mut emitter: SnapshotEmitter<'a>,
) -> Result<ReaderEnd<'a>, MyError> {
    loop {
        let Some(table) = shared.take() else { return Ok(ReaderEnd::released(emitter).await) };
        job.metrics.snapshot_table_started(Some((&table.qualified, table.estimate)));
        let after = shared.with_progress(|state| resume_point(state, table));
        let Some(rows) = read_table(conn, job, table, after, None, source, &mut emitter).await? else {
            return Ok(ReaderEnd::Stopped);
        };
        info!(table = %table.qualified, rows, "snapshot of table done");
        emitter = match shared.after_table(emitter, rows, |state| state.table_done(&table.qualified)).await {
            Ok(emitter) => emitter,
            Err(end) => return Ok(end),
        };
    }
}

/// Opens the snapshot transaction on `conn` and finds the binlog position that matches it.
pub async fn open_consistent_snapshot(
    conn: &mut Conn,
    facts: &ServerFacts,
) -> Result<(Position, PointMethod), MyError> {
    const START: &str = "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY";
    match facts.flavor {
        Flavor::Mariadb => {
            conn.query_drop(START).await?;
            let status: Vec<(String, String)> = conn.query("SHOW STATUS LIKE 'binlog_snapshot_%'").await?;
            let get = |name: &str| status.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone());
            if let (Some(file), Some(pos)) = (get("binlog_snapshot_file"), get("binlog_snapshot_position"))
                && !file.is_empty()
            {
                let pos: u64 =
                    pos.parse().map_err(|_| MyError::Protocol(format!("binlog_snapshot_position {pos:?}")))?;
                let gtids = catalog::mariadb_gtid_pos(conn, &file, pos).await?;
                let point = Position::mysql(BinlogFile(file), pos, Some(GtidSet::Mariadb(gtids)));
                return Ok((point, PointMethod::MariadbSnapshotStatus));
            }
            conn.query_drop("ROLLBACK").await?;
            global_read_lock(conn, facts).await
        }
        Flavor::Mysql if facts.gtid_mode => {
            let mut last = None;
            // A busy server commits between the two reads now and then: retry for up to ~0.5 s.
            for _ in 0..40 {
                let before = catalog::current_position(conn, facts).await?;
                conn.query_drop(START).await?;
                let after: String = conn.query_first("SELECT @@GLOBAL.gtid_executed").await?.unwrap_or_default();
                let after: MysqlGtidSet =
                    after.parse().map_err(|e| MyError::Protocol(format!("server's gtid_executed: {e}")))?;
                if matches!(&before, Position::Mysql { gtids: Some(GtidSet::Mysql(set)), .. } if *set == after) {
                    return Ok((before, PointMethod::MysqlGtids { exact: true }));
                }
                last = Some(before);
                conn.query_drop("ROLLBACK").await?;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // Still safe (see the module docs), with a possible duplicate at the seam.
            let before = match last {
                Some(before) => before,
                None => catalog::current_position(conn, facts).await?,
            };
            conn.query_drop(START).await?;
            Ok((before, PointMethod::MysqlGtids { exact: false }))
        }
        Flavor::Mysql => global_read_lock(conn, facts).await,
    }
}

/// The fallback: a global read lock for as long as opening the snapshot and reading the position take.
async fn global_read_lock(conn: &mut Conn, facts: &ServerFacts) -> Result<(Position, PointMethod), MyError> {
    // A lock request queues behind running statements and blocks writers while it waits: give up
    // after a second and try again.
    conn.query_drop("SET SESSION lock_wait_timeout = 1").await?;
    let mut attempt = 0;
    let locked_at = loop {
        attempt += 1;
        match conn.query_drop("FLUSH TABLES WITH READ LOCK").await {
            Ok(()) => break Instant::now(),
            Err(mysql_async::Error::Server(s)) if s.code == 1205 && attempt < 30 => {
                warn!(
                    attempt,
                    "the global read lock for the snapshot's start waited 1 s for running statements; retrying"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(mysql_async::Error::Server(s)) if matches!(s.code, 1227 | 1045 | 1044) => {
                return Err(MyError::Privilege { user: facts.user.clone(), privilege: "RELOAD" });
            }
            Err(e) => return Err(e.into()),
        }
    };
    let opened = async {
        conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY").await?;
        catalog::current_position(conn, facts).await
    }
    .await;
    conn.query_drop("UNLOCK TABLES").await?;
    let held = locked_at.elapsed();
    conn.query_drop("SET SESSION lock_wait_timeout = DEFAULT").await?;
    info!(held_ms = held.as_millis() as u64, "global read lock released (the server has no GTIDs or snapshot status)");
    Ok((opened?, PointMethod::GlobalReadLock { held }))
}

/// How a primary-key value is stored in the offsets file and written back into SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyForm {
    /// Integers and decimals: the digits, as they are.
    Number,
    /// Dates and times: the text in single quotes.
    Temporal,
    /// Character strings: the text, written back as `_utf8mb4 X'…'`.
    Text,
    /// Binary strings: hexadecimal, written back as `X'…'`.
    Binary,
}

impl KeyForm {
    /// `None`: a type keyset pages cannot resume on (ENUM sorts by index, FLOAT is inexact, ...).
    pub(crate) fn of(codec: &ColumnCodec) -> Option<KeyForm> {
        use ColumnCodec::*;
        Some(match codec {
            Int { .. } | Decimal { .. } | Year => KeyForm::Number,
            Date | Time { .. } | TimeOld | Datetime { .. } | DatetimeOld | Timestamp { .. } | TimestampOld => {
                KeyForm::Temporal
            }
            Str { charset: Charset::Binary, .. } => KeyForm::Binary,
            Str { .. } => KeyForm::Text,
            _ => return None,
        })
    }

    /// The stored form of a value as the text protocol returned it.
    pub(crate) fn store(self, raw: &[u8]) -> String {
        match self {
            KeyForm::Binary => hex(raw),
            _ => String::from_utf8_lossy(raw).into_owned(),
        }
    }

    /// The stored form as an SQL literal; `None` when it is not what this form stores (a damaged
    /// offsets file must not become SQL).
    fn literal(self, stored: &str) -> Option<String> {
        match self {
            KeyForm::Number => {
                let ok = !stored.is_empty() && stored.bytes().all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b));
                ok.then(|| stored.to_owned())
            }
            KeyForm::Temporal => {
                let ok = stored.bytes().all(|b| b.is_ascii_digit() || b"-:. ".contains(&b));
                ok.then(|| format!("'{stored}'"))
            }
            KeyForm::Text => Some(format!("_utf8mb4 X'{}'", hex(stored.as_bytes()))),
            KeyForm::Binary => {
                let ok = stored.len().is_multiple_of(2) && stored.bytes().all(|b| b.is_ascii_hexdigit());
                ok.then(|| format!("X'{stored}'"))
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

pub(crate) fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// A table as the snapshots read it: its columns as the binlog path would name and decode them.
pub(crate) struct SnapTable {
    /// `database.table`.
    pub(crate) qualified: String,
    pub(crate) sql_name: String,
    pub(crate) schema: Arc<TableSchema>,
    pub(crate) columns: Vec<CatalogColumn>,
    pub(crate) codecs: Vec<ColumnDecoder>,
    pub(crate) select_list: String,
    /// Positions of the key columns asked for (the primary key unless named), in key order; some
    /// may be missing from the table (then fewer than asked).
    pub(crate) key: Vec<usize>,
    /// The key columns with how each is written back into SQL; empty when the table is read in one
    /// scan (no key, or one pages cannot use).
    pub(crate) keyset: Vec<(usize, KeyForm)>,
    pub(crate) estimate: i64,
}

/// The captured base tables with their columns, as the binlog path would name and decode them.
async fn list_tables(conn: &mut Conn, job: &SnapshotJob<'_>) -> Result<Vec<SnapTable>, MyError> {
    let system = catalog::SYSTEM_DATABASES.map(|d| format!("'{d}'")).join(", ");
    let rows: Vec<(String, String, Option<u64>)> = conn
        .query(format!(
            "SELECT TABLE_SCHEMA, TABLE_NAME, TABLE_ROWS FROM information_schema.TABLES \
             WHERE TABLE_TYPE = 'BASE TABLE' AND TABLE_SCHEMA NOT IN ({system}) ORDER BY TABLE_SCHEMA, TABLE_NAME"
        ))
        .await?;
    let mut tables = Vec::new();
    for (db, name, estimate) in rows {
        if job.database.is_some_and(|d| d != db) {
            continue;
        }
        let qualified = format!("{db}.{name}");
        if job.tables.is_some_and(|accept| !accept(&qualified)) {
            continue;
        }
        let estimate = estimate.unwrap_or(0).min(i64::MAX as u64) as i64;
        // None: dropped meanwhile.
        if let Some(table) = describe_table(conn, db, name, estimate, None).await? {
            if !table.key.is_empty() && table.keyset.is_empty() {
                info!(table = %table.qualified, "primary key of a type pages cannot resume on: the table is read in one scan");
            }
            tables.push(table);
        }
    }
    Ok(tables)
}

/// Describes `db`.`name` for reading: its columns and decoders, and the key it is paged by (`key`:
/// these columns, else the primary key). `None` when the table does not exist.
pub(crate) async fn describe_table(
    conn: &mut Conn,
    db: String,
    name: String,
    estimate: i64,
    key: Option<&[String]>,
) -> Result<Option<SnapTable>, MyError> {
    let qualified = format!("{db}.{name}");
    let columns = catalog::table_columns(conn, &db, &name).await?;
    if columns.is_empty() {
        return Ok(None);
    }
    let codecs = schema::codecs_from_catalog(&qualified, &columns)?;
    let pk_names = catalog::primary_key(conn, &db, &name).await?;
    let key_names = key.unwrap_or(&pk_names);
    let key: Vec<usize> = key_names.iter().filter_map(|k| columns.iter().position(|c| &c.name == k)).collect();
    let forms: Option<Vec<(usize, KeyForm)>> =
        key.iter().map(|&i| KeyForm::of(&codecs[i].codec).map(|f| (i, f))).collect();
    let keyset = forms.filter(|f| f.len() == key_names.len()).unwrap_or_default();
    let select_list = columns
        .iter()
        .zip(&codecs)
        .map(|(c, codec)| match codec.codec {
            ColumnCodec::Float => format!("{} + 0e0", quote_ident(&c.name)),
            _ => quote_ident(&c.name),
        })
        .collect::<Vec<_>>()
        .join(", ");
    Ok(Some(SnapTable {
        sql_name: format!("{}.{}", quote_ident(&db), quote_ident(&name)),
        schema: Arc::new(TableSchema {
            id: TableId { schema: db, table: name },
            columns: columns
                .iter()
                .map(|c| ColumnSchema { name: c.name.clone(), key: pk_names.contains(&c.name) })
                .collect(),
        }),
        qualified,
        columns,
        codecs,
        select_list,
        key,
        keyset,
        estimate,
    }))
}

/// `WHERE` for the rows after `after` in key order (see [`after_condition`]).
fn after_filter(table: &SnapTable, after: &[Option<String>]) -> Option<String> {
    after_condition(table, after).map(|c| format!(" WHERE {c}"))
}

/// The rows after `after` in key order: `(a > x) OR (a = x AND b > y) ...`, a form both servers'
/// range optimizers use (row constructors are not optimized everywhere). `None` when `after` is
/// not a key of the table as stored (a damaged offsets file must not become SQL).
pub(crate) fn after_condition(table: &SnapTable, after: &[Option<String>]) -> Option<String> {
    if after.len() != table.keyset.len() {
        return None;
    }
    let mut literals = Vec::with_capacity(after.len());
    for ((_, form), stored) in table.keyset.iter().zip(after) {
        literals.push(form.literal(stored.as_deref()?)?);
    }
    let names: Vec<String> = table.keyset.iter().map(|&(i, _)| quote_ident(&table.schema.columns[i].name)).collect();
    let terms: Vec<String> = (0..names.len())
        .map(|k| {
            let mut parts: Vec<String> = (0..k).map(|j| format!("{} = {}", names[j], literals[j])).collect();
            parts.push(format!("{} > {}", names[k], literals[k]));
            format!("({})", parts.join(" AND "))
        })
        .collect();
    Some(terms.join(" OR "))
}

/// Reads one table with one streamed query (ordered by primary key when the key orders the same in
/// SQL and here): the server produces rows while they are converted, and the socket applies
/// backpressure when the pipeline is full. Every `fetch_rows` rows the last key read becomes a
/// progress marker, where a resumed snapshot starts. `Ok(None)` when stopped (or the pipeline went
/// away) before the end.
async fn read_table(
    conn: &mut Conn,
    job: &SnapshotJob<'_>,
    table: &SnapTable,
    after: Option<Vec<Option<String>>>,
    mut progress: Option<&mut SnapshotState>,
    source: &SourceBlock,
    emitter: &mut SnapshotEmitter<'_>,
) -> Result<Option<u64>, MyError> {
    let keyset = !table.keyset.is_empty();
    let sql = if keyset {
        let order = table.keyset.iter().map(|&(i, _)| quote_ident(&table.schema.columns[i].name)).collect::<Vec<_>>();
        let filter = match &after {
            Some(values) => after_filter(table, values).ok_or_else(|| {
                MyError::Protocol(format!(
                    "the snapshot progress stored for {} is not a key of the table ({values:?}). Fix: `tailgate \
                     offsets reset` and take the snapshot again",
                    table.qualified
                ))
            })?,
            None => String::new(),
        };
        format!("SELECT {} FROM {}{filter} ORDER BY {}", table.select_list, table.sql_name, order.join(", "))
    } else {
        format!("SELECT {} FROM {}", table.select_list, table.sql_name)
    };
    let source = SourceInfo::Mysql(source.clone());
    let mut pages = TablePages::new(job.metrics, &table.qualified, table.estimate, job.fetch_rows);
    let mut result = conn.query_iter(sql).await.map_err(|e| snapshot_error(e, table))?;
    while let Some(row) = result.next().await.map_err(|e| snapshot_error(e, table))? {
        let row_bytes = (0..row.len())
            .map(|i| match row.as_ref(i) {
                Some(mysql_async::Value::Bytes(b)) => b.len(),
                _ => 8,
            })
            .sum::<usize>();
        // The last row before a send: where the next page (or a resumed snapshot) starts, so that
        // whatever is sent is covered by a marker.
        let last_key = (keyset && pages.next_sends(row_bytes) && progress.is_some()).then(|| {
            table
                .keyset
                .iter()
                .map(|&(i, form)| match row.as_ref(i) {
                    Some(mysql_async::Value::Bytes(b)) => Some(form.store(b)),
                    _ => None,
                })
                .collect::<Vec<_>>()
        });
        let values = convert_row(row, table)?;
        emitter.event(ChangeEvent {
            op: Op::Read,
            table: table.schema.clone(),
            before: None,
            after: Some(values),
            source: source.clone(),
        });
        match pages.row(row_bytes) {
            AfterRow::Continue => continue,
            // Markers only for a lone reader: parallel readers record whole tables.
            AfterRow::Send | AfterRow::PageEnd => {
                if let (Some(key), Some(state)) = (last_key, progress.as_deref_mut()) {
                    state.table = Some(table.qualified.clone());
                    state.after = Some(key);
                    emitter.marker(state.marker());
                }
            }
        }
        // Without a key, stopping halfway through means the next run reads the table again.
        if !emitter.flush().await || job.stop.is_cancelled() {
            return Ok(None);
        }
    }
    drop(result);
    let rows = pages.finish();
    if !emitter.flush().await || job.stop.is_cancelled() {
        return Ok(None);
    }
    Ok(Some(rows))
}

/// A text-protocol row into the values the binlog path gives for the same columns.
pub(crate) fn convert_row(row: Row, table: &SnapTable) -> Result<Vec<Value>, MyError> {
    let raw = row.unwrap_raw();
    let mut values = Vec::with_capacity(table.codecs.len());
    for (i, (value, codec)) in raw.into_iter().zip(&table.codecs).enumerate() {
        values.push(match value {
            Some(mysql_async::Value::Bytes(bytes)) => rows::from_text(codec, bytes).map_err(|e| {
                MyError::Value(Box::new(crate::error::ValueFailure {
                    table: table.qualified.clone(),
                    column: table.schema.columns[i].name.clone(),
                    file: "(snapshot)".into(),
                    pos: 0,
                    source: e,
                    hint: ". To get past it, exclude the column (filter.exclude_columns)",
                }))
            })?,
            _ => Value::Null,
        });
    }
    Ok(values)
}

/// 1412: the table was created or rebuilt after the snapshot opened; a retry reads it from a fresh
/// read view (at-least-once for its rows) while streaming still starts at the consistent point.
fn snapshot_error(e: mysql_async::Error, table: &SnapTable) -> MyError {
    match e {
        mysql_async::Error::Server(s) if s.code == 1412 => {
            MyError::SnapshotTableChanged { table: table.qualified.clone() }
        }
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(forms: &[KeyForm]) -> SnapTable {
        let names = ["a", "b", "c"];
        SnapTable {
            qualified: "db.t".into(),
            sql_name: "`db`.`t`".into(),
            schema: Arc::new(TableSchema {
                id: TableId { schema: "db".into(), table: "t".into() },
                columns: names.iter().map(|n| ColumnSchema { name: (*n).into(), key: true }).collect(),
            }),
            columns: Vec::new(),
            codecs: Vec::new(),
            select_list: String::new(),
            key: (0..forms.len()).collect(),
            keyset: forms.iter().copied().enumerate().collect(),
            estimate: 0,
        }
    }

    #[test]
    fn keyset_filter_expands_composite_keys() {
        let t = table(&[KeyForm::Number, KeyForm::Text, KeyForm::Temporal]);
        let after = vec![Some("42".into()), Some("é'x".into()), Some("2024-01-02 03:04:05.5".into())];
        assert_eq!(
            after_filter(&t, &after).unwrap(),
            " WHERE (`a` > 42) OR (`a` = 42 AND `b` > _utf8mb4 X'C3A92778') OR \
             (`a` = 42 AND `b` = _utf8mb4 X'C3A92778' AND `c` > '2024-01-02 03:04:05.5')"
        );
    }

    #[test]
    fn stored_keys_never_become_arbitrary_sql() {
        let t = table(&[KeyForm::Number]);
        assert_eq!(after_filter(&t, &[Some("1 OR 1=1".into())]), None);
        let t = table(&[KeyForm::Temporal]);
        assert_eq!(after_filter(&t, &[Some("2024' OR '1".into())]), None);
        let t = table(&[KeyForm::Binary]);
        assert_eq!(after_filter(&t, &[Some("0G".into())]), None);
        assert_eq!(after_filter(&t, &[Some(KeyForm::Binary.store(&[0, 255]))]).unwrap(), " WHERE (`a` > X'00FF')");
        // A key of another shape (the table changed since the progress was stored).
        assert_eq!(after_filter(&t, &[Some("00".into()), Some("01".into())]), None);
    }

    #[test]
    fn key_forms_follow_the_codec() {
        assert_eq!(KeyForm::of(&ColumnCodec::Int { bytes: 8, unsigned: true }), Some(KeyForm::Number));
        assert_eq!(
            KeyForm::of(&ColumnCodec::Str { len_bytes: 4, charset: Charset::Binary, pad_to: 0 }),
            Some(KeyForm::Binary)
        );
        assert_eq!(KeyForm::of(&ColumnCodec::Float), None);
        assert_eq!(KeyForm::of(&ColumnCodec::Enum { bytes: 1, labels: Arc::from(Vec::new()) }), None);
    }

    #[test]
    fn state_round_trips_through_the_offsets_position() {
        let state = SnapshotState {
            consistent: Some(Position::mysql(BinlogFile("mysql-bin.000003".into()), 900, None)),
            done: vec!["db.a".into()],
            table: Some("db.b".into()),
            after: Some(vec![Some("17".into())]),
        };
        assert_eq!(SnapshotState::from_position(&state.marker()), Some(state));
    }
}
