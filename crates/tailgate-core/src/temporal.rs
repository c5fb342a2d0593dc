//! Calendar arithmetic and the ISO-8601 forms Debezium writes, shared by every connector.
//!
//! Dates are days since 1970-01-01 in the proleptic Gregorian calendar; instants are microseconds
//! since the Unix epoch in UTC. Written digit by digit: these run once per temporal value.

pub const MICROS_PER_DAY: i64 = 86_400_000_000;

/// Days from 1970-01-01 to the proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Formats micros since the epoch as Debezium's `ZonedTimestamp` in UTC: `2024-01-15T10:30:00.123456Z`,
/// the fraction padded to the column's precision (no fraction at precision 0 unless non-zero).
/// Written digit by digit: this runs once per timestamptz value.
pub fn format_utc_timestamp(micros: i64, fraction: u32) -> String {
    let days = micros.div_euclid(MICROS_PER_DAY);
    let in_day = micros.rem_euclid(MICROS_PER_DAY);
    let (y, mo, d) = civil_from_days(days);
    let secs = in_day / 1_000_000;
    let sub = in_day % 1_000_000;
    let mut out = String::with_capacity(32);
    if (0..=9999).contains(&y) {
        push_digits(&mut out, y as u64, 4);
    } else {
        // java.time writes years outside 0000..9999 with a sign.
        out.push(if y < 0 { '-' } else { '+' });
        push_digits(&mut out, y.unsigned_abs(), 4);
    }
    out.push('-');
    push_digits(&mut out, u64::from(mo), 2);
    out.push('-');
    push_digits(&mut out, u64::from(d), 2);
    out.push('T');
    push_digits(&mut out, (secs / 3600) as u64, 2);
    out.push(':');
    push_digits(&mut out, (secs / 60 % 60) as u64, 2);
    out.push(':');
    push_digits(&mut out, (secs % 60) as u64, 2);
    push_fraction(&mut out, sub, fraction);
    out.push('Z');
    out
}

/// `value` in decimal, zero-padded to at least `width` digits.
pub fn push_digits(out: &mut String, value: u64, width: usize) {
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(value);
    for _ in digits.len()..width {
        out.push('0');
    }
    out.push_str(digits);
}

/// `fraction` = 0: java.time's ISO format, which writes only the digits needed (none for 0).
pub fn push_fraction(out: &mut String, micros: i64, fraction: u32) {
    let mut digits = [b'0'; 6];
    let mut rest = micros.unsigned_abs();
    for d in digits.iter_mut().rev() {
        *d = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    let len = if fraction == 0 || fraction > 6 {
        // Only the digits needed, none for a whole second.
        6 - digits.iter().rev().take_while(|d| **d == b'0').count()
    } else {
        fraction as usize
    };
    if len > 0 {
        out.push('.');
        out.extend(digits[..len].iter().map(|d| *d as char));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trips_and_handles_bc_and_leap_days() {
        for (y, m, d, days) in [(1970, 1, 1, 0), (2000, 2, 29, 11_016), (1969, 12, 31, -1), (-1, 12, 31, -719_529)] {
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
            assert_eq!(civil_from_days(days), (y, m, d));
        }
    }

    #[test]
    fn utc_timestamps_pad_the_fraction_to_the_precision() {
        let micros = days_from_civil(2024, 1, 15) * MICROS_PER_DAY + 37_800_123_400;
        assert_eq!(format_utc_timestamp(micros, 6), "2024-01-15T10:30:00.123400Z");
        assert_eq!(format_utc_timestamp(micros, 3), "2024-01-15T10:30:00.123Z");
        assert_eq!(format_utc_timestamp(micros, 0), "2024-01-15T10:30:00.1234Z");
        assert_eq!(format_utc_timestamp(0, 0), "1970-01-01T00:00:00Z");
    }
}
