//! The run loop: source task → bounded channel → sink, with ordered checkpoints.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tailgate_core::{Event, Position, TableSchema};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::engine::{Classify, EngineError, ErrorClass};
use crate::metrics::{BatchCounts, Metrics, now_ms};
use crate::offsets::{OffsetStore, OffsetsError};
use crate::sink::{Checkpoint, DeadLetterPolicy, Sink, SinkError, SinkItem, SinkTotals};
use crate::source::{Batch, DynSource, Item, SourceContext};
use crate::transform::{Rules, TransformCounts, TransformError, Transformer};

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Batches buffered between source and sink (each holds up to the source's batch size).
    pub channel_batches: usize,
    /// How often the acknowledged position is written to the offsets file. The log position
    /// reported upstream follows acknowledgements directly; the file trails by at most this much.
    pub flush_interval: Duration,
    /// How long a graceful stop waits for outstanding acknowledgements.
    pub drain_timeout: Duration,
    /// How often a progress line is logged.
    pub progress_log_interval: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            channel_batches: 4,
            flush_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(30),
            progress_log_interval: Duration::from_secs(30),
        }
    }
}

/// What a run is wired to.
pub struct RunContext {
    pub store: Arc<dyn OffsetStore>,
    /// The stored checkpoint, if any.
    pub resume_from: Option<Position>,
    /// Cancelled on SIGINT/SIGTERM: drain, checkpoint, stop.
    pub shutdown: CancellationToken,
    pub metrics: Arc<Metrics>,
    /// Transform rules; a new value (reload) applies from the next transaction.
    pub rules: watch::Receiver<Arc<Rules>>,
}

#[derive(Debug, Default, Clone)]
pub struct RunSummary {
    pub events: u64,
    pub checkpoint: Option<Position>,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("source: {0}")]
    Source(#[source] EngineError),
    #[error("sink: {0}")]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Offsets(#[from] OffsetsError),
    #[error(transparent)]
    Transform(#[from] TransformError),
    #[error(
        "stopped with {in_flight} record(s) still unacknowledged after {timeout:?}; the checkpoint stays \
         at {checkpoint}, so they will be sent again on restart"
    )]
    DrainTimeout { in_flight: usize, timeout: Duration, checkpoint: String },
}

impl Classify for PipelineError {
    fn class(&self) -> ErrorClass {
        match self {
            PipelineError::Source(e) => e.class,
            PipelineError::Sink(e) => e.class(),
            // A rule that stops the run (a missing outbox column, on_error = "stop") is for the
            // operator to fix in the config or the data.
            PipelineError::Transform(_) => ErrorClass::Config,
            PipelineError::Offsets(_) | PipelineError::DrainTimeout { .. } => ErrorClass::Runtime,
        }
    }
}

