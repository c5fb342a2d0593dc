//! The replication connection: MySQL's client/server protocol over tokio, as far as a replica needs
//! it — handshake and authentication, a few `SET` statements, the binlog dump request, then the
//! stream of event packets.
//!
//! ```text
//!  connect ─▶ handshake v10 ─▶ auth (mysql_native_password | caching_sha2_password, with the RSA
//!             exchange when the server has no cached hash) ─▶ SET @master_binlog_checksum, ...
//!          ─▶ COM_BINLOG_DUMP (file, pos) | COM_BINLOG_DUMP_GTID (GTID set)
//!          ─▶ packets: 0x00 + event | 0xFF error
//! ```
//!
//! Packets are read into one buffer and handed out as slices of it ([`ReplicationConnection::next_event`]),
//! so an event costs no allocation here; payloads over 16 MiB, which the protocol splits, are joined in
//! a second buffer. Ordinary SQL (catalog, checks, snapshots) uses `mysql_async` on other connections.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tailgate_core::MysqlGtidSet;
use tailgate_tls::{MYSQL_NAMES, MaybeTls, RustlsClientConfig, TlsMode, TlsSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::binlog::Cursor;
use crate::error::MyError;

/// Where and as whom to connect, from `mysql://user:password@host:port/database`.
#[derive(Clone)]
pub struct ConnInfo {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    /// The database named in the URL: capture is limited to it.
    pub database: Option<String>,
    /// More servers after the first (`mysql://u:p@primary:3306,replica:3306/db`): tried in order
    /// when the ones before cannot be reached, so that a restart or a reconnect finds a promoted
    /// replica by itself.
    pub alternates: Vec<(String, u16)>,
    /// `ssl-mode`, `ssl-ca`, `ssl-cert`, `ssl-key` (default PREFERRED, as MySQL's clients).
    pub tls: Arc<TlsSettings>,
    /// Built once from `tls` (files read at parse time, so that bad paths are config errors).
    pub tls_config: Arc<RustlsClientConfig>,
    /// `server-public-key-path`: the server's RSA key for caching_sha2_password without TLS.
    pub server_public_key: Option<PathBuf>,
    /// `allow-public-key-retrieval=true`: take the RSA key the server sends (open to a man in the middle).
    pub allow_public_key_retrieval: bool,
}

/// The URL parameters tailgate knows; any other is an error (it would otherwise be silently ignored).
pub const URL_PARAMETERS: &[&str] =
    &["ssl-mode", "ssl-ca", "ssl-cert", "ssl-key", "server-public-key-path", "allow-public-key-retrieval"];

impl std::fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        write!(f, "mysql://{}@{}:{}/{}", self.user, self.host, self.port, self.database.as_deref().unwrap_or(""))
    }
}

impl ConnInfo {
    pub fn from_url(url: &str) -> Result<ConnInfo, MyError> {
        let err = |detail: &str| MyError::Url { detail: detail.to_owned() };
        let rest = url
            .strip_prefix("mysql://")
            .or_else(|| url.strip_prefix("mariadb://"))
            .ok_or_else(|| err("must start with mysql://"))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let params = UrlParams::parse(query)?;
        let (auth, host_path) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let (user, password) = match auth {
            Some(a) => match a.split_once(':') {
                Some((u, p)) => (percent_decode(u)?, percent_decode(p)?),
                None => (percent_decode(a)?, String::new()),
            },
            None => ("root".to_owned(), String::new()),
        };
        let (host_port, database) = match host_path.split_once('/') {
            Some((h, d)) if !d.is_empty() => (h, Some(percent_decode(d)?)),
            Some((h, _)) => (h, None),
            None => (host_path, None),
        };
        let mut servers = Vec::new();
        for host_port in host_port.split(',') {
            let (host, port) = match host_port.rsplit_once(':') {
                Some((h, p)) => (h, p.parse().map_err(|_| err(&format!("has port {p:?}, which is not a number")))?),
                None => (host_port, 3306),
            };
            if host.is_empty() {
                return Err(err("has no host"));
            }
            servers.push((host.trim_matches(['[', ']']).to_owned(), port));
        }
        let (host, port) = servers.remove(0);
        let tls_config = params.tls.client_config()?;
        Ok(ConnInfo {
            host,
            port,
            user,
            password,
            database,
            alternates: servers,
            tls: Arc::new(params.tls),
            tls_config,
            server_public_key: params.server_public_key,
            allow_public_key_retrieval: params.allow_public_key_retrieval,
        })
    }

