-- The workload behind the golden binlogs in this folder (see README.md). Run in database `golden`.
SET SESSION time_zone = '+00:00';
CREATE TABLE t (
  id int PRIMARY KEY, ti tinyint, biu bigint unsigned, f float, d double, dec1 decimal(10,2),
  bit10 bit(10), vc varchar(20), lat varchar(10) CHARACTER SET latin1, bn binary(4), bl blob,
  dt date, tm time(3), dtm datetime(6), ts timestamp(3) NULL, yr year,
  en enum('small','medium','large'), st set('a','b','c'), js json, pt point
);
INSERT INTO t VALUES (1, -128, 18446744073709551615, 1.5, -2.5, 12345678.90, b'1000000001', 'héllo ☃', 'café',
  0x0102, 0x00FF, '2024-02-29', '-12:34:56.789', '2024-01-15 10:30:00.123456', '2024-01-15 10:30:00.123', 2024,
  'medium', 'a,c', '{"b": [1, 2.5, null, true], "a": "x"}', ST_GeomFromText('POINT(1 2)'));
BEGIN;
INSERT INTO t (id, vc) VALUES (2, 'two'), (3, 'three');
UPDATE t SET vc = 'deux' WHERE id = 2;
COMMIT;
UPDATE t SET id = 30 WHERE id = 3;
DELETE FROM t WHERE id = 1;
ALTER TABLE t ADD COLUMN extra varchar(10) DEFAULT 'x' FIRST;
INSERT INTO t (id, extra, vc) VALUES (4, 'e4', 'four');
TRUNCATE TABLE t;
