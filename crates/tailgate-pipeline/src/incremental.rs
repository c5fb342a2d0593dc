//! Incremental snapshots: a table's existing rows read in chunks while streaming goes on, so that a
//! table added later, or a consumer that lost its data, gets the current state without a pause and
//! without a second connector. This is Netflix's DBLog watermark algorithm with read-only
//! watermarks: nothing is written to the source database.
//!
//! ```text
//!  stream ─ T1 ─ T2 ─ W ─ T3 ─ T4 ─ T5 ─ E ─ T6 ─▶      W: the chunk is read (the stream waits)
//!                     └─ chunk (rows after `after`, key order, LIMIT chunk_rows)
//!                        held while T3..T5 stream; keys they touch are dropped from it
//!                     E: the stream passed the chunk's high watermark: what is left of the
//!                        chunk is emitted (op "r"), then a checkpoint carrying the new `after`
//! ```
//!
//! **Why a chunk row never overwrites a newer change.** A chunk row of key k holds k's state as of
//! the chunk's read snapshot S. It is emitted at E. It would be stale only if a transaction newer
//! than S touched k and was emitted before E. Such a transaction was emitted either between W and E
//! (then k was dropped from the chunk: any change of k streamed in the window drops k, newer than S
//! or not, and the stream then carries k's state itself), or before W (it reached the stream before
//! the read began, yet S does not see it). The engines rule the second case out before they accept
//! a chunk, each in its own way:
//! - PostgreSQL: S's in-progress list (`xip`) holds no transaction that is already committed in the
//!   commit log (`pg_xact_status`) or that the stream emitted recently; otherwise the chunk is read
//!   again a moment later.
//! - MySQL (GTIDs): every GTID the stream emitted before W is in `gtid_executed` read before the
//!   snapshot opens (MySQL adds a GTID there only after the engine commit, so S sees it).
//! - MariaDB: the snapshot's own binlog position (`binlog_snapshot_position`) is at or after what
//!   the stream emitted before W.
//!
//! And E comes after every transaction S sees (PostgreSQL: the WAL insert position read after S;
//! MySQL: the end of the binlog read after the chunk; MariaDB: the snapshot's binlog position), so
//! nothing older than the chunk follows it. The full argument is in docs/architecture.md.
//!
//! **Resume.** The snapshots' progress (`after`: the last key delivered) travels in every streamed
//! checkpoint ([`IncrementalProgress`] inside the position). A chunk emitted but not acknowledged
//! before a crash is read again: duplicates, never a gap.
//!
//! **Memory.** One chunk (`incremental_chunk_rows` rows) is held at a time.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tailgate_core::{
    CapturedTables, ChangeEvent, Event, IncrementalProgress, IncrementalSnapshot, Op, Row, SourceInfo, TableSchema,
    Value,
};
use tokio::sync::{Notify, oneshot};

use crate::metrics::Metrics;
use crate::transform::Rules;

/// Default rows per chunk (`incremental_chunk_rows`).
pub const DEFAULT_CHUNK_ROWS: usize = 1024;

/// How long a requester waits for the source to take a command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Finished snapshots kept for `GET /snapshots`.
const FINISHED_KEPT: usize = 32;

