//! The PostgreSQL source's driver: the replication connection, the slot and publication, the
//! snapshot, reconnects and standby status updates; the decoding without I/O lives in
//! [`crate::stream`].
//!
//! ```text
//!  replication conn ──XLogData──▶ pgoutput::decode ──▶ StreamState ──Batch──▶ pipeline
//!        ▲                                                                  │
//!        └── standby status (flush = acknowledged checkpoint) ◀── acked ────┘
//! ```
//!
//! Progress rules:
//! - A transaction's events are followed by `Item::Commit(end LSN)`; the pipeline releases it once
//!   Kafka acknowledged them all, and only then is it reported to the server as flushed.
//! - A keepalive between transactions becomes `Item::Commit(wal_end)`: nothing committed before it is
//!   still unsent, so an idle connector keeps confirming and never pins WAL.
//! - On (re)connect the server resends from the slot's confirmed position; transactions whose commit
//!   precedes what was already handed to the pipeline are skipped, so a reconnect adds no duplicates.
//! - Batches are handed over when the socket has nothing more buffered (a small batch first waits up
//!   to 1 ms at a time, 5 ms in all, for more), so latency stays low when idle and batches grow under
//!   load; status updates keep flowing while the pipeline applies backpressure.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tailgate_core::{Lsn, Position};
pub use tailgate_pipeline::SnapshotMode;
use tailgate_pipeline::stream::COALESCE_WINDOW;
use tailgate_pipeline::{
    Closed, Command, HandOver, IncrementalControl, IncrementalSnapshots, Reconnecting, Rules, Source, SourceContext,
    TableRules, run_reconnecting,
};
use tracing::{debug, info, warn};

use crate::catalog;
use crate::error::PgError;
use crate::incremental::{ChunkRead, ChunkReader};
use crate::pgoutput::{self, PgOutput};
use crate::replication::{ConnInfo, ReplicationConnection, ReplicationMessage};
use crate::snapshot::{self, SnapshotJob, SnapshotProgress};
use crate::stream::StreamState;

#[derive(Clone)]
pub struct PostgresSourceConfig {
    /// The connector's logical name (`source.name` in events).
    pub name: String,
    pub url: String,
    pub slot: String,
    pub publication: String,
    /// Create the publication when it is missing.
    pub create_publication: bool,
    /// The tables to capture, as the rules say now (a reload changes them). A publication tailgate
    /// manages covers exactly these.
    pub tables: TableRules,
    /// Items per batch handed to the pipeline, at most.
    pub batch_size: usize,
    /// How often a standby status update is sent.
    pub status_interval: Duration,
    /// Stop (drain, checkpoint, exit) once everything committed before this LSN was emitted, as
    /// `pg_recvlogical --endpos` does. For benchmarks and controlled catch-up runs.
    pub stop_at: Option<Lsn>,
    pub snapshot: SnapshotMode,
    /// Rows per snapshot page (one checkpoint marker).
    pub snapshot_fetch_rows: usize,
    /// Tables read at the same time, each on its own connection sharing the exported snapshot.
    pub snapshot_parallel: usize,
    /// A slot held by another process is waited for rather than refused at start (a new leader
    /// whose predecessor's walsender has not yet timed out).
    pub wait_for_slot: bool,
    /// Incremental snapshot requests and their status.
    pub incremental: Arc<IncrementalControl>,
    /// Rows per incremental snapshot chunk.
    pub incremental_chunk_rows: usize,
    /// Snapshot tables a reload or restart newly includes.
    pub snapshot_new_tables: bool,
}

impl std::fmt::Debug for PostgresSourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSourceConfig")
            .field("name", &self.name)
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("tables", &self.tables)
            .finish_non_exhaustive()
    }
}

pub struct PostgresSource {
    config: PostgresSourceConfig,
    info: ConnInfo,
}

impl PostgresSource {
    pub fn new(config: PostgresSourceConfig) -> Result<Self, PgError> {
        let info = ConnInfo::from_url(&config.url)?;
        Ok(PostgresSource { config, info })
    }
}

