//! Where each connector resumes: the [`OffsetStore`] contract, and its default, the offsets file
//! ([`FileStore`]). Shared stores (a table in the source database, for instances that take over
//! from each other) implement the same contract in their engine crates.
//!
//! The file:
//! One JSON file may hold several connectors, keyed by their `name`. It is replaced atomically
//! (write a temporary file, fsync it, rename it over the old one, fsync the folder), so a crash
//! leaves either the old or the new checkpoint, never a torn one. Connectors sharing the file (in one
//! process or several) take an exclusive lock on `<file>.lock` around each read-modify-write, so one
//! never overwrites another's entry. The file is created readable by its owner only (0600). The
//! format is frozen by a test.
//!
//! ```json
//! {"format":1,"connectors":{"shop":{"position":{"type":"postgres","lsn":"0/16B3748"},"updated_at_ms":1700000000000}}}
//! ```

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tailgate_core::Position;

use crate::engine::BoxFuture;

const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum OffsetsError {
    #[error("cannot read offsets file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "offsets file {path} is not valid ({reason}). Fix: restore it from a backup, or move it away to \
         start over from the slot's confirmed position"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("offsets file {path} has format {found}, this tailgate reads format {FORMAT}. Fix: use a newer tailgate")]
    Format { path: PathBuf, found: u32 },
    #[error("cannot write offsets file {path}: {source}. Fix: check that its folder exists and is writable")]
    Write { path: PathBuf, source: std::io::Error },
    /// A shared store refused the write: another instance took over this connector (it raised the
    /// store's epoch). This instance must stop without writing anything more.
    #[error(
        "another instance ({holder}) took over connector {connector}: this one stops without checkpointing \
         (records it had in flight may be delivered twice, none is lost)"
    )]
    Fenced { connector: String, holder: String },
    /// A shared store failed (its database unreachable, a missing right).
    #[error("offsets store {store}: {message}")]
    Store { store: String, message: String },
}

/// Where checkpoints are kept. Contract: `save` makes `position` durable before it returns (a crash
/// right after leaves it or a later one, never an earlier one or a torn one); a store shared by
/// several instances refuses (`Fenced`) the writes of an instance that lost its leadership, so that a
/// leader paused and woken up cannot move the checkpoint its successor relies on.
pub trait OffsetStore: Send + Sync {
    /// For logs and `offsets show`: the path, or the table and database.
    fn describe(&self) -> String;

    /// The stored checkpoint of this connector, if any.
    fn load(&self) -> BoxFuture<'_, Result<Option<StoredOffset>, OffsetsError>>;

    /// Stores `position` for this connector.
    fn save<'a>(&'a self, position: &'a Position) -> BoxFuture<'a, Result<(), OffsetsError>>;

    /// Removes this connector's checkpoint; whether there was one.
    fn clear(&self) -> BoxFuture<'_, Result<bool, OffsetsError>>;

    /// This instance becomes the connector's only writer: a shared store raises its epoch, so the
    /// writes of any earlier writer are refused from now on. A private store has nothing to do.
    fn take_over(&self) -> BoxFuture<'_, Result<(), OffsetsError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredOffset {
    pub position: Position,
    pub updated_at_ms: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OffsetsFile {
    format: u32,
    connectors: BTreeMap<String, StoredOffset>,
}

/// The offsets file (the default store, for a single instance).
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
    name: String,
}

impl OffsetStore for FileStore {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn load(&self) -> BoxFuture<'_, Result<Option<StoredOffset>, OffsetsError>> {
        Box::pin(std::future::ready(FileStore::load(self)))
    }

    fn save<'a>(&'a self, position: &'a Position) -> BoxFuture<'a, Result<(), OffsetsError>> {
        Box::pin(std::future::ready(FileStore::save(self, position)))
    }

    fn clear(&self) -> BoxFuture<'_, Result<bool, OffsetsError>> {
        Box::pin(std::future::ready(FileStore::clear(self)))
    }
}