/// Runs `source` into `sink` until the source ends, `shutdown` is cancelled, or either side fails.
///
/// Checkpoints: an acknowledged position is published to the source at once (it feeds the
/// database's own progress marker) and written to `store` at most every `flush_interval`, and once
/// more when the run ends. Nothing unacknowledged is ever written.
pub async fn run(
    source: Box<dyn DynSource>,
    mut sink: Box<dyn Sink>,
    context: RunContext,
    opts: RunOptions,
) -> Result<RunSummary, PipelineError> {
    let RunContext { store, resume_from, shutdown, metrics, rules } = context;
    let (tx, mut rx) = mpsc::channel::<Batch>(opts.channel_batches.max(1));
    let (acked_tx, acked_rx) = watch::channel(resume_from.clone());
    let source_shutdown = shutdown.child_token();
    let ctx = SourceContext {
        output: tx,
        acked: acked_rx,
        shutdown: source_shutdown.clone(),
        resume_from: resume_from.clone(),
        metrics: metrics.clone(),
    };
    let mut source_task = tokio::spawn(source.run(ctx));

    let mut summary = RunSummary { events: 0, checkpoint: resume_from.clone() };
    if let Some(p) = &resume_from {
        metrics.checkpoint_position.store(p.as_number(), Relaxed);
    }
    let mut persisted = resume_from;
    let mut last_persist = Instant::now();
    let mut stage = Stage::new(rules);
    let mut last_progress_log = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let outcome: Result<(), PipelineError> = async {
        loop {
            tokio::select! {
                biased;
                batch = rx.recv() => match batch {
                    Some(batch) => {
                        let (items, counts) = stage.process(batch)?;
                        summary.events += counts.read - counts.filtered;
                        metrics.apply_batch(&counts);
                        sink.send(items).await?;
                    }
                    None => return Ok(()),
                },
                _ = tick.tick() => {}
            }
            if let Some(acked) = sink.poll_acks()? {
                record_progress(&metrics, &acked, &mut stage.pending_commits);
                summary.checkpoint = Some(acked.position.clone());
                acked_tx.send_replace(Some(acked.position));
            }
            let totals = sink.totals();
            publish_totals(&metrics, totals, sink.in_flight());
            if last_progress_log.elapsed() >= opts.progress_log_interval {
                last_progress_log = Instant::now();
                info!(
                    events_read = metrics.events_read.load(Relaxed),
                    records_delivered = totals.delivered,
                    in_flight = sink.in_flight(),
                    checkpoint = %summary.checkpoint.as_ref().map_or("(none)".to_owned(), ToString::to_string),
                    "progress"
                );
            }
            if summary.checkpoint != persisted && last_persist.elapsed() >= opts.flush_interval {
                if let Some(p) = &summary.checkpoint {
                    store.save(p).await?;
                    debug!(position = %p, "checkpoint written");
                }
                persisted = summary.checkpoint.clone();
                last_persist = Instant::now();
            }
        }
    }
    .await;

    // Whatever happened, stop the source and make acknowledged progress durable.
    source_shutdown.cancel();
    rx.close();
    let drained = match &outcome {
        Ok(()) => sink.flush(opts.drain_timeout).await.map_err(PipelineError::from),
        // After a sink failure nothing more can be acknowledged safely past the failure point.
        Err(_) => sink.poll_acks().map_err(PipelineError::from),
    };
    let mut result = outcome;
    match drained {
        Ok(Some(acked)) => {
            record_progress(&metrics, &acked, &mut stage.pending_commits);
            summary.checkpoint = Some(acked.position);
        }
        Ok(None) => {}
        Err(e) => {
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    // Never after being fenced: another instance owns the checkpoint now.
    let fenced = matches!(&result, Err(PipelineError::Offsets(OffsetsError::Fenced { .. })));
    if summary.checkpoint != persisted
        && !fenced
        && let Some(p) = &summary.checkpoint
    {
        store.save(p).await?;
        info!(position = %p, "final checkpoint written");
    }
    if let Some(p) = &summary.checkpoint {
        acked_tx.send_replace(Some(p.clone()));
    }
    // Closing the channel tells the source that this was the final checkpoint.
    drop(acked_tx);
    if result.is_ok() && sink.in_flight() > 0 {
        result = Err(PipelineError::DrainTimeout {
            in_flight: sink.in_flight(),
            timeout: opts.drain_timeout,
            checkpoint: summary.checkpoint.as_ref().map_or("(none)".into(), ToString::to_string),
        });
    }

    // Let the source report the final position upstream and close cleanly.
    let source_result = match tokio::time::timeout(Duration::from_secs(10), &mut source_task).await {
        Ok(Ok(r)) => r.map_err(PipelineError::Source),
        Ok(Err(join)) => {
            Err(PipelineError::Source(EngineError::new(ErrorClass::Runtime, format!("source task failed: {join}"))))
        }
        Err(_) => {
            warn!("source did not stop within 10s; aborting it");
            source_task.abort();
            Ok(())
        }
    };
    publish_totals(&metrics, sink.totals(), sink.in_flight());
    metrics.source_connected.store(false, Relaxed);
    // A source error is the root cause when both failed (the sink saw a closed channel). A drain that
    // timed out is still worth its own line: the source may have failed only while it waited (the
    // server drops an idle replication connection after wal_sender_timeout).
    if let (Err(_), Err(drain @ PipelineError::DrainTimeout { .. })) = (&source_result, &result) {
        error!("{drain}");
    }
    let outcome = match (source_result, result) {
        (Err(e), _) => Err(e),
        (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(())) => Ok(summary),
    };
    // Fenced (another instance took over) is a step down, not a failure of this process.
    if let Err(e) = &outcome
        && !matches!(e, PipelineError::Offsets(OffsetsError::Fenced { .. }))
    {
        metrics.error(match e {
            PipelineError::Source(_) => "source",
            PipelineError::Sink(_) => "sink",
            PipelineError::Offsets(_) => "offsets",
            PipelineError::Transform(_) => "transform",
            PipelineError::DrainTimeout { .. } => "drain_timeout",
        });
        metrics.set_fatal(e.to_string());
    }
    outcome
}

fn publish_totals(metrics: &Metrics, totals: SinkTotals, in_flight: usize) {
    metrics.records_delivered.store(totals.delivered, Relaxed);
    metrics.produced_bytes.store(totals.bytes, Relaxed);
    metrics.records_dead_lettered.store(totals.dead_lettered, Relaxed);
    metrics.in_flight_records.store(in_flight as u64, Relaxed);
}

/// The transform stage of the run loop: source items in, sink items out, with the batch's counts.
///
/// New rules (SIGHUP reload) take effect at the next transaction boundary, so a transaction is never
/// split between two rule sets, and no position is lost or repeated by a reload.
pub struct Stage {
    transformer: Transformer,
    rules: watch::Receiver<Arc<Rules>>,
    /// Commits handed to the sink (their [`Checkpoint::seq`]) and their commit time, for the
    /// delivery-lag histogram. Bounded by the commits in flight: acknowledged ones leave it.
    pub pending_commits: VecDeque<(u64, i64)>,
    /// The next commit's [`Checkpoint::seq`].
    next_seq: u64,
}

impl Stage {
    pub fn new(mut rules: watch::Receiver<Arc<Rules>>) -> Self {
        let current = rules.borrow_and_update().clone();
        Stage { transformer: Transformer::new(current), rules, pending_commits: VecDeque::new(), next_seq: 0 }
    }

    /// Transforms and counts one batch. Per-table counts are kept per run of consecutive events of
    /// one table, so the table name is formatted once per run, not once per event.
    pub fn process(&mut self, batch: Batch) -> Result<(Vec<SinkItem>, BatchCounts), TransformError> {
        let mut counts = BatchCounts::default();
        let mut transform_counts = TransformCounts::default();
        let mut out = Vec::with_capacity(batch.len() + batch.len() / 8);
        let mut last_commit_ts = None;
        let mut run: Option<(Arc<TableSchema>, u64)> = None;
        let flush = |counts: &mut BatchCounts, run: Option<(Arc<TableSchema>, u64)>| {
            if let Some((table, n)) = run {
                *counts.per_table.entry(table.id.to_string()).or_insert(0) += n;
            }
        };
        for item in batch {
            match item {
                Item::Event(event) => {
                    counts.read += 1;
                    last_commit_ts = Some(event.source().commit_ts_us());
                    if let Event::Change(c) = &event {
                        match &mut run {
                            Some((table, n)) if Arc::ptr_eq(table, &c.table) => *n += 1,
                            _ => {
                                let previous = run.replace((c.table.clone(), 1));
                                flush(&mut counts, previous);
                            }
                        }
                    }
                    self.transformer.apply(event, &mut out, &mut transform_counts)?;
                }
                Item::Commit(position) => {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    if let Some(ts) = last_commit_ts.take() {
                        counts.transactions += 1;
                        self.pending_commits.push_back((seq, ts));
                    }
                    out.push(SinkItem::Commit(Checkpoint { seq, position }));
                    if self.rules.has_changed().unwrap_or(false) {
                        let rules = self.rules.borrow_and_update().clone();
                        info!("new filter, route and outbox rules in effect from the next transaction");
                        out.push(SinkItem::DeadLetters(DeadLetterPolicy {
                            topic: rules.dead_letter_topic.clone(),
                            stop: rules.dead_letter_stop,
                        }));
                        self.transformer = Transformer::new(rules);
                    }
                }
            }
        }
        flush(&mut counts, run);
        counts.filtered = transform_counts.filtered;
        Ok((out, counts))
    }
}

fn record_progress(metrics: &Metrics, acked: &Checkpoint, pending: &mut VecDeque<(u64, i64)>) {
    let now_us = now_ms() as i64 * 1000;
    while pending.front().is_some_and(|(seq, _)| *seq <= acked.seq) {
        if let Some((_, ts)) = pending.pop_front() {
            metrics.delivery_lag.observe((now_us - ts) as f64 / 1e6);
        }
    }
    metrics.checkpoint_position.store(acked.position.as_number(), Relaxed);
    metrics.last_progress_ms.store(now_ms(), Relaxed);
}

#[cfg(test)]
mod tests {
    use tailgate_core::{ChangeEvent, ColumnSchema, Lsn, Op, PgSourceBlock, SourceInfo, TableId};

    use super::*;
    use crate::transform::TransformSpec;

    fn event(snapshot: &'static str) -> Item {
        Item::Event(Event::Change(ChangeEvent {
            op: if snapshot == "false" { Op::Create } else { Op::Read },
            table: Arc::new(TableSchema {
                id: TableId { schema: "public".into(), table: "t".into() },
                columns: vec![ColumnSchema { name: "id".into(), key: true }],
            }),
            before: None,
            after: Some(vec![tailgate_core::Value::Int(1)]),
            source: SourceInfo::Postgres(PgSourceBlock {
                name: "n".into(),
                db: "d".into(),
                commit_ts_us: 1,
                txid: 0,
                lsn: 0,
                last_commit_lsn: None,
                snapshot,
            }),
        }))
    }

    /// After a snapshot, streamed transactions must leave the lag queue once acknowledged: a
    /// snapshot marker once stayed at its front for good (positions compared across kinds), so the
    /// lag histogram never counted again and the queue grew by one entry per transaction.
    #[test]
    fn acknowledged_commits_leave_the_lag_queue_after_a_snapshot() {
        let rules =
            Arc::new(Rules::compile(&TransformSpec { topic_prefix: "p".into(), ..Default::default() }).unwrap());
        let (_tx, rx) = watch::channel(rules);
        let mut stage = Stage::new(rx);
        let metrics = Metrics::new("t");
        let snapshot_marker =
            Position::PostgresSnapshot { lsn: Lsn(100), done: vec![], table: Some("public.t".into()), after: None };
        let mut last = None;
        let mut batch = vec![
            event("true"),
            Item::Commit(snapshot_marker),
            event("last"),
            Item::Commit(Position::postgres(Lsn(100))),
        ];
        for i in 0..1000 {
            batch.push(event("false"));
            batch.push(Item::Commit(Position::postgres(Lsn(200 + i))));
        }
        let (items, counts) = stage.process(batch).unwrap();
        assert_eq!(counts.transactions, 1002);
        for item in items {
            if let SinkItem::Commit(c) = item {
                last = Some(c);
            }
        }
        let last = last.unwrap();
        assert_eq!(last.position, Position::postgres(Lsn(1199)));
        record_progress(&metrics, &last, &mut stage.pending_commits);
        assert!(stage.pending_commits.is_empty(), "{} commits left waiting", stage.pending_commits.len());
        assert_eq!(metrics.delivery_lag.count(), 1002);
    }
}
