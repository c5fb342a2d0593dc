//! Counters and gauges behind `/metrics`, `/health` and `/ready`.
//!
//! Naming follows `tailgate_<name>_<unit>[_total]`, every series labelled by `connector`, per-table
//! series also by `table`. Counters are updated once per batch (the run loop aggregates a batch before
//! touching the shared atomics), never per event, so metrics cost nothing measurable on the hot path.
//! Rendering follows the Prometheus text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Upper bounds (seconds) of the commit-to-acknowledgement lag histogram.
const LAG_BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LAG_BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds, to keep it an integer.
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        let seconds = seconds.max(0.0);
        for (bound, bucket) in LAG_BUCKETS.iter().zip(&self.buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add((seconds * 1e6) as u64, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }
}

fn histogram(out: &mut String, c: &str, name: &str, help: &str, h: &Histogram) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (bound, bucket) in LAG_BUCKETS.iter().zip(&h.buckets) {
        let _ = writeln!(out, "{name}_bucket{{connector=\"{c}\",le=\"{bound}\"}} {}", bucket.load(Relaxed));
    }
    let count = h.count.load(Relaxed);
    let _ = writeln!(out, "{name}_bucket{{connector=\"{c}\",le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum{{connector=\"{c}\"}} {}", h.sum_micros.load(Relaxed) as f64 / 1e6);
    let _ = writeln!(out, "{name}_count{{connector=\"{c}\"}} {count}");
}

/// Counts of one batch, applied to [`Metrics`] in one go.
#[derive(Debug, Default)]
pub struct BatchCounts {
    pub read: u64,
    pub filtered: u64,
    pub transactions: u64,
    pub per_table: BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub connector: String,
    pub events_read: AtomicU64,
    pub events_filtered: AtomicU64,
    pub records_delivered: AtomicU64,
    pub records_dead_lettered: AtomicU64,
    pub produced_bytes: AtomicU64,
    pub transactions: AtomicU64,
    /// The checkpoint as a number (PostgreSQL: the LSN).
    pub checkpoint_position: AtomicU64,
    pub delivery_lag: Histogram,
    /// Log bytes the source has not confirmed yet (-1: unknown).
    pub source_lag_bytes: AtomicI64,
    pub in_flight_records: AtomicU64,
    pub reconnects: AtomicU64,
    /// Rows read by the initial snapshot.
    pub snapshot_rows: AtomicU64,
    /// Estimated rows the snapshot has still to read.
    pub snapshot_rows_remaining: AtomicI64,
    /// The table the snapshot reads now (for the terminal progress bar).
    snapshot_table: Mutex<Option<SnapshotTable>>,
    pub source_connected: AtomicBool,
    /// Unix millis of the last message from the source (data or keepalive).
    pub last_source_activity_ms: AtomicU64,
    /// Unix millis of the last time the acknowledged position moved.
    pub last_progress_ms: AtomicU64,
    /// Set when the run failed for good; `/health` turns red.
    pub fatal: Mutex<Option<String>>,
    /// High availability: set while another instance leads (`/ready` answers 503,
    /// `tailgate_leader` is 0).
    pub standby: AtomicBool,
    /// Incremental snapshots (tables read in chunks while streaming).
    pub incremental: IncrementalMetrics,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    tables: Mutex<BTreeMap<String, u64>>,
}

#[derive(Debug, Default)]
pub struct IncrementalMetrics {
    /// Rows emitted by incremental snapshots.
    pub rows: AtomicU64,
    /// Chunk rows dropped because the stream changed their key during the chunk's window.
    pub dropped: AtomicU64,
    pub chunks: AtomicU64,
    /// Chunks read again: a transaction the read could not place, a truncate in the window.
    pub retries: AtomicU64,
    /// From reading a chunk to emitting it (the stream passing its high watermark).
    pub chunk_latency: Histogram,
    /// Snapshots queued, running or paused.
    pub pending: AtomicI64,
}

/// The table a snapshot is reading: its name, estimated rows, and `snapshot_rows` and the time when
/// it started.
#[derive(Debug, Clone)]
pub struct SnapshotTable {
    pub name: String,
    pub estimate: i64,
    pub rows_before: u64,
    pub started: std::time::Instant,
}

impl Metrics {
    /// The snapshot starts reading `table` (about `estimate` rows); `None` when the snapshot ended.
    pub fn snapshot_table_started(&self, table: Option<(&str, i64)>) {
        let mut current = self.snapshot_table.lock().unwrap_or_else(|p| p.into_inner());
        *current = table.map(|(name, estimate)| SnapshotTable {
            name: name.to_owned(),
            estimate,
            rows_before: self.snapshot_rows.load(Relaxed),
            started: std::time::Instant::now(),
        });
    }