    /// Every server of the URL, in order, as a connection target of its own.
    pub fn servers(&self) -> Vec<ConnInfo> {
        std::iter::once((self.host.clone(), self.port))
            .chain(self.alternates.iter().cloned())
            .map(|(host, port)| ConnInfo { host, port, alternates: Vec::new(), ..self.clone() })
            .collect()
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Options for `mysql_async` connections to the same server, with TLS when `with_tls` (see
    /// `catalog::connect` for how `ssl-mode` picks it).
    pub fn opts(&self, with_tls: bool) -> mysql_async::Opts {
        let builder = mysql_async::OptsBuilder::default()
            .ip_or_hostname(self.host.clone())
            .tcp_port(self.port)
            .user(Some(self.user.clone()))
            .pass(Some(self.password.clone()))
            .db_name(self.database.clone())
            .prefer_socket(false);
        let builder = if with_tls { builder.ssl_opts(Some(self.ssl_opts())) } else { builder };
        builder.into()
    }

    /// `ssl-mode` and the files as mysql_async's `SslOpts` (rustls with ring underneath), verifying
    /// exactly what our own replication connection verifies.
    fn ssl_opts(&self) -> mysql_async::SslOpts {
        use mysql_async::ClientIdentity;
        let verification = self.tls.verification();
        let mut opts = mysql_async::SslOpts::default();
        match &self.tls.root_cert {
            Some(path) => opts = opts.with_root_certs(vec![path.clone().into()]).with_disable_built_in_roots(true),
            // The system's roots, as the replication connection uses (instead of mysql_async's bundled ones).
            None if verification != tailgate_tls::Verification::None => {
                let roots = self.tls.roots().unwrap_or_default();
                opts = opts
                    .with_root_certs(roots.into_iter().map(|c| c.to_vec().into()).collect())
                    .with_disable_built_in_roots(true);
            }
            None => {}
        }
        if let (Some(cert), Some(key)) = (&self.tls.client_cert, &self.tls.client_key) {
            opts = opts.with_client_identity(Some(ClientIdentity::new(cert.clone().into(), key.clone().into())));
        }
        match verification {
            tailgate_tls::Verification::None => opts.with_danger_accept_invalid_certs(true),
            tailgate_tls::Verification::Chain => opts.with_danger_skip_domain_validation(true),
            tailgate_tls::Verification::Full => opts,
        }
    }
}

/// A refused login over a plaintext connection may be a user created `REQUIRE SSL`/`X509`: the
/// server says only "Access denied", so say what else to try.
pub(crate) fn plaintext_hint(message: String, tls: bool) -> String {
    if tls || message.contains("over a plaintext connection") {
        message
    } else {
        format!(
            "{message} (over a plaintext connection: a user created REQUIRE SSL or REQUIRE X509 is refused so; \
             set ssl-mode=REQUIRED or VERIFY_IDENTITY, with ssl-cert/ssl-key for X509)"
        )
    }
}

/// The query string of a `mysql://` URL.
struct UrlParams {
    tls: TlsSettings,
    server_public_key: Option<PathBuf>,
    allow_public_key_retrieval: bool,
}

impl UrlParams {
    fn parse(query: &str) -> Result<UrlParams, MyError> {
        let mut mode_text = None;
        let (mut root, mut cert, mut key, mut public_key) = (None, None, None, None);
        let mut allow_retrieval = false;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v)?;
            match k {
                "ssl-mode" => mode_text = Some(v),
                "ssl-ca" => root = Some(PathBuf::from(v)),
                "ssl-cert" => cert = Some(PathBuf::from(v)),
                "ssl-key" => key = Some(PathBuf::from(v)),
                "server-public-key-path" => public_key = Some(PathBuf::from(v)),
                "allow-public-key-retrieval" => {
                    allow_retrieval = match v.to_ascii_lowercase().as_str() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => {
                            return Err(MyError::Url {
                                detail: format!("has allow-public-key-retrieval={v:?}; use true or false"),
                            });
                        }
                    }
                }
                other => {
                    return Err(MyError::Url {
                        detail: format!(
                            "has the unknown parameter {other:?} (tailgate knows {})",
                            URL_PARAMETERS.join(", ")
                        ),
                    });
                }
            }
        }
        let mode_text = mode_text.unwrap_or_else(|| "PREFERRED".to_owned());
        let mode = TlsMode::from_mysql(&mode_text).ok_or_else(|| MyError::Url {
            detail: format!(
                "has ssl-mode={mode_text:?}, which is not one of DISABLED, PREFERRED, REQUIRED, VERIFY_CA, VERIFY_IDENTITY"
            ),
        })?;
        let tls =
            TlsSettings { mode, mode_text, root_cert: root, client_cert: cert, client_key: key, names: MYSQL_NAMES };
        tls.validate()?;
        Ok(UrlParams { tls, server_public_key: public_key, allow_public_key_retrieval: allow_retrieval })
    }
}

fn percent_decode(s: &str) -> Result<String, MyError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
            let b = hex.ok_or_else(|| MyError::Url { detail: format!("has an invalid %-escape in {s:?}") })?;
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| MyError::Url { detail: "has %-escapes that are not UTF-8".into() })
}

// Capability flags.
const CLIENT_SSL: u32 = 0x800;
const CLIENT_LONG_PASSWORD: u32 = 0x1;
const CLIENT_LONG_FLAG: u32 = 0x4;
const CLIENT_PROTOCOL_41: u32 = 0x200;
const CLIENT_TRANSACTIONS: u32 = 0x2000;
const CLIENT_SECURE_CONNECTION: u32 = 0x8000;
const CLIENT_PLUGIN_AUTH: u32 = 0x8_0000;
const CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA: u32 = 0x20_0000;

const COM_QUERY: u8 = 0x03;
const COM_QUIT: u8 = 0x01;
const COM_BINLOG_DUMP: u8 = 0x12;
const COM_REGISTER_SLAVE: u8 = 0x15;
const COM_BINLOG_DUMP_GTID: u8 = 0x1E;

/// MariaDB: also send ANNOTATE_ROWS events (the statement behind row events).
pub const DUMP_SEND_ANNOTATE_ROWS: u16 = 0x02;
/// COM_BINLOG_DUMP_GTID: the request carries a GTID set.
const DUMP_THROUGH_GTID: u16 = 0x04;