/// What an operator asks for (`POST /snapshots`, `tailgate snapshot`).
#[derive(Debug)]
pub enum Command {
    /// Snapshot these tables (each becomes one snapshot, run one after the other), limited to rows
    /// matching `filter` when given. Replies with the new snapshots' ids.
    Start {
        tables: Vec<String>,
        filter: Option<String>,
        reply: oneshot::Sender<Result<Vec<u64>, String>>,
    },
    Pause {
        id: u64,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Resume {
        id: u64,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Cancel {
        id: u64,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

impl Command {
    /// The requester gave up waiting: the command must not run.
    pub fn abandoned(&self) -> bool {
        match self {
            Command::Start { reply, .. } => reply.is_closed(),
            Command::Pause { reply, .. } | Command::Resume { reply, .. } | Command::Cancel { reply, .. } => {
                reply.is_closed()
            }
        }
    }
}

/// A start command waiting for the engine's checks (the table exists, is captured, has a key, the
/// filter is valid SQL): the engine answers with [`StartRequest::accept`] or [`StartRequest::refuse`].
#[derive(Debug)]
pub struct StartRequest {
    pub tables: Vec<String>,
    pub filter: Option<String>,
    reply: oneshot::Sender<Result<Vec<u64>, String>>,
}

impl StartRequest {
    /// Answers the requester with why nothing was queued.
    pub fn refuse(self, why: String) {
        let _ = self.reply.send(Err(why));
    }

    /// Queues one snapshot per table, in order, with its row estimate (-1: unknown; one per table),
    /// and answers the requester with their ids.
    pub fn accept(self, snapshots: &mut IncrementalSnapshots, estimates: &[i64]) {
        let filter = self.filter;
        let ids: Vec<u64> = self
            .tables
            .into_iter()
            .enumerate()
            .map(|(i, table)| {
                let estimate = estimates.get(i).copied().unwrap_or(-1);
                let id = snapshots.add(table.clone(), filter.clone(), estimate);
                tracing::info!(snapshot = id, table = %table, filter = filter.as_deref().unwrap_or(""), "incremental snapshot requested");
                id
            })
            .collect();
        let _ = self.reply.send(Ok(ids));
    }
}

/// One snapshot as `GET /snapshots` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SnapshotStatus {
    pub id: u64,
    pub table: String,
    #[serde(rename = "where", skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// `queued`, `running`, `paused`, `done`, `cancelled` or `failed`.
    pub state: &'static str,
    /// Rows delivered (emitted; acknowledged once the checkpoint passes them).
    pub rows: u64,
    /// The table's estimated row count when the snapshot started (-1: unknown).
    pub estimate: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Why a request could not be handed to the source.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "the connector did not take the request within {}s: it is not streaming (a standby, or its initial snapshot or a reconnect is under way); try again",
        COMMAND_TIMEOUT.as_secs()
    )]
    NotStreaming,
    #[error("{0}")]
    Refused(String),
}

/// The mailbox between the operator's side (HTTP) and the running source. One per process: it
/// outlives reconnects and high-availability terms.
#[derive(Debug, Default)]
pub struct IncrementalControl {
    commands: Mutex<Vec<Command>>,
    status: Mutex<Vec<SnapshotStatus>>,
    notify: Notify,
}

impl IncrementalControl {
    pub fn new() -> Arc<Self> {
        Arc::new(IncrementalControl::default())
    }

    /// Starts snapshots of `tables`; the ids of the new snapshots.
    pub async fn start(&self, tables: Vec<String>, filter: Option<String>) -> Result<Vec<u64>, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Start { tables, filter, reply }, answer).await
    }

    pub async fn pause(&self, id: u64) -> Result<(), ControlError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Pause { id, reply }, answer).await
    }

    pub async fn resume(&self, id: u64) -> Result<(), ControlError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Resume { id, reply }, answer).await
    }

    pub async fn cancel(&self, id: u64) -> Result<(), ControlError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Cancel { id, reply }, answer).await
    }

    async fn send<T>(&self, command: Command, answer: oneshot::Receiver<Result<T, String>>) -> Result<T, ControlError> {
        self.commands.lock().unwrap_or_else(|p| p.into_inner()).push(command);
        self.notify.notify_one();
        match tokio::time::timeout(COMMAND_TIMEOUT, answer).await {
            Ok(Ok(result)) => result.map_err(ControlError::Refused),
            // Dropping the receiver marks the command abandoned: the source skips it.
            _ => Err(ControlError::NotStreaming),
        }
    }

    /// The source: commands waiting, oldest first (abandoned ones dropped).
    pub fn take_commands(&self) -> Vec<Command> {
        let mut commands = std::mem::take(&mut *self.commands.lock().unwrap_or_else(|p| p.into_inner()));
        commands.retain(|c| !c.abandoned());
        commands
    }

    /// Resolves when a command arrives (the source selects on it while idle).
    pub async fn command_arrived(&self) {
        self.notify.notified().await
    }

    /// What `GET /snapshots` answers.
    pub fn status(&self) -> Vec<SnapshotStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn publish(&self, status: Vec<SnapshotStatus>) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = status;
    }
}

/// The next chunk to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRequest {
    pub id: u64,
    pub table: String,
    pub filter: Option<String>,
    /// Read the rows after this key (text of SQL literals), in key order.
    pub after: Option<Vec<Option<String>>>,
    pub limit: usize,
}

