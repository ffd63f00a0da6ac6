//! Shared by the real-model test files: where the model files are.

use std::path::PathBuf;

/// `file` in the model cache (`SKEP_MODEL_DIR`, default `~/.cache/skep/models`). A missing model
/// fails the test loudly, saying how to fetch it; it is never skipped.
pub fn model_path(file: &str, fetch_name: &str) -> PathBuf {
    let dir = match std::env::var_os("SKEP_MODEL_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let home = std::env::var_os("HOME").expect("HOME is not set");
            PathBuf::from(home).join(".cache/skep/models")
        }
    };
    let path = dir.join(file);
    assert!(
        path.is_file(),
        "model file {} is missing: run `scripts/fetch-model.sh {fetch_name}` first \
         (or point SKEP_MODEL_DIR at the directory holding {file})",
        path.display()
    );
    path
}
