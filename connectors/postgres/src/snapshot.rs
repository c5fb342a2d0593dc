//! The initial snapshot: the rows that exist before streaming starts, read without locks.
//!
//! ```text
//!  CREATE_REPLICATION_SLOT … EXPORT_SNAPSHOT ──▶ consistent point C, snapshot S (replication conn idles)
//!  SQL conn: BEGIN REPEATABLE READ; SET TRANSACTION SNAPSHOT S
//!            per table: COPY (SELECT … ORDER BY primary key) TO STDOUT, streamed
//!            ──▶ op "r" events ──▶ Item::Commit(PostgresSnapshot{C, done, table, after}) per
//!                `snapshot_fetch_rows` rows (a resumed table starts after `after`)
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
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tailgate_core::{
    ChangeEvent, ColumnSchema, Lsn, Op, PgSourceBlock, Position, Row, SourceInfo, Symbol, TableId, TableSchema, Value,
};
use tailgate_pipeline::{AfterRow, Batch, Metrics, ParallelReaders, ReaderEnd, SnapshotEmitter, TablePages};
use tokio::sync::mpsc;
use tokio_postgres::Client;
use tracing::info;

use crate::catalog::{self, TablePredicate};
use crate::error::PgError;
use crate::replication::{ConnInfo, SESSION_SETTINGS, quote_ident, quote_literal};
use crate::types::{BinaryKind, ColumnKind};

/// Where a snapshot stands (from the offsets file after a restart).
#[derive(Debug, Clone, Default)]
pub struct SnapshotProgress {
    pub done: Vec<String>,
    pub table: Option<String>,
    pub after: Option<Vec<Option<String>>>,
}

impl SnapshotProgress {
    /// Records `table` as read completely; returns the checkpoint that says so.
    fn table_done(&mut self, table: &SnapTable, consistent: Lsn) -> Position {
        self.done.push(table.qualified.clone());
        if self.table.as_deref() == Some(table.qualified.as_str()) {
            self.table = None;
            self.after = None;
        }
        self.marker(consistent)
    }

    /// The checkpoint that resumes the snapshot from here.
    fn marker(&self, consistent: Lsn) -> Position {
        Position::PostgresSnapshot {
            lsn: consistent,
            done: self.done.clone(),
            table: self.table.clone(),
            after: self.after.clone(),
        }
    }
}

pub struct SnapshotJob<'a> {
    pub info: &'a ConnInfo,
    pub publication: &'a str,
    pub tables: Option<&'a TablePredicate>,
    pub fetch_rows: usize,
    /// Tables read at the same time, each on its own connection sharing the snapshot.
    pub parallel: usize,
    /// Cancelled on shutdown: the snapshot stops after the current page (its progress is kept).
    pub stop: &'a tokio_util::sync::CancellationToken,
    pub name: Symbol,
    pub db: Symbol,
    pub metrics: &'a Metrics,
}

pub(crate) struct SnapTable {
    pub(crate) qualified: String,
    pub(crate) sql_name: String,
    pub(crate) schema: Arc<TableSchema>,
    kinds: Vec<ColumnKind>,
    pub(crate) select_list: String,
    /// Positions of the primary-key columns in the row, in key order.
    pub(crate) pk: Vec<usize>,
    pub(crate) estimate: i64,
    /// Every column has a binary reader (and every key column can be written back as a literal):
    /// the table is read with COPY's binary format, else as text.
    binary: Option<Vec<BinaryKind>>,
}

impl SnapTable {
    fn copy_format(&self) -> &'static str {
        if self.binary.is_some() { "binary" } else { "text" }
    }
}