/// A chunk as read: rows in key order, and where the next chunk starts.
#[derive(Debug)]
pub struct Chunk {
    pub schema: Arc<TableSchema>,
    /// Positions of the key columns in `schema` (the primary key, or `key_columns`).
    pub key: Vec<usize>,
    pub rows: Vec<Row>,
    /// The key of the last row (text of SQL literals); `None` when the chunk is empty.
    pub last_key: Option<Vec<Option<String>>>,
}

/// A chunk held while the stream passes its window.
#[derive(Debug)]
struct Window {
    id: u64,
    chunk: Chunk,
    /// Key bytes → row index, for the rows not yet dropped.
    keys: HashMap<Vec<u8>, usize>,
    dropped: Vec<bool>,
    complete: bool,
    read_at: Instant,
    /// Key column positions per stream schema (a relation's schema is shared by its events).
    stream_keys: Vec<(Arc<TableSchema>, Option<Vec<usize>>)>,
    scratch: String,
}

/// How the window ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    /// Rows emitted (after the drops); the snapshot goes on.
    Emitted { rows: usize, dropped: usize },
    /// The last chunk: the snapshot is done.
    Done { rows: usize, dropped: usize },
}

/// A source's incremental snapshots: the queue, the chunk in its window, the progress its
/// checkpoints carry. I/O-free; the engine reads chunks and decides when the window ends.
#[derive(Debug)]
pub struct IncrementalSnapshots {
    progress: IncrementalProgress,
    /// What positions carry: rebuilt when `progress` changes.
    shared: Arc<IncrementalProgress>,
    control: Arc<IncrementalControl>,
    window: Option<Window>,
    chunk_rows: usize,
    /// After a refused chunk (an unresolved transaction, a truncate): not before this instant.
    retry_at: Option<Instant>,
    estimates: HashMap<u64, i64>,
    finished: Vec<SnapshotStatus>,
}

impl IncrementalSnapshots {
    /// `resume`: the progress of the stored checkpoint.
    pub fn new(control: Arc<IncrementalControl>, resume: Option<&Arc<IncrementalProgress>>, chunk_rows: usize) -> Self {
        let progress = resume.map(|p| (**p).clone()).unwrap_or_default();
        let snapshots = IncrementalSnapshots {
            shared: Arc::new(progress.clone()),
            progress,
            control,
            window: None,
            chunk_rows: chunk_rows.max(1),
            retry_at: None,
            estimates: HashMap::new(),
            finished: Vec::new(),
        };
        snapshots.publish();
        snapshots
    }

    /// The progress a checkpoint placed now carries.
    pub fn checkpoint(&self) -> Option<Arc<IncrementalProgress>> {
        Some(self.shared.clone())
    }

    /// The table rules of the checkpoint this run resumed from (`None`: a first start, or a
    /// checkpoint written before tailgate recorded them).
    pub fn captured(&self) -> Option<&CapturedTables> {
        self.progress.captured.as_ref()
    }

    /// Records the table rules in force from now on.
    pub fn set_captured(&mut self, captured: CapturedTables) {
        if self.progress.captured.as_ref() != Some(&captured) {
            self.progress.captured = Some(captured);
            self.changed();
        }
    }

    /// Runs an operator's pause, resume or cancel; a start is handed back for the engine's checks.
    pub fn command(&mut self, command: Command) -> Option<StartRequest> {
        match command {
            Command::Start { tables, filter, reply } => return Some(StartRequest { tables, filter, reply }),
            Command::Pause { id, reply } => {
                let _ = reply.send(self.pause(id));
            }
            Command::Resume { id, reply } => {
                let _ = reply.send(self.resume(id));
            }
            Command::Cancel { id, reply } => {
                let _ = reply.send(self.cancel(id));
            }
        }
        None
    }

    /// Whether `rules` differ from the table rules of the checkpoint this run resumed from (or
    /// that an earlier reload recorded): then tables may be newly included. `false` on a first
    /// start, when no rules were recorded.
    pub fn rules_changed(&self, rules: &Rules) -> bool {
        self.progress.captured.as_ref().is_some_and(|previous| *previous != rules.captured())
    }

