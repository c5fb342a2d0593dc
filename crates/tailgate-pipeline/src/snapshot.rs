//! What every source's initial snapshot shares: how its events and progress markers reach the
//! pipeline.
//!
//! Debezium marks the first snapshot record `"first"`, the others `"true"`, and the very last one
//! `"last"`. The last one is only known once the final table ends, so the [`SnapshotEmitter`] holds
//! back the newest event (and the markers after it) until either another event follows or the
//! snapshot finishes.

use std::sync::Mutex;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::{Duration, Instant};

use tailgate_core::{ChangeEvent, Event, Position};
use tokio::sync::mpsc;
use tracing::info;

use crate::metrics::Metrics;
use crate::source::{Batch, Item, MAX_BATCH_BYTES};

pub struct SnapshotEmitter<'a> {
    output: &'a mpsc::Sender<Batch>,
    /// Everything not yet sent. Items from `held_from` on (the newest event and the markers after
    /// it) are held back; one vector for both, so that an event is moved once, not twice.
    batch: Batch,
    held_from: usize,
    /// The largest batch sent so far: the next one is allocated at that size up front. Growing a
    /// fresh multi-megabyte vector by doubling faulted in new pages for every page of rows.
    capacity: usize,
    first_pending: bool,
    /// Where the batch ends after its last progress marker (see [`SnapshotEmitter::abandon`]).
    marked_until: usize,
}

impl<'a> SnapshotEmitter<'a> {
    /// `first`: whether the next event is the snapshot's very first (false when resuming one).
    pub fn new(output: &'a mpsc::Sender<Batch>, first: bool) -> Self {
        SnapshotEmitter { output, batch: Vec::new(), held_from: 0, capacity: 0, first_pending: first, marked_until: 0 }
    }

    pub fn event(&mut self, mut event: ChangeEvent) {
        if self.first_pending {
            event.source.set_snapshot("first");
            self.first_pending = false;
        }
        self.held_from = self.batch.len();
        self.batch.push(Item::Event(Event::Change(event)));
    }

    /// A progress marker: everything emitted before it is checkpointed at `position`.
    pub fn marker(&mut self, position: Position) {
        self.batch.push(Item::Commit(position));
        self.marked_until = self.batch.len();
    }

    /// Sends what is certain not to be the last event. Returns false when the pipeline is gone.
    pub async fn flush(&mut self) -> bool {
        if self.held_from == 0 {
            return true;
        }
        self.capacity = self.capacity.max(self.batch.len());
        let mut next = Vec::with_capacity(self.capacity);
        next.extend(self.batch.drain(self.held_from..));
        self.marked_until = self.marked_until.saturating_sub(self.held_from);
        self.held_from = 0;
        let batch = std::mem::replace(&mut self.batch, next);
        self.output.send(batch).await.is_ok()
    }

    /// The read failed: drops the events after the last progress marker (never sent: the progress
    /// does not cover them, and the retry reads them again), then sends the rest, so that what the
    /// pipeline got ends exactly where the progress says. Returns false when the pipeline is gone.
    pub async fn abandon(&mut self) -> bool {
        self.batch.truncate(self.marked_until);
        self.held_from = self.held_from.min(self.batch.len());
        self.release().await
    }

    /// Sends everything, the held event included, without marking it `last`: the snapshot stops
    /// early (an error) and will be resumed, so the source's progress must match what was sent.
    pub async fn release(&mut self) -> bool {
        self.held_from = self.batch.len();
        self.flush().await
    }

    /// Marks the held event `last`, then sends everything and `end`, where streaming starts.
    pub async fn finish(&mut self, end: Position) -> bool {
        if let Some(Item::Event(Event::Change(e))) = self.batch.get_mut(self.held_from) {
            e.source.set_snapshot("last");
        }
        self.batch.push(Item::Commit(end));
        self.release().await
    }
}

/// What a source does after emitting a row of a table's snapshot ([`TablePages::row`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterRow {
    /// Read on.
    Continue,
    /// Send what was emitted (wide rows reached [`MAX_BATCH_BYTES`]); a lone reader with a key
    /// marks its progress first, as at a page end.
    Send,
    /// The row ended a page: add its progress marker (a lone reader with a key), then send.
    PageEnd,
}

