//! Streaming plumbing every log source shares: the batch being filled, when it is handed over, the
//! exactly-once rule for reconnects within one run, and the reconnect loop with its backoff.
//!
//! A log source (PostgreSQL's walsender, MySQL's binlog dump) decodes its protocol and tells the
//! [`StreamBatcher`] what it found: a transaction begins, an event, a commit, a progress marker
//! between transactions. The batcher owns everything that must survive a lost connection:
//!
//! - **The batch.** Events and commit markers wait here until they are handed over. A dropped
//!   connection never drops them: what was decoded stays decoded, and the source resumes after the
//!   last commit it pushed (its [`StreamBatcher::resume_point`]), so a commit is never both skipped by
//!   the restart and missing from the pipeline.
//! - **The replay count.** A connection lost inside a transaction makes the server send that
//!   transaction again from its start. The log units of it already handled are counted, and as many
//!   are dropped from the replay ([`StreamBatcher::admit`]): within one run, a reconnect adds no
//!   duplicate and no key goes back in time. A unit is one change message of the log (a pgoutput
//!   Insert/Update/Delete/Truncate/Message, a binlog Rows event or TRUNCATE statement), counted
//!   whether or not it yields events: what a unit yields may change with a reload between the cut
//!   and the replay, the units themselves never do. The count belongs to the cut transaction's
//!   identity: if the server sends another transaction first (a failover to a server that never
//!   had the cut one), the count is dropped, not applied to the wrong transaction.
//!
//! Hand-over rules: a batch goes to the pipeline when it holds `batch_size` items or
//! [`MAX_BATCH_BYTES`] of log data, or when the socket has nothing more buffered; a small batch first
//! waits up to [`COALESCE_WINDOW`] at a time, [`COALESCE_MAX`] in all, for more data, so a server
//! that sends one message at a time costs one wake-up per batch rather than per event.

use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tailgate_core::{Event, Position};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::source::{Batch, Item, MAX_BATCH_BYTES, SourceContext};

/// Batches smaller than this wait up to [`COALESCE_WINDOW`] for more data before they are handed over.
pub const COALESCE_BELOW: usize = 256;
/// One wait for more data while coalescing a small batch.
pub const COALESCE_WINDOW: Duration = Duration::from_millis(1);
/// The longest a small batch waits in all.
pub const COALESCE_MAX: Duration = Duration::from_millis(5);

/// The batch a log source fills, and the bookkeeping that makes reconnects exact. See the module doc.
#[derive(Debug)]
pub struct StreamBatcher {
    batch: Batch,
    /// Bytes of log data behind `batch` (see [`MAX_BATCH_BYTES`]).
    bytes: usize,
    batch_size: usize,
    coalescing_since: Option<Instant>,
    in_transaction: bool,
    /// Log units of the open transaction seen on the current connection (handled or dropped).
    seen: u64,
    /// Log units of the open transaction handled in this run, over every connection.
    pushed: u64,
    /// The identity of the transaction `pushed` belongs to (see [`StreamBatcher::begin`]).
    transaction: u64,
    /// The last commit or marker pushed: where a new connection starts.
    resume_point: Option<Position>,
}

/// How [`StreamBatcher::hand_over`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOver {
    /// The batch is in the channel.
    Sent,
    /// The caller's timer fired while the channel was full: keep the connection alive, then call
    /// again (the batch is still here).
    Tick,
    /// The pipeline is gone: stop.
    Closed,
}

impl StreamBatcher {
    /// `resume_point`: the stored checkpoint, where the first connection starts.
    pub fn new(batch_size: usize, resume_point: Option<Position>) -> Self {
        let batch_size = batch_size.max(1);
        StreamBatcher {
            batch: Vec::with_capacity(batch_size),
            bytes: 0,
            batch_size,
            coalescing_since: None,
            in_transaction: false,
            seen: 0,
            pushed: 0,
            transaction: 0,
            resume_point,
        }
    }

    /// Where a (re)connection must start: after the last commit pushed in this run, else the stored
    /// checkpoint. Everything before it is in the pipeline or delivered; nothing after it is.
    pub fn resume_point(&self) -> Option<&Position> {
        self.resume_point.as_ref()
    }

    /// Replaces the resume point without pushing a marker (a new slot or snapshot starts a new history).
    pub fn set_resume_point(&mut self, position: Option<Position>) {
        self.resume_point = position;
    }

    /// A transaction begins (or begins again after a reconnect). `id` identifies it on every
    /// connection (PostgreSQL: its commit LSN; MySQL: its GTID, else where it starts in the binlog).
    pub fn begin(&mut self, id: u64) {
        if self.pushed > 0 && self.transaction != id {
            // Not the transaction that was cut (a failover to a server that never had it): what was
            // handed over of the cut one stays delivered, and nothing of this one is dropped.
            info!(units = self.pushed, "the transaction cut by the lost connection did not come again");
            self.pushed = 0;
        }
        self.transaction = id;
        self.in_transaction = true;
        self.seen = 0;
    }