impl Source for PostgresSource {
    type Error = PgError;

    async fn run(self, mut ctx: SourceContext) -> Result<(), PgError> {
        let resume = ctx.resume_from.as_ref().and_then(Position::lsn);
        let incremental = IncrementalSnapshots::new(
            self.config.incremental.clone(),
            ctx.resume_from.as_ref().and_then(Position::incremental),
            self.config.incremental_chunk_rows,
        );
        let mut state = StreamState::new(&self.config, &self.info.dbname, resume, incremental);
        if let Some(Position::PostgresSnapshot { done, table, after, .. }) = &ctx.resume_from {
            state.snapshot_progress =
                Some(SnapshotProgress { done: done.clone(), table: table.clone(), after: after.clone() });
        }
        run_reconnecting(&mut Session { source: &self, state }, &mut ctx).await
    }
}

/// One replication connection's worth of streaming, retried by [`run_reconnecting`].
struct Session<'a> {
    source: &'a PostgresSource,
    state: StreamState,
}

impl Reconnecting for Session<'_> {
    type Error = PgError;

    fn engine(&self) -> &'static str {
        "PostgreSQL"
    }

    async fn session(&mut self, ctx: &mut SourceContext) -> Result<(), PgError> {
        self.source.stream(ctx, &mut self.state).await
    }

    // Once streaming, the connector rides out restarts and network trouble by itself. Our own
    // previous walsender may hold the slot for a moment after a reconnect.
    fn retry(&self, e: &PgError) -> bool {
        let slot_in_use = matches!(e, PgError::SlotInUse { .. });
        (e.is_transient() || slot_in_use)
            && (self.state.ever_streamed || (slot_in_use && self.source.config.wait_for_slot))
    }

    fn made_progress(&self) -> bool {
        self.state.streamed_since_connect
    }

    fn disconnected(&mut self) {
        self.state.disconnected();
    }
}

impl PostgresSource {
    /// Makes sure the slot and publication exist; returns the LSN to start from.
    async fn prepare(&self, state: &StreamState) -> Result<(), PgError> {
        let mut client = catalog::connect(&self.info).await?;
        let wal_level = catalog::wal_level(&client).await?;
        if wal_level != "logical" {
            return Err(PgError::WalLevel { found: wal_level });
        }
        let publication = &self.config.publication;
        // The rules in force now: a reload since start-up changed what the publication must cover.
        let predicate = self.config.tables.predicate();
        let tables = predicate.as_ref();
        match catalog::sync_publication(&mut client, publication, tables, self.config.create_publication).await? {
            catalog::PublicationSync::Created => {
                info!(publication = %publication, filtered = tables.is_some(), "publication created")
            }
            catalog::PublicationSync::Updated { tables } => {
                info!(publication = %publication, tables, "publication brought in line with the table rules")
            }
            catalog::PublicationSync::Unchanged | catalog::PublicationSync::NotManaged => {}
        }
        let outside = catalog::tables_outside_publication(&client, &self.config.publication).await?;
        if !outside.is_empty() && tables.is_none() {
            warn!(publication = %self.config.publication, tables = %outside.join(", "), "tables outside the publication are not captured");
        }
        match catalog::slot_state(&client, &self.config.slot).await? {
            Some(slot) => match catalog::validate_slot(&self.config.slot, &slot, &self.info.dbname) {
                // This instance holds the lease, so the slot's holder is a former leader (frozen,
                // cut off): end its walsender instead of waiting for wal_sender_timeout. Its
                // records in flight may come twice; its checkpoints are fenced.
                Err(PgError::SlotInUse { pid, .. }) if self.config.wait_for_slot => {
                    warn!(slot = %self.config.slot, pid, "the slot is held by a previous leader's walsender: ending it");
                    client.execute("SELECT pg_terminate_backend($1)", &[&pid]).await?;
                    Err(PgError::SlotInUse { slot: self.config.slot.clone(), pid })
                }
                other => other,
            },
            None => {
                if let Some(checkpoint) = state.resume_after.or(state.emitted_until()) {
                    if self.config.snapshot != SnapshotMode::WhenNeeded {
                        return Err(PgError::SlotDropped { slot: self.config.slot.clone(), checkpoint });
                    }
                    warn!(slot = %self.config.slot, checkpoint = %checkpoint, "slot is gone: snapshot.mode = when_needed takes a new snapshot");
                }
                let (used, max) = catalog::slot_usage(&client).await?;
                if used >= max {
                    return Err(PgError::NoFreeSlot { max });
                }
                Ok(())
            }
        }
    }

