//! Binlog events: the common header, the format description, and the events tailgate acts on.
//!
//! Layouts follow the servers' own definitions (MySQL `libbinlogevents`, MariaDB `log_event.h`):
//! a 19-byte header, a post-header whose length the format description gives per event type, a body,
//! and (with `binlog_checksum = CRC32`) a 4-byte CRC32 of everything before it.
//!
//! MariaDB's compressed events (`log_bin_compress = ON`) are inflated here, so callers see ordinary
//! query and rows events; MySQL's `TRANSACTION_PAYLOAD` is returned whole and its inner events are
//! read with [`payload_events`].

use std::borrow::Cow;
use std::io::Read;

use super::{Bitmap, Cursor, DecodeError};

pub const HEADER_LEN: usize = 19;
pub const CHECKSUM_LEN: usize = 4;

/// Event type codes (MySQL's, then MariaDB's from 160 on).
pub mod kind {
    pub const QUERY: u8 = 2;
    pub const STOP: u8 = 3;
    pub const ROTATE: u8 = 4;
    pub const FORMAT_DESCRIPTION: u8 = 15;
    pub const XID: u8 = 16;
    pub const TABLE_MAP: u8 = 19;
    pub const WRITE_ROWS_V1: u8 = 23;
    pub const UPDATE_ROWS_V1: u8 = 24;
    pub const DELETE_ROWS_V1: u8 = 25;
    pub const INCIDENT: u8 = 26;
    pub const HEARTBEAT: u8 = 27;
    pub const ROWS_QUERY: u8 = 29;
    pub const WRITE_ROWS: u8 = 30;
    pub const UPDATE_ROWS: u8 = 31;
    pub const DELETE_ROWS: u8 = 32;
    pub const GTID: u8 = 33;
    pub const ANONYMOUS_GTID: u8 = 34;
    pub const PREVIOUS_GTIDS: u8 = 35;
    pub const XA_PREPARE: u8 = 38;
    pub const PARTIAL_UPDATE_ROWS: u8 = 39;
    pub const TRANSACTION_PAYLOAD: u8 = 40;
    pub const HEARTBEAT_V2: u8 = 41;
    pub const GTID_TAGGED: u8 = 42;
    pub const MARIADB_ANNOTATE_ROWS: u8 = 160;
    pub const MARIADB_BINLOG_CHECKPOINT: u8 = 161;
    pub const MARIADB_GTID: u8 = 162;
    pub const MARIADB_GTID_LIST: u8 = 163;
    pub const MARIADB_START_ENCRYPTION: u8 = 164;
    pub const MARIADB_QUERY_COMPRESSED: u8 = 165;
    pub const MARIADB_WRITE_ROWS_COMPRESSED_V1: u8 = 166;
    pub const MARIADB_UPDATE_ROWS_COMPRESSED_V1: u8 = 167;
    pub const MARIADB_DELETE_ROWS_COMPRESSED_V1: u8 = 168;
    pub const MARIADB_WRITE_ROWS_COMPRESSED: u8 = 169;
    pub const MARIADB_UPDATE_ROWS_COMPRESSED: u8 = 170;
    pub const MARIADB_DELETE_ROWS_COMPRESSED: u8 = 171;
}

/// Header flag of events the server made up for the stream (the first ROTATE, heartbeats).
pub const FLAG_ARTIFICIAL: u16 = 0x20;
/// Rows event flag: the last rows event of its statement.
pub const ROWS_FLAG_STMT_END: u16 = 0x01;
/// MariaDB GTID flag: the event group is a single statement with no closing XID/COMMIT (DDL).
pub const MARIADB_GTID_STANDALONE: u8 = 0x01;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Seconds since the Unix epoch when the statement started.
    pub timestamp: u32,
    pub type_code: u8,
    pub server_id: u32,
    pub event_size: u32,
    /// Where the next event starts in the binlog file (0 for some artificial events).
    pub log_pos: u32,
    pub flags: u16,
}

impl Header {
    pub fn parse(bytes: &[u8]) -> Result<Header, DecodeError> {
        let mut c = Cursor::new(bytes);
        Ok(Header {
            timestamp: c.u32("header timestamp")?,
            type_code: c.u8("header type")?,
            server_id: c.u32("header server id")?,
            event_size: c.u32("header event size")?,
            log_pos: c.u32("header log position")?,
            flags: c.u16("header flags")?,
        })
    }

    /// Where this event starts in its binlog file.
    pub fn start_pos(&self) -> u64 {
        u64::from(self.log_pos).saturating_sub(u64::from(self.event_size))
    }

    pub fn is_artificial(&self) -> bool {
        self.flags & FLAG_ARTIFICIAL != 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumAlg {
    Off,
    Crc32,
}

/// What the server says about how its events are laid out. The first event of every binlog file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatDescription {
    pub binlog_version: u16,
    pub server_version: String,
    /// Post-header length per event type, indexed by `type_code - 1`.
    pub post_header_lengths: Vec<u8>,
    pub checksum: ChecksumAlg,
}

impl FormatDescription {
    /// Before the stream's first format description: binlog v4 with MySQL 8's post-header lengths
    /// for the events that can come first (ROTATE, heartbeats).
    pub fn initial(checksum: ChecksumAlg) -> Self {
        FormatDescription {
            binlog_version: 4,
            server_version: String::new(),
            post_header_lengths: Vec::new(),
            checksum,
        }
    }

