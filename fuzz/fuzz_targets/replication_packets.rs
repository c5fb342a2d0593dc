//! The bytes a server sends on a replication connection, read by both connectors' protocol
//! parsers: PostgreSQL's backend frames and MySQL's packets (each half reads every input).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tailgate_postgres::fuzzing::replication_packets(data);
    tailgate_mysql::fuzzing::replication_packets(data);
});