/// utf8mb4_general_ci.
const CHARSET_UTF8MB4: u8 = 45;
const MAX_PACKET: usize = 0xFF_FFFF;

/// Where the server should start sending.
#[derive(Debug, Clone)]
pub enum DumpFrom {
    /// A binlog file and the offset of the next event in it.
    Position { file: String, pos: u64 },
    /// MySQL: every transaction not in this set (`gtid_mode = ON`).
    MysqlGtids(MysqlGtidSet),
    /// MariaDB: after this GTID state (set as `@slave_connect_state` beforehand).
    MariadbGtids,
}

/// What an event packet turned out to be.
#[derive(Debug)]
pub enum Packet<'a> {
    Event(&'a [u8]),
    /// The server ended the stream (only in non-blocking mode).
    End,
}

pub struct ReplicationConnection {
    stream: MaybeTls,
    packets: PacketBuffer,
    seq: u8,
    pub server_version: String,
    pub connection_id: u32,
}

impl ReplicationConnection {
    pub async fn connect(info: &ConnInfo, timeout: Duration) -> Result<Self, MyError> {
        let addr = info.addr();
        let stream = tokio::time::timeout(timeout, TcpStream::connect(&addr))
            .await
            .map_err(|_| MyError::Connect { addr: addr.clone(), source: std::io::ErrorKind::TimedOut.into() })?
            .map_err(|source| MyError::Connect { addr: addr.clone(), source })?;
        let _ = stream.set_nodelay(true);
        let mut conn = ReplicationConnection {
            stream: MaybeTls::Plain(stream),
            packets: PacketBuffer::new(),
            seq: 0,
            server_version: String::new(),
            connection_id: 0,
        };
        tokio::time::timeout(timeout, conn.handshake(info))
            .await
            .map_err(|_| MyError::Connect { addr, source: std::io::ErrorKind::TimedOut.into() })??;
        Ok(conn)
    }

    async fn handshake(&mut self, info: &ConnInfo) -> Result<(), MyError> {
        let greeting = self.read_packet_owned().await?;
        if greeting.first() == Some(&0xFF) {
            return Err(server_error(&greeting, "connect"));
        }
        let hello = Greeting::parse(&greeting)?;
        self.server_version = hello.server_version.clone();
        self.connection_id = hello.connection_id;
        let caps = CLIENT_LONG_PASSWORD
            | CLIENT_LONG_FLAG
            | CLIENT_PROTOCOL_41
            | CLIENT_TRANSACTIONS
            | CLIENT_SECURE_CONNECTION
            | CLIENT_PLUGIN_AUTH
            | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA;
        let mut caps = caps & (hello.capabilities | CLIENT_LONG_PASSWORD);
        if caps & CLIENT_PROTOCOL_41 == 0 || caps & CLIENT_PLUGIN_AUTH == 0 {
            return Err(MyError::Protocol(format!(
                "server {} is too old (no protocol 4.1 / plugin auth)",
                hello.server_version
            )));
        }
        let server_tls = hello.capabilities & CLIENT_SSL != 0;
        let use_tls = match info.tls.mode {
            TlsMode::Disable | TlsMode::Allow => false,
            TlsMode::Prefer => server_tls,
            TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull if server_tls => true,
            TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => {
                return Err(MyError::TlsRefused { addr: info.addr(), mode: info.tls.mode_text.clone() });
            }
        };
        if use_tls {
            // SSLRequest: the first 32 bytes of the handshake response, then TLS; the full response
            // follows over TLS with the next sequence id.
            caps |= CLIENT_SSL;
            let mut request = Vec::with_capacity(32);
            request.extend_from_slice(&caps.to_le_bytes());
            request.extend_from_slice(&(1u32 << 30).to_le_bytes());
            request.push(CHARSET_UTF8MB4);
            request.extend_from_slice(&[0; 23]);
            self.write_packet(&request).await?;
            let MaybeTls::Plain(tcp) = std::mem::replace(&mut self.stream, MaybeTls::Closed) else {
                return Err(MyError::Protocol("TLS requested twice".into()));
            };
            self.stream = tailgate_tls::upgrade(&info.tls, info.tls_config.clone(), &info.host, tcp).await?;
        }
        let mut plugin = hello.plugin.clone();
        let mut nonce = hello.nonce.clone();
        let response = auth_response(&plugin, &nonce, &info.password)?;
        let mut packet = Vec::with_capacity(128);
        packet.extend_from_slice(&caps.to_le_bytes());
        packet.extend_from_slice(&(1u32 << 30).to_le_bytes());
        packet.push(CHARSET_UTF8MB4);
        packet.extend_from_slice(&[0; 23]);
        packet.extend_from_slice(info.user.as_bytes());
        packet.push(0);
        packet.push(response.len() as u8);
        packet.extend_from_slice(&response);
        packet.extend_from_slice(plugin.as_bytes());
        packet.push(0);
        self.write_packet(&packet).await?;

        loop {
            let reply = self.read_packet_owned().await?;
            match reply.first() {
                Some(0x00) => return Ok(()),
                Some(0xFF) => {
                    let e = server_error(&reply, "authentication");
                    return Err(match e {
                        MyError::Server { message, .. } => MyError::Auth {
                            user: info.user.clone(),
                            message: plaintext_hint(message, self.stream.is_tls()),
                        },
                        other => other,
                    });
                }
                // Auth switch: the server wants another plugin (and gives a new nonce).
                Some(0xFE) => {
                    (plugin, nonce) = parse_auth_switch(&reply);
                    let response = auth_response(&plugin, &nonce, &info.password)?;
                    self.write_packet(&response).await?;
                }
                // caching_sha2_password: 0x03 fast auth done (an OK follows), 0x04 full auth needed.
                Some(0x01) if plugin == "caching_sha2_password" => match reply.get(1) {
                    Some(0x03) => {}
                    Some(0x04) if self.stream.is_tls() => {
                        // Over TLS the password goes as it is, NUL-terminated.
                        let mut clear = info.password.as_bytes().to_vec();
                        clear.push(0);
                        self.write_packet(&clear).await?;
                    }
                    Some(0x04) => {
                        // Without TLS the password travels RSA-encrypted with the server's public key:
                        // a pinned one, or, only when allowed, the one the server sends (a man in the
                        // middle could send its own and read the password).
                        let pem = match (&info.server_public_key, info.allow_public_key_retrieval) {
                            (Some(path), _) => std::fs::read(path).map_err(|e| MyError::Url {
                                detail: format!("has server-public-key-path={}: cannot read: {e}", path.display()),
                            })?,
                            (None, true) => {
                                self.write_packet(&[0x02]).await?;
                                let key = self.read_packet_owned().await?;
                                if key.first() == Some(&0xFF) {
                                    return Err(server_error(&key, "authentication"));
                                }
                                key.get(1..).unwrap_or_default().to_vec()
                            }
                            (None, false) => return Err(MyError::RsaKeyNeeded { user: info.user.clone() }),
                        };
                        let encrypted = rsa_encrypt_password(&info.password, &nonce, &pem)?;
                        self.write_packet(&encrypted).await?;
                    }
                    _ => return Err(MyError::Protocol("unexpected caching_sha2_password reply".into())),
                },
                _ => {
                    return Err(MyError::Protocol(format!(
                        "unexpected reply during authentication: {:?}",
                        reply.first()
                    )));
                }
            }
        }
    }

