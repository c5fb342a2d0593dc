//! MySQL's binary JSON (the `JSON` column type in row images) rendered as JSON text.
//!
//! The text is what Debezium's MySQL connector writes (mysql-binlog-connector's
//! `JsonStringFormatter`): no whitespace, `\uXXXX` escapes for control characters, doubles as Java's
//! `Double.toString` (and, where that would use an exponent, the exact decimal value of the double),
//! DECIMAL/DATE/TIME/DATETIME scalars as MySQL prints them, other opaque scalars as base64.
//!
//! Layout (MySQL `json_binary.h`): a type byte, then for objects and arrays an element count and
//! byte size (2 bytes each in the small form, 4 in the large), key entries (offset, length), value
//! entries (type, then the value inline or its offset), keys, values. Offsets count from the start of
//! the object or array. Every offset and length is checked; nesting is limited, and so is the
//! output: MySQL stores each value, key and string once, so a document that points several entries
//! at the same bytes is refused before it can expand (see [`charge`]).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::DecodeError;

const SMALL_OBJECT: u8 = 0x00;
const LARGE_OBJECT: u8 = 0x01;
const SMALL_ARRAY: u8 = 0x02;
const LARGE_ARRAY: u8 = 0x03;
const LITERAL: u8 = 0x04;
const INT16: u8 = 0x05;
const UINT16: u8 = 0x06;
const INT32: u8 = 0x07;
const UINT32: u8 = 0x08;
const INT64: u8 = 0x09;
const UINT64: u8 = 0x0A;
const DOUBLE: u8 = 0x0B;
const STRING: u8 = 0x0C;
const OPAQUE: u8 = 0x0F;

/// MySQL's own limit on JSON nesting is 100.
const MAX_DEPTH: usize = 150;

fn invalid(what: &str) -> DecodeError {
    DecodeError::Invalid(format!("binary JSON: {what}"))
}

/// Appends the JSON text of a binary JSON document to `out`. An empty document is JSON `null`
/// (callers decide what an empty column means).
pub fn to_text(doc: &[u8], out: &mut String) -> Result<(), DecodeError> {
    let Some((&t, body)) = doc.split_first() else {
        out.push_str("null");
        return Ok(());
    };
    let mut budget = doc.len();
    write_value(t, body, 0, &mut budget, out)
}

/// Takes `n` from what is left of a document's `budget` (its length): one per element, and the
/// bytes of each key, string and opaque value. A document MySQL wrote stores all of those in bytes
/// of their own, so it never runs out; one whose offsets point many entries at the same bytes would
/// otherwise expand without bound (2^depth copies of a shared array in a few hundred bytes).
fn charge(budget: &mut usize, n: usize) -> Result<(), DecodeError> {
    *budget = budget.checked_sub(n).ok_or_else(|| invalid("entries share their bytes"))?;
    Ok(())
}

fn slice(buf: &[u8], at: usize, len: usize) -> Result<&[u8], DecodeError> {
    at.checked_add(len).and_then(|end| buf.get(at..end)).ok_or_else(|| invalid("offset past the end"))
}

fn uint(buf: &[u8], at: usize, len: usize) -> Result<u64, DecodeError> {
    Ok(slice(buf, at, len)?.iter().rev().fold(0, |acc, &b| (acc << 8) | u64::from(b)))
}

fn write_value(t: u8, data: &[u8], depth: usize, budget: &mut usize, out: &mut String) -> Result<(), DecodeError> {
    if depth > MAX_DEPTH {
        return Err(invalid("nested too deeply"));
    }
    match t {
        SMALL_OBJECT | LARGE_OBJECT => write_container(data, t == LARGE_OBJECT, true, depth, budget, out),
        SMALL_ARRAY | LARGE_ARRAY => write_container(data, t == LARGE_ARRAY, false, depth, budget, out),
        LITERAL => {
            out.push_str(match slice(data, 0, 1)?[0] {
                0 => "null",
                1 => "true",
                2 => "false",
                _ => return Err(invalid("unknown literal")),
            });
            Ok(())
        }
        INT16 => push_int(out, i64::from(uint(data, 0, 2)? as u16 as i16)),
        UINT16 => push_int(out, uint(data, 0, 2)? as i64),
        INT32 => push_int(out, i64::from(uint(data, 0, 4)? as u32 as i32)),
        UINT32 => push_int(out, uint(data, 0, 4)? as i64),
        INT64 => push_int(out, uint(data, 0, 8)? as i64),
        UINT64 => {
            out.push_str(itoa::Buffer::new().format(uint(data, 0, 8)?));
            Ok(())
        }
        DOUBLE => {
            java_double(f64::from_bits(uint(data, 0, 8)?), out);
            Ok(())
        }
        STRING => {
            let (len, used) = var_len(data)?;
            let bytes = slice(data, used, len)?;
            charge(budget, len)?;
            push_json_string(out, &String::from_utf8_lossy(bytes));
            Ok(())
        }
        OPAQUE => write_opaque(data, budget, out),
        other => Err(invalid(&format!("unknown value type 0x{other:02x}"))),
    }
}

