//! What every source's initial snapshot shares: how its events and progress markers reach the
//! pipeline.
//!
//! Debezium marks the first snapshot record `"first"`, the others `"true"`, and the very last one
//! `"last"`. The last one is only known once the final table ends, so the [`SnapshotEmitter`] holds
//! back the newest event (and the markers after it) until either another event follows or the
//! snapshot finishes.

use tailgate_core::{ChangeEvent, Event, Position};
use tokio::sync::mpsc;

use crate::source::{Batch, Item};

pub struct SnapshotEmitter<'a> {
    output: &'a mpsc::Sender<Batch>,
    batch: Batch,
    held: Batch,
    first_pending: bool,
}

impl<'a> SnapshotEmitter<'a> {
    /// `first`: whether the next event is the snapshot's very first (false when resuming one).
    pub fn new(output: &'a mpsc::Sender<Batch>, first: bool) -> Self {
        SnapshotEmitter { output, batch: Vec::new(), held: Vec::new(), first_pending: first }
    }

    pub fn event(&mut self, mut event: ChangeEvent) {
        if self.first_pending {
            event.source.set_snapshot("first");
            self.first_pending = false;
        }
        self.batch.append(&mut self.held);
        self.held.push(Item::Event(Event::Change(event)));
    }

    /// A progress marker: everything emitted before it is checkpointed at `position`.
    pub fn marker(&mut self, position: Position) {
        self.held.push(Item::Commit(position));
    }

    /// Sends what is certain not to be the last event. Returns false when the pipeline is gone.
    pub async fn flush(&mut self) -> bool {
        if self.batch.is_empty() {
            return true;
        }
        let batch = std::mem::take(&mut self.batch);
        self.output.send(batch).await.is_ok()
    }

    /// Sends everything, the held event included, without marking it `last`: the snapshot stops
    /// early (an error) and will be resumed, so the source's progress must match what was sent.
    pub async fn release(&mut self) -> bool {
        self.batch.append(&mut self.held);
        self.flush().await
    }

    /// Marks the held event `last`, then sends everything and `end`, where streaming starts.
    pub async fn finish(&mut self, end: Position) -> bool {
        if let Some(Item::Event(Event::Change(e))) = self.held.first_mut() {
            e.source.set_snapshot("last");
        }
        self.batch.append(&mut self.held);
        self.batch.push(Item::Commit(end));
        self.flush().await
    }
}
