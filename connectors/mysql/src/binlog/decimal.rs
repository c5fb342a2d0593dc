//! MySQL's binary DECIMAL format (`NEWDECIMAL` in row images).
//!
//! A `DECIMAL(p, s)` is stored as groups of nine decimal digits in 4 big-endian bytes, with the
//! leftover digits of the integer part first and of the fraction part last in 1 to 4 bytes. The
//! first bit is the sign (set for non-negative); negative numbers have every byte inverted.

use super::DecodeError;

/// Bytes needed for 0..=9 leftover digits.
const DIGITS_TO_BYTES: [usize; 10] = [0, 1, 1, 2, 2, 3, 3, 4, 4, 4];

/// Bytes a `DECIMAL(precision, scale)` value takes.
pub fn binary_size(precision: u8, scale: u8) -> usize {
    let (intg, frac) = (usize::from(precision.saturating_sub(scale)), usize::from(scale));
    (intg / 9) * 4 + DIGITS_TO_BYTES[intg % 9] + (frac / 9) * 4 + DIGITS_TO_BYTES[frac % 9]
}

/// Decodes one value into its canonical text: optional `-`, the integer digits without leading
/// zeros (at least one), and exactly `scale` fraction digits. `bytes` must be `binary_size` long.
pub fn decode(bytes: &[u8], precision: u8, scale: u8, out: &mut String) -> Result<(), DecodeError> {
    if precision == 0 || precision > 65 || scale > precision || bytes.len() != binary_size(precision, scale) {
        return Err(DecodeError::Invalid(format!("DECIMAL({precision},{scale}) value of {} bytes", bytes.len())));
    }
    let negative = bytes[0] & 0x80 == 0;
    let mask: u8 = if negative { 0xFF } else { 0 };
    // Each group is read big-endian, bytes inverted for negatives, the sign bit of the very first
    // byte flipped back.
    let mut pos = 0;
    let mut group = |n: usize| -> u32 {
        let mut v: u32 = 0;
        for i in 0..n {
            let mut b = bytes[pos + i] ^ mask;
            if pos + i == 0 {
                b ^= 0x80;
            }
            v = (v << 8) | u32::from(b);
        }
        pos += n;
        v
    };
    let (intg, frac) = (usize::from(precision - scale), usize::from(scale));
    // All digits, integer part then fraction, into one stack buffer (65 digits at most).
    let mut digits = [b'0'; 72];
    let mut n = 0;
    let mut put = |v: u32, width: usize, n: &mut usize| -> Result<(), DecodeError> {
        if u64::from(v) >= 10u64.pow(width as u32) {
            return Err(DecodeError::Invalid(format!("DECIMAL digit group {v} has more than {width} digits")));
        }
        let mut rest = v;
        for d in digits[*n..*n + width].iter_mut().rev() {
            *d = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        *n += width;
        Ok(())
    };
    let lead = intg % 9;
    if lead > 0 {
        put(group(DIGITS_TO_BYTES[lead]), lead, &mut n)?;
    }
    for _ in 0..intg / 9 {
        put(group(4), 9, &mut n)?;
    }
    let int_end = n;
    for _ in 0..frac / 9 {
        put(group(4), 9, &mut n)?;
    }
    let trail = frac % 9;
    if trail > 0 {
        put(group(DIGITS_TO_BYTES[trail]), trail, &mut n)?;
    }
    let int_start = digits[..int_end].iter().position(|&d| d != b'0').unwrap_or(int_end);
    let zero = int_start == int_end && digits[int_end..n].iter().all(|&d| d == b'0');
    out.reserve(n + 3);
    // "-0.00" would read as a negative zero; MySQL prints it as 0.
    if negative && !zero {
        out.push('-');
    }
    if int_start == int_end {
        out.push('0');
    } else {
        out.extend(digits[int_start..int_end].iter().map(|&d| d as char));
    }
    if frac > 0 {
        out.push('.');
        out.extend(digits[int_end..n].iter().map(|&d| d as char));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(bytes: &[u8], p: u8, s: u8) -> String {
        let mut out = String::new();
        decode(bytes, p, s, &mut out).unwrap();
        out
    }

    #[test]
    fn sizes_follow_mysql() {
        assert_eq!(binary_size(10, 2), 5);
        assert_eq!(binary_size(14, 4), 7);
        assert_eq!(binary_size(65, 30), 30);
        assert_eq!(binary_size(1, 0), 1);
    }

    #[test]
    fn decodes_the_examples_of_the_mysql_manual() {
        // DECIMAL(14,4) 1234567890.1234: 0x81 0x0D 0xFB 0x38 0xD2 0x04 0xD2 (MySQL's own example).
        assert_eq!(dec(&[0x81, 0x0D, 0xFB, 0x38, 0xD2, 0x04, 0xD2], 14, 4), "1234567890.1234");
        // -1234567890.1234: every byte inverted.
        assert_eq!(dec(&[0x7E, 0xF2, 0x04, 0xC7, 0x2D, 0xFB, 0x2D], 14, 4), "-1234567890.1234");
        // DECIMAL(10,2): 0.00 and 12.50
        assert_eq!(dec(&[0x80, 0, 0, 0, 0], 10, 2), "0.00");
        assert_eq!(dec(&[0x80, 0, 0, 12, 50], 10, 2), "12.50");
        assert_eq!(dec(&[0x80, 0], 3, 0), "0");
    }

    #[test]
    fn bad_lengths_and_digits_are_errors() {
        let mut out = String::new();
        assert!(decode(&[0x80], 10, 2, &mut out).is_err());
        assert!(decode(&[0xFF, 0xFF, 0xFF, 0xFF, 0xFF], 10, 2, &mut out).is_err());
    }
}