fn push_int(out: &mut String, v: i64) -> Result<(), DecodeError> {
    out.push_str(itoa::Buffer::new().format(v));
    Ok(())
}

fn write_container(
    data: &[u8],
    large: bool,
    object: bool,
    depth: usize,
    budget: &mut usize,
    out: &mut String,
) -> Result<(), DecodeError> {
    let w = if large { 4 } else { 2 };
    let count = uint(data, 0, w)? as usize;
    let size = uint(data, w, w)? as usize;
    if size > data.len() {
        return Err(invalid("container larger than its value"));
    }
    let data = &data[..size];
    let key_entries = 2 * w;
    let key_entry_len = w + 2;
    let value_entries = key_entries + if object { count * key_entry_len } else { 0 };
    let value_entry_len = 1 + w;
    if value_entries.checked_add(count.saturating_mul(value_entry_len)).is_none_or(|end| end > size) {
        return Err(invalid("more elements than fit"));
    }
    out.push(if object { '{' } else { '[' });
    for i in 0..count {
        if i > 0 {
            out.push(',');
        }
        charge(budget, 1)?;
        if object {
            let entry = key_entries + i * key_entry_len;
            let key_at = uint(data, entry, w)? as usize;
            let key_len = uint(data, entry + w, 2)? as usize;
            charge(budget, key_len)?;
            push_json_string(out, &String::from_utf8_lossy(slice(data, key_at, key_len)?));
            out.push(':');
        }
        let entry = value_entries + i * value_entry_len;
        let vt = slice(data, entry, 1)?[0];
        // Small scalars live in the entry itself: literals and 16-bit integers always, 32-bit
        // integers in the large form.
        let inline = matches!(vt, LITERAL | INT16 | UINT16) || (large && matches!(vt, INT32 | UINT32));
        if inline {
            write_value(vt, slice(data, entry + 1, w)?, depth + 1, budget, out)?;
        } else {
            let at = uint(data, entry + 1, w)? as usize;
            if at >= size {
                return Err(invalid("value offset past the end"));
            }
            write_value(vt, &data[at..], depth + 1, budget, out)?;
        }
    }
    out.push(if object { '}' } else { ']' });
    Ok(())
}

/// A length of 1 to 5 bytes, 7 bits each, lowest first, high bit set while more follow.
fn var_len(data: &[u8]) -> Result<(usize, usize), DecodeError> {
    let mut len: u64 = 0;
    for i in 0..5 {
        let b = *data.get(i).ok_or_else(|| invalid("length past the end"))?;
        len |= u64::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok((len as usize, i + 1));
        }
    }
    Err(invalid("length longer than 5 bytes"))
}

/// Rewrites JSON text as MySQL prints it (`{"a": 1, "b": [2.5]}`, what a snapshot reads) into the
/// form [`to_text`] gives the same document from the binlog: no whitespace, the same string escapes,
/// doubles as Java writes them. Object keys keep their order (MySQL's own). Not a validator: the
/// server produced the text.
pub fn normalize_text(text: &str, out: &mut String) -> Result<(), DecodeError> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'"' => {
                let start = i + 1;
                let mut j = start;
                let mut escaped = false;
                while j < bytes.len() && (escaped || bytes[j] != b'"') {
                    escaped = !escaped && bytes[j] == b'\\';
                    j += 1;
                }
                if j >= bytes.len() {
                    return Err(invalid("unterminated string in JSON text"));
                }
                // Decode the escapes, then escape again the way the binlog path does.
                let raw = &text[start - 1..=j];
                let s: String = serde_json::from_str(raw).map_err(|e| invalid(&format!("JSON string: {e}")))?;
                push_json_string(out, &s);
                i = j + 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len() && matches!(bytes[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
                    i += 1;
                }
                let number = &text[start..i];
                if number.contains(['.', 'e', 'E']) {
                    let d: f64 = number.parse().map_err(|_| invalid("number in JSON text"))?;
                    java_double(d, out);
                } else {
                    out.push_str(number);
                }
            }
            c => {
                out.push(c as char);
                i += 1;
            }
        }
    }
    Ok(())
}

