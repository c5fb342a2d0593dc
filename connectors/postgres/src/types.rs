//! PostgreSQL values (text format) to Debezium's default representation.
//!
//! The replication session pins the output settings this parser relies on (see
//! [`crate::replication::SESSION_SETTINGS`]): `DateStyle=ISO`, `TimeZone=UTC`,
//! `IntervalStyle=iso_8601`, `extra_float_digits=3`, `lc_monetary=C`. The mapping, type by type, is
//! documented in docs/types.md and tested against the real server in tests/.
//!
//! A column's [`ColumnKind`] is resolved once per Relation message, so that converting a row is a
//! match on a small enum, not a catalog lookup.
//!
//! No value the row held becomes `null`: where Debezium has a stand-in for a value its type cannot
//! represent (`infinity` dates and timestamps), that stand-in is rendered (see [`infinity`]).

use tailgate_core::temporal::{MICROS_PER_DAY, civil_from_days, days_from_civil, format_utc_timestamp, push_fraction};
use tailgate_core::{Decimal, Value};

use crate::geometry::Shape;
use infinity::Sign;

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnKind {
    Bool,
    Int,
    Float,
    /// `scale`: the declared scale, `None` for unconstrained `numeric`.
    Numeric {
        scale: Option<u32>,
    },
    Money,
    Text,
    Bytea,
    /// Days since the epoch.
    Date,
    /// Since midnight: millis when `millis` (precision ≤ 3), else micros.
    Time {
        millis: bool,
    },
    /// ISO-8601 time in UTC (`ZonedTime`).
    TimeTz,
    /// Since the epoch: millis when `millis` (precision ≤ 3), else micros.
    Timestamp {
        millis: bool,
    },
    /// ISO-8601 UTC string with `fraction` digits (`ZonedTimestamp`).
    TimestampTz {
        fraction: u32,
    },
    /// Approximate micros (`MicroDuration`).
    Interval,
    /// `bit(1)` and `varbit(1)` are booleans; other bit strings are little-endian bytes
    /// (`io.debezium.data.Bits`, see `bits_le`).
    Bit {
        single: bool,
    },
    /// The built-in geometric types, as Debezium's geometry structs (see [`crate::geometry`]).
    Geometric(Shape),
    Array(Box<ColumnKind>),
}

impl ColumnKind {
    /// The kind of a column of type `oid` with type modifier `typmod`. Unknown types (enums,
    /// domains over text, extensions) are rendered as their text, as Debezium does for enums.
    pub fn of(oid: u32, typmod: i32) -> ColumnKind {
        use ColumnKind::*;
        let precision = |default: i32| if typmod < 0 { default } else { typmod };
        match oid {
            16 => Bool,
            20 | 21 | 23 | 26 => Int,
            700 | 701 => Float,
            1700 => Numeric { scale: (typmod >= 4).then(|| ((typmod - 4) & 0xFFFF) as u32) },
            790 => Money,
            17 => Bytea,
            1082 => Date,
            1083 => Time { millis: precision(6) <= 3 },
            1266 => TimeTz,
            1114 => Timestamp { millis: precision(6) <= 3 },
            1184 => TimestampTz { fraction: precision(6) as u32 },
            1186 => Interval,
            // The typmod of bit(n) and varbit(n) is n; of an unbounded varbit, -1 (Debezium: a
            // length of 2^31-1, so bytes).
            1560 | 1562 => Bit { single: typmod == 1 },
            _ => match (Shape::of(oid), array_element(oid)) {
                (Some(shape), _) => Geometric(shape),
                (None, Some(elem)) => Array(Box::new(ColumnKind::of(elem, typmod))),
                (None, None) => Text,
            },
        }
    }

    /// Converts one value in text format. `None` means the text did not parse as the type claims,
    /// which would be a server/decoder mismatch: the caller reports it with the column name.
    pub fn convert(&self, text: &str) -> Option<Value> {
        use ColumnKind::*;
        Some(match self {
            Bool => Value::Bool(text == "t"),
            Int => Value::Int(text.parse().ok()?),
            Float => Value::Float(text.parse().ok()?),
            Numeric { scale } => match text {
                // Debezium's precise mode has no representation for these.
                "NaN" | "Infinity" | "-Infinity" => Value::Null,
                _ => Value::Decimal(Decimal { text: text.to_owned(), declared_scale: *scale }),
            },
            Money => Value::Decimal(Decimal { text: parse_money(text)?, declared_scale: Some(2) }),
            Text => Value::String(text.to_owned()),
            Bytea => Value::Bytes(parse_bytea(text)?),
            Date => match infinity::of(text) {
                Some(sign) => Value::Int(infinity::date(sign)),
                None => Value::Int(parse_date(text)?),
            },
            Time { millis } => {
                let micros = parse_time(text)?;
                Value::Int(if *millis { micros / 1000 } else { micros })
            }
            TimeTz => Value::String(format_timetz(text)?),
            Timestamp { millis } => match infinity::of(text) {
                Some(sign) => Value::Int(infinity::timestamp(sign, *millis)),
                None => {
                    let micros = parse_timestamp(text)?.0;
                    Value::Int(if *millis { micros.div_euclid(1000) } else { micros })
                }
            },
            TimestampTz { fraction } => match infinity::of(text) {
                Some(sign) => Value::String(infinity::timestamptz(sign).to_owned()),
                None => {
                    let (micros, offset) = parse_timestamp(text)?;
                    Value::String(format_utc_timestamp(micros.checked_sub(offset?)?, *fraction))
                }
            },
            Interval => Value::Int(parse_interval(text)?),
            Bit { single } => {
                let b = text.as_bytes();
                if !b.iter().all(|c| matches!(c, b'0' | b'1')) {
                    return None;
                }
                bits_value(*single, b.len(), |i| b[i] == b'1')
            }
            Geometric(shape) => shape.parse_text(text)?.value(),
            Array(elem) => parse_array(text, elem)?,
        })
    }

