//! The model catalogue: model files the queen holds by content hash (`<data-dir>/models/<sha256>`),
//! and the names that point at them (SQLite, `models` table).
//!
//! A file enters only through `Incoming`, which hashes what it writes and keeps the file only if
//! its size and SHA-256 match what the sender declared; a half-written upload never has a
//! content-hash name.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::Error;
use crate::model::unix_ms;
use crate::store::StoreHandle;

/// Largest model file accepted.
pub const MAX_MODEL_BYTES: u64 = 64 << 30;
/// Formats the workers can load.
pub const FORMATS: &[&str] = &["gguf"];

/// One catalogue entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelEntry {
    pub name: String,
    pub sha256: String,
    pub size: u64,
    pub format: String,
    pub added_unix_ms: u64,
}

/// A lower-case hex SHA-256, or a message saying what is wrong with it.
pub fn check_sha256(s: &str) -> Result<(), Error> {
    if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(Error::Model(
            "sha256 must be 64 lower-case hex digits".into(),
        ))
    }
}

#[derive(Clone)]
pub struct Catalogue {
    dir: PathBuf,
    store: StoreHandle,
}

impl Catalogue {
    pub fn open(dir: &Path, store: StoreHandle) -> Result<Catalogue, Error> {
        skep_common::daemon::create_private_dir(dir).map_err(|e| Error::Io(e.to_string()))?;
        Ok(Catalogue {
            dir: dir.to_owned(),
            store,
        })
    }

    /// Where the file with this content hash lives (the hash must have been checked).
    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    pub async fn list(&self) -> Result<Vec<ModelEntry>, Error> {
        self.store.list_models().await
    }

    /// Starts receiving a file declared as `size` bytes with SHA-256 `sha256`.
    pub async fn begin(
        &self,
        name: &str,
        format: &str,
        size: u64,
        sha256: &str,
    ) -> Result<Incoming, Error> {
        skep_common::validate::model_name(name)?;
        if !FORMATS.contains(&format) {
            return Err(Error::Model(format!(
                "format {format:?} is not supported (supported: {})",
                FORMATS.join(", ")
            )));
        }
        if size == 0 || size > MAX_MODEL_BYTES {
            return Err(Error::Model(format!(
                "size must be between 1 byte and {} GiB",
                MAX_MODEL_BYTES >> 30
            )));
        }
        check_sha256(sha256)?;
        let tmp = self
            .dir
            .join(format!(".incoming-{}", uuid::Uuid::new_v4().simple()));
        let file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| Error::Io(e.to_string()))?;
        Ok(Incoming {
            catalogue: self.clone(),
            entry: ModelEntry {
                name: name.to_owned(),
                sha256: sha256.to_owned(),
                size,
                format: format.to_owned(),
                added_unix_ms: 0,
            },
            tmp,
            file,
            hasher: Sha256::new(),
            written: 0,
        })
    }
}

/// A model file being received. Dropped without `finish`, it leaves no file behind.
pub struct Incoming {
    catalogue: Catalogue,
    entry: ModelEntry,
    tmp: PathBuf,
    file: tokio::fs::File,
    hasher: Sha256,
    written: u64,
}

impl Incoming {
    pub async fn write(&mut self, data: &[u8]) -> Result<(), Error> {
        self.written += data.len() as u64;
        if self.written > self.entry.size {
            return Err(Error::Model(format!(
                "more bytes than the declared size {}",
                self.entry.size
            )));
        }
        self.hasher.update(data);
        self.file
            .write_all(data)
            .await
            .map_err(|e| Error::Io(e.to_string()))
    }

    /// Checks size and hash, moves the file to its content-hash name and points the name at it.
    pub async fn finish(mut self) -> Result<ModelEntry, Error> {
        if self.written != self.entry.size {
            return Err(Error::Model(format!(
                "received {} bytes, declared {}",
                self.written, self.entry.size
            )));
        }
        let got = hex::encode(std::mem::take(&mut self.hasher).finalize());
        if got != self.entry.sha256 {
            return Err(Error::Model(format!(
                "SHA-256 of what arrived is {got}, declared {}; the file was not kept",
                self.entry.sha256
            )));
        }
        self.file
            .sync_all()
            .await
            .map_err(|e| Error::Io(e.to_string()))?;
        let path = self.catalogue.path_of(&self.entry.sha256);
        tokio::fs::rename(&self.tmp, &path)
            .await
            .map_err(|e| Error::Io(e.to_string()))?;
        let mut entry = self.entry.clone();
        entry.added_unix_ms = unix_ms();
        self.catalogue.store.upsert_model(entry.clone()).await?;
        Ok(entry)
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // After a successful rename this names nothing: removing it is then a no-op.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal of the model itself (INVALID_ARGUMENT to the client) saying `why`: an I/O or
    /// store failure, or a refusal for another reason, fails the test.
    #[track_caller]
    fn refused<T>(r: Result<T, Error>, why: &str) {
        match r {
            Err(Error::Model(msg)) => assert!(msg.contains(why), "{msg:?} does not say {why:?}"),
            Err(other) => panic!("expected a model refusal saying {why:?}, got {other:?}"),
            Ok(_) => panic!("expected a model refusal saying {why:?}, got Ok"),
        }
    }

    #[test]
    fn only_a_file_matching_its_declared_size_and_hash_is_kept() {
        let dir = std::env::temp_dir().join(format!("skep-catalogue-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sys = actix::System::new();
        sys.block_on(async {
            let store = crate::store::start(&dir.join("q.db")).unwrap();
            let cat = Catalogue::open(&dir.join("models"), store).unwrap();
            let data = b"GGUF pretend weights";
            let sha = hex::encode(Sha256::digest(data));

            let mut ok = cat
                .begin("m", "gguf", data.len() as u64, &sha)
                .await
                .unwrap();
            ok.write(&data[..4]).await.unwrap();
            ok.write(&data[4..]).await.unwrap();
            let entry = ok.finish().await.unwrap();
            assert_eq!((entry.name.as_str(), entry.size), ("m", data.len() as u64));
            assert_eq!(std::fs::read(cat.path_of(&sha)).unwrap(), data);
            assert_eq!(cat.list().await.unwrap(), vec![entry]);

            // A flipped byte: refused, and nothing but the good file remains.
            let mut bad = cat
                .begin("n", "gguf", data.len() as u64, &sha)
                .await
                .unwrap();
            let mut flipped = data.to_vec();
            flipped[3] ^= 1;
            bad.write(&flipped).await.unwrap();
            refused(bad.finish().await, "SHA-256 of what arrived is");
            // Too many bytes, too few, a bad hash string, an unknown format, no size at all.
            let mut long = cat.begin("n", "gguf", 2, &sha).await.unwrap();
            refused(
                long.write(data).await,
                "more bytes than the declared size 2",
            );
            drop(long);
            let short = cat.begin("n", "gguf", 99, &sha).await.unwrap();
            refused(short.finish().await, "received 0 bytes, declared 99");
            refused(cat.begin("n", "gguf", 1, "ABC").await, "64 lower-case hex");
            refused(
                cat.begin("n", "gguf", 1, &sha.to_uppercase()).await,
                "64 lower-case hex",
            );
            refused(
                cat.begin("n", "safetensors", 1, &sha).await,
                "format \"safetensors\" is not supported",
            );
            refused(
                cat.begin("n", "gguf", 0, &sha).await,
                "size must be between",
            );
            let files: Vec<_> = std::fs::read_dir(dir.join("models")).unwrap().collect();
            assert_eq!(files.len(), 1, "only the verified file is kept");
            assert_eq!(cat.list().await.unwrap().len(), 1);
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}