/// MySQL column types that appear as opaque JSON scalars with a known text form.
const MYSQL_TYPE_NEWDECIMAL: u8 = 246;
const MYSQL_TYPE_DATE: u8 = 10;
const MYSQL_TYPE_TIME: u8 = 11;
const MYSQL_TYPE_DATETIME: u8 = 12;
const MYSQL_TYPE_TIMESTAMP: u8 = 7;

fn write_opaque(data: &[u8], budget: &mut usize, out: &mut String) -> Result<(), DecodeError> {
    let field_type = slice(data, 0, 1)?[0];
    let (len, used) = var_len(&data[1..])?;
    let value = slice(data, 1 + used, len)?;
    charge(budget, len)?;
    match field_type {
        MYSQL_TYPE_NEWDECIMAL if value.len() >= 2 => {
            super::decimal::decode(&value[2..], value[0], value[1], out)?;
        }
        MYSQL_TYPE_DATE | MYSQL_TYPE_DATETIME | MYSQL_TYPE_TIMESTAMP if value.len() >= 8 => {
            let packed = i64::from_le_bytes(value[..8].try_into().unwrap_or_default());
            let (year, month, day, hour, minute, second, micros) = unpack_datetime(packed);
            out.push('"');
            if packed < 0 {
                out.push('-');
            }
            push_padded(out, year, 4);
            out.push('-');
            push_padded(out, month, 2);
            out.push('-');
            push_padded(out, day, 2);
            if field_type != MYSQL_TYPE_DATE {
                out.push(' ');
                push_time(out, hour, minute, second, micros);
            }
            out.push('"');
        }
        MYSQL_TYPE_TIME if value.len() >= 8 => {
            let packed = i64::from_le_bytes(value[..8].try_into().unwrap_or_default());
            let v = packed.unsigned_abs();
            let hms = v >> 24;
            out.push('"');
            if packed < 0 {
                out.push('-');
            }
            push_time(out, (hms >> 12) % (1 << 10), (hms >> 6) % (1 << 6), hms % (1 << 6), v % (1 << 24));
            out.push('"');
        }
        _ => {
            out.push('"');
            out.push_str(&BASE64.encode(value));
            out.push('"');
        }
    }
    Ok(())
}

/// MySQL's "packed" datetime: `((year*13+month) << 5 | day) << 17 | hour << 12 | minute << 6 | second`,
/// shifted left 24 bits, plus microseconds.
fn unpack_datetime(packed: i64) -> (u64, u64, u64, u64, u64, u64, u64) {
    let v = packed.unsigned_abs();
    let micros = v % (1 << 24);
    let ymdhms = v >> 24;
    let ymd = ymdhms >> 17;
    let ym = ymd >> 5;
    let hms = ymdhms % (1 << 17);
    (ym / 13, ym % 13, ymd % (1 << 5), hms >> 12, (hms >> 6) % (1 << 6), hms % (1 << 6), micros)
}

fn push_padded(out: &mut String, v: u64, width: usize) {
    let text = itoa::Buffer::new().format(v).to_owned();
    for _ in text.len()..width {
        out.push('0');
    }
    out.push_str(&text);
}

