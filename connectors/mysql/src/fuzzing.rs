//! Entry points for the fuzz targets of `fuzz/` and for the tests that replay their corpus
//! (`tests/fuzz_corpus.rs`): each takes arbitrary bytes, runs the decoders over them as the source
//! does, and must return (never panic, never allocate much more than the input, never hang) whatever
//! the bytes are. Not a stable API.
//!
//! The first byte of an input picks what the rest is fed to, so that one target covers related
//! decoders and its corpus keeps inputs for each.

use std::collections::HashMap;

use crate::binlog::event::{self, Body, ChecksumAlg, FormatDescription, HEADER_LEN, RowsKind, TransactionPayload};
use crate::binlog::rows::read_image;
use crate::binlog::{Cursor, decimal, json};
use crate::replication::{Greeting, Packet, PacketBuffer, parse_auth_switch, server_error};
use crate::schema::{CatalogColumn, Collations, ParsedTableMap, TableInfo};

/// How the event modes treat checksums.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Checksums {
    /// Events carry none (but a format description may say otherwise).
    Off,
    /// Verified as they are.
    AsGiven,
    /// Each event's last four bytes are replaced by its CRC32 before it is parsed, so that mutated
    /// events get past the check and reach the body decoders.
    Rewritten,
}

/// Target `binlog_event`. First byte:
/// - `0, 1, 2 mod 6`: a binlog stream: events one after another, each as long as its header says
///   (the last one takes what is left), with checksums off, verified, or rewritten; format
///   descriptions, table maps and rows events are handled as the source does (rows decoded with
///   the table map of their table id), transaction payloads decompressed and their events handled;
/// - `3 mod 6`: a binary JSON document; `4 mod 6`: a DECIMAL (precision byte, scale byte, bytes);
/// - `5 mod 6`: a transaction payload (compression byte: even is zstd, odd none; the uncompressed
///   size in 4 bytes, little-endian; the payload) decompressed and split into events.
pub fn binlog_event(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 6 {
        0 => events(rest, Checksums::Off),
        1 => events(rest, Checksums::AsGiven),
        2 => events(rest, Checksums::Rewritten),
        3 => {
            let mut out = String::new();
            let _ = json::to_text(rest, &mut out);
        }
        4 => {
            if let [precision, scale, bytes @ ..] = rest {
                let mut out = String::new();
                let _ = decimal::decode(bytes, *precision, *scale, &mut out);
            }
        }
        _ => {
            if rest.len() < 5 {
                return;
            }
            let tp = TransactionPayload {
                compression: if rest[0] % 2 == 0 { 0 } else { 255 },
                uncompressed_size: u64::from(u32::from_le_bytes([rest[1], rest[2], rest[3], rest[4]])),
                payload: &rest[5..],
            };
            let mut stream = Stream::new(Checksums::Off);
            stream.payload(&tp);
        }
    }
}

fn events(mut data: &[u8], checksums: Checksums) {
    let mut stream = Stream::new(checksums);
    while data.len() >= HEADER_LEN {
        let size = u32::from_le_bytes([data[9], data[10], data[11], data[12]]) as usize;
        let (bytes, rest) = data.split_at(size.clamp(HEADER_LEN, data.len()));
        data = rest;
        stream.event(bytes);
    }
}

/// What the source keeps between events, as far as decoding goes.
struct Stream {
    checksums: Checksums,
    fde: FormatDescription,
    /// Table id to its decoders.
    tables: HashMap<u64, TableInfo>,
    collations: Collations,
}

impl Stream {
    fn new(checksums: Checksums) -> Self {
        let collations = [(8, "latin1"), (33, "utf8mb3"), (45, "utf8mb4"), (63, "binary"), (255, "utf8mb4")]
            .into_iter()
            .map(|(id, cs)| (id, cs.to_owned()))
            .collect();
        Stream { checksums, fde: FormatDescription::initial(ChecksumAlg::Crc32), tables: HashMap::new(), collations }
    }

    fn event(&mut self, bytes: &[u8]) {
        let checksum = self.checksums != Checksums::Off && self.fde.checksum == ChecksumAlg::Crc32;
        let mut fixed;
        let mut bytes = bytes;
        if self.checksums == Checksums::Rewritten && bytes.len() >= HEADER_LEN + 4 {
            fixed = bytes.to_vec();
            let end = fixed.len() - 4;
            let crc = crc32fast::hash(&fixed[..end]);
            fixed[end..].copy_from_slice(&crc.to_le_bytes());
            bytes = &fixed;
        }
        let Ok(ev) = event::parse(bytes, &self.fde, checksum) else { return };
        match &ev.body {
            Body::TransactionPayload(tp) => self.payload(tp),
            _ => self.handle(ev),
        }
    }