    /// Runs a statement that returns no rows (`SET ...`).
    pub async fn execute(&mut self, sql: &str) -> Result<(), MyError> {
        self.seq = 0;
        let mut packet = Vec::with_capacity(sql.len() + 1);
        packet.push(COM_QUERY);
        packet.extend_from_slice(sql.as_bytes());
        self.write_packet(&packet).await?;
        let reply = self.read_packet_owned().await?;
        match reply.first() {
            Some(0x00) => Ok(()),
            Some(0xFF) => Err(server_error(&reply, "a SET statement on the replication connection")),
            _ => Err(MyError::Protocol(format!("{sql:?} returned rows; expected OK"))),
        }
    }

    /// Registers as a replica, so that `SHOW REPLICAS` lists this connector under `host`.
    pub async fn register(&mut self, server_id: u32, host: &str) -> Result<(), MyError> {
        self.seq = 0;
        let host = &host.as_bytes()[..host.len().min(255)];
        let mut packet = Vec::with_capacity(32 + host.len());
        packet.push(COM_REGISTER_SLAVE);
        packet.extend_from_slice(&server_id.to_le_bytes());
        packet.push(host.len() as u8);
        packet.extend_from_slice(host);
        packet.extend_from_slice(&[0, 0]); // no user, no password
        packet.extend_from_slice(&0u16.to_le_bytes()); // port
        packet.extend_from_slice(&0u32.to_le_bytes()); // rank
        packet.extend_from_slice(&0u32.to_le_bytes()); // source id
        self.write_packet(&packet).await?;
        let reply = self.read_packet_owned().await?;
        match reply.first() {
            Some(0x00) => Ok(()),
            Some(0xFF) => Err(server_error(&reply, "registering as a replica")),
            _ => Err(MyError::Protocol("unexpected reply to COM_REGISTER_SLAVE".into())),
        }
    }

    /// Asks the server to start streaming events.
    pub async fn request_dump(&mut self, server_id: u32, from: &DumpFrom, flags: u16) -> Result<(), MyError> {
        self.seq = 0;
        let mut packet = Vec::with_capacity(64);
        match from {
            DumpFrom::Position { file, pos } => {
                packet.push(COM_BINLOG_DUMP);
                packet.extend_from_slice(&(*pos as u32).to_le_bytes());
                packet.extend_from_slice(&flags.to_le_bytes());
                packet.extend_from_slice(&server_id.to_le_bytes());
                packet.extend_from_slice(file.as_bytes());
            }
            DumpFrom::MariadbGtids => {
                // MariaDB starts from @slave_connect_state; file and position are ignored.
                packet.push(COM_BINLOG_DUMP);
                packet.extend_from_slice(&4u32.to_le_bytes());
                packet.extend_from_slice(&flags.to_le_bytes());
                packet.extend_from_slice(&server_id.to_le_bytes());
            }
            DumpFrom::MysqlGtids(set) => {
                packet.push(COM_BINLOG_DUMP_GTID);
                packet.extend_from_slice(&(flags | DUMP_THROUGH_GTID).to_le_bytes());
                packet.extend_from_slice(&server_id.to_le_bytes());
                packet.extend_from_slice(&0u32.to_le_bytes()); // no file name
                packet.extend_from_slice(&4u64.to_le_bytes());
                let data = encode_gtid_set(set);
                packet.extend_from_slice(&(data.len() as u32).to_le_bytes());
                packet.extend_from_slice(&data);
            }
        }
        self.write_packet(&packet).await
    }

