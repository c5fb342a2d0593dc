//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`, see fuzz/README.md) through the same
//! entry points as the fuzz targets, so that every input the fuzzers kept, and every crash they
//! found, is checked by the ordinary test suite without nightly or cargo-fuzz.

use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files
        .into_iter()
        .map(|path| {
            let data = std::fs::read(&path).unwrap();
            (path, data)
        })
        .collect()
}

#[test]
fn pgoutput_corpus_decodes_without_panicking() {
    for (path, data) in corpus("pgoutput") {
        // Printed only if the test fails: the input that broke it.
        eprintln!("{}", path.display());
        tailgate_postgres::fuzzing::pgoutput(&data);
    }
}

#[test]
fn replication_packets_corpus_parses_without_panicking() {
    for (path, data) in corpus("replication_packets") {
        eprintln!("{}", path.display());
        tailgate_postgres::fuzzing::replication_packets(&data);
    }
}
