//! Every row of the MySQL/MariaDB type mapping (docs/types.md), checked value by value against both
//! real servers: what the binlog carries, decoded and rendered as Debezium's MySQL connector does.

use std::time::Duration;

use serde_json::{Value, json};
use tailgate_e2e::mysql::{MyScenario, Server, my_config};
use tailgate_e2e::*;

const WAIT: Duration = Duration::from_secs(30);

const SCHEMA: &str = "
CREATE TABLE t (
  id int PRIMARY KEY,
  ti tinyint, tiu tinyint unsigned, si smallint, siu smallint unsigned, mi mediumint, miu mediumint unsigned,
  i int, iu int unsigned, bi bigint, biu bigint unsigned, b1 tinyint(1),
  f float, d double, dec1 decimal(10,2), dec2 decimal(30,10), dec0 decimal(5,0),
  bit1 bit(1), bit10 bit(10), bit64 bit(64),
  ch char(5), vc varchar(20), tx text, ltx longtext, lat varchar(10) CHARACTER SET latin1,
  bn binary(4), vb varbinary(10), bl blob,
  dt date, dnn date NOT NULL DEFAULT '2000-01-01', tm time, tm6 time(6),
  dtm datetime, dtm3 datetime(3), dtm6 datetime(6), ts timestamp NULL, ts3 timestamp(3) NULL, yr year,
  en enum('small','medium','large'), st set('a','b','c'),
  js json, g geometry, pt point
)";

