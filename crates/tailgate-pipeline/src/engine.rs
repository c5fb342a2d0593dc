//! The engine contract: everything a source database brings besides its change stream, so that the
//! binary can run, check, administer and reload any engine without knowing which one it is.
//!
//! An engine crate (`connectors/postgres`, `connectors/mysql`) owns its `[source]` config section,
//! builds its [`Source`](crate::Source) from it, and answers the operator's commands (`check`,
//! `offsets reset --to-end`, `slot drop`, …) with its own SQL. The binary matches on the config's
//! `type` once, to build the engine; from there on it only talks to `dyn Engine`.
//!
//! Errors carry an [`ErrorClass`]: transient ones are retried by the source's reconnect loop;
//! the others stop the connector and pick its exit code (config 2, prerequisite 3, runtime 1).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tailgate_core::Position;

use crate::check::CheckResult;
use crate::metrics::Metrics;
use crate::offsets::OffsetStore;
use crate::source::{DynSource, SnapshotMode, TableRules};
use crate::transform::Rules;

/// A boxed future: the contracts are object safe, so the binary holds `dyn Engine` and `dyn Sink`
/// (a box per batch or per command, never per event).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What kind of failure an error is: whether to retry, and the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Worth another try: a lost connection, a server restarting, a broker away.
    Transient,
    /// The configuration is wrong: the operator fixes the file (exit 2).
    Config,
    /// Something to fix on the server: a setting, a privilege, a dropped slot (exit 3).
    Prerequisite,
    /// Anything else (exit 1).
    Runtime,
}

impl ErrorClass {
    /// The process exit code for a run that ended with this class of error.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorClass::Config => 2,
            ErrorClass::Prerequisite => 3,
            ErrorClass::Transient | ErrorClass::Runtime => 1,
        }
    }
}

/// Errors that know their [`ErrorClass`].
pub trait Classify {
    fn class(&self) -> ErrorClass;
}

/// An engine's error, classified. Its message is the engine's own (naming the cause and the fix).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct EngineError {
    pub class: ErrorClass,
    pub error: Box<dyn std::error::Error + Send + Sync>,
}

impl EngineError {
    pub fn new(class: ErrorClass, error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        EngineError { class, error: error.into() }
    }

    /// The engine's own error, for callers that need more than its class (tests, logs).
    pub fn downcast_ref<E: std::error::Error + 'static>(&self) -> Option<&E> {
        self.error.downcast_ref::<E>()
    }
}

impl<E: Classify + std::error::Error + Send + Sync + 'static> From<E> for EngineError {
    fn from(error: E) -> Self {
        EngineError { class: error.class(), error: Box::new(error) }
    }
}

/// Leadership among the instances of one connector (high availability), held through the source
/// database. Dropping it gives it up.
pub trait Lease: Send {
    /// Resolves, with the reason, once leadership is lost (the session that holds it ended, the
    /// server went away): the holder stops its pipeline at once.
    fn lost(&mut self) -> BoxFuture<'_, String>;
}

/// What the binary gives an engine to build its source.
#[derive(Clone)]
pub struct SourceParams {
    /// The connector's name (`source.name` in events, default names of slots and ids).
    pub name: String,
    /// The table rules in force (a reload replaces them).
    pub tables: TableRules,
    pub snapshot: SnapshotMode,
    /// `run --stop-at POS`: stop by itself once everything before POS is delivered. The engine
    /// parses POS ([`Engine::parse_position`] states the form).
    pub stop_at: Option<String>,
    /// This instance just took over from another (high availability): resources the predecessor
    /// may still hold for a moment (PostgreSQL: the slot, until its walsender times out) are waited
    /// for instead of refused.
    pub taking_over: bool,
    /// Incremental snapshot requests from the operator (`POST /snapshots`), and their status.
    pub incremental: Arc<crate::IncrementalControl>,
}

/// A source database, as the binary drives it. Implementations answer every method with their own
/// connections and SQL; none of them may change what the connector delivers (only
/// [`Engine::retire`] and [`Engine::on_reload`] change anything on the server, and say so).
pub trait Engine: Send + Sync {
    /// The engine's name for messages: "PostgreSQL", "MySQL".
    fn kind(&self) -> &'static str;

    /// The change source. Its contract is [`crate::Source`]'s.
    fn source(&self, params: SourceParams) -> Result<Box<dyn DynSource>, EngineError>;

    /// `tailgate check`: connectivity, settings, privileges, the stored position's availability;
    /// one line per check, each not-ok one naming the fix. Changes nothing on the server.
    fn check<'a>(&'a self, checkpoint: Option<&'a Position>) -> BoxFuture<'a, Vec<CheckResult>>;

    /// The end of the server's log now (`offsets reset --to-end`).
    fn end_position(&self) -> BoxFuture<'_, Result<Position, EngineError>>;

    /// A position as the operator writes it (`offsets reset --to`, `run --stop-at`).
    fn parse_position(&self, text: &str) -> Result<Position, EngineError>;

    /// An error when a connector with this configuration runs right now (an active slot, a
    /// connected replica with this server id): commands that change its offsets refuse then.
    fn ensure_not_running(&self) -> BoxFuture<'_, Result<(), EngineError>>;

    /// Measures, every `every`, how far the server's log is ahead of the checkpoint, into
    /// `tailgate_source_lag_bytes`. Runs until the process ends; never fails the connector.
    fn spawn_lag_poller(&self, metrics: Arc<Metrics>, every: Duration);

    /// After a reload, before the new rules take effect: bring server-side state in line (a
    /// publication tailgate manages). An error refuses the reload.
    fn on_reload<'a>(&'a self, rules: &'a Rules) -> BoxFuture<'a, Result<(), EngineError>>;

    /// The column names of `table` (`schema.table` / `database.table`), `None` when it does not
    /// exist: lets the binary refuse an outbox rule naming a missing column at start and reload.
    fn table_columns<'a>(&'a self, table: &'a str) -> BoxFuture<'a, Result<Option<Vec<String>>, EngineError>>;

    /// Waits until this instance (`instance`, for logs) holds the connector's lease; a frozen holder
    /// keeps it at most `lease`. See docs/operations.md for each engine's mechanism and timing.
    fn acquire_lease<'a>(
        &'a self,
        instance: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Box<dyn Lease>, EngineError>>;

    /// The offsets store shared by every instance: `table` (`schema.table`, created when missing)
    /// in the source database, fenced per [`crate::OffsetStore::take_over`].
    fn shared_store(&self, table: &str, instance: &str) -> Result<Arc<dyn OffsetStore>, EngineError>;

    /// `tailgate slot drop`: removes what the connector keeps on the server (PostgreSQL: its slot
    /// and publication) so that the server stops retaining log for it. Returns what was done, a
    /// line each. Refused where there is nothing of the kind (MySQL).
    fn retire(&self) -> BoxFuture<'_, Result<Vec<String>, EngineError>>;
}
