//! Debezium's wire format, as its JSON converter writes it with schemas disabled.
//!
//! Value: `{"before","after","source","transaction","op","ts_ms","ts_us","ts_ns"}`; key: the key
//! columns as an object (`{"id":1}`), or no key at all when the table has none. Rendering writes
//! straight into a caller-owned buffer that the sink reuses, so a steady stream allocates nothing
//! here beyond what `base64` needs for binary values.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;

use crate::event::{ChangeEvent, Event, LogicalMessage, SourceInfo, TableSchema};
use crate::value::{Decimal, Value};

/// `source.version` as a JSON string (a version needs no escaping).
const VERSION_JSON: &str = concat!("\"", env!("CARGO_PKG_VERSION"), "\"");

/// The placeholder Debezium writes for a value the log did not carry (unchanged TOAST).
pub const UNAVAILABLE_VALUE: &str = "__debezium_unavailable_value";

/// How exact decimals are written (Debezium's `decimal.handling.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecimalHandling {
    /// Base64 of the unscaled two's-complement bytes (Kafka Connect `Decimal`); unconstrained
    /// columns as `{"scale": n, "value": base64}` (Debezium `VariableScaleDecimal`).
    #[default]
    Precise,
    /// The plain decimal text, e.g. `"1234.50"`.
    String,
    /// A JSON number (may lose precision).
    Double,
}

/// How `BIGINT UNSIGNED` values are written (Debezium's `bigint.unsigned.handling.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BigIntUnsignedHandling {
    /// A JSON number. Debezium writes a Java `long` here, which turns values above 2^63-1 negative;
    /// tailgate writes the true value (a consumer parsing it as a signed 64-bit integer must widen).
    #[default]
    Long,
    /// Kafka Connect `Decimal` with scale 0: base64 of the two's-complement bytes.
    Precise,
}

/// What decides the wire form of a single value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ValueFormat {
    pub decimals: DecimalHandling,
    pub bigint_unsigned: BigIntUnsignedHandling,
}

#[derive(Debug, Clone, Default)]
pub struct FormatOptions {
    pub decimal_handling: DecimalHandling,
    pub bigint_unsigned_handling: BigIntUnsignedHandling,
    /// Fill `transaction` (Debezium `provide.transaction.metadata`); `null` otherwise.
    pub transaction_metadata: bool,
}

impl FormatOptions {
    pub fn value_format(&self) -> ValueFormat {
        ValueFormat { decimals: self.decimal_handling, bigint_unsigned: self.bigint_unsigned_handling }
    }
}

/// Processing time stamped on events, taken once per batch.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub unix_micros: i64,
}

impl Now {
    pub fn system() -> Now {
        let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Now { unix_micros: d.as_micros() as i64 }
    }
}

/// What stays the same for every event of one table version, rendered once: the column keys and
/// the table's names as `source` shows them. Holds the table's `Arc`, so the pointer it is cached
/// under cannot be reused by another table while the entry lives.
struct TableJson {
    _table: Arc<TableSchema>,
    /// `"column":` for every column, one after another; `ends[i]` is where column i's ends.
    keys: Vec<u8>,
    ends: Vec<usize>,
    /// JSON strings of the schema (PostgreSQL) / database (MySQL) and the table.
    schema: Vec<u8>,
    table: Vec<u8>,
}

impl TableJson {
    fn new(table: &Arc<TableSchema>) -> TableJson {
        let mut keys = Vec::with_capacity(table.columns.len() * 12);
        let mut ends = Vec::with_capacity(table.columns.len());
        for col in &table.columns {
            write_str(&mut keys, &col.name);
            keys.push(b':');
            ends.push(keys.len());
        }
        let (mut schema, mut name) = (Vec::new(), Vec::new());
        write_str(&mut schema, &table.id.schema);
        write_str(&mut name, &table.id.table);
        TableJson { _table: table.clone(), keys, ends, schema, table: name }
    }

    /// `"column":` of column `i`.
    fn key(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.keys[start..self.ends[i]]
    }
}

/// Renders keys and envelopes, caching per table what does not change from event to event (column
/// keys, names): the hot path then copies bytes instead of escaping the same strings again.
#[derive(Default)]
pub struct Renderer {
    tables: HashMap<usize, TableJson>,
    /// The table of the previous event: runs of one table skip the map.
    last: usize,
    /// `,"ts_ms":..,"ts_us":..,"ts_ns":..` of the batch's processing time, rendered once per batch.
    now: (i64, Vec<u8>),
    snapshot_source: SnapshotSource,
}

