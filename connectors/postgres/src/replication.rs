//! The replication connection: PostgreSQL's streaming replication protocol over tokio.
//!
//! crates.io `tokio-postgres` has no replication mode, so this module speaks the protocol itself,
//! using `postgres-protocol` for frontend messages and authentication (cleartext, MD5,
//! SCRAM-SHA-256) and parsing the few backend messages it needs. After `START_REPLICATION` the
//! connection is in CopyBoth mode:
//!
//! ```text
//!  server ── CopyData('w' XLogData: wal_start, wal_end, send_time, pgoutput message) ──▶ us
//!  server ── CopyData('k' keepalive: wal_end, send_time, reply_requested) ────────────▶ us
//!  us ───── CopyData('r' standby status: written, flushed, applied, time, reply) ─────▶ server
//! ```
//!
//! The flushed LSN we report is the checkpoint: the server may recycle WAL before it, so it only ever
//! carries positions whose events the sink acknowledged.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::frontend;
use tailgate_core::Lsn;
use tailgate_tls::{RustlsClientConfig, TlsMode, TlsSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::warn;

use crate::error::PgError;
use crate::tls::PgStream;

/// Output settings pinned on the replication session, so that the text values pgoutput sends
/// have one format whatever the server's defaults (see [`crate::types`]).
pub const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("DateStyle", "ISO"),
    ("TimeZone", "UTC"),
    ("IntervalStyle", "iso_8601"),
    ("extra_float_digits", "3"),
    ("lc_monetary", "C"),
    ("client_encoding", "UTF8"),
];

/// Connection parameters, from a `postgres://` URL.
#[derive(Clone)]
pub struct ConnInfo {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub application_name: String,
    /// For ordinary SQL connections (tokio-postgres), without the TLS parameters: `catalog::connect`
    /// applies [`ConnInfo::tls`] per connection.
    pub sql_config: tokio_postgres::Config,
    /// `sslmode`, `sslrootcert`, `sslcert`, `sslkey` of the URL.
    pub tls: Arc<TlsSettings>,
    /// Built once from `tls` (files read at parse time, so that bad paths are config errors).
    pub tls_config: Arc<RustlsClientConfig>,
}

impl std::fmt::Debug for ConnInfo {
    // Never print the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "postgres://{}@{}:{}/{}", self.user, self.host, self.port, self.dbname)
    }
}

