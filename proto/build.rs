//! Compiles `skep/v1/*.proto` with protox (pure Rust), so no system `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["jobs", "pool", "nodes", "tokens", "lane", "bench", "models"]
        .map(|f| format!("skep/v1/{f}.proto"));
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(&files, ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
