//! Row images: bytes of a rows event turned into values in Debezium's representation.
//!
//! Each column gets a [`ColumnCodec`] once per TABLE_MAP (from its type, metadata and what the
//! schema says about signedness, character set and ENUM/SET labels); rows then decode without
//! looking anything up. The value mapping is Debezium's MySQL connector's default
//! (`time.precision.mode = adaptive_time_microseconds`), documented row by row in docs/types.md:
//!
//! | MySQL | value |
//! |---|---|
//! | TINYINT..INT (signed or not), BIGINT | integer |
//! | BIGINT UNSIGNED | unsigned integer (exact; `bigint_unsigned_handling` picks its wire form) |
//! | FLOAT / DOUBLE | FLOAT32 / FLOAT64 |
//! | DECIMAL(p,s) | decimal (`decimal_handling`) |
//! | DATE | days since the epoch |
//! | TIME(fsp) | microseconds (may be negative or over 24 h) |
//! | DATETIME(0-3) / DATETIME(4-6) | milliseconds / microseconds since the epoch |
//! | TIMESTAMP(fsp) | ISO-8601 UTC text, fraction padded to fsp |
//! | YEAR | the year |
//! | BIT(1) / BIT(n) | boolean / bytes, little-endian |
//! | CHAR, VARCHAR, TEXT | text (decoded from the column's character set) |
//! | BINARY, VARBINARY, BLOB | bytes (BINARY right-padded with zero bytes to its length) |
//! | ENUM / SET | the label / the labels joined with `,` |
//! | JSON | JSON text |
//! | GEOMETRY / POINT | `{wkb, srid}` / `{x, y, wkb, srid}` |
//!
//! Zero dates (`0000-00-00`, or a zero month or day) become null, or the epoch in NOT NULL columns,
//! as in Debezium.

use std::sync::Arc;

use tailgate_core::Value;
use tailgate_core::temporal::{MICROS_PER_DAY, days_from_civil, format_utc_timestamp};

use super::{Bitmap, Cursor, DecodeError, decimal, json};

/// How a column's text is encoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Charset {
    /// `binary`: the value is bytes, not text.
    Binary,
    /// utf8mb4, utf8mb3 and ascii.
    Utf8,
    /// utf32: big-endian code points (encoding_rs has no UTF-32).
    Utf32,
    Encoding(&'static encoding_rs::Encoding),
    /// A character set tailgate cannot decode; decoding a value of it is an error naming the fix.
    Unsupported(Arc<str>),
}

impl Charset {
    /// From a MySQL character set name (`information_schema.COLLATIONS.CHARACTER_SET_NAME`).
    pub fn from_name(name: &str) -> Charset {
        use encoding_rs::*;
        match name.to_ascii_lowercase().as_str() {
            "binary" => Charset::Binary,
            "utf8mb4" | "utf8mb3" | "utf8" | "ascii" => Charset::Utf8,
            "utf32" => Charset::Utf32,
            // MySQL's latin1 is Windows-1252 with the five undefined bytes mapped to C1 controls,
            // exactly as the WHATWG decoder does.
            "latin1" => Charset::Encoding(WINDOWS_1252),
            "latin2" => Charset::Encoding(ISO_8859_2),
            "latin5" => Charset::Encoding(WINDOWS_1254),
            "latin7" => Charset::Encoding(ISO_8859_13),
            "cp1250" => Charset::Encoding(WINDOWS_1250),
            "cp1251" => Charset::Encoding(WINDOWS_1251),
            "cp1256" => Charset::Encoding(WINDOWS_1256),
            "cp1257" => Charset::Encoding(WINDOWS_1257),
            "cp866" => Charset::Encoding(IBM866),
            "koi8r" => Charset::Encoding(KOI8_R),
            "koi8u" => Charset::Encoding(KOI8_U),
            "greek" => Charset::Encoding(ISO_8859_7),
            "hebrew" => Charset::Encoding(ISO_8859_8),
            "tis620" => Charset::Encoding(WINDOWS_874),
            "macroman" => Charset::Encoding(MACINTOSH),
            "gbk" | "gb2312" => Charset::Encoding(GBK),
            "gb18030" => Charset::Encoding(GB18030),
            "big5" => Charset::Encoding(BIG5),
            "sjis" | "cp932" => Charset::Encoding(SHIFT_JIS),
            "ujis" | "eucjpms" => Charset::Encoding(EUC_JP),
            "euckr" => Charset::Encoding(EUC_KR),
            "ucs2" | "utf16" => Charset::Encoding(UTF_16BE),
            "utf16le" => Charset::Encoding(UTF_16LE),
            other => Charset::Unsupported(other.into()),
        }
    }
}