async fn every_type_renders_as_debezium(server: Server) {
    let mut s = MyScenario::new(server, "types", SCHEMA).await;
    let mut tg = s.start("", &stdout_sink(), "[format]\ndecimal_handling = \"string\"").await;
    // Fixed session settings: TIMESTAMP input in UTC, and zero dates allowed for the second row.
    s.db.exec("SET SESSION time_zone = '+00:00', sql_mode = ''").await;
    s.db.exec(
        "INSERT INTO t VALUES (1,
               -128, 255, -32768, 65535, -8388608, 16777215,
               -2147483648, 4294967295, -9223372036854775808, 18446744073709551615, 1,
               1.5, -2.5e-300, 12345678.90, -12345678901234567890.0123456789, 99999,
               b'1', b'1000000001', b'1111111111111111111111111111111111111111111111111111111111111111',
               'ab', 'héllo ☃', 'some text', 'long text', 'café',
               0x0102, 0x00FF10, 0x00626C6F62FF,
               '2024-02-29', '2024-02-29', '838:59:59', '-00:00:01.000001',
               '2024-01-15 10:30:00', '2024-01-15 10:30:00.123', '2024-01-15 10:30:00.123456',
               '2024-01-15 10:30:00', '2024-01-15 10:30:00.123', 2024,
               'medium', 'a,c',
               '{\"b\": [1, 2.5, null, true], \"a\": \"x\"}',
               ST_GeomFromText('LINESTRING(0 0,1 1)'), ST_GeomFromText('POINT(1 2)'))",
    )
    .await;
    // Zero dates (null in nullable columns, the epoch in NOT NULL ones), year 0000, empty values.
    s.db
        .exec(
            "INSERT INTO t (id, dt, dnn, dtm, dtm6, ts, yr, ch, vc, bn, en, st, f, dec1) VALUES
               (2, '0000-00-00', '0000-00-00', '0000-00-00 00:00:00', '0000-00-00 00:00:00', '0000-00-00 00:00:00', '0000', '', '', '', '', '', 0, 0)",
        )
        .await;
    s.db.exec("INSERT INTO t (id) VALUES (3)").await;
    // Values whose text form is not exact (FLOAT prints 6 digits) or not canonical.
    s.db.exec(
        "INSERT INTO t (id, f, d, dec2, tm6, dtm6, ts3, js, bit10, bn) VALUES
           (4, 1.1, 0.1e0 + 0.2e0, 0.0000000001, '-838:59:59', '1000-01-01 00:00:00.000001',
            '2038-01-19 03:14:07.999', '{\"n\": [1e300, -0.5, 12345678901234567890], \"s\": \"\\\\u00e9\\\\n\"}', b'0', 0x01)",
    )
    .await;

    let records = wait_stdout(&mut tg, 4, WAIT).await;
    let after = |i: usize| records[i]["value"]["after"].clone();

    let one = after(0);
    let expect_one = json!({
        "id": 1,
        "ti": -128, "tiu": 255, "si": -32768, "siu": 65535, "mi": -8388608, "miu": 16777215,
        "i": -2147483648i64, "iu": 4294967295u64, "bi": i64::MIN,
        // Exact (Debezium's default long mode would write -1 here).
        "biu": u64::MAX,
        "b1": 1,
        "f": 1.5, "d": -2.5e-300,
        "dec1": "12345678.90", "dec2": "-12345678901234567890.0123456789", "dec0": "99999",
        "bit1": true, "bit10": "AQI=", "bit64": "//////////8=",
        "ch": "ab", "vc": "héllo ☃", "tx": "some text", "ltx": "long text", "lat": "café",
        "bn": "AQIAAA==", "vb": "AP8Q", "bl": "AGJsb2L/",
        "dt": 19782, "dnn": 19782, "tm": 3_020_399_000_000i64, "tm6": -1_000_001,
        "dtm": 1_705_314_600_000i64, "dtm3": 1_705_314_600_123i64, "dtm6": 1_705_314_600_123_456i64,
        "ts": "2024-01-15T10:30:00Z", "ts3": "2024-01-15T10:30:00.123Z", "yr": 2024,
        "en": "medium", "st": "a,c",
        "js": match server {
            // MySQL stores binary JSON (keys sorted, no spaces); MariaDB's JSON is text as written.
            Server::Mysql => "{\"a\":\"x\",\"b\":[1,2.5,null,true]}",
            Server::Mariadb => "{\"b\": [1, 2.5, null, true], \"a\": \"x\"}",
        },
        "g": {"wkb": "AQIAAAACAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAPA/AAAAAAAA8D8=", "srid": null},
        "pt": {"x": 1.0, "y": 2.0, "wkb": "AQEAAAAAAAAAAADwPwAAAAAAAABA", "srid": null},
    });
    for (k, v) in expect_one.as_object().unwrap() {
        assert_eq!(&one[k], v, "{server:?} column {k}: {one}");
    }
    assert_eq!(one.as_object().unwrap().len(), expect_one.as_object().unwrap().len(), "no extra columns: {one}");

    let two = after(1);
    assert_eq!(two["dt"], Value::Null, "zero date in a nullable column is null: {two}");
    assert_eq!(two["dnn"], 0, "zero date in a NOT NULL column is the epoch: {two}");
    assert_eq!(two["dtm"], Value::Null);
    assert_eq!(two["dtm6"], Value::Null);
    assert_eq!(two["ts"], Value::Null, "zero timestamp: {two}");
    assert_eq!(two["yr"], 0, "YEAR 0000 (Debezium would write 1900)");
    assert_eq!((two["ch"].as_str(), two["vc"].as_str()), (Some(""), Some("")));
    assert_eq!(two["bn"], "AAAAAA==", "empty BINARY(4) is four zero bytes");
    assert_eq!(two["en"], "", "invalid ENUM value is the empty string");
    assert_eq!(two["st"], "");
    assert_eq!(two["f"], 0.0);
    assert_eq!(two["dec1"], "0.00");

    let three = after(2);
    for (k, v) in three.as_object().unwrap() {
        if k == "id" {
            assert_eq!(v, 1 + 2);
        } else if k == "dnn" {
            assert_eq!(v, &json!(days(2000, 1, 1)));
        } else {
            assert_eq!(v, &Value::Null, "{server:?} column {k} should be null: {three}");
        }
    }
    let four = after(3);
    assert_eq!(four["f"], 1.1, "FLOAT as its shortest 32-bit rendering, not widened to 1.100000023841858: {four}");
    assert_eq!(four["d"], 0.30000000000000004);
    let source = &records[0]["value"]["source"];
    assert_eq!(source["connector"], server.connector());
    assert_eq!(source["db"], s.db.name.as_str());
    assert_eq!(source["table"], "t");

    // The snapshot reads the same rows with SQL: every value must equal the streamed one.
    let snap_dir = scratch(&format!("{}_snap", s.name));
    let cfg = my_config(
        &s.name,
        &s.db.url(),
        &snap_dir,
        "snapshot = \"initial_only\"",
        &stdout_sink(),
        "[format]\ndecimal_handling = \"string\"",
    );
    let mut snap = Tailgate::start(&snap_dir, &cfg);
    assert!(snap.wait_exit(WAIT).await.success(), "{}", snap.log_text());
    let read = stdout_records(&snap.stdout);
    assert_eq!(read.len(), 4, "{}", snap.log_text());
    for (streamed, snapshot) in records.iter().zip(&read) {
        assert_eq!(snapshot["value"]["op"], "r");
        assert_eq!(snapshot["key"], streamed["key"]);
        assert_eq!(
            snapshot["value"]["after"], streamed["value"]["after"],
            "{server:?}: snapshot and stream disagree on row {}",
            streamed["key"]
        );
    }
    s.finish(tg).await;
}

fn days(y: i32, m: u32, d: u32) -> i64 {
    // Days since 1970-01-01 (proleptic Gregorian), as in docs/types.md.
    let (y, m) = if m <= 2 { (i64::from(y) - 1, m + 9) } else { (i64::from(y), m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * i64::from(m) + 2) / 5 + i64::from(d) - 1;
    era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
}

/// `bigint_unsigned_handling = "precise"` writes Kafka Connect Decimal bytes instead of a number;
/// `decimal_handling` "precise" (the default) writes DECIMAL as Debezium's base64 bytes.
async fn precise_modes(server: Server) {
    let mut s =
        MyScenario::new(server, "precise", "CREATE TABLE t (id int PRIMARY KEY, biu bigint unsigned, d decimal(10,2))")
            .await;
    let mut tg = s.start("", &stdout_sink(), "[format]\nbigint_unsigned_handling = \"precise\"").await;
    s.db.exec("INSERT INTO t VALUES (1, 18446744073709551615, 99.90)").await;
    let records = wait_stdout(&mut tg, 1, WAIT).await;
    let after = &records[0]["value"]["after"];
    assert_eq!(after["biu"], "AP//////////", "BigInteger(2^64-1).toByteArray() in base64");
    assert_eq!(after["d"], "JwY=", "99.90 as the unscaled 9990, base64");
    s.finish(tg).await;
}

both_servers!(every_type_renders_as_debezium, precise_modes);