    fn parse(body: &[u8]) -> Result<FormatDescription, DecodeError> {
        let mut c = Cursor::new(body);
        let binlog_version = c.u16("format description version")?;
        let version_bytes = c.take(50, "server version")?;
        let end = version_bytes.iter().position(|&b| b == 0).unwrap_or(50);
        let server_version = String::from_utf8_lossy(&version_bytes[..end]).into_owned();
        c.skip(4, "create timestamp")?;
        let header_len = c.u8("header length")?;
        if usize::from(header_len) != HEADER_LEN {
            return Err(DecodeError::Unsupported(format!(
                "binlog events with a {header_len}-byte header (only binlog v4, 19 bytes, is supported)"
            )));
        }
        // Checksum-aware servers (MySQL ≥ 5.6.1, MariaDB ≥ 5.3, i.e. every supported one) end the
        // body with the checksum algorithm and the event's own CRC32.
        let rest = c.rest();
        if rest.len() < 1 + CHECKSUM_LEN {
            return Err(DecodeError::Truncated("format description checksum"));
        }
        let alg_at = rest.len() - 1 - CHECKSUM_LEN;
        let checksum = match rest[alg_at] {
            0 => ChecksumAlg::Off,
            1 => ChecksumAlg::Crc32,
            other => return Err(DecodeError::Unsupported(format!("binlog checksum algorithm {other}"))),
        };
        Ok(FormatDescription { binlog_version, server_version, post_header_lengths: rest[..alg_at].to_vec(), checksum })
    }

    /// The post-header length of `type_code`, or `default` when this description has none for it.
    pub fn post_header_len(&self, type_code: u8, default: usize) -> usize {
        usize::from(type_code)
            .checked_sub(1)
            .and_then(|i| self.post_header_lengths.get(i))
            .map_or(default, |&l| usize::from(l))
    }

    pub fn is_mariadb(&self) -> bool {
        self.server_version.contains("MariaDB")
    }
}

/// A QUERY event: DDL, `BEGIN`, `COMMIT`, and statements logged as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query<'a> {
    pub thread_id: u32,
    pub error_code: u16,
    /// The default database of the session that ran the statement.
    pub schema: &'a [u8],
    pub query: Cow<'a, [u8]>,
}

impl Query<'_> {
    /// The statement with leading whitespace and comments skipped, for classification.
    pub fn statement(&self) -> &[u8] {
        skip_space_and_comments(&self.query)
    }
}

/// The parts of a TABLE_MAP event; [`crate::schema`] turns them into column decoders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableMap<'a> {
    pub table_id: u64,
    pub schema: &'a [u8],
    pub table: &'a [u8],
    pub column_types: &'a [u8],
    /// Per-type metadata (lengths, precisions), concatenated in column order.
    pub column_meta: &'a [u8],
    pub nullable: Bitmap<'a>,
    /// The optional metadata TLVs (`binlog_row_metadata = MINIMAL | FULL`).
    pub optional_meta: &'a [u8],
    /// The whole body: two TABLE_MAPs with equal bodies describe the same table the same way.
    pub body: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowsKind {
    Write,
    Update,
    Delete,
}

/// A WRITE/UPDATE/DELETE_ROWS event (v1, v2 or MariaDB's compressed forms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rows<'a> {
    pub kind: RowsKind,
    pub table_id: u64,
    pub flags: u16,
    pub column_count: usize,
    /// Columns present in the (before) image.
    pub present: Bitmap<'a>,
    /// Columns present in the after image (updates only).
    pub present_after: Option<Bitmap<'a>>,
    /// The row images, one after another (before, after for updates).
    pub data: Cow<'a, [u8]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MysqlGtid {
    /// `None` for an anonymous GTID (gtid_mode OFF).
    pub gtid: Option<([u8; 16], u64)>,
    /// Microseconds since the epoch when the transaction committed on its original server (MySQL 8+).
    pub original_commit_us: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MariadbGtid {
    pub seq: u64,
    pub domain: u32,
    pub flags: u8,
}

impl MariadbGtid {
    pub fn standalone(&self) -> bool {
        self.flags & MARIADB_GTID_STANDALONE != 0
    }
}

