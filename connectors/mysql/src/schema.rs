//! From a TABLE_MAP event to a table's column names, key and value decoders.
//!
//! With `binlog_row_metadata = FULL` (MySQL 8.0.1+, MariaDB 10.5+) every TABLE_MAP carries the
//! column names, primary key, signedness, character sets and ENUM/SET labels as they were when the
//! rows were written: the rows that follow it can never be decoded against another version of the
//! table. Without it, the missing parts come from `information_schema` (cached, dropped on every DDL
//! statement in the stream), checked against the TABLE_MAP's column count and types: a table that no
//! longer matches its rows is an error naming the fix, never values under the wrong names.
//!
//! A [`TableInfo`] is built once per distinct TABLE_MAP body and shared by every row of that table.

use std::collections::HashMap;
use std::sync::Arc;

use tailgate_core::{ColumnSchema, TableId, TableSchema};

use crate::binlog::event::TableMap;
use crate::binlog::rows::{Charset, ColumnCodec, ColumnDecoder};
use crate::binlog::{Cursor, DecodeError};

/// Column type codes of TABLE_MAP (`enum_field_types`).
pub mod field_type {
    pub const DECIMAL: u8 = 0;
    pub const TINY: u8 = 1;
    pub const SHORT: u8 = 2;
    pub const LONG: u8 = 3;
    pub const FLOAT: u8 = 4;
    pub const DOUBLE: u8 = 5;
    pub const NULL: u8 = 6;
    pub const TIMESTAMP: u8 = 7;
    pub const LONGLONG: u8 = 8;
    pub const INT24: u8 = 9;
    pub const DATE: u8 = 10;
    pub const TIME: u8 = 11;
    pub const DATETIME: u8 = 12;
    pub const YEAR: u8 = 13;
    pub const NEWDATE: u8 = 14;
    pub const VARCHAR: u8 = 15;
    pub const BIT: u8 = 16;
    pub const TIMESTAMP2: u8 = 17;
    pub const DATETIME2: u8 = 18;
    pub const TIME2: u8 = 19;
    pub const VECTOR: u8 = 242;
    pub const JSON: u8 = 245;
    pub const NEWDECIMAL: u8 = 246;
    pub const ENUM: u8 = 247;
    pub const SET: u8 = 248;
    pub const TINY_BLOB: u8 = 249;
    pub const MEDIUM_BLOB: u8 = 250;
    pub const LONG_BLOB: u8 = 251;
    pub const BLOB: u8 = 252;
    pub const VAR_STRING: u8 = 253;
    pub const STRING: u8 = 254;
    pub const GEOMETRY: u8 = 255;
}

use field_type as ft;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchemaError {
    #[error("TABLE_MAP of {table}: {source}")]
    Decode { table: String, source: DecodeError },
    #[error(
        "table {table}: the binlog carries no column names (binlog_row_metadata is not FULL) and information_schema has no such table. \
         Fix: SET GLOBAL binlog_row_metadata = FULL (and restart tailgate from a position after that), or exclude the table"
    )]
    NoColumnNames { table: String },
    #[error(
        "table {table}: its rows have {binlog} columns of types [{binlog_types}] but information_schema now lists {catalog} \
         columns [{catalog_types}]: the table changed after these rows were written, and without binlog_row_metadata = FULL \
         the binlog does not say which names they had. Fix: SET GLOBAL binlog_row_metadata = FULL so that every change \
         carries its own column names; to get past the rows written before, take a new snapshot (snapshot = \"when_needed\" \
         after `tailgate offsets reset`)"
    )]
    Mismatch { table: String, binlog: usize, binlog_types: String, catalog: usize, catalog_types: String },
    #[error("table {table}, column {column}: {reason}")]
    Column { table: String, column: String, reason: String },
}