    /// Binary columns render the unavailable-value placeholder as bytes, as Debezium does.
    pub fn is_binary(&self) -> bool {
        matches!(self, ColumnKind::Bytea | ColumnKind::Bit { single: false })
    }
}

/// Types the snapshot can read in COPY's binary format, which spares the server the text output
/// (timestamps and numerics are its dearest) and tailgate the text parsing. Each yields exactly the
/// [`Value`] that [`ColumnKind::convert`] makes of the type's text output: the end-to-end types tests
/// read every such value both ways and compare. A table with any other column type is read as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryKind {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Numeric {
        scale: Option<u32>,
    },
    /// text, varchar, bpchar, json: the bytes are the text output.
    Text,
    /// A version byte (1), then the text output.
    Jsonb,
    Uuid,
    Bytea,
    Date,
    Timestamp {
        millis: bool,
    },
    TimestampTz {
        fraction: u32,
    },
    /// `bit(n)`, `varbit(n)`: the bit count (int4), then the bits, the first in the high bit of the
    /// first byte.
    Bit {
        single: bool,
    },
    Geometric(Shape),
}

impl BinaryKind {
    pub fn of(oid: u32, kind: &ColumnKind) -> Option<BinaryKind> {
        Some(match (oid, kind) {
            (16, _) => BinaryKind::Bool,
            (21, _) => BinaryKind::Int2,
            (23, _) => BinaryKind::Int4,
            (20, _) => BinaryKind::Int8,
            (700, _) => BinaryKind::Float4,
            (701, _) => BinaryKind::Float8,
            (1700, ColumnKind::Numeric { scale }) => BinaryKind::Numeric { scale: *scale },
            (25 | 1042 | 1043 | 114, _) => BinaryKind::Text,
            (3802, _) => BinaryKind::Jsonb,
            (2950, _) => BinaryKind::Uuid,
            (17, _) => BinaryKind::Bytea,
            (1082, _) => BinaryKind::Date,
            (1114, ColumnKind::Timestamp { millis }) => BinaryKind::Timestamp { millis: *millis },
            (1184, ColumnKind::TimestampTz { fraction }) => BinaryKind::TimestampTz { fraction: *fraction },
            (1560 | 1562, ColumnKind::Bit { single }) => BinaryKind::Bit { single: *single },
            (_, ColumnKind::Geometric(shape)) => BinaryKind::Geometric(*shape),
            _ => return None,
        })
    }

    /// Whether a primary-key column of this kind can be written back as a literal from its value
    /// (a progress marker resumes with `WHERE (pk) > (literal)`).
    pub fn keyable(self) -> bool {
        matches!(self, BinaryKind::Int2 | BinaryKind::Int4 | BinaryKind::Int8 | BinaryKind::Text | BinaryKind::Uuid)
    }

    /// Converts one value in binary format; `None` when the bytes do not fit the type.
    pub fn convert(self, raw: &[u8]) -> Option<Value> {
        use BinaryKind::*;
        Some(match self {
            Bool => Value::Bool(*raw.first()? != 0),
            Int2 => Value::Int(i16::from_be_bytes(raw.try_into().ok()?).into()),
            Int4 => Value::Int(i32::from_be_bytes(raw.try_into().ok()?).into()),
            Int8 => Value::Int(i64::from_be_bytes(raw.try_into().ok()?)),
            // The text path parses the float4's shortest text as a double; so does this.
            Float4 => Value::Float(shortest_f32_as_f64(f32::from_be_bytes(raw.try_into().ok()?))),
            Float8 => Value::Float(f64::from_be_bytes(raw.try_into().ok()?)),
            Numeric { scale } => match numeric_text(raw)? {
                Some(text) => Value::Decimal(Decimal { text, declared_scale: scale }),
                None => Value::Null,
            },
            Text => Value::String(std::str::from_utf8(raw).ok()?.to_owned()),
            Jsonb => match raw.split_first()? {
                (1, text) => Value::String(std::str::from_utf8(text).ok()?.to_owned()),
                _ => return None,
            },
            Uuid => Value::String(format_uuid(raw.try_into().ok()?)),
            Bytea => Value::Bytes(raw.to_vec()),
            // PostgreSQL stores infinity as the extreme values of the type (DATEVAL_NOEND, DT_NOEND...).
            Date => match i32::from_be_bytes(raw.try_into().ok()?) {
                i32::MAX => Value::Int(infinity::date(Sign::Positive)),
                i32::MIN => Value::Int(infinity::date(Sign::Negative)),
                days => Value::Int(i64::from(days) + PG_EPOCH_OFFSET_MICROS / MICROS_PER_DAY),
            },
            Timestamp { millis } => match i64::from_be_bytes(raw.try_into().ok()?) {
                i64::MAX => Value::Int(infinity::timestamp(Sign::Positive, millis)),
                i64::MIN => Value::Int(infinity::timestamp(Sign::Negative, millis)),
                pg => {
                    let micros = pg.checked_add(PG_EPOCH_OFFSET_MICROS)?;
                    Value::Int(if millis { micros.div_euclid(1000) } else { micros })
                }
            },
            TimestampTz { fraction } => match i64::from_be_bytes(raw.try_into().ok()?) {
                i64::MAX => Value::String(infinity::timestamptz(Sign::Positive).to_owned()),
                i64::MIN => Value::String(infinity::timestamptz(Sign::Negative).to_owned()),
                pg => Value::String(format_utc_timestamp(pg.checked_add(PG_EPOCH_OFFSET_MICROS)?, fraction)),
            },
            Bit { single } => {
                let (len, bits) = raw.split_first_chunk::<4>()?;
                let len = usize::try_from(i32::from_be_bytes(*len)).ok()?;
                if bits.len() != len.div_ceil(8) {
                    return None;
                }
                bits_value(single, len, |i| bits[i / 8] & (0x80 >> (i % 8)) != 0)
            }
            Geometric(shape) => shape.parse_binary(raw)?.value(),
        })
    }
}