/// The `source` block of the previous snapshot read. Reads of one table share it entirely (same
/// consistent point, same start time), so a snapshot renders it once per table, not once per row.
/// Streamed changes differ in their position and are always rendered.
#[derive(Default)]
struct SnapshotSource {
    /// Held, so that its address cannot be reused by another table while cached.
    table: Option<Arc<TableSchema>>,
    source: Option<SourceInfo>,
    json: Vec<u8>,
}

impl SnapshotSource {
    fn write(&mut self, out: &mut Vec<u8>, table: &Arc<TableSchema>, source: &SourceInfo, json: &TableJson) {
        let is_read = match source {
            SourceInfo::Postgres(pg) => pg.snapshot == "true",
            SourceInfo::Mysql(my) => my.snapshot == "true",
        };
        if !is_read {
            return write_source(out, source, Some(json));
        }
        if self.table.as_ref().is_some_and(|t| Arc::ptr_eq(t, table)) && self.source.as_ref() == Some(source) {
            return out.extend_from_slice(&self.json);
        }
        let start = out.len();
        write_source(out, source, Some(json));
        self.json.clear();
        self.json.extend_from_slice(&out[start..]);
        self.table = Some(table.clone());
        self.source = Some(source.clone());
    }
}

/// Tables cached at most; beyond, the cache starts over (schema changes create new table versions).
const MAX_CACHED_TABLES: usize = 4096;

impl Renderer {
    fn table(&mut self, table: &Arc<TableSchema>) -> &TableJson {
        let key = Arc::as_ptr(table) as usize;
        if key != self.last && !self.tables.contains_key(&key) && self.tables.len() >= MAX_CACHED_TABLES {
            self.tables.clear();
        }
        self.last = key;
        self.tables.entry(key).or_insert_with(|| TableJson::new(table))
    }

    /// Writes the record key into `out`. Returns `false` (and writes nothing) when the event has no
    /// key. Key values are written exactly as the same values in the envelope.
    pub fn write_key(&mut self, event: &Event, opts: &FormatOptions, out: &mut Vec<u8>) -> bool {
        match event {
            Event::Change(change) => {
                if !change.table.has_key() {
                    return false;
                }
                let Some(row) = change.key_row() else { return false };
                let json = self.table(&change.table);
                out.push(b'{');
                let mut first = true;
                for (i, (col, value)) in change.table.columns.iter().zip(row).enumerate() {
                    if !col.key {
                        continue;
                    }
                    if !first {
                        out.push(b',');
                    }
                    first = false;
                    out.extend_from_slice(json.key(i));
                    write_value(out, value, opts.value_format());
                }
                out.push(b'}');
                true
            }
            Event::Message(message) => write_message_key(message, out),
        }
    }

    /// Writes the Debezium envelope of `event` into `out`.
    pub fn write_envelope(&mut self, event: &Event, opts: &FormatOptions, now: Now, out: &mut Vec<u8>) {
        if self.now.0 != now.unix_micros || self.now.1.is_empty() {
            self.now.0 = now.unix_micros;
            self.now.1.clear();
            write_ts(&mut self.now.1, now);
        }
        match event {
            Event::Change(change) => {
                let key = Arc::as_ptr(&change.table) as usize;
                if key != self.last || !self.tables.contains_key(&key) {
                    self.table(&change.table);
                }
                let json = &self.tables[&key];
                write_change(change, json, opts, &self.now.1, out, |out| {
                    self.snapshot_source.write(out, &change.table, &change.source, json)
                })
            }
            Event::Message(message) => write_message(message, &self.now.1, out),
        }
    }
}

fn write_message_key(message: &LogicalMessage, out: &mut Vec<u8>) -> bool {
    out.extend_from_slice(b"{\"prefix\":");
    write_str(out, &message.prefix);
    out.push(b'}');
    true
}

/// Writes the record key into `out` (see [`Renderer::write_key`]).
pub fn write_key(event: &Event, opts: &FormatOptions, out: &mut Vec<u8>) -> bool {
    match event {
        Event::Change(_) => Renderer::default().write_key(event, opts, out),
        Event::Message(message) => write_message_key(message, out),
    }
}