/// A column as `information_schema.COLUMNS` describes it (the fallback when TABLE_MAP has no
/// optional metadata).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogColumn {
    pub name: String,
    /// `DATA_TYPE`, lower case: `int`, `varchar`, `enum`, ...
    pub data_type: String,
    /// `COLUMN_TYPE`: `int unsigned`, `enum('a','b')`, ...
    pub column_type: String,
    pub charset: Option<String>,
    pub primary_key: bool,
    pub nullable: bool,
    /// NUMERIC_PRECISION (DECIMAL digits, BIT width), NUMERIC_SCALE, DATETIME_PRECISION.
    pub precision: Option<u64>,
    pub scale: Option<u64>,
    pub fsp: Option<u64>,
    /// CHARACTER_OCTET_LENGTH (BINARY(n) is padded to it).
    pub octet_length: Option<u64>,
}

impl CatalogColumn {
    fn unsigned(&self) -> bool {
        self.column_type.to_ascii_lowercase().contains("unsigned")
    }

    /// ENUM/SET labels from `enum('a','b''c')`.
    fn labels(&self) -> Vec<String> {
        let Some(start) = self.column_type.find('(') else { return Vec::new() };
        let inner = &self.column_type[start + 1..self.column_type.rfind(')').unwrap_or(self.column_type.len())];
        let mut labels = Vec::new();
        let mut chars = inner.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '\'' {
                continue;
            }
            let mut label = String::new();
            while let Some(c) = chars.next() {
                if c == '\'' {
                    if chars.peek() == Some(&'\'') {
                        chars.next();
                        label.push('\'');
                    } else {
                        break;
                    }
                } else if c == '\\' {
                    if let Some(n) = chars.next() {
                        label.push(n);
                    }
                } else {
                    label.push(c);
                }
            }
            labels.push(label);
        }
        labels
    }
}

/// Collation ids to character set names (`information_schema.COLLATIONS`), read once per connection.
pub type Collations = HashMap<u32, String>;

/// Everything about one table that decoding its rows needs.
#[derive(Debug, Clone, PartialEq)]
pub struct TableInfo {
    pub schema: Arc<TableSchema>,
    pub columns: Vec<ColumnDecoder>,
}

/// What TABLE_MAP's optional metadata says; each part only when the server wrote it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct OptionalMeta {
    /// One flag per numeric column, in column order.
    pub unsigned: Option<Vec<bool>>,
    /// Collation per character column (from DEFAULT_CHARSET or COLUMN_CHARSET).
    pub charsets: Option<Vec<u32>>,
    /// Collation per ENUM/SET column.
    pub enum_set_charsets: Option<Vec<u32>>,
    pub names: Option<Vec<String>>,
    /// Labels per SET / ENUM column, as bytes in the column's character set.
    pub set_labels: Option<Vec<Vec<Vec<u8>>>>,
    pub enum_labels: Option<Vec<Vec<Vec<u8>>>>,
    /// Geometry subtype per geometry column (1 = POINT).
    pub geometry_types: Option<Vec<u64>>,
    pub primary_key: Option<Vec<usize>>,
}

impl OptionalMeta {
    /// Whether nothing is missing for `types` (so information_schema need not be asked).
    fn complete(&self, types: &[ColumnType]) -> bool {
        let needs_charset = types.iter().any(|t| t.is_character());
        let needs_enum = types.iter().any(|t| t.is_enum_or_set());
        self.names.is_some()
            && (!types.iter().any(|t| t.is_numeric()) || self.unsigned.is_some())
            && (!needs_charset || self.charsets.is_some())
            && (!needs_enum || (self.enum_labels.is_some() || self.set_labels.is_some()))
    }
}

/// A column's binlog type with its metadata already read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnType {
    pub code: u8,
    /// For STRING: the real type (STRING, ENUM or SET).
    pub real: u8,
    pub meta: u16,
    /// STRING: the maximum length in bytes.
    pub max_len: u16,
}

impl ColumnType {
    fn is_numeric(&self) -> bool {
        matches!(
            self.code,
            ft::TINY | ft::SHORT | ft::INT24 | ft::LONG | ft::LONGLONG | ft::NEWDECIMAL | ft::FLOAT | ft::DOUBLE
        )
    }