/// Reads every published (and included) table. `exported`: the snapshot of a slot just created;
/// `None`: a fresh snapshot (resuming after a crash, or a slot that already existed). Returns false
/// when the pipeline went away before the end.
pub async fn run(
    job: &SnapshotJob<'_>,
    exported: Option<&str>,
    consistent: Lsn,
    progress: &mut SnapshotProgress,
    output: &mpsc::Sender<Batch>,
) -> Result<bool, PgError> {
    let client = open_reader(job, exported).await?;
    let xmin: i64 = client.query_one("SELECT txid_snapshot_xmin(txid_current_snapshot())", &[]).await?.get(0);
    let tables = list_tables(&client, job).await?;
    let pending: Vec<&SnapTable> = tables.iter().filter(|t| !progress.done.contains(&t.qualified)).collect();
    let remaining: i64 = pending.iter().map(|t| t.estimate.max(0)).sum();
    job.metrics.snapshot_rows_remaining.store(remaining, Relaxed);
    // More readers than tables would idle: each reader reads whole tables.
    let workers = job.parallel.clamp(1, pending.len().max(1));
    info!(
        tables = tables.len(),
        estimated_rows = remaining,
        consistent_point = %consistent,
        exported = exported.is_some(),
        resumed = !progress.done.is_empty() || progress.table.is_some(),
        readers = workers,
        "snapshot started"
    );
    let source = SourceInfo::Postgres(PgSourceBlock {
        name: job.name,
        db: job.db,
        commit_ts_us: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0),
        txid: xmin as u32,
        lsn: consistent.0,
        last_commit_lsn: None,
        snapshot: "true",
    });
    let first = progress.done.is_empty() && progress.table.is_none();
    let started = Instant::now();
    let (mut emitter, total, readers) = if workers == 1 {
        let mut emitter = SnapshotEmitter::new(output, first);
        let mut total = 0u64;
        for table in pending {
            job.metrics.snapshot_table_started(Some((&table.qualified, table.estimate.max(0))));
            let resume_after = resume_point(progress, table);
            let rows = match read_table(
                &client,
                job,
                table,
                resume_after,
                Some(&mut *progress),
                &source,
                consistent,
                &mut emitter,
            )
            .await
            {
                Ok(Some(rows)) => rows,
                Ok(None) => return Ok(false),
                Err(e) => {
                    // The pipeline gets exactly what the last marker (and so `progress`) covers: a
                    // retry in this process goes on from there, repeating nothing.
                    emitter.abandon().await;
                    return Err(e);
                }
            };
            total += rows;
            emitter.marker(progress.table_done(table, consistent));
            info!(table = %table.qualified, rows, format = table.copy_format(), "snapshot of table done");
        }
        (emitter, total, vec![client])
    } else {
        let mut readers = vec![client];
        for _ in 1..workers {
            readers.push(open_reader(job, exported).await?);
        }
        let shared = ParallelReaders::new(pending, workers, std::mem::take(progress));
        let runs = readers.iter().enumerate().map(|(w, client)| {
            let emitter = SnapshotEmitter::new(output, first && w == 0);
            read_tables(client, job, &shared, &source, consistent, emitter)
        });
        let ended = futures_util::future::try_join_all(runs).await;
        let rows = shared.rows();
        *progress = shared.into_progress();
        let mut final_emitter = None;
        for end in ended? {
            match end {
                ReaderEnd::Last(emitter) => final_emitter = Some(emitter),
                ReaderEnd::Done => {}
                ReaderEnd::Stopped => return Ok(false),
            }
        }
        let Some(emitter) = final_emitter else {
            return Err(PgError::Protocol("parallel snapshot: no reader ended the last table (a bug)".into()));
        };
        (emitter, rows, readers)
    };
    for client in &readers {
        if let Err(e) = client.batch_execute("COMMIT").await {
            emitter.release().await;
            return Err(e.into());
        }
    }
    job.metrics.snapshot_rows_remaining.store(0, Relaxed);
    job.metrics.snapshot_table_started(None);
    if !emitter.finish(Position::postgres(consistent)).await {
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

/// A connection in a `REPEATABLE READ` transaction on the snapshot: the exported one when there is
/// one (every reader sees exactly the same rows), else a fresh one.
async fn open_reader(job: &SnapshotJob<'_>, exported: Option<&str>) -> Result<Client, PgError> {
    let client = catalog::connect(job.info).await?;
    let settings: String = SESSION_SETTINGS.iter().map(|(k, v)| format!("SET {k} = {};", quote_literal(v))).collect();
    client.batch_execute(&settings).await?;
    client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
    if let Some(name) = exported {
        client.batch_execute(&format!("SET TRANSACTION SNAPSHOT {}", quote_literal(name))).await?;
    }
    Ok(client)
}

/// Where a table's read starts: after the key stored for it by an interrupted snapshot.
fn resume_point(progress: &SnapshotProgress, table: &SnapTable) -> Option<Vec<Option<String>>> {
    match (&progress.table, &progress.after) {
        (Some(t), Some(after)) if *t == table.qualified && !table.pk.is_empty() => Some(after.clone()),
        _ => None,
    }
}

/// One parallel reader: takes whole tables until none is left ([`ParallelReaders`] states the
/// contract). Tables in progress have no markers of their own: after a crash they are read again
/// from their start (duplicates, never a gap).
async fn read_tables<'a>(
    client: &Client,
    job: &SnapshotJob<'_>,
    shared: &ParallelReaders<&SnapTable, SnapshotProgress>,
    source: &SourceInfo,
    consistent: Lsn,
    mut emitter: SnapshotEmitter<'a>,
) -> Result<ReaderEnd<'a>, PgError> {
    loop {
        let Some(table) = shared.take() else { return Ok(ReaderEnd::released(emitter).await) };
        job.metrics.snapshot_table_started(Some((&table.qualified, table.estimate.max(0))));
        let resume_after = shared.with_progress(|p| resume_point(p, table));
        let Some(rows) = read_table(client, job, table, resume_after, None, source, consistent, &mut emitter).await?
        else {
            return Ok(ReaderEnd::Stopped);
        };
        info!(table = %table.qualified, rows, format = table.copy_format(), "snapshot of table done");
        emitter = match shared.after_table(emitter, rows, |progress| progress.table_done(table, consistent)).await {
            Ok(emitter) => emitter,
            Err(end) => return Ok(end),
        };
    }
}