impl ConnInfo {
    pub fn from_url(url: &str) -> Result<ConnInfo, PgError> {
        let (url, tls) = crate::tls::split_url(url)?;
        let tls_config = tls.client_config()?;
        let config: tokio_postgres::Config =
            url.parse().map_err(|e| PgError::Url { detail: format!("does not parse: {e}") })?;
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => {
                return Err(PgError::Url {
                    detail: format!("names a Unix socket ({}); tailgate connects over TCP", p.display()),
                });
            }
            None => "localhost".to_owned(),
        };
        let user = config.get_user().ok_or_else(|| PgError::Url { detail: "names no user".into() })?.to_owned();
        let password = config.get_password().map(|p| String::from_utf8_lossy(p).into_owned());
        let dbname = config.get_dbname().unwrap_or(&user).to_owned();
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let mut sql_config = config.clone();
        sql_config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        sql_config.application_name("tailgate");
        Ok(ConnInfo {
            host,
            port,
            user,
            password,
            dbname,
            application_name: "tailgate".into(),
            sql_config,
            tls: Arc::new(tls),
            tls_config,
        })
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Whether a connection attempt asks for TLS.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tls {
    Never,
    IfOffered,
    Must,
}

/// SSLRequest (before the startup message); on 'S' the TLS handshake, on 'N' plaintext unless TLS is a must.
async fn negotiate_tls(info: &ConnInfo, mut stream: TcpStream, must: bool) -> Result<PgStream, PgError> {
    let lost = PgError::ConnectionLost;
    let mut request = BytesMut::with_capacity(8);
    frontend::ssl_request(&mut request);
    stream.write_all(&request).await.map_err(lost)?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await.map_err(lost)?;
    match answer[0] {
        b'S' => Ok(tailgate_tls::upgrade(&info.tls, info.tls_config.clone(), &info.host, stream).await?),
        b'N' if !must => Ok(PgStream::Plain(stream)),
        b'N' => Err(PgError::TlsRefused { addr: info.addr(), mode: info.tls.mode_text.clone() }),
        other => Err(PgError::Protocol(format!("unexpected answer {:?} to SSLRequest", other as char))),
    }
}

/// A message of the replication stream.
#[derive(Debug)]
pub enum ReplicationMessage {
    XLogData { wal_start: u64, wal_end: u64, data: Bytes },
    Keepalive { wal_end: u64, reply_requested: bool },
}

/// Room made in the read buffer before a read.
const READ_RESERVE: usize = 256 * 1024;

/// A backend frame: tag and body (without the length).
pub(crate) struct Frame {
    pub(crate) tag: u8,
    pub(crate) body: Bytes,
}

pub struct ReplicationConnection {
    stream: PgStream,
    inbuf: BytesMut,
    out: BytesMut,
    user: String,
}

impl ReplicationConnection {
    /// Connects with `replication=database` and authenticates, with TLS as `sslmode` says:
    /// `allow` tries plaintext first and TLS when the server refuses that login; `prefer` asks for TLS
    /// and goes on in plaintext when the server has none; stricter modes fail without TLS.
    pub async fn connect(info: &ConnInfo) -> Result<Self, PgError> {
        match info.tls.mode {
            TlsMode::Disable => Self::connect_once(info, Tls::Never).await,
            TlsMode::Allow => match Self::connect_once(info, Tls::Never).await {
                Err(e) if e.wants_tls() => Self::connect_once(info, Tls::Must).await,
                other => other,
            },
            TlsMode::Prefer => Self::connect_once(info, Tls::IfOffered).await,
            TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => Self::connect_once(info, Tls::Must).await,
        }
    }

    async fn connect_once(info: &ConnInfo, tls: Tls) -> Result<Self, PgError> {
        let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(info.addr()))
            .await
            .map_err(|_| PgError::Connect {
                addr: info.addr(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out after 10s"),
            })?
            .map_err(|source| PgError::Connect { addr: info.addr(), source })?;
        stream.set_nodelay(true).ok();
        let stream = match tls {
            Tls::Never => PgStream::Plain(stream),
            Tls::IfOffered | Tls::Must => {
                tokio::time::timeout(Duration::from_secs(10), negotiate_tls(info, stream, tls == Tls::Must))
                    .await
                    .map_err(|_| PgError::Connect {
                        addr: info.addr(),
                        source: std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out after 10s"),
                    })??
            }
        };
        let mut conn = ReplicationConnection {
            stream,
            inbuf: BytesMut::with_capacity(256 * 1024),
            out: BytesMut::with_capacity(1024),
            user: info.user.clone(),
        };
        let mut params: Vec<(&str, &str)> = vec![
            ("user", &info.user),
            ("database", &info.dbname),
            ("replication", "database"),
            ("application_name", &info.application_name),
        ];
        params.extend_from_slice(SESSION_SETTINGS);
        frontend::startup_message(params.iter().copied(), &mut conn.out).map_err(protocol)?;
        conn.flush_out().await?;
        conn.authenticate(info).await?;
        conn.wait_ready("startup").await?;
        Ok(conn)
    }

    /// Whether this connection runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.stream.is_tls()
    }