/// MySQL's binlog transaction compression: a whole transaction's events in one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionPayload<'a> {
    /// 0 = zstd, 255 = none.
    pub compression: u64,
    pub uncompressed_size: u64,
    pub payload: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body<'a> {
    FormatDescription(FormatDescription),
    Rotate {
        position: u64,
        file: &'a [u8],
    },
    Query(Query<'a>),
    Xid,
    TableMap(TableMap<'a>),
    Rows(Rows<'a>),
    MysqlGtid(MysqlGtid),
    MariadbGtid(MariadbGtid),
    /// MariaDB's GTID state at the start of a binlog file.
    MariadbGtidList(Vec<(u32, u32, u64)>),
    /// The statement behind the rows events that follow (MariaDB ANNOTATE_ROWS, MySQL ROWS_QUERY).
    RowsQuery(Cow<'a, [u8]>),
    TransactionPayload(TransactionPayload<'a>),
    XaPrepare,
    Heartbeat,
    Incident {
        code: u16,
        message: String,
    },
    /// MySQL's partial JSON updates (`binlog_row_value_options = PARTIAL_JSON`): not decodable into
    /// full row images.
    PartialUpdateRows,
    /// A tagged GTID (MySQL 8.4+, `gtid_next = 'AUTOMATIC:<tag>'`).
    TaggedGtid,
    /// Events that carry nothing tailgate needs (STOP, PREVIOUS_GTIDS, BINLOG_CHECKPOINT, INTVAR, ...)
    /// and unknown types.
    Ignored,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    pub header: Header,
    pub body: Body<'a>,
}

/// Decodes one event (header, body and checksum). `checksum` tells whether non-format-description
/// events end with a CRC32 (the current format description's algorithm; never inside a
/// TRANSACTION_PAYLOAD).
pub fn parse<'a>(bytes: &'a [u8], fde: &FormatDescription, checksum: bool) -> Result<Event<'a>, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Truncated("event header"));
    }
    let header = Header::parse(&bytes[..HEADER_LEN])?;
    if header.event_size as usize != bytes.len() {
        return Err(DecodeError::Invalid(format!(
            "event of type {} says it is {} bytes long but {} arrived",
            header.type_code,
            header.event_size,
            bytes.len()
        )));
    }
    let has_checksum = if header.type_code == kind::FORMAT_DESCRIPTION {
        // The format description states its own algorithm in its body.
        bytes.len() >= HEADER_LEN + 1 + CHECKSUM_LEN && bytes[bytes.len() - 1 - CHECKSUM_LEN] == 1
    } else {
        checksum
    };
    let body_end = if has_checksum {
        if bytes.len() < HEADER_LEN + CHECKSUM_LEN {
            return Err(DecodeError::Truncated("event checksum"));
        }
        let end = bytes.len() - CHECKSUM_LEN;
        let expected = u32::from_le_bytes([bytes[end], bytes[end + 1], bytes[end + 2], bytes[end + 3]]);
        let actual = crc32fast::hash(&bytes[..end]);
        if expected != actual {
            return Err(DecodeError::Checksum { expected, actual });
        }
        end
    } else {
        bytes.len()
    };
    let body = &bytes[HEADER_LEN..body_end];
    let post_header = |default| fde.post_header_len(header.type_code, default);
    let body = match header.type_code {
        kind::FORMAT_DESCRIPTION => Body::FormatDescription(FormatDescription::parse(&bytes[HEADER_LEN..])?),
        kind::ROTATE => {
            let mut c = Cursor::new(body);
            let position = c.u64("rotate position")?;
            c.skip(post_header(8).saturating_sub(8), "rotate post-header")?;
            Body::Rotate { position, file: c.rest() }
        }
        kind::QUERY | kind::MARIADB_QUERY_COMPRESSED => {
            Body::Query(parse_query(body, post_header(13), header.type_code == kind::MARIADB_QUERY_COMPRESSED)?)
        }
        kind::XID => Body::Xid,
        kind::XA_PREPARE => Body::XaPrepare,
        kind::TABLE_MAP => Body::TableMap(parse_table_map(body, post_header(8))?),
        kind::WRITE_ROWS_V1
        | kind::UPDATE_ROWS_V1
        | kind::DELETE_ROWS_V1
        | kind::WRITE_ROWS
        | kind::UPDATE_ROWS
        | kind::DELETE_ROWS
        | kind::MARIADB_WRITE_ROWS_COMPRESSED_V1
        | kind::MARIADB_UPDATE_ROWS_COMPRESSED_V1
        | kind::MARIADB_DELETE_ROWS_COMPRESSED_V1
        | kind::MARIADB_WRITE_ROWS_COMPRESSED
        | kind::MARIADB_UPDATE_ROWS_COMPRESSED
        | kind::MARIADB_DELETE_ROWS_COMPRESSED => Body::Rows(parse_rows(body, header.type_code, post_header(8))?),
        kind::GTID | kind::ANONYMOUS_GTID => Body::MysqlGtid(parse_mysql_gtid(body, header.type_code)?),
        kind::GTID_TAGGED => Body::TaggedGtid,
        kind::MARIADB_GTID => {
            let mut c = Cursor::new(body);
            let seq = c.u64("GTID sequence number")?;
            let domain = c.u32("GTID domain")?;
            let flags = c.u8("GTID flags")?;
            Body::MariadbGtid(MariadbGtid { seq, domain, flags })
        }
        kind::MARIADB_GTID_LIST => {
            let mut c = Cursor::new(body);
            let count = c.u32("GTID list count")? & 0x0FFF_FFFF;
            let mut list = Vec::with_capacity((count as usize).min(c.remaining() / 16));
            for _ in 0..count {
                list.push((c.u32("GTID list domain")?, c.u32("GTID list server")?, c.u64("GTID list seq")?));
            }
            Body::MariadbGtidList(list)
        }
        kind::MARIADB_ANNOTATE_ROWS => Body::RowsQuery(Cow::Borrowed(body)),
        kind::ROWS_QUERY => {
            // One length byte (truncated at 255, the text itself is complete), then the statement.
            let mut c = Cursor::new(body);
            c.skip(1, "rows query length")?;
            Body::RowsQuery(Cow::Borrowed(c.rest()))
        }
        kind::TRANSACTION_PAYLOAD => Body::TransactionPayload(parse_transaction_payload(body)?),
        kind::HEARTBEAT | kind::HEARTBEAT_V2 => Body::Heartbeat,
        kind::INCIDENT => {
            let mut c = Cursor::new(body);
            let code = c.u16("incident code")?;
            let message = match c.u8("incident message length") {
                Ok(n) => String::from_utf8_lossy(c.take(usize::from(n), "incident message")?).into_owned(),
                Err(_) => String::new(),
            };
            Body::Incident { code, message }
        }
        kind::PARTIAL_UPDATE_ROWS => Body::PartialUpdateRows,
        _ => Body::Ignored,
    };
    Ok(Event { header, body })
}

fn parse_query(body: &[u8], post_header_len: usize, compressed: bool) -> Result<Query<'_>, DecodeError> {
    let mut c = Cursor::new(body);
    let thread_id = c.u32("query thread id")?;
    c.skip(4, "query execution time")?;
    let schema_len = usize::from(c.u8("query schema length")?);
    let error_code = c.u16("query error code")?;
    let status_len = usize::from(c.u16("query status length")?);
    c.skip(post_header_len.saturating_sub(13), "query post-header")?;
    c.skip(status_len, "query status variables")?;
    let schema = c.take(schema_len, "query schema")?;
    c.skip(1, "query schema terminator")?;
    let query = if compressed { Cow::Owned(inflate(c.rest(), "compressed query")?) } else { Cow::Borrowed(c.rest()) };
    Ok(Query { thread_id, error_code, schema, query })
}

