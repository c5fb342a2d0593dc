//! The few pieces of the Redis protocol (RESP2) the sink needs (public for the end-to-end tests, which
//! read streams with it): commands written as arrays of bulk
//! strings into a reused buffer, and a reply reader that checks a transaction's replies without
//! allocating on the success path.
//!
//! Why not a general client: a batch is one `MULTI`, its `XADD`s and one `EXEC`, written from one
//! buffer with one system call and answered by `+OK`, N × `+QUEUED` and one array. Owning that loop
//! keeps the hot path free of per-record allocations (no command objects, no reply values) and keeps
//! the reconnect-and-resend policy in one place.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Appends `*<n>\r\n`: an array header of `n` arguments.
pub fn array(buf: &mut Vec<u8>, n: usize) {
    buf.push(b'*');
    push_decimal(buf, n as u64);
    buf.extend_from_slice(b"\r\n");
}

/// Appends one bulk string.
pub fn bulk(buf: &mut Vec<u8>, bytes: &[u8]) {
    bulk_parts(buf, &[bytes]);
}

/// Appends one bulk string made of `parts` (no temporary concatenation).
pub fn bulk_parts(buf: &mut Vec<u8>, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    buf.push(b'$');
    push_decimal(buf, len as u64);
    buf.extend_from_slice(b"\r\n");
    for p in parts {
        buf.extend_from_slice(p);
    }
    buf.extend_from_slice(b"\r\n");
}

/// Appends a whole command.
pub fn command(buf: &mut Vec<u8>, args: &[&[u8]]) {
    array(buf, args.len());
    for a in args {
        bulk(buf, a);
    }
}

pub fn push_decimal(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

/// A reply, for the few commands whose answer is looked at in full (handshake, `tailgate check`).
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    pub fn text(&self) -> String {
        match self {
            Reply::Status(s) | Reply::Error(s) => s.clone(),
            Reply::Int(i) => i.to_string(),
            Reply::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            Reply::Bulk(None) | Reply::Array(None) => "(nil)".to_owned(),
            Reply::Array(Some(items)) => items.iter().map(Reply::text).collect::<Vec<_>>().join(" "),
        }
    }
}

/// What went wrong talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum RespError {
    /// The connection failed or broke: retry on a new one.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Redis answered with an error (`-ERR …`, `-WRONGPASS …`).
    #[error("{0}")]
    Server(String),
    /// Command `index` of a transaction failed (the first one that did).
    #[error("{message}")]
    Command { index: usize, message: String },
    /// Redis answered something the protocol does not allow here.
    #[error("unexpected reply from Redis: {0}")]
    Protocol(String),
}

impl RespError {
    /// The error's first word (`WRONGPASS`, `NOPERM`, `OOM`), for server errors.
    pub fn code(&self) -> Option<&str> {
        match self {
            RespError::Server(s) | RespError::Command { message: s, .. } => s.split_whitespace().next(),
            _ => None,
        }
    }
}

/// One connection: a socket with a read buffer.
pub struct Connection {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

fn protocol(what: impl Into<String>) -> RespError {
    RespError::Protocol(what.into())
}

impl Connection {
    /// Connects and authenticates: `AUTH [username] password` when a password is set, then `SELECT`.
    pub async fn open(
        address: &str,
        username: Option<&str>,
        password: Option<&str>,
        database: u32,
        timeout: Duration,
    ) -> Result<Connection, RespError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(address))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {address} timed out")))??;
        stream.set_nodelay(true)?;
        let mut conn = Connection { stream, buf: vec![0; 64 * 1024], start: 0, end: 0 };
        let mut cmd = Vec::with_capacity(128);
        match (username, password) {
            (Some(user), Some(pass)) => command(&mut cmd, &[b"AUTH", user.as_bytes(), pass.as_bytes()]),
            (None, Some(pass)) => command(&mut cmd, &[b"AUTH", pass.as_bytes()]),
            // A user without a password is an ACL user with `nopass`.
            (Some(user), None) => command(&mut cmd, &[b"AUTH", user.as_bytes(), b""]),
            (None, None) => {}
        }
        let auth = !cmd.is_empty();
        if database != 0 {
            let mut db = Vec::new();
            push_decimal(&mut db, u64::from(database));
            command(&mut cmd, &[b"SELECT", &db]);
        }
        command(&mut cmd, &[b"PING"]);
        let handshake = async {
            conn.write_all(&cmd).await?;
            if auth {
                conn.expect_ok().await?;
            }
            if database != 0 {
                conn.expect_ok().await?;
            }
            match conn.reply().await? {
                Reply::Status(s) if s == "PONG" => Ok(()),
                Reply::Error(e) => Err(RespError::Server(e)),
                other => Err(protocol(format!("PING answered {other:?}"))),
            }
        };
        tokio::time::timeout(timeout, handshake).await.map_err(|_| {
            io::Error::new(io::ErrorKind::TimedOut, format!("{address} did not answer within {timeout:?}"))
        })??;
        Ok(conn)
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> Result<(), RespError> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// Sends one command and reads its reply.
    pub async fn call(&mut self, args: &[&[u8]]) -> Result<Reply, RespError> {
        let mut cmd = Vec::new();
        command(&mut cmd, args);
        self.write_all(&cmd).await?;
        self.reply().await
    }