    /// The next complete packet already read, if any; never waits. Use [`ReplicationConnection::fill`]
    /// to read more.
    pub fn next_event(&mut self) -> Result<Option<Packet<'_>>, MyError> {
        self.packets.next_event()
    }

    /// Whether a complete packet is waiting in the buffer.
    pub fn has_buffered_packet(&self) -> bool {
        self.packets.has_complete_packet()
    }

    /// Reads more bytes from the socket (waits until some arrive).
    pub async fn fill(&mut self) -> Result<(), MyError> {
        let n = self.stream.read(self.packets.spare()).await.map_err(MyError::ConnectionLost)?;
        if n == 0 {
            return Err(MyError::ConnectionLost(std::io::ErrorKind::UnexpectedEof.into()));
        }
        self.packets.filled(n);
        Ok(())
    }

    /// Shrinks the read buffer back after a burst of very large events.
    pub fn trim_buffer(&mut self) {
        self.packets.trim();
    }

    pub async fn close(mut self) {
        self.seq = 0;
        let _ = self.write_packet(&[COM_QUIT]).await;
        let _ = self.stream.shutdown().await;
    }

    async fn read_packet_owned(&mut self) -> Result<Vec<u8>, MyError> {
        loop {
            if let Some((seq, out)) = self.packets.next_owned()? {
                self.seq = seq.wrapping_add(1);
                return Ok(out);
            }
            self.fill().await?;
        }
    }

    async fn write_packet(&mut self, payload: &[u8]) -> Result<(), MyError> {
        let mut out = Vec::with_capacity(payload.len() + 4);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes()[..3]);
        out.push(self.seq);
        self.seq = self.seq.wrapping_add(1);
        out.extend_from_slice(payload);
        self.stream.write_all(&out).await.map_err(MyError::ConnectionLost)
    }
}

/// Packets read from the server and not yet handed out, in one buffer: bytes are read into
/// [`PacketBuffer::spare`], then complete packets are taken from the front. No I/O. A packet is
/// handed out only once all its bytes (and, for a payload split over several packets, all its
/// pieces) have arrived; the buffer only grows for a packet that has started to arrive, by at most
/// what its header announces (16 MiB per piece).
pub(crate) struct PacketBuffer {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Payloads split over several packets are joined here.
    joined: Vec<u8>,
}

impl PacketBuffer {
    pub(crate) fn new() -> Self {
        PacketBuffer { buf: vec![0; 256 * 1024], start: 0, end: 0, joined: Vec::new() }
    }