    /// What `snapshot_new_tables` snapshots: the tables of `tables` (every user table, as the
    /// engine names them) that `rules` include and the recorded rules did not, and that no queued
    /// snapshot covers already. Empty when no rules were recorded. Call [`Self::set_captured`]
    /// afterwards.
    pub fn newly_included(&self, rules: &Rules, tables: Vec<String>) -> Vec<String> {
        let Some(previous) = &self.progress.captured else { return Vec::new() };
        tables
            .into_iter()
            .filter(|table| {
                // A recorded pattern that no longer compiles: count the table as captured before
                // (no snapshot rather than a surprise one).
                let was = Rules::captured_under(previous, table).unwrap_or(true);
                let queued = self.progress.snapshots.iter().any(|s| &s.table == table);
                !was && !queued && rules.table_included(table)
            })
            .collect()
    }

    /// Whether any snapshot is waiting to run (not paused).
    pub fn pending(&self) -> bool {
        self.progress.snapshots.iter().any(|s| !s.paused)
    }

    pub fn snapshots(&self) -> &[IncrementalSnapshot] {
        &self.progress.snapshots
    }

    /// Queues a snapshot of `table`; returns its id. `estimate`: the table's row estimate (-1: unknown).
    pub fn add(&mut self, table: String, filter: Option<String>, estimate: i64) -> u64 {
        let id = self.progress.next_id.max(1);
        self.progress.next_id = id + 1;
        self.progress.snapshots.push(IncrementalSnapshot { id, table, filter, after: None, rows: 0, paused: false });
        self.estimates.insert(id, estimate);
        self.changed();
        id
    }

    /// Remembers a table's row estimate (after a restart) for the status.
    pub fn set_estimate(&mut self, id: u64, estimate: i64) {
        self.estimates.insert(id, estimate);
        self.publish();
    }

    pub fn pause(&mut self, id: u64) -> Result<(), String> {
        let snapshot = self.find(id)?;
        snapshot.paused = true;
        if self.window.as_ref().is_some_and(|w| w.id == id) {
            self.window = None;
        }
        self.changed();
        Ok(())
    }

    pub fn resume(&mut self, id: u64) -> Result<(), String> {
        self.find(id)?.paused = false;
        self.changed();
        Ok(())
    }

    pub fn cancel(&mut self, id: u64) -> Result<(), String> {
        self.find(id)?;
        if self.window.as_ref().is_some_and(|w| w.id == id) {
            self.window = None;
        }
        self.finish(id, "cancelled", None);
        Ok(())
    }

    /// Ends a snapshot that cannot go on (the table was dropped, its key is gone): the operator
    /// sees why in `GET /snapshots`.
    pub fn fail(&mut self, id: u64, error: String) {
        if self.window.as_ref().is_some_and(|w| w.id == id) {
            self.window = None;
        }
        self.finish(id, "failed", Some(error));
    }

    fn find(&mut self, id: u64) -> Result<&mut IncrementalSnapshot, String> {
        self.progress
            .snapshots
            .iter_mut()
            .find(|s| s.id == id)
            .ok_or_else(|| format!("no snapshot {id} is queued or running"))
    }

    /// The chunk to read next, if one is due: a snapshot runs, no chunk is in its window, and no
    /// retry is pending.
    pub fn next_chunk(&self) -> Option<ChunkRequest> {
        if self.window.is_some() || self.retry_at.is_some_and(|at| Instant::now() < at) {
            return None;
        }
        let s = self.progress.snapshots.iter().find(|s| !s.paused)?;
        Some(ChunkRequest {
            id: s.id,
            table: s.table.clone(),
            filter: s.filter.clone(),
            after: s.after.clone(),
            limit: self.chunk_rows,
        })
    }