impl FileStore {
    pub fn new(path: impl Into<PathBuf>, name: impl Into<String>) -> Self {
        FileStore { path: path.into(), name: name.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored checkpoint of this connector, if any.
    pub fn load(&self) -> Result<Option<StoredOffset>, OffsetsError> {
        Ok(self.read_file()?.connectors.remove(&self.name))
    }

    fn read_file(&self) -> Result<OffsetsFile, OffsetsError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(OffsetsFile { format: FORMAT, ..Default::default() });
            }
            Err(source) => return Err(OffsetsError::Read { path: self.path.clone(), source }),
        };
        let file: OffsetsFile = serde_json::from_str(&text)
            .map_err(|e| OffsetsError::Corrupt { path: self.path.clone(), reason: e.to_string() })?;
        if file.format != FORMAT {
            return Err(OffsetsError::Format { path: self.path.clone(), found: file.format });
        }
        Ok(file)
    }

    /// Stores `position` for this connector, keeping other connectors' entries.
    pub fn save(&self, position: &Position) -> Result<(), OffsetsError> {
        let _lock = self.lock()?;
        let mut file = self.read_file()?;
        let updated_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        file.connectors.insert(self.name.clone(), StoredOffset { position: position.clone(), updated_at_ms });
        self.write_atomically(&file).map_err(|source| OffsetsError::Write { path: self.path.clone(), source })
    }

    /// Removes this connector's entry (used by `offsets reset`).
    pub fn clear(&self) -> Result<bool, OffsetsError> {
        let _lock = self.lock()?;
        let mut file = self.read_file()?;
        let removed = file.connectors.remove(&self.name).is_some();
        if removed {
            self.write_atomically(&file).map_err(|source| OffsetsError::Write { path: self.path.clone(), source })?;
        }
        Ok(removed)
    }

    /// Holds `<file>.lock` exclusively until dropped: the read-modify-write of one saver never
    /// interleaves with another's, in this process or another.
    fn lock(&self) -> Result<File, OffsetsError> {
        let path = self.sibling(".lock");
        let locked = owner_only().write(true).truncate(false).open(&path).and_then(|f| f.lock().map(|()| f));
        locked.map_err(|source| OffsetsError::Write { path, source })
    }

    /// `<file><suffix>` beside the offsets file.
    fn sibling(&self, suffix: &str) -> PathBuf {
        let mut name = self.path.file_name().unwrap_or_default().to_owned();
        name.push(suffix);
        self.path.with_file_name(name)
    }

    fn write_atomically(&self, file: &OffsetsFile) -> std::io::Result<()> {
        let tmp = self.sibling(".tmp");
        let mut bytes = serde_json::to_vec_pretty(file).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        {
            let mut f = owner_only().write(true).truncate(true).open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &self.path)?;
        // Make the rename itself durable.
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        File::open(dir)?.sync_all()
    }
}

/// Creates files readable and writable by their owner only: checkpoints name databases and hosts.
fn owner_only() -> std::fs::OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.create(true).mode(0o600);
    options
}

#[cfg(test)]
mod tests {
    use tailgate_core::Lsn;

    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tailgate-offsets-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn save_then_load_keeps_other_connectors() {
        let dir = tmpdir("keep");
        let path = dir.join("o.json");
        let a = FileStore::new(&path, "a");
        let b = FileStore::new(&path, "b");
        assert_eq!(a.load().unwrap(), None);
        a.save(&Position::postgres(Lsn(1))).unwrap();
        b.save(&Position::postgres(Lsn(2))).unwrap();
        a.save(&Position::postgres(Lsn(3))).unwrap();
        assert_eq!(a.load().unwrap().unwrap().position, Position::postgres(Lsn(3)));
        assert_eq!(b.load().unwrap().unwrap().position, Position::postgres(Lsn(2)));
        assert!(a.clear().unwrap());
        assert_eq!(a.load().unwrap(), None);
        assert!(!dir.join("o.json.tmp").exists(), "temporary file is renamed away");
    }

    /// Two connectors sharing one file, saving as fast as they can from two threads: neither loses
    /// its entry, and no save fails (an unlocked read-modify-write with one temporary name lost
    /// entries and failed renames).
    #[test]
    fn busy_connectors_sharing_a_file_keep_each_others_entries() {
        let dir = tmpdir("shared");
        let path = dir.join("o.json");
        let savers: Vec<_> = ["a", "b", "c"]
            .into_iter()
            .map(|name| {
                let store = FileStore::new(&path, name);
                std::thread::spawn(move || {
                    for i in 1..=300u64 {
                        store.save(&Position::postgres(Lsn(i))).unwrap();
                        let mine = store.load().unwrap().expect("my entry is there").position;
                        assert_eq!(mine, Position::postgres(Lsn(i)));
                    }
                })
            })
            .collect();
        for saver in savers {
            saver.join().unwrap();
        }
        for name in ["a", "b", "c"] {
            let stored = FileStore::new(&path, name).load().unwrap().unwrap();
            assert_eq!(stored.position, Position::postgres(Lsn(300)), "{name}");
        }
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    /// Frozen: files written by earlier releases must keep loading.
    #[test]
    fn reads_the_frozen_format() {
        let dir = tmpdir("frozen");
        let path = dir.join("o.json");
        fs::write(
            &path,
            r#"{"format":1,"connectors":{"shop":{"position":{"type":"postgres","lsn":"0/16B3748"},"updated_at_ms":1700000000000}}}"#,
        )
        .unwrap();
        let stored = FileStore::new(&path, "shop").load().unwrap().unwrap();
        assert_eq!(stored.position, Position::postgres("0/16B3748".parse().unwrap()));
        assert_eq!(stored.updated_at_ms, 1_700_000_000_000);
    }

    #[test]
    fn corrupt_file_is_an_error_that_names_the_file() {
        let dir = tmpdir("corrupt");
        let path = dir.join("o.json");
        fs::write(&path, "{not json").unwrap();
        let err = FileStore::new(&path, "shop").load().unwrap_err().to_string();
        assert!(err.contains("o.json") && err.contains("not valid"), "{err}");
    }
}
