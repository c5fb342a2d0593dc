#!/usr/bin/env python3
"""Writes starting inputs for the fuzz targets into fuzz/seeds/<target>/ (not committed: the
minimized corpus under fuzz/corpus/ is). Built from the connectors' captured test data (the golden
binlogs, the captured pgoutput stream) and from small hand-made messages, in the input layouts that
the connectors' `fuzzing` modules document.

    python3 fuzz/seeds.py
"""

import hashlib
import pathlib
import struct
import zlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "fuzz" / "seeds"


def write(target, data):
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / hashlib.sha1(data).hexdigest()).write_bytes(data)


# ---------------------------------------------------------------- binlog_event

def binlog_events(path):
    data = path.read_bytes()[4:]  # after the magic
    events = []
    while data:
        size = struct.unpack_from("<I", data, 9)[0]
        events.append(data[:size])
        data = data[size:]
    return events


def lenenc(b, at):
    first = b[at]
    if first < 0xFB:
        return first, at + 1
    n = {0xFC: 2, 0xFD: 3, 0xFE: 8}[first]
    return int.from_bytes(b[at + 1:at + 1 + n], "little"), at + 1 + n


def payload_fields(body):
    """(compression, uncompressed size, payload) of a TRANSACTION_PAYLOAD body."""
    at, fields = 0, {}
    while True:
        kind, at = lenenc(body, at)
        if kind == 0:
            break
        length, at = lenenc(body, at)
        value, _ = lenenc(body, at)
        fields[kind] = value
        at += length
    return fields.get(2, 0), fields.get(3, 0), body[at:]


def binlog_seeds():
    for name in ["mariadb-10.11", "mysql-9.7"]:
        events = binlog_events(ROOT / "connectors/mysql/tests/data" / f"{name}.binlog")
        fde = next(e for e in events if e[4] == 15)
        whole = b"".join(events)
        write("binlog_event", b"\x01" + whole)
        last_map = b""
        for e in events:
            kind = e[4]
            if kind == 19:
                last_map = e
            context = fde + (last_map if kind in (23, 24, 25, 30, 31, 32, 166, 167, 168, 169, 170, 171) else b"")
            write("binlog_event", b"\x01" + context + e)  # checksums verified
            write("binlog_event", b"\x02" + context + e)  # checksums rewritten
            if kind == 40:
                compression, size, payload = payload_fields(e[19:-4])
                write("binlog_event", b"\x05" + bytes([compression % 2]) + struct.pack("<I", size) + payload)
    # Binary JSON: {"k": [1, "ab", true]}, a large array, a double, an opaque DECIMAL.
    arr = bytes([3, 0]) + struct.pack("<H", 15) + bytes([5]) + struct.pack("<H", 1) \
        + bytes([0x0C]) + struct.pack("<H", 13) + bytes([4]) + struct.pack("<H", 1) + bytes([2]) + b"ab"
    obj = struct.pack("<HH", 1, 12 + len(arr)) + struct.pack("<HH", 11, 1) + bytes([2]) \
        + struct.pack("<H", 12) + b"k" + arr
    write("binlog_event", b"\x03" + bytes([0]) + obj)
    write("binlog_event", b"\x03" + bytes([0x0B]) + struct.pack("<d", 1.5e300))
    write("binlog_event", b"\x03" + bytes([0x0F, 246, 4, 10, 2, 0x81, 0x0D]))
    write("binlog_event", b"\x03" + bytes([3]) + struct.pack("<II", 1, 13) + bytes([4]) + struct.pack("<I", 1))
    # DECIMAL(10,2) 1234.56 and -1234.56.
    write("binlog_event", b"\x04" + bytes([10, 2, 0x80, 0x00, 0x04, 0xD2, 0x38]))
    write("binlog_event", b"\x04" + bytes([10, 2, 0x7F, 0xFF, 0xFB, 0x2D, 0xC7]))
    # A MariaDB compressed query event built by hand: body = post-header, schema, zlib text.
    text = b"INSERT INTO t VALUES (1)" * 4
    z = zlib.compress(text)
    body = struct.pack("<IIBHH", 7, 0, 2, 0, 0) + b"db\0" + bytes([0x82]) + struct.pack(">H", len(text)) + z
    header = struct.pack("<IBIIIH", 0, 165, 1, 19 + len(body), 0, 0)
    write("binlog_event", b"\x00" + header + body)