/// How one column's bytes are read and what value they become.
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnCodec {
    /// TINYINT (1 byte) .. BIGINT (8 bytes), little-endian.
    Int {
        bytes: u8,
        unsigned: bool,
    },
    Float,
    Double,
    Year,
    Decimal {
        precision: u8,
        scale: u8,
    },
    Date,
    /// Pre-5.6 TIME: 3 bytes, `HHMMSS` as an integer.
    TimeOld,
    Time {
        fsp: u8,
    },
    /// Pre-5.6 DATETIME: 8 bytes, `YYYYMMDDhhmmss` as an integer.
    DatetimeOld,
    Datetime {
        fsp: u8,
    },
    /// Pre-5.6 TIMESTAMP: 4 bytes of seconds.
    TimestampOld,
    Timestamp {
        fsp: u8,
    },
    Bit {
        bits: u16,
    },
    Enum {
        bytes: u8,
        labels: Arc<[String]>,
    },
    Set {
        bytes: u8,
        labels: Arc<[String]>,
    },
    /// CHAR/BINARY, VARCHAR/VARBINARY, TEXT/BLOB: a `len_bytes` length, then the bytes.
    /// `pad_to`: BINARY(n) values are stored without trailing zero bytes; Debezium pads them back.
    Str {
        len_bytes: u8,
        charset: Charset,
        pad_to: u16,
    },
    Json {
        len_bytes: u8,
    },
    Geometry {
        len_bytes: u8,
        point: bool,
    },
    /// MySQL 9 VECTOR: little-endian f32s, as an array of FLOAT32.
    Vector {
        len_bytes: u8,
    },
    /// MYSQL_TYPE_NULL: no bytes.
    Null,
}

/// A column as the decoder needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnDecoder {
    pub codec: ColumnCodec,
    pub nullable: bool,
}

/// A value that failed to decode, with the column it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueError {
    pub column: usize,
    pub error: DecodeError,
}

/// Reads one row image: a null bitmap over the columns present in the image, then the values of the
/// present non-null columns. Appends one value per table column to `out`; columns absent from the
/// image (`binlog_row_image` other than FULL) are `Unavailable`.
pub fn read_image(
    c: &mut Cursor<'_>,
    columns: &[ColumnDecoder],
    present: &Bitmap<'_>,
    out: &mut Vec<Value>,
) -> Result<(), ValueError> {
    let present_count =
        if present.len() == columns.len() && all_set(present) { columns.len() } else { present.count_ones() };
    let nulls = Bitmap::read(c, present_count, "row null bitmap").map_err(|error| ValueError { column: 0, error })?;
    let mut j = 0;
    for (i, col) in columns.iter().enumerate() {
        if !present.get(i) {
            out.push(Value::Unavailable {
                binary: matches!(col.codec, ColumnCodec::Str { charset: Charset::Binary, .. }),
            });
            continue;
        }
        let is_null = nulls.get(j);
        j += 1;
        if is_null {
            out.push(Value::Null);
            continue;
        }
        out.push(read_value(c, col).map_err(|error| ValueError { column: i, error })?);
    }
    Ok(())
}

fn all_set(b: &Bitmap<'_>) -> bool {
    (0..b.len()).all(|i| b.get(i))
}