    fn is_enum_or_set(&self) -> bool {
        matches!(self.real, ft::ENUM | ft::SET)
    }

    /// Columns whose character set the optional metadata lists (CHAR, VARCHAR, TEXT/BLOB).
    fn is_character(&self) -> bool {
        matches!(
            self.real,
            ft::STRING | ft::VARCHAR | ft::VAR_STRING | ft::BLOB | ft::TINY_BLOB | ft::MEDIUM_BLOB | ft::LONG_BLOB
        )
    }

    fn is_geometry(&self) -> bool {
        self.code == ft::GEOMETRY
    }

    /// A short name for error messages.
    pub(crate) fn name(&self) -> &'static str {
        match self.real {
            ft::TINY => "tinyint",
            ft::SHORT => "smallint",
            ft::INT24 => "mediumint",
            ft::LONG => "int",
            ft::LONGLONG => "bigint",
            ft::FLOAT => "float",
            ft::DOUBLE => "double",
            ft::NEWDECIMAL | ft::DECIMAL => "decimal",
            ft::DATE | ft::NEWDATE => "date",
            ft::TIME | ft::TIME2 => "time",
            ft::DATETIME | ft::DATETIME2 => "datetime",
            ft::TIMESTAMP | ft::TIMESTAMP2 => "timestamp",
            ft::YEAR => "year",
            ft::BIT => "bit",
            ft::ENUM => "enum",
            ft::SET => "set",
            ft::STRING => "char",
            ft::VARCHAR | ft::VAR_STRING => "varchar",
            ft::BLOB | ft::TINY_BLOB | ft::MEDIUM_BLOB | ft::LONG_BLOB => "blob",
            ft::JSON => "json",
            ft::GEOMETRY => "geometry",
            ft::VECTOR => "vector",
            _ => "?",
        }
    }

    /// Whether `information_schema`'s DATA_TYPE can be stored as this binlog type.
    fn matches_catalog(&self, data_type: &str) -> bool {
        let class = self.name();
        match data_type {
            "tinyint" | "smallint" | "mediumint" | "int" | "bigint" | "float" | "double" | "decimal" | "date"
            | "time" | "datetime" | "timestamp" | "year" | "bit" | "enum" | "set" | "vector" => {
                class == data_type || (data_type == "int" && class == "int")
            }
            "char" | "binary" | "uuid" | "inet6" | "inet4" => class == "char",
            "varchar" | "varbinary" => class == "varchar",
            "tinytext" | "text" | "mediumtext" | "longtext" | "tinyblob" | "blob" | "mediumblob" | "longblob" => {
                class == "blob"
            }
            // MySQL's JSON has its own type; MariaDB's is LONGTEXT.
            "json" => class == "json" || class == "blob",
            "geometry" | "point" | "linestring" | "polygon" | "multipoint" | "multilinestring" | "multipolygon"
            | "geometrycollection" | "geomcollection" => class == "geometry",
            // Types this check does not know are trusted.
            _ => true,
        }
    }
}