    /// Inside a transaction, or between a cut transaction and its replay: no progress marker may
    /// be placed, and no clean stop may happen, before the transaction completes.
    pub fn in_transaction(&self) -> bool {
        self.in_transaction || self.pushed > 0
    }

    /// Whether the next log unit of the open transaction is new (`false`: it was handled before the
    /// connection was lost and the server sends it again; drop it). Call once per unit, before
    /// decoding it where that saves work, then [`StreamBatcher::push`] whatever it yields.
    #[must_use]
    pub fn admit(&mut self) -> bool {
        self.seen += 1;
        if self.seen > self.pushed {
            self.pushed = self.seen;
            true
        } else {
            false
        }
    }

    /// Pushes an event of a unit that [`StreamBatcher::admit`] admitted, or one outside any
    /// transaction (PostgreSQL's non-transactional messages: the source de-duplicates those).
    pub fn push(&mut self, event: Event) {
        self.batch.push(Item::Event(event));
    }

    /// Admits a unit that yields one event, and pushes it.
    pub fn emit(&mut self, event: Event) {
        if self.admit() {
            self.push(event);
        }
    }

    /// A new history starts (a new slot or snapshot): no transaction of the old one will come again.
    pub fn forget_cut_transaction(&mut self) {
        self.pushed = 0;
        self.seen = 0;
        self.in_transaction = false;
    }

    /// Ends the open transaction: its events are complete, and a restart may start at `position`.
    pub fn commit(&mut self, position: Position) {
        self.in_transaction = false;
        self.seen = 0;
        self.pushed = 0;
        self.marker(position);
    }

    /// Progress between transactions (an idle server's keepalive, a binlog rotation): everything
    /// committed before `position` has been pushed.
    pub fn marker(&mut self, position: Position) {
        self.batch.push(Item::Commit(position.clone()));
        self.resume_point = Some(position);
    }

    /// The connection is gone. The open transaction, if any, comes again whole on the next
    /// connection; what of it was pushed stays pushed, and as much is dropped from the replay.
    pub fn disconnected(&mut self) {
        self.in_transaction = false;
        self.seen = 0;
        self.coalescing_since = None;
    }

    /// Counts log bytes behind the batch.
    pub fn add_bytes(&mut self, bytes: usize) {
        self.bytes += bytes;
    }

    /// Takes what the batch holds (for decoders driven without a pipeline: tests, tools).
    pub fn take_batch(&mut self) -> Batch {
        self.bytes = 0;
        std::mem::take(&mut self.batch)
    }

    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    pub fn len(&self) -> usize {
        self.batch.len()
    }

    /// Whether the batch must be handed over before reading on. Never for an empty batch: log data
    /// that yielded nothing (other databases' transactions, a large event of an excluded table) has
    /// nothing to hand over, and a caller looping until the batch is not full would spin.
    pub fn is_full(&self) -> bool {
        !self.batch.is_empty() && (self.batch.len() >= self.batch_size || self.bytes >= MAX_BATCH_BYTES)
    }

    /// The socket ran dry: whether to wait [`COALESCE_WINDOW`] for more data before handing a small
    /// batch over. After [`COALESCE_MAX`] in all, or for a batch that is empty or large, `false`.
    pub fn wait_for_more(&mut self) -> bool {
        if self.batch.is_empty() || self.batch.len() >= COALESCE_BELOW {
            self.coalescing_since = None;
            return false;
        }
        let since = *self.coalescing_since.get_or_insert_with(Instant::now);
        since.elapsed() < COALESCE_MAX
    }

    /// Hands the batch over, waiting while the channel is full. `tick` fires while waiting so that
    /// the caller can keep its connection alive (PostgreSQL's status updates): the batch stays here
    /// and the caller calls again.
    pub async fn hand_over(
        &mut self,
        output: &mpsc::Sender<Batch>,
        tick: Option<&mut tokio::time::Interval>,
    ) -> HandOver {
        self.coalescing_since = None;
        if self.batch.is_empty() {
            self.bytes = 0;
            return HandOver::Sent;
        }
        let permit = match tick {
            Some(tick) => tokio::select! {
                permit = output.reserve() => permit,
                _ = tick.tick() => return HandOver::Tick,
            },
            None => output.reserve().await,
        };
        let Ok(permit) = permit else { return HandOver::Closed };
        permit.send(std::mem::replace(&mut self.batch, Vec::with_capacity(self.batch_size)));
        self.bytes = 0;
        HandOver::Sent
    }
}