fn table_id(c: &mut Cursor<'_>, post_header_len: usize) -> Result<u64, DecodeError> {
    // Servers before MySQL 5.1.4 used 4-byte table ids (post-header of 6 bytes).
    if post_header_len == 6 { Ok(u64::from(c.u32("table id")?)) } else { c.uint_le(6, "table id") }
}

fn parse_table_map(body: &[u8], post_header_len: usize) -> Result<TableMap<'_>, DecodeError> {
    let mut c = Cursor::new(body);
    let table_id = table_id(&mut c, post_header_len)?;
    c.skip(2, "table map flags")?;
    c.skip(post_header_len.saturating_sub(if post_header_len == 6 { 6 } else { 8 }), "table map post-header")?;
    let schema_len = usize::from(c.u8("schema name length")?);
    let schema = c.take(schema_len, "schema name")?;
    c.skip(1, "schema name terminator")?;
    let table_len = usize::from(c.u8("table name length")?);
    let table = c.take(table_len, "table name")?;
    c.skip(1, "table name terminator")?;
    let count = c.lenenc_len("column count")?;
    let column_types = c.take(count, "column types")?;
    let meta_len = c.lenenc_len("column metadata length")?;
    let column_meta = c.take(meta_len, "column metadata")?;
    let nullable = Bitmap::read(&mut c, count, "nullable columns")?;
    Ok(TableMap { table_id, schema, table, column_types, column_meta, nullable, optional_meta: c.rest(), body })
}