# ---------------------------------------------------------------- pgoutput

def pg_messages():
    lines = (ROOT / "connectors/postgres/tests/data/pgoutput-v1.txt").read_text().split("\n")
    return [bytes.fromhex(l.split(" ", 1)[1]) for l in lines if l.strip()]


def framed(messages):
    return b"".join(struct.pack(">H", len(m)) + m for m in messages)


# (selector into fuzzing::TYPES, sample text)
VALUES = [
    (0, "t"), (1, "-32768"), (2, "42"), (3, "9223372036854775807"), (4, "1.5"), (5, "-Infinity"),
    (6, "12345.678"), (7, "NaN"), (8, "$1,234.50"), (9, "hello"), (10, '{"a": 1}'),
    (11, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), (12, "\\x00ff"), (13, "2024-02-29"), (13, "0044-03-15 BC"),
    (14, "24:00:00"), (15, "08:30:00.123"), (16, "08:30:00.5+05:30"), (17, "2024-01-15 10:30:00.123456"),
    (18, "infinity"), (19, "2024-01-15 10:30:00+02"), (20, "1999-12-31 23:59:59.5-03:30:15 BC"),
    (21, "P1Y2M3DT4H5M6.5S"), (22, "1"), (23, "10110001"), (24, "101"), (25, "{1,2,NULL}"),
    (26, '{"a b","x\\"y",NULL}'), (27, "{\\x00,\\xff}"), (28, "[1:2]={2024-01-01,infinity}"),
    (29, "{{\"2024-01-01 00:00:00+00\"}}"), (30, "{P1D,PT1S}"), (31, "{1.5,NaN}"), (32, "{1,0}"),
]


def pg_binary_copy(rows):
    out = b"PGCOPY\n\xff\r\n\0" + struct.pack(">ii", 0, 0)
    for row in rows:
        out += struct.pack(">h", len(row))
        for v in row:
            out += struct.pack(">i", -1) if v is None else struct.pack(">i", len(v)) + v
    return out + struct.pack(">h", -1)


def pgoutput_seeds():
    msgs = pg_messages()
    write("pgoutput", b"\x00" + framed(msgs))
    relations = []
    for m in msgs:
        if m[:1] in (b"R", b"Y"):
            relations.append(m)
        write("pgoutput", b"\x00" + framed(relations + [m]))
    for selector, text in VALUES:
        write("pgoutput", b"\x03" + bytes([selector]) + text.encode())
    # COPY text: (int4, text, numeric, timestamptz, int4[]).
    lines = b"1\thello\t12.50\t2024-01-15 10:30:00+00\t{1,2}\n2\t\\N\t-1\t\\N\t{}\n3\ta\\tb\\\\c\\101\t0\tinfinity\t\\N\n"
    write("pgoutput", b"\x01" + bytes([4, 2, 9, 6, 19, 25, 16]) + lines)
    write("pgoutput", b"\x01" + bytes([2, 13, 21, 255]) + b"2024-01-01\tP1D\n0001-01-01 BC\t-PT1S\n")
    # COPY binary: (int8, text, uuid, date, numeric).
    numeric = struct.pack(">hhHH", 2, 0, 0, 2) + struct.pack(">HH", 12, 5000)
    rows = [
        [struct.pack(">q", 1), b"one", bytes(range(16)), struct.pack(">i", 8000), numeric],
        [struct.pack(">q", -2), None, None, struct.pack(">i", -2**31), None],
    ]
    write("pgoutput", b"\x02" + bytes([4, 3, 9, 11, 13, 6, 64]) + pg_binary_copy(rows))
    write("pgoutput", b"\x02" + bytes([0, 3, 255]) + pg_binary_copy([[struct.pack(">q", 0)]]))


