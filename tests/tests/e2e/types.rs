//! Every row of docs/types.md, against the real server.

use std::time::Duration;

use serde_json::{Value, json};
use tailgate_e2e::*;

async fn capture(test: &str, extra: &str, setup: &str, insert: &str) -> Value {
    let (rows, _) = capture_rows(test, extra, setup, insert, 1).await;
    rows[0].clone()
}

/// Streams the `n` rows `insert` writes, then reads them again with an `initial_only` snapshot
/// (COPY): every row must render exactly as streamed. Returns the rows' `after` images ordered by
/// `id`, and the snapshot's log.
async fn capture_rows(test: &str, extra: &str, setup: &str, insert: &str, n: usize) -> (Vec<Value>, String) {
    let db = TestDb::new(test).await;
    db.exec(setup).await;
    let dir = scratch(test);
    let name = format!("tg_{test}");
    let mut tg = Tailgate::start(&dir, &config(&name, &db.url(), &dir, &stdout_sink(), extra));
    tg.wait_streaming().await;
    db.exec(insert).await;
    let records = wait_stdout(&mut tg, n, Duration::from_secs(20)).await;
    tg.stop().await;
    let snap_dir = scratch(&format!("{test}_snap"));
    let snap_config = config(&format!("{name}_snap"), &db.url(), &snap_dir, &stdout_sink(), extra)
        .replace("status_interval_ms = 200", "status_interval_ms = 200\nsnapshot = \"initial_only\"");
    let mut snap = Tailgate::start(&snap_dir, &snap_config);
    assert!(snap.wait_exit(Duration::from_secs(60)).await.success(), "{}", snap.log_text());
    let read = stdout_records(&snap.stdout);
    assert_eq!(read.len(), n, "{}", snap.log_text());
    let by_id = |records: &[Value]| {
        let mut rows: Vec<Value> = records.iter().map(|r| r["value"]["after"].clone()).collect();
        rows.sort_by_key(|r| r["id"].as_i64());
        rows
    };
    let (streamed, snapshot) = (by_id(&records), by_id(&read));
    assert!(read.iter().all(|r| r["value"]["op"] == "r"));
    for (s, r) in streamed.iter().zip(&snapshot) {
        assert_eq!(r, s, "snapshot and stream disagree");
    }
    db.drop().await;
    (streamed, snap.log_text())
}

/// Tables whose every column has a binary reader are snapshotted with COPY's binary format: each
/// value must convert exactly as its streamed text does.
#[tokio::test(flavor = "multi_thread")]
async fn binary_snapshot_values_agree_with_the_stream() {
    let (rows, log) = capture_rows(
        "binsnap",
        "",
        "CREATE TABLE t (id bigint PRIMARY KEY, b bool, i2 int2, i4 int4, f4 float4, f8 float8, n numeric, n2 numeric(12,3),
                         s text, v varchar(20), c char(5), j json, jb jsonb, u uuid, by bytea, d date, ts timestamp,
                         ts3 timestamp(3), tz timestamptz, tz0 timestamptz(0))",
        "INSERT INTO t VALUES
           (1, true, -32768, 2147483647, 1.1, 0.1, 12345678901234567890.0001, -0.5, 'plain', 'v', 'ab', '{\"a\": [1, 2]}',
            '{\"b\": {\"c\": null}}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\x00ff5c', '2026-11-24',
            '2026-11-24 12:34:56.789012', '2026-11-24 12:34:56.7894', '2026-11-24 12:34:56.5+02', '2026-11-24 12:34:56+00'),
           (2, false, 0, -1, 'NaN', '-Infinity', 'NaN', 0, 'tab' || chr(9) || 'nl' || chr(10) || 'é ☃ \\N', '', '', 'null',
            '[]', '00000000-0000-0000-0000-000000000000', '', '0044-03-15 BC', '0044-03-15 12:00:00 BC',
            'infinity', '-infinity', '1969-12-31 23:59:59.999999+00'),
           (3, NULL, NULL, NULL, 3.4028235e38, 1e-300, 0.000012, 999999999.999, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
            'infinity', '1999-12-31 23:59:59.999999', NULL, NULL, NULL),
           (4, true, 1, 1, -0, 5e-324, -1e-20, -0.001, repeat('x', 3000), 'x', 'xxxxx', '1', '1.5e3', NULL, '\\x', '2000-01-01',
            '2000-01-01 00:00:00', '1970-01-01 00:00:00.001', '2000-01-01 00:00:00+00', '1900-06-30 23:59:59.5-03:30')",
        4,
    )
    .await;
    assert!(log.contains("format=\"binary\""), "read in binary: {log}");
    // 123456789012345678900001 × 10^-4, as Java's BigInteger.toByteArray() in base64.
    assert_eq!(rows[0]["n"], json!({"scale": 4, "value": "GiSbHxCgbJarIQ=="}));
    assert_eq!(rows[1]["f4"], "NaN");
    assert_eq!(rows[1]["s"], "tab\tnl\né ☃ \\N");
    // Debezium's stand-ins for infinity (docs/types.md), read in binary as in text.
    assert_eq!(rows[2]["d"], -2_147_472_692, "date infinity");
    assert_eq!(rows[1]["ts3"], 9_223_372_036_825_200i64, "timestamp(3) infinity");
    assert_eq!(rows[1]["tz"], "-infinity");
}