fn shortest_f32_as_f64(value: f32) -> f64 {
    use std::fmt::Write;
    // Display writes the shortest digits that round-trip (never an exponent: at most 48 bytes).
    let mut text = ShortText::default();
    let _ = write!(text, "{value}");
    std::str::from_utf8(&text.bytes[..text.len]).ok().and_then(|t| t.parse().ok()).unwrap_or(f64::from(value))
}

/// A stack buffer for one formatted number.
struct ShortText {
    bytes: [u8; 64],
    len: usize,
}

impl Default for ShortText {
    fn default() -> Self {
        ShortText { bytes: [0; 64], len: 0 }
    }
}

impl std::fmt::Write for ShortText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        self.bytes.get_mut(self.len..end).ok_or(std::fmt::Error)?.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

fn format_uuid(raw: &[u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(36);
    for (i, b) in raw.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 0xF)] as char);
    }
    out
}

/// A binary numeric as `numeric_out` writes it: `Some(None)` for NaN and ±Infinity (which the text
/// path renders as null), `None` for malformed bytes. Layout: ndigits, weight (of the first base-10000
/// digit), sign, display scale, then the digits.
fn numeric_text(raw: &[u8]) -> Option<Option<String>> {
    let word = |i: usize| raw.get(2 * i..2 * i + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let ndigits = usize::from(word(0)?);
    let weight = i64::from(word(1)? as i16);
    let sign = word(2)?;
    let dscale = usize::from(word(3)?);
    match sign {
        0x0000 | 0x4000 => {}
        0xC000 | 0xD000 | 0xF000 => return Some(None),
        _ => return None,
    }
    let digits: Vec<u16> = (0..ndigits).map(|i| word(4 + i)).collect::<Option<_>>()?;
    if digits.iter().any(|d| *d > 9999) {
        return None;
    }
    let digit = |d: i64| usize::try_from(d).ok().and_then(|d| digits.get(d)).copied().unwrap_or(0);
    let mut out = String::with_capacity(8 + 4 * ndigits + dscale);
    if sign == 0x4000 {
        out.push('-');
    }
    let mut d = 0i64;
    if weight < 0 {
        out.push('0');
        d = weight + 1;
    } else {
        while d <= weight {
            let group = digit(d);
            if d == 0 {
                out.push_str(itoa::Buffer::new().format(group));
            } else {
                push_group(&mut out, group);
            }
            d += 1;
        }
    }
    if dscale > 0 {
        out.push('.');
        let end = out.len() + dscale;
        while out.len() < end {
            push_group(&mut out, digit(d));
            d += 1;
        }
        out.truncate(end);
    }
    Some(Some(out))
}

/// Four decimal digits, zero-padded.
fn push_group(out: &mut String, group: u16) {
    for div in [1000, 100, 10, 1] {
        out.push(char::from(b'0' + (group / div % 10) as u8));
    }
}

/// Element type of the built-in array types.
fn array_element(oid: u32) -> Option<u32> {
    Some(match oid {
        1000 => 16,
        1001 => 17,
        1002 => 18,
        1003 => 19,
        1005 => 21,
        1007 => 23,
        1016 => 20,
        1009 => 25,
        1014 => 1042,
        1015 => 1043,
        1021 => 700,
        1022 => 701,
        1028 => 26,
        1231 => 1700,
        791 => 790,
        2951 => 2950,
        1182 => 1082,
        1183 => 1083,
        1270 => 1266,
        1115 => 1114,
        1185 => 1184,
        1187 => 1186,
        199 => 114,
        3807 => 3802,
        143 => 142,
        1041 => 869,
        651 => 650,
        1040 => 829,
        775 => 774,
        1561 => 1560,
        1563 => 1562,
        _ => return None,
    })
}

/// What Debezium's PostgreSQL connector emits for `infinity` and `-infinity` in the default
/// `time.precision.mode=adaptive` (read in its `PostgresValueConverter`, `DateTimeFormat` and
/// `AbstractColumnValue`, for values decoded from pgoutput's text). These are stand-ins, not dates:
/// consumers that compare with them must use exactly these numbers.
pub mod infinity {
    /// `infinity` is `Positive`, `-infinity` is `Negative`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Sign {
        Positive,
        Negative,
    }

    /// The sign of a text `infinity` / `-infinity`; `None` for any other text.
    pub fn of(text: &str) -> Option<Sign> {
        match text {
            "infinity" => Some(Sign::Positive),
            "-infinity" => Some(Sign::Negative),
            _ => None,
        }
    }

    /// `date` (`io.debezium.time.Date`): the epoch days of Debezium's `POSITIVE_INFINITY_LOCAL_DATE`
    /// (-5877611-06-21) and `NEGATIVE_INFINITY_LOCAL_DATE` (-5877611-06-22). Yes, +infinity is the
    /// smaller number.
    pub fn date(sign: Sign) -> i64 {
        match sign {
            Sign::Positive => -2_147_472_692,
            Sign::Negative => -2_147_472_691,
        }
    }

    /// `timestamp`: PgJDBC's `PGStatement.DATE_POSITIVE_INFINITY` (9223372036825200000) and
    /// `DATE_NEGATIVE_INFINITY` (-9223372036832400000) read as microseconds (`MicroTimestamp`), or that
    /// instant in milliseconds for precision 0 to 3 (`Timestamp`).
    pub fn timestamp(sign: Sign, millis: bool) -> i64 {
        let micros: i64 = match sign {
            Sign::Positive => 9_223_372_036_825_200_000,
            Sign::Negative => -9_223_372_036_832_400_000,
        };
        if millis { micros / 1000 } else { micros }
    }

    /// `timestamptz` (`ZonedTimestamp`): the text itself.
    pub fn timestamptz(sign: Sign) -> &'static str {
        match sign {
            Sign::Positive => "infinity",
            Sign::Negative => "-infinity",
        }
    }
}