    /// When the next chunk may be read after a refusal.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at.filter(|at| Instant::now() < *at)
    }

    /// The chunk could not be accepted (see the module doc): read it again after `delay`.
    pub fn retry_later(&mut self, delay: Duration) {
        self.retry_at = Some(Instant::now() + delay);
    }

    /// Whether a chunk waits for the stream to pass its high watermark.
    pub fn window_open(&self) -> bool {
        self.window.is_some()
    }

    /// Opens the window of a chunk read for `request` at `read_at`. A chunk with fewer rows than
    /// asked is the table's last.
    pub fn open(&mut self, request: &ChunkRequest, chunk: Chunk, read_at: Instant) {
        self.retry_at = None;
        let complete = chunk.rows.len() < request.limit;
        let mut scratch = String::new();
        let mut keys = HashMap::with_capacity(chunk.rows.len());
        for (i, row) in chunk.rows.iter().enumerate() {
            keys.insert(key_bytes(row, &chunk.key, &mut scratch), i);
        }
        let dropped = vec![false; chunk.rows.len()];
        self.window =
            Some(Window { id: request.id, chunk, keys, dropped, complete, read_at, stream_keys: Vec::new(), scratch });
    }

    /// A streamed event, before the window ends: a change of a key the chunk holds drops that row
    /// (the stream carries the key's newer state); a truncate of the table drops the whole chunk,
    /// to be read again.
    pub fn observe(&mut self, event: &Event) {
        let Some(window) = self.window.as_mut() else { return };
        let Event::Change(change) = event else { return };
        if change.table.id != window.chunk.schema.id {
            return;
        }
        if change.op == Op::Truncate {
            self.window = None;
            self.retry_at = None;
            return;
        }
        let key = window.stream_key(&change.table);
        let Some(key) = key else {
            // The stream's schema lacks a key column (renamed or dropped): no row can be matched,
            // so none may be trusted.
            self.window = None;
            return;
        };
        for row in [&change.before, &change.after].into_iter().flatten() {
            let bytes = key_bytes(row, &key, &mut window.scratch);
            if let Some(i) = window.keys.remove(&bytes) {
                window.dropped[i] = true;
            }
        }
    }

    /// The stream passed the chunk's high watermark: emits the rows left (op "r", `source`), and
    /// advances the snapshot. The caller then places a checkpoint with [`Self::checkpoint`].
    pub fn close(&mut self, source: &SourceInfo, metrics: &Metrics, mut emit: impl FnMut(Event)) -> Option<Closed> {
        let window = self.window.take()?;
        let id = window.id;
        let dropped = window.dropped.iter().filter(|d| **d).count();
        let mut rows = 0;
        let Chunk { schema, rows: chunk_rows, last_key, .. } = window.chunk;
        for (row, dropped) in chunk_rows.into_iter().zip(window.dropped) {
            if dropped {
                continue;
            }
            rows += 1;
            emit(Event::Change(ChangeEvent {
                op: Op::Read,
                table: schema.clone(),
                before: None,
                after: Some(row),
                source: source.clone(),
            }));
        }
        metrics.incremental.rows.fetch_add(rows as u64, Relaxed);
        metrics.incremental.dropped.fetch_add(dropped as u64, Relaxed);
        metrics.incremental.chunks.fetch_add(1, Relaxed);
        metrics.incremental.chunk_latency.observe(window.read_at.elapsed().as_secs_f64());
        let snapshot = self.progress.snapshots.iter_mut().find(|s| s.id == id)?;
        snapshot.rows += rows as u64;
        if let Some(last) = last_key {
            snapshot.after = Some(last);
        }
        if window.complete {
            self.finish(id, "done", None);
            Some(Closed::Done { rows, dropped })
        } else {
            self.changed();
            Some(Closed::Emitted { rows, dropped })
        }
    }

    /// Drops the chunk in its window (a reconnect: the stream resumes at an earlier point, and the
    /// chunk is read again after it).
    pub fn abandon_window(&mut self) {
        self.window = None;
    }

    fn finish(&mut self, id: u64, state: &'static str, error: Option<String>) {
        if let Some(at) = self.progress.snapshots.iter().position(|s| s.id == id) {
            let s = self.progress.snapshots.remove(at);
            self.finished.push(SnapshotStatus {
                id,
                table: s.table,
                filter: s.filter,
                state,
                rows: s.rows,
                estimate: self.estimates.remove(&id).unwrap_or(-1),
                error,
            });
            if self.finished.len() > FINISHED_KEPT {
                self.finished.remove(0);
            }
        }
        self.changed();
    }

    fn changed(&mut self) {
        self.shared = Arc::new(self.progress.clone());
        self.publish();
    }

    fn publish(&self) {
        let running = self.progress.snapshots.iter().find(|s| !s.paused).map(|s| s.id);
        let mut status: Vec<SnapshotStatus> = self.finished.clone();
        status.extend(self.progress.snapshots.iter().map(|s| SnapshotStatus {
            id: s.id,
            table: s.table.clone(),
            filter: s.filter.clone(),
            state: if s.paused {
                "paused"
            } else if Some(s.id) == running {
                "running"
            } else {
                "queued"
            },
            rows: s.rows,
            estimate: self.estimates.get(&s.id).copied().unwrap_or(-1),
            error: None,
        }));
        self.control.publish(status);
    }

    pub fn control(&self) -> &Arc<IncrementalControl> {
        &self.control
    }
}