/// Infinities, geometric types and bit strings, snapshotted with COPY's binary format: both
/// formats and the stream must agree. The values themselves are asserted in
/// `every_type_renders_as_debezium_does` (read as text).
#[tokio::test(flavor = "multi_thread")]
async fn binary_snapshot_of_infinities_geometry_and_bits() {
    let (rows, log) = capture_rows(
        "binsnap_geo",
        "",
        "CREATE TABLE t (id bigint PRIMARY KEY, d date, ts timestamp, ts3 timestamp(3), tz timestamptz, tz0 timestamptz(0),
                         p point, bx box, ls lseg, pa path, pg polygon, ci circle, li line,
                         b1 bit(1), b3 bit(3), b10 bit(10), vb varbit, vb1 varbit(1), vb5 varbit(5))",
        "INSERT INTO t VALUES
           (1, 'infinity', 'infinity', 'infinity', 'infinity', 'infinity',
            '(1.5,2.5)', '(0,0),(2,3)', '[(0,0),(1.5,-1)]', '[(0,0),(1,1),(2,0)]', '((0,0),(1,0),(1,1))', '<(1,2),3>', '{1,-1,0}',
            B'1', B'000', B'1000000001', B'101', B'1', B'00001'),
           (2, '-infinity', '-infinity', '-infinity', '-infinity', '-infinity',
            '(-0,1e300)', '(-1.25,0.1),(3,-7)', '[(0.1,0.2),(0.3,0.4)]', '((0,0),(1,1))', '((5,5))', '<(0,0),0.5>', '{0,1,-2.5}',
            B'0', B'100', B'0000000001', B'', B'', B'00000'),
           (3, NULL, NULL, NULL, NULL, NULL, '(NaN,-Infinity)', NULL, NULL, '[(7,8)]', NULL, NULL, NULL,
            NULL, NULL, B'0000000000', B'0000000000000000000000000000000001', B'0', NULL)",
        3,
    )
    .await;
    assert!(log.contains("format=\"binary\""), "read in binary: {log}");
    assert_eq!(rows[0]["d"], -2_147_472_692);
    assert_eq!(rows[1]["ts"], -9_223_372_036_832_400_000i64);
    assert_eq!(rows[1]["p"]["x"], -0.0);
    assert_eq!(rows[2]["p"]["x"], "NaN");
    assert_eq!(rows[2]["p"]["y"], "-Infinity");
    assert_eq!(rows[1]["vb"], "");
    assert_eq!(rows[1]["vb1"], false);
    assert_eq!(rows[2]["vb"], "AQ==");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_type_renders_as_debezium_does() {
    let after = capture(
        "types",
        "",
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE TABLE t (
           id int PRIMARY KEY,
           c_bool boolean, c_int2 smallint, c_int4 integer, c_int8 bigint, c_oid oid,
           c_float4 real, c_float8 double precision,
           c_numeric numeric(10,2), c_numeric_free numeric, c_money money,
           c_char char(3), c_varchar varchar(10), c_text text,
           c_bytea bytea,
           c_date date, c_time time, c_time3 time(3), c_timetz timetz,
           c_ts timestamp, c_ts3 timestamp(3), c_tstz timestamptz, c_tstz3 timestamptz(3),
           c_interval interval,
           c_uuid uuid, c_json json, c_jsonb jsonb, c_enum mood,
           c_int_array int[], c_text_array text[],
           c_inet inet, c_cidr cidr, c_macaddr macaddr,
           c_bit1 bit(1), c_bits bit(10), c_xml xml,
           c_date_inf date, c_date_ninf date, c_ts_inf timestamp, c_ts_ninf timestamp,
           c_ts3_inf timestamp(3), c_ts3_ninf timestamp(3), c_tstz_inf timestamptz, c_tstz_ninf timestamptz(3),
           c_point point, c_box box, c_lseg lseg, c_path_open path, c_path_closed path, c_polygon polygon,
           c_circle circle, c_line line,
           c_bit0 bit(1), c_bit3_zero bit(3), c_bits_low bit(10), c_bits_zero bit(10), c_varbit varbit,
           c_varbit_zero varbit(8), c_varbit1 varbit(1)
         );",
        "INSERT INTO t VALUES (
           1,
           true, -32768, 2147483647, 9223372036854775807, 4000000000,
           1.5, 2.25,
           12345678.91, -0.000123, -1234.56,
           'ab', 'héllo', 'line1\nline2 \"q\"',
           '\\x00ff10',
           '2024-03-01', '10:30:00.123456', '10:30:00.123', '10:30:00+02',
           '2024-01-15 10:30:00.123456', '2024-01-15 10:30:00.123', '2024-01-15 12:30:00.5+02', '2024-01-15 10:30:00+00',
           '1 day 2 hours',
           'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"a\": [1, 2]}', '{\"b\": true}', 'happy',
           '{1,2,NULL}', '{\"x y\",z}',
           '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03',
           B'1', B'1000000001', '<a>1</a>',
           'infinity', '-infinity', 'infinity', '-infinity',
           'infinity', '-infinity', 'infinity', '-infinity',
           '(1.5,2.5)', '(0,0),(2,3)', '[(0,0),(1.5,-1)]', '[(0,0),(1,1),(2,0)]', '((0,0),(1,1),(2,0))', '((0,0),(1,0),(1,1))',
           '<(1,2),3>', '{1,-1,0}',
           B'0', B'000', B'0000000001', B'0000000000', B'111011010001000110000001000000001',
           B'000', B'1'
         )",
    )
    .await;
    let expected = json!({
        "id": 1,
        "c_bool": true, "c_int2": -32768, "c_int4": 2147483647, "c_int8": 9223372036854775807i64, "c_oid": 4000000000u64,
        "c_float4": 1.5, "c_float8": 2.25,
        // 1234567891 = 0x4996_02D3; -123 (scale 6) = 0x85 (one byte, as BigInteger); -123456 (scale 2) = 0xFE_1DC0
        "c_numeric": "SZYC0w==", "c_numeric_free": {"scale": 6, "value": "hQ=="}, "c_money": "/h3A",
        "c_char": "ab ", "c_varchar": "héllo", "c_text": "line1\nline2 \"q\"",
        "c_bytea": "AP8Q",
        "c_date": 19783, "c_time": 37800123456i64, "c_time3": 37800123, "c_timetz": "08:30:00Z",
        "c_ts": 1705314600123456i64, "c_ts3": 1705314600123i64,
        "c_tstz": "2024-01-15T10:30:00.500000Z", "c_tstz3": "2024-01-15T10:30:00.000Z",
        "c_interval": 93600000000i64,
        "c_uuid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "c_json": "{\"a\": [1, 2]}", "c_jsonb": "{\"b\": true}", "c_enum": "happy",
        "c_int_array": [1, 2, null], "c_text_array": ["x y", "z"],
        "c_inet": "192.168.0.1/24", "c_cidr": "10.0.0.0/8", "c_macaddr": "08:00:2b:01:02:03",
        "c_bit1": true, "c_bits": "AQI=", "c_xml": "<a>1</a>",
        // ±infinity: Debezium's stand-ins (epoch days of -5877611-06-21 / -22; PgJDBC's infinity
        // instants in micros, or millis for precision 0..3; the text for timestamptz).
        "c_date_inf": -2147472692, "c_date_ninf": -2147472691,
        "c_ts_inf": 9223372036825200000i64, "c_ts_ninf": -9223372036832400000i64,
        "c_ts3_inf": 9223372036825200i64, "c_ts3_ninf": -9223372036832400i64,
        "c_tstz_inf": "infinity", "c_tstz_ninf": "-infinity",
        // WKB computed independently with java.nio.ByteBuffer, as Debezium's writers build it.
        "c_point": {"x": 1.5, "y": 2.5, "wkb": "AQEAAAAAAAAAAAD4PwAAAAAAAARA", "srid": null},
        // PostgreSQL stores the box as (2,3),(0,0): ring (2,3) (2,0) (0,0) (0,3) (2,3).
        "c_box": {"wkb": "AQMAAAABAAAABQAAAAAAAAAAAABAAAAAAAAACEAAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAACEAAAAAAAAAAQAAAAAAAAAhA",
                  "srid": null, "extensions": {"type": "box"}},
        "c_lseg": {"wkb": "AQIAAAACAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAPg/AAAAAAAA8L8=", "srid": null, "extensions": {"type": "lseg"}},
        "c_path_open": {"wkb": "AQIAAAADAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAPA/AAAAAAAA8D8AAAAAAAAAQAAAAAAAAAAA", "srid": null,
                        "extensions": {"type": "path", "closed": "false"}},
        "c_path_closed": {"wkb": "AQIAAAADAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAPA/AAAAAAAA8D8AAAAAAAAAQAAAAAAAAAAA", "srid": null,
                          "extensions": {"type": "path", "closed": "true"}},
        "c_polygon": {"wkb": "AQMAAAABAAAABAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAADwPwAAAAAAAAAAAAAAAAAA8D8AAAAAAADwPwAAAAAAAAAAAAAAAAAAAAA=",
                      "srid": null, "extensions": {"type": "polygon"}},
        "c_circle": {"center": {"x": 1.0, "y": 2.0, "wkb": "AQEAAAAAAAAAAADwPwAAAAAAAABA", "srid": null}, "radius": 3.0},
        "c_line": {"a": 1.0, "b": -1.0, "c": 0.0},
        // Bits: java.util.BitSet#toByteArray of the bits (the last bit written is bit 0).
        "c_bit0": false, "c_bit3_zero": "", "c_bits_low": "AQ==", "c_bits_zero": "", "c_varbit": "AQIj2gE=",
        "c_varbit_zero": "", "c_varbit1": true
    });
    for (column, want) in expected.as_object().unwrap() {
        assert_eq!(&after[column], want, "column {column}: got {}, want {want}", after[column]);
    }
    assert_eq!(after.as_object().unwrap().len(), expected.as_object().unwrap().len(), "{after}");
}