fn read_value(c: &mut Cursor<'_>, col: &ColumnDecoder) -> Result<Value, DecodeError> {
    use ColumnCodec::*;
    Ok(match &col.codec {
        Int { bytes, unsigned } => {
            let raw = c.uint_le(usize::from(*bytes), "integer")?;
            let bits = u32::from(*bytes) * 8;
            match (*unsigned, bits) {
                (true, 64) => Value::UInt(raw),
                (true, _) => Value::Int(raw as i64),
                (false, 64) => Value::Int(raw as i64),
                // Sign-extend the narrower integers.
                (false, _) => Value::Int(((raw << (64 - bits)) as i64) >> (64 - bits)),
            }
        }
        Float => Value::Float32(f32::from_bits(c.u32("float")?)),
        Double => Value::Float(f64::from_bits(c.u64("double")?)),
        Year => {
            let b = c.u8("year")?;
            // YEAR stores year - 1900; 0 is the year 0000 (Debezium reads it as 1900, which is wrong).
            Value::Int(if b == 0 { 0 } else { 1900 + i64::from(b) })
        }
        Decimal { precision, scale } => {
            let bytes = c.take(decimal::binary_size(*precision, *scale), "decimal")?;
            let mut text = String::with_capacity(usize::from(*precision) + 2);
            decimal::decode(bytes, *precision, *scale, &mut text)?;
            Value::Decimal(tailgate_core::Decimal { text, declared_scale: Some(u32::from(*scale)) })
        }
        Date => {
            let v = c.uint_le(3, "date")?;
            let (day, month, year) = ((v & 31) as u32, ((v >> 5) & 15) as u32, (v >> 9) as i64);
            match valid_date(year, month, day) {
                Some(days) => Value::Int(days),
                None => zero_date(col, Value::Int(0)),
            }
        }
        TimeOld => {
            let raw = c.uint_le(3, "time")?;
            let v = ((raw << 40) as i64) >> 40;
            let abs = v.unsigned_abs() as i64;
            let micros = ((abs / 10_000) * 3600 + (abs / 100 % 100) * 60 + abs % 100) * 1_000_000;
            Value::Int(if v < 0 { -micros } else { micros })
        }
        Time { fsp } => Value::Int(read_time2(c, *fsp)?),
        DatetimeOld => {
            let v = c.u64("datetime")?;
            let (date, time) = (v / 1_000_000, v % 1_000_000);
            let (year, month, day) = ((date / 10_000) as i64, (date / 100 % 100) as u32, (date % 100) as u32);
            let secs = (time / 10_000) * 3600 + (time / 100 % 100) * 60 + time % 100;
            match valid_date(year, month, day) {
                Some(days) => Value::Int(days * 86_400_000 + secs as i64 * 1000),
                None => zero_date(col, Value::Int(0)),
            }
        }
        Datetime { fsp } => read_datetime2(c, *fsp, col)?,
        TimestampOld => {
            let secs = i64::from(c.u32("timestamp")?);
            timestamp_value(secs, 0, 0, col)
        }
        Timestamp { fsp } => {
            let secs = c.uint_be(4, "timestamp")? as i64;
            let micros = read_fraction(c, *fsp)?;
            timestamp_value(secs, micros, *fsp, col)
        }
        Bit { bits } => bits_value(c.take(usize::from(*bits).div_ceil(8), "bit")?, *bits),
        Enum { bytes, labels } => {
            let index = c.uint_le(usize::from(*bytes), "enum")? as usize;
            // Index 0 is the empty string MySQL stores for an invalid value.
            match index.checked_sub(1).and_then(|i| labels.get(i)) {
                Some(label) => Value::String(label.clone()),
                None if index == 0 => Value::String(String::new()),
                None => return Err(DecodeError::Invalid(format!("ENUM index {index} but {} labels", labels.len()))),
            }
        }
        Set { bytes, labels } => {
            let bits = c.uint_le(usize::from(*bytes), "set")?;
            let mut text = String::new();
            for (i, label) in labels.iter().enumerate().take(64) {
                if bits & (1 << i) != 0 {
                    if !text.is_empty() {
                        text.push(',');
                    }
                    text.push_str(label);
                }
            }
            Value::String(text)
        }
        Str { len_bytes, charset, pad_to } => {
            let len = c.uint_le(usize::from(*len_bytes), "string length")? as usize;
            let bytes = c.take(len, "string")?;
            decode_text(bytes, charset, *pad_to)?
        }
        Json { len_bytes } => {
            let len = c.uint_le(usize::from(*len_bytes), "json length")? as usize;
            let doc = c.take(len, "json")?;
            if doc.is_empty() {
                // What Debezium writes for an empty JSON value.
                if col.nullable { Value::Null } else { Value::String("{}".into()) }
            } else {
                let mut text = String::with_capacity(doc.len() + 16);
                json::to_text(doc, &mut text)?;
                Value::String(text)
            }
        }
        Geometry { len_bytes, point } => {
            let len = c.uint_le(usize::from(*len_bytes), "geometry length")? as usize;
            geometry(c.take(len, "geometry")?, *point)?
        }
        Vector { len_bytes } => {
            let len = c.uint_le(usize::from(*len_bytes), "vector length")? as usize;
            let bytes = c.take(len, "vector")?;
            if !len.is_multiple_of(4) {
                return Err(DecodeError::Invalid(format!("VECTOR of {len} bytes")));
            }
            Value::Array(
                bytes.chunks_exact(4).map(|f| Value::Float32(f32::from_le_bytes([f[0], f[1], f[2], f[3]]))).collect(),
            )
        }
        Null => Value::Null,
    })
}

