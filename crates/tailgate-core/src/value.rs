//! Column values, already in Debezium's logical representation.
//!
//! Connectors convert database values at decode time (dates to epoch days, timestamps to epoch
//! micros or millis, `timestamptz` to an ISO-8601 UTC string, ...), so that the renderer needs no
//! knowledge of database types. The one exception is [`Decimal`], whose wire form depends on the
//! user's `decimal_handling` and is chosen by the [envelope](crate::envelope) renderer.

/// A row image: one value per column of its [`TableSchema`](crate::TableSchema), in column order.
pub type Row = Vec<Value>;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    /// An unsigned 64-bit integer (MySQL `BIGINT UNSIGNED`), written per `bigint_unsigned_handling`.
    UInt(u64),
    Float(f64),
    /// A single-precision float (MySQL `FLOAT`), written as its shortest text (`1.1`, not
    /// `1.100000023841858`), as Debezium's FLOAT32 fields are.
    Float32(f32),
    /// Text, and every type Debezium renders as a string (uuid, json, enum, inet, ISO timestamps...).
    String(String),
    /// Binary data, base64 on the wire (Debezium's `binary.handling.mode=bytes` through the JSON converter).
    Bytes(Vec<u8>),
    Decimal(Decimal),
    Array(Vec<Value>),
    /// A Kafka Connect struct with fixed field names, e.g. Debezium's geometry `{"wkb": ..., "srid": ...}`.
    Struct(Vec<(&'static str, Value)>),
    /// A value the log did not carry (PostgreSQL unchanged TOAST). Rendered as Debezium's
    /// `__debezium_unavailable_value` placeholder: as a string, or as its bytes for binary columns.
    Unavailable {
        binary: bool,
    },
}

impl Value {
    /// A lower bound of the bytes this value takes in JSON, whatever the format options: the
    /// payload of strings and bytes (base64 makes 4 characters of 3 bytes), nested values summed.
    pub fn min_json_len(&self) -> usize {
        match self {
            Value::String(s) => s.len() + 2,
            Value::Bytes(b) => b.len() / 3 * 4 + 2,
            Value::Array(items) => items.iter().map(Value::min_json_len).sum::<usize>() + 2,
            Value::Struct(fields) => {
                fields.iter().map(|(name, v)| name.len() + 3 + v.min_json_len()).sum::<usize>() + 2
            }
            _ => 1,
        }
    }
}

/// An exact decimal number in its canonical text form (`-123.4500`: optional sign, digits, optional
/// point and fraction, no exponent), with the column's declared scale when it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decimal {
    pub text: String,
    /// `Some(scale)` for a column with a declared scale (Debezium `Decimal`); `None` for an
    /// unconstrained column (Debezium `VariableScaleDecimal`, `{scale, value}`).
    pub declared_scale: Option<u32>,
}

impl Decimal {
    /// Digits after the decimal point in `text`.
    pub fn scale(&self) -> u32 {
        self.text.split_once('.').map_or(0, |(_, frac)| frac.len() as u32)
    }

    /// The unscaled value as Java's `BigInteger.toByteArray()` writes it: big-endian two's
    /// complement, minimal length. This is what Debezium's precise mode puts on the wire (base64).
    pub fn unscaled_bytes(&self) -> Vec<u8> {
        if let Some(v) = self.unscaled_i128() {
            return minimal_twos_complement(&v.to_be_bytes());
        }
        let (negative, digits) = match self.text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, self.text.strip_prefix('+').unwrap_or(&self.text)),
        };
        let digits = digits.bytes().filter(u8::is_ascii_digit);
        // Arbitrary precision: big-endian magnitude built by multiply-and-add.
        let mut magnitude: Vec<u8> = vec![0];
        for d in digits {
            let mut carry = u32::from(d - b'0');
            for byte in magnitude.iter_mut().rev() {
                let x = u32::from(*byte) * 10 + carry;
                *byte = (x & 0xFF) as u8;
                carry = x >> 8;
            }
            while carry > 0 {
                magnitude.insert(0, (carry & 0xFF) as u8);
                carry >>= 8;
            }
        }
        // Room for the sign bit.
        magnitude.insert(0, 0);
        if negative {
            for b in magnitude.iter_mut() {
                *b = !*b;
            }
            for b in magnitude.iter_mut().rev() {
                let (sum, overflow) = b.overflowing_add(1);
                *b = sum;
                if !overflow {
                    break;
                }
            }
        }
        minimal_twos_complement(&magnitude)
    }
}

