//! `skep-ptx DIR`: writes each kernel module the backend embeds as DIR/<stem>.ptx, byte for
//! byte, so the PTX can be checked with ptxas (scripts/ptx-check.sh) without a GPU.

use anyhow::{Context, bail};
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        bail!("usage: skep-ptx DIR");
    };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (stem, ptx) in skep_cuda::ptx::MODULES {
        let path = dir.join(format!("{stem}.ptx"));
        std::fs::write(&path, ptx).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}