/// Writes the Debezium envelope of `event` into `out` (see [`Renderer::write_envelope`]).
pub fn write_envelope(event: &Event, opts: &FormatOptions, now: Now, out: &mut Vec<u8>) {
    Renderer::default().write_envelope(event, opts, now, out)
}

fn write_change(
    change: &ChangeEvent,
    json: &TableJson,
    opts: &FormatOptions,
    now: &[u8],
    out: &mut Vec<u8>,
    write_source: impl FnOnce(&mut Vec<u8>),
) {
    let format = opts.value_format();
    out.extend_from_slice(b"{\"before\":");
    write_row(out, json, change.before.as_deref(), format);
    out.extend_from_slice(b",\"after\":");
    write_row(out, json, change.after.as_deref(), format);
    out.extend_from_slice(b",\"source\":");
    write_source(out);
    out.extend_from_slice(b",\"transaction\":");
    if opts.transaction_metadata {
        out.extend_from_slice(b"{\"id\":");
        match &change.source {
            SourceInfo::Postgres(pg) => {
                let _ = write!(out, "\"{}:{}\"", pg.txid, pg.lsn);
            }
            // As Debezium: the GTID, or the binlog coordinates of the transaction's start.
            SourceInfo::Mysql(my) => match &my.gtid {
                Some(gtid) => write_str(out, gtid),
                None => {
                    let _ = write!(out, "\"file={},pos={}\"", my.file, my.txn_pos);
                }
            },
        }
        out.extend_from_slice(b",\"total_order\":null,\"data_collection_order\":null}");
    } else {
        out.extend_from_slice(b"null");
    }
    out.extend_from_slice(b",\"op\":\"");
    out.extend_from_slice(change.op.code().as_bytes());
    out.push(b'"');
    out.extend_from_slice(now);
    out.push(b'}');
}

fn write_message(message: &LogicalMessage, now: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"op\":\"m\"");
    out.extend_from_slice(now);
    out.extend_from_slice(b",\"source\":");
    write_source(out, &message.source, None);
    out.extend_from_slice(b",\"message\":{\"prefix\":");
    write_str(out, &message.prefix);
    out.extend_from_slice(b",\"content\":");
    write_base64(out, &message.content);
    out.extend_from_slice(b"}}");
}

/// The processing time, as milliseconds, microseconds and nanoseconds (digits formatted once:
/// milliseconds drop the last three digits, nanoseconds append `000`).
fn write_ts(out: &mut Vec<u8>, now: Now) {
    let t = TimeDigits::new(now.unix_micros);
    out.extend_from_slice(b",\"ts_ms\":");
    t.ms(out);
    out.extend_from_slice(b",\"ts_us\":");
    t.us(out);
    out.extend_from_slice(b",\"ts_ns\":");
    t.ns(out);
}

/// One instant's digits, formatted once and written as milliseconds, microseconds or nanoseconds.
struct TimeDigits {
    micros: i64,
    digits: [u8; 20],
    len: usize,
}

impl TimeDigits {
    fn new(micros: i64) -> Self {
        let mut buf = itoa::Buffer::new();
        let text = buf.format(micros).as_bytes();
        let mut digits = [0u8; 20];
        digits[..text.len()].copy_from_slice(text);
        TimeDigits { micros, digits, len: text.len() }
    }

    /// Whether the digit tricks below are exact (positive, at least 1000).
    fn plain(&self) -> bool {
        self.micros >= 1000
    }

    fn ms(&self, out: &mut Vec<u8>) {
        if self.plain() {
            out.extend_from_slice(&self.digits[..self.len - 3]);
        } else {
            write_int(out, self.micros.div_euclid(1000));
        }
    }

    fn us(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.digits[..self.len]);
    }

    fn ns(&self, out: &mut Vec<u8>) {
        if self.plain() {
            out.extend_from_slice(&self.digits[..self.len]);
            out.extend_from_slice(b"000");
        } else {
            write_nanos(out, self.micros);
        }
    }
}

/// Microseconds as nanoseconds: i64 arithmetic until 2262, i128 beyond.
fn write_nanos(out: &mut Vec<u8>, micros: i64) {
    match micros.checked_mul(1000) {
        Some(n) => write_int(out, n),
        None => write_int(out, i128::from(micros) * 1000),
    }
}

