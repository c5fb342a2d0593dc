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
    pub fn accept<H>(self, snapshots: &mut IncrementalSnapshots<H>, estimates: &[i64]) {
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

/// Why a `--where` predicate is refused before it reaches the server, if it is. It must be one
/// expression: parentheses balanced outside string literals, and no statement separator or comment
/// (`comments`: the dialect's comment openers) outside them, so that it can neither end the chunk's
/// query early (dropping its `ORDER BY … LIMIT`, which would read the whole table into memory) nor
/// add to it. Conservative: a backslash-escaped quote counts as the literal's end.
pub fn filter_refused(filter: &str, comments: &[&str]) -> Option<String> {
    let refuse = |what: &str| {
        Some(format!(
            "--where {filter:?}: the predicate must be one SQL expression ({what}); write quotes inside literals as ''"
        ))
    };
    let (mut depth, mut quoted) = (0i32, false);
    for (at, c) in filter.char_indices() {
        if quoted {
            quoted = c != '\'';
            continue;
        }
        match c {
            '\'' => quoted = true,
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return refuse("a ')' closes more than it opened");
                }
            }
            ';' => return refuse("no ';'"),
            _ if comments.iter().any(|open| filter[at..].starts_with(open)) => return refuse("no comments"),
            _ => {}
        }
    }
    if quoted {
        return refuse("a string literal is not closed");
    }
    if depth != 0 {
        return refuse("parentheses do not balance");
    }
    None
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
struct Window<H> {
    id: u64,
    /// The engine's high watermark: the window ends once the stream passed it.
    high: H,
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

/// Chunks read ahead while earlier ones wait for the stream to pass their high watermarks: the
/// reads overlap the waits (under write load a window lasts about one commit interval). Memory:
/// this many chunks of `incremental_chunk_rows` rows.
pub const MAX_OPEN_CHUNKS: usize = 4;

/// A source's incremental snapshots: the queue, the chunks in their windows (oldest first), the
/// progress its checkpoints carry. I/O-free; the engine reads chunks, gives each its high
/// watermark `H`, and says when the stream passed the oldest one.
#[derive(Debug)]
pub struct IncrementalSnapshots<H> {
    progress: IncrementalProgress,
    /// What positions carry: rebuilt when `progress` changes.
    shared: Arc<IncrementalProgress>,
    control: Arc<IncrementalControl>,
    /// Open windows, in the order they were read (their watermarks only grow).
    windows: std::collections::VecDeque<Window<H>>,
    chunk_rows: usize,
    /// After a refused chunk (an unresolved transaction, a truncate): not before this instant.
    retry_at: Option<Instant>,
    estimates: HashMap<u64, i64>,
    finished: Vec<SnapshotStatus>,
}

impl<H> IncrementalSnapshots<H> {
    /// `resume`: the progress of the stored checkpoint.
    pub fn new(control: Arc<IncrementalControl>, resume: Option<&Arc<IncrementalProgress>>, chunk_rows: usize) -> Self {
        let progress = resume.map(|p| (**p).clone()).unwrap_or_default();
        let snapshots = IncrementalSnapshots {
            shared: Arc::new(progress.clone()),
            progress,
            control,
            windows: std::collections::VecDeque::new(),
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
        self.windows.retain(|w| w.id != id);
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
        self.windows.retain(|w| w.id != id);
        self.finish(id, "cancelled", None);
        Ok(())
    }

    /// Ends a snapshot that cannot go on (the table was dropped, its key is gone): the operator
    /// sees why in `GET /snapshots`.
    pub fn fail(&mut self, id: u64, error: String) {
        self.windows.retain(|w| w.id != id);
        self.finish(id, "failed", Some(error));
    }

    fn find(&mut self, id: u64) -> Result<&mut IncrementalSnapshot, String> {
        self.progress
            .snapshots
            .iter_mut()
            .find(|s| s.id == id)
            .ok_or_else(|| format!("no snapshot {id} is queued or running"))
    }

    /// The chunk to read next, if one is due: a snapshot runs, fewer than [`MAX_OPEN_CHUNKS`] of
    /// its chunks are open and none of them is its last, and no retry is pending. It starts after
    /// the newest open chunk.
    pub fn next_chunk(&self) -> Option<ChunkRequest> {
        if self.windows.len() >= MAX_OPEN_CHUNKS || self.retry_at.is_some_and(|at| Instant::now() < at) {
            return None;
        }
        let s = self.progress.snapshots.iter().find(|s| !s.paused)?;
        let after = match self.windows.back() {
            // Another snapshot's chunks are still open (one was paused): let them end first.
            Some(w) if w.id != s.id => return None,
            Some(w) if w.complete => return None,
            Some(w) => w.chunk.last_key.clone(),
            None => s.after.clone(),
        };
        Some(ChunkRequest { id: s.id, table: s.table.clone(), filter: s.filter.clone(), after, limit: self.chunk_rows })
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
        !self.windows.is_empty()
    }

    /// The high watermark of the oldest open chunk: the next to end.
    pub fn oldest_high(&self) -> Option<&H> {
        self.windows.front().map(|w| &w.high)
    }

    /// Opens the window of a chunk read for `request` at `read_at`, ending at `high`. A chunk with
    /// fewer rows than asked is the table's last.
    ///
    /// Refused (the caller fails the snapshot with the reason) when the last row's key cannot
    /// place the next chunk: a NULL in it (`key_columns` naming a nullable column) would make the
    /// next read compare with NULL and end the snapshot early, silently.
    pub fn open(&mut self, request: &ChunkRequest, chunk: Chunk, read_at: Instant, high: H) -> Result<(), String> {
        if !chunk.rows.is_empty() && chunk.last_key.as_ref().is_none_or(|key| key.iter().any(Option::is_none)) {
            let columns: Vec<&str> = chunk.key.iter().map(|&i| chunk.schema.columns[i].name.as_str()).collect();
            return Err(format!(
                "table {}: a row's key ({}) holds NULL: an incremental snapshot needs a key without NULLs (a primary key, or [filter.key_columns] naming NOT NULL columns)",
                request.table,
                columns.join(", ")
            ));
        }
        self.retry_at = None;
        let complete = chunk.rows.len() < request.limit;
        let mut scratch = String::new();
        let mut keys = HashMap::with_capacity(chunk.rows.len());
        for (i, row) in chunk.rows.iter().enumerate() {
            keys.insert(key_bytes(row, &chunk.key, &mut scratch), i);
        }
        let dropped = vec![false; chunk.rows.len()];
        self.windows.push_back(Window {
            id: request.id,
            high,
            chunk,
            keys,
            dropped,
            complete,
            read_at,
            stream_keys: Vec::new(),
            scratch,
        });
        Ok(())
    }

    /// A streamed event, before the windows end: a change of a key an open chunk holds drops that
    /// row (the stream carries the key's newer state); a truncate of the table drops the open
    /// chunks, to be read again.
    pub fn observe(&mut self, event: &Event) {
        if self.windows.is_empty() {
            return;
        }
        let Event::Change(change) = event else { return };
        let mut distrust = false;
        for window in self.windows.iter_mut() {
            if change.table.id != window.chunk.schema.id {
                continue;
            }
            if change.op == Op::Truncate {
                distrust = true;
                break;
            }
            // The stream's schema lacks a key column (renamed or dropped): no row can be matched,
            // so none may be trusted.
            let Some(key) = window.stream_key(&change.table) else {
                distrust = true;
                break;
            };
            for row in [&change.before, &change.after].into_iter().flatten() {
                let bytes = key_bytes(row, &key, &mut window.scratch);
                if let Some(i) = window.keys.remove(&bytes) {
                    window.dropped[i] = true;
                }
            }
        }
        if distrust {
            self.windows.clear();
            self.retry_at = None;
        }
    }

    /// The stream passed the oldest chunk's high watermark: emits its rows left (op "r",
    /// `source`), and advances the snapshot. The caller then places a checkpoint with
    /// [`Self::checkpoint`].
    pub fn close(&mut self, source: &SourceInfo, metrics: &Metrics, mut emit: impl FnMut(Event)) -> Option<Closed> {
        let window = self.windows.pop_front()?;
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

    /// Drops the open chunks (a reconnect: the stream resumes at an earlier point, and the chunks
    /// are read again after it).
    pub fn abandon_windows(&mut self) {
        self.windows.clear();
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

impl<H> Window<H> {
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

    fn emitted(s: &mut IncrementalSnapshots<u64>, metrics: &Metrics) -> (Vec<i64>, Option<Closed>) {
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
    fn predicates_must_be_one_expression() {
        let pg = ["--", "/*"];
        for ok in [
            "id % 2 = 0",
            "name = 'a;b--c' AND (x > 1 OR y < 2)",
            "note = 'it''s'",
            "created_at > now() - interval '1 day'",
        ] {
            assert_eq!(filter_refused(ok, &pg), None, "{ok}");
        }
        for bad in ["1=1; DROP TABLE t", "1=1 -- ORDER BY", "1=1 /* x */", "true) OR (true", "(id > 1", "name = 'open"]
        {
            assert!(filter_refused(bad, &pg).is_some(), "{bad}");
        }
        assert!(filter_refused("a = 1 # comment", &["--", "#", "/*"]).is_some(), "MySQL's # comment");
    }

    #[test]
    fn keys_changed_in_the_window_are_dropped_from_the_chunk() {
        let metrics = Metrics::new("t");
        let mut s = IncrementalSnapshots::<u64>::new(IncrementalControl::new(), None, 3);
        let id = s.add("public.orders".into(), None, 10);
        let request = s.next_chunk().unwrap();
        assert_eq!(request, ChunkRequest { id, table: "public.orders".into(), filter: None, after: None, limit: 3 });
        s.open(&request, chunk(vec![row(1, "a"), row(2, "b"), row(3, "c")]), Instant::now(), 0).unwrap();
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
        s.open(&request, chunk(vec![row(4, "d")]), Instant::now(), 0).unwrap();
        let (ids, closed) = emitted(&mut s, &metrics);
        assert_eq!(ids, vec![4]);
        assert_eq!(closed, Some(Closed::Done { rows: 1, dropped: 0 }));
        assert!(s.next_chunk().is_none());
        assert!(s.checkpoint().unwrap().snapshots.is_empty());
        assert_eq!(s.control().status()[0].state, "done");
        assert_eq!(metrics.incremental.rows.load(Relaxed), 2);
    }

    #[test]
    fn chunks_are_read_ahead_and_end_in_order() {
        let metrics = Metrics::new("t");
        let mut s = IncrementalSnapshots::<u64>::new(IncrementalControl::new(), None, 2);
        s.add("public.orders".into(), None, -1);
        for n in 0..MAX_OPEN_CHUNKS as i64 {
            let request = s.next_chunk().unwrap();
            let after = (n > 0).then(|| vec![Some((2 * n).to_string())]);
            assert_eq!(request.after, after, "each chunk starts after the newest open one");
            s.open(&request, chunk(vec![row(2 * n + 1, "x"), row(2 * n + 2, "y")]), Instant::now(), n as u64).unwrap();
        }
        assert!(s.next_chunk().is_none(), "at most {MAX_OPEN_CHUNKS} chunks open");
        // A change of key 3 reaches every open window: it drops the row from the second chunk.
        s.observe(&change(Op::Update, &schema("orders"), Some(row(3, "x")), Some(row(3, "X"))));
        assert_eq!(s.oldest_high(), Some(&0));
        assert_eq!(emitted(&mut s, &metrics).0, vec![1, 2]);
        assert_eq!(s.oldest_high(), Some(&1));
        assert_eq!(emitted(&mut s, &metrics).0, vec![4]);
        assert_eq!(s.checkpoint().unwrap().snapshots[0].after, Some(vec![Some("4".into())]));
        let request = s.next_chunk().unwrap();
        assert_eq!(request.after, Some(vec![Some("8".into())]));
        s.open(&request, chunk(vec![]), Instant::now(), 9).unwrap();
        assert!(s.next_chunk().is_none(), "nothing after the last chunk");
        emitted(&mut s, &metrics);
        emitted(&mut s, &metrics);
        assert_eq!(emitted(&mut s, &metrics), (vec![], Some(Closed::Done { rows: 0, dropped: 0 })));
        assert!(!s.window_open());
    }

    #[test]
    fn a_truncate_in_the_window_reads_the_chunk_again() {
        let metrics = Metrics::new("t");
        let mut s = IncrementalSnapshots::<u64>::new(IncrementalControl::new(), None, 2);
        s.add("public.orders".into(), None, -1);
        let request = s.next_chunk().unwrap();
        s.open(&request, chunk(vec![row(1, "a"), row(2, "b")]), Instant::now(), 0).unwrap();
        s.observe(&change(Op::Truncate, &schema("orders"), None, None));
        assert!(!s.window_open());
        assert_eq!(emitted(&mut s, &metrics).1, None);
        assert_eq!(s.next_chunk().unwrap(), request, "the same chunk again");
    }

    #[test]
    fn pause_resume_cancel_and_the_queue() {
        let mut s = IncrementalSnapshots::<u64>::new(IncrementalControl::new(), None, 2);
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
        let restored = IncrementalSnapshots::<u64>::new(IncrementalControl::new(), s.checkpoint().as_ref(), 2);
        assert_eq!(restored.next_chunk().unwrap().filter, Some("id > 5".into()));
        assert_eq!(restored.checkpoint().unwrap().next_id, b + 1);
    }

    #[test]
    fn a_stream_schema_without_the_key_column_drops_the_chunk() {
        let mut s = IncrementalSnapshots::<u64>::new(IncrementalControl::new(), None, 2);
        s.add("public.orders".into(), None, -1);
        let request = s.next_chunk().unwrap();
        s.open(&request, chunk(vec![row(1, "a")]), Instant::now(), 0).unwrap();
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
        let mut s = IncrementalSnapshots::<u64>::new(IncrementalControl::new(), None, 2);
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
        let restored = IncrementalSnapshots::<u64>::new(IncrementalControl::new(), s.checkpoint().as_ref(), 2);
        assert!(!restored.rules_changed(&wider));
        assert_eq!(restored.newly_included(&rules(&[".*"]), tables()), vec!["other.d".to_owned()]);
    }

    #[tokio::test]
    async fn commands_run_and_a_start_waits_for_the_engine() {
        let control = IncrementalControl::new();
        let mut s = IncrementalSnapshots::<u64>::new(control.clone(), None, 2);
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