    async fn authenticate(&mut self, info: &ConnInfo) -> Result<(), PgError> {
        let password = || {
            info.password.as_deref().ok_or_else(|| PgError::Auth {
                user: info.user.clone(),
                message: "the server asks for a password and `source.url` has none".into(),
            })
        };
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'R' => {
                    match AuthRequest::parse(frame.body)? {
                        AuthRequest::Ok => return Ok(()),
                        AuthRequest::Cleartext => {
                            frontend::password_message(password()?.as_bytes(), &mut self.out).map_err(protocol)?;
                        }
                        AuthRequest::Md5 { salt } => {
                            let hash = md5_hash(info.user.as_bytes(), password()?.as_bytes(), salt);
                            frontend::password_message(hash.as_bytes(), &mut self.out).map_err(protocol)?;
                        }
                        AuthRequest::Sasl { mechanisms } => {
                            // Over TLS, SCRAM-SHA-256-PLUS binds the login to this TLS channel (a man in
                            // the middle holding another certificate cannot relay it); when the server
                            // does not offer it, 'y' tells it we could have (downgrade protection).
                            let end_point = self.stream.channel_binding();
                            let plus = mechanisms.iter().any(|m| m == sasl::SCRAM_SHA_256_PLUS);
                            let (mechanism, binding) = match end_point {
                                Some(hash) if plus => {
                                    (sasl::SCRAM_SHA_256_PLUS, sasl::ChannelBinding::tls_server_end_point(hash))
                                }
                                Some(_) => (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unrequested()),
                                None => (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unsupported()),
                            };
                            if !mechanisms.iter().any(|m| m == mechanism) {
                                return Err(PgError::UnsupportedAuth { method: "SASL without SCRAM-SHA-256" });
                            }
                            let s = sasl::ScramSha256::new(password()?.as_bytes(), binding);
                            frontend::sasl_initial_response(mechanism, s.message(), &mut self.out).map_err(protocol)?;
                            scram = Some(s);
                        }
                        AuthRequest::SaslContinue(body) => {
                            let s =
                                scram.as_mut().ok_or_else(|| PgError::Protocol("SASL continue before start".into()))?;
                            s.update(&body)
                                .map_err(|e| PgError::Auth { user: info.user.clone(), message: e.to_string() })?;
                            frontend::sasl_response(s.message(), &mut self.out).map_err(protocol)?;
                        }
                        AuthRequest::SaslFinal(body) => {
                            let s =
                                scram.as_mut().ok_or_else(|| PgError::Protocol("SASL final before start".into()))?;
                            s.finish(&body)
                                .map_err(|e| PgError::Auth { user: info.user.clone(), message: e.to_string() })?;
                            continue;
                        }
                    }
                    self.flush_out().await?;
                }
                b'E' => return Err(self.login_error(&frame.body)),
                other => {
                    return Err(PgError::Protocol(format!(
                        "unexpected message {:?} during authentication",
                        other as char
                    )));
                }
            }
        }
    }

    fn login_error(&self, body: &[u8]) -> PgError {
        let fields = ErrorFields::parse(body);
        match fields.code.as_str() {
            // invalid_password, invalid_authorization_specification
            "28000" if fields.message.contains("no encryption") => {
                PgError::NeedsTls { user: self.user.clone(), message: fields.message }
            }
            "28P01" | "28000" => PgError::Auth { user: self.user.clone(), message: fields.message },
            "42501" => PgError::NoReplicationPrivilege { user: self.user.clone() },
            _ => fields.into_error("login"),
        }
    }

    /// Runs a simple query; returns the rows as text (NULL as `None`).
    pub async fn simple_query(&mut self, sql: &str, during: &'static str) -> Result<Vec<Vec<Option<String>>>, PgError> {
        frontend::query(sql, &mut self.out).map_err(protocol)?;
        self.flush_out().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'D' => rows.push(parse_data_row(frame.body)?),
                b'E' => error = Some(ErrorFields::parse(&frame.body).into_error(during)),
                b'Z' => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// `IDENTIFY_SYSTEM`: (system id, timeline, current WAL flush position, database).
    pub async fn identify_system(&mut self) -> Result<(String, Lsn), PgError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM", "IDENTIFY_SYSTEM").await?;
        let row = rows.first().ok_or_else(|| PgError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let system_id = row.first().cloned().flatten().unwrap_or_default();
        let xlogpos = row
            .get(2)
            .cloned()
            .flatten()
            .and_then(|s| s.parse::<Lsn>().ok())
            .ok_or_else(|| PgError::Protocol("IDENTIFY_SYSTEM returned no xlogpos".into()))?;
        Ok((system_id, xlogpos))
    }

    /// Creates a logical slot with the pgoutput plugin; returns its consistent point and, with
    /// `export`, the name of a snapshot of the database at exactly that point. The snapshot stays
    /// usable until this connection runs its next command.
    /// Creates the slot; `export` exports a snapshot for the initial read; `failover` (PostgreSQL
    /// 17+) makes the slot one that a physical standby keeps in sync, so that it survives a
    /// failover of the server.
    pub async fn create_slot(
        &mut self,
        slot: &str,
        export: bool,
        failover: bool,
    ) -> Result<(Lsn, Option<String>), PgError> {
        let snapshot = if export { "'export'" } else { "'nothing'" };
        let failover = if failover { ", FAILOVER true" } else { "" };
        let sql =
            format!("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT {snapshot}{failover})", quote_ident(slot));
        let rows = self.simple_query(&sql, "CREATE_REPLICATION_SLOT").await?;
        let row = rows.first().ok_or_else(|| PgError::Protocol("CREATE_REPLICATION_SLOT returned no row".into()))?;
        let consistent = row
            .get(1)
            .cloned()
            .flatten()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| PgError::Protocol("CREATE_REPLICATION_SLOT returned no consistent point".into()))?;
        Ok((consistent, row.get(2).cloned().flatten()))
    }

    /// Starts streaming; the server sends changes committed after `start` (or after the slot's
    /// confirmed position, whichever is later).
    pub async fn start_replication(&mut self, slot: &str, publication: &str, start: Lsn) -> Result<(), PgError> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} (proto_version '1', publication_names {}, messages 'true')",
            quote_ident(slot),
            quote_literal(&quote_ident(publication)),
        );
        frontend::query(&sql, &mut self.out).map_err(protocol)?;
        self.flush_out().await?;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'W' => return Ok(()),
                b'E' => return Err(ErrorFields::parse(&frame.body).into_error("START_REPLICATION")),
                b'N' => log_notice(&frame.body),
                other => {
                    return Err(PgError::Protocol(format!("unexpected {:?} after START_REPLICATION", other as char)));
                }
            }
        }
    }

    /// The next replication message already buffered, without I/O.
    pub fn try_next(&mut self) -> Result<Option<ReplicationMessage>, PgError> {
        loop {
            let Some(frame) = split_frame(&mut self.inbuf)? else { return Ok(None) };
            if let Some(message) = stream_message(frame)? {
                return Ok(Some(message));
            }
        }
    }

    /// Reads more bytes from the socket. Cancel-safe: bytes read are kept in the buffer.
    pub async fn fill(&mut self) -> Result<(), PgError> {
        if self.inbuf.capacity() - self.inbuf.len() < 64 * 1024 {
            self.inbuf.reserve(READ_RESERVE);
        }
        let n = self.stream.read_buf(&mut self.inbuf).await.map_err(PgError::ConnectionLost)?;
        if n == 0 {
            return Err(PgError::ConnectionLost(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            )));
        }
        Ok(())
    }

    /// Sends a standby status update. `flushed` must only ever be an acknowledged checkpoint.
    pub async fn send_status(&mut self, received: Lsn, flushed: Lsn, reply: bool) -> Result<(), PgError> {
        let micros_since_pg_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as i64
            - crate::types::PG_EPOCH_OFFSET_MICROS;
        let mut payload = [0u8; 34];
        let mut p = &mut payload[..];
        p.put_u8(b'r');
        p.put_u64(received.0);
        p.put_u64(flushed.0);
        p.put_u64(flushed.0);
        p.put_i64(micros_since_pg_epoch);
        p.put_u8(u8::from(reply));
        frontend::CopyData::new(&payload[..]).map_err(protocol)?.write(&mut self.out);
        self.flush_out().await
    }

    /// Ends the stream politely (CopyDone, Terminate); errors are irrelevant at this point.
    pub async fn close(mut self) {
        frontend::copy_done(&mut self.out);
        frontend::terminate(&mut self.out);
        let _ = self.flush_out().await;
        let _ = self.stream.shutdown().await;
    }

    async fn flush_out(&mut self) -> Result<(), PgError> {
        let out = self.out.split();
        self.stream.write_all(&out).await.map_err(PgError::ConnectionLost)
    }

    async fn read_frame(&mut self) -> Result<Frame, PgError> {
        loop {
            if let Some(frame) = split_frame(&mut self.inbuf)? {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    async fn wait_ready(&mut self, during: &'static str) -> Result<(), PgError> {
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'Z' => return Ok(()),
                b'E' => return Err(ErrorFields::parse(&frame.body).into_error(during)),
                b'N' => log_notice(&frame.body),
                _ => {}
            }
        }
    }
}