    /// The table the snapshot reads now, if one runs.
    pub fn snapshot_table(&self) -> Option<SnapshotTable> {
        self.snapshot_table.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn new(connector: impl Into<String>) -> Self {
        let m = Metrics { connector: connector.into(), ..Default::default() };
        m.source_lag_bytes.store(-1, Relaxed);
        m.last_progress_ms.store(now_ms(), Relaxed);
        m
    }

    pub fn apply_batch(&self, counts: &BatchCounts) {
        self.events_read.fetch_add(counts.read, Relaxed);
        self.events_filtered.fetch_add(counts.filtered, Relaxed);
        self.transactions.fetch_add(counts.transactions, Relaxed);
        if !counts.per_table.is_empty() {
            let mut tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
            for (table, n) in &counts.per_table {
                *tables.entry(table.clone()).or_insert(0) += n;
            }
        }
    }

    pub fn error(&self, kind: &'static str) {
        *self.errors.lock().unwrap_or_else(|p| p.into_inner()).entry(kind).or_insert(0) += 1;
    }

    pub fn source_active(&self) {
        self.last_source_activity_ms.store(now_ms(), Relaxed);
    }

    pub fn set_fatal(&self, reason: String) {
        *self.fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    }

    /// `/health`: alive and not failed for good.
    pub fn health(&self) -> Result<(), String> {
        match &*self.fatal.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(reason) => Err(format!("failed: {reason}")),
            None => Ok(()),
        }
    }

    /// `/ready`: connected, the source heard from within `window`, and, while records are in flight,
    /// the acknowledged position moved within `window`. An idle source that keeps answering is ready.
    pub fn readiness(&self, window: Duration) -> Result<(), String> {
        self.health()?;
        if self.standby.load(Relaxed) {
            return Err("standby: another instance leads this connector".into());
        }
        if !self.source_connected.load(Relaxed) {
            return Err("source not connected".into());
        }
        let now = now_ms();
        let window_ms = window.as_millis() as u64;
        let silent = now.saturating_sub(self.last_source_activity_ms.load(Relaxed));
        if silent > window_ms {
            return Err(format!("no message from the source for {}s", silent / 1000));
        }
        let in_flight = self.in_flight_records.load(Relaxed);
        let stalled = now.saturating_sub(self.last_progress_ms.load(Relaxed));
        if in_flight > 0 && stalled > window_ms {
            return Err(format!("{in_flight} record(s) unacknowledged and no progress for {}s", stalled / 1000));
        }
        Ok(())
    }

    /// The Prometheus text format.
    pub fn render(&self, ready_window: Duration) -> String {
        let c = escape(&self.connector);
        let mut out = String::with_capacity(4096);
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{connector=\"{c}\"}} {v}");
        };
        counter("tailgate_events_read_total", "Change events read from the source.", self.events_read.load(Relaxed));
        counter(
            "tailgate_events_filtered_total",
            "Change events dropped by filters (excluded tables, skipped operations).",
            self.events_filtered.load(Relaxed),
        );
        counter(
            "tailgate_records_delivered_total",
            "Records acknowledged by the sink (events and tombstones).",
            self.records_delivered.load(Relaxed),
        );
        counter(
            "tailgate_records_dead_lettered_total",
            "Records sent to the dead-letter topic.",
            self.records_dead_lettered.load(Relaxed),
        );
        counter(
            "tailgate_produced_bytes_total",
            "Key and value bytes handed to the sink.",
            self.produced_bytes.load(Relaxed),
        );
        counter(
            "tailgate_transactions_total",
            "Source transactions handed to the sink.",
            self.transactions.load(Relaxed),
        );
        counter("tailgate_source_reconnects_total", "Reconnections to the source.", self.reconnects.load(Relaxed));
        counter("tailgate_snapshot_rows_total", "Rows read by the initial snapshot.", self.snapshot_rows.load(Relaxed));
        let inc = &self.incremental;
        counter("tailgate_incremental_rows_total", "Rows emitted by incremental snapshots.", inc.rows.load(Relaxed));
        counter(
            "tailgate_incremental_rows_dropped_total",
            "Incremental snapshot rows dropped because the stream changed their key meanwhile.",
            inc.dropped.load(Relaxed),
        );
        counter("tailgate_incremental_chunks_total", "Incremental snapshot chunks emitted.", inc.chunks.load(Relaxed));
        counter(
            "tailgate_incremental_chunk_retries_total",
            "Incremental snapshot chunks read again (a transaction the read could not place, a truncate).",
            inc.retries.load(Relaxed),
        );