/// Decoders for a table read with SQL (the snapshot's text rows), from information_schema alone:
/// the same codecs, hence the same values, as the binlog path gives for the table's columns.
pub fn codecs_from_catalog(table: &str, columns: &[CatalogColumn]) -> Result<Vec<ColumnDecoder>, SchemaError> {
    columns
        .iter()
        .map(|c| {
            let unsigned = c.unsigned();
            let fsp = c.fsp.unwrap_or(0).min(6) as u8;
            let charset = || c.charset.as_deref().map_or(Charset::Binary, Charset::from_name);
            let codec = match c.data_type.as_str() {
                "tinyint" => ColumnCodec::Int { bytes: 1, unsigned },
                "smallint" => ColumnCodec::Int { bytes: 2, unsigned },
                "mediumint" => ColumnCodec::Int { bytes: 3, unsigned },
                "int" | "integer" => ColumnCodec::Int { bytes: 4, unsigned },
                "bigint" => ColumnCodec::Int { bytes: 8, unsigned },
                "float" => ColumnCodec::Float,
                "double" | "real" => ColumnCodec::Double,
                "decimal" | "numeric" => ColumnCodec::Decimal {
                    precision: c.precision.unwrap_or(10) as u8,
                    scale: c.scale.unwrap_or(0) as u8,
                },
                "date" => ColumnCodec::Date,
                "time" => ColumnCodec::Time { fsp },
                "datetime" => ColumnCodec::Datetime { fsp },
                "timestamp" => ColumnCodec::Timestamp { fsp },
                "year" => ColumnCodec::Year,
                "bit" => ColumnCodec::Bit { bits: c.precision.unwrap_or(1) as u16 },
                "enum" => ColumnCodec::Enum { bytes: 2, labels: c.labels().into() },
                "set" => ColumnCodec::Set { bytes: 8, labels: c.labels().into() },
                "binary" => ColumnCodec::Str {
                    len_bytes: 2,
                    charset: Charset::Binary,
                    pad_to: c.octet_length.unwrap_or(0) as u16,
                },
                "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => {
                    ColumnCodec::Str { len_bytes: 4, charset: Charset::Binary, pad_to: 0 }
                }
                "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" => {
                    ColumnCodec::Str { len_bytes: 4, charset: charset(), pad_to: 0 }
                }
                "json" => ColumnCodec::Json { len_bytes: 4 },
                "geometry" | "point" | "linestring" | "polygon" | "multipoint" | "multilinestring" | "multipolygon"
                | "geometrycollection" | "geomcollection" => {
                    ColumnCodec::Geometry { len_bytes: 4, point: c.data_type == "point" }
                }
                "vector" => ColumnCodec::Vector { len_bytes: 4 },
                // MariaDB's UUID and INET types read as their text form.
                "uuid" | "inet4" | "inet6" => ColumnCodec::Str { len_bytes: 4, charset: Charset::Utf8, pad_to: 0 },
                other => {
                    return Err(SchemaError::Column {
                        table: table.to_owned(),
                        column: c.name.clone(),
                        reason: format!("type {other} is not supported"),
                    });
                }
            };
            Ok(ColumnDecoder { codec, nullable: c.nullable })
        })
        .collect()
}

/// Reads the per-column metadata of TABLE_MAP (lengths, precisions, real types).
pub fn column_types(map: &TableMap<'_>) -> Result<Vec<ColumnType>, DecodeError> {
    let mut c = Cursor::new(map.column_meta);
    let mut out = Vec::with_capacity(map.column_types.len());
    for &code in map.column_types {
        let (meta, real, max_len) = match code {
            ft::FLOAT
            | ft::DOUBLE
            | ft::BLOB
            | ft::TINY_BLOB
            | ft::MEDIUM_BLOB
            | ft::LONG_BLOB
            | ft::JSON
            | ft::GEOMETRY
            | ft::VECTOR
            | ft::TIMESTAMP2
            | ft::DATETIME2
            | ft::TIME2 => (u16::from(c.u8("column metadata")?), code, 0),
            ft::VARCHAR | ft::VAR_STRING => {
                let m = c.u16("varchar metadata")?;
                (m, code, m)
            }
            ft::BIT | ft::NEWDECIMAL => {
                // Two bytes, first one first: (bits in the last byte, bytes) / (precision, scale).
                let a = c.u8("column metadata")?;
                let b = c.u8("column metadata")?;
                ((u16::from(a) << 8) | u16::from(b), code, 0)
            }
            ft::STRING | ft::ENUM | ft::SET => {
                let b0 = c.u8("string metadata")?;
                let b1 = c.u8("string metadata")?;
                // CHAR lengths over 255 borrow two bits of the first byte (MySQL's encoding).
                let (real, len) = if b0 & 0x30 != 0x30 {
                    (b0 | 0x30, u16::from(b1) | ((u16::from(b0 & 0x30) ^ 0x30) << 4))
                } else {
                    (b0, u16::from(b1))
                };
                ((u16::from(real) << 8) | u16::from(b1), real, len)
            }
            _ => (0, code, 0),
        };
        out.push(ColumnType { code, real, meta, max_len });
    }
    Ok(out)
}