/// The page bookkeeping of one table's read, the same for every source: rows per page
/// (`snapshot_fetch_rows`), bytes since the last send, the rows metrics, and a progress line in the
/// log every few seconds.
pub struct TablePages<'a> {
    metrics: &'a Metrics,
    table: &'a str,
    estimate: i64,
    fetch_rows: usize,
    page: usize,
    unsent_bytes: usize,
    rows: u64,
    started: Instant,
    last_log: Instant,
}

impl<'a> TablePages<'a> {
    pub fn new(metrics: &'a Metrics, table: &'a str, estimate: i64, fetch_rows: usize) -> Self {
        let now = Instant::now();
        TablePages {
            metrics,
            table,
            estimate: estimate.max(0),
            fetch_rows: fetch_rows.max(1),
            page: 0,
            unsent_bytes: 0,
            rows: 0,
            started: now,
            last_log: now,
        }
    }

    /// Whether the next row ends a page: its key is then where a resumed read starts.
    pub fn next_ends_page(&self) -> bool {
        self.page + 1 >= self.fetch_rows
    }

    /// Whether the next row, of `bytes`, is followed by a send ([`AfterRow::Send`] or
    /// [`AfterRow::PageEnd`]): a lone reader with a key marks its progress there, so that what is
    /// sent is always covered by a marker.
    pub fn next_sends(&self, bytes: usize) -> bool {
        self.next_ends_page() || self.unsent_bytes + bytes >= MAX_BATCH_BYTES
    }

    /// Counts an emitted row that took `bytes` bytes of the server's output.
    pub fn row(&mut self, bytes: usize) -> AfterRow {
        self.page += 1;
        self.unsent_bytes += bytes;
        if self.page >= self.fetch_rows {
            self.count_page();
            self.log_progress();
            AfterRow::PageEnd
        } else if self.unsent_bytes >= MAX_BATCH_BYTES {
            self.unsent_bytes = 0;
            AfterRow::Send
        } else {
            AfterRow::Continue
        }
    }

    /// Counts the last, partial page; returns the rows the table had.
    pub fn finish(mut self) -> u64 {
        self.count_page();
        self.rows
    }

    fn count_page(&mut self) {
        self.rows += self.page as u64;
        self.metrics.snapshot_rows.fetch_add(self.page as u64, Relaxed);
        self.metrics.snapshot_rows_remaining.fetch_sub(self.page as i64, Relaxed);
        self.page = 0;
        self.unsent_bytes = 0;
    }

    fn log_progress(&mut self) {
        if self.last_log.elapsed() < Duration::from_secs(5) {
            return;
        }
        self.last_log = Instant::now();
        let rate = self.rows as f64 / self.started.elapsed().as_secs_f64().max(0.001);
        let left = (self.estimate - self.rows as i64).max(0);
        info!(
            table = %self.table,
            rows = self.rows,
            estimated = self.estimate,
            rows_per_s = rate as u64,
            eta_s = (left as f64 / rate.max(1.0)) as u64,
            "snapshot progress"
        );
    }
}

/// The bookkeeping parallel snapshot readers share: which tables are left, how many readers still
/// read, the progress, the rows read. Readers run as futures of one task (`try_join_all`), so a
/// check and the update it decides are never split by another reader; atomics and a mutex only
/// because a source's future must be `Send`.
///
/// The contract that keeps markers honest: a table is recorded in the progress only after all its
/// events were sent ([`SnapshotEmitter::release`]), so a marker from any reader never covers rows
/// that another still holds. The reader that ends the last table while it is the only one left
/// keeps its last event back, for the snapshot's end to mark `last`.
pub struct ParallelReaders<T, P> {
    pending: Vec<T>,
    next: AtomicUsize,
    active: AtomicUsize,
    pub progress: Mutex<P>,
    rows: AtomicU64,
}

/// What a reader does after a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterTable {
    /// It ended the snapshot's last table: keep the held event, hand the emitter back.
    EndSnapshot,
    /// Release, record the table, take the next one.
    Continue,
    /// Release, record the table, and stop: no table is left for this reader.
    Leave,
}

/// How a reader ended.
pub enum ReaderEnd<'a> {
    /// Ended the snapshot's last table; its held event is the snapshot's last.
    Last(SnapshotEmitter<'a>),
    Done,
    /// Stopped early, or the pipeline went away.
    Stopped,
}