pub(crate) struct ErrorFields {
    code: String,
    message: String,
    detail: Option<String>,
    hint: Option<String>,
}

impl ErrorFields {
    pub(crate) fn parse(body: &[u8]) -> ErrorFields {
        let mut f = ErrorFields { code: String::new(), message: String::new(), detail: None, hint: None };
        let mut rest = body;
        while let Some((&kind, tail)) = rest.split_first() {
            if kind == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            let value = String::from_utf8_lossy(&tail[..end]).into_owned();
            match kind {
                b'C' => f.code = value,
                b'M' => f.message = value,
                b'D' => f.detail = Some(value),
                b'H' => f.hint = Some(value),
                _ => {}
            }
            rest = tail.get(end + 1..).unwrap_or_default();
        }
        f
    }

    pub(crate) fn into_error(self, during: &'static str) -> PgError {
        let mut message = self.message;
        if let Some(d) = self.detail {
            message = format!("{message} ({d})");
        }
        if let Some(h) = self.hint {
            message = format!("{message}. Hint: {h}");
        }
        PgError::Server { code: self.code, message, during }
    }
}

/// An authentication request (backend message `R`), as far as the client's next step depends on it.
pub(crate) enum AuthRequest {
    Ok,
    Cleartext,
    Md5 {
        salt: [u8; 4],
    },
    /// The mechanisms the server offers.
    Sasl {
        mechanisms: Vec<String>,
    },
    SaslContinue(Bytes),
    SaslFinal(Bytes),
}

