//! pgoutput messages through the decoder and the value conversion, COPY text and binary rows
//! (`tailgate_postgres::fuzzing::pgoutput` says how the input is read).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tailgate_postgres::fuzzing::pgoutput(data));
