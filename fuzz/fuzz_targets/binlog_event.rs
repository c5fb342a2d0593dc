//! Binlog events, row images, binary JSON, decimals and compressed payloads
//! (`tailgate_mysql::fuzzing::binlog_event` says how the input is read).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tailgate_mysql::fuzzing::binlog_event(data));
