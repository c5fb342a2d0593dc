//! tailgate's runtime: how changes flow from a source to a sink and how progress is made durable.
//!
//! ```text
//!  Source task ──Batch(Item::Event | Item::Commit)──▶ runtime ──records──▶ Sink (batched produce)
//!      ▲                 bounded channel                 │                    │
//!      │                                                 │◀── acked position ─┘ (AckTracker: ordered)
//!      └──────── acked position (watch) ◀────────────────┤
//!                                                        └──▶ OffsetStore (atomic file, every flush_interval)
//! ```
//!
//! The promise: a position reaches the offsets file or the source's log (PostgreSQL's slot) only when
//! every record produced before it has been acknowledged by the sink. The channel is bounded, so a
//! slow sink slows the reader and memory stays flat whatever the backlog.

pub mod ack;
pub mod check;
pub mod config;
pub mod encode;
pub mod engine;
pub mod incremental;
pub mod metrics;
pub mod offsets;
pub mod runtime;
pub mod sink;
pub mod snapshot;
pub mod source;
pub mod stopping;
pub mod stream;
pub mod transform;

pub use ack::AckTracker;
pub use check::{CheckResult, Status};
pub use config::{KeyError, key_error};
pub use encode::{Encoder, EncoderOptions, Prepared, Record};
pub use engine::{BoxFuture, Classify, Engine, EngineError, ErrorClass, Lease, SourceParams};
pub use incremental::{
    Chunk, ChunkRequest, Closed, Command, ControlError, IncrementalControl, IncrementalSnapshots, SnapshotStatus,
    StartRequest,
};
pub use metrics::{BatchCounts, Metrics};
pub use offsets::{FileStore, OffsetStore, OffsetsError, StoredOffset};
pub use runtime::{PipelineError, RunContext, RunOptions, RunSummary, run};
pub use sink::{
    Checkpoint, DeadLetterPolicy, RawRecord, Sink, SinkBuilder, SinkContext, SinkError, SinkItem, SinkTotals,
};
pub use snapshot::{AfterRow, AfterTable, ParallelReaders, ReaderEnd, SnapshotEmitter, TablePages};
pub use source::{
    Batch, DynSource, Item, MAX_BATCH_BYTES, SnapshotMode, Source, SourceContext, TablePredicate, TableRules,
};
pub use stream::{HandOver, Reconnecting, StreamBatcher, run_reconnecting};
pub use transform::{FilterSpec, OutboxSpec, RouteSpec, RuleError, Rules, TransformSpec, Transformer};