/// Reads one table with a single `COPY (SELECT … ORDER BY <primary key>) TO STDOUT`: the server
/// streams rows while we convert them (no round trip per page), and the socket applies backpressure
/// when the pipeline is full, so memory stays flat. Every `fetch_rows` rows the last key read becomes
/// a progress marker; a resumed snapshot starts after it. Tables without a primary key are read in
/// physical order and start over after a crash.
#[allow(clippy::too_many_arguments)]
async fn read_table(
    client: &Client,
    job: &SnapshotJob<'_>,
    table: &SnapTable,
    after: Option<Vec<Option<String>>>,
    mut progress: Option<&mut SnapshotProgress>,
    source: &SourceInfo,
    consistent: Lsn,
    emitter: &mut SnapshotEmitter<'_>,
) -> Result<Option<u64>, PgError> {
    let order: Vec<String> = table.pk.iter().map(|&i| quote_ident(&table.schema.columns[i].name)).collect();
    let keyset = !table.pk.is_empty();
    let query = if keyset {
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
        format!("SELECT {} FROM {}{filter} ORDER BY {}", table.select_list, table.sql_name, order.join(", "))
    } else {
        format!("SELECT {} FROM {}", table.select_list, table.sql_name)
    };
    let (mut reader, options) = match &table.binary {
        Some(kinds) => (RowReader::Binary(BinaryRows::new(kinds)), " (FORMAT binary)"),
        None => (RowReader::Text(CopyLine::default()), ""),
    };
    let stream = client.copy_out(&format!("COPY ({query}) TO STDOUT{options}")).await?;
    futures_util::pin_mut!(stream);
    // Bytes of a row split across messages (PostgreSQL sends one row per CopyData message).
    let mut pending: Vec<u8> = Vec::new();
    let mut pages = TablePages::new(job.metrics, &table.qualified, table.estimate, job.fetch_rows);
    loop {
        let chunk = std::future::poll_fn(|cx| futures_util::Stream::poll_next(stream.as_mut(), cx)).await;
        let Some(chunk) = chunk.transpose()? else { break };
        let data: &[u8] = if pending.is_empty() {
            &chunk
        } else {
            pending.extend_from_slice(&chunk);
            &pending
        };
        let mut at = 0;
        let mut row_start = 0;
        while let Some(values) = reader.next_row(data, &mut at, table)? {
            let row_bytes = at - row_start;
            row_start = at;
            // The last key before a send is where a resumed snapshot starts: whatever is sent is
            // covered by a marker, so a retry repeats nothing.
            let key = (pages.next_sends(row_bytes) && keyset && progress.is_some())
                .then(|| reader.key(table, &values))
                .flatten();
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
                    if let (Some(progress), Some(key)) = (progress.as_deref_mut(), key) {
                        progress.table = Some(table.qualified.clone());
                        progress.after = Some(key);
                        emitter.marker(progress.marker(consistent));
                    }
                }
            }
            if !emitter.flush().await || job.stop.is_cancelled() {
                return Ok(None);
            }
        }
        if at < data.len() {
            let rest = data[at..].to_vec();
            pending = rest;
        } else {
            pending.clear();
        }
    }
    if !pending.is_empty() {
        return Err(copy_error(table, &pending));
    }
    let rows = pages.finish();
    if !emitter.flush().await || job.stop.is_cancelled() {
        return Ok(None);
    }
    Ok(Some(rows))
}

