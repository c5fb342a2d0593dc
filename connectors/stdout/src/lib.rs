//! The stdout sink: one JSON line per record, `{"topic":..,"key":..,"value":..}`.
//!
//! For local use, piping into `jq`, and benchmarks. A record counts as acknowledged once it has
//! been flushed to the output. Flushes are coalesced (at most one per 5 ms while batches keep
//! coming) so that small batches do not cost a system call each; nothing is acknowledged before its
//! flush.

use std::io::Write;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tailgate_core::envelope::write_str;
use tailgate_pipeline::{
    BoxFuture, CheckResult, Checkpoint, Encoder, KeyError, Sink, SinkBuilder, SinkContext, SinkError, SinkItem,
    SinkTotals,
};

/// `[sink]` with `type = "stdout"`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutConfig {
    /// Default: the connector name.
    pub topic_prefix: Option<String>,
}

impl SinkBuilder for StdoutConfig {
    fn kind(&self) -> &'static str {
        "stdout"
    }

    fn validate(&self) -> Result<(), KeyError> {
        Ok(())
    }

    fn topic_prefix(&self) -> Option<&str> {
        self.topic_prefix.as_deref()
    }

    /// No destination limit: a pipe takes lines of any length.
    fn max_record_bytes(&self) -> Option<usize> {
        None
    }

    fn build(&self, ctx: SinkContext) -> Result<Box<dyn Sink>, SinkError> {
        Ok(Box::new(StdoutSink::new(Box::new(std::io::stdout()), Encoder::new(ctx.encoder))))
    }

    fn check<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Vec<CheckResult>> {
        Box::pin(async { vec![CheckResult::ok("sink", "stdout")] })
    }
}

pub struct StdoutSink {
    out: Box<dyn Write + Send>,
    /// Lines are rendered straight into this buffer, written out when it fills and at flushes.
    buf: Vec<u8>,
    encoder: Encoder,
    /// The newest commit written but not yet flushed.
    written: Option<Checkpoint>,
    /// The newest commit flushed, not yet reported.
    acked: Option<Checkpoint>,
    last_flush: Instant,
    totals: SinkTotals,
}

const FLUSH_EVERY: Duration = Duration::from_millis(5);
const BUFFER: usize = 256 * 1024;

impl StdoutSink {
    pub fn new(out: Box<dyn Write + Send>, encoder: Encoder) -> Self {
        StdoutSink {
            out,
            buf: Vec::with_capacity(BUFFER + 64 * 1024),
            encoder,
            written: None,
            acked: None,
            last_flush: Instant::now(),
            totals: SinkTotals::default(),
        }
    }

    fn write_batch(&mut self, batch: &[SinkItem]) -> Result<Option<Checkpoint>, SinkError> {
        self.encoder.begin_batch();
        let mut last_commit = None;
        for item in batch {
            if let SinkItem::Commit(position) = item {
                last_commit = Some(position.clone());
                continue;
            }
            let line: &mut Vec<u8> = &mut self.buf;
            let totals = &mut self.totals;
            self.encoder.encode(item, |record, prepared| {
                totals.delivered += 1;
                totals.dead_lettered += u64::from(prepared.dead_letter);
                totals.bytes += (record.key.map_or(0, <[u8]>::len) + record.value.map_or(0, <[u8]>::len)) as u64;
                line.extend_from_slice(b"{\"topic\":");
                write_str(line, record.topic);
                line.extend_from_slice(b",\"key\":");
                push_json_or_string(line, record.key, prepared.raw);
                line.extend_from_slice(b",\"value\":");
                push_json_or_string(line, record.value, prepared.raw);
                if !record.headers.is_empty() {
                    line.extend_from_slice(b",\"headers\":{");
                    for (i, (k, v)) in record.headers.iter().enumerate() {
                        if i > 0 {
                            line.push(b',');
                        }
                        write_str(line, k);
                        line.push(b':');
                        write_str(line, &String::from_utf8_lossy(v));
                    }
                    line.push(b'}');
                }
                line.extend_from_slice(b"}\n");
            })?;
            if self.buf.len() >= BUFFER {
                self.out.write_all(&self.buf).map_err(|source| SinkError::Io { what: "stdout", source })?;
                self.buf.clear();
            }
        }
        Ok(last_commit)
    }

    /// Writes a batch; flushes when the last flush is old enough (see the module doc).
    fn write(&mut self, batch: Vec<SinkItem>) -> Result<(), SinkError> {
        let committed = self.write_batch(&batch)?;
        if committed.is_some() {
            self.written = committed;
        }
        if self.last_flush.elapsed() >= FLUSH_EVERY {
            self.flush_now()?;
        }
        Ok(())
    }

    fn flush_now(&mut self) -> Result<(), SinkError> {
        let io = |source| SinkError::Io { what: "stdout", source };
        self.out.write_all(&self.buf).map_err(io)?;
        self.buf.clear();
        self.out.flush().map_err(io)?;
        self.last_flush = Instant::now();
        if let Some(p) = self.written.take() {
            self.acked = Some(p);
        }
        Ok(())
    }
}

/// Envelopes are JSON by construction; raw keys and values (outbox, dead letters) are embedded as
/// JSON when they are, else as a JSON string (an aggregate id, a text payload).
fn push_json_or_string(line: &mut Vec<u8>, bytes: Option<&[u8]>, raw: bool) {
    match bytes {
        None => line.extend_from_slice(b"null"),
        Some(b) if !raw || serde_json::from_slice::<serde::de::IgnoredAny>(b).is_ok() => line.extend_from_slice(b),
        Some(b) => write_str(line, &String::from_utf8_lossy(b)),
    }
}

impl Sink for StdoutSink {
    fn send(&mut self, batch: Vec<SinkItem>) -> BoxFuture<'_, Result<(), SinkError>> {
        let result = self.write(batch);
        Box::pin(std::future::ready(result))
    }

    /// Called after every batch and on the run loop's 20 ms tick: written data is flushed within
    /// 20 ms even when no more batches come.
    fn poll_acks(&mut self) -> Result<Option<Checkpoint>, SinkError> {
        if self.written.is_some() && self.last_flush.elapsed() >= FLUSH_EVERY {
            self.flush_now()?;
        }
        Ok(self.acked.take())
    }

    fn flush(&mut self, _timeout: Duration) -> BoxFuture<'_, Result<Option<Checkpoint>, SinkError>> {
        let result = self.flush_now().map(|()| self.acked.take());
        Box::pin(std::future::ready(result))
    }

    fn in_flight(&self) -> usize {
        0
    }

    fn totals(&self) -> SinkTotals {
        self.totals
    }
}