        let mut gauge = |name: &str, help: &str, v: i64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{connector=\"{c}\"}} {v}");
        };
        gauge(
            "tailgate_checkpoint_position",
            "Acknowledged position (PostgreSQL: LSN as a number).",
            self.checkpoint_position.load(Relaxed) as i64,
        );
        gauge(
            "tailgate_source_lag_bytes",
            "Log bytes written by the source database and not yet confirmed (-1: unknown).",
            self.source_lag_bytes.load(Relaxed),
        );
        gauge(
            "tailgate_in_flight_records",
            "Records handed to the sink and not yet acknowledged.",
            self.in_flight_records.load(Relaxed) as i64,
        );
        gauge(
            "tailgate_snapshot_rows_remaining",
            "Estimated rows the initial snapshot has still to read.",
            self.snapshot_rows_remaining.load(Relaxed).max(0),
        );
        gauge(
            "tailgate_incremental_snapshots_pending",
            "Incremental snapshots queued, running or paused.",
            inc.pending.load(Relaxed),
        );
        gauge(
            "tailgate_source_connected",
            "1 while streaming from the source.",
            i64::from(self.source_connected.load(Relaxed)),
        );
        gauge("tailgate_ready", "1 when /ready answers 200.", i64::from(self.readiness(ready_window).is_ok()));
        gauge(
            "tailgate_leader",
            "1 while this instance streams (always, without high availability); 0 while standby.",
            i64::from(!self.standby.load(Relaxed)),
        );
        gauge(
            "tailgate_last_progress_timestamp_seconds",
            "Unix time the acknowledged position last moved.",
            (self.last_progress_ms.load(Relaxed) / 1000) as i64,
        );

        histogram(
            &mut out,
            &c,
            "tailgate_delivery_lag_seconds",
            "Seconds from source commit to sink acknowledgement, per transaction.",
            &self.delivery_lag,
        );
        histogram(
            &mut out,
            &c,
            "tailgate_incremental_chunk_seconds",
            "Seconds from reading an incremental snapshot chunk to emitting it.",
            &inc.chunk_latency,
        );

        let _ = writeln!(out, "# HELP tailgate_table_events_read_total Change events read, per table.");
        let _ = writeln!(out, "# TYPE tailgate_table_events_read_total counter");
        for (table, n) in self.tables.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ =
                writeln!(out, "tailgate_table_events_read_total{{connector=\"{c}\",table=\"{}\"}} {n}", escape(table));
        }
        let _ = writeln!(out, "# HELP tailgate_errors_total Errors, by kind.");
        let _ = writeln!(out, "# TYPE tailgate_errors_total counter");
        for (kind, n) in self.errors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "tailgate_errors_total{{connector=\"{c}\",kind=\"{kind}\"}} {n}");
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_batch_counts() {
        let m = Metrics::new("shop");
        let mut counts = BatchCounts { read: 3, filtered: 1, transactions: 2, ..Default::default() };
        counts.per_table.insert("public.orders".into(), 3);
        m.apply_batch(&counts);
        m.delivery_lag.observe(0.2);
        m.error("source_transient");
        let text = m.render(Duration::from_secs(60));
        assert!(text.contains("tailgate_events_read_total{connector=\"shop\"} 3"), "{text}");
        assert!(text.contains("tailgate_table_events_read_total{connector=\"shop\",table=\"public.orders\"} 3"));
        assert!(text.contains("tailgate_delivery_lag_seconds_bucket{connector=\"shop\",le=\"0.25\"} 1"));
        assert!(text.contains("tailgate_delivery_lag_seconds_bucket{connector=\"shop\",le=\"0.1\"} 0"));
        assert!(text.contains("tailgate_errors_total{connector=\"shop\",kind=\"source_transient\"} 1"));
    }

    #[test]
    fn readiness_tolerates_idle_but_not_stalls() {
        let m = Metrics::new("x");
        assert!(m.readiness(Duration::from_secs(5)).is_err(), "not connected yet");
        m.source_connected.store(true, Relaxed);
        m.source_active();
        assert!(m.readiness(Duration::from_secs(5)).is_ok(), "idle and answering");
        m.in_flight_records.store(10, Relaxed);
        m.last_progress_ms.store(now_ms() - 10_000, Relaxed);
        let err = m.readiness(Duration::from_secs(5)).unwrap_err();
        assert!(err.contains("unacknowledged"), "{err}");
        m.set_fatal("boom".into());
        assert!(m.health().is_err());
    }
}