impl<'a> ReaderEnd<'a> {
    /// A reader with nothing left to read: sends what it holds.
    pub async fn released(mut emitter: SnapshotEmitter<'a>) -> ReaderEnd<'a> {
        if emitter.release().await { ReaderEnd::Done } else { ReaderEnd::Stopped }
    }
}

impl<T: Copy, P> ParallelReaders<T, P> {
    pub fn new(pending: Vec<T>, readers: usize, progress: P) -> Self {
        ParallelReaders {
            pending,
            next: AtomicUsize::new(0),
            active: AtomicUsize::new(readers),
            progress: Mutex::new(progress),
            rows: AtomicU64::new(0),
        }
    }

    /// The next table to read; `None` when none is left (and this reader counts as gone).
    pub fn take(&self) -> Option<T> {
        let i = self.next.load(Relaxed);
        match self.pending.get(i) {
            Some(table) => {
                self.next.store(i + 1, Relaxed);
                Some(*table)
            }
            None => {
                self.active.fetch_sub(1, Relaxed);
                None
            }
        }
    }

    /// A reader finished a table of `rows` rows: what it does next.
    pub fn table_done(&self, rows: u64) -> AfterTable {
        self.rows.fetch_add(rows, Relaxed);
        if self.next.load(Relaxed) < self.pending.len() {
            AfterTable::Continue
        } else if self.active.load(Relaxed) == 1 {
            AfterTable::EndSnapshot
        } else {
            self.active.fetch_sub(1, Relaxed);
            AfterTable::Leave
        }
    }

    /// What a reader does once it has emitted a whole table of `rows` rows: the contract above,
    /// in one place. `record` notes the table as done in the progress and returns the marker for
    /// it. `Ok` hands the emitter back for the next table; `Err` is how the reader ends.
    pub async fn after_table<'a>(
        &self,
        mut emitter: SnapshotEmitter<'a>,
        rows: u64,
        record: impl FnOnce(&mut P) -> Position,
    ) -> Result<SnapshotEmitter<'a>, ReaderEnd<'a>> {
        let next = self.table_done(rows);
        if next == AfterTable::EndSnapshot {
            return Err(ReaderEnd::Last(emitter));
        }
        if !emitter.release().await {
            return Err(ReaderEnd::Stopped);
        }
        emitter.marker(self.with_progress(record));
        if next == AfterTable::Leave {
            return Err(ReaderEnd::released(emitter).await);
        }
        Ok(emitter)
    }

    /// Runs `f` on the progress (never across an await).
    pub fn with_progress<R>(&self, f: impl FnOnce(&mut P) -> R) -> R {
        f(&mut self.progress.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn rows(&self) -> u64 {
        self.rows.load(Relaxed)
    }

    pub fn into_progress(self) -> P {
        self.progress.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(id: i64) -> ChangeEvent {
        use std::sync::Arc;
        use tailgate_core::{ColumnSchema, Op, PgSourceBlock, SourceInfo, TableId, TableSchema, Value};
        ChangeEvent {
            op: Op::Read,
            table: Arc::new(TableSchema {
                id: TableId { schema: "public".into(), table: "t".into() },
                columns: vec![ColumnSchema { name: "id".into(), key: true }],
            }),
            before: None,
            after: Some(vec![Value::Int(id)]),
            source: SourceInfo::Postgres(PgSourceBlock {
                name: "n".into(),
                db: "d".into(),
                commit_ts_us: 0,
                txid: 0,
                lsn: 0,
                last_commit_lsn: None,
                snapshot: "true",
            }),
        }
    }

    /// What a batch holds: `id:mark` per event, `C` per marker.
    fn shape(batch: &Batch) -> Vec<String> {
        batch
            .iter()
            .map(|item| match item {
                Item::Event(Event::Change(e)) => {
                    let tailgate_core::SourceInfo::Postgres(pg) = &e.source else { unreachable!() };
                    format!("{:?}:{}", e.after.as_ref().unwrap()[0], pg.snapshot)
                }
                Item::Event(_) => "message".into(),
                Item::Commit(_) => "C".into(),
            })
            .collect()
    }

    #[tokio::test]
    async fn the_newest_event_is_held_back_until_the_end_marks_it_last() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut emitter = SnapshotEmitter::new(&tx, true);
        emitter.marker(Position::postgres(tailgate_core::Lsn(1)));
        emitter.event(read(1));
        emitter.event(read(2));
        emitter.marker(Position::postgres(tailgate_core::Lsn(2)));
        assert!(emitter.flush().await);
        assert_eq!(shape(&rx.recv().await.unwrap()), ["C", "Int(1):first"], "event 2 and its marker wait");
        assert!(emitter.flush().await);
        assert!(rx.try_recv().is_err(), "nothing sendable: no batch");
        emitter.event(read(3));
        assert!(emitter.flush().await);
        assert_eq!(shape(&rx.recv().await.unwrap()), ["Int(2):true", "C"]);
        assert!(emitter.finish(Position::postgres(tailgate_core::Lsn(3))).await);
        assert_eq!(shape(&rx.recv().await.unwrap()), ["Int(3):last", "C"]);
    }

    #[tokio::test]
    async fn release_sends_the_held_event_unmarked() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut emitter = SnapshotEmitter::new(&tx, false);
        emitter.event(read(1));
        emitter.event(read(2));
        assert!(emitter.release().await);
        assert_eq!(shape(&rx.recv().await.unwrap()), ["Int(1):true", "Int(2):true"]);
        assert!(emitter.finish(Position::postgres(tailgate_core::Lsn(3))).await);
        assert_eq!(shape(&rx.recv().await.unwrap()), ["C"], "nothing left to mark last");
        drop(rx);
        emitter.event(read(4));
        assert!(!emitter.release().await, "the pipeline is gone");
    }

    /// A failed read sends exactly up to its last marker: the rows after it were never sent and are
    /// read again by the retry (sending them would make the retry repeat them).
    #[tokio::test]
    async fn abandon_drops_what_follows_the_last_marker() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut emitter = SnapshotEmitter::new(&tx, false);
        emitter.event(read(1));
        emitter.marker(Position::postgres(tailgate_core::Lsn(1)));
        emitter.event(read(2));
        assert!(emitter.flush().await);
        assert_eq!(shape(&rx.recv().await.unwrap()), ["Int(1):true", "C"]);
        emitter.event(read(3));
        emitter.marker(Position::postgres(tailgate_core::Lsn(3)));
        emitter.event(read(4));
        emitter.event(read(5));
        assert!(emitter.abandon().await);
        assert_eq!(shape(&rx.recv().await.unwrap()), ["Int(2):true", "Int(3):true", "C"]);
        assert!(rx.try_recv().is_err(), "rows 4 and 5 are read again by the retry");
    }

