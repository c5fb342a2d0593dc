//! The source contract.

use std::future::Future;
use std::sync::Arc;

use tailgate_core::{Event, Position};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::engine::{BoxFuture, Classify, EngineError};
use crate::metrics::Metrics;
use crate::transform::Rules;

/// Which tables a source captures: called with `schema.table` (PostgreSQL) or `database.table`
/// (MySQL). Sources use it to avoid reading (PostgreSQL: publishing) what the rules exclude.
pub type TablePredicate = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The table rules as they are now: a reload (SIGHUP) replaces them while the source runs, and a
/// source that reconnects, re-creates its publication or snapshots must use the current ones, never
/// those it started with.
#[derive(Clone)]
pub struct TableRules(watch::Receiver<Arc<Rules>>);

impl TableRules {
    pub fn new(rules: watch::Receiver<Arc<Rules>>) -> Self {
        TableRules(rules)
    }

    /// Rules that never change (tests, one-shot commands).
    pub fn fixed(rules: Rules) -> Self {
        let (tx, rx) = watch::channel(Arc::new(rules));
        // The receiver keeps the value; the sender may go.
        drop(tx);
        TableRules(rx)
    }

    /// The current rules.
    pub fn current(&self) -> Arc<Rules> {
        self.0.borrow().clone()
    }

    /// The current rules' table predicate; `None` when they select no tables (all are captured).
    pub fn predicate(&self) -> Option<TablePredicate> {
        let rules = self.current();
        if !rules.filters_tables() {
            return None;
        }
        Some(Arc::new(move |table: &str| rules.table_included(table)))
    }

    /// A receiver that wakes when a reload replaces the rules (the current ones count as seen).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Rules>> {
        let mut rules = self.0.clone();
        rules.mark_unchanged();
        rules
    }

    /// A predicate that asks the rules in force at each call (a reader that outlives a reload).
    pub fn live_predicate(&self) -> TablePredicate {
        let rules = self.0.clone();
        Arc::new(move |table: &str| {
            let current = rules.borrow();
            !current.filters_tables() || current.table_included(table)
        })
    }
}

impl std::fmt::Debug for TableRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableRules").field("filters_tables", &self.current().filters_tables()).finish()
    }
}

/// When the existing rows are read (Debezium's `snapshot.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMode {
    /// Once, when the connector has no checkpoint; then stream.
    Initial,
    /// Never: stream from now (PostgreSQL: from the slot's creation) on.
    Never,
    /// As `Initial`, and again when the stored position is gone (slot dropped, binlog purged).
    WhenNeeded,
    /// Snapshot, then stop.
    InitialOnly,
}

impl SnapshotMode {
    /// The `source.snapshot` value: `initial`, `never`, `when_needed` or `initial_only`.
    pub fn parse(text: &str) -> Result<Self, crate::config::KeyError> {
        Ok(match text {
            "initial" => SnapshotMode::Initial,
            "never" => SnapshotMode::Never,
            "when_needed" => SnapshotMode::WhenNeeded,
            "initial_only" => SnapshotMode::InitialOnly,
            other => {
                return Err(crate::config::key_error(
                    "source.snapshot",
                    format!("{other:?}: use \"initial\", \"never\", \"when_needed\" or \"initial_only\""),
                ));
            }
        })
    }
}

/// One element of the ordered stream a source emits.
#[derive(Debug, Clone)]
pub enum Item {
    Event(Event),
    /// Everything emitted before this item forms complete transactions: once the sink has
    /// acknowledged it all, the source may resume from `Position` and lose nothing.
    Commit(Position),
}

/// Items travel in batches so that channel synchronisation is paid per batch, not per event.
pub type Batch = Vec<Item>;

/// A source hands a batch over at its item limit (`batch_size`, a snapshot's `snapshot_fetch_rows`)
/// or once the log data behind it reaches this many bytes, whichever comes first. The channel holds a
/// few batches, so this keeps memory flat in bytes too: wide rows (large JSON or text values) would
/// otherwise multiply it by the row width.
pub const MAX_BATCH_BYTES: usize = 4 << 20;

pub struct SourceContext {
    /// Bounded: when the sink falls behind, `send` waits, and the source stops reading its log.
    pub output: mpsc::Sender<Batch>,
    /// The newest position whose every preceding event was acknowledged by the sink. A source
    /// reports it upstream (PostgreSQL: the standby status flush LSN) and nothing newer.
    pub acked: watch::Receiver<Option<Position>>,
    /// Cancelled on SIGINT/SIGTERM or when the sink failed. A source stops emitting at the next
    /// transaction boundary and drops `output` (returning does that too). It may then wait for the
    /// final checkpoint on `acked`, which closes once the pipeline has written it.
    pub shutdown: CancellationToken,
    /// The stored checkpoint: skip every transaction that committed before it.
    pub resume_from: Option<Position>,
    /// The source reports connection state, activity and reconnects here.
    pub metrics: Arc<Metrics>,
}

/// A change source, e.g. PostgreSQL logical replication.
///
/// Contract:
/// - **Order.** Items come in commit order; the events of a transaction come together, in statement
///   order, followed by one `Item::Commit` whose position resumes right after that transaction.
///   `Item::Commit` may also come between transactions (an idle server's progress).
/// - **Resume.** A source never emits a transaction that committed before `resume_from`, and after
///   a lost connection it resumes exactly after the last commit it emitted, dropping what it already
///   emitted of a transaction cut in half ([`crate::StreamBatcher`] implements this): duplicates
///   only ever follow a crash.
/// - **Progress upstream.** It reports to its server only positions read from `acked` (never one
///   that was merely emitted), so the server keeps every log record not yet delivered.
/// - **Backpressure.** `output` is bounded; a source waits for room (keeping its connection alive
///   meanwhile) and reads nothing more while it waits: memory stays flat whatever the backlog.
/// - **Shutdown.** On `shutdown` it stops at the next transaction boundary, drops `output`, may
///   wait for `acked` to close (the final checkpoint) to report it, and returns `Ok`.
/// - **Errors.** Transient failures are retried inside `run` ([`crate::run_reconnecting`]); an
///   error returned from `run` stops the connector, classified by [`Classify`].
pub trait Source: Send + 'static {
    type Error: std::error::Error + Classify + Send + Sync + 'static;

    fn run(self, ctx: SourceContext) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// A [`Source`] behind a pointer: what engines hand the binary.
pub trait DynSource: Send {
    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<(), EngineError>>;
}

impl<S: Source> DynSource for S {
    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<(), EngineError>> {
        Box::pin(async move { Source::run(*self, ctx).await.map_err(EngineError::from) })
    }
}
