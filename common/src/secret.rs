//! File-loaded secrets that are zeroized on drop and can never be printed.
//!
//! Secrets only ever come from files with mode 0600 (or stricter): never argv, never the
//! environment. `Secret` deliberately implements neither `Debug` nor `Display`, so a secret cannot
//! end up in a log line or an error message by accident; code that needs the bytes calls `expose`.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;
use zeroize::Zeroizing;

/// Prefix of every token skep generates, so a leaked one is recognisable in a scan.
pub const TOKEN_PREFIX: &str = "skep_";
/// Largest secret file we accept; anything bigger is not one of ours.
const MAX_SECRET_LEN: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read secret file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "secret file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("secret file {path} is empty or not a token")]
    Empty { path: PathBuf },
    #[error("secret file {path} is larger than {MAX_SECRET_LEN} bytes; it is not a skep secret")]
    TooLarge { path: PathBuf },
    #[error("secret file {path} already exists; refusing to overwrite it")]
    Exists { path: PathBuf },
}

/// A secret token. No `Debug`, no `Display`, no `Clone` into non-zeroizing memory.
pub struct Secret(Zeroizing<String>);

// === impl Secret ===

impl Secret {
    /// A fresh random token: `skep_` + 32 random bytes in hex.
    pub fn generate() -> Secret {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(bytes.as_mut());
        let mut s = Zeroizing::new(String::with_capacity(TOKEN_PREFIX.len() + 64));
        s.push_str(TOKEN_PREFIX);
        s.push_str(&hex::encode(bytes.as_ref()));
        Secret(s)
    }

    /// Wraps a token that arrived over the wire (e.g. a key issued by the queen).
    pub fn from_string(s: String) -> Secret {
        Secret(Zeroizing::new(s))
    }

    /// Loads a secret from a file, refusing files that group or others can read.
    pub fn from_file(path: &Path) -> Result<Secret, SecretError> {
        let io = |source| SecretError::Io {
            path: path.to_owned(),
            source,
        };
        let meta = fs::metadata(path).map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SecretError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        if meta.len() > MAX_SECRET_LEN {
            return Err(SecretError::TooLarge {
                path: path.to_owned(),
            });
        }
        let raw = Zeroizing::new(fs::read_to_string(path).map_err(io)?);
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(SecretError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(Secret(Zeroizing::new(trimmed.to_owned())))
    }

    /// Writes the secret to a new file created with mode 0600; never overwrites.
    pub fn write_new(&self, path: &Path) -> Result<(), SecretError> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::AlreadyExists => SecretError::Exists {
                    path: path.to_owned(),
                },
                _ => SecretError::Io {
                    path: path.to_owned(),
                    source,
                },
            })?;
        f.write_all(self.0.as_bytes())
            .and_then(|_| f.write_all(b"\n"))
            .and_then(|_| f.sync_all())
            .map_err(|source| SecretError::Io {
                path: path.to_owned(),
                source,
            })
    }

    /// Loads the secret at `path`, creating it (0600) first if it does not exist yet.
    pub fn load_or_create(path: &Path) -> Result<Secret, SecretError> {
        match Secret::generate().write_new(path) {
            Ok(()) | Err(SecretError::Exists { .. }) => Secret::from_file(path),
            Err(e) => Err(e),
        }
    }

    /// The secret's text. Call sites are few and greppable on purpose.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Resolves a secret file name: a systemd credential (`$CREDENTIALS_DIRECTORY/<name>`) wins over
/// the fallback path, so units can use `LoadCredential=` without extra flags.
pub fn credential_path(name: &str, fallback: &Path) -> PathBuf {
    match std::env::var_os("CREDENTIALS_DIRECTORY") {
        Some(dir) if Path::new(&dir).join(name).is_file() => Path::new(&dir).join(name),
        _ => fallback.to_owned(),
    }
}

#[cfg(test)]
mod tests;