fn write_row(out: &mut Vec<u8>, json: &TableJson, row: Option<&[Value]>, format: ValueFormat) {
    let Some(row) = row else {
        out.extend_from_slice(b"null");
        return;
    };
    out.push(b'{');
    for (i, value) in row.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(json.key(i));
        write_value(out, value, format);
    }
    out.push(b'}');
}

fn write_source(out: &mut Vec<u8>, source: &SourceInfo, table: Option<&TableJson>) {
    match source {
        SourceInfo::Postgres(pg) => {
            let t = TimeDigits::new(pg.commit_ts_us);
            out.extend_from_slice(b"{\"version\":");
            out.extend_from_slice(VERSION_JSON.as_bytes());
            out.extend_from_slice(b",\"connector\":\"postgresql\",\"name\":");
            write_str(out, &pg.name);
            out.extend_from_slice(b",\"ts_ms\":");
            t.ms(out);
            out.extend_from_slice(b",\"snapshot\":\"");
            out.extend_from_slice(pg.snapshot.as_bytes());
            out.extend_from_slice(b"\",\"db\":");
            write_str(out, &pg.db);
            out.extend_from_slice(b",\"sequence\":");
            match pg.last_commit_lsn {
                Some(last) => {
                    out.extend_from_slice(b"\"[\\\"");
                    write_int(out, last);
                    out.extend_from_slice(b"\\\",\\\"");
                    write_int(out, pg.lsn);
                    out.extend_from_slice(b"\\\"]\"");
                }
                None => {
                    out.extend_from_slice(b"\"[null,\\\"");
                    write_int(out, pg.lsn);
                    out.extend_from_slice(b"\\\"]\"");
                }
            }
            out.extend_from_slice(b",\"ts_us\":");
            t.us(out);
            out.extend_from_slice(b",\"ts_ns\":");
            t.ns(out);
            out.extend_from_slice(b",\"schema\":");
            match table {
                Some(t) => out.extend_from_slice(&t.schema),
                None => out.extend_from_slice(b"\"\""),
            }
            out.extend_from_slice(b",\"table\":");
            match table {
                Some(t) => out.extend_from_slice(&t.table),
                None => out.extend_from_slice(b"\"\""),
            }
            out.extend_from_slice(b",\"txId\":");
            write_int(out, pg.txid);
            out.extend_from_slice(b",\"lsn\":");
            write_int(out, pg.lsn);
            out.extend_from_slice(b",\"xmin\":null}");
        }
        SourceInfo::Mysql(my) => {
            out.extend_from_slice(b"{\"version\":");
            out.extend_from_slice(VERSION_JSON.as_bytes());
            out.extend_from_slice(b",\"connector\":\"");
            out.extend_from_slice(my.connector.as_bytes());
            out.extend_from_slice(b"\",\"name\":");
            write_str(out, &my.name);
            let t = TimeDigits::new(my.ts_us);
            out.extend_from_slice(b",\"ts_ms\":");
            t.ms(out);
            out.extend_from_slice(b",\"snapshot\":\"");
            out.extend_from_slice(my.snapshot.as_bytes());
            out.extend_from_slice(b"\",\"db\":");
            match table {
                Some(t) => out.extend_from_slice(&t.schema),
                None => out.extend_from_slice(b"\"\""),
            }
            out.extend_from_slice(b",\"sequence\":null,\"ts_us\":");
            t.us(out);
            out.extend_from_slice(b",\"ts_ns\":");
            t.ns(out);
            out.extend_from_slice(b",\"table\":");
            match table {
                Some(t) => out.extend_from_slice(&t.table),
                None => out.extend_from_slice(b"null"),
            }
            out.extend_from_slice(b",\"server_id\":");
            write_int(out, my.server_id);
            out.extend_from_slice(b",\"gtid\":");
            match &my.gtid {
                Some(g) => write_str(out, g),
                None => out.extend_from_slice(b"null"),
            }
            out.extend_from_slice(b",\"file\":");
            write_str(out, &my.file);
            out.extend_from_slice(b",\"pos\":");
            write_int(out, my.pos);
            out.extend_from_slice(b",\"row\":");
            write_int(out, my.row);
            out.extend_from_slice(b",\"thread\":");
            match my.thread {
                Some(t) => write_int(out, t),
                None => out.extend_from_slice(b"null"),
            }
            out.extend_from_slice(b",\"query\":");
            match &my.query {
                Some(q) => write_str(out, q),
                None => out.extend_from_slice(b"null"),
            }
            out.push(b'}');
        }
    }
}