/// Converts the COPY output of a table with columns of `kinds` (read in binary format when
/// `binary` is given) as [`read_table`] does, without a server: `chunks` are the CopyData messages;
/// each row read is handed to `row` with its progress key (the first column is the primary key).
/// A row split across chunks waits for the next one; bytes left at the end are an error. For the
/// fuzz targets and the tests that replay their corpus.
#[doc(hidden)]
pub fn decode_copy<'a>(
    kinds: &[ColumnKind],
    binary: Option<&[BinaryKind]>,
    chunks: impl IntoIterator<Item = &'a [u8]>,
    mut row: impl FnMut(Row, Option<Vec<Option<String>>>),
) -> Result<(), PgError> {
    let names: Vec<String> = (0..kinds.len()).map(|i| format!("c{i}")).collect();
    let table = SnapTable {
        qualified: "public.fuzz".into(),
        sql_name: "\"public\".\"fuzz\"".into(),
        schema: Arc::new(TableSchema {
            id: TableId { schema: "public".into(), table: "fuzz".into() },
            columns: names.iter().enumerate().map(|(i, n)| ColumnSchema { name: n.clone(), key: i == 0 }).collect(),
        }),
        kinds: kinds.to_vec(),
        select_list: String::new(),
        pk: if kinds.is_empty() { Vec::new() } else { vec![0] },
        estimate: 0,
        binary: binary.map(<[BinaryKind]>::to_vec),
    };
    let mut reader = match &table.binary {
        Some(kinds) => RowReader::Binary(BinaryRows::new(kinds)),
        None => RowReader::Text(CopyLine::default()),
    };
    let mut pending: Vec<u8> = Vec::new();
    for chunk in chunks {
        let data: &[u8] = if pending.is_empty() {
            chunk
        } else {
            pending.extend_from_slice(chunk);
            &pending
        };
        let mut at = 0;
        while let Some(values) = reader.next_row(data, &mut at, &table)? {
            let key = reader.key(&table, &values);
            row(values, key);
        }
        pending = data[at..].to_vec();
    }
    if !pending.is_empty() {
        return Err(copy_error(&table, &pending));
    }
    Ok(())
}

/// Reads the rows of one table's COPY output, in text or binary format.
enum RowReader {
    Text(CopyLine),
    Binary(BinaryRows),
}

impl RowReader {
    /// Converts the next complete row of `data` starting at `*at`, and moves `*at` past it; `None`
    /// when the rest of `data` holds no complete row (it waits for the next message).
    fn next_row(&mut self, data: &[u8], at: &mut usize, table: &SnapTable) -> Result<Option<Row>, PgError> {
        match self {
            RowReader::Text(line) => {
                let rest = &data[*at..];
                let Some(end) = memchr::memchr(b'\n', rest) else { return Ok(None) };
                let raw = &rest[..end];
                *at += end + 1;
                line.parse(raw).map_err(|_| copy_error(table, raw))?;
                let mut values = Vec::with_capacity(table.kinds.len());
                for (i, kind) in table.kinds.iter().enumerate() {
                    values.push(match line.field(i) {
                        None => Value::Null,
                        Some(text) => kind.convert(text).ok_or_else(|| value_error(table, i, "text", text.len()))?,
                    });
                }
                Ok(Some(values))
            }
            RowReader::Binary(rows) => rows.next_row(data, at, table),
        }
    }