fn parse_rows(body: &[u8], type_code: u8, post_header_len: usize) -> Result<Rows<'_>, DecodeError> {
    use kind::*;
    let kind = match type_code {
        WRITE_ROWS_V1 | WRITE_ROWS | MARIADB_WRITE_ROWS_COMPRESSED_V1 | MARIADB_WRITE_ROWS_COMPRESSED => {
            RowsKind::Write
        }
        UPDATE_ROWS_V1 | UPDATE_ROWS | MARIADB_UPDATE_ROWS_COMPRESSED_V1 | MARIADB_UPDATE_ROWS_COMPRESSED => {
            RowsKind::Update
        }
        _ => RowsKind::Delete,
    };
    let v2 = matches!(type_code, WRITE_ROWS | UPDATE_ROWS | DELETE_ROWS)
        || matches!(
            type_code,
            MARIADB_WRITE_ROWS_COMPRESSED | MARIADB_UPDATE_ROWS_COMPRESSED | MARIADB_DELETE_ROWS_COMPRESSED
        );
    let compressed = type_code >= MARIADB_WRITE_ROWS_COMPRESSED_V1;
    let mut c = Cursor::new(body);
    let table_id = table_id(&mut c, post_header_len)?;
    let flags = c.u16("rows flags")?;
    if v2 {
        // The extra-data length counts its own two bytes.
        let extra = usize::from(c.u16("rows extra data length")?);
        c.skip(extra.saturating_sub(2), "rows extra data")?;
    }
    // A count, not a byte length: the bitmaps that follow hold one bit per column.
    let column_count = c.lenenc("rows column count")? as usize;
    if column_count > MAX_COLUMNS {
        return Err(DecodeError::Invalid(format!("rows event with {column_count} columns")));
    }
    let present = Bitmap::read(&mut c, column_count, "rows present columns")?;
    let present_after = if kind == RowsKind::Update {
        Some(Bitmap::read(&mut c, column_count, "rows present columns (after)")?)
    } else {
        None
    };
    let data = if compressed { Cow::Owned(inflate(c.rest(), "compressed rows")?) } else { Cow::Borrowed(c.rest()) };
    // An image of no column takes no bytes: data after such bitmaps can never be read, and a reader
    // taking images until the data is used up would never finish.
    if !data.is_empty() && present.count_ones() == 0 && present_after.is_none_or(|after| after.count_ones() == 0) {
        return Err(DecodeError::Invalid(format!(
            "rows event with {} bytes of rows but no column in them",
            data.len()
        )));
    }
    Ok(Rows { kind, table_id, flags, column_count, present, present_after, data })
}

fn parse_mysql_gtid(body: &[u8], type_code: u8) -> Result<MysqlGtid, DecodeError> {
    let mut c = Cursor::new(body);
    c.skip(1, "GTID flags")?;
    let mut sid = [0u8; 16];
    sid.copy_from_slice(c.take(16, "GTID source id")?);
    let gno = c.u64("GTID number")?;
    // Logical clock (type, last committed, sequence number), then the commit timestamps (MySQL 8.0.1+):
    // 7 bytes; its top bit says an original commit timestamp follows (else they are equal).
    let mut original_commit_us = None;
    if c.remaining() >= 17 && c.u8("GTID logical clock type")? == 2 {
        c.skip(16, "GTID logical clock")?;
        if c.remaining() >= 7 {
            let immediate = c.uint_le(7, "immediate commit timestamp")?;
            let original =
                if immediate & (1 << 55) != 0 { c.uint_le(7, "original commit timestamp")? } else { immediate };
            original_commit_us = Some(original & !(1 << 55)).filter(|&t| t != 0);
        }
    }
    let gtid = (type_code == kind::GTID).then_some((sid, gno));
    Ok(MysqlGtid { gtid, original_commit_us })
}

/// MySQL's format description declares a 40-byte post-header for this event, but that is the room
/// its variable header (the fields below) may take, not bytes to skip: the fields start at once.
fn parse_transaction_payload(body: &[u8]) -> Result<TransactionPayload<'_>, DecodeError> {
    let mut c = Cursor::new(body);
    let (mut compression, mut uncompressed_size, mut size) = (0, 0, None);
    // Type-length-value fields, each part length-encoded, closed by a type-0 mark.
    loop {
        let field = c.lenenc("payload field type")?;
        if field == 0 {
            break;
        }
        let len = c.lenenc_len("payload field length")?;
        let mut value = Cursor::new(c.take(len, "payload field value")?);
        let v = value.lenenc("payload field value")?;
        match field {
            1 => size = Some(v),
            2 => compression = v,
            3 => uncompressed_size = v,
            _ => {}
        }
    }
    let payload = c.rest();
    if size.is_some_and(|s| s != payload.len() as u64) {
        return Err(DecodeError::Invalid(format!(
            "transaction payload says {} bytes, {} arrived",
            size.unwrap_or(0),
            payload.len()
        )));
    }
    Ok(TransactionPayload { compression, uncompressed_size, payload })
}

/// MySQL and MariaDB allow at most 4096 columns per table.
const MAX_COLUMNS: usize = 4096;

/// Most bytes a single decompressed event or payload may claim (the servers' own limit is 1 GiB).
const MAX_INFLATED: u64 = 1 << 30;

/// What to reserve for `claimed` decompressed bytes out of `compressed` input bytes. The claim is
/// only a header field: it is trusted as far as the input could plausibly back it, and the buffer
/// grows past that only as decompressed bytes really arrive, so that a lying length costs no
/// allocation out of proportion to the input.
fn initial_capacity(claimed: u64, compressed: usize) -> usize {
    claimed.min((compressed as u64).saturating_mul(4)) as usize
}

