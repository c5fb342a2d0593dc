//! Debezium's wire format, as its JSON converter writes it with schemas disabled.
//!
//! Value: `{"before","after","source","transaction","op","ts_ms","ts_us","ts_ns"}`; key: the key
//! columns as an object (`{"id":1}`), or no key at all when the table has none. Rendering writes
//! straight into a caller-owned buffer that the sink reuses, so a steady stream allocates nothing
//! here beyond what `base64` needs for binary values.

use std::io::Write;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;

use crate::event::{ChangeEvent, Event, LogicalMessage, SourceInfo};
use crate::value::{Decimal, Value};

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

#[derive(Debug, Clone, Default)]
pub struct FormatOptions {
    pub decimal_handling: DecimalHandling,
    /// Fill `transaction` (Debezium `provide.transaction.metadata`); `null` otherwise.
    pub transaction_metadata: bool,
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

/// Writes the record key into `out`. Returns `false` (and writes nothing) when the event has no key.
pub fn write_key(event: &Event, out: &mut Vec<u8>) -> bool {
    match event {
        Event::Change(change) => {
            if !change.table.has_key() {
                return false;
            }
            let Some(row) = change.key_row() else { return false };
            out.push(b'{');
            let mut first = true;
            for (col, value) in change.table.columns.iter().zip(row) {
                if !col.key {
                    continue;
                }
                if !first {
                    out.push(b',');
                }
                first = false;
                write_str(out, &col.name);
                out.push(b':');
                // Keys always use the default decimal handling of the value they come from.
                write_value(out, value, DecimalHandling::Precise);
            }
            out.push(b'}');
            true
        }
        Event::Message(message) => {
            out.extend_from_slice(b"{\"prefix\":");
            write_str(out, &message.prefix);
            out.push(b'}');
            true
        }
    }
}

/// Writes the Debezium envelope of `event` into `out`.
pub fn write_envelope(event: &Event, opts: &FormatOptions, now: Now, out: &mut Vec<u8>) {
    match event {
        Event::Change(change) => write_change(change, opts, now, out),
        Event::Message(message) => write_message(message, now, out),
    }
}

fn write_change(change: &ChangeEvent, opts: &FormatOptions, now: Now, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"before\":");
    write_row(out, change, change.before.as_deref(), opts.decimal_handling);
    out.extend_from_slice(b",\"after\":");
    write_row(out, change, change.after.as_deref(), opts.decimal_handling);
    out.extend_from_slice(b",\"source\":");
    write_source(out, &change.source, Some(&change.table.id));
    out.extend_from_slice(b",\"transaction\":");
    if opts.transaction_metadata {
        let SourceInfo::Postgres(pg) = &change.source;
        let _ =
            write!(out, "{{\"id\":\"{}:{}\",\"total_order\":null,\"data_collection_order\":null}}", pg.txid, pg.lsn);
    } else {
        out.extend_from_slice(b"null");
    }
    out.extend_from_slice(b",\"op\":\"");
    out.extend_from_slice(change.op.code().as_bytes());
    out.push(b'"');
    write_ts(out, now);
    out.push(b'}');
}

fn write_message(message: &LogicalMessage, now: Now, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"op\":\"m\"");
    write_ts(out, now);
    out.extend_from_slice(b",\"source\":");
    write_source(out, &message.source, None);
    out.extend_from_slice(b",\"message\":{\"prefix\":");
    write_str(out, &message.prefix);
    out.extend_from_slice(b",\"content\":");
    write_base64(out, &message.content);
    out.extend_from_slice(b"}}");
}

fn write_ts(out: &mut Vec<u8>, now: Now) {
    out.extend_from_slice(b",\"ts_ms\":");
    write_int(out, now.unix_micros / 1000);
    out.extend_from_slice(b",\"ts_us\":");
    write_int(out, now.unix_micros);
    out.extend_from_slice(b",\"ts_ns\":");
    write_int(out, i128::from(now.unix_micros) * 1000);
}

fn write_row(out: &mut Vec<u8>, change: &ChangeEvent, row: Option<&[Value]>, decimals: DecimalHandling) {
    let Some(row) = row else {
        out.extend_from_slice(b"null");
        return;
    };
    out.push(b'{');
    for (i, (col, value)) in change.table.columns.iter().zip(row).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, &col.name);
        out.push(b':');
        write_value(out, value, decimals);
    }
    out.push(b'}');
}

