//! Decoder for the `pgoutput` logical replication protocol, version 1. No I/O.
//!
//! Each XLogData payload holds exactly one message. Column values stay as the server sent them
//! (text format, zero-copy slices of the frame); [`crate::types`] turns them into values.
//! Reference: PostgreSQL's "Logical Replication Message Formats".

use bytes::{Buf, Bytes};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed pgoutput message ({what})")]
pub struct DecodeError {
    pub what: String,
}

fn err(what: impl Into<String>) -> DecodeError {
    DecodeError { what: what.into() }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    Null,
    /// Unchanged TOASTed value: the server did not send it.
    Unchanged,
    Text(Bytes),
    Binary(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity (the primary key under `REPLICA IDENTITY DEFAULT`).
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

/// The old row image of an update or delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// Only the replica identity columns (others are `Null`).
    Key(Vec<TupleValue>),
    /// The full old row (`REPLICA IDENTITY FULL`).
    Full(Vec<TupleValue>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutput {
    Begin { final_lsn: u64, commit_ts: i64, xid: u32 },
    Commit { commit_lsn: u64, end_lsn: u64, commit_ts: i64 },
    Origin { lsn: u64, name: String },
    Relation(Relation),
    Type { oid: u32, namespace: String, name: String },
    Insert { rel: u32, new: Vec<TupleValue> },
    Update { rel: u32, old: Option<OldTuple>, new: Vec<TupleValue> },
    Delete { rel: u32, old: OldTuple },
    Truncate { rels: Vec<u32>, cascade: bool, restart_identity: bool },
    Message { transactional: bool, lsn: u64, prefix: String, content: Bytes },
}

/// Decodes one pgoutput message.
pub fn decode(mut buf: Bytes) -> Result<PgOutput, DecodeError> {
    let tag = get_u8(&mut buf)?;
    let msg = match tag {
        b'B' => {
            PgOutput::Begin { final_lsn: get_u64(&mut buf)?, commit_ts: get_i64(&mut buf)?, xid: get_u32(&mut buf)? }
        }
        b'C' => {
            let _flags = get_u8(&mut buf)?;
            PgOutput::Commit {
                commit_lsn: get_u64(&mut buf)?,
                end_lsn: get_u64(&mut buf)?,
                commit_ts: get_i64(&mut buf)?,
            }
        }
        b'O' => PgOutput::Origin { lsn: get_u64(&mut buf)?, name: get_cstr(&mut buf)? },
        b'R' => {
            let id = get_u32(&mut buf)?;
            let namespace = get_cstr(&mut buf)?;
            let name = get_cstr(&mut buf)?;
            let replica_identity = get_u8(&mut buf)?;
            let n = get_i16(&mut buf)?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let flags = get_u8(&mut buf)?;
                columns.push(RelationColumn {
                    key: flags & 1 == 1,
                    name: get_cstr(&mut buf)?,
                    type_oid: get_u32(&mut buf)?,
                    type_modifier: get_i32(&mut buf)?,
                });
            }
            PgOutput::Relation(Relation { id, namespace, name, replica_identity, columns })
        }
        b'Y' => PgOutput::Type { oid: get_u32(&mut buf)?, namespace: get_cstr(&mut buf)?, name: get_cstr(&mut buf)? },
        b'I' => {
            let rel = get_u32(&mut buf)?;
            expect(&mut buf, b'N')?;
            PgOutput::Insert { rel, new: get_tuple(&mut buf)? }
        }
        b'U' => {
            let rel = get_u32(&mut buf)?;
            let mut old = None;
            let mut kind = get_u8(&mut buf)?;
            if kind == b'K' || kind == b'O' {
                let tuple = get_tuple(&mut buf)?;
                old = Some(if kind == b'K' { OldTuple::Key(tuple) } else { OldTuple::Full(tuple) });
                kind = get_u8(&mut buf)?;
            }
            if kind != b'N' {
                return Err(err(format!("update: expected 'N', found {:?}", kind as char)));
            }
            PgOutput::Update { rel, old, new: get_tuple(&mut buf)? }
        }
        b'D' => {
            let rel = get_u32(&mut buf)?;
            let kind = get_u8(&mut buf)?;
            let tuple = get_tuple(&mut buf)?;
            let old = match kind {
                b'K' => OldTuple::Key(tuple),
                b'O' => OldTuple::Full(tuple),
                other => return Err(err(format!("delete: expected 'K' or 'O', found {:?}", other as char))),
            };
            PgOutput::Delete { rel, old }
        }
        b'T' => {
            let n = get_u32(&mut buf)?;
            let options = get_u8(&mut buf)?;
            let mut rels = Vec::with_capacity(n.min(1 << 16) as usize);
            for _ in 0..n {
                rels.push(get_u32(&mut buf)?);
            }
            PgOutput::Truncate { rels, cascade: options & 1 != 0, restart_identity: options & 2 != 0 }
        }
        b'M' => {
            let flags = get_u8(&mut buf)?;
            let lsn = get_u64(&mut buf)?;
            let prefix = get_cstr(&mut buf)?;
            let len = get_u32(&mut buf)? as usize;
            if buf.remaining() < len {
                return Err(err("message content shorter than its length"));
            }
            PgOutput::Message { transactional: flags & 1 != 0, lsn, prefix, content: buf.split_to(len) }
        }
        other => return Err(err(format!("unknown message type {:?}", other as char))),
    };
    Ok(msg)
}

fn get_tuple(buf: &mut Bytes) -> Result<Vec<TupleValue>, DecodeError> {
    let n = get_i16(buf)?;
    let mut values = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let value = match get_u8(buf)? {
            b'n' => TupleValue::Null,
            b'u' => TupleValue::Unchanged,
            kind @ (b't' | b'b') => {
                let len = get_i32(buf)?;
                if len < 0 || buf.remaining() < len as usize {
                    return Err(err("column value shorter than its length"));
                }
                let data = buf.split_to(len as usize);
                if kind == b't' { TupleValue::Text(data) } else { TupleValue::Binary(data) }
            }
            other => return Err(err(format!("unknown tuple value kind {:?}", other as char))),
        };
        values.push(value);
    }
    Ok(values)
}

fn expect(buf: &mut Bytes, tag: u8) -> Result<(), DecodeError> {
    let found = get_u8(buf)?;
    if found == tag { Ok(()) } else { Err(err(format!("expected {:?}, found {:?}", tag as char, found as char))) }
}

fn get_cstr(buf: &mut Bytes) -> Result<String, DecodeError> {
    let end = buf.iter().position(|&b| b == 0).ok_or_else(|| err("unterminated string"))?;
    let s = String::from_utf8(buf.split_to(end).to_vec()).map_err(|_| err("string is not UTF-8"))?;
    buf.advance(1);
    Ok(s)
}

macro_rules! getter {
    ($name:ident, $ty:ty, $get:ident) => {
        fn $name(buf: &mut Bytes) -> Result<$ty, DecodeError> {
            if buf.remaining() < size_of::<$ty>() {
                return Err(err(concat!("truncated ", stringify!($ty))));
            }
            Ok(buf.$get())
        }
    };
}
getter!(get_u8, u8, get_u8);
getter!(get_i16, i16, get_i16);
getter!(get_i32, i32, get_i32);
getter!(get_u32, u32, get_u32);
getter!(get_i64, i64, get_i64);
getter!(get_u64, u64, get_u64);

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames assembled byte by byte from the protocol documentation (the end-to-end tests decode
    /// what a real server sends), for `t (id int primary key, v text)`.
    fn hex(s: &str) -> Bytes {
        let s: String = s.split_whitespace().collect();
        Bytes::from((0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect::<Vec<_>>())
    }

    #[test]
    fn decodes_begin_and_commit() {
        let begin = hex("42 0000000001A2B3C8 0002B1F2C3D4E5F6 000002E1");
        assert_eq!(
            decode(begin).unwrap(),
            PgOutput::Begin { final_lsn: 0x1A2B3C8, commit_ts: 0x0002_B1F2_C3D4_E5F6, xid: 737 }
        );
        let commit = hex("43 00 0000000001A2B3C8 0000000001A2B3F8 0002B1F2C3D4E5F6");
        assert_eq!(
            decode(commit).unwrap(),
            PgOutput::Commit { commit_lsn: 0x1A2B3C8, end_lsn: 0x1A2B3F8, commit_ts: 0x0002_B1F2_C3D4_E5F6 }
        );
    }

    #[test]
    fn decodes_relation_insert_update_delete() {
        // R: rel 16385 "public"."t", identity 'd', 2 columns: id int4 (key), v text.
        let rel = hex("52 00004001 7075626c696300 7400 64 0002 01 696400 00000017 ffffffff 00 7600 00000019 ffffffff");
        let PgOutput::Relation(r) = decode(rel).unwrap() else { panic!("not a relation") };
        assert_eq!((r.id, r.namespace.as_str(), r.name.as_str()), (16385, "public", "t"));
        assert_eq!(r.columns.len(), 2);
        assert!(r.columns[0].key && !r.columns[1].key);
        assert_eq!((r.columns[0].type_oid, r.columns[1].type_oid), (23, 25));

        let insert = hex("49 00004001 4e 0002 74 00000001 31 74 00000001 61");
        assert_eq!(
            decode(insert).unwrap(),
            PgOutput::Insert { rel: 16385, new: vec![TupleValue::Text("1".into()), TupleValue::Text("a".into())] }
        );
        // Update changing the key, with an unchanged TOAST column in the new tuple.
        let update = hex("55 00004001 4b 0002 74 00000001 31 6e 4e 0002 74 00000001 32 75");
        assert_eq!(
            decode(update).unwrap(),
            PgOutput::Update {
                rel: 16385,
                old: Some(OldTuple::Key(vec![TupleValue::Text("1".into()), TupleValue::Null])),
                new: vec![TupleValue::Text("2".into()), TupleValue::Unchanged],
            }
        );
        let delete = hex("44 00004001 4b 0002 74 00000001 32 6e");
        assert_eq!(
            decode(delete).unwrap(),
            PgOutput::Delete { rel: 16385, old: OldTuple::Key(vec![TupleValue::Text("2".into()), TupleValue::Null]) }
        );
    }

    #[test]
    fn decodes_truncate_message_origin_type() {
        assert_eq!(
            decode(hex("54 00000002 01 00004001 00004002")).unwrap(),
            PgOutput::Truncate { rels: vec![16385, 16386], cascade: true, restart_identity: false }
        );
        assert_eq!(
            decode(hex("4d 01 0000000000000010 6f757400 00000002 7b7d")).unwrap(),
            PgOutput::Message {
                transactional: true,
                lsn: 16,
                prefix: "out".into(),
                content: Bytes::from_static(b"{}")
            }
        );
        assert_eq!(
            decode(hex("4f 0000000000000020 6e6f646531 00")).unwrap(),
            PgOutput::Origin { lsn: 32, name: "node1".into() }
        );
        assert_eq!(
            decode(hex("59 00004010 7075626c696300 6d6f6f6400")).unwrap(),
            PgOutput::Type { oid: 16400, namespace: "public".into(), name: "mood".into() }
        );
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let full = hex("49 00004001 4e 0002 74 00000001 31 74 00000001 61");
        for len in 0..full.len() {
            assert!(decode(full.slice(..len)).is_err(), "prefix of {len} bytes must fail cleanly");
        }
        assert!(decode(hex("5a")).is_err());
    }
}