# ---------------------------------------------------------------- replication_packets

def pg_frame(tag, body):
    return tag + struct.pack(">I", len(body) + 4) + body


def my_packet(seq, payload):
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload


def replication_seeds():
    msgs = pg_messages()
    xlog = [pg_frame(b"d", b"w" + struct.pack(">QQQ", 0x1B3485A0, 0x1B3485A0, 0) + m) for m in msgs[:6]]
    keepalive = pg_frame(b"d", b"k" + struct.pack(">QQB", 0x1B3485A0, 0, 1))
    error = pg_frame(b"E", b"SERROR\0C42501\0Mpermission denied\0Dno\0Hgrant it\0\0")
    notice = pg_frame(b"N", b"SNOTICE\0C00000\0Mhello\0\0")
    auth = [
        pg_frame(b"R", struct.pack(">i", 10) + b"SCRAM-SHA-256\0\0"),
        pg_frame(b"R", struct.pack(">i", 5) + b"salt"),
        pg_frame(b"R", struct.pack(">i", 11) + b"r=abc,s=c2FsdA==,i=4096"),
        pg_frame(b"R", struct.pack(">i", 0)),
    ]
    startup = auth + [pg_frame(b"S", b"client_encoding\0UTF8\0"), pg_frame(b"K", struct.pack(">ii", 1, 2)),
                      pg_frame(b"Z", b"I")]
    row = pg_frame(b"T", b"") + pg_frame(b"D", struct.pack(">h", 3) + struct.pack(">i", 3) + b"abc"
                                         + struct.pack(">i", -1) + struct.pack(">i", 9) + b"0/1B3485A") \
        + pg_frame(b"C", b"SELECT 1\0") + pg_frame(b"Z", b"I")
    stream = pg_frame(b"W", b"\0\0\0") + b"".join(xlog) + keepalive + notice + error + pg_frame(b"c", b"")
    for read_size in (1, 7, 255):
        write("replication_packets", bytes([read_size]) + b"".join(startup) + row + stream)
    write("replication_packets", bytes([64]) + b"".join(xlog))

    # MySQL: greeting (as in replication::tests), auth switch, caching_sha2 fast auth, OK, then events.
    caps = 0x200 | 0x8000 | 0x80000
    greeting = bytes([10]) + b"9.7.4\0" + struct.pack("<I", 42) + b"abcdefgh\0" + struct.pack("<H", caps & 0xFFFF) \
        + bytes([255]) + b"\x02\0" + struct.pack("<H", caps >> 16) + bytes([21]) + bytes(10) \
        + b"ijklmnopqrst\0" + b"caching_sha2_password\0"
    switch = b"\xfe" + b"mysql_native_password\0" + b"01234567890123456789\0"
    ok = b"\x00\x00\x00\x02\x00\x00\x00"
    err = b"\xff" + struct.pack("<H", 1045) + b"#28000Access denied"
    events = binlog_events(ROOT / "connectors/mysql/tests/data/mysql-9.7.binlog")
    stream = b"".join(my_packet(i + 1, b"\x00" + e) for i, e in enumerate(events[:8]))
    eof = my_packet(9, b"\xfe\x00\x00\x02\x00")
    handshake = my_packet(0, greeting) + my_packet(2, switch) + my_packet(4, b"\x01\x03") + my_packet(5, ok)
    write("replication_packets", bytes([3, 255]) + handshake + stream + eof)
    write("replication_packets", bytes([1, 13]) + my_packet(0, greeting) + stream + my_packet(9, err))
    write("replication_packets", bytes([2, 1]) + my_packet(0, err) + my_packet(1, err))
    # A payload split over two packets (16 MiB - 1, then the rest) would not fit the fuzzer's input
    # size; the replay tests cover that path with their own inputs.


binlog_seeds()
pgoutput_seeds()
replication_seeds()
for target in sorted(OUT.iterdir()):
    print(target.name, len(list(target.iterdir())))