/// Inflates MariaDB's compressed event data: one header byte (`0x80 | n`), the uncompressed length
/// in `n` big-endian bytes, then a zlib stream.
fn inflate(data: &[u8], what: &'static str) -> Result<Vec<u8>, DecodeError> {
    let mut c = Cursor::new(data);
    let head = c.u8(what)?;
    if head & 0xE0 != 0x80 {
        return Err(DecodeError::Decompress { what, reason: format!("unknown header byte 0x{head:02x}") });
    }
    let len = c.uint_be(usize::from(head & 0x07), what)?;
    if len > MAX_INFLATED {
        return Err(DecodeError::Decompress { what, reason: format!("claims {len} bytes uncompressed") });
    }
    let mut out = Vec::with_capacity(initial_capacity(len, c.remaining()));
    flate2::read::ZlibDecoder::new(c.rest())
        .take(len)
        .read_to_end(&mut out)
        .map_err(|e| DecodeError::Decompress { what, reason: e.to_string() })?;
    if out.len() as u64 != len {
        return Err(DecodeError::Decompress { what, reason: format!("{} bytes instead of {len}", out.len()) });
    }
    Ok(out)
}

/// The events inside a TRANSACTION_PAYLOAD, decompressed.
pub fn decompress_payload(tp: &TransactionPayload<'_>) -> Result<Vec<u8>, DecodeError> {
    const WHAT: &str = "transaction payload";
    if tp.uncompressed_size > MAX_INFLATED {
        return Err(DecodeError::Decompress { what: WHAT, reason: format!("claims {} bytes", tp.uncompressed_size) });
    }
    match tp.compression {
        255 => Ok(tp.payload.to_vec()),
        0 => {
            let mut out = Vec::with_capacity(initial_capacity(tp.uncompressed_size, tp.payload.len()));
            zstd::stream::read::Decoder::new(tp.payload)
                .and_then(|d| d.take(tp.uncompressed_size).read_to_end(&mut out))
                .map_err(|e| DecodeError::Decompress { what: WHAT, reason: e.to_string() })?;
            if out.len() as u64 != tp.uncompressed_size {
                return Err(DecodeError::Decompress {
                    what: WHAT,
                    reason: format!("{} bytes instead of {}", out.len(), tp.uncompressed_size),
                });
            }
            Ok(out)
        }
        other => Err(DecodeError::Unsupported(format!("transaction payload compression type {other}"))),
    }
}

/// The events of a TRANSACTION_PAYLOAD, inflated one at a time: memory holds the compressed
/// payload, the decompressor's window and one event, whatever the transaction's size (a 5-million-row
/// compressed transaction must not be inflated whole).
pub struct PayloadReader {
    source: PayloadSource,
    /// Uncompressed bytes the payload still holds, as it declared them.
    remaining: u64,
    /// The event last returned.
    event: Vec<u8>,
    /// Return `event` again on the next call (its handling had to wait for a catalog lookup).
    again: bool,
}

enum PayloadSource {
    Plain(std::io::Cursor<Vec<u8>>),
    Zstd(Box<zstd::stream::read::Decoder<'static, std::io::BufReader<std::io::Cursor<Vec<u8>>>>>),
}

impl std::fmt::Debug for PayloadReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayloadReader").field("remaining", &self.remaining).finish_non_exhaustive()
    }
}

impl PayloadReader {
    const WHAT: &'static str = "transaction payload";

    pub fn new(tp: &TransactionPayload<'_>) -> Result<Self, DecodeError> {
        let data = std::io::Cursor::new(tp.payload.to_vec());
        let source = match tp.compression {
            255 => PayloadSource::Plain(data),
            0 => PayloadSource::Zstd(Box::new(
                zstd::stream::read::Decoder::new(data)
                    .map_err(|e| DecodeError::Decompress { what: Self::WHAT, reason: e.to_string() })?,
            )),
            other => return Err(DecodeError::Unsupported(format!("transaction payload compression type {other}"))),
        };
        Ok(PayloadReader { source, remaining: tp.uncompressed_size, event: Vec::new(), again: false })
    }

    /// The next inner event, `None` after the last.
    pub fn next_event(&mut self) -> Result<Option<&[u8]>, DecodeError> {
        if std::mem::take(&mut self.again) {
            return Ok(Some(&self.event));
        }
        if self.remaining == 0 {
            return Ok(None);
        }
        let truncated = || DecodeError::Truncated("event inside a transaction payload");
        if self.remaining < HEADER_LEN as u64 {
            return Err(truncated());
        }
        self.event.clear();
        self.read(HEADER_LEN)?;
        let size = u32::from_le_bytes([self.event[9], self.event[10], self.event[11], self.event[12]]) as usize;
        // The declared size bounds what is read (and allocated): at most what the payload holds.
        if size < HEADER_LEN || size as u64 > self.remaining + HEADER_LEN as u64 {
            return Err(truncated());
        }
        self.read(size - HEADER_LEN)?;
        Ok(Some(&self.event))
    }

    /// Hands the last event out again on the next call.
    pub fn unread(&mut self) {
        self.again = true;
    }

    fn read(&mut self, n: usize) -> Result<(), DecodeError> {
        let start = self.event.len();
        self.event.resize(start + n, 0);
        let buf = &mut self.event[start..];
        let read = match &mut self.source {
            PayloadSource::Plain(c) => c.read_exact(buf),
            PayloadSource::Zstd(d) => d.read_exact(buf),
        };
        read.map_err(|e| DecodeError::Decompress { what: Self::WHAT, reason: e.to_string() })?;
        self.remaining -= n as u64;
        Ok(())
    }
}