    /// The current row's primary key as the text of SQL literals, for a progress marker; `None`
    /// when a key value has no literal here (the page then gets no marker: a resume starts earlier,
    /// never later).
    fn key(&self, table: &SnapTable, values: &Row) -> Option<Vec<Option<String>>> {
        match self {
            RowReader::Text(line) => Some(table.pk.iter().map(|&i| line.field(i).map(str::to_owned)).collect()),
            // Key columns of binary tables are integers, strings and uuids (`BinaryKind::keyable`).
            RowReader::Binary(_) => table
                .pk
                .iter()
                .map(|&i| match &values[i] {
                    Value::Int(v) => Some(Some(v.to_string())),
                    Value::String(v) => Some(Some(v.clone())),
                    _ => None,
                })
                .collect(),
        }
    }
}

/// COPY's binary format: a header (signature, flags, extension), then per row a field count and,
/// per field, a length (-1 for NULL) and the value's bytes; a count of -1 ends the data.
struct BinaryRows {
    kinds: Vec<BinaryKind>,
    header_read: bool,
}

const BINARY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

impl BinaryRows {
    fn new(kinds: &[BinaryKind]) -> Self {
        BinaryRows { kinds: kinds.to_vec(), header_read: false }
    }

    fn next_row(&mut self, data: &[u8], at: &mut usize, table: &SnapTable) -> Result<Option<Row>, PgError> {
        let start = *at;
        let malformed = || copy_error(table, &data[start..]);
        let mut pos = start;
        let take = |pos: &mut usize, n: usize| -> Option<&[u8]> {
            let bytes = data.get(*pos..pos.checked_add(n)?)?;
            *pos += n;
            Some(bytes)
        };
        let i32_at = |pos: &mut usize| take(pos, 4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        if !self.header_read {
            let Some(signature) = take(&mut pos, BINARY_SIGNATURE.len()) else { return Ok(None) };
            if signature != BINARY_SIGNATURE {
                return Err(malformed());
            }
            let (Some(_flags), Some(extension)) = (i32_at(&mut pos), i32_at(&mut pos)) else { return Ok(None) };
            let extension = usize::try_from(extension).map_err(|_| malformed())?;
            if take(&mut pos, extension).is_none() {
                return Ok(None);
            }
            self.header_read = true;
            *at = pos;
        }
        let Some(count) = take(&mut pos, 2).map(|b| i16::from_be_bytes([b[0], b[1]])) else { return Ok(None) };
        if count == -1 {
            *at = pos;
            return Ok(None);
        }
        if usize::try_from(count).ok() != Some(self.kinds.len()) {
            return Err(malformed());
        }
        let mut values = Vec::with_capacity(self.kinds.len());
        for (i, kind) in self.kinds.iter().enumerate() {
            let Some(len) = i32_at(&mut pos) else { return Ok(None) };
            if len == -1 {
                values.push(Value::Null);
                continue;
            }
            let Some(raw) = take(&mut pos, usize::try_from(len).map_err(|_| malformed())?) else {
                return Ok(None);
            };
            values.push(kind.convert(raw).ok_or_else(|| value_error(table, i, "binary", raw.len()))?);
        }
        *at = pos;
        Ok(Some(values))
    }
}

fn value_error(table: &SnapTable, column: usize, form: &'static str, bytes: usize) -> PgError {
    let column_name = table.schema.columns[column].name.clone();
    PgError::Value { table: table.qualified.clone(), column: column_name, oid: 0, form, bytes }
}

fn copy_error(table: &SnapTable, raw: &[u8]) -> PgError {
    PgError::Protocol(format!(
        "COPY of {}: a row that is not COPY text: {:?}",
        table.qualified,
        String::from_utf8_lossy(&raw[..raw.len().min(200)])
    ))
}

/// One line of `COPY … TO STDOUT` text format: fields separated by tabs, `\N` for NULL, and
/// backslash escapes for the backslash, control characters (`\t`, `\n`, …) and octal or hex bytes.
/// Otherwise a field is the type's text output, exactly what pgoutput sends, so the same
/// [`ColumnKind::convert`] applies. Fields without escapes are borrowed from the line; the buffers
/// are reused from line to line.
#[derive(Default)]
struct CopyLine {
    /// The unescaped text of every field, back to back.
    text: String,
    /// Per field: its byte range in `text`, or `None` for NULL.
    fields: Vec<Option<(usize, usize)>>,
}

impl CopyLine {
    fn parse(&mut self, raw: &[u8]) -> Result<(), std::str::Utf8Error> {
        let line = std::str::from_utf8(raw)?;
        self.text.clear();
        self.fields.clear();
        // Tabs and backslashes are ASCII, so byte offsets found by memchr are char boundaries.
        let mut rest = line;
        loop {
            let (field, next) = match memchr::memchr(b'\t', rest.as_bytes()) {
                Some(tab) => (&rest[..tab], Some(&rest[tab + 1..])),
                None => (rest, None),
            };
            if field == "\\N" {
                self.fields.push(None);
            } else {
                let start = self.text.len();
                if memchr::memchr(b'\\', field.as_bytes()).is_some() {
                    unescape_into(field, &mut self.text);
                } else {
                    self.text.push_str(field);
                }
                self.fields.push(Some((start, self.text.len())));
            }
            match next {
                Some(after_tab) => rest = after_tab,
                None => return Ok(()),
            }
        }
    }