impl AuthRequest {
    /// Reads the body of an `R` message; methods tailgate does not support are errors.
    pub(crate) fn parse(mut body: Bytes) -> Result<AuthRequest, PgError> {
        Ok(match get_i32(&mut body)? {
            0 => AuthRequest::Ok,
            3 => AuthRequest::Cleartext,
            5 => {
                let mut salt = [0u8; 4];
                if body.remaining() < 4 {
                    return Err(PgError::Protocol("short MD5 salt".into()));
                }
                body.copy_to_slice(&mut salt);
                AuthRequest::Md5 { salt }
            }
            10 => AuthRequest::Sasl { mechanisms: split_cstrs(&body) },
            11 => AuthRequest::SaslContinue(body),
            12 => AuthRequest::SaslFinal(body),
            2 => return Err(PgError::UnsupportedAuth { method: "Kerberos V5" }),
            7 | 8 => return Err(PgError::UnsupportedAuth { method: "GSSAPI" }),
            9 => return Err(PgError::UnsupportedAuth { method: "SSPI" }),
            other => return Err(PgError::Protocol(format!("unknown authentication request {other}"))),
        })
    }
}

/// Splits the next complete backend frame off the front of `inbuf`; `None` until one has fully
/// arrived. No I/O: [`ReplicationConnection::fill`] reads the bytes.
pub(crate) fn split_frame(inbuf: &mut BytesMut) -> Result<Option<Frame>, PgError> {
    if inbuf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([inbuf[1], inbuf[2], inbuf[3], inbuf[4]]) as usize;
    if len < 4 {
        return Err(PgError::Protocol(format!("invalid frame length {len}")));
    }
    if inbuf.len() < len + 1 {
        // Room for the rest of the frame, but no more than the bytes already buffered (or one
        // read's worth): the length is only a header field, so the buffer grows with the bytes
        // that really arrive (geometrically), never at once to what a corrupt length claims.
        let missing = len + 1 - inbuf.len();
        inbuf.reserve(missing.min(inbuf.len().max(READ_RESERVE)));
        return Ok(None);
    }
    let mut frame = inbuf.split_to(len + 1).freeze();
    let tag = frame[0];
    frame.advance(5);
    Ok(Some(Frame { tag, body: frame }))
}