impl Window {
    fn stream_key(&mut self, schema: &Arc<TableSchema>) -> Option<Vec<usize>> {
        if let Some((_, key)) = self.stream_keys.iter().find(|(known, _)| Arc::ptr_eq(known, schema)) {
            return key.clone();
        }
        let key: Option<Vec<usize>> = self
            .chunk
            .key
            .iter()
            .map(|&i| {
                let name = &self.chunk.schema.columns[i].name;
                schema.columns.iter().position(|c| &c.name == name)
            })
            .collect();
        self.stream_keys.push((schema.clone(), key.clone()));
        key
    }
}

/// A key's identity: its values' debug form, which tells every value kind and variant apart.
/// Stream and chunk rows go through the same converters, so one row gives one key.
fn key_bytes(row: &Row, key: &[usize], scratch: &mut String) -> Vec<u8> {
    scratch.clear();
    for &i in key {
        let _ = write!(scratch, "{:?}\u{1}", row.get(i).unwrap_or(&Value::Null));
    }
    scratch.as_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use tailgate_core::{ColumnSchema, PgSourceBlock, TableId};

    use super::*;

    fn schema(table: &str) -> Arc<TableSchema> {
        Arc::new(TableSchema {
            id: TableId { schema: "public".into(), table: table.into() },
            columns: vec![ColumnSchema { name: "id".into(), key: true }, ColumnSchema { name: "v".into(), key: false }],
        })
    }

    fn row(id: i64, v: &str) -> Row {
        vec![Value::Int(id), Value::String(v.into())]
    }

    fn change(op: Op, table: &Arc<TableSchema>, before: Option<Row>, after: Option<Row>) -> Event {
        Event::Change(ChangeEvent { op, table: table.clone(), before, after, source: source() })
    }

    fn source() -> SourceInfo {
        SourceInfo::Postgres(PgSourceBlock {
            name: "t".into(),
            db: "d".into(),
            commit_ts_us: 0,
            txid: 0,
            lsn: 0,
            last_commit_lsn: None,
            snapshot: "incremental",
        })
    }

    fn chunk(rows: Vec<Row>) -> Chunk {
        let last_key = rows.last().map(|r| match &r[0] {
            Value::Int(i) => vec![Some(i.to_string())],
            _ => unreachable!(),
        });
        Chunk { schema: schema("orders"), key: vec![0], rows, last_key }
    }

    fn emitted(s: &mut IncrementalSnapshots, metrics: &Metrics) -> (Vec<i64>, Option<Closed>) {
        let mut ids = Vec::new();
        let closed = s.close(&source(), metrics, |e| match e {
            Event::Change(c) => {
                assert_eq!(c.op, Op::Read);
                ids.push(match &c.after.as_ref().unwrap()[0] {
                    Value::Int(i) => *i,
                    _ => unreachable!(),
                })
            }
            Event::Message(_) => unreachable!(),
        });
        (ids, closed)
    }

    #[test]
    fn keys_changed_in_the_window_are_dropped_from_the_chunk() {
        let metrics = Metrics::new("t");
        let mut s = IncrementalSnapshots::new(IncrementalControl::new(), None, 3);
        let id = s.add("public.orders".into(), None, 10);
        let request = s.next_chunk().unwrap();
        assert_eq!(request, ChunkRequest { id, table: "public.orders".into(), filter: None, after: None, limit: 3 });
        s.open(&request, chunk(vec![row(1, "a"), row(2, "b"), row(3, "c")]), Instant::now());
        assert!(s.next_chunk().is_none(), "one chunk at a time");
        let orders = schema("orders");
        // Another table with the same key: no effect. An update of key 2, a key change 3 → 9.
        s.observe(&change(Op::Update, &schema("other"), None, Some(row(1, "x"))));
        s.observe(&change(Op::Update, &orders, Some(row(2, "b")), Some(row(2, "B"))));
        s.observe(&change(Op::Delete, &orders, Some(row(3, "c")), None));
        s.observe(&change(Op::Create, &orders, None, Some(row(9, "z"))));
        let (ids, closed) = emitted(&mut s, &metrics);
        assert_eq!(ids, vec![1]);
        assert_eq!(closed, Some(Closed::Emitted { rows: 1, dropped: 2 }));
        let progress = s.checkpoint().unwrap();
        assert_eq!(progress.snapshots[0].after, Some(vec![Some("3".into())]), "resumes after the chunk's last key");
        assert_eq!(progress.snapshots[0].rows, 1);
        // A short chunk ends the snapshot.
        let request = s.next_chunk().unwrap();
        assert_eq!(request.after, Some(vec![Some("3".into())]));
        s.open(&request, chunk(vec![row(4, "d")]), Instant::now());
        let (ids, closed) = emitted(&mut s, &metrics);
        assert_eq!(ids, vec![4]);
        assert_eq!(closed, Some(Closed::Done { rows: 1, dropped: 0 }));
        assert!(s.next_chunk().is_none());
        assert!(s.checkpoint().unwrap().snapshots.is_empty());
        assert_eq!(s.control().status()[0].state, "done");
        assert_eq!(metrics.incremental.rows.load(Relaxed), 2);
    }

    #[test]
    fn a_truncate_in_the_window_reads_the_chunk_again() {
        let metrics = Metrics::new("t");
        let mut s = IncrementalSnapshots::new(IncrementalControl::new(), None, 2);
        s.add("public.orders".into(), None, -1);
        let request = s.next_chunk().unwrap();
        s.open(&request, chunk(vec![row(1, "a"), row(2, "b")]), Instant::now());
        s.observe(&change(Op::Truncate, &schema("orders"), None, None));
        assert!(!s.window_open());
        assert_eq!(emitted(&mut s, &metrics).1, None);
        assert_eq!(s.next_chunk().unwrap(), request, "the same chunk again");
    }

    #[test]
    fn pause_resume_cancel_and_the_queue() {
        let mut s = IncrementalSnapshots::new(IncrementalControl::new(), None, 2);
        let a = s.add("public.a".into(), None, -1);
        let b = s.add("public.b".into(), Some("id > 5".into()), -1);
        assert_eq!(s.next_chunk().unwrap().id, a);
        s.pause(a).unwrap();
        assert_eq!(s.next_chunk().unwrap().id, b, "a paused snapshot lets the next one run");
        let states: Vec<_> = s.control().status().iter().map(|st| (st.id, st.state)).collect();
        assert_eq!(states, vec![(a, "paused"), (b, "running")]);
        s.resume(a).unwrap();
        assert_eq!(s.next_chunk().unwrap().id, a);
        s.cancel(a).unwrap();
        assert_eq!(s.next_chunk().unwrap().id, b);
        assert!(s.cancel(a).is_err(), "a cancelled snapshot is gone");
        assert_eq!(s.control().status()[0].state, "cancelled");
        // The queue survives a restart through the checkpoint.
        let restored = IncrementalSnapshots::new(IncrementalControl::new(), s.checkpoint().as_ref(), 2);
        assert_eq!(restored.next_chunk().unwrap().filter, Some("id > 5".into()));
        assert_eq!(restored.checkpoint().unwrap().next_id, b + 1);
    }

    #[test]
    fn a_stream_schema_without_the_key_column_drops_the_chunk() {
        let mut s = IncrementalSnapshots::new(IncrementalControl::new(), None, 2);
        s.add("public.orders".into(), None, -1);
        let request = s.next_chunk().unwrap();
        s.open(&request, chunk(vec![row(1, "a")]), Instant::now());
        let renamed = Arc::new(TableSchema {
            id: TableId { schema: "public".into(), table: "orders".into() },
            columns: vec![ColumnSchema { name: "order_id".into(), key: true }],
        });
        s.observe(&change(Op::Create, &renamed, None, Some(vec![Value::Int(1)])));
        assert!(!s.window_open());
    }

    fn rules(include: &[&str]) -> Rules {
        let mut spec = crate::transform::TransformSpec::default();
        spec.filter.include_tables = include.iter().map(|s| (*s).to_owned()).collect();
        Rules::compile(&spec).unwrap()
    }

    #[test]
    fn newly_included_tables_are_those_the_recorded_rules_did_not_capture() {
        let mut s = IncrementalSnapshots::new(IncrementalControl::new(), None, 2);
        let tables = || vec!["shop.a".to_owned(), "shop.b".to_owned(), "shop.c".to_owned(), "other.d".to_owned()];
        // A first start records the rules; nothing is new.
        let first = rules(&["shop\\.a"]);
        assert!(!s.rules_changed(&first));
        assert!(s.newly_included(&first, tables()).is_empty());
        s.set_captured(first.captured());
        assert!(!s.rules_changed(&first));
        // b and c come in; c is already queued by hand; other.d stays out.
        let wider = rules(&["shop\\..*"]);
        assert!(s.rules_changed(&wider));
        s.add("shop.c".into(), None, -1);
        assert_eq!(s.newly_included(&wider, tables()), vec!["shop.b".to_owned()]);
        s.set_captured(wider.captured());
        assert!(s.newly_included(&wider, tables()).is_empty(), "once recorded, nothing is new again");
        // The recorded rules survive a restart in the checkpoint.
        let restored = IncrementalSnapshots::new(IncrementalControl::new(), s.checkpoint().as_ref(), 2);
        assert!(!restored.rules_changed(&wider));
        assert_eq!(restored.newly_included(&rules(&[".*"]), tables()), vec!["other.d".to_owned()]);
    }

    #[tokio::test]
    async fn commands_run_and_a_start_waits_for_the_engine() {
        let control = IncrementalControl::new();
        let mut s = IncrementalSnapshots::new(control.clone(), None, 2);
        let a = s.add("shop.a".into(), None, 5);
        let (reply, answer) = oneshot::channel();
        assert!(s.command(Command::Pause { id: a, reply }).is_none());
        assert_eq!(answer.await.unwrap(), Ok(()));
        assert!(s.next_chunk().is_none(), "paused");
        let (reply, answer) = oneshot::channel();
        assert!(s.command(Command::Resume { id: a + 7, reply }).is_none());
        assert!(answer.await.unwrap().is_err(), "no such snapshot");
        let (reply, answer) = oneshot::channel();
        let start = s
            .command(Command::Start {
                tables: vec!["shop.b".into(), "shop.c".into()],
                filter: Some("id > 1".into()),
                reply,
            })
            .unwrap();
        assert_eq!(start.tables.len(), 2);
        start.accept(&mut s, &[10, 20]);
        let ids = answer.await.unwrap().unwrap();
        assert_eq!(ids, vec![a + 1, a + 2]);
        let status = control.status();
        assert_eq!(status.iter().map(|st| st.estimate).collect::<Vec<_>>(), vec![5, 10, 20]);
        assert_eq!(status[1].filter.as_deref(), Some("id > 1"));
        let (reply, answer) = oneshot::channel();
        s.command(Command::Start { tables: vec!["shop.x".into()], filter: None, reply }).unwrap().refuse("no".into());
        assert_eq!(answer.await.unwrap(), Err("no".into()));
        assert_eq!(s.snapshots().len(), 3, "a refused start queues nothing");
    }

    #[tokio::test]
    async fn commands_reach_the_source_and_abandoned_ones_do_not_run() {
        let control = IncrementalControl::new();
        let waiting = {
            let control = control.clone();
            tokio::spawn(async move { control.start(vec!["public.a".into()], None).await })
        };
        control.command_arrived().await;
        let mut commands = control.take_commands();
        assert_eq!(commands.len(), 1);
        match commands.remove(0) {
            Command::Start { tables, reply, .. } => {
                assert_eq!(tables, vec!["public.a".to_owned()]);
                reply.send(Ok(vec![7])).unwrap();
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(waiting.await.unwrap().unwrap(), vec![7]);
        let (reply, answer) = oneshot::channel::<Result<(), String>>();
        drop(answer);
        control.commands.lock().unwrap().push(Command::Cancel { id: 1, reply });
        assert!(control.take_commands().is_empty(), "the requester gave up: the command must not run");
    }
}