    async fn fill(&mut self) -> Result<(), RespError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                // A line longer than the buffer (an error message, a large INFO reply).
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "Redis closed the connection").into());
        }
        self.end += n;
        Ok(())
    }

    /// The next line without its CRLF, as a range of the buffer (valid until the next read).
    async fn line(&mut self) -> Result<(usize, usize), RespError> {
        loop {
            if let Some(i) = self.buf[self.start..self.end].windows(2).position(|w| w == b"\r\n") {
                let line = (self.start, self.start + i);
                self.start += i + 2;
                return Ok(line);
            }
            // Lines are short (a length, a status, an error): scanning again from the start is cheap.
            self.fill().await?;
        }
    }

    fn text(&self, (a, b): (usize, usize)) -> String {
        String::from_utf8_lossy(&self.buf[a..b]).into_owned()
    }

    fn number(&self, (a, b): (usize, usize)) -> Result<i64, RespError> {
        std::str::from_utf8(&self.buf[a + 1..b])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| protocol(self.text((a, b))))
    }

    /// Skips `n` bytes plus the CRLF after them.
    async fn skip(&mut self, mut n: usize) -> Result<(), RespError> {
        n += 2;
        loop {
            let have = self.end - self.start;
            if have >= n {
                self.start += n;
                return Ok(());
            }
            n -= have;
            self.start = self.end;
            self.fill().await?;
        }
    }

    async fn take(&mut self, n: usize) -> Result<Vec<u8>, RespError> {
        let mut out = Vec::with_capacity(n);
        while self.end - self.start < n + 2 {
            self.fill().await?;
        }
        out.extend_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n + 2;
        Ok(out)
    }

    /// Reads one whole reply.
    pub fn reply(&mut self) -> std::pin::Pin<Box<dyn Future<Output = Result<Reply, RespError>> + Send + '_>> {
        Box::pin(async move {
            let line = self.line().await?;
            let (a, _) = line;
            Ok(match self.buf.get(a).copied() {
                Some(b'+') => Reply::Status(self.text((a + 1, line.1))),
                Some(b'-') => Reply::Error(self.text((a + 1, line.1))),
                Some(b':') => Reply::Int(self.number(line)?),
                Some(b'$') => match self.number(line)? {
                    n if n < 0 => Reply::Bulk(None),
                    n => Reply::Bulk(Some(self.take(n as usize).await?)),
                },
                Some(b'*') => match self.number(line)? {
                    n if n < 0 => Reply::Array(None),
                    n => {
                        let mut items = Vec::with_capacity(n.min(1024) as usize);
                        for _ in 0..n {
                            items.push(self.reply().await?);
                        }
                        Reply::Array(Some(items))
                    }
                },
                _ => return Err(protocol(self.text(line))),
            })
        })
    }

    /// Expects `+OK`.
    pub async fn expect_ok(&mut self) -> Result<(), RespError> {
        match self.reply().await? {
            Reply::Status(s) if s == "OK" => Ok(()),
            Reply::Error(e) => Err(RespError::Server(e)),
            other => Err(protocol(format!("expected OK, got {other:?}"))),
        }
    }

    /// Reads the replies to `MULTI`, `queued` commands and `EXEC`. Ok when every command ran; else
    /// the first error Redis gave (at queueing, the `EXEC` abort, or inside the transaction).
    pub async fn transaction_replies(&mut self, queued: usize) -> Result<(), RespError> {
        self.expect_ok().await?;
        let mut first_error: Option<(usize, String)> = None;
        for index in 0..queued {
            let line = self.line().await?;
            match self.buf.get(line.0) {
                Some(b'+') => {}
                Some(b'-') => {
                    if first_error.is_none() {
                        first_error = Some((index, self.text((line.0 + 1, line.1))));
                    }
                }
                _ => return Err(protocol(self.text(line))),
            }
        }
        let line = self.line().await?;
        match self.buf.get(line.0) {
            Some(b'-') => {
                // EXECABORT: a command was refused while queued; its own error names the cause.
                return Err(match first_error {
                    Some((index, message)) => RespError::Command { index, message },
                    None => RespError::Server(self.text((line.0 + 1, line.1))),
                });
            }
            Some(b'*') => {}
            _ => return Err(protocol(self.text(line))),
        }
        let n = self.number(line)?;
        if n < 0 {
            return Err(protocol("EXEC returned nil (no WATCH was set)"));
        }
        if n as usize != queued {
            return Err(protocol(format!("EXEC returned {n} replies for {queued} commands")));
        }
        for index in 0..n as usize {
            let line = self.line().await?;
            match self.buf.get(line.0) {
                Some(b'$') => {
                    let len = self.number(line)?;
                    if len > 0 {
                        self.skip(len as usize).await?;
                    }
                }
                Some(b'-') => {
                    if first_error.is_none() {
                        first_error = Some((index, self.text((line.0 + 1, line.1))));
                    }
                }
                Some(b'+' | b':') => {}
                _ => {
                    // A nested reply where an XADD id was expected: read it whole and move on.
                    self.start = line.0;
                    let _ = self.reply().await?;
                }
            }
        }
        match first_error {
            Some((index, message)) => Err(RespError::Command { index, message }),
            None => Ok(()),
        }
    }
}