    /// The next complete packet of the binlog stream, if any.
    pub(crate) fn next_event(&mut self) -> Result<Option<Packet<'_>>, MyError> {
        let Some((payload_start, payload_len, total)) = self.complete_payload() else { return Ok(None) };
        let payload: &[u8] = if total == 0 {
            let p = payload_start;
            self.start = p + payload_len;
            &self.buf[p..p + payload_len]
        } else {
            // Split payload: join its pieces (each packet after the first continues the payload).
            self.joined.clear();
            let mut at = self.start;
            loop {
                let len = le24(&self.buf[at..]);
                self.joined.extend_from_slice(&self.buf[at + 4..at + 4 + len]);
                at += 4 + len;
                if len < MAX_PACKET {
                    break;
                }
            }
            self.start = at;
            &self.joined
        };
        match payload.first() {
            Some(0x00) => Ok(Some(Packet::Event(&payload[1..]))),
            Some(0xFE) if payload.len() < 8 => Ok(Some(Packet::End)),
            Some(0xFF) => Err(server_error(payload, "binlog streaming")),
            _ => Err(MyError::Protocol(format!("unexpected packet in the binlog stream: {:?}", payload.first()))),
        }
    }

    /// The next complete packet of the handshake or of a command's reply, with its sequence id;
    /// a split payload is an error there.
    pub(crate) fn next_owned(&mut self) -> Result<Option<(u8, Vec<u8>)>, MyError> {
        let Some((start, len, total)) = self.complete_payload() else { return Ok(None) };
        if total > 0 {
            return Err(MyError::Protocol("split packet during the handshake".into()));
        }
        let seq = self.buf[start - 1];
        let out = self.buf[start..start + len].to_vec();
        self.start = start + len;
        Ok(Some((seq, out)))
    }

    /// Whether a complete packet is buffered: (payload start, length, extra bytes of continuation
    /// packets) for a single packet; for a split payload, `total` is its joined length.
    fn complete_payload(&self) -> Option<(usize, usize, usize)> {
        let mut at = self.start;
        let mut total = 0;
        let mut pieces = 0;
        loop {
            if self.end - at < 4 {
                return None;
            }
            let len = le24(&self.buf[at..]);
            if self.end - at - 4 < len {
                return None;
            }
            total += len;
            pieces += 1;
            at += 4 + len;
            if len < MAX_PACKET {
                break;
            }
        }
        if pieces == 1 { Some((self.start + 4, total, 0)) } else { Some((self.start + 4, 0, total)) }
    }

    pub(crate) fn has_complete_packet(&self) -> bool {
        self.complete_payload().is_some()
    }

    /// Where to read more bytes to (never empty); report how many with [`PacketBuffer::filled`].
    pub(crate) fn spare(&mut self) -> &mut [u8] {
        // Make room: move the unread tail to the front, grow for packets larger than the buffer.
        if self.start > 0 && (self.end == self.start || self.start > self.buf.len() / 2) {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            let need = if self.end - self.start >= 4 { le24(&self.buf[self.start..]) + 4 } else { 0 };
            let new_len = (self.buf.len() * 2).max(need + self.end - self.start);
            self.buf.resize(new_len, 0);
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were read into [`PacketBuffer::spare`].
    pub(crate) fn filled(&mut self, n: usize) {
        self.end += n;
    }

    /// Shrinks the buffer back after a burst of very large events.
    pub(crate) fn trim(&mut self) {
        const NORMAL: usize = 256 * 1024;
        if self.buf.len() > 4 * NORMAL && self.end - self.start < NORMAL {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            self.buf.truncate(NORMAL);
            self.buf.shrink_to_fit();
            self.joined = Vec::new();
        }
    }
}

/// An auth switch request (`0xFE`, plugin name, NUL, nonce): the plugin and the new nonce.
pub(crate) fn parse_auth_switch(reply: &[u8]) -> (String, Vec<u8>) {
    let mut c = Cursor::new(reply.get(1..).unwrap_or_default());
    let name_end = c.rest().iter().position(|&b| b == 0).unwrap_or(c.remaining());
    let plugin = String::from_utf8_lossy(&c.rest()[..name_end]).into_owned();
    let _ = c.take(name_end + 1, "plugin");
    let nonce = c.rest().strip_suffix(&[0]).unwrap_or(c.rest()).to_vec();
    (plugin, nonce)
}

fn le24(b: &[u8]) -> usize {
    usize::from(b[0]) | (usize::from(b[1]) << 8) | (usize::from(b[2]) << 16)
}

/// The server's first packet.
pub(crate) struct Greeting {
    server_version: String,
    connection_id: u32,
    capabilities: u32,
    nonce: Vec<u8>,
    plugin: String,
}

impl Greeting {
    pub(crate) fn parse(p: &[u8]) -> Result<Greeting, MyError> {
        let bad = |what: &str| MyError::Protocol(format!("malformed server greeting ({what})"));
        let mut c = Cursor::new(p);
        let version = c.u8("protocol version").map_err(|_| bad("version"))?;
        if version != 10 {
            return Err(MyError::Protocol(format!("protocol version {version}; only 10 is supported")));
        }
        let end = c.rest().iter().position(|&b| b == 0).ok_or_else(|| bad("server version"))?;
        let server_version = String::from_utf8_lossy(&c.rest()[..end]).into_owned();
        c.skip(end + 1, "server version").map_err(|_| bad("server version"))?;
        let connection_id = c.u32("connection id").map_err(|_| bad("connection id"))?;
        let mut nonce = c.take(8, "nonce").map_err(|_| bad("nonce"))?.to_vec();
        c.skip(1, "filler").map_err(|_| bad("filler"))?;
        let low = c.u16("capabilities").map_err(|_| bad("capabilities"))?;
        let mut capabilities = u32::from(low);
        let mut plugin = "mysql_native_password".to_owned();
        if !c.is_empty() {
            c.skip(3, "charset and status").map_err(|_| bad("status"))?;
            capabilities |= u32::from(c.u16("capabilities").map_err(|_| bad("capabilities"))?) << 16;
            let nonce_len = usize::from(c.u8("nonce length").map_err(|_| bad("nonce length"))?);
            c.skip(10, "reserved").map_err(|_| bad("reserved"))?;
            if capabilities & CLIENT_SECURE_CONNECTION != 0 {
                let n = nonce_len.saturating_sub(8).max(13);
                let part2 = c.take(n, "nonce part 2").map_err(|_| bad("nonce"))?;
                // The second part ends with a NUL that is not part of the nonce.
                nonce.extend_from_slice(part2.strip_suffix(&[0]).unwrap_or(part2));
            }
            if capabilities & CLIENT_PLUGIN_AUTH != 0 {
                let rest = c.rest();
                let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
                plugin = String::from_utf8_lossy(&rest[..end]).into_owned();
            }
        }
        Ok(Greeting { server_version, connection_id, capabilities, nonce, plugin })
    }
}

fn auth_response(plugin: &str, nonce: &[u8], password: &str) -> Result<Vec<u8>, MyError> {
    let pass = password.as_bytes();
    Ok(match plugin {
        "mysql_native_password" => {
            mysql_common::scramble::scramble_native(nonce, pass).map_or(Vec::new(), |s| s.to_vec())
        }
        "caching_sha2_password" => {
            mysql_common::scramble::scramble_sha256(nonce, pass).map_or(Vec::new(), |s| s.to_vec())
        }
        // The server may start with a plugin the user does not use; an empty reply makes it switch.
        "" => Vec::new(),
        other => return Err(MyError::UnsupportedAuth { plugin: other.to_owned() }),
    })
}

/// caching_sha2_password's full authentication without TLS: the NUL-terminated password XORed with
/// the nonce, RSA-OAEP encrypted with the server's public key.
fn rsa_encrypt_password(password: &str, nonce: &[u8], pem: &[u8]) -> Result<Vec<u8>, MyError> {
    if nonce.is_empty() {
        return Err(MyError::Protocol("empty nonce for caching_sha2_password".into()));
    }
    let mut pass: Vec<u8> = password.as_bytes().to_vec();
    pass.push(0);
    for (i, b) in pass.iter_mut().enumerate() {
        *b ^= nonce[i % nonce.len()];
    }
    let pem = pem.to_vec();
    // The key comes from the server; a malformed one must be an error, not a crash.
    std::panic::catch_unwind(move || mysql_common::crypto::encrypt(&pass, &pem))
        .map_err(|_| MyError::Protocol("the server's RSA public key could not be read".into()))
}

pub(crate) fn server_error(p: &[u8], during: &'static str) -> MyError {
    let mut c = Cursor::new(p.get(1..).unwrap_or_default());
    let code = c.u16("error code").unwrap_or(0);
    let mut state = String::new();
    if c.rest().first() == Some(&b'#') && c.remaining() >= 6 {
        state = String::from_utf8_lossy(&c.rest()[1..6]).into_owned();
        let _ = c.skip(6, "sql state");
    }
    MyError::Server { code, state, message: String::from_utf8_lossy(c.rest()).into_owned(), during }
}

/// COM_BINLOG_DUMP_GTID's set: the number of UUIDs, then per UUID its bytes, the number of
/// intervals and each interval as [start, end) — all little-endian u64.
fn encode_gtid_set(set: &MysqlGtidSet) -> Vec<u8> {
    let mut out = Vec::new();
    let sids: Vec<_> = set.iter().collect();
    out.extend_from_slice(&(sids.len() as u64).to_le_bytes());
    for (uuid, intervals) in sids {
        out.extend_from_slice(&uuid.0);
        out.extend_from_slice(&(intervals.len() as u64).to_le_bytes());
        for &(start, end) in intervals {
            out.extend_from_slice(&start.to_le_bytes());
            out.extend_from_slice(&(end + 1).to_le_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_parse_and_unknown_ones_are_named() {
        let p = UrlParams::parse(
            "ssl-mode=verify_identity&ssl-ca=%2Fetc%2Fca.pem&server-public-key-path=/k.pem&allow-public-key-retrieval=TRUE",
        )
        .unwrap();
        assert_eq!(p.tls.mode, TlsMode::VerifyFull);
        assert_eq!(p.tls.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(p.server_public_key, Some(PathBuf::from("/k.pem")));
        assert!(p.allow_public_key_retrieval);
        let i = ConnInfo::from_url("mysql://u:p@db:3306/shop?ssl-mode=disabled&server-public-key-path=/k.pem").unwrap();
        assert_eq!(i.database.as_deref(), Some("shop"), "the query is not part of the database name");
        assert_eq!(i.tls.mode, TlsMode::Disable);

        let d = ConnInfo::from_url("mysql://u@db/shop").unwrap();
        assert_eq!((d.tls.mode, d.allow_public_key_retrieval), (TlsMode::Prefer, false), "PREFERRED by default");
        let r = ConnInfo::from_url("mysql://u@db/shop?ssl-mode=REQUIRED").unwrap();
        assert_eq!(r.tls.verification(), tailgate_tls::Verification::None);

        let e = ConnInfo::from_url("mysql://u@db/shop?sslmode=require").unwrap_err().to_string();
        assert!(e.contains("unknown parameter \"sslmode\"") && e.contains("ssl-mode"), "{e}");
        let e = ConnInfo::from_url("mysql://u@db/shop?ssl-mode=VERIFY_FULL").unwrap_err().to_string();
        assert!(e.contains("VERIFY_IDENTITY"), "{e}");
        let e = ConnInfo::from_url("mysql://u@db/shop?allow-public-key-retrieval=yes").unwrap_err().to_string();
        assert!(e.contains("true or false"), "{e}");
        let e = ConnInfo::from_url("mysql://u@db/shop?ssl-key=/k.pem").unwrap_err().to_string();
        assert!(e.contains("ssl-key is set without ssl-cert"), "{e}");
        let e =
            ConnInfo::from_url("mysql://u@db/shop?ssl-mode=VERIFY_CA&ssl-ca=/nonexistent.pem").unwrap_err().to_string();
        assert!(e.contains("ssl-ca=/nonexistent.pem: cannot read"), "{e}");
    }

    #[test]
    fn urls_parse_with_escapes_defaults_and_no_password_in_debug() {
        let i = ConnInfo::from_url("mysql://cdc:p%40ss@db.example:3307/shop").unwrap();
        assert_eq!(
            (i.host.as_str(), i.port, i.user.as_str(), i.password.as_str()),
            ("db.example", 3307, "cdc", "p@ss")
        );
        assert_eq!(i.database.as_deref(), Some("shop"));
        assert!(!format!("{i:?}").contains("p@ss"));
        let i = ConnInfo::from_url("mysql://127.0.0.1").unwrap();
        assert_eq!((i.port, i.user.as_str(), i.database), (3306, "root", None));
        assert!(ConnInfo::from_url("postgres://x").is_err());
        assert!(ConnInfo::from_url("mysql://u@h:port/db").is_err());
    }

    /// A host list: the first is where to connect, the others are tried in order when it fails.
    #[test]
    fn urls_name_several_servers() {
        let i = ConnInfo::from_url("mysql://cdc:pw@primary:3307,replica,[::1]:3308/shop").unwrap();
        let servers: Vec<String> = i.servers().iter().map(ConnInfo::addr).collect();
        assert_eq!(servers, ["primary:3307", "replica:3306", "::1:3308"]);
        assert!(i.servers().iter().all(|s| s.user == "cdc" && s.database.as_deref() == Some("shop")));
        assert!(ConnInfo::from_url("mysql://u@a:1,/db").is_err(), "an empty host is refused");
    }

    #[test]
    fn gtid_sets_encode_with_exclusive_ends() {
        let set: MysqlGtidSet = "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5:7".parse().unwrap();
        let data = encode_gtid_set(&set);
        assert_eq!(data.len(), 8 + 16 + 8 + 2 * 16);
        assert_eq!(&data[32..40], &1u64.to_le_bytes());
        assert_eq!(&data[40..48], &6u64.to_le_bytes());
        assert_eq!(&data[48..56], &7u64.to_le_bytes());
        assert_eq!(&data[56..64], &8u64.to_le_bytes());
    }

    fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_le_bytes()[..3].to_vec();
        out.push(seq);
        out.extend_from_slice(payload);
        out
    }

    /// Feeds `bytes` in reads of `read` bytes; returns the events (and `None` for ends) handed out.
    fn stream(bytes: &[u8], read: usize) -> Result<Vec<Option<Vec<u8>>>, MyError> {
        let mut packets = PacketBuffer::new();
        let mut out = Vec::new();
        for chunk in bytes.chunks(read) {
            let mut chunk = chunk;
            while !chunk.is_empty() {
                let spare = packets.spare();
                let n = spare.len().min(chunk.len());
                spare[..n].copy_from_slice(&chunk[..n]);
                packets.filled(n);
                chunk = &chunk[n..];
            }
            while let Some(p) = packets.next_event()? {
                out.push(match p {
                    Packet::Event(e) => Some(e.to_vec()),
                    Packet::End => None,
                });
            }
            packets.trim();
        }
        Ok(out)
    }

    #[test]
    fn packets_are_handed_out_whole_whatever_the_reads() {
        let big = vec![7u8; MAX_PACKET + 10];
        let mut event = vec![0x00];
        event.extend_from_slice(&big);
        let mut bytes = packet(1, &[0x00, 1, 2, 3]);
        // A payload of 16 MiB + 10 bytes: a full packet, then the rest.
        bytes.extend_from_slice(&packet(2, &event[..MAX_PACKET]));
        bytes.extend_from_slice(&packet(3, &event[MAX_PACKET..]));
        bytes.extend_from_slice(&packet(4, &[0xFE, 0, 0, 2, 0]));
        for read in [3, 4096, 1 << 20, bytes.len()] {
            let events = stream(&bytes, read).unwrap();
            assert_eq!(events.len(), 3, "reads of {read}");
            assert_eq!(events[0].as_deref(), Some(&[1u8, 2, 3][..]));
            assert_eq!(events[1].as_deref(), Some(&big[..]));
            assert_eq!(events[2], None);
        }
        let error = stream(&packet(1, b"\xff\x15\x04#28000Access denied"), 5).unwrap_err();
        assert!(matches!(error, MyError::Server { code: 1045, ref state, .. } if state == "28000"), "{error:?}");
        assert!(stream(&packet(1, b"\x07"), 64).is_err(), "neither an event nor an end");
    }

    #[test]
    fn handshake_packets_carry_their_sequence_and_may_not_be_split() {
        let mut packets = PacketBuffer::new();
        let mut bytes = packet(0, b"\x0a9.7.4\0");
        bytes.extend_from_slice(&packet(1, &vec![0; MAX_PACKET]));
        bytes.extend_from_slice(&packet(2, b""));
        let mut at = 0;
        while at < bytes.len() {
            let spare = packets.spare();
            let n = spare.len().min(bytes.len() - at);
            spare[..n].copy_from_slice(&bytes[at..at + n]);
            packets.filled(n);
            at += n;
        }
        assert_eq!(packets.next_owned().unwrap(), Some((0, b"\x0a9.7.4\0".to_vec())));
        assert!(packets.next_owned().is_err());
    }

    #[test]
    fn auth_switch_names_the_plugin_and_the_new_nonce() {
        let (plugin, nonce) = parse_auth_switch(b"\xfemysql_native_password\0abcdefghijklmnopqrst\0");
        assert_eq!((plugin.as_str(), nonce.as_slice()), ("mysql_native_password", &b"abcdefghijklmnopqrst"[..]));
        assert_eq!(parse_auth_switch(b"\xfe"), (String::new(), Vec::new()));
        assert_eq!(parse_auth_switch(b"\xfeplugin").0, "plugin");
    }

    #[test]
    fn greeting_parses_nonce_and_plugin() {
        let mut p = vec![10];
        p.extend_from_slice(b"9.7.4\0");
        p.extend_from_slice(&42u32.to_le_bytes());
        p.extend_from_slice(b"abcdefgh");
        p.push(0);
        let caps = CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH;
        p.extend_from_slice(&(caps as u16).to_le_bytes());
        p.push(255);
        p.extend_from_slice(&[2, 0]);
        p.extend_from_slice(&((caps >> 16) as u16).to_le_bytes());
        p.push(21);
        p.extend_from_slice(&[0; 10]);
        p.extend_from_slice(b"ijklmnopqrst\0");
        p.extend_from_slice(b"caching_sha2_password\0");
        let g = Greeting::parse(&p).unwrap();
        assert_eq!(g.nonce, b"abcdefghijklmnopqrst");
        assert_eq!(g.plugin, "caching_sha2_password");
        assert_eq!(g.connection_id, 42);
        assert!(Greeting::parse(&p[..20]).is_err());
    }
}