/// Writes one value. Public so that sinks and tests render single values exactly as the envelope does.
pub fn write_value(out: &mut Vec<u8>, value: &Value, format: ValueFormat) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Int(i) => write_int(out, *i),
        Value::UInt(u) => match format.bigint_unsigned {
            BigIntUnsignedHandling::Long => write_int(out, *u),
            BigIntUnsignedHandling::Precise => {
                write_base64(out, crate::value::minimal_slice(&i128::from(*u).to_be_bytes()))
            }
        },
        Value::Float(f) => write_float(out, *f),
        Value::Float32(f) => write_float32(out, *f),
        Value::String(s) => write_str(out, s),
        Value::Bytes(b) => write_base64(out, b),
        Value::Decimal(d) => write_decimal(out, d, format.decimals),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item, format);
            }
            out.push(b']');
        }
        Value::Struct(fields) => {
            out.push(b'{');
            for (i, (name, field)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, name);
                out.push(b':');
                write_value(out, field, format);
            }
            out.push(b'}');
        }
        Value::Unavailable { binary: false } => write_str(out, UNAVAILABLE_VALUE),
        Value::Unavailable { binary: true } => write_base64(out, UNAVAILABLE_VALUE.as_bytes()),
    }
}

fn write_float(out: &mut Vec<u8>, f: f64) {
    if f.is_finite() {
        // serde_json prints the shortest text that round-trips, as Java's Double.toString does for
        // every value a consumer would compare.
        let _ = serde_json::to_writer(&mut *out, &f);
    } else {
        // NaN and infinities have no JSON form: written as strings (documented in docs/types.md).
        let s = if f.is_nan() {
            "NaN"
        } else if f > 0.0 {
            "Infinity"
        } else {
            "-Infinity"
        };
        write_str(out, s);
    }
}

fn write_float32(out: &mut Vec<u8>, f: f32) {
    if f.is_finite() {
        // The shortest text that round-trips as an f32, as Java's Float.toString does.
        let _ = serde_json::to_writer(&mut *out, &f);
    } else {
        write_float(out, f64::from(f));
    }
}

fn write_decimal(out: &mut Vec<u8>, d: &Decimal, mode: DecimalHandling) {
    match mode {
        DecimalHandling::Precise => {
            if d.declared_scale.is_none() {
                let _ = write!(out, "{{\"scale\":{},\"value\":", d.scale());
            }
            match d.unscaled_i128() {
                Some(v) => write_base64(out, crate::value::minimal_slice(&v.to_be_bytes())),
                None => write_base64(out, &d.unscaled_bytes()),
            }
            if d.declared_scale.is_none() {
                out.push(b'}');
            }
        }
        DecimalHandling::String => write_str(out, &d.text),
        DecimalHandling::Double => match d.text.parse::<f64>() {
            Ok(f) => write_float(out, f),
            Err(_) => out.extend_from_slice(b"null"),
        },
    }
}

fn write_base64(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    let start = out.len();
    out.resize(start + base64::encoded_len(bytes.len(), true).unwrap_or(0), 0);
    let written = BASE64.encode_slice(bytes, &mut out[start..]).unwrap_or(0);
    out.truncate(start + written);
    out.push(b'"');
}

fn write_int(out: &mut Vec<u8>, i: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(i).as_bytes());
}

