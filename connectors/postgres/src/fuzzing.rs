//! Entry points for the fuzz targets of `fuzz/` and for the tests that replay their corpus
//! (`tests/fuzz_corpus.rs`): each takes arbitrary bytes, runs the decoders over them as the source
//! does, and must return (never panic, never allocate much more than the input, never hang) whatever
//! the bytes are. Not a stable API.
//!
//! The first byte of an input picks what the rest is fed to, so that one target covers related
//! decoders and its corpus keeps inputs for each.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use tailgate_core::Value;

use crate::pgoutput::{self, OldTuple, PgOutput, TupleValue};
use crate::replication::{self, AuthRequest, ErrorFields};
use crate::snapshot;
use crate::types::{BinaryKind, ColumnKind};

/// Column types the COPY and value modes pick from (oid, type modifier): every [`ColumnKind`] and
/// [`BinaryKind`], with and without precisions.
const TYPES: &[(u32, i32)] = &[
    (16, -1),
    (21, -1),
    (23, -1),
    (20, -1),
    (700, -1),
    (701, -1),
    (1700, -1),
    (1700, (10 << 16 | 2) + 4),
    (790, -1),
    (25, -1),
    (3802, -1),
    (2950, -1),
    (17, -1),
    (1082, -1),
    (1083, -1),
    (1083, 3),
    (1266, -1),
    (1114, -1),
    (1114, 3),
    (1184, -1),
    (1184, 0),
    (1186, -1),
    (1560, 1),
    (1560, 8),
    (1562, -1),
    (1007, -1),
    (1009, -1),
    (1001, -1),
    (1182, -1),
    (1185, -1),
    (1187, -1),
    (1231, -1),
    (1561, -1),
];

fn column_kind(selector: u8) -> (u32, ColumnKind) {
    let (oid, typmod) = TYPES[usize::from(selector) % TYPES.len()];
    (oid, ColumnKind::of(oid, typmod))
}

/// Target `pgoutput`. First byte:
/// - `0 mod 4`: a replication stream: pgoutput messages, each preceded by its length (2 bytes,
///   big-endian), decoded and their tuples converted with the kinds of their relation's columns;
/// - `1 mod 4`: COPY text output; `2 mod 4`: COPY binary output: a column count byte, one type
///   selector byte per column, a chunk length byte, then the data cut into chunks of that length;
/// - `3 mod 4`: one value: a type selector byte, then the value as text and as binary.
pub fn pgoutput(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        0 => stream(rest),
        1 => copy(rest, false),
        2 => copy(rest, true),
        _ => value(rest),
    }
}

fn stream(mut data: &[u8]) {
    // Relation id to the kinds of its columns, as the source's stream state keeps them.
    let mut relations: HashMap<u32, Vec<ColumnKind>> = HashMap::new();
    while data.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([data[0], data[1]])).min(data.len() - 2);
        let message = Bytes::copy_from_slice(&data[2..2 + len]);
        data = &data[2 + len..];
        let Ok(msg) = pgoutput::decode(message) else { continue };
        match msg {
            PgOutput::Relation(rel) => {
                let kinds = rel.columns.iter().map(|c| ColumnKind::of(c.type_oid, c.type_modifier)).collect();
                relations.insert(rel.id, kinds);
            }
            PgOutput::Insert { rel, new } => row(&relations, rel, &new),
            PgOutput::Update { rel, old, new } => {
                if let Some(OldTuple::Key(t) | OldTuple::Full(t)) = &old {
                    row(&relations, rel, t);
                }
                row(&relations, rel, &new);
            }
            PgOutput::Delete { rel, old: OldTuple::Key(t) | OldTuple::Full(t) } => row(&relations, rel, &t),
            _ => {}
        }
    }
}

/// Converts a tuple as the source's `TableState::row` does.
fn row(relations: &HashMap<u32, Vec<ColumnKind>>, rel: u32, tuple: &[TupleValue]) {
    let Some(kinds) = relations.get(&rel) else { return };
    for (i, kind) in kinds.iter().enumerate() {
        if let Some(TupleValue::Text(b)) = tuple.get(i)
            && let Ok(text) = std::str::from_utf8(b)
        {
            let _ = kind.convert(text);
        }
    }
}

fn copy(data: &[u8], binary: bool) {
    let Some((&count, rest)) = data.split_first() else { return };
    let count = usize::from(count % 8) + 1;
    if rest.len() < count + 1 {
        return;
    }
    let (selectors, rest) = rest.split_at(count);
    let chunk = usize::from(rest[0]).max(1);
    let rest = &rest[1..];
    let typed: Vec<(u32, ColumnKind)> = selectors.iter().map(|&s| column_kind(s)).collect();
    let kinds: Vec<ColumnKind> = typed.iter().map(|(_, k)| k.clone()).collect();
    let binary_kinds: Option<Vec<BinaryKind>> = if binary {
        match typed.iter().map(|(oid, kind)| BinaryKind::of(*oid, kind)).collect() {
            Some(b) => Some(b),
            None => return,
        }
    } else {
        None
    };
    let _ = snapshot::decode_copy(&kinds, binary_kinds.as_deref(), rest.chunks(chunk), |_, _| {});
}

fn value(data: &[u8]) {
    let Some((&selector, raw)) = data.split_first() else { return };
    let (oid, kind) = column_kind(selector);
    if let Ok(text) = std::str::from_utf8(raw) {
        let _: Option<Value> = kind.convert(text);
    }
    if let Some(binary) = BinaryKind::of(oid, &kind) {
        let _ = binary.convert(raw);
    }
}

/// Target `replication_packets`, PostgreSQL half: the bytes as the server's side of a replication
/// connection, split into frames (first byte: the size of the reads, as `fill` would get them),
/// each frame read as the connection reads it in any of its states (authentication, query
/// results, errors and notices, the CopyBoth stream).
pub fn replication_packets(data: &[u8]) {
    let Some((&read_size, rest)) = data.split_first() else { return };
    let mut inbuf = BytesMut::new();
    for chunk in rest.chunks(usize::from(read_size).max(1)) {
        inbuf.extend_from_slice(chunk);
        loop {
            let frame = match replication::split_frame(&mut inbuf) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => return,
            };
            match frame.tag {
                b'R' => {
                    let _ = AuthRequest::parse(frame.body);
                }
                b'E' | b'N' => {
                    let _ = ErrorFields::parse(&frame.body).into_error("fuzzing");
                }
                b'D' => {
                    let _ = replication::parse_data_row(frame.body);
                }
                _ => {
                    if let Ok(Some(replication::ReplicationMessage::XLogData { data, .. })) =
                        replication::stream_message(frame)
                    {
                        let _ = pgoutput::decode(data);
                    }
                }
            }
        }
    }
}
