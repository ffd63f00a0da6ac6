//! Where a weight matrix's bytes live: a range of a read-only mapping of the model file, shared
//! by every matrix of the model and by every process that maps the same file, or an owned copy.
//!
//! A worker maps its GGUF file once and its matrices in the file's own block layout read their
//! blocks from the mapping in place, so the weights are the page cache's pages: N workers of a
//! pool on one file hold one copy of them between them. This is the one module of the crate
//! with `unsafe` code (the mapping itself); the kernels read the bytes through plain slices.

use std::fs::File;
use std::ops::Range;
use std::sync::Arc;

use crate::KernelError;

/// A read-only, shared mapping of a whole file.
pub struct Mapping {
    map: memmap2::Mmap,
    /// Device and inode of the file mapped, which say whether two mappings share their pages.
    identity: (u64, u64),
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mapping({} bytes)", self.map.len())
    }
}

impl Mapping {
    /// Maps `file` (opened for reading) read-only and shared with every other mapping of it.
    pub fn of_file(file: &File) -> std::io::Result<Arc<Self>> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata()?;
        // SAFETY: the mapping is read-only and only ever read as bytes (every bit pattern is a
        // valid `u8`), and it lives as long as every slice taken from it (they borrow `self`,
        // matrices hold an `Arc`). What `Mmap::map` cannot rule out is another process
        // changing the file while it is mapped: a write would change weights under a running
        // job, a truncation would make reading the lost pages raise SIGBUS. skep never writes a
        // model file in place: the pool keeps catalogue models under their SHA-256 in its
        // private data dir, written once and renamed into place, and docs/MODELS.md tells
        // operators to replace a local model file by renaming a new one over it (which leaves
        // running workers on the old inode), never by rewriting it. llama.cpp maps its models
        // under the same assumption.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(file)? };
        Ok(Arc::new(Mapping {
            map,
            identity: (meta.dev(), meta.ino()),
        }))
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// `(device, inode)` of the file mapped.
    pub fn file_identity(&self) -> (u64, u64) {
        self.identity
    }
}

/// The bytes of one weight tensor in its file layout: borrowed from a shared mapping, or owned.
#[derive(Clone)]
pub struct WeightBytes(Source);

#[derive(Clone)]
enum Source {
    Mapped {
        map: Arc<Mapping>,
        range: Range<usize>,
    },
    Owned(Arc<[u8]>),
}

impl std::fmt::Debug for WeightBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Source::Mapped { range, .. } => write!(f, "WeightBytes(mapped {range:?})"),
            Source::Owned(b) => write!(f, "WeightBytes(owned, {} bytes)", b.len()),
        }
    }
}

impl WeightBytes {
    /// `len` bytes at `start` of `map`, used in place. `start` must be a multiple of
    /// `alignment` (GGUF's `general.alignment`): the format pads every tensor to it, so an
    /// offset that is not means a tensor table that does not describe the file (llama.cpp
    /// refuses such files too). The kernels themselves read blocks with unaligned loads.
    pub fn mapped(
        map: Arc<Mapping>,
        start: usize,
        len: usize,
        alignment: usize,
    ) -> Result<Self, KernelError> {
        if alignment == 0 || !start.is_multiple_of(alignment) {
            return Err(KernelError::Misaligned { start, alignment });
        }
        let end = start
            .checked_add(len)
            .filter(|&end| end <= map.len())
            .ok_or(KernelError::OutOfFile {
                start,
                len,
                file: map.len(),
            })?;
        Ok(WeightBytes(Source::Mapped {
            map,
            range: start..end,
        }))
    }

    /// A private copy of `bytes`.
    pub fn copied(bytes: &[u8]) -> Self {
        WeightBytes(Source::Owned(bytes.into()))
    }