/// `HH:MM:SS`, then `.` and the microseconds without trailing zeros when there are any.
fn push_time(out: &mut String, h: u64, m: u64, s: u64, micros: u64) {
    push_padded(out, h, 2);
    out.push(':');
    push_padded(out, m, 2);
    out.push(':');
    push_padded(out, s, 2);
    if micros != 0 {
        let mut digits = String::new();
        push_padded(&mut digits, micros, 6);
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
}

/// A JSON string with the escapes of Debezium's formatter: `\"`, `\\`, `\b \t \f \n \r`, other
/// control characters as `\u00XX` (upper-case hex); nothing else.
pub fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\u{0C}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push_str("\\u00");
                out.push(HEX[(c as usize) >> 4] as char);
                out.push(HEX[(c as usize) & 0xF] as char);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A double as Java writes it in `JsonStringFormatter`: `Double.toString` (shortest digits, at least
/// one fraction digit) for magnitudes in [1e-3, 1e7), else `new BigDecimal(d).toPlainString()`, the
/// exact decimal value of the binary double.
pub fn java_double(d: f64, out: &mut String) {
    if !d.is_finite() {
        // Not representable in a JSON document; MySQL refuses them.
        out.push_str("null");
        return;
    }
    let abs = d.abs();
    if d == 0.0 {
        out.push_str(if d.is_sign_negative() { "-0.0" } else { "0.0" });
    } else if (1e-3..1e7).contains(&abs) {
        // Rust's shortest round-trip digits are the same digits Java 19+ prints.
        let text = format!("{d}");
        out.push_str(&text);
        if !text.contains('.') {
            out.push_str(".0");
        }
    } else {
        exact_decimal(d, out);
    }
}

/// The exact decimal expansion of a finite, non-zero double, without trailing fraction zeros.
fn exact_decimal(d: f64, out: &mut String) {
    let bits = d.to_bits();
    let exponent = ((bits >> 52) & 0x7FF) as i32;
    let fraction = bits & ((1 << 52) - 1);
    let (mut mantissa, mut exp2) =
        if exponent == 0 { (fraction, -1074) } else { (fraction | (1 << 52), exponent - 1075) };
    while mantissa & 1 == 0 && exp2 < 0 {
        mantissa >>= 1;
        exp2 += 1;
    }
    // d = mantissa * 2^exp2. For exp2 < 0: mantissa * 5^-exp2 / 10^-exp2.
    let mut digits = BigDecimalDigits::from(mantissa);
    let scale = if exp2 >= 0 {
        for _ in 0..exp2 {
            digits.mul_small(2);
        }
        0
    } else {
        for _ in 0..-exp2 {
            digits.mul_small(5);
        }
        (-exp2) as usize
    };
    let text = digits.to_string();
    if d < 0.0 {
        out.push('-');
    }
    if scale == 0 {
        out.push_str(&text);
    } else if text.len() > scale {
        out.push_str(&text[..text.len() - scale]);
        out.push('.');
        out.push_str(&text[text.len() - scale..]);
    } else {
        out.push_str("0.");
        for _ in text.len()..scale {
            out.push('0');
        }
        out.push_str(&text);
    }
}

/// An unsigned big integer in base 10^9 limbs, least significant first: just enough arithmetic for
/// [`exact_decimal`].
struct BigDecimalDigits(Vec<u32>);

impl BigDecimalDigits {
    const BASE: u64 = 1_000_000_000;

    fn from(v: u64) -> Self {
        let mut limbs = vec![(v % Self::BASE) as u32];
        let mut rest = v / Self::BASE;
        while rest > 0 {
            limbs.push((rest % Self::BASE) as u32);
            rest /= Self::BASE;
        }
        BigDecimalDigits(limbs)
    }

    fn mul_small(&mut self, m: u64) {
        let mut carry = 0u64;
        for limb in &mut self.0 {
            let x = u64::from(*limb) * m + carry;
            *limb = (x % Self::BASE) as u32;
            carry = x / Self::BASE;
        }
        while carry > 0 {
            self.0.push((carry % Self::BASE) as u32);
            carry /= Self::BASE;
        }
    }
}

impl std::fmt::Display for BigDecimalDigits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut limbs = self.0.iter().rev();
        if let Some(first) = limbs.next() {
            write!(f, "{first}")?;
        }
        for limb in limbs {
            write!(f, "{limb:09}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(doc: &[u8]) -> String {
        let mut out = String::new();
        to_text(doc, &mut out).unwrap();
        out
    }

    #[test]
    fn java_doubles() {
        let f = |d: f64| {
            let mut s = String::new();
            java_double(d, &mut s);
            s
        };
        assert_eq!(f(1.0), "1.0");
        assert_eq!(f(1.5), "1.5");
        assert_eq!(f(-2.25), "-2.25");
        assert_eq!(f(0.001), "0.001");
        assert_eq!(f(1234567.0), "1234567.0");
        assert_eq!(f(1e7), "10000000");
        assert_eq!(f(1e23), "99999999999999991611392");
        assert_eq!(f(1e-4), "0.000100000000000000004792173602385929598312941379845142364501953125");
        assert_eq!(f(0.0), "0.0");
    }

    #[test]
    fn small_object_with_inline_and_offset_values() {
        // {"a": 1, "b": "xy"} as MySQL writes it: small object, 2 elements.
        let doc: Vec<u8> = vec![
            SMALL_OBJECT,
            2,
            0,
            23,
            0, // count 2, size 23
            18,
            0,
            1,
            0, // key "a" at 18, length 1
            19,
            0,
            1,
            0, // key "b" at 19, length 1
            INT16,
            1,
            0, // value 1, inline
            STRING,
            20,
            0, // value at 20
            b'a',
            b'b',
            2,
            b'x',
            b'y',
        ];
        assert_eq!(text(&doc), r#"{"a":1,"b":"xy"}"#);
    }

    #[test]
    fn arrays_literals_and_escapes() {
        // [true, null, "a\"\u{1}"]
        let doc: Vec<u8> = vec![
            SMALL_ARRAY,
            3,
            0,
            18,
            0, // count 3, size 18
            LITERAL,
            1,
            0,
            LITERAL,
            0,
            0,
            STRING,
            13,
            0, // entries
            4,
            b'a',
            b'"',
            1,
            b'\n', // string of 4 bytes at 13
        ];
        assert_eq!(text(&doc), "[true,null,\"a\\\"\\u0001\\n\"]");
    }

    #[test]
    fn text_from_a_snapshot_matches_the_binlog_form() {
        let mut out = String::new();
        normalize_text(r#"{"b": [1, 2.5, null, true], "a": "x\"y\u0001", "c": 1e-4, "d": 100.0}"#, &mut out).unwrap();
        assert_eq!(
            out,
            r#"{"b":[1,2.5,null,true],"a":"x\"y\u0001","c":0.000100000000000000004792173602385929598312941379845142364501953125,"d":100.0}"#
        );
    }

    /// Found by review of the `binlog_event` target, which had not reached it in its first minutes:
    /// entries whose offsets all point at one child array make a document of 407 bytes nested 40
    /// deep stand for 2^40 values (a hang, then out of memory). A document may now write no more
    /// elements, keys and strings than it has bytes.
    #[test]
    fn entries_sharing_their_bytes_cannot_expand_a_document() {
        // Innermost: [true]; each level: an array of two entries, both at offset 10 (the child).
        let mut doc = vec![1, 0, 7, 0, LITERAL, 1, 0];
        for _ in 0..40 {
            let size = (10 + doc.len()) as u16;
            let mut level = vec![2, 0];
            level.extend_from_slice(&size.to_le_bytes());
            level.extend_from_slice(&[SMALL_ARRAY, 10, 0, SMALL_ARRAY, 10, 0]);
            level.append(&mut doc);
            doc = level;
        }
        doc.insert(0, SMALL_ARRAY);
        let mut out = String::new();
        let started = std::time::Instant::now();
        assert!(to_text(&doc, &mut out).is_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // One key shared by many entries: expands too, though less.
        let count = 200u16;
        let key_at = 4 + 7 * count;
        let mut doc = vec![SMALL_OBJECT];
        doc.extend_from_slice(&count.to_le_bytes());
        doc.extend_from_slice(&(key_at + 100).to_le_bytes());
        for _ in 0..count {
            doc.extend_from_slice(&key_at.to_le_bytes());
            doc.extend_from_slice(&100u16.to_le_bytes());
        }
        for _ in 0..count {
            doc.extend_from_slice(&[LITERAL, 0, 0]);
        }
        doc.extend_from_slice(&[b'k'; 100]);
        assert!(to_text(&doc, &mut String::new()).is_err());
    }

    #[test]
    fn corrupt_documents_are_errors() {
        let mut out = String::new();
        assert!(to_text(&[SMALL_OBJECT, 5, 0, 200, 0], &mut out).is_err());
        assert!(to_text(&[SMALL_ARRAY, 1, 0, 8, 0, STRING, 99, 0], &mut out).is_err());
        assert!(to_text(&[0x42], &mut out).is_err());
        assert!(to_text(&[STRING, 0x85], &mut out).is_err());
    }
}
