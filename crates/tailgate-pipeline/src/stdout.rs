//! The stdout sink: one JSON line per record, `{"topic":..,"key":..,"value":..}`.
//!
//! For local use, piping into `jq`, and benchmarks. A record counts as acknowledged once its batch
//! has been written and flushed to the output.

use std::io::{BufWriter, Write};
use std::time::Duration;

use tailgate_core::Position;
use tailgate_core::envelope::write_str;

use crate::encode::Encoder;
use crate::sink::{Sink, SinkError};
use crate::source::{Batch, Item};

pub struct StdoutSink {
    out: BufWriter<Box<dyn Write + Send>>,
    encoder: Encoder,
    acked: Option<Position>,
    records: u64,
    bytes: u64,
}

impl StdoutSink {
    pub fn new(out: Box<dyn Write + Send>, encoder: Encoder) -> Self {
        StdoutSink { out: BufWriter::with_capacity(256 * 1024, out), encoder, acked: None, records: 0, bytes: 0 }
    }

    fn write_batch(&mut self, batch: &Batch) -> std::io::Result<Option<Position>> {
        self.encoder.begin_batch();
        let mut last_commit = None;
        let mut line = Vec::with_capacity(4096);
        let mut result = Ok(());
        for item in batch {
            match item {
                Item::Event(event) => {
                    let out = &mut self.out;
                    let (records, bytes) = (&mut self.records, &mut self.bytes);
                    self.encoder.encode(event, |record| {
                        *records += 1;
                        *bytes += (record.key.map_or(0, <[u8]>::len) + record.value.map_or(0, <[u8]>::len)) as u64;
                        line.clear();
                        line.extend_from_slice(b"{\"topic\":");
                        write_str(&mut line, record.topic);
                        line.extend_from_slice(b",\"key\":");
                        line.extend_from_slice(record.key.unwrap_or(b"null"));
                        line.extend_from_slice(b",\"value\":");
                        line.extend_from_slice(record.value.unwrap_or(b"null"));
                        line.extend_from_slice(b"}\n");
                        if result.is_ok() {
                            result = out.write_all(&line);
                        }
                    });
                    result.as_ref().map_err(|e| std::io::Error::new(e.kind(), e.to_string()))?;
                }
                Item::Commit(position) => last_commit = Some(position.clone()),
            }
        }
        self.out.flush()?;
        Ok(last_commit)
    }
}

impl Sink for StdoutSink {
    async fn send(&mut self, batch: Batch) -> Result<(), SinkError> {
        let committed = self.write_batch(&batch).map_err(|source| SinkError::Io { what: "stdout", source })?;
        if committed.is_some() {
            self.acked = committed;
        }
        Ok(())
    }

    fn poll_acks(&mut self) -> Result<Option<Position>, SinkError> {
        Ok(self.acked.take())
    }

    async fn flush(&mut self, _timeout: Duration) -> Result<Option<Position>, SinkError> {
        self.out.flush().map_err(|source| SinkError::Io { what: "stdout", source })?;
        Ok(self.acked.take())
    }

    fn in_flight(&self) -> usize {
        0
    }

    fn totals(&self) -> (u64, u64) {
        (self.records, self.bytes)
    }
}