/// Reads the optional metadata TLVs.
pub fn optional_meta(map: &TableMap<'_>, types: &[ColumnType]) -> Result<OptionalMeta, DecodeError> {
    let mut meta = OptionalMeta::default();
    let mut c = Cursor::new(map.optional_meta);
    let numeric = types.iter().filter(|t| t.is_numeric()).count();
    let character = types.iter().filter(|t| t.is_character()).count();
    let enum_set = types.iter().filter(|t| t.is_enum_or_set()).count();
    while !c.is_empty() {
        let kind = c.u8("optional metadata type")?;
        let value = c.lenenc_bytes("optional metadata")?;
        let mut v = Cursor::new(value);
        match kind {
            1 => meta.unsigned = Some((0..numeric).map(|i| msb_bit(value, i)).collect()),
            2 => meta.charsets = Some(default_charsets(&mut v, character)?),
            3 => meta.charsets = Some(lenenc_list(&mut v)?),
            4 => {
                let mut names = Vec::with_capacity(types.len());
                while !v.is_empty() {
                    names.push(String::from_utf8_lossy(v.lenenc_bytes("column name")?).into_owned());
                }
                meta.names = Some(names);
            }
            5 => meta.set_labels = Some(label_lists(&mut v)?),
            6 => meta.enum_labels = Some(label_lists(&mut v)?),
            7 => meta.geometry_types = Some(lenenc_list(&mut v)?.into_iter().map(u64::from).collect()),
            8 => meta.primary_key = Some(lenenc_list(&mut v)?.into_iter().map(|i| i as usize).collect()),
            9 => {
                let mut pk = Vec::new();
                while !v.is_empty() {
                    pk.push(v.lenenc("primary key column")? as usize);
                    v.lenenc("primary key prefix")?;
                }
                meta.primary_key = Some(pk);
            }
            10 => meta.enum_set_charsets = Some(default_charsets(&mut v, enum_set)?),
            11 => meta.enum_set_charsets = Some(lenenc_list(&mut v)?),
            // 12 COLUMN_VISIBILITY, 13+ newer ones: nothing tailgate needs.
            _ => {}
        }
    }
    Ok(meta)
}

/// Bit `i` counting from the most significant bit of the first byte (how signedness is packed).
fn msb_bit(bytes: &[u8], i: usize) -> bool {
    bytes.get(i / 8).is_some_and(|b| b & (0x80 >> (i % 8)) != 0)
}

fn lenenc_list(v: &mut Cursor<'_>) -> Result<Vec<u32>, DecodeError> {
    let mut out = Vec::new();
    while !v.is_empty() {
        out.push(v.lenenc("metadata value")? as u32);
    }
    Ok(out)
}

/// DEFAULT_CHARSET: the default collation, then `(index, collation)` for the columns that differ,
/// indexes counting only the columns the field is about.
fn default_charsets(v: &mut Cursor<'_>, count: usize) -> Result<Vec<u32>, DecodeError> {
    let default = v.lenenc("default collation")? as u32;
    let mut out = vec![default; count];
    while !v.is_empty() {
        let index = v.lenenc("charset column index")? as usize;
        let collation = v.lenenc("charset column collation")? as u32;
        if let Some(slot) = out.get_mut(index) {
            *slot = collation;
        }
    }
    Ok(out)
}

fn label_lists(v: &mut Cursor<'_>) -> Result<Vec<Vec<Vec<u8>>>, DecodeError> {
    let mut lists = Vec::new();
    while !v.is_empty() {
        let n = v.lenenc("label count")?;
        let mut labels = Vec::with_capacity((n as usize).min(v.remaining()));
        for _ in 0..n {
            labels.push(v.lenenc_bytes("label")?.to_vec());
        }
        lists.push(labels);
    }
    Ok(lists)
}