#[tokio::test(flavor = "multi_thread")]
async fn decimal_handling_string_and_double() {
    let setup = "CREATE TABLE t (id int PRIMARY KEY, n numeric(10,2), f numeric, m money)";
    let insert = "INSERT INTO t VALUES (1, 1234.50, -0.125, 3.10)";
    let as_string = capture("dec_string", "[format]\ndecimal_handling = \"string\"\n", setup, insert).await;
    assert_eq!(as_string["n"], "1234.50");
    assert_eq!(as_string["f"], "-0.125");
    assert_eq!(as_string["m"], "3.10");
    let as_double = capture("dec_double", "[format]\ndecimal_handling = \"double\"\n", setup, insert).await;
    assert_eq!(as_double["n"], 1234.5);
    assert_eq!(as_double["f"], -0.125);
    assert_eq!(as_double["m"], 3.1);
}

#[tokio::test(flavor = "multi_thread")]
async fn special_values() {
    let after = capture(
        "special",
        "",
        "CREATE TABLE t (id int PRIMARY KEY, d date, ts timestamp, n numeric, f float8, a int[], bc date, s text, b bytea)",
        "INSERT INTO t VALUES (1, 'infinity', '-infinity', 'NaN', 'NaN', '{}', '0044-03-15 BC',
                              'tab' || chr(9) || 'here back\\slash \\N', '\\x5c4e09')",
    )
    .await;
    assert_eq!(after["d"], -2_147_472_692);
    assert_eq!(after["ts"], -9_223_372_036_832_400_000i64);
    assert_eq!(after["n"], Value::Null);
    assert_eq!(after["f"], "NaN");
    assert_eq!(after["a"], json!([]));
    // 44 BC is astronomical year -43; days from 1970-01-01.
    assert_eq!(after["bc"], -735_160);
    // Characters COPY escapes (tab, backslash, a literal \N), which the snapshot must unescape.
    assert_eq!(after["s"], "tab\there back\\slash \\N");
    assert_eq!(after["b"], "XE4J", "the bytes \\ N TAB");
}