fn parse_money(text: &str) -> Option<String> {
    let negative = text.starts_with('-') || text.starts_with('(');
    let mut out = String::with_capacity(text.len());
    if negative {
        out.push('-');
    }
    out.extend(text.chars().filter(|c| c.is_ascii_digit() || *c == '.'));
    (out.len() > usize::from(negative)).then_some(out)
}

fn parse_bytea(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    hex.as_bytes().chunks(2).map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?)).collect()
}

/// A bit string of `len` bits (`set(i)`: whether the i-th bit written is 1) as Debezium renders it.
///
/// `single` (`bit(1)`, `varbit(1)`): a boolean, true when any bit is set (Debezium parses the bits
/// as a base-2 number and compares it with 0; it fails on an empty `varbit(1)`, which is `false`
/// here). Otherwise [`bits_le`].
fn bits_value(single: bool, len: usize, set: impl Fn(usize) -> bool) -> Value {
    if single { Value::Bool((0..len).any(set)) } else { Value::Bytes(bits_le(len, set)) }
}

/// Debezium's `io.debezium.data.Bits` for PostgreSQL: the number the bits spell (the last bit
/// written is bit 0) as little-endian bytes, only as many as its highest set bit needs. That is
/// Java's `BitSet.toByteArray()`, which `PostgresValueConverter.convertBits` sends for both `bit(n)`
/// and `varbit`: `B'000'` is no bytes at all, `B'0000000001'` is one byte (`01`), not two.
fn bits_le(len: usize, set: impl Fn(usize) -> bool) -> Vec<u8> {
    let mut bytes = vec![0u8; len.div_ceil(8)];
    for i in (0..len).filter(|&i| set(i)) {
        let bit = len - 1 - i;
        bytes[bit / 8] |= 1 << (bit % 8);
    }
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    bytes
}

/// The last year a PostgreSQL date can hold. Years past it cannot come from the server; refusing
/// them keeps the day count (and the microseconds of a timestamp) from overflowing.
const MAX_YEAR: i64 = 5_874_897;

/// `YYYY-MM-DD` (ISO DateStyle), optionally followed by ` BC`.
pub fn parse_date(text: &str) -> Option<i64> {
    let (text, bc) = match text.strip_suffix(" BC") {
        Some(t) => (t, true),
        None => (text, false),
    };
    let b = text.as_bytes();
    // The year has at least 4 digits; month and day exactly 2.
    let n = b.len();
    if n < 10 || b[n - 3] != b'-' || b[n - 6] != b'-' {
        return None;
    }
    let mut year = digits(&b[..n - 6])? as i64;
    if year > MAX_YEAR {
        return None;
    }
    let month = digits(&b[n - 5..n - 3])? as u32;
    let day = digits(&b[n - 2..])? as u32;
    if bc {
        // 1 BC is astronomical year 0.
        year = 1 - year;
    }
    Some(days_from_civil(year, month, day))
}

/// An unsigned decimal number, every byte a digit.
fn digits(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 18 {
        return None;
    }
    b.iter().try_fold(0u64, |acc, &c| c.is_ascii_digit().then(|| acc * 10 + u64::from(c - b'0')))
}

/// `HH:MM:SS[.ffffff]` to micros since midnight (`24:00:00` is a valid PostgreSQL time).
pub fn parse_time(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 8 || b[2] != b':' || b[5] != b':' {
        return None;
    }
    let h = digits(&b[..2])? as i64;
    let m = digits(&b[3..5])? as i64;
    let s = digits(&b[6..8])? as i64;
    let frac = match b.get(8) {
        None => 0,
        Some(b'.') => parse_fraction_micros(&text[9..])?,
        Some(_) => return None,
    };
    Some(((h * 60 + m) * 60 + s) * 1_000_000 + frac)
}

fn parse_fraction_micros(frac: &str) -> Option<i64> {
    let b = frac.as_bytes();
    if b.is_empty() {
        return Some(0);
    }
    let used = &b[..b.len().min(6)];
    let v = digits(used)? as i64;
    if !b[used.len()..].iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v * 10_i64.pow(6 - used.len() as u32))
}