    fn field(&self, i: usize) -> Option<&str> {
        self.fields.get(i).copied().flatten().map(|(a, b)| &self.text[a..b])
    }
}

fn unescape_into(field: &str, out: &mut String) {
    let bytes = field.as_bytes();
    let mut raw = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        i += 1;
        if b != b'\\' || i == bytes.len() {
            raw.push(b);
            continue;
        }
        let c = bytes[i];
        i += 1;
        raw.push(match c {
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'v' => 0x0b,
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                for _ in 0..2 {
                    match bytes.get(i) {
                        Some(d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                v as u8
            }
            b'x' if bytes.get(i).is_some_and(u8::is_ascii_hexdigit) => {
                let mut v = 0u8;
                for _ in 0..2 {
                    match bytes.get(i).and_then(|d| (*d as char).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d as u8;
                            i += 1;
                        }
                        None => break,
                    }
                }
                v
            }
            other => other,
        });
    }
    out.push_str(&String::from_utf8_lossy(&raw));
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
        tables.push(describe_table(client, oid, schema, name, estimate, None).await?);
    }
    Ok(tables)
}

/// A table's columns as pgoutput sends them (in attribute order, without dropped or generated
/// columns), its key (the primary key, else `key_columns` when given) and how COPY reads it.
pub(crate) async fn describe_table(
    client: &Client,
    oid: u32,
    schema: String,
    name: String,
    estimate: i64,
    key_columns: Option<&[String]>,
) -> Result<SnapTable, PgError> {
    let qualified = format!("{schema}.{name}");
    let columns = client
        .query(
            "SELECT attname::text, atttypid, atttypmod FROM pg_attribute \
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
            &[&oid],
        )
        .await?;
    let mut pk_names = catalog::primary_key(client, oid).await?;
    if pk_names.is_empty()
        && let Some(key) = key_columns
    {
        pk_names = key.to_vec();
    }
    let names: Vec<String> = columns.iter().map(|c| c.get(0)).collect();
    let pk: Vec<usize> = pk_names.iter().filter_map(|k| names.iter().position(|n| n == k)).collect();
    let schema_arc = Arc::new(TableSchema {
        id: TableId { schema: schema.clone(), table: name.clone() },
        columns: names.iter().map(|n| ColumnSchema { name: n.clone(), key: pk_names.contains(n) }).collect(),
    });
    let kinds: Vec<ColumnKind> =
        columns.iter().map(|c| ColumnKind::of(c.get::<_, u32>(1), c.get::<_, i32>(2))).collect();
    let binary: Option<Vec<BinaryKind>> =
        columns.iter().zip(&kinds).map(|(c, kind)| BinaryKind::of(c.get::<_, u32>(1), kind)).collect();
    let binary = binary.filter(|b| pk.iter().all(|&i: &usize| b[i].keyable()));
    // No casts: the simple protocol already returns each type's text output, as pgoutput does.
    let select_list = names.iter().map(|n| quote_ident(n)).collect::<Vec<_>>().join(", ");
    Ok(SnapTable {
        sql_name: format!("{}.{}", quote_ident(&schema), quote_ident(&name)),
        qualified,
        schema: schema_arc,
        kinds,
        select_list,
        pk,
        estimate,
        binary,
    })
}