/// What a frame of the replication stream (CopyBoth mode) means: `None` for frames that carry no
/// replication message (notices, which are logged, and frames of no interest).
pub(crate) fn stream_message(frame: Frame) -> Result<Option<ReplicationMessage>, PgError> {
    match frame.tag {
        b'd' => {
            let mut body = frame.body;
            match get_u8(&mut body)? {
                b'w' => {
                    let wal_start = get_u64(&mut body)?;
                    let wal_end = get_u64(&mut body)?;
                    let _send_time = get_u64(&mut body)?;
                    Ok(Some(ReplicationMessage::XLogData { wal_start, wal_end, data: body }))
                }
                b'k' => {
                    let wal_end = get_u64(&mut body)?;
                    let _send_time = get_u64(&mut body)?;
                    let reply_requested = get_u8(&mut body)? == 1;
                    Ok(Some(ReplicationMessage::Keepalive { wal_end, reply_requested }))
                }
                other => Err(PgError::Protocol(format!("unknown CopyData message {:?}", other as char))),
            }
        }
        b'E' => Err(ErrorFields::parse(&frame.body).into_error("streaming")),
        b'N' => {
            log_notice(&frame.body);
            Ok(None)
        }
        b'c' => Err(PgError::ConnectionLost(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the server ended the replication stream",
        ))),
        _ => Ok(None),
    }
}

fn log_notice(body: &[u8]) {
    let f = ErrorFields::parse(body);
    warn!(code = %f.code, "PostgreSQL notice: {}", f.message);
}

pub(crate) fn parse_data_row(mut body: Bytes) -> Result<Vec<Option<String>>, PgError> {
    let n = get_i16(&mut body)?;
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = get_i32(&mut body)?;
        if len < 0 {
            row.push(None);
        } else {
            let len = len as usize;
            if body.remaining() < len {
                return Err(PgError::Protocol("short DataRow".into()));
            }
            row.push(Some(String::from_utf8_lossy(&body.split_to(len)).into_owned()));
        }
    }
    Ok(row)
}

