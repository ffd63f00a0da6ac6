//! The GGUF engine maps its model file and uses the weights in place: checked on the real
//! SmolLM2 and Gemma 3 files through the engine's own accounting and the kernel's page counts
//! (`/proc/self/smaps`), never through timings.
//!
//! The models are not in the repository: `scripts/fetch-model.sh smollm2` and `gemma3` install
//! them. A missing model fails these tests loudly instead of skipping them.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use skep_worker::engine::gguf::{GgufEngine, GgufOptions};

/// The tests below read this process's memory figures; they run one at a time so that one
/// test's loading does not count in the other's.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn smollm2() -> PathBuf {
    common::model_path("smollm2-135m-instruct-q4_1.gguf", "smollm2")
}

fn gemma3() -> PathBuf {
    common::model_path("gemma-3-270m-q4_k_m.gguf", "gemma3")
}

fn file_len(p: &Path) -> usize {
    usize::try_from(std::fs::metadata(p).unwrap().len()).unwrap()
}

/// Sums of one mapping's page counts in /proc/self/smaps, in bytes.
#[derive(Debug, Default, Clone, Copy)]
struct Vma {
    rss: usize,
    pss: usize,
    private_dirty: usize,
    anonymous: usize,
}

/// The mappings of `path` in this process, from /proc/self/smaps.
fn mappings_of(path: &Path) -> Vec<Vma> {
    let path = std::fs::canonicalize(path).unwrap();
    let path = path.to_str().unwrap();
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut out = Vec::new();
    let mut current: Option<Vma> = None;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: address range, perms, offset, device, inode, path.
            out.extend(current.take());
            if line.ends_with(path) {
                current = Some(Vma::default());
            }
            continue;
        }
        let Some(vma) = current.as_mut() else {
            continue;
        };
        let kb: usize = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        match first {
            "Rss:" => vma.rss = kb * 1024,
            "Pss:" => vma.pss = kb * 1024,
            "Private_Dirty:" => vma.private_dirty = kb * 1024,
            "Anonymous:" => vma.anonymous = kb * 1024,
            _ => {}
        }
    }
    out.extend(current);
    out
}

/// This process's anonymous resident memory (`RssAnon`), in bytes.
fn rss_anon() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .expect("RssAnon in /proc/self/status");
    let kb: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

fn load(path: &Path, name: &str) -> GgufEngine {
    GgufEngine::load(path, name, GgufOptions::default()).expect("load the model")
}

/// SmolLM2's weights are Q4_1 matrices, a Q8_0 token table and f32 norms: all but the norms
/// (0.1% of the file) are read in place.
#[test]
fn smollm2_weights_are_used_in_place_from_the_mapped_file() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let path = smollm2();
    let e = load(&path, "smollm2");
    let m = e.weight_memory();
    let file = file_len(&path);
    assert!(m.mapped > file * 95 / 100, "{m:?} of a {file}-byte file");
    assert!(m.copied < 1 << 20, "{m:?}");
}

/// Gemma 3's Q8_0 token table and Q5_0 matrices are read in place; its k-quant matrices (Q4_K,
/// Q6_K), which candle's kernels take only as buffers of their own, and its norms are copied.
#[test]
fn gemma3_q8_0_and_q5_0_weights_are_used_in_place() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let path = gemma3();
    let e = load(&path, "gemma3");
    let m = e.weight_memory();
    let file = file_len(&path);
    // 223 MB of Q8_0 and Q5_0 against 23 MB of k-quants and norms, in a 253 MB file.
    assert!(m.mapped > file * 85 / 100, "{m:?} of a {file}-byte file");
    assert!(m.copied < file * 10 / 100, "{m:?} of a {file}-byte file");
}

/// Two engines on one file (as two workers of a pool are) read the same pages: each maps the
/// file and touches every weight in it, yet the pages are counted once between the mappings
/// (proportional set size about half the resident size), none is a private copy, and loading
/// the second engine does not add a copy of the weights to the process's anonymous memory.
#[test]
fn two_engines_on_one_file_share_its_pages() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let path = smollm2();
    let mut a = load(&path, "smollm2");
    let anon_before = rss_anon();
    let mut b = load(&path, "smollm2");
    let anon_added = rss_anon().saturating_sub(anon_before);
    assert_eq!(a.weight_memory(), b.weight_memory());
    let mapped = a.weight_memory().mapped;
    // Loading ran every matrix once (the warm-up pass); a job on each touches them again.
    let ids_a = a.greedy_token_ids("Name a colour.", 4).unwrap();
    let ids_b = b.greedy_token_ids("Name a colour.", 4).unwrap();
    assert_eq!(ids_a, ids_b);
    let vmas = mappings_of(&path);
    assert!(
        vmas.len() >= 2,
        "the file is mapped {} times: {vmas:?}",
        vmas.len()
    );
    for v in &vmas {
        assert!(v.rss > mapped * 9 / 10, "a mapping holds too little: {v:?}");
        assert_eq!(v.private_dirty, 0, "a page of the file was copied: {v:?}");
        assert_eq!(v.anonymous, 0, "a page of the file was copied: {v:?}");
    }
    let (rss, pss) = vmas.iter().fold((0, 0), |(r, p), v| (r + v.rss, p + v.pss));
    assert!(
        pss * 10 <= rss * 6,
        "the mappings do not share their pages: Pss {pss} of Rss {rss} ({vmas:?})"
    );
    assert!(
        anon_added < mapped / 4,
        "the second engine added {anon_added} bytes of anonymous memory for {mapped} bytes of \
         mapped weights"
    );
}

/// A tensor whose data does not start on the file's alignment (GGUF pads every tensor to it, so
/// the tensor table does not describe the file) is refused at load, with the tensor named,
/// rather than read from wherever the offset points.
#[test]
fn a_misaligned_tensor_is_refused_at_load() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut bytes = std::fs::read(smollm2()).unwrap();
    // In the tensor table: name length (u64), name, dimension count (u32), dimensions (u64
    // each), type (u32), offset (u64).
    let name = b"blk.0.attn_q.weight";
    let mut entry = (name.len() as u64).to_le_bytes().to_vec();
    entry.extend_from_slice(name);
    let at = bytes
        .windows(entry.len())
        .position(|w| w == entry)
        .expect("the tensor's entry in the table")
        + entry.len();
    let dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let offset_at = at + 4 + 8 * dims + 4;
    let offset = u64::from_le_bytes(bytes[offset_at..offset_at + 8].try_into().unwrap());
    bytes[offset_at..offset_at + 8].copy_from_slice(&(offset + 2).to_le_bytes());
    let dir = std::env::temp_dir().join(format!("skep-misaligned-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("misaligned.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let err = GgufEngine::load(&path, "smollm2", GgufOptions::default())
        .map(|_| ())
        .unwrap_err()
        .to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        err.contains("blk.0.attn_q.weight") && err.contains("not aligned"),
        "{err}"
    );
}