    /// The events of a transaction payload, parsed with the stream's format description and no
    /// checksums, as the source does.
    fn payload(&mut self, tp: &TransactionPayload<'_>) {
        let Ok(data) = event::decompress_payload(tp) else { return };
        let fde = self.fde.clone();
        for bytes in event::payload_events(&data) {
            let Ok(bytes) = bytes else { return };
            if let Ok(ev) = event::parse(bytes, &fde, false) {
                self.handle(ev);
            }
        }
    }

    fn handle(&mut self, ev: event::Event<'_>) {
        match &ev.body {
            Body::FormatDescription(f) => self.fde = f.clone(),
            Body::Query(q) => {
                let _ = q.statement();
            }
            Body::TableMap(map) => {
                let Ok(parsed) = ParsedTableMap::parse(map) else { return };
                // Without FULL metadata the source asks information_schema; a catalog that agrees
                // with the binlog's types stands in for it.
                let catalog = parsed.needs_catalog().then(|| catalog(&parsed));
                if let Ok(info) = parsed.build(catalog.as_deref(), &self.collations) {
                    self.tables.insert(map.table_id, info);
                }
            }
            Body::Rows(rows) => {
                let Some(info) = self.tables.get(&rows.table_id) else { return };
                let columns = &info.columns;
                if rows.column_count != columns.len() {
                    return;
                }
                // The source's loop: images until the data is used up.
                let mut c = Cursor::new(&rows.data);
                while !c.is_empty() {
                    let mut first = Vec::with_capacity(columns.len());
                    if read_image(&mut c, columns, &rows.present, &mut first).is_err() {
                        return;
                    }
                    if rows.kind == RowsKind::Update {
                        let mut after = Vec::with_capacity(columns.len());
                        let present_after = rows.present_after.as_ref().unwrap_or(&rows.present);
                        if read_image(&mut c, columns, present_after, &mut after).is_err() {
                            return;
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// Columns as information_schema would describe the table map's.
fn catalog(parsed: &ParsedTableMap) -> Vec<CatalogColumn> {
    parsed
        .types
        .iter()
        .enumerate()
        .map(|(i, t)| CatalogColumn {
            name: format!("c{i}"),
            data_type: t.name().to_owned(),
            column_type: format!("{}('a','b''c')", t.name()),
            charset: Some("utf8mb4".into()),
            primary_key: i == 0,
            nullable: true,
            precision: None,
            scale: None,
            fsp: None,
            octet_length: None,
        })
        .collect()
}

/// Target `replication_packets`, MySQL half. First byte: how many packets are read as the
/// handshake reads them (greeting, then authentication replies), the rest as the binlog stream
/// reads them; second byte: the size of the reads, as `fill` would get them.
pub fn replication_packets(data: &[u8]) {
    let [control, read_size, rest @ ..] = data else { return };
    let mut input = rest;
    let handshake = usize::from(control % 4);
    let read_size = usize::from(*read_size).max(1);
    let mut packets = PacketBuffer::new();
    let mut handled = 0;
    while !input.is_empty() {
        let spare = packets.spare();
        let n = spare.len().min(read_size).min(input.len());
        spare[..n].copy_from_slice(&input[..n]);
        packets.filled(n);
        input = &input[n..];
        loop {
            if handled < handshake {
                match packets.next_owned() {
                    Ok(Some((_, packet))) => handshake_packet(handled, &packet),
                    Ok(None) => break,
                    Err(_) => return,
                }
                handled += 1;
            } else {
                match packets.next_event() {
                    Ok(Some(Packet::Event(_) | Packet::End)) => {}
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
        }
        packets.trim();
    }
}

/// A packet of the handshake: the greeting first, then replies to the authentication.
fn handshake_packet(index: usize, packet: &[u8]) {
    match packet.first() {
        Some(0xFF) => {
            let _ = server_error(packet, "fuzzing");
        }
        _ if index == 0 => {
            let _ = Greeting::parse(packet);
        }
        Some(0xFE) => {
            let _ = parse_auth_switch(packet);
        }
        _ => {}
    }
}