/// The TABLE_MAP's own reading: types, optional metadata, and whether the catalog must fill gaps.
pub struct ParsedTableMap {
    pub id: TableId,
    pub types: Vec<ColumnType>,
    pub meta: OptionalMeta,
    pub nullable: Vec<bool>,
}

impl ParsedTableMap {
    pub fn parse(map: &TableMap<'_>) -> Result<Self, SchemaError> {
        let id = TableId {
            schema: String::from_utf8_lossy(map.schema).into_owned(),
            table: String::from_utf8_lossy(map.table).into_owned(),
        };
        let err = |source| SchemaError::Decode { table: id.to_string(), source };
        let types = column_types(map).map_err(err)?;
        let meta = optional_meta(map, &types).map_err(err)?;
        let nullable = (0..types.len()).map(|i| map.nullable.get(i)).collect();
        Ok(ParsedTableMap { id, types, meta, nullable })
    }

    /// Whether `information_schema` must be asked for what the binlog does not say.
    pub fn needs_catalog(&self) -> bool {
        !self.meta.complete(&self.types)
    }

    /// Builds the decoders. `catalog`: the table's columns from information_schema, required when
    /// [`ParsedTableMap::needs_catalog`].
    pub fn build(&self, catalog: Option<&[CatalogColumn]>, collations: &Collations) -> Result<TableInfo, SchemaError> {
        let table = self.id.to_string();
        if let Some(cat) = catalog {
            let mismatch = cat.len() != self.types.len()
                || self.types.iter().zip(cat).any(|(t, c)| !t.matches_catalog(&c.data_type.to_ascii_lowercase()));
            if mismatch {
                return Err(SchemaError::Mismatch {
                    table,
                    binlog: self.types.len(),
                    binlog_types: self.types.iter().map(ColumnType::name).collect::<Vec<_>>().join(","),
                    catalog: cat.len(),
                    catalog_types: cat.iter().map(|c| c.data_type.as_str()).collect::<Vec<_>>().join(","),
                });
            }
        } else if self.needs_catalog() {
            return Err(SchemaError::NoColumnNames { table });
        }
        let m = &self.meta;
        let (mut numeric, mut character, mut enum_set, mut sets, mut enums, mut geometry) = (0, 0, 0, 0, 0, 0);
        let mut columns = Vec::with_capacity(self.types.len());
        let mut schema_columns = Vec::with_capacity(self.types.len());
        for (i, t) in self.types.iter().enumerate() {
            let cat = catalog.map(|c| &c[i]);
            let name = match (&m.names, cat) {
                (Some(names), _) if i < names.len() => names[i].clone(),
                (_, Some(c)) => c.name.clone(),
                _ => return Err(SchemaError::NoColumnNames { table }),
            };
            let col_err = |reason: String| SchemaError::Column { table: table.clone(), column: name.clone(), reason };
            let key = match (&m.primary_key, cat) {
                (Some(pk), _) => pk.contains(&i),
                (None, Some(c)) => c.primary_key,
                (None, None) => false,
            };
            let unsigned = if t.is_numeric() {
                let u = m.unsigned.as_ref().and_then(|u| u.get(numeric).copied()).or(cat.map(CatalogColumn::unsigned));
                numeric += 1;
                u.unwrap_or(false)
            } else {
                false
            };
            let charset = if t.is_character() {
                let from_meta = m.charsets.as_ref().and_then(|c| c.get(character)).map(|id| {
                    collations.get(id).map_or_else(
                        || Charset::Unsupported(format!("collation {id}").into()),
                        |n| Charset::from_name(n),
                    )
                });
                character += 1;
                match (from_meta, cat) {
                    (Some(cs), _) => cs,
                    (None, Some(c)) => c.charset.as_deref().map_or(Charset::Binary, Charset::from_name),
                    (None, None) => return Err(col_err("the binlog does not say its character set".into())),
                }
            } else {
                Charset::Binary
            };
            let labels = if t.is_enum_or_set() {
                // Labels are stored in the column's own character set.
                let charset = m
                    .enum_set_charsets
                    .as_ref()
                    .and_then(|c| c.get(enum_set))
                    .map(|id| collations.get(id).map_or(Charset::Utf8, |n| Charset::from_name(n)));
                enum_set += 1;
                let decode = |raw: Vec<Vec<u8>>| -> Vec<String> {
                    raw.iter()
                        .map(|l| crate::binlog::rows::decode_label(l, charset.as_ref().unwrap_or(&Charset::Utf8)))
                        .collect()
                };
                let from_meta = if t.real == ft::ENUM {
                    let l = m.enum_labels.as_ref().and_then(|l| l.get(enums).cloned());
                    enums += 1;
                    l
                } else {
                    let l = m.set_labels.as_ref().and_then(|l| l.get(sets).cloned());
                    sets += 1;
                    l
                };
                match (from_meta, cat) {
                    (Some(l), _) => decode(l),
                    (None, Some(c)) => c.labels(),
                    (None, None) => return Err(col_err("the binlog does not list its labels".into())),
                }
            } else {
                Vec::new()
            };
            let point = if t.is_geometry() {
                let p = m.geometry_types.as_ref().and_then(|g| g.get(geometry)).map(|&g| g == 1);
                geometry += 1;
                p.or(cat.map(|c| c.data_type.eq_ignore_ascii_case("point"))).unwrap_or(false)
            } else {
                false
            };
            let codec = codec(t, unsigned, charset, labels, point).map_err(col_err)?;
            columns.push(ColumnDecoder { codec, nullable: self.nullable[i] });
            schema_columns.push(ColumnSchema { name, key });
        }
        Ok(TableInfo { schema: Arc::new(TableSchema { id: self.id.clone(), columns: schema_columns }), columns })
    }
}