impl Decimal {
    /// The unscaled value when it fits an i128 (up to 38 digits): the allocation-free path.
    pub fn unscaled_i128(&self) -> Option<i128> {
        if self.text.len() > 38 {
            return None;
        }
        let (negative, digits) = match self.text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, self.text.strip_prefix('+').unwrap_or(&self.text)),
        };
        let mut v: i128 = 0;
        for d in digits.bytes().filter(u8::is_ascii_digit) {
            v = v * 10 + i128::from(d - b'0');
        }
        Some(if negative { -v } else { v })
    }
}

/// Drops redundant leading sign bytes, as `BigInteger.toByteArray()` does.
pub(crate) fn minimal_twos_complement(bytes: &[u8]) -> Vec<u8> {
    minimal_slice(bytes).to_vec()
}

/// [`minimal_twos_complement`] as a sub-slice.
pub(crate) fn minimal_slice(bytes: &[u8]) -> &[u8] {
    let mut start = 0;
    while start + 1 < bytes.len() {
        let (b, next) = (bytes[start], bytes[start + 1]);
        if (b == 0x00 && next & 0x80 == 0) || (b == 0xFF && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    &bytes[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(s: &str) -> Decimal {
        Decimal { text: s.into(), declared_scale: None }
    }

    #[test]
    fn unscaled_bytes_match_java_biginteger() {
        // Values checked against java.math.BigInteger#toByteArray.
        assert_eq!(dec("0").unscaled_bytes(), vec![0x00]);
        assert_eq!(dec("1.00").unscaled_bytes(), vec![0x64]);
        assert_eq!(dec("1.28").unscaled_bytes(), vec![0x00, 0x80]);
        assert_eq!(dec("-1.28").unscaled_bytes(), vec![0x80]);
        assert_eq!(dec("-1.29").unscaled_bytes(), vec![0xFF, 0x7F]);
        assert_eq!(dec("123.45").unscaled_bytes(), vec![0x30, 0x39]);
        assert_eq!(dec("-123.45").unscaled_bytes(), vec![0xCF, 0xC7]);
    }

    #[test]
    fn big_path_agrees_with_i128_path() {
        // Leading zeros push these past the i128 fast path without changing the value.
        let zeros = "0".repeat(40);
        assert_eq!(dec(&format!("{zeros}123.45")).unscaled_bytes(), vec![0x30, 0x39]);
        assert_eq!(dec(&format!("-{zeros}123.45")).unscaled_bytes(), vec![0xCF, 0xC7]);
        assert_eq!(dec(&format!("-{zeros}1.28")).unscaled_bytes(), vec![0x80]);
        // 10^40 = 0x1D_6329_F1C3_5CA4_BFAB_B9F5_6100_0000_0000
        let ten_pow_40 = format!("1{}", "0".repeat(40));
        assert_eq!(
            dec(&ten_pow_40).unscaled_bytes(),
            vec![0x1D, 0x63, 0x29, 0xF1, 0xC3, 0x5C, 0xA4, 0xBF, 0xAB, 0xB9, 0xF5, 0x61, 0x00, 0x00, 0x00, 0x00, 0x00]
        );
    }

    #[test]
    fn scale_counts_fraction_digits() {
        assert_eq!(dec("1.500").scale(), 3);
        assert_eq!(dec("-7").scale(), 0);
    }
}