/// Splits decompressed payload bytes into events (no checksums inside a payload).
pub fn payload_events(bytes: &[u8]) -> impl Iterator<Item = Result<&[u8], DecodeError>> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        if rest.len() < HEADER_LEN {
            rest = &[];
            return Some(Err(DecodeError::Truncated("event inside a transaction payload")));
        }
        let size = u32::from_le_bytes([rest[9], rest[10], rest[11], rest[12]]) as usize;
        if size < HEADER_LEN || size > rest.len() {
            rest = &[];
            return Some(Err(DecodeError::Truncated("event inside a transaction payload")));
        }
        let (event, tail) = rest.split_at(size);
        rest = tail;
        Some(Ok(event))
    })
}

/// Skips whitespace and `/* ... */` and `-- ...` comments at the start of a statement.
pub fn skip_space_and_comments(mut s: &[u8]) -> &[u8] {
    loop {
        let trimmed = s.trim_ascii_start();
        if let Some(rest) = trimmed.strip_prefix(b"/*") {
            // MySQL's executable comments (/*!50001 ... */) hold real statement text: keep it.
            if rest.first() == Some(&b'!') {
                return trimmed;
            }
            match rest.windows(2).position(|w| w == b"*/") {
                Some(end) => s = &rest[end + 2..],
                None => return &[],
            }
        } else if let Some(rest) = trimmed.strip_prefix(b"--").or_else(|| trimmed.strip_prefix(b"#")) {
            match rest.iter().position(|&b| b == b'\n') {
                Some(end) => s = &rest[end + 1..],
                None => return &[],
            }
        } else {
            return trimmed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(type_code: u8, body: &[u8], log_pos: u32, checksum: bool) -> Vec<u8> {
        let size = (HEADER_LEN + body.len() + if checksum { 4 } else { 0 }) as u32;
        let mut out = Vec::new();
        out.extend_from_slice(&1_700_000_000u32.to_le_bytes());
        out.push(type_code);
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&log_pos.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(body);
        if checksum {
            let crc = crc32fast::hash(&out);
            out.extend_from_slice(&crc.to_le_bytes());
        }
        out
    }

    fn fde() -> FormatDescription {
        FormatDescription::initial(ChecksumAlg::Crc32)
    }

    #[test]
    fn checksums_are_verified() {
        let mut bytes = event(kind::XID, &42u64.to_le_bytes(), 500, true);
        let parsed = parse(&bytes, &fde(), true).unwrap();
        assert_eq!(parsed.body, Body::Xid);
        assert_eq!(parsed.header.start_pos(), 500 - bytes.len() as u64);
        bytes[HEADER_LEN] ^= 0xFF;
        assert!(matches!(parse(&bytes, &fde(), true), Err(DecodeError::Checksum { .. })));
    }

    #[test]
    fn truncated_events_are_errors_not_panics() {
        let bytes = event(kind::TABLE_MAP, &[1, 0, 0, 0, 0, 0, 0, 0, 5, b'x'], 100, false);
        assert!(matches!(parse(&bytes, &fde(), false), Err(DecodeError::Truncated(_))));
        let bytes = event(kind::QUERY, &[0; 5], 100, false);
        assert!(matches!(parse(&bytes, &fde(), false), Err(DecodeError::Truncated(_))));
        // Every prefix of a valid rotate event either parses or fails cleanly.
        let full = event(kind::ROTATE, b"\x04\0\0\0\0\0\0\0binlog.000002", 0, true);
        for len in 0..full.len() {
            let _ = parse(&full[..len], &fde(), true);
        }
    }

    /// Regression: the column count of a rows event is a count of bits, not of bytes left; a wide
    /// table whose row is short (mostly NULL) must still parse.
    #[test]
    fn rows_event_with_more_columns_than_bytes_left() {
        let mut body = vec![0x1B, 0, 0, 0, 0, 0, 0x01, 0x00]; // table id 27, STMT_END
        body.push(43); // 43 columns
        body.extend_from_slice(&[0xFF; 6]); // all present
        body.extend_from_slice(&[0xFE, 0xFF, 0xFF, 0xDF, 0xFF, 0x07]); // null bitmap
        body.extend_from_slice(&[3, 0, 0, 0, 0x21, 0xA0, 0x0F]); // id = 3, a DATE
        let bytes = event(kind::WRITE_ROWS_V1, &body, 0, true);
        let Body::Rows(rows) = parse(&bytes, &fde(), true).unwrap().body else { panic!() };
        assert_eq!((rows.column_count, rows.data.len()), (43, 13));
    }

    #[test]
    fn mariadb_compressed_query_is_inflated() {
        use std::io::Write;
        let text = b"INSERT INTO t VALUES (1)".repeat(20);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&text).unwrap();
        let compressed = z.finish().unwrap();
        let mut body = Vec::new();
        body.extend_from_slice(&7u32.to_le_bytes()); // thread
        body.extend_from_slice(&0u32.to_le_bytes()); // exec time
        body.push(2); // schema length
        body.extend_from_slice(&0u16.to_le_bytes()); // error code
        body.extend_from_slice(&0u16.to_le_bytes()); // status vars length
        body.extend_from_slice(b"db\0");
        body.push(0x82); // two length bytes follow
        body.extend_from_slice(&(text.len() as u16).to_be_bytes());
        body.extend_from_slice(&compressed);
        let bytes = event(kind::MARIADB_QUERY_COMPRESSED, &body, 0, true);
        let Body::Query(q) = parse(&bytes, &fde(), true).unwrap().body else { panic!() };
        assert_eq!(q.thread_id, 7);
        assert_eq!(q.schema, b"db");
        assert_eq!(&*q.query, &text[..]);
    }

    /// Regression: a real MySQL 9.7 TRANSACTION_PAYLOAD header (the format description says its
    /// post-header is 40 bytes; the fields start right after the common header).
    #[test]
    fn transaction_payload_fields_start_after_the_common_header() {
        let mut body = vec![0x02, 0x01, 0x00, 0x03, 0x03, 0xFC, 0x0F, 0x0B, 0x01, 0x01, 0x04, 0x00];
        body.extend_from_slice(&[0x28, 0xB5, 0x2F, 0xFD]);
        let mut fde = fde();
        fde.post_header_lengths = vec![0; 39];
        fde.post_header_lengths.push(40);
        let bytes = event(kind::TRANSACTION_PAYLOAD, &body, 0, true);
        let Body::TransactionPayload(tp) = parse(&bytes, &fde, true).unwrap().body else { panic!() };
        assert_eq!((tp.compression, tp.uncompressed_size, tp.payload.len()), (0, 2831, 4));
    }

    /// Found by the `binlog_event` fuzz target: a 10-byte input (a zstd transaction payload whose
    /// header claims 657,497,722 uncompressed bytes) reserved all of it before decompressing
    /// (an out-of-memory report under the fuzzer's 512 MiB allocation limit). MariaDB's compressed
    /// events had the same flaw. What is reserved now follows the input's length.
    #[test]
    fn claimed_uncompressed_sizes_do_not_reserve_memory() {
        let tp =
            TransactionPayload { compression: 0, uncompressed_size: 657_497_722, payload: &[0x00, 0x04, 0x3D, 0xC7] };
        assert!(matches!(decompress_payload(&tp), Err(DecodeError::Decompress { .. })));
        assert_eq!(initial_capacity(657_497_722, 4), 16);
        assert_eq!(initial_capacity(100, 4096), 100);
        // MariaDB: 0x84 and a four-byte length of 1 GiB, then a few bytes that are not zlib.
        assert!(inflate(&[0x84, 0x40, 0, 0, 0, 0x78, 0x9C, 0x03], "test").is_err());
    }

    /// Found by the `binlog_event` fuzz target (a hang): a rows event whose bitmaps name no column
    /// has images of zero bytes, so the source's loop (`while !c.is_empty()`, one image per turn)
    /// never used up the row data. Such an event is an error now.
    #[test]
    fn rows_with_data_but_no_column_are_errors() {
        for (type_code, bitmaps) in [(kind::WRITE_ROWS_V1, 1), (kind::UPDATE_ROWS_V1, 2), (kind::DELETE_ROWS_V1, 1)] {
            let mut body = vec![0x1B, 0, 0, 0, 0, 0, 0x01, 0x00]; // table id 27, STMT_END
            body.push(3); // 3 columns
            body.extend(std::iter::repeat_n(0x00, bitmaps)); // none present
            body.extend_from_slice(&[0xAA; 12]);
            let bytes = event(type_code, &body, 0, true);
            assert!(matches!(parse(&bytes, &fde(), true), Err(DecodeError::Invalid(_))), "type {type_code}");
        }
        // Zero columns, or no data, are still fine; so is an update whose after image is empty.
        let mut body = vec![0x1B, 0, 0, 0, 0, 0, 0x01, 0x00, 0];
        assert!(parse(&event(kind::WRITE_ROWS_V1, &body, 0, true), &fde(), true).is_ok());
        body.extend_from_slice(&[0x01]);
        assert!(parse(&event(kind::WRITE_ROWS_V1, &body, 0, true), &fde(), true).is_err());
        let body = [0x1B, 0, 0, 0, 0, 0, 0x01, 0x00, 1, 0x01, 0x00, 0x00, 0x07];
        assert!(parse(&event(kind::UPDATE_ROWS_V1, &body, 0, true), &fde(), true).is_ok());
    }

    #[test]
    fn statements_are_classified_past_comments() {
        assert_eq!(skip_space_and_comments(b"  /* x */ -- y\n ALTER TABLE t"), b"ALTER TABLE t");
        assert_eq!(skip_space_and_comments(b"/*!40101 SET x */"), b"/*!40101 SET x */");
        assert_eq!(skip_space_and_comments(b"/* open"), b"");
    }
}