fn codec(
    t: &ColumnType,
    unsigned: bool,
    charset: Charset,
    labels: Vec<String>,
    point: bool,
) -> Result<ColumnCodec, String> {
    let len_bytes = |max: u16| if max < 256 { 1 } else { 2 };
    let meta_u8 = (t.meta & 0xFF) as u8;
    Ok(match t.real {
        ft::TINY => ColumnCodec::Int { bytes: 1, unsigned },
        ft::SHORT => ColumnCodec::Int { bytes: 2, unsigned },
        ft::INT24 => ColumnCodec::Int { bytes: 3, unsigned },
        ft::LONG => ColumnCodec::Int { bytes: 4, unsigned },
        ft::LONGLONG => ColumnCodec::Int { bytes: 8, unsigned },
        ft::FLOAT => ColumnCodec::Float,
        ft::DOUBLE => ColumnCodec::Double,
        ft::YEAR => ColumnCodec::Year,
        ft::NEWDECIMAL => ColumnCodec::Decimal { precision: (t.meta >> 8) as u8, scale: meta_u8 },
        ft::DATE | ft::NEWDATE => ColumnCodec::Date,
        ft::TIME => ColumnCodec::TimeOld,
        ft::TIME2 => ColumnCodec::Time { fsp: meta_u8 },
        ft::DATETIME => ColumnCodec::DatetimeOld,
        ft::DATETIME2 => ColumnCodec::Datetime { fsp: meta_u8 },
        ft::TIMESTAMP => ColumnCodec::TimestampOld,
        ft::TIMESTAMP2 => ColumnCodec::Timestamp { fsp: meta_u8 },
        ft::BIT => {
            let (last_bits, bytes) = (t.meta >> 8, t.meta & 0xFF);
            ColumnCodec::Bit { bits: bytes * 8 + last_bits }
        }
        ft::ENUM => ColumnCodec::Enum { bytes: meta_u8.clamp(1, 2), labels: labels.into() },
        ft::SET => ColumnCodec::Set { bytes: meta_u8.clamp(1, 8), labels: labels.into() },
        ft::STRING => {
            let pad_to = if charset == Charset::Binary { t.max_len } else { 0 };
            ColumnCodec::Str { len_bytes: len_bytes(t.max_len), charset, pad_to }
        }
        ft::VARCHAR | ft::VAR_STRING => ColumnCodec::Str { len_bytes: len_bytes(t.max_len), charset, pad_to: 0 },
        ft::BLOB | ft::TINY_BLOB | ft::MEDIUM_BLOB | ft::LONG_BLOB => {
            ColumnCodec::Str { len_bytes: meta_u8.clamp(1, 4), charset, pad_to: 0 }
        }
        ft::JSON => ColumnCodec::Json { len_bytes: meta_u8.clamp(1, 4) },
        ft::GEOMETRY => ColumnCodec::Geometry { len_bytes: meta_u8.clamp(1, 4), point },
        ft::VECTOR => ColumnCodec::Vector { len_bytes: meta_u8.clamp(1, 4) },
        ft::NULL => ColumnCodec::Null,
        other => return Err(format!("binlog column type {other} is not supported")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_labels_unquote() {
        let c = CatalogColumn {
            name: "e".into(),
            data_type: "enum".into(),
            column_type: "enum('a','it''s','x,y')".into(),
            charset: Some("utf8mb4".into()),
            primary_key: false,
            nullable: true,
            precision: None,
            scale: None,
            fsp: None,
            octet_length: None,
        };
        assert_eq!(c.labels(), ["a", "it's", "x,y"]);
    }

    #[test]
    fn string_metadata_decodes_long_chars_and_enums() {
        let types = [ft::STRING, ft::STRING, ft::STRING];
        // CHAR(10) utf8mb4 (40 bytes), CHAR(100) utf8mb4 (400 bytes: 0x190, high bits folded into
        // the first byte), ENUM with 1-byte storage.
        let meta = [0xFE, 40, 0xEE, 0x90, 0xF7, 1];
        let map = TableMap {
            table_id: 1,
            schema: b"db",
            table: b"t",
            column_types: &types,
            column_meta: &meta,
            nullable: crate::binlog::Bitmap::read(&mut Cursor::new(&[0]), 3, "n").unwrap(),
            optional_meta: &[],
            body: &[],
        };
        let t = column_types(&map).unwrap();
        assert_eq!((t[0].real, t[0].max_len), (ft::STRING, 40));
        assert_eq!((t[1].real, t[1].max_len), (ft::STRING, 400));
        assert_eq!((t[2].real, t[2].max_len), (ft::ENUM, 1));
    }

    #[test]
    fn catalog_mismatch_is_an_error_not_a_guess() {
        let parsed = ParsedTableMap {
            id: TableId { schema: "db".into(), table: "t".into() },
            types: vec![ColumnType { code: ft::LONG, real: ft::LONG, meta: 0, max_len: 0 }],
            meta: OptionalMeta::default(),
            nullable: vec![false],
        };
        assert!(parsed.needs_catalog());
        let cat = |dt: &str| CatalogColumn {
            name: "id".into(),
            data_type: dt.into(),
            column_type: dt.into(),
            charset: None,
            primary_key: true,
            nullable: false,
            precision: None,
            scale: None,
            fsp: None,
            octet_length: None,
        };
        let info = parsed.build(Some(&[cat("int")]), &Collations::new()).unwrap();
        assert_eq!(info.schema.columns[0], ColumnSchema { name: "id".into(), key: true });
        let err = parsed.build(Some(&[cat("varchar")]), &Collations::new()).unwrap_err();
        assert!(matches!(err, SchemaError::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains("binlog_row_metadata = FULL"));
        let err = parsed.build(Some(&[cat("int"), cat("int")]), &Collations::new()).unwrap_err();
        assert!(matches!(err, SchemaError::Mismatch { .. }));
        assert!(matches!(parsed.build(None, &Collations::new()), Err(SchemaError::NoColumnNames { .. })));
    }
}