fn write_source(out: &mut Vec<u8>, source: &SourceInfo, table: Option<&crate::TableId>) {
    match source {
        SourceInfo::Postgres(pg) => {
            let ts_ms = pg.commit_ts_us.div_euclid(1000);
            out.extend_from_slice(b"{\"version\":");
            write_str(out, crate::VERSION);
            out.extend_from_slice(b",\"connector\":\"postgresql\",\"name\":");
            write_str(out, &pg.name);
            out.extend_from_slice(b",\"ts_ms\":");
            write_int(out, ts_ms);
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
            write_int(out, pg.commit_ts_us);
            out.extend_from_slice(b",\"ts_ns\":");
            write_int(out, i128::from(pg.commit_ts_us) * 1000);
            out.extend_from_slice(b",\"schema\":");
            match table {
                Some(t) => write_str(out, &t.schema),
                None => out.extend_from_slice(b"\"\""),
            }
            out.extend_from_slice(b",\"table\":");
            match table {
                Some(t) => write_str(out, &t.table),
                None => out.extend_from_slice(b"\"\""),
            }
            out.extend_from_slice(b",\"txId\":");
            write_int(out, pg.txid);
            out.extend_from_slice(b",\"lsn\":");
            write_int(out, pg.lsn);
            out.extend_from_slice(b",\"xmin\":null}");
        }
    }
}

/// Writes one value. Public so that sinks and tests render single values exactly as the envelope does.
pub fn write_value(out: &mut Vec<u8>, value: &Value, decimals: DecimalHandling) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Int(i) => write_int(out, *i),
        Value::Float(f) => write_float(out, *f),
        Value::String(s) => write_str(out, s),
        Value::Bytes(b) => write_base64(out, b),
        Value::Decimal(d) => write_decimal(out, d, decimals),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item, decimals);
            }
            out.push(b']');
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

fn write_decimal(out: &mut Vec<u8>, d: &Decimal, mode: DecimalHandling) {
    match mode {
        DecimalHandling::Precise => match d.declared_scale {
            Some(_) => write_base64(out, &d.unscaled_bytes()),
            None => {
                let _ = write!(out, "{{\"scale\":{},\"value\":", d.scale());
                write_base64(out, &d.unscaled_bytes());
                out.push(b'}');
            }
        },
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
    out.push(b'"');
    let bytes = s.as_bytes();
    // Fast path: most strings need no escape at all.
    if !bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\') {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
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
    use crate::event::{ColumnSchema, Op, PgSource, TableId, TableSchema};

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
        SourceInfo::Postgres(PgSource {
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
        assert!(write_key(&event, &mut key));
        assert_eq!(key, br#"{"id":1}"#);
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
        assert!(!write_key(&event, &mut key));
        assert!(key.is_empty());
    }

    #[test]
    fn decimals_render_per_mode() {
        let fixed = Value::Decimal(Decimal { text: "123.45".into(), declared_scale: Some(2) });
        let free = Value::Decimal(Decimal { text: "-1.5".into(), declared_scale: None });
        let mut out = Vec::new();
        write_value(&mut out, &fixed, DecimalHandling::Precise);
        assert_eq!(out, br#""MDk=""#);
        out.clear();
        write_value(&mut out, &free, DecimalHandling::Precise);
        assert_eq!(out, br#"{"scale":1,"value":"8Q=="}"#);
        out.clear();
        write_value(&mut out, &fixed, DecimalHandling::String);
        assert_eq!(out, br#""123.45""#);
        out.clear();
        write_value(&mut out, &fixed, DecimalHandling::Double);
        assert_eq!(out, b"123.45");
    }

    #[test]
    fn unavailable_values_use_debezium_placeholder() {
        let mut out = Vec::new();
        write_value(&mut out, &Value::Unavailable { binary: false }, DecimalHandling::Precise);
        assert_eq!(out, br#""__debezium_unavailable_value""#);
        out.clear();
        write_value(&mut out, &Value::Unavailable { binary: true }, DecimalHandling::Precise);
        assert_eq!(out, br#""X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ==""#);
    }

    #[test]
    fn control_characters_are_escaped() {
        let mut out = Vec::new();
        write_str(&mut out, "a\u{1}b\\");
        assert_eq!(out, br#""a\u0001b\\""#);
    }
}