    #[test]
    fn table_pages_end_pages_by_rows_send_wide_rows_by_bytes_and_count_every_row() {
        let metrics = Metrics::new("t");
        metrics.snapshot_rows_remaining.store(10, Relaxed);
        let mut pages = TablePages::new(&metrics, "public.t", 10, 3);
        assert!(!pages.next_ends_page());
        assert_eq!(pages.row(10), AfterRow::Continue);
        assert_eq!(pages.row(MAX_BATCH_BYTES), AfterRow::Send, "a wide row is sent before the page ends");
        assert!(pages.next_ends_page());
        assert_eq!(pages.row(10), AfterRow::PageEnd);
        assert_eq!(metrics.snapshot_rows.load(Relaxed), 3, "counted per page");
        assert_eq!(pages.row(10), AfterRow::Continue, "the byte count starts over with the page");
        assert_eq!(pages.finish(), 4, "the partial last page counts");
        assert_eq!((metrics.snapshot_rows.load(Relaxed), metrics.snapshot_rows_remaining.load(Relaxed)), (4, 6));
    }

    #[test]
    fn the_reader_ending_the_last_table_alone_ends_the_snapshot() {
        let readers = ParallelReaders::new(vec!["a", "b", "c"], 2, ());
        assert_eq!((readers.take(), readers.take()), (Some("a"), Some("b")));
        // Reader 1 ends a while b is read: c is left for it.
        assert_eq!(readers.table_done(10), AfterTable::Continue);
        assert_eq!(readers.take(), Some("c"));
        // Reader 2 ends b: nothing left, reader 1 still reads: reader 2 leaves.
        assert_eq!(readers.table_done(20), AfterTable::Leave);
        // Reader 1 ends c alone: its last event is the snapshot's last.
        assert_eq!(readers.table_done(30), AfterTable::EndSnapshot);
        assert_eq!(readers.rows(), 60);
    }

    #[test]
    fn a_reader_finding_nothing_left_leaves() {
        let readers = ParallelReaders::new(vec!["a"], 2, ());
        assert_eq!(readers.take(), Some("a"));
        assert_eq!(readers.take(), None, "the second reader finds nothing");
        assert_eq!(readers.table_done(1), AfterTable::EndSnapshot, "the first is then alone");
    }
}
