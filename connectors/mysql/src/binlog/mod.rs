//! The binlog decoder: bytes in, typed events and row values out. No I/O.
//!
//! ```text
//!  event bytes ──event::parse──▶ Event (header + body)
//!                                  │ TableMap ──▶ schema::TableMapInfo (types, metadata, names)
//!                                  │ Rows ──────▶ rows::RowIter ──▶ Vec<Value> per row image
//!                                  └ TransactionPayload / MariaDB *_COMPRESSED ──▶ decompressed, then as above
//! ```
//!
//! Everything here borrows from the caller's buffer and checks every length before reading it: a
//! truncated or corrupt event is a [`DecodeError`], never a panic. Checksums (CRC32) are verified
//! when the server writes them.

pub mod decimal;
pub mod event;
pub mod json;
pub mod rows;

/// Why an event could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("event truncated while reading {0}")]
    Truncated(&'static str),
    #[error(
        "checksum mismatch (event says {expected:08x}, bytes give {actual:08x}): the event was corrupted on the way"
    )]
    Checksum { expected: u32, actual: u32 },
    #[error("{0}")]
    Invalid(String),
    #[error("cannot decompress {what}: {reason}")]
    Decompress { what: &'static str, reason: String },
    #[error("{0}")]
    Unsupported(String),
}

/// A bounds-checked little-endian reader over a byte slice.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    /// The unread rest, without consuming it.
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or(DecodeError::Truncated(what))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    pub fn skip(&mut self, n: usize, what: &'static str) -> Result<(), DecodeError> {
        self.take(n, what).map(|_| ())
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(self.uint_le(2, what)? as u16)
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(self.uint_le(4, what)? as u32)
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.uint_le(8, what)
    }

    /// An unsigned little-endian integer of `n` (≤ 8) bytes.
    pub fn uint_le(&mut self, n: usize, what: &'static str) -> Result<u64, DecodeError> {
        let bytes = self.take(n, what)?;
        Ok(bytes.iter().rev().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    /// An unsigned big-endian integer of `n` (≤ 8) bytes.
    pub fn uint_be(&mut self, n: usize, what: &'static str) -> Result<u64, DecodeError> {
        let bytes = self.take(n, what)?;
        Ok(bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    /// The protocol's length-encoded integer.
    pub fn lenenc(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        match self.u8(what)? {
            b @ 0..=0xFA => Ok(u64::from(b)),
            0xFC => self.uint_le(2, what),
            0xFD => self.uint_le(3, what),
            0xFE => self.uint_le(8, what),
            b => Err(DecodeError::Invalid(format!("{what}: 0x{b:02x} does not start a length-encoded integer"))),
        }
    }

    /// A length as `usize`, refusing lengths longer than what is left (so no huge allocation follows).
    pub fn lenenc_len(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let n = self.lenenc(what)?;
        if n > self.remaining() as u64 {
            return Err(DecodeError::Truncated(what));
        }
        Ok(n as usize)
    }

    /// A string prefixed by its length-encoded length.
    pub fn lenenc_bytes(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = self.lenenc_len(what)?;
        self.take(n, what)
    }
}

/// `(count + 7) / 8` bytes of a little-endian bitmap: bit `i` is byte `i / 8`, bit `i % 8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bitmap<'a> {
    bytes: &'a [u8],
    len: usize,
}

impl<'a> Bitmap<'a> {
    pub fn read(cur: &mut Cursor<'a>, len: usize, what: &'static str) -> Result<Self, DecodeError> {
        Ok(Bitmap { bytes: cur.take(len.div_ceil(8), what)?, len })
    }

    pub fn get(&self, i: usize) -> bool {
        i < self.len && self.bytes[i / 8] & (1 << (i % 8)) != 0
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn count_ones(&self) -> usize {
        (0..self.len).filter(|&i| self.get(i)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_checks_every_length() {
        let mut c = Cursor::new(&[1, 2, 3]);
        assert_eq!(c.u16("a").unwrap(), 0x0201);
        assert_eq!(c.u16("b"), Err(DecodeError::Truncated("b")));
        let mut c = Cursor::new(&[0xFE, 1, 2]);
        assert_eq!(c.lenenc("n"), Err(DecodeError::Truncated("n")));
        let mut c = Cursor::new(&[0xFC, 0x10, 0x00, b'x']);
        assert_eq!(c.lenenc_len("len"), Err(DecodeError::Truncated("len")), "a length past the end is refused");
        let mut c = Cursor::new(&[0x12, 0x34, 0x56]);
        assert_eq!(c.uint_be(3, "be").unwrap(), 0x123456);
    }

    #[test]
    fn bitmaps_are_little_endian_per_byte() {
        let bytes = [0b0000_0101u8, 0b0000_0001];
        let mut c = Cursor::new(&bytes);
        let b = Bitmap::read(&mut c, 9, "bits").unwrap();
        assert!(b.get(0) && !b.get(1) && b.get(2) && b.get(8) && !b.get(9));
        assert_eq!(b.count_ones(), 3);
    }
}