    pub fn as_slice(&self) -> &[u8] {
        match &self.0 {
            Source::Mapped { map, range } => &map.bytes()[range.clone()],
            Source::Owned(b) => b,
        }
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    /// The mapping these bytes are read from in place; `None` for a private copy.
    pub fn mapping(&self) -> Option<&Arc<Mapping>> {
        match &self.0 {
            Source::Mapped { map, .. } => Some(map),
            Source::Owned(_) => None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A file holding `bytes`, opened for reading; its name is gone once this returns.
    pub(crate) fn temp_file(tag: &str, bytes: &[u8]) -> File {
        let dir = std::env::temp_dir().join(format!("skep-kernels-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("weights");
        std::fs::write(&path, bytes).unwrap();
        let f = File::open(&path).unwrap();
        // The mapping keeps the inode alive; the name is not needed any more.
        std::fs::remove_dir_all(&dir).unwrap();
        f
    }

    fn counting(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn a_mapped_range_reads_the_file_in_place() {
        let data = counting(4096);
        let map = Mapping::of_file(&temp_file("range", &data)).unwrap();
        assert_eq!(map.bytes(), &data[..]);
        let w = WeightBytes::mapped(Arc::clone(&map), 64, 100, 32).unwrap();
        assert_eq!(w.as_slice(), &data[64..164]);
        let inside = w.as_slice().as_ptr() as usize - map.bytes().as_ptr() as usize;
        assert_eq!(inside, 64, "the bytes are the mapping's own, not a copy");
        assert!(Arc::ptr_eq(w.mapping().unwrap(), &map));
        assert!(WeightBytes::copied(&data[..8]).mapping().is_none());
    }

    #[test]
    fn misaligned_or_out_of_file_ranges_are_refused() {
        let map = Mapping::of_file(&temp_file("refuse", &counting(1000))).unwrap();
        assert_eq!(
            WeightBytes::mapped(Arc::clone(&map), 40, 8, 32).unwrap_err(),
            KernelError::Misaligned {
                start: 40,
                alignment: 32
            }
        );
        assert!(matches!(
            WeightBytes::mapped(Arc::clone(&map), 0, 8, 0),
            Err(KernelError::Misaligned { .. })
        ));
        assert_eq!(
            WeightBytes::mapped(Arc::clone(&map), 992, 9, 32).unwrap_err(),
            KernelError::OutOfFile {
                start: 992,
                len: 9,
                file: 1000
            }
        );
        assert!(matches!(
            WeightBytes::mapped(map, 32, usize::MAX, 32),
            Err(KernelError::OutOfFile { .. })
        ));
    }
}

/// A quantized matrix's shape and blocks: `rows` rows of `cols` values, each row a run of blocks
/// of `block_values` values in `block_bytes` bytes each, in the file's layout. The one place a
/// tensor's length is checked against its shape (with checked arithmetic: the shape comes from
/// the file) and a row's blocks are found.
#[derive(Clone)]
pub(crate) struct Blocks {
    rows: usize,
    cols: usize,
    row_bytes: usize,
    bytes: WeightBytes,
}

impl Blocks {
    pub(crate) fn new(
        rows: usize,
        cols: usize,
        block_values: usize,
        block_bytes: usize,
        bytes: WeightBytes,
    ) -> Result<Self, KernelError> {
        if !cols.is_multiple_of(block_values) {
            return Err(KernelError::Ragged { cols });
        }
        let row_bytes = cols / block_values * block_bytes;
        let expected = rows.checked_mul(row_bytes);
        if expected != Some(bytes.len()) {
            return Err(KernelError::Size {
                rows,
                cols,
                expected: expected.unwrap_or(usize::MAX),
                got: bytes.len(),
            });
        }
        Ok(Blocks {
            rows,
            cols,
            row_bytes,
            bytes,
        })
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    pub(crate) fn bytes(&self) -> &WeightBytes {
        &self.bytes
    }

    /// The blocks of row `r`.
    pub(crate) fn row(&self, r: usize) -> &[u8] {
        &self.bytes.as_slice()[r * self.row_bytes..(r + 1) * self.row_bytes]
    }
}