/// One connection's worth of streaming, as the reconnect loop drives it.
pub trait Reconnecting: Send {
    type Error: std::error::Error + Send + Sync + 'static;

    /// The engine's name for log lines ("PostgreSQL", "MySQL").
    fn engine(&self) -> &'static str;

    /// Connects and streams until the source is done (`Ok`) or the connection fails.
    fn session(&mut self, ctx: &mut SourceContext) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Whether `error` is worth another connection: transient, and the source has streamed (or
    /// snapshotted) at least once in this run. At start-up errors are reported at once: the operator
    /// is watching.
    fn retry(&self, error: &Self::Error) -> bool;

    /// Whether the last session delivered anything (then the backoff starts over).
    fn made_progress(&self) -> bool;

    /// The connection is gone (see [`StreamBatcher::disconnected`]).
    fn disconnected(&mut self);
}

/// Runs sessions until one ends the source, retrying transient failures with exponential backoff
/// (0.5 s to 30 s, back to 0.5 s after a session that made progress).
pub async fn run_reconnecting<R: Reconnecting>(source: &mut R, ctx: &mut SourceContext) -> Result<(), R::Error> {
    let mut backoff = Duration::from_millis(500);
    loop {
        let error = match source.session(ctx).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        source.disconnected();
        if !source.retry(&error) || ctx.shutdown.is_cancelled() {
            return Err(error);
        }
        if source.made_progress() {
            backoff = Duration::from_millis(500);
        }
        ctx.metrics.source_connected.store(false, Relaxed);
        ctx.metrics.reconnects.fetch_add(1, Relaxed);
        ctx.metrics.error("source_transient");
        warn!(error = %error, retry_in = ?backoff, "{} connection failed; reconnecting", source.engine());
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = ctx.shutdown.cancelled() => return Ok(()),
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tailgate_core::{ChangeEvent, ColumnSchema, Lsn, Op, PgSourceBlock, SourceInfo, TableId, TableSchema, Value};

    use super::*;

    fn insert(id: i64) -> Event {
        Event::Change(ChangeEvent {
            op: Op::Create,
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
                snapshot: "false",
            }),
        })
    }

    fn commit(n: u64) -> Position {
        Position::postgres(Lsn(n))
    }

    /// Reads the stream as `id` per event and `C<n>` per commit.
    fn shape(batch: &Batch) -> Vec<String> {
        batch
            .iter()
            .map(|item| match item {
                Item::Event(Event::Change(e)) => format!("{:?}", e.after.as_ref().unwrap()[0]),
                Item::Event(_) => "message".into(),
                Item::Commit(p) => format!("C{}", p.lsn().map_or(0, |l| l.0)),
            })
            .collect()
    }

    /// Plays transaction `txn` of `ids` as a server would send it (one event per log unit).
    fn transaction(b: &mut StreamBatcher, txn: u64, ids: &[i64], end: Option<u64>) {
        b.begin(txn);
        for &id in ids {
            b.emit(insert(id));
        }
        if let Some(end) = end {
            b.commit(commit(end));
        }
    }

    async fn drain(b: &mut StreamBatcher) -> Vec<String> {
        let (tx, mut rx) = mpsc::channel(1);
        assert_eq!(b.hand_over(&tx, None).await, HandOver::Sent);
        drop(tx);
        let mut out = Vec::new();
        while let Some(batch) = rx.recv().await {
            out.extend(shape(&batch));
        }
        out
    }

    #[tokio::test]
    async fn a_lost_connection_keeps_what_was_decoded_and_resumes_after_the_last_commit() {
        let mut b = StreamBatcher::new(100, None);
        transaction(&mut b, 1, &[1, 2], Some(10));
        transaction(&mut b, 2, &[3], None);
        // The connection drops inside the second transaction: nothing pushed is lost.
        b.disconnected();
        assert_eq!(b.resume_point(), Some(&commit(10)), "the new connection starts after the last commit");
        // The server sends the second transaction again, whole, then more.
        transaction(&mut b, 2, &[3, 4], Some(20));
        transaction(&mut b, 3, &[5], Some(30));
        assert_eq!(drain(&mut b).await, ["Int(1)", "Int(2)", "C10", "Int(3)", "Int(4)", "C20", "Int(5)", "C30"]);
    }

    #[tokio::test]
    async fn a_replay_cut_again_still_drops_exactly_what_was_pushed() {
        let mut b = StreamBatcher::new(100, None);
        transaction(&mut b, 1, &[1, 2, 3], None);
        b.disconnected();
        // Cut again after two of the three pushed events came back.
        transaction(&mut b, 1, &[1, 2], None);
        b.disconnected();
        transaction(&mut b, 1, &[1, 2, 3, 4, 5], Some(9));
        // A later transaction is not affected by the replay count.
        transaction(&mut b, 2, &[6], Some(12));
        assert_eq!(drain(&mut b).await, ["Int(1)", "Int(2)", "Int(3)", "Int(4)", "Int(5)", "C9", "Int(6)", "C12"]);
    }