pub(crate) fn split_cstrs(body: &[u8]) -> Vec<String> {
    body.split(|&b| b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect()
}

fn protocol(e: std::io::Error) -> PgError {
    PgError::Protocol(e.to_string())
}

macro_rules! getter {
    ($name:ident, $ty:ty, $get:ident) => {
        fn $name(buf: &mut Bytes) -> Result<$ty, PgError> {
            if buf.remaining() < size_of::<$ty>() {
                return Err(PgError::Protocol(concat!("truncated ", stringify!($ty)).into()));
            }
            Ok(buf.$get())
        }
    };
}
getter!(get_u8, u8, get_u8);
getter!(get_i16, i16, get_i16);
getter!(get_i32, i32, get_i32);
getter!(get_u64, u64, get_u64);

/// `"name"` with embedded quotes doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` with embedded quotes doubled.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn frames_split_at_any_point_are_read_whole() {
        let mut keepalive = vec![b'k'];
        keepalive.extend_from_slice(&0x10u64.to_be_bytes());
        keepalive.extend_from_slice(&0u64.to_be_bytes());
        keepalive.push(1);
        let mut xlog = vec![b'w'];
        for v in [0x20u64, 0x30, 0] {
            xlog.extend_from_slice(&v.to_be_bytes());
        }
        xlog.extend_from_slice(b"B...");
        let mut bytes = frame(b'N', b"SNOTICE\0Mhi\0\0");
        bytes.extend_from_slice(&frame(b'd', &keepalive));
        bytes.extend_from_slice(&frame(b'd', &xlog));
        for split in 0..=bytes.len() {
            let mut inbuf = BytesMut::from(&bytes[..split]);
            let mut messages = Vec::new();
            let mut drain = |inbuf: &mut BytesMut| {
                while let Some(frame) = split_frame(inbuf).unwrap() {
                    messages.extend(stream_message(frame).unwrap());
                }
            };
            drain(&mut inbuf);
            inbuf.extend_from_slice(&bytes[split..]);
            drain(&mut inbuf);
            assert!(inbuf.is_empty());
            assert!(matches!(
                messages.as_slice(),
                [
                    ReplicationMessage::Keepalive { wal_end: 0x10, reply_requested: true },
                    ReplicationMessage::XLogData { wal_start: 0x20, wal_end: 0x30, data }
                ] if data.as_ref() == b"B..."
            ));
        }
    }

    /// Found by the `replication_packets` fuzz target: a frame header claiming about 1 GiB made the
    /// buffer reserve all of it before a byte of the body had arrived (an out-of-memory report
    /// under the fuzzer's 512 MiB allocation limit; 4 GiB at most from a 5-byte header).
    #[test]
    fn a_frame_length_does_not_reserve_what_it_claims() {
        // The frame at the start of the input libFuzzer reported (after the target's read-size
        // byte): tag 0x0d, length 0x49000000.
        let mut inbuf = BytesMut::from(&b"\x0d\x49\x00\x00\x00\x0a\x39\x2e"[..]);
        assert!(split_frame(&mut inbuf).unwrap().is_none());
        assert!(inbuf.capacity() <= 2 * READ_RESERVE, "reserved {}", inbuf.capacity());
        let mut inbuf = BytesMut::from(&b"d\xff\xff\xff\xff"[..]);
        assert!(split_frame(&mut inbuf).unwrap().is_none());
        assert!(inbuf.capacity() <= 2 * READ_RESERVE, "reserved {}", inbuf.capacity());
        // As bytes arrive, the buffer grows with them.
        for _ in 0..64 {
            inbuf.extend_from_slice(&[0; 4096]);
            assert!(split_frame(&mut inbuf).unwrap().is_none());
            assert!(inbuf.capacity() <= 4 * inbuf.len() + 2 * READ_RESERVE);
        }
        assert!(split_frame(&mut BytesMut::from(&b"d\0\0\0\x03"[..])).is_err(), "a length under 4");
    }

    #[test]
    fn authentication_requests_parse_and_unsupported_ones_are_errors() {
        let request = |code: i32, rest: &[u8]| {
            let mut body = code.to_be_bytes().to_vec();
            body.extend_from_slice(rest);
            AuthRequest::parse(Bytes::from(body))
        };
        assert!(matches!(request(0, b""), Ok(AuthRequest::Ok)));
        assert!(matches!(request(5, b"salt"), Ok(AuthRequest::Md5 { salt }) if &salt == b"salt"));
        assert!(request(5, b"sal").is_err());
        assert!(matches!(
            request(10, b"SCRAM-SHA-256\0SCRAM-SHA-256-PLUS\0\0"),
            Ok(AuthRequest::Sasl { mechanisms }) if mechanisms == ["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]
        ));
        assert!(matches!(request(7, b""), Err(PgError::UnsupportedAuth { method: "GSSAPI" })));
        assert!(AuthRequest::parse(Bytes::from_static(b"\0\0")).is_err());
    }
}
