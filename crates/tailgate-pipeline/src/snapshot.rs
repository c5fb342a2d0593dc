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

use tailgate_core::{ChangeEvent, Event, Position};
use tokio::sync::mpsc;

use crate::source::{Batch, Item};

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
}

impl<'a> SnapshotEmitter<'a> {
    /// `first`: whether the next event is the snapshot's very first (false when resuming one).
    pub fn new(output: &'a mpsc::Sender<Batch>, first: bool) -> Self {
        SnapshotEmitter { output, batch: Vec::new(), held_from: 0, capacity: 0, first_pending: first }
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
    }

    /// Sends what is certain not to be the last event. Returns false when the pipeline is gone.
    pub async fn flush(&mut self) -> bool {
        if self.held_from == 0 {
            return true;
        }
        self.capacity = self.capacity.max(self.batch.len());
        let mut next = Vec::with_capacity(self.capacity);
        next.extend(self.batch.drain(self.held_from..));
        self.held_from = 0;
        let batch = std::mem::replace(&mut self.batch, next);
        self.output.send(batch).await.is_ok()
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
        use tailgate_core::{ColumnSchema, Op, PgSource, SourceInfo, TableId, TableSchema, Value};
        ChangeEvent {
            op: Op::Read,
            table: Arc::new(TableSchema {
                id: TableId { schema: "public".into(), table: "t".into() },
                columns: vec![ColumnSchema { name: "id".into(), key: true }],
            }),
            before: None,
            after: Some(vec![Value::Int(id)]),
            source: SourceInfo::Postgres(PgSource {
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
        emitter.marker(Position::Postgres { lsn: tailgate_core::Lsn(1) });
        emitter.event(read(1));
        emitter.event(read(2));
        emitter.marker(Position::Postgres { lsn: tailgate_core::Lsn(2) });
        assert!(emitter.flush().await);
        assert_eq!(shape(&rx.recv().await.unwrap()), ["C", "Int(1):first"], "event 2 and its marker wait");
        assert!(emitter.flush().await);
        assert!(rx.try_recv().is_err(), "nothing sendable: no batch");
        emitter.event(read(3));
        assert!(emitter.flush().await);
        assert_eq!(shape(&rx.recv().await.unwrap()), ["Int(2):true", "C"]);
        assert!(emitter.finish(Position::Postgres { lsn: tailgate_core::Lsn(3) }).await);
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
        assert!(emitter.finish(Position::Postgres { lsn: tailgate_core::Lsn(3) }).await);
        assert_eq!(shape(&rx.recv().await.unwrap()), ["C"], "nothing left to mark last");
        drop(rx);
        emitter.event(read(4));
        assert!(!emitter.release().await, "the pipeline is gone");
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