    /// The server sends another transaction than the cut one (a failover to a server that never had
    /// it): nothing of the new one is dropped; until then no marker may follow the cut part.
    #[tokio::test]
    async fn a_replay_count_applies_only_to_the_transaction_that_was_cut() {
        let mut b = StreamBatcher::new(100, None);
        transaction(&mut b, 7, &[1, 2], None);
        b.disconnected();
        assert!(b.in_transaction(), "between the cut and its replay: no marker, no clean stop");
        transaction(&mut b, 8, &[10, 11, 12], Some(20));
        assert!(!b.in_transaction());
        assert_eq!(drain(&mut b).await, ["Int(1)", "Int(2)", "Int(10)", "Int(11)", "Int(12)", "C20"]);
    }

    /// Units are counted whether or not they yield events, so a reload between the cut and the replay
    /// (a table now excluded, or included) cannot shift what is dropped.
    #[tokio::test]
    async fn units_that_yield_nothing_still_count() {
        let mut b = StreamBatcher::new(100, None);
        b.begin(1);
        b.emit(insert(1));
        let _ = b.admit(); // a unit of a table not captured then
        b.disconnected();
        b.begin(1);
        let _ = b.admit(); // unit 1 again: dropped
        if b.admit() {
            b.push(insert(20)); // the same unit now yields an event (a reload included its table): still dropped
        }
        b.emit(insert(3));
        b.commit(commit(5));
        assert_eq!(drain(&mut b).await, ["Int(1)", "Int(3)", "C5"]);
    }

    #[tokio::test]
    async fn a_lost_connection_between_transactions_replays_nothing() {
        let mut b = StreamBatcher::new(100, Some(commit(5)));
        assert_eq!(b.resume_point(), Some(&commit(5)));
        transaction(&mut b, 1, &[1], Some(10));
        b.marker(commit(15));
        b.disconnected();
        assert_eq!(b.resume_point(), Some(&commit(15)));
        transaction(&mut b, 2, &[2], Some(20));
        assert_eq!(drain(&mut b).await, ["Int(1)", "C10", "C15", "Int(2)", "C20"]);
    }

    #[tokio::test]
    async fn hand_over_waits_for_room_and_lets_the_caller_keep_its_connection_alive() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut b = StreamBatcher::new(2, None);
        transaction(&mut b, 1, &[1, 2], Some(3));
        assert!(b.is_full());
        assert_eq!(b.hand_over(&tx, None).await, HandOver::Sent);
        assert!(b.is_empty() && !b.is_full());
        transaction(&mut b, 2, &[4], Some(5));
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.tick().await;
        // The channel is full: the tick fires first, and the batch stays.
        assert_eq!(b.hand_over(&tx, Some(&mut tick)).await, HandOver::Tick);
        assert_eq!(b.len(), 2);
        assert_eq!(shape(&rx.recv().await.unwrap()), ["Int(1)", "Int(2)", "C3"]);
        assert_eq!(b.hand_over(&tx, Some(&mut tick)).await, HandOver::Sent);
        drop(rx);
        transaction(&mut b, 3, &[6], Some(7));
        assert_eq!(b.hand_over(&tx, None).await, HandOver::Closed);
    }

    /// Megabytes of log that yielded no event (a large event of a table not captured) neither make
    /// an empty batch "full" nor linger: a caller handing over until it is not full must not spin.
    #[tokio::test]
    async fn log_bytes_without_events_do_not_fill_an_empty_batch() {
        let (tx, _rx) = mpsc::channel(4);
        let mut b = StreamBatcher::new(100, None);
        b.add_bytes(MAX_BATCH_BYTES * 3);
        assert!(!b.is_full());
        assert_eq!(b.hand_over(&tx, None).await, HandOver::Sent);
        transaction(&mut b, 1, &[1], Some(2));
        assert!(!b.is_full(), "the bytes were forgotten with the empty hand-over");
    }

    #[test]
    fn small_batches_wait_a_little_for_more_large_ones_do_not() {
        let mut b = StreamBatcher::new(10_000, None);
        assert!(!b.wait_for_more(), "nothing to wait for");
        transaction(&mut b, 1, &[1], None);
        assert!(b.wait_for_more());
        std::thread::sleep(COALESCE_MAX);
        assert!(!b.wait_for_more(), "waited long enough");
        let mut b = StreamBatcher::new(10_000, None);
        transaction(&mut b, 1, &(0..COALESCE_BELOW as i64).collect::<Vec<_>>(), None);
        assert!(!b.wait_for_more(), "large enough to go at once");
    }
}