/// Splits a trailing UTC offset (`+05`, `-03:30`, `+05:30:15`) from a time; returns its seconds.
fn split_offset(text: &str) -> Option<(&str, i64)> {
    // The offset sign comes after `HH:MM:SS`, never inside it.
    let pos = text.bytes().enumerate().skip(8).find(|(_, c)| *c == b'+' || *c == b'-').map(|(i, _)| i)?;
    let (time, offset) = text.split_at(pos);
    let sign = if offset.starts_with('-') { -1 } else { 1 };
    let mut secs: i64 = 0;
    for (i, part) in offset[1..].split(':').enumerate() {
        let v = digits(part.as_bytes())? as i64;
        // Checked: the parts are digits of any length here, not the server's two.
        secs = secs.checked_add(v.checked_mul(*[3600, 60, 1].get(i)?)?)?;
    }
    Some((time, sign * secs))
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff][+TZ][ BC]` to (micros since the Unix epoch as written, offset in
/// micros if the text carried one).
pub fn parse_timestamp(text: &str) -> Option<(i64, Option<i64>)> {
    let (text, bc) = match text.strip_suffix(" BC") {
        Some(t) => (t, true),
        None => (text, false),
    };
    let space = text.bytes().position(|c| c == b' ')?;
    let (date, time) = (&text[..space], &text[space + 1..]);
    let (time, offset) = match split_offset(time) {
        Some((t, secs)) => (t, Some(secs.checked_mul(1_000_000)?)),
        None => (time, None),
    };
    let mut days = parse_date(date)?;
    if bc {
        // parse_date saw a year AD: move it to year 1 - y.
        let year = digits(&date.as_bytes()[..date.len() - 6])? as i64;
        let (_, m, d) = civil_from_days(days);
        days = days_from_civil(1 - year, m, d);
    }
    Some((days.checked_mul(MICROS_PER_DAY)?.checked_add(parse_time(time)?)?, offset))
}

/// `HH:MM:SS[.ffffff]+TZ` to Debezium's `ZonedTime` in UTC: `08:30:00.123456Z`.
fn format_timetz(text: &str) -> Option<String> {
    let (time, offset) = split_offset(text)?;
    let micros = parse_time(time)?.checked_sub(offset.checked_mul(1_000_000)?)?.rem_euclid(MICROS_PER_DAY);
    let secs = micros / 1_000_000;
    let mut out = format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
    push_fraction(&mut out, micros % 1_000_000, 0);
    out.push('Z');
    Some(out)
}

/// ISO-8601 interval (`P1Y2M3DT4H5M6.5S`, components may be negative) to Debezium's
/// `MicroDuration`: a month counts as 365.25 / 12 days.
pub fn parse_interval(text: &str) -> Option<i64> {
    const DAYS_PER_MONTH: f64 = 365.25 / 12.0;
    let rest = text.strip_prefix('P')?;
    let (mut years, mut months, mut days, mut hours, mut minutes, mut seconds) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    let mut in_time = false;
    let mut number = String::new();
    for c in rest.chars() {
        match c {
            'T' => in_time = true,
            '0'..='9' | '.' | '-' | '+' => number.push(c),
            unit => {
                let v: f64 = number.parse().ok()?;
                number.clear();
                match (unit, in_time) {
                    ('Y', false) => years = v,
                    ('M', false) => months = v,
                    ('W', false) => days += v * 7.0,
                    ('D', false) => days += v,
                    ('H', true) => hours = v,
                    ('M', true) => minutes = v,
                    ('S', true) => seconds = v,
                    _ => return None,
                }
            }
        }
    }
    if !number.is_empty() {
        return None;
    }
    let total_days = DAYS_PER_MONTH * (years * 12.0 + months) + days;
    let total_seconds = ((total_days * 24.0 + hours) * 60.0 + minutes) * 60.0 + seconds;
    Some((total_seconds * 1_000_000.0).round() as i64)
}

/// A PostgreSQL array literal (`{1,2,NULL}`, `{"a b","x\"y"}`, nested `{{1,2},{3,4}}`).
fn parse_array(text: &str, elem: &ColumnKind) -> Option<Value> {
    // Arrays with explicit bounds start with `[1:2]={...}`.
    let text = match text.find("={") {
        Some(i) if text.starts_with('[') => &text[i + 1..],
        _ => text,
    };
    let mut chars = text.char_indices().peekable();
    let value = parse_array_level(text, &mut chars, elem, 1)?;
    chars.next().is_none().then_some(value)
}

/// PostgreSQL's limit on array dimensions (`MAXDIM`).
const MAX_DIMENSIONS: usize = 6;

/// One level of braces; `depth` counts them. Deeper nesting than the server allows is refused: each
/// level is a stack frame here (and in the value's drop), and text of many thousand braces would
/// overflow the stack.
fn parse_array_level(
    text: &str,
    chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>,
    elem: &ColumnKind,
    depth: usize,
) -> Option<Value> {
    if chars.next()?.1 != '{' || depth > MAX_DIMENSIONS {
        return None;
    }
    let mut items = Vec::new();
    if chars.peek()?.1 == '}' {
        chars.next();
        return Some(Value::Array(items));
    }
    loop {
        match chars.peek()?.1 {
            '{' => items.push(parse_array_level(text, chars, elem, depth + 1)?),
            '"' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next()?.1 {
                        '\\' => s.push(chars.next()?.1),
                        '"' => break,
                        c => s.push(c),
                    }
                }
                items.push(elem.convert(&s)?);
            }
            _ => {
                let start = chars.peek()?.0;
                while !matches!(chars.peek()?.1, ',' | '}') {
                    chars.next();
                }
                let raw = text[start..chars.peek()?.0].trim();
                items.push(if raw.eq_ignore_ascii_case("NULL") { Value::Null } else { elem.convert(raw)? });
            }
        }
        match chars.next()?.1 {
            ',' => continue,
            '}' => return Some(Value::Array(items)),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(oid: u32, typmod: i32, text: &str) -> Value {
        ColumnKind::of(oid, typmod).convert(text).unwrap_or_else(|| panic!("{text:?} did not parse as {oid}"))
    }

    /// A binary numeric: sign, weight, display scale, base-10000 digits.
    fn numeric(sign: u16, weight: i16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut raw = Vec::new();
        for word in [digits.len() as u16, weight as u16, sign, dscale].iter().chain(digits) {
            raw.extend_from_slice(&word.to_be_bytes());
        }
        raw
    }

    /// The binary value converts as the type's text output does.
    fn agree(oid: u32, typmod: i32, raw: &[u8], text: &str) {
        let kind = ColumnKind::of(oid, typmod);
        let binary = BinaryKind::of(oid, &kind).unwrap().convert(raw);
        assert_eq!(binary, kind.convert(text), "{oid} {text:?}");
    }

    #[test]
    fn binary_numerics_read_as_numeric_out_writes_them() {
        let typmod = ((10 << 16) | 2) + 4; // numeric(10,2)
        agree(1700, typmod, &numeric(0, 0, 2, &[12, 3400]), "12.34");
        agree(1700, typmod, &numeric(0x4000, 1, 2, &[1, 2345, 6700]), "-12345.67");
        agree(1700, typmod, &numeric(0, 0, 2, &[]), "0.00");
        agree(1700, -1, &numeric(0, 0, 0, &[]), "0");
        agree(1700, -1, &numeric(0, -2, 6, &[1200]), "0.000012");
        agree(1700, -1, &numeric(0, 2, 0, &[1]), "100000000");
        agree(1700, -1, &numeric(0, 0, 20, &[1, 2000]), "1.20000000000000000000");
        agree(1700, -1, &numeric(0xC000, 0, 0, &[]), "NaN");
        agree(1700, -1, &numeric(0xD000, 0, 0, &[]), "Infinity");
        assert_eq!(numeric_text(&numeric(0, 0, 0, &[10_000])), None, "a digit out of range");
        assert_eq!(numeric_text(&[0, 1]), None, "truncated");
    }

    #[test]
    fn binary_scalars_read_as_their_text() {
        agree(16, -1, &[1], "t");
        agree(21, -1, &(-7i16).to_be_bytes(), "-7");
        agree(23, -1, &i32::MIN.to_be_bytes(), "-2147483648");
        agree(20, -1, &i64::MAX.to_be_bytes(), "9223372036854775807");
        for (f, text) in [(1.1f32, "1.1"), (3.4028235e38, "3.4028235e+38"), (1e-45, "1e-45"), (-0.0, "-0")] {
            agree(700, -1, &f.to_be_bytes(), text);
        }
        agree(700, -1, &f32::INFINITY.to_be_bytes(), "Infinity");
        agree(701, -1, &0.1f64.to_be_bytes(), "0.1");
        agree(
            2950,
            -1,
            &[0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38, 0x0a, 0x11],
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        );
        agree(3802, -1, b"\x01{\"a\": 1}", "{\"a\": 1}");
        agree(1082, -1, &(-1i32).to_be_bytes(), "1999-12-31");
        agree(1082, -1, &i32::MAX.to_be_bytes(), "infinity");
        agree(1114, -1, &1_500_000i64.to_be_bytes(), "2000-01-01 00:00:01.5");
        agree(1114, 3, &(-1i64).to_be_bytes(), "1999-12-31 23:59:59.999999");
        agree(1184, -1, &0i64.to_be_bytes(), "2000-01-01 00:00:00+00");
        agree(1184, 3, &i64::MIN.to_be_bytes(), "-infinity");
    }

    #[test]
    fn dates_are_days_since_epoch() {
        assert_eq!(conv(1082, -1, "1970-01-01"), Value::Int(0));
        assert_eq!(conv(1082, -1, "2024-03-01"), Value::Int(19783));
        assert_eq!(conv(1082, -1, "1969-12-31"), Value::Int(-1));
        assert_eq!(conv(1082, -1, "0001-01-01 BC"), Value::Int(days_from_civil(0, 1, 1)));
        for d in [-800_000, -1, 0, 1, 19783, 2_932_896] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    #[test]
    fn times_follow_adaptive_precision() {
        assert_eq!(conv(1083, -1, "10:30:00.123456"), Value::Int(37_800_123_456));
        assert_eq!(conv(1083, 3, "10:30:00.123"), Value::Int(37_800_123));
        assert_eq!(conv(1083, -1, "24:00:00"), Value::Int(86_400_000_000));
        assert_eq!(conv(1266, -1, "10:30:00.5+02"), Value::String("08:30:00.5Z".into()));
        assert_eq!(conv(1266, -1, "01:00:00-03:30"), Value::String("04:30:00Z".into()));
    }

    #[test]
    fn timestamps() {
        assert_eq!(conv(1114, -1, "2024-01-15 10:30:00.123456"), Value::Int(1_705_314_600_123_456));
        assert_eq!(conv(1114, 3, "2024-01-15 10:30:00.123"), Value::Int(1_705_314_600_123));
        assert_eq!(conv(1114, -1, "1969-12-31 23:59:59.5"), Value::Int(-500_000));
        assert_eq!(conv(1184, -1, "2024-01-15 10:30:00.1+00"), Value::String("2024-01-15T10:30:00.100000Z".into()));
        assert_eq!(conv(1184, 3, "2024-01-15 12:30:00+02"), Value::String("2024-01-15T10:30:00.000Z".into()));
        assert_eq!(conv(1184, 0, "2024-01-15 10:30:00+00"), Value::String("2024-01-15T10:30:00Z".into()));
        // BC, and offsets with minutes (sessions outside UTC would send these).
        assert_eq!(conv(1114, -1, "0044-03-15 10:00:00 BC"), Value::Int(-735_160 * 86_400_000_000 + 36_000_000_000));
        assert_eq!(conv(1184, -1, "2024-01-15 16:00:00+05:30"), Value::String("2024-01-15T10:30:00.000000Z".into()));
        assert_eq!(conv(1184, -1, "2024-01-15 07:00:00-03:30"), Value::String("2024-01-15T10:30:00.000000Z".into()));
        assert_eq!(conv(1184, -1, "12024-01-15 10:30:00+00"), Value::String("+12024-01-15T10:30:00.000000Z".into()));
        assert!(ColumnKind::of(1114, -1).convert("2024-1-15 10:30:00").is_none());
    }

    #[test]
    fn intervals_use_debezium_month_length() {
        assert_eq!(conv(1186, -1, "PT0S"), Value::Int(0));
        assert_eq!(conv(1186, -1, "P1DT2H"), Value::Int(93_600_000_000));
        assert_eq!(conv(1186, -1, "P1M"), Value::Int(2_629_800_000_000));
        assert_eq!(conv(1186, -1, "P1Y"), Value::Int(31_557_600_000_000));
        assert_eq!(conv(1186, -1, "P-1DT-0.5S"), Value::Int(-86_400_500_000));
    }

    #[test]
    fn numbers_money_bytes() {
        assert_eq!(conv(23, -1, "-42"), Value::Int(-42));
        assert_eq!(conv(701, -1, "1.5"), Value::Float(1.5));
        assert_eq!(
            conv(1700, (10 << 16 | 2) + 4, "12.50"),
            Value::Decimal(Decimal { text: "12.50".into(), declared_scale: Some(2) })
        );
        assert_eq!(conv(1700, -1, "1.5"), Value::Decimal(Decimal { text: "1.5".into(), declared_scale: None }));
        assert_eq!(conv(1700, -1, "NaN"), Value::Null);
        assert_eq!(
            conv(790, -1, "-$1,234.56"),
            Value::Decimal(Decimal { text: "-1234.56".into(), declared_scale: Some(2) })
        );
        assert_eq!(conv(17, -1, "\\x00ff10"), Value::Bytes(vec![0, 255, 16]));
        assert_eq!(conv(16, -1, "f"), Value::Bool(false));
    }

    /// Debezium's stand-ins, both ways (the binary values are PostgreSQL's DT_NOEND/DT_NOBEGIN,
    /// DATEVAL_NOEND/DATEVAL_NOBEGIN).
    #[test]
    fn infinities_render_as_debeziums_stand_ins() {
        for (typmod, positive, negative) in [
            (-1, 9_223_372_036_825_200_000, -9_223_372_036_832_400_000),
            (6, 9_223_372_036_825_200_000, -9_223_372_036_832_400_000),
            (4, 9_223_372_036_825_200_000, -9_223_372_036_832_400_000),
            (3, 9_223_372_036_825_200, -9_223_372_036_832_400),
            (0, 9_223_372_036_825_200, -9_223_372_036_832_400),
        ] {
            assert_eq!(conv(1114, typmod, "infinity"), Value::Int(positive), "timestamp({typmod})");
            assert_eq!(conv(1114, typmod, "-infinity"), Value::Int(negative), "timestamp({typmod})");
            agree(1114, typmod, &i64::MAX.to_be_bytes(), "infinity");
            agree(1114, typmod, &i64::MIN.to_be_bytes(), "-infinity");
        }
        // The epoch days of -5877611-06-21 and -5877611-06-22.
        // (Java's LocalDate.toEpochDay gives the same numbers.)
        assert_eq!(days_from_civil(-5_877_611, 6, 21), -2_147_472_692);
        assert_eq!(days_from_civil(-5_877_611, 6, 22), -2_147_472_691);
        assert_eq!(conv(1082, -1, "infinity"), Value::Int(-2_147_472_692));
        assert_eq!(conv(1082, -1, "-infinity"), Value::Int(-2_147_472_691));
        agree(1082, -1, &i32::MAX.to_be_bytes(), "infinity");
        agree(1082, -1, &i32::MIN.to_be_bytes(), "-infinity");
        for typmod in [-1, 0, 3, 6] {
            assert_eq!(conv(1184, typmod, "infinity"), Value::String("infinity".into()));
            assert_eq!(conv(1184, typmod, "-infinity"), Value::String("-infinity".into()));
            agree(1184, typmod, &i64::MAX.to_be_bytes(), "infinity");
            agree(1184, typmod, &i64::MIN.to_be_bytes(), "-infinity");
        }
        // Arrays use the element conversion.
        assert_eq!(conv(1182, -1, "{infinity,NULL}"), Value::Array(vec![Value::Int(-2_147_472_692), Value::Null]));
        // Not an infinity: still parsed as a date (and refused).
        assert!(ColumnKind::of(1082, -1).convert("Infinity").is_none());
    }

    /// A bit string in COPY's binary format: bit count, then the bits from the high bit down.
    fn bits_binary(text: &str) -> Vec<u8> {
        let mut raw = (text.len() as i32).to_be_bytes().to_vec();
        let mut bytes = vec![0u8; text.len().div_ceil(8)];
        for (i, c) in text.bytes().enumerate() {
            if c == b'1' {
                bytes[i / 8] |= 0x80 >> (i % 8);
            }
        }
        raw.extend(bytes);
        raw
    }

    #[test]
    fn bits_are_booleans_or_minimal_little_endian_bytes() {
        // (oid, typmod, text, expected): the cases of Debezium's own tests (bitbin_table) and the edges.
        let bytes = |b: &[u8]| Value::Bytes(b.to_vec());
        let cases = [
            (1560, 1, "1", Value::Bool(true)),
            (1560, 1, "0", Value::Bool(false)),
            (1562, 1, "1", Value::Bool(true)),
            (1562, 1, "0", Value::Bool(false)),
            (1562, 1, "", Value::Bool(false)),
            (1560, 2, "11", bytes(&[3])),
            (1560, 7, "1000000", bytes(&[64])),
            (1562, 2, "00", bytes(&[])),
            (1560, 3, "000", bytes(&[])),
            (1560, 3, "101", bytes(&[5])),
            (1560, 10, "1000000001", bytes(&[0x01, 0x02])),
            (1560, 10, "0000000001", bytes(&[0x01])),
            (1560, 10, "0000000000", bytes(&[])),
            (1560, 10, "1000000000", bytes(&[0x00, 0x02])),
            (1562, 24, "000000110000001000000001", bytes(&[1, 2, 3])),
            (1562, 64, &format!("1{}", "0".repeat(63)), bytes(&[0, 0, 0, 0, 0, 0, 0, 0x80])),
            (1562, -1, "101", bytes(&[5])),
            (1562, -1, "111011010001000110000001000000001", bytes(&[1, 2, 35, 0xDA, 1])),
            (1562, -1, "1", bytes(&[1])),
            (1562, -1, "", bytes(&[])),
        ];
        for (oid, typmod, text, want) in cases {
            assert_eq!(conv(oid, typmod, text), want, "{oid}({typmod}) {text:?}");
            agree(oid, typmod, &bits_binary(text), text);
        }
        assert!(ColumnKind::of(1560, 3).convert("102").is_none());
        assert!(ColumnKind::of(1560, 1).convert("t").is_none());
        let kind = ColumnKind::of(1560, 10);
        let binary = BinaryKind::of(1560, &kind).unwrap();
        assert_eq!(binary.convert(&bits_binary("1000000001")[..5]), None, "truncated");
        assert_eq!(binary.convert(&[0xFF, 0xFF, 0xFF, 0xFF]), None, "negative length");
        assert_eq!(conv(1561, 1, "{1,0}"), Value::Array(vec![Value::Bool(true), Value::Bool(false)]));
    }

    #[test]
    fn geometric_types_convert_alike_from_text_and_binary() {
        let be = |v: &[f64]| -> Vec<u8> { v.iter().flat_map(|f| f.to_be_bytes()).collect() };
        let counted = |prefix: &[u8], v: &[f64]| -> Vec<u8> {
            let mut raw = prefix.to_vec();
            raw.extend(((v.len() / 2) as i32).to_be_bytes());
            raw.extend(be(v));
            raw
        };
        agree(600, -1, &be(&[1.5, 2.5]), "(1.5,2.5)");
        agree(600, -1, &be(&[-0.0, 1e300]), "(-0,1e+300)");
        agree(600, -1, &be(&[0.1, -1e-7]), "(0.1,-1e-07)");
        agree(601, -1, &be(&[0.0, 0.0, 1.0, 1.0]), "[(0,0),(1,1)]");
        agree(603, -1, &be(&[2.0, 2.0, 0.0, 0.0]), "(2,2),(0,0)");
        agree(602, -1, &counted(&[0], &[0.0, 0.0, 1.0, 1.0, 2.0, 0.0]), "[(0,0),(1,1),(2,0)]");
        agree(602, -1, &counted(&[1], &[0.0, 0.0, 1.0, 1.0]), "((0,0),(1,1))");
        agree(604, -1, &counted(&[], &[0.0, 0.0, 1.0, 0.0, 1.0, 1.0]), "((0,0),(1,0),(1,1))");
        agree(628, -1, &be(&[1.0, -1.0, 0.0]), "{1,-1,0}");
        agree(718, -1, &be(&[1.0, 2.0, 3.0]), "<(1,2),3>");
        assert!(matches!(conv(600, -1, "(1,2)"), Value::Struct(_)));
        assert!(ColumnKind::of(600, -1).convert("(1,2").is_none());
        // Arrays of geometric types stay text (as before; Debezium leaves them out of events).
        assert_eq!(conv(1017, -1, "{\"(1,2)\"}"), Value::String("{\"(1,2)\"}".into()));
    }

    #[test]
    fn arrays_parse_quoting_nulls_and_nesting() {
        assert_eq!(conv(1007, -1, "{1,2,NULL}"), Value::Array(vec![Value::Int(1), Value::Int(2), Value::Null]));
        assert_eq!(
            conv(1009, -1, r#"{"a b","x\"y",plain,"NULL"}"#),
            Value::Array(vec![
                Value::String("a b".into()),
                Value::String("x\"y".into()),
                Value::String("plain".into()),
                Value::String("NULL".into()),
            ])
        );
        assert_eq!(
            conv(1007, -1, "{{1,2},{3,4}}"),
            Value::Array(vec![
                Value::Array(vec![Value::Int(1), Value::Int(2)]),
                Value::Array(vec![Value::Int(3), Value::Int(4)])
            ])
        );
        assert_eq!(conv(1007, -1, "{}"), Value::Array(vec![]));
        assert_eq!(conv(1007, -1, "[0:1]={7,8}"), Value::Array(vec![Value::Int(7), Value::Int(8)]));
        assert!(ColumnKind::of(1007, -1).convert("{1,2").is_none());
    }

    /// Found by the `pgoutput` fuzz target (value mode, timestamp): a year of 8 digits overflowed
    /// the microseconds (a panic with overflow checks, a wrong value without). Dates, times and
    /// offsets out of PostgreSQL's range are errors.
    #[test]
    fn out_of_range_dates_and_offsets_are_errors_not_overflows() {
        let timestamp = ColumnKind::of(1114, -1);
        assert_eq!(timestamp.convert("20220244-01-15 50:30:00.134+2024-06"), None);
        assert_eq!(
            timestamp.convert("9999-12-31 23:59:59"),
            Some(Value::Int(days_from_civil(9999, 12, 31) * MICROS_PER_DAY + 86_399_000_000))
        );
        for (oid, text) in [
            (1082, "999999999999999999-01-01"),
            (1114, "5874897-12-31 00:00:00"),
            (1184, "2024-01-01 00:00:00+999999999999999999"),
            (1184, "2024-01-01 00:00:00+999999999999"),
            (1184, "294276-12-31 23:59:59-15"),
            (1266, "10:00:00+999999999999999999"),
            (1266, "10:00:00+99999999999999:99"),
        ] {
            assert_eq!(ColumnKind::of(oid, -1).convert(text), None, "{oid} {text:?}");
        }
        assert_eq!(conv(1082, -1, "5874897-12-31"), Value::Int(days_from_civil(5_874_897, 12, 31)));
    }

    /// Array text nested 100,000 deep overflowed the stack (an abort, not an error). The fuzz
    /// targets' inputs stay under 4 KiB, too short for it: found by review while writing them. Six
    /// dimensions, the server's limit, still parse.
    #[test]
    fn arrays_nested_deeper_than_the_server_allows_are_errors() {
        let int_array = ColumnKind::of(1007, -1);
        assert_eq!(int_array.convert(&"{".repeat(100_000)), None);
        assert_eq!(int_array.convert(&("{".repeat(100_000) + &"}".repeat(100_000))), None);
        assert_eq!(int_array.convert("{{{{{{{1}}}}}}}"), None, "seven dimensions");
        let mut six = Value::Array(vec![Value::Int(1)]);
        for _ in 0..5 {
            six = Value::Array(vec![six]);
        }
        assert_eq!(int_array.convert("{{{{{{1}}}}}}"), Some(six));
    }
}