/// The key (second argument) of command `index` after the first command of `buf` (a batch starts
/// with `MULTI`): names the stream of a failed `XADD` without keeping one per record.
pub fn nth_key(buf: &[u8], index: usize) -> Option<String> {
    let mut at = 0;
    let line = |at: &mut usize| -> Option<i64> {
        let end = buf.get(*at..)?.windows(2).position(|w| w == b"\r\n")? + *at;
        let n = std::str::from_utf8(buf.get(*at + 1..end)?).ok()?.parse().ok()?;
        *at = end + 2;
        Some(n)
    };
    for command in 0..=index + 1 {
        let args = line(&mut at)?;
        for arg in 0..args {
            let len = usize::try_from(line(&mut at)?).ok()?;
            if command == index + 1 && arg == 1 {
                return Some(String::from_utf8_lossy(buf.get(at..at + len)?).into_owned());
            }
            at += len + 2;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut buf = Vec::new();
        command(&mut buf, &[b"XADD", b"s", b"*", b"key", b""]);
        assert_eq!(buf, b"*5\r\n$4\r\nXADD\r\n$1\r\ns\r\n$1\r\n*\r\n$3\r\nkey\r\n$0\r\n\r\n");
        buf.clear();
        bulk_parts(&mut buf, &[b"abc", b"/t"]);
        assert_eq!(buf, b"$5\r\nabc/t\r\n");
        buf.clear();
        push_decimal(&mut buf, 0);
        push_decimal(&mut buf, 18_446_744_073_709_551_615);
        assert_eq!(buf, b"018446744073709551615");
    }

    #[test]
    fn the_stream_of_a_failed_command_is_found_in_the_batch() {
        let mut buf = Vec::new();
        command(&mut buf, &[b"MULTI"]);
        command(&mut buf, &[b"XADD", b"first", b"*", b"id", b"1"]);
        command(&mut buf, &[b"XADD", b"second", b"MAXLEN", b"~", b"10", b"*", b"id", b"2"]);
        command(&mut buf, &[b"EXEC"]);
        assert_eq!(nth_key(&buf, 0).as_deref(), Some("first"));
        assert_eq!(nth_key(&buf, 1).as_deref(), Some("second"));
        assert_eq!(nth_key(&buf, 2), None);
    }
}