/// Converts a value as the text protocol returns it (what a snapshot's `SELECT` reads, session
/// `time_zone = '+00:00'`, character set utf8mb4) into the same value the binlog path gives for
/// the same column: the codec decides the mapping for both.
pub fn from_text(col: &ColumnDecoder, text: Vec<u8>) -> Result<Value, DecodeError> {
    use ColumnCodec::*;
    // Row values never reach errors (they end up in logs and /health): the kind and size only.
    let bad = |what: &str, text: &[u8]| DecodeError::Invalid(format!("a {what} value of {} bytes", text.len()));
    Ok(match &col.codec {
        Int { bytes, unsigned } => {
            let s = std::str::from_utf8(&text).map_err(|_| bad("integer", &text))?;
            if *unsigned && *bytes == 8 {
                Value::UInt(s.parse().map_err(|_| bad("integer", &text))?)
            } else {
                Value::Int(s.parse().map_err(|_| bad("integer", &text))?)
            }
        }
        Float => Value::Float32(
            std::str::from_utf8(&text).ok().and_then(|s| s.parse().ok()).ok_or_else(|| bad("float", &text))?,
        ),
        Double => Value::Float(
            std::str::from_utf8(&text).ok().and_then(|s| s.parse().ok()).ok_or_else(|| bad("double", &text))?,
        ),
        Year => {
            Value::Int(std::str::from_utf8(&text).ok().and_then(|s| s.parse().ok()).ok_or_else(|| bad("year", &text))?)
        }
        Decimal { scale, .. } => Value::Decimal(tailgate_core::Decimal {
            text: String::from_utf8(text).map_err(|e| bad("decimal", e.as_bytes()))?,
            declared_scale: Some(u32::from(*scale)),
        }),
        Date => {
            let (y, m, d) = parse_date_text(&text).ok_or_else(|| bad("date", &text))?;
            match valid_date(y, m, d) {
                Some(days) => Value::Int(days),
                None => zero_date(col, Value::Int(0)),
            }
        }
        TimeOld | Time { .. } => Value::Int(parse_time_text(&text).ok_or_else(|| bad("time", &text))?),
        DatetimeOld | Datetime { .. } => {
            let fsp = if let Datetime { fsp } = &col.codec { *fsp } else { 0 };
            let (date, micros) = parse_datetime_text(&text).ok_or_else(|| bad("datetime", &text))?;
            match date {
                Some(days) => {
                    let total = days * MICROS_PER_DAY + micros;
                    Value::Int(if fsp <= 3 { total.div_euclid(1000) } else { total })
                }
                None => zero_date(col, Value::Int(0)),
            }
        }
        TimestampOld | Timestamp { .. } => {
            let fsp = if let Timestamp { fsp } = &col.codec { *fsp } else { 0 };
            let (date, micros) = parse_datetime_text(&text).ok_or_else(|| bad("timestamp", &text))?;
            match date {
                Some(days) => {
                    let total = days * MICROS_PER_DAY + micros;
                    timestamp_value(total.div_euclid(1_000_000), total.rem_euclid(1_000_000), fsp, col)
                }
                None => timestamp_value(0, 0, fsp, col),
            }
        }
        // The text protocol returns BIT, geometry and VECTOR values as their raw bytes.
        Bit { bits } => bits_value(&text, *bits),
        Geometry { point, .. } => geometry(&text, *point)?,
        Vector { .. } => vector_value(&text)?,
        Enum { .. } | Set { .. } => Value::String(String::from_utf8(text).map_err(|e| bad("label", e.as_bytes()))?),
        Str { charset: Charset::Binary, .. } => Value::Bytes(text),
        // The connection's character set is utf8mb4: the server converts every text column to it.
        Str { .. } => Value::String(match String::from_utf8(text) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }),
        Json { .. } => {
            let s = std::str::from_utf8(&text).map_err(|_| bad("JSON", &text))?;
            let mut out = String::with_capacity(s.len());
            json::normalize_text(s, &mut out)?;
            Value::String(out)
        }
        Null => Value::Null,
    })
}