    async fn stream(&self, ctx: &mut SourceContext, state: &mut StreamState) -> Result<(), PgError> {
        state.streamed_since_connect = false;
        self.prepare(state).await?;
        let mut conn = ReplicationConnection::connect(&self.info).await?;
        let (_system_id, server_lsn) = conn.identify_system().await?;
        let catalog_client = catalog::connect(&self.info).await?;
        let existing = catalog::slot_state(&catalog_client, &self.config.slot).await?;
        // PostgreSQL 17+ keeps FAILOVER slots on its physical standbys: a promoted standby has it.
        let version: String = catalog_client.query_one("SHOW server_version_num", &[]).await?.get(0);
        state.failover_slots = version.parse::<u32>().is_ok_and(|v| v >= 170_000);
        if let Some(snapshot) = self.plan_snapshot(&mut conn, &existing, state).await? {
            let (exported, consistent, mut progress) = snapshot;
            let tables = self.config.tables.predicate();
            let job = SnapshotJob {
                info: &self.info,
                publication: &self.config.publication,
                tables: tables.as_ref(),
                fetch_rows: self.config.snapshot_fetch_rows,
                parallel: self.config.snapshot_parallel,
                stop: &ctx.shutdown,
                name: state.name,
                db: state.db,
                metrics: &ctx.metrics,
            };
            ctx.metrics.source_connected.store(true, std::sync::atomic::Ordering::Relaxed);
            ctx.metrics.source_active();
            // From here on a lost connection is retried like one lost while streaming.
            state.ever_streamed = true;
            // Changes decoded from the old slot before its connection was lost go first: after the
            // snapshot's rows they would set keys back in time.
            if state.batcher.hand_over(&ctx.output, None).await == HandOver::Closed {
                return Ok(());
            }
            let mut retries = 0;
            let mut first_error = None;
            let completed = loop {
                let error = match snapshot::run(&job, exported.as_deref(), consistent, &mut progress, &ctx.output).await
                {
                    Ok(completed) => break completed,
                    // A retry refused outright (the export died with our connection): the lost
                    // reader is what to report, and the reconnect below what to do.
                    Err(e) if !e.is_transient() && first_error.is_some() => {
                        debug!(error = %e, "the exported snapshot is gone");
                        first_error.take().unwrap_or(e)
                    }
                    Err(e) => e,
                };
                // A reader lost while this connection still exports the snapshot: read on from the
                // last marker in the very same snapshot, so the retry repeats and reorders nothing.
                // If the export is gone too (this connection died), the reconnect below resumes
                // from a fresh snapshot instead (rows changed meanwhile may come twice).
                if error.is_transient() && exported.is_some() && retries < 5 && !ctx.shutdown.is_cancelled() {
                    retries += 1;
                    warn!(error = %error, retry = retries, "snapshot reader lost; reading on from the same snapshot");
                    first_error = Some(error);
                    tokio::time::sleep(Duration::from_millis(500) * retries).await;
                    continue;
                }
                // A retry in this process resumes after the last page handed over, streaming
                // still from the same consistent point.
                state.snapshot_progress = Some(progress);
                return Err(error);
            };
            state.ever_streamed = true;
            if !completed || ctx.shutdown.is_cancelled() {
                return self.finish(conn, ctx, state).await;
            }
            state.snapshot_done = true;
            state.resume_after = Some(consistent);
            state.last_marker = state.last_marker.max(consistent);
            if self.config.snapshot == SnapshotMode::InitialOnly {
                info!("snapshot.mode = initial_only: stopping after the snapshot");
                return self.finish(conn, ctx, state).await;
            }
        } else if self.config.snapshot == SnapshotMode::InitialOnly && !state.snapshot_done {
            // A checkpoint exists and no snapshot is due: an earlier run completed it.
            info!("snapshot = \"initial_only\": the snapshot was completed by an earlier run; nothing to do");
            return self.finish(conn, ctx, state).await;
        }
        let start = state.start_lsn();
        conn.start_replication(&self.config.slot, &self.config.publication, start).await?;
        info!(slot = %self.config.slot, publication = %self.config.publication, from = %start, server_wal = %server_lsn, "streaming");
        state.ever_streamed = true;
        ctx.metrics.source_connected.store(true, std::sync::atomic::Ordering::Relaxed);
        ctx.metrics.source_active();

        let mut status_tick = tokio::time::interval(self.config.status_interval);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut chunks = Chunks { reader: None, block_size: 0 };

        loop {
            while let Some(msg) = conn.try_next()? {
                match msg {
                    ReplicationMessage::XLogData { wal_start, wal_end, data } => {
                        state.received = state.received.max(wal_end);
                        state.batcher.add_bytes(data.len());
                        let decoded = pgoutput::decode(data)?;
                        if let PgOutput::Relation(rel) = &decoded {
                            let pk = if rel.replica_identity == b'f' {
                                Some(catalog::primary_key(&catalog_client, rel.id).await?)
                            } else {
                                None
                            };
                            state.add_relation(rel, pk);
                            continue;
                        }
                        state.handle(decoded, wal_start)?;
                        state.streamed_since_connect = true;
                    }
                    ReplicationMessage::Keepalive { wal_end, reply_requested } => {
                        state.received = state.received.max(wal_end);
                        state.keepalive(Lsn(wal_end));
                        if reply_requested {
                            self.send_status(&mut conn, ctx, state, false).await?;
                        }
                    }
                }
                if state.batcher.is_full() && !self.hand_over(&mut conn, ctx, state, &mut status_tick).await? {
                    return Ok(());
                }
            }
            // A small batch waits a little for more messages (see StreamBatcher::wait_for_more).
            if state.batcher.wait_for_more()
                && let Ok(read) = tokio::time::timeout(COALESCE_WINDOW, conn.fill()).await
            {
                read?;
                ctx.metrics.source_active();
                continue;
            }
            if !self.hand_over(&mut conn, ctx, state, &mut status_tick).await? {
                return Ok(());
            }
            if !state.busy() && !ctx.shutdown.is_cancelled() {
                self.incremental_step(&mut conn, ctx, state, &mut chunks).await?;
                if !state.batcher.is_empty() {
                    continue;
                }
            }
            let reached_end = self.config.stop_at.is_some_and(|end| state.last_marker >= end);
            if (ctx.shutdown.is_cancelled() || reached_end) && !state.busy() {
                if reached_end {
                    info!(stop_at = %self.config.stop_at.unwrap_or_default(), "reached the requested end position");
                }
                return self.finish(conn, ctx, state).await;
            }
            // Incremental snapshots: a chunk due now is read at the top of the loop; one in its
            // window asks the server where its stream is, until it passes the high watermark.
            if state.incremental.next_chunk().is_some() && !state.busy() && !ctx.shutdown.is_cancelled() {
                continue;
            }
            let control = self.config.incremental.clone();
            let wake = match (state.incremental.window_open(), state.incremental.retry_at()) {
                (true, _) => Some(Instant::now() + WINDOW_POLL),
                (false, Some(at)) => Some(at),
                (false, None) => None,
            };
            tokio::select! {
                read = conn.fill() => {
                    read?;
                    ctx.metrics.source_active();
                }
                // Asking for a reply makes an idle server answer with a keepalive: proof of life for /ready.
                _ = status_tick.tick() => self.send_status(&mut conn, ctx, state, true).await?,
                _ = ctx.shutdown.cancelled(), if !state.busy() => {}
                _ = control.command_arrived() => {}
                _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now).into()), if wake.is_some() => {
                    if state.incremental.window_open() {
                        self.send_status(&mut conn, ctx, state, true).await?;
                    }
                }
            }
        }
    }

    /// Between transactions: the operator's commands, tables the rules newly include, the chunk in
    /// its window once the stream passed its high watermark, and the next chunk.
    async fn incremental_step(
        &self,
        conn: &mut ReplicationConnection,
        ctx: &mut SourceContext,
        state: &mut StreamState,
        chunks: &mut Chunks,
    ) -> Result<(), PgError> {
        let before = state.incremental.checkpoint();
        let rules = self.config.tables.current();
        let commands = state.incremental.control().take_commands();
        let rules_changed = !state.rules_seen.as_ref().is_some_and(|seen| Arc::ptr_eq(seen, &rules));
        for command in commands {
            self.apply(command, state, chunks, &rules).await?;
        }
        if rules_changed {
            self.snapshot_new_tables(state, chunks, &rules).await?;
            state.rules_seen = Some(rules.clone());
            // The pipeline applies new rules from its next commit on: one goes before any chunk
            // read under them, so that a newly included table's rows are not filtered by the old.
            state.batcher.marker(state.position(state.last_marker));
        }
        ctx.metrics.incremental.pending.store(state.incremental.snapshots().len() as i64, Relaxed);
        // The oldest chunks whose high watermark the stream passed end, in order.
        while let Some(&high) = state.incremental.oldest_high()
            && crate::incremental::passed(state.last_marker, high, chunks.block_size)
        {
            let source = state.incremental_source();
            let mut events = Vec::new();
            let closed = state.incremental.close(&source, &ctx.metrics, |event| events.push(event));
            for event in events {
                state.batcher.push(event);
            }
            if let Some(Closed::Done { .. }) = closed {
                info!("incremental snapshot done");
            }
        }
        // One read per pass, so the stream is read between chunks.
        if let Some(request) = state.incremental.next_chunk() {
            let reader = chunks.reader(&self.info).await?;
            match reader.read(&request, &rules, &state.recent_xids).await? {
                ChunkRead::Rows { chunk, high } => {
                    debug!(table = %request.table, rows = chunk.rows.len(), high = %high, "incremental snapshot chunk read");
                    if let Err(why) = state.incremental.open(&request, chunk, Instant::now(), high) {
                        warn!(snapshot = request.id, table = %request.table, "incremental snapshot failed: {why}");
                        state.incremental.fail(request.id, why);
                    } else {
                        // Ask where the stream is: an idle server answers with a keepalive at its end.
                        self.send_status(conn, ctx, state, true).await?;
                    }
                }
                ChunkRead::Retry { xid } => {
                    debug!(
                        xid,
                        "incremental snapshot: a transaction may already be streamed but is not yet visible; reading the chunk again"
                    );
                    ctx.metrics.incremental.retries.fetch_add(1, Relaxed);
                    state.incremental.retry_later(CHUNK_RETRY);
                }
                ChunkRead::Failed(why) => {
                    warn!(snapshot = request.id, table = %request.table, "incremental snapshot failed: {why}");
                    state.incremental.fail(request.id, why);
                }
            }
        }
        // A queued, paused, finished or advanced snapshot becomes durable with the next checkpoint.
        if state.incremental.checkpoint() != before {
            state.batcher.marker(state.position(state.last_marker));
        }
        Ok(())
    }

    /// Runs one operator command: a start after checking each table (see [`Self::accept`]).
    async fn apply(
        &self,
        command: Command,
        state: &mut StreamState,
        chunks: &mut Chunks,
        rules: &Rules,
    ) -> Result<(), PgError> {
        if let Some(start) = state.incremental.command(command) {
            let mut estimates = Vec::with_capacity(start.tables.len());
            for table in &start.tables {
                match self.accept(chunks, table, start.filter.as_deref(), rules).await? {
                    Ok(estimate) => estimates.push(estimate),
                    Err(why) => {
                        start.refuse(why);
                        return Ok(());
                    }
                }
            }
            start.accept(&mut state.incremental, &estimates);
        }
        Ok(())
    }

    /// Whether `table` can be snapshotted incrementally (with `filter`): its estimated rows, or why not.
    async fn accept(
        &self,
        chunks: &mut Chunks,
        table: &str,
        filter: Option<&str>,
        rules: &Rules,
    ) -> Result<Result<i64, String>, PgError> {
        let reader = chunks.reader(&self.info).await?;
        reader.forget(table);
        let described = match reader.describe(table, rules).await? {
            Ok(described) => described,
            Err(why) => return Ok(Err(why)),
        };
        if let Some(filter) = filter
            && let Err(why) = reader.check_filter(&described, filter).await?
        {
            return Ok(Err(why));
        }
        if !reader.in_publication(table, &self.config.publication).await? {
            return Ok(Err(format!(
                "table {table} is not in publication {}: its changes would not stream. Fix: ALTER PUBLICATION {} ADD TABLE {table} (or let tailgate manage the publication: source.create_publication = true)",
                self.config.publication, self.config.publication
            )));
        }
        Ok(Ok(described.estimate))
    }

    /// Queues a snapshot of every table the current rules include and the checkpoint's rules did
    /// not (a reload, or a restart with new rules); then records the current rules.
    async fn snapshot_new_tables(
        &self,
        state: &mut StreamState,
        chunks: &mut Chunks,
        rules: &Rules,
    ) -> Result<(), PgError> {
        if self.config.snapshot_new_tables && state.incremental.rules_changed(rules) {
            let tables = chunks.reader(&self.info).await?.user_tables().await?;
            for table in state.incremental.newly_included(rules, tables) {
                match self.accept(chunks, &table, None, rules).await? {
                    Ok(estimate) => {
                        let id = state.incremental.add(table.clone(), None, estimate);
                        info!(snapshot = id, table = %table, "newly included table: incremental snapshot queued");
                    }
                    Err(why) => warn!(table = %table, "newly included table cannot be snapshotted: {why}"),
                }
            }
        }
        state.incremental.set_captured(rules.captured());
        Ok(())
    }

    /// Creates the slot when missing and decides whether a snapshot runs first: (exported snapshot,
    /// consistent point, progress to resume from).
    async fn plan_snapshot(
        &self,
        conn: &mut ReplicationConnection,
        existing: &Option<catalog::SlotState>,
        state: &mut StreamState,
    ) -> Result<Option<(Option<String>, Lsn, SnapshotProgress)>, PgError> {
        let mode = self.config.snapshot;
        let Some(slot) = existing else {
            let had_position = state.resume_after.is_some() || state.emitted_until().is_some();
            let wants = match mode {
                SnapshotMode::Never => false,
                SnapshotMode::Initial | SnapshotMode::InitialOnly => !had_position && !state.snapshot_done,
                // The slot is gone (dropped while we were away, even after this run's own
                // snapshot): what it held is lost to us, so a new snapshot must cover it.
                SnapshotMode::WhenNeeded => true,
            };
            let (consistent, exported) = conn.create_slot(&self.config.slot, wants, state.failover_slots).await?;
            info!(slot = %self.config.slot, consistent_point = %consistent, "replication slot created");
            if !wants {
                return Ok(None);
            }
            // A new slot starts a new history: what was delivered before is superseded, and a
            // transaction cut on the old slot will not come again.
            state.resume_after = Some(consistent);
            state.batcher.set_resume_point(None);
            state.batcher.forget_cut_transaction();
            state.snapshot_progress = None;
            state.snapshot_done = false;
            return Ok(Some((exported, consistent, SnapshotProgress::default())));
        };
        if let Some(progress) = state.snapshot_progress.take() {
            let consistent = state.resume_after.unwrap_or(Lsn::ZERO);
            warn!(consistent_point = %consistent, "resuming an interrupted snapshot from a fresh snapshot: rows changed meanwhile may arrive twice");
            return Ok(Some((None, consistent, progress)));
        }
        if !state.snapshot_done && state.resume_after.is_none() && mode != SnapshotMode::Never {
            let from = slot.confirmed_flush.unwrap_or(Lsn::ZERO);
            warn!(slot = %self.config.slot, from = %from, "the slot existed before this connector had a checkpoint: snapshot from a fresh snapshot, then stream from the slot (rows changed meanwhile may arrive twice)");
            return Ok(Some((None, from, SnapshotProgress::default())));
        }
        Ok(None)
    }

    /// Hands the batch to the pipeline, answering the server while waiting for room.
    /// Returns `false` when the pipeline is gone.
    async fn hand_over(
        &self,
        conn: &mut ReplicationConnection,
        ctx: &mut SourceContext,
        state: &mut StreamState,
        status_tick: &mut tokio::time::Interval,
    ) -> Result<bool, PgError> {
        loop {
            match state.batcher.hand_over(&ctx.output, Some(status_tick)).await {
                HandOver::Sent => return Ok(true),
                HandOver::Closed => return Ok(false),
                HandOver::Tick => self.send_status(conn, ctx, state, false).await?,
            }
        }
    }

    async fn send_status(
        &self,
        conn: &mut ReplicationConnection,
        ctx: &SourceContext,
        state: &StreamState,
        request_reply: bool,
    ) -> Result<(), PgError> {
        // During a snapshot the acknowledged position is the consistent point: reporting it is safe.
        let flushed = ctx.acked.borrow().as_ref().and_then(Position::lsn).unwrap_or(Lsn::ZERO);
        debug!(received = %Lsn(state.received), flushed = %flushed, "standby status");
        conn.send_status(Lsn(state.received), flushed, request_reply).await
    }

    /// Graceful stop: stop emitting, wait for the pipeline's final checkpoint, report it, close.
    async fn finish(
        &self,
        mut conn: ReplicationConnection,
        ctx: &mut SourceContext,
        state: &StreamState,
    ) -> Result<(), PgError> {
        // Dropping our sender ends the pipeline's input: it drains, checkpoints, publishes the final
        // acknowledged position and then closes the `acked` channel.
        let (closed, _) = tokio::sync::mpsc::channel(1);
        drop(std::mem::replace(&mut ctx.output, closed));
        let deadline = tokio::time::sleep(Duration::from_secs(60));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                changed = ctx.acked.changed() => match changed {
                    Ok(()) => self.send_status(&mut conn, ctx, state, false).await?,
                    Err(_) => break,
                },
                _ = &mut deadline => break,
            }
        }
        self.send_status(&mut conn, ctx, state, false).await?;
        conn.close().await;
        info!(flushed = %ctx.acked.borrow().as_ref().map_or("(none)".to_owned(), ToString::to_string), "replication connection closed");
        Ok(())
    }
}

/// How often a chunk in its window asks the server where the stream is.
const WINDOW_POLL: Duration = Duration::from_millis(5);
/// How long a chunk refused by the watermark check waits before it is read again.
const CHUNK_RETRY: Duration = Duration::from_millis(2);

/// The connection incremental snapshot chunks are read on, opened when first needed.
struct Chunks {
    reader: Option<ChunkReader>,
    /// The server's WAL page size (`wal_block_size`).
    block_size: u64,
}

impl Chunks {
    async fn reader(&mut self, info: &ConnInfo) -> Result<&mut ChunkReader, PgError> {
        if self.reader.is_none() {
            let reader = ChunkReader::connect(info).await?;
            self.block_size = reader.block_size().await?;
            self.reader = Some(reader);
        }
        Ok(self.reader.as_mut().expect("connected above"))
    }
}