/// A JSON string literal with the escapes JSON requires.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    // Fast path: most strings need no escape at all. The check has no early exit, so that it
    // compiles to a vectorized loop.
    let needs_escape = bytes.iter().fold(false, |acc, &b| acc | (b < 0x20) | (b == b'"') | (b == b'\\'));
    if !needs_escape {
        out.reserve(bytes.len() + 2);
        out.push(b'"');
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1F => {
                out.extend_from_slice(&bytes[start..i]);
                let _ = write!(out, "\\u{b:04x}");
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escape);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::event::{ColumnSchema, Op, PgSourceBlock, TableId, TableSchema};

    fn table(keyed: bool) -> Arc<TableSchema> {
        Arc::new(TableSchema {
            id: TableId { schema: "public".into(), table: "orders".into() },
            columns: vec![
                ColumnSchema { name: "id".into(), key: keyed },
                ColumnSchema { name: "note".into(), key: false },
            ],
        })
    }

    fn source() -> SourceInfo {
        SourceInfo::Postgres(PgSourceBlock {
            name: "shop".into(),
            db: "shop".into(),
            commit_ts_us: 1_700_000_000_123_456,
            txid: 771,
            lsn: 24023128,
            last_commit_lsn: Some(24023000),
            snapshot: "false",
        })
    }

    fn render(event: &Event) -> serde_json::Value {
        let mut out = Vec::new();
        write_envelope(event, &FormatOptions::default(), Now { unix_micros: 1_700_000_001_000_000 }, &mut out);
        serde_json::from_slice(&out).expect("envelope is valid JSON")
    }

    #[test]
    fn create_envelope_has_debezium_shape() {
        let event = Event::Change(ChangeEvent {
            op: Op::Create,
            table: table(true),
            before: None,
            after: Some(vec![Value::Int(1), Value::String("a \"quoted\"\nline".into())]),
            source: source(),
        });
        let v = render(&event);
        assert_eq!(v["op"], "c");
        assert_eq!(v["before"], serde_json::Value::Null);
        assert_eq!(v["after"]["id"], 1);
        assert_eq!(v["after"]["note"], "a \"quoted\"\nline");
        assert_eq!(v["source"]["connector"], "postgresql");
        assert_eq!(v["source"]["ts_ms"], 1_700_000_000_123i64);
        assert_eq!(v["source"]["sequence"], "[\"24023000\",\"24023128\"]");
        assert_eq!(v["source"]["lsn"], 24023128);
        assert_eq!(v["source"]["txId"], 771);
        assert_eq!(v["source"]["schema"], "public");
        assert_eq!(v["source"]["table"], "orders");
        assert_eq!(v["ts_ms"], 1_700_000_001_000i64);
        assert_eq!(v["transaction"], serde_json::Value::Null);
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        for k in ["before", "after", "source", "transaction", "op", "ts_ms"] {
            assert!(keys.contains(&k.to_string()), "missing {k}");
        }

        let mut key = Vec::new();
        assert!(write_key(&event, &FormatOptions::default(), &mut key));
        assert_eq!(key, br#"{"id":1}"#);
    }

    #[test]
    fn snapshot_reads_reuse_their_source_block_only_while_it_is_the_same() {
        let orders = table(true);
        let other = Arc::new(TableSchema {
            id: TableId { schema: "public".into(), table: "other".into() },
            ..(*orders).clone()
        });
        let read = |table: &Arc<TableSchema>, lsn: u64, mark: &'static str| {
            let SourceInfo::Postgres(mut pg) = source() else { unreachable!() };
            (pg.lsn, pg.snapshot) = (lsn, mark);
            Event::Change(ChangeEvent {
                op: Op::Read,
                table: table.clone(),
                before: None,
                after: Some(vec![Value::Int(1), Value::Null]),
                source: SourceInfo::Postgres(pg),
            })
        };
        let events = [
            read(&orders, 1, "true"),
            read(&orders, 1, "true"),
            read(&other, 1, "true"),
            read(&orders, 2, "true"),
            read(&orders, 2, "last"),
        ];
        let mut renderer = Renderer::default();
        let now = Now { unix_micros: 1_700_000_001_000_000 };
        for event in &events {
            let mut out = Vec::new();
            renderer.write_envelope(event, &FormatOptions::default(), now, &mut out);
            let rendered: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(rendered, render(event), "a cached block must equal a fresh rendering");
        }
        // The `last` read is rendered, not cached: the block of the reads before it stays.
        assert!(
            matches!(&renderer.snapshot_source.source, Some(SourceInfo::Postgres(pg)) if pg.lsn == 2 && pg.snapshot == "true")
        );
    }

    #[test]
    fn table_without_key_has_null_key() {
        let event = Event::Change(ChangeEvent {
            op: Op::Create,
            table: table(false),
            before: None,
            after: Some(vec![Value::Int(1), Value::Null]),
            source: source(),
        });
        let mut key = Vec::new();
        assert!(!write_key(&event, &FormatOptions::default(), &mut key));
        assert!(key.is_empty());
    }

    #[test]
    fn decimals_render_per_mode() {
        let fixed = Value::Decimal(Decimal { text: "123.45".into(), declared_scale: Some(2) });
        let free = Value::Decimal(Decimal { text: "-1.5".into(), declared_scale: None });
        let mut out = Vec::new();
        let fmt = |decimals| ValueFormat { decimals, ..ValueFormat::default() };
        write_value(&mut out, &fixed, fmt(DecimalHandling::Precise));
        assert_eq!(out, br#""MDk=""#);
        out.clear();
        write_value(&mut out, &free, fmt(DecimalHandling::Precise));
        assert_eq!(out, br#"{"scale":1,"value":"8Q=="}"#);
        out.clear();
        write_value(&mut out, &fixed, fmt(DecimalHandling::String));
        assert_eq!(out, br#""123.45""#);
        out.clear();
        write_value(&mut out, &fixed, fmt(DecimalHandling::Double));
        assert_eq!(out, b"123.45");
    }

    #[test]
    fn unavailable_values_use_debezium_placeholder() {
        let mut out = Vec::new();
        write_value(&mut out, &Value::Unavailable { binary: false }, ValueFormat::default());
        assert_eq!(out, br#""__debezium_unavailable_value""#);
        out.clear();
        write_value(&mut out, &Value::Unavailable { binary: true }, ValueFormat::default());
        assert_eq!(out, br#""X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ==""#);
    }

    #[test]
    fn unsigned_bigints_are_exact_in_both_modes() {
        let mut out = Vec::new();
        write_value(&mut out, &Value::UInt(u64::MAX), ValueFormat::default());
        assert_eq!(out, b"18446744073709551615");
        out.clear();
        let precise = ValueFormat { bigint_unsigned: BigIntUnsignedHandling::Precise, ..ValueFormat::default() };
        write_value(&mut out, &Value::UInt(u64::MAX), precise);
        // BigInteger(2^64-1).toByteArray() = 00 FF FF FF FF FF FF FF FF
        assert_eq!(out, br#""AP//////////""#);
        out.clear();
        write_value(&mut out, &Value::Float32(1.1), ValueFormat::default());
        assert_eq!(out, b"1.1");
    }

    fn mysql_event() -> Event {
        Event::Change(ChangeEvent {
            op: Op::Update,
            table: Arc::new(TableSchema {
                id: TableId { schema: "shop".into(), table: "orders".into() },
                columns: vec![ColumnSchema { name: "id".into(), key: true }],
            }),
            before: Some(vec![Value::Int(1)]),
            after: Some(vec![Value::Int(1)]),
            source: SourceInfo::Mysql(crate::MysqlSourceBlock {
                connector: "mysql",
                name: "shop".into(),
                ts_us: 1_700_000_000_123_456,
                snapshot: "false",
                server_id: 1,
                gtid: None,
                file: "binlog.000003".into(),
                pos: 484,
                row: 2,
                thread: Some(7),
                query: None,
                txn_pos: 400,
            }),
        })
    }

    #[test]
    fn mysql_source_block_has_debeziums_fields_in_order() {
        let mut out = Vec::new();
        let opts = FormatOptions { transaction_metadata: true, ..FormatOptions::default() };
        write_envelope(&mysql_event(), &opts, Now { unix_micros: 1 }, &mut out);
        let text = String::from_utf8(out).unwrap();
        let source_text = &text[text.find("\"source\":").unwrap()..];
        let mut last = 0;
        for key in [
            "version",
            "connector",
            "name",
            "ts_ms",
            "snapshot",
            "db",
            "sequence",
            "ts_us",
            "ts_ns",
            "table",
            "server_id",
            "gtid",
            "file",
            "pos",
            "row",
            "thread",
            "query",
        ] {
            let at = source_text.find(&format!("\"{key}\":")).unwrap_or_else(|| panic!("{key} missing: {text}"));
            assert!(at > last || key == "version", "{key} out of order: {text}");
            last = at;
        }
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let source = &v["source"];
        assert_eq!(source["connector"], "mysql");
        assert_eq!(source["db"], "shop");
        assert_eq!(source["ts_ms"], 1_700_000_000_123i64);
        assert_eq!(source["pos"], 484);
        assert_eq!(source["row"], 2);
        assert_eq!(source["thread"], 7);
        assert_eq!(source["gtid"], serde_json::Value::Null);
        assert_eq!(v["transaction"]["id"], "file=binlog.000003,pos=400");
    }

    #[test]
    fn control_characters_are_escaped() {
        let mut out = Vec::new();
        write_str(&mut out, "a\u{1}b\\");
        assert_eq!(out, br#""a\u0001b\\""#);
    }
}