/// BIT(1) is a boolean; wider BITs are bytes, stored big-endian, written little-endian as Debezium's Bits.
fn bits_value(bytes: &[u8], bits: u16) -> Value {
    if bits == 1 {
        Value::Bool(bytes.last().is_some_and(|b| b & 1 != 0))
    } else {
        Value::Bytes(bytes.iter().rev().copied().collect())
    }
}

/// MySQL 9 VECTOR: little-endian f32s.
fn vector_value(bytes: &[u8]) -> Result<Value, DecodeError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(DecodeError::Invalid(format!("VECTOR of {} bytes", bytes.len())));
    }
    Ok(Value::Array(
        bytes.chunks_exact(4).map(|f| Value::Float32(f32::from_le_bytes([f[0], f[1], f[2], f[3]]))).collect(),
    ))
}

/// `YYYY-MM-DD` (zero parts allowed).
fn parse_date_text(t: &[u8]) -> Option<(i64, u32, u32)> {
    if t.len() < 10 || t[4] != b'-' || t[7] != b'-' {
        return None;
    }
    Some((digits(&t[..4])? as i64, digits(&t[5..7])? as u32, digits(&t[8..10])? as u32))
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff]`: days (None for a zero date) and microseconds within the day.
fn parse_datetime_text(t: &[u8]) -> Option<(Option<i64>, i64)> {
    let (y, m, d) = parse_date_text(t)?;
    let micros = if t.len() > 10 { parse_time_text(t.get(11..)?)? } else { 0 };
    Some((valid_date(y, m, d), micros))
}

/// `[-]H+:MM:SS[.f+]` as signed microseconds.
fn parse_time_text(t: &[u8]) -> Option<i64> {
    let (negative, t) = match t.strip_prefix(b"-") {
        Some(rest) => (true, rest),
        None => (false, t),
    };
    let first = t.iter().position(|&b| b == b':')?;
    let hours = digits(&t[..first])? as i64;
    let rest = &t[first + 1..];
    if rest.len() < 5 || rest[2] != b':' {
        return None;
    }
    let minutes = digits(&rest[..2])? as i64;
    let seconds = digits(&rest[3..5])? as i64;
    let mut micros = 0i64;
    if let Some(frac) = rest.get(5..).filter(|f| !f.is_empty()) {
        let frac = frac.strip_prefix(b".")?;
        let mut scale = 100_000;
        for &d in frac.iter().take(6) {
            if !d.is_ascii_digit() {
                return None;
            }
            micros += i64::from(d - b'0') * scale;
            scale /= 10;
        }
    }
    let total = (hours * 3600 + minutes * 60 + seconds) * 1_000_000 + micros;
    Some(if negative { -total } else { total })
}

fn digits(b: &[u8]) -> Option<u64> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0u64, |acc, &d| acc * 10 + u64::from(d - b'0')))
}

/// Days since the epoch, or `None` for a zero or otherwise invalid date.
fn valid_date(year: i64, month: u32, day: u32) -> Option<i64> {
    if year == 0 || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    Some(days_from_civil(year, month, day))
}

/// A zero date: null in a nullable column, the epoch otherwise (Debezium's rule).
fn zero_date(col: &ColumnDecoder, epoch: Value) -> Value {
    if col.nullable { Value::Null } else { epoch }
}

/// Fractional seconds: 0 to 3 big-endian bytes by precision, as microseconds.
fn read_fraction(c: &mut Cursor<'_>, fsp: u8) -> Result<i64, DecodeError> {
    Ok(match fsp {
        1 | 2 => i64::from(c.u8("fraction")? as i8) * 10_000,
        3 | 4 => i64::from(c.uint_be(2, "fraction")? as u16 as i16) * 100,
        5 | 6 => ((c.uint_be(3, "fraction")? << 40) as i64) >> 40,
        _ => 0,
    })
}

/// TIME(fsp): 3 bytes `sign | hour(10) | minute(6) | second(6)` offset by 0x800000, then the
/// fraction; negative times borrow from the fraction (MySQL `my_time_packed_from_binary`).
fn read_time2(c: &mut Cursor<'_>, fsp: u8) -> Result<i64, DecodeError> {
    let packed: i64 = match fsp {
        5 | 6 => c.uint_be(6, "time")? as i64 - 0x8000_0000_0000,
        _ => {
            let mut int_part = c.uint_be(3, "time")? as i64 - 0x80_0000;
            let mut frac = match fsp {
                1 | 2 => i64::from(c.u8("time fraction")?),
                3 | 4 => c.uint_be(2, "time fraction")? as i64,
                _ => 0,
            };
            let (unit, wrap) = match fsp {
                1 | 2 => (10_000, 0x100),
                3 | 4 => (100, 0x1_0000),
                _ => (0, 0),
            };
            if int_part < 0 && frac != 0 {
                int_part += 1;
                frac -= wrap;
            }
            (int_part << 24) + frac * unit
        }
    };
    let negative = packed < 0;
    let v = packed.unsigned_abs() as i64;
    let hms = v >> 24;
    let (hour, minute, second) = ((hms >> 12) % (1 << 10), (hms >> 6) % (1 << 6), hms % (1 << 6));
    let micros = (hour * 3600 + minute * 60 + second) * 1_000_000 + v % (1 << 24);
    Ok(if negative { -micros } else { micros })
}

/// DATETIME(fsp): 5 bytes `sign | year*13+month (17) | day (5) | hour (5) | minute (6) | second (6)`
/// offset by 0x8000000000, then the fraction. Millis at fsp ≤ 3, micros above.
fn read_datetime2(c: &mut Cursor<'_>, fsp: u8, col: &ColumnDecoder) -> Result<Value, DecodeError> {
    let int_part = c.uint_be(5, "datetime")? as i64 - 0x80_0000_0000;
    let frac = read_fraction(c, fsp)?;
    let v = int_part.unsigned_abs();
    let ymd = v >> 17;
    let ym = ymd >> 5;
    let hms = v % (1 << 17);
    let (year, month, day) = ((ym / 13) as i64, (ym % 13) as u32, (ymd % (1 << 5)) as u32);
    let secs = ((hms >> 12) * 3600 + ((hms >> 6) % (1 << 6)) * 60 + hms % (1 << 6)) as i64;
    let Some(days) = valid_date(year, month, day) else { return Ok(zero_date(col, Value::Int(0))) };
    let micros = days * MICROS_PER_DAY + secs * 1_000_000 + frac;
    Ok(Value::Int(if fsp <= 3 { micros.div_euclid(1000) } else { micros }))
}

/// TIMESTAMP: seconds since the epoch in UTC; 0 is the zero timestamp `0000-00-00 00:00:00`.
fn timestamp_value(secs: i64, micros: i64, fsp: u8, col: &ColumnDecoder) -> Value {
    if secs == 0 && micros == 0 {
        return zero_date(col, Value::String(format_utc_timestamp(0, u32::from(fsp))));
    }
    Value::String(format_utc_timestamp(secs * 1_000_000 + micros, u32::from(fsp)))
}

fn decode_text(bytes: &[u8], charset: &Charset, pad_to: u16) -> Result<Value, DecodeError> {
    Ok(match charset {
        Charset::Binary => {
            let mut v = bytes.to_vec();
            if v.len() < usize::from(pad_to) {
                v.resize(usize::from(pad_to), 0);
            }
            Value::Bytes(v)
        }
        // The server validates utf8 on write; should a stored value still be invalid, it is kept
        // with U+FFFD replacements rather than stopping the stream (Debezium does the same).
        Charset::Utf8 => Value::String(match std::str::from_utf8(bytes) {
            Ok(s) => s.to_owned(),
            Err(_) => String::from_utf8_lossy(bytes).into_owned(),
        }),
        Charset::Utf32 => {
            if !bytes.len().is_multiple_of(4) {
                return Err(DecodeError::Invalid(format!("utf32 text of {} bytes", bytes.len())));
            }
            Value::String(
                bytes
                    .chunks_exact(4)
                    .map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])).unwrap_or('\u{FFFD}'))
                    .collect(),
            )
        }
        Charset::Encoding(encoding) => Value::String(encoding.decode_without_bom_handling(bytes).0.into_owned()),
        Charset::Unsupported(name) => {
            return Err(DecodeError::Unsupported(format!(
                "character set {name} cannot be decoded. Fix: convert the column to utf8mb4 \
                 (ALTER TABLE ... CONVERT TO CHARACTER SET utf8mb4), or exclude it with filter.exclude_columns"
            )));
        }
    })
}

/// An ENUM or SET label from TABLE_MAP metadata, stored in the column's character set.
pub fn decode_label(bytes: &[u8], charset: &Charset) -> String {
    match decode_text(bytes, charset, 0) {
        Ok(Value::String(s)) => s,
        _ => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// MySQL's geometry storage: a 4-byte little-endian SRID, then standard WKB. Debezium writes
/// `{wkb, srid}` (SRID 0 as null); POINT columns also get `x` and `y`.
fn geometry(bytes: &[u8], point: bool) -> Result<Value, DecodeError> {
    if bytes.len() < 4 {
        return Err(DecodeError::Truncated("geometry SRID"));
    }
    let srid = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let wkb = &bytes[4..];
    let srid = if srid == 0 { Value::Null } else { Value::Int(i64::from(srid)) };
    // A 2D point: byte order, type 1, x, y.
    if point && wkb.len() == 21 {
        let little = wkb[0] == 1;
        let f = |at: usize| {
            let b: [u8; 8] = wkb[at..at + 8].try_into().unwrap_or_default();
            if little { f64::from_le_bytes(b) } else { f64::from_be_bytes(b) }
        };
        return Ok(Value::Struct(vec![
            ("x", Value::Float(f(5))),
            ("y", Value::Float(f(13))),
            ("wkb", Value::Bytes(wkb.to_vec())),
            ("srid", srid),
        ]));
    }
    Ok(Value::Struct(vec![("wkb", Value::Bytes(wkb.to_vec())), ("srid", srid)]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(codec: ColumnCodec) -> ColumnDecoder {
        ColumnDecoder { codec, nullable: true }
    }

    fn value(codec: ColumnCodec, bytes: &[u8]) -> Value {
        let mut c = Cursor::new(bytes);
        let v = read_value(&mut c, &col(codec)).unwrap();
        assert!(c.is_empty(), "all bytes consumed");
        v
    }

    #[test]
    fn integers_sign_extend_and_unsigned_bigint_is_exact() {
        assert_eq!(value(ColumnCodec::Int { bytes: 1, unsigned: false }, &[0xFF]), Value::Int(-1));
        assert_eq!(value(ColumnCodec::Int { bytes: 1, unsigned: true }, &[0xFF]), Value::Int(255));
        // 0x80FFFF as a signed 24-bit integer.
        assert_eq!(value(ColumnCodec::Int { bytes: 3, unsigned: false }, &[0xFF, 0xFF, 0x80]), Value::Int(-8_323_073));
        assert_eq!(value(ColumnCodec::Int { bytes: 8, unsigned: true }, &[0xFF; 8]), Value::UInt(u64::MAX));
        assert_eq!(value(ColumnCodec::Int { bytes: 8, unsigned: false }, &[0xFF; 8]), Value::Int(-1));
    }

    #[test]
    fn temporal_values() {
        // DATE 2024-02-29: day | month << 5 | year << 9
        let v = 29 | (2 << 5) | (2024 << 9);
        assert_eq!(value(ColumnCodec::Date, &(v as u32).to_le_bytes()[..3]), Value::Int(days_from_civil(2024, 2, 29)));
        assert_eq!(value(ColumnCodec::Date, &[0, 0, 0]), Value::Null);
        let not_null = ColumnDecoder { codec: ColumnCodec::Date, nullable: false };
        assert_eq!(read_value(&mut Cursor::new(&[0, 0, 0]), &not_null).unwrap(), Value::Int(0));
        // TIME(0) -01:00:00 and 838:59:59
        let pack = |neg: bool, h: i64, m: i64, s: i64| {
            let hms = (h << 12) | (m << 6) | s;
            let v = if neg { 0x80_0000 - hms } else { 0x80_0000 + hms };
            (v as u32).to_be_bytes()[1..].to_vec()
        };
        assert_eq!(value(ColumnCodec::Time { fsp: 0 }, &pack(true, 1, 0, 0)), Value::Int(-3_600_000_000));
        assert_eq!(value(ColumnCodec::Time { fsp: 0 }, &pack(false, 838, 59, 59)), Value::Int(3_020_399_000_000));
        // TIMESTAMP(3) 2009-02-13T23:31:30.500Z
        let mut ts = 1_234_567_890u32.to_be_bytes().to_vec();
        ts.extend_from_slice(&5000u16.to_be_bytes());
        assert_eq!(value(ColumnCodec::Timestamp { fsp: 3 }, &ts), Value::String("2009-02-13T23:31:30.500Z".into()));
        assert_eq!(value(ColumnCodec::Timestamp { fsp: 0 }, &[0, 0, 0, 0]), Value::Null);
    }

    #[test]
    fn datetime2_millis_and_micros() {
        // 2024-01-15 10:30:00 packed, then 123456 micros.
        let ym = 2024 * 13 + 1;
        let int_part: u64 = (((ym << 5) | 15) << 17) | (10 << 12) | (30 << 6);
        let mut bytes = (int_part + 0x80_0000_0000).to_be_bytes()[3..].to_vec();
        bytes.extend_from_slice(&123_456u32.to_be_bytes()[1..]);
        let base = days_from_civil(2024, 1, 15) * MICROS_PER_DAY + 37_800_000_000;
        assert_eq!(value(ColumnCodec::Datetime { fsp: 6 }, &bytes), Value::Int(base + 123_456));
        let millis = (int_part + 0x80_0000_0000).to_be_bytes()[3..].to_vec();
        assert_eq!(value(ColumnCodec::Datetime { fsp: 0 }, &millis), Value::Int(base / 1000));
    }

    #[test]
    fn strings_bits_enums_sets() {
        let binary = ColumnCodec::Str { len_bytes: 1, charset: Charset::Binary, pad_to: 4 };
        assert_eq!(value(binary, &[2, 0xAB, 0xCD]), Value::Bytes(vec![0xAB, 0xCD, 0, 0]));
        let latin1 = ColumnCodec::Str { len_bytes: 1, charset: Charset::from_name("latin1"), pad_to: 0 };
        assert_eq!(value(latin1, &[3, b'c', 0xE9, 0x80]), Value::String("cé€".into()));
        assert_eq!(value(ColumnCodec::Bit { bits: 1 }, &[1]), Value::Bool(true));
        assert_eq!(value(ColumnCodec::Bit { bits: 10 }, &[0x02, 0x01]), Value::Bytes(vec![0x01, 0x02]));
        let labels: Arc<[String]> = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()].into();
        assert_eq!(value(ColumnCodec::Enum { bytes: 1, labels: labels.clone() }, &[2]), Value::String("b".into()));
        assert_eq!(value(ColumnCodec::Set { bytes: 1, labels }, &[0b101]), Value::String("a,c".into()));
        let unsupported = ColumnCodec::Str { len_bytes: 1, charset: Charset::from_name("swe7"), pad_to: 0 };
        let err = read_value(&mut Cursor::new(&[1, b'x']), &col(unsupported)).unwrap_err();
        assert!(err.to_string().contains("utf8mb4"), "{err}");
    }

    #[test]
    fn points_carry_coordinates() {
        let mut bytes = 4326u32.to_le_bytes().to_vec();
        bytes.push(1);
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&1.5f64.to_le_bytes());
        bytes.extend_from_slice(&(-2.0f64).to_le_bytes());
        let Value::Struct(fields) = geometry(&bytes, true).unwrap() else { panic!() };
        assert_eq!(fields[0], ("x", Value::Float(1.5)));
        assert_eq!(fields[1], ("y", Value::Float(-2.0)));
        assert_eq!(fields[3], ("srid", Value::Int(4326)));
    }

    #[test]
    fn images_mark_absent_columns_unavailable() {
        let columns = vec![
            col(ColumnCodec::Int { bytes: 4, unsigned: false }),
            col(ColumnCodec::Int { bytes: 4, unsigned: false }),
            col(ColumnCodec::Int { bytes: 4, unsigned: false }),
        ];
        // Columns 0 and 2 present; column 2 null.
        let present_bytes = [0b101u8];
        let present = Bitmap::read(&mut Cursor::new(&present_bytes), 3, "p").unwrap();
        let row = [0b10u8, 7, 0, 0, 0];
        let mut out = Vec::new();
        read_image(&mut Cursor::new(&row), &columns, &present, &mut out).unwrap();
        assert_eq!(out, vec![Value::Int(7), Value::Unavailable { binary: false }, Value::Null]);
    }
}