/// The keyset condition for the rows after `after` in key order: `(k1, k2) > ('a', 'b')`.
pub(crate) fn after_condition(table: &SnapTable, after: &[Option<String>]) -> String {
    let order: Vec<String> = table.pk.iter().map(|&i| quote_ident(&table.schema.columns[i].name)).collect();
    format!(
        "({}) > ({})",
        order.join(", "),
        after.iter().map(|v| v.as_deref().map_or("NULL".to_owned(), quote_literal)).collect::<Vec<_>>().join(", ")
    )
}

/// Reads every row `query` (a SELECT of `table.select_list`) returns, through COPY in the table's
/// format; the rows and the last row's key (text of SQL literals). For incremental snapshot chunks:
/// a bounded number of rows.
pub(crate) async fn copy_rows(
    client: &Client,
    table: &SnapTable,
    query: &str,
) -> Result<(Vec<Row>, Option<Vec<Option<String>>>), PgError> {
    let (mut reader, options) = match &table.binary {
        Some(kinds) => (RowReader::Binary(BinaryRows::new(kinds)), " (FORMAT binary)"),
        None => (RowReader::Text(CopyLine::default()), ""),
    };
    let stream = client.copy_out(&format!("COPY ({query}) TO STDOUT{options}")).await?;
    futures_util::pin_mut!(stream);
    let mut pending: Vec<u8> = Vec::new();
    let mut rows = Vec::new();
    let mut last_key = None;
    loop {
        let chunk = std::future::poll_fn(|cx| futures_util::Stream::poll_next(stream.as_mut(), cx)).await;
        let Some(chunk) = chunk.transpose()? else { break };
        pending.extend_from_slice(&chunk);
        let mut at = 0;
        while let Some(values) = reader.next_row(&pending, &mut at, table)? {
            last_key = reader.key(table, &values);
            rows.push(values);
        }
        pending.drain(..at);
    }
    if !pending.is_empty() {
        return Err(copy_error(table, &pending));
    }
    Ok((rows, last_key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(raw: &[u8]) -> Vec<Option<String>> {
        let mut line = CopyLine::default();
        line.parse(raw).unwrap();
        (0..line.fields.len()).map(|i| line.field(i).map(str::to_owned)).collect()
    }

    fn two_column_table(binary: Vec<BinaryKind>) -> SnapTable {
        SnapTable {
            qualified: "public.t".into(),
            sql_name: "public.t".into(),
            schema: Arc::new(TableSchema {
                id: TableId { schema: "public".into(), table: "t".into() },
                columns: vec![
                    ColumnSchema { name: "id".into(), key: true },
                    ColumnSchema { name: "v".into(), key: false },
                ],
            }),
            kinds: vec![ColumnKind::Int, ColumnKind::Text],
            select_list: String::new(),
            pk: vec![0],
            estimate: 0,
            binary: Some(binary),
        }
    }

    /// COPY binary output of rows of (bigint, text).
    fn binary_copy(rows: &[(i64, Option<&str>)]) -> Vec<u8> {
        let mut out = BINARY_SIGNATURE.to_vec();
        out.extend_from_slice(&0i32.to_be_bytes());
        out.extend_from_slice(&4i32.to_be_bytes());
        out.extend_from_slice(b"ext!");
        for (id, v) in rows {
            out.extend_from_slice(&2i16.to_be_bytes());
            out.extend_from_slice(&8i32.to_be_bytes());
            out.extend_from_slice(&id.to_be_bytes());
            match v {
                Some(v) => {
                    out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    out.extend_from_slice(v.as_bytes());
                }
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        out
    }

    #[test]
    fn binary_rows_wait_for_complete_rows_at_any_split() {
        let table = two_column_table(vec![BinaryKind::Int8, BinaryKind::Text]);
        let data = binary_copy(&[(1, Some("one")), (-2, None), (3, Some(""))]);
        let expected = [
            vec![Value::Int(1), Value::String("one".into())],
            vec![Value::Int(-2), Value::Null],
            vec![Value::Int(3), Value::String(String::new())],
        ];
        // Every split point: what the first part holds completely is read, the rest waits, and the
        // second part (with the rest carried over) completes the rows, as `read_table` joins them.
        for split in 0..=data.len() {
            let mut reader = BinaryRows::new(&[BinaryKind::Int8, BinaryKind::Text]);
            let mut rows = Vec::new();
            let mut at = 0;
            while let Some(row) = reader.next_row(&data[..split], &mut at, &table).unwrap() {
                rows.push(row);
            }
            let mut rest = data[at..split].to_vec();
            rest.extend_from_slice(&data[split..]);
            let mut at = 0;
            while let Some(row) = reader.next_row(&rest, &mut at, &table).unwrap() {
                rows.push(row);
            }
            assert_eq!(rows, expected, "split at {split}");
            assert_eq!(at, rest.len(), "the trailer is consumed (split at {split})");
        }
    }

    #[test]
    fn binary_rows_refuse_what_is_not_copy_binary() {
        let table = two_column_table(vec![BinaryKind::Int8, BinaryKind::Text]);
        let mut reader = BinaryRows::new(&[BinaryKind::Int8, BinaryKind::Text]);
        assert!(reader.next_row(b"PGCOPY\nXXXXXXXXXXXXXXX", &mut 0, &table).is_err(), "bad signature");
        let mut reader = BinaryRows::new(&[BinaryKind::Int8]);
        assert!(reader.next_row(&binary_copy(&[(1, Some("x"))]), &mut 0, &table).is_err(), "field count");
        let mut bad_int = binary_copy(&[(1, Some("x"))]);
        bad_int[23 + 2 + 3] = 7; // after the 23-byte header and the field count: the bigint's length, 8 → 7
        let mut reader = BinaryRows::new(&[BinaryKind::Int8, BinaryKind::Text]);
        let error = reader.next_row(&bad_int, &mut 0, &table).unwrap_err();
        assert!(
            matches!(error, PgError::Value { ref column, .. } if column == "id"),
            "a value that does not fit its type: {error}"
        );
    }

    #[test]
    fn binary_keys_become_literals() {
        let table = two_column_table(vec![BinaryKind::Int8, BinaryKind::Text]);
        let reader = RowReader::Binary(BinaryRows::new(&[BinaryKind::Int8, BinaryKind::Text]));
        assert_eq!(reader.key(&table, &vec![Value::Int(-5), Value::Null]), Some(vec![Some("-5".into())]));
        assert_eq!(reader.key(&table, &vec![Value::Null, Value::Null]), None, "no literal: no marker");
    }

    #[test]
    fn splits_tabs_and_reads_nulls() {
        assert_eq!(
            fields(b"1\t\\N\t\tnew"),
            [Some("1".into()), None, Some(String::new()), Some("new".into())],
            "an empty string is not NULL"
        );
    }

    #[test]
    fn unescapes_backslash_sequences() {
        assert_eq!(fields(br"a\tb\nc\\d\rE"), [Some("a\tb\nc\\d\rE".into())]);
        assert_eq!(fields(br"\b\f\v"), [Some("\u{8}\u{c}\u{b}".into())]);
        assert_eq!(fields(br"\101\x42\7"), [Some("AB\u{7}".into())], "octal and hex bytes");
        assert_eq!(fields(br"\\N"), [Some("\\N".into())], "an escaped backslash before N is text, not NULL");
        assert_eq!(fields("caf\\303\\251 ☃".as_bytes()), [Some("café ☃".into())], "escaped UTF-8 bytes join up");
        assert_eq!(fields(br"x\q"), [Some("xq".into())], "an unknown escape is the character itself");
    }

    #[test]
    fn a_line_that_is_not_utf8_is_an_error() {
        assert!(CopyLine::default().parse(b"\xff\xfe").is_err());
    }

    #[test]
    fn reuses_its_buffers() {
        let mut line = CopyLine::default();
        line.parse(b"long value one\tlong value two").unwrap();
        let capacity = line.text.capacity();
        line.parse(b"short\t\\N").unwrap();
        assert_eq!((line.field(0), line.field(1), line.field(2)), (Some("short"), None, None));
        assert_eq!(line.text.capacity(), capacity);
    }
}
