//! Launch arithmetic: the grid and block of every kernel, the weight formats' block sizes, and
//! the limits checked before a launch — pure functions, tested without a GPU.
//!
//! The constants mirror the `#define`s at the top of kernels/decoder.cu; a kernel indexes its
//! rows with exactly the arithmetic `cover_matmul` replays in the tests.

/// Threads per warp.
pub const WARP: u32 = 32;
/// Matrix rows per block of a product (one warp each).
pub const MM_ROWS: u32 = 4;
/// Token rows per block of a product: a weight unit is dequantized once for this many.
pub const MM_TOKENS: u32 = 8;
/// Threads of the norm kernel.
pub const NORM_THREADS: u32 = 256;
/// Threads of the attention kernel; each owns up to two dimensions of the output.
pub const ATT_THREADS: u32 = 128;
/// Threads of the element-wise kernels.
pub const ELEMENTWISE_THREADS: u32 = 256;
/// Largest head the attention kernel takes.
pub const MAX_HEAD_DIM: usize = 2 * ATT_THREADS as usize;
/// CUDA's limit on a grid's y and z dimensions.
pub const MAX_GRID_YZ: u32 = 65_535;
/// CUDA's limit on a grid's x dimension.
pub const MAX_GRID_X: u32 = i32::MAX as u32;

/// A kernel launch's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
}

/// Why a launch was refused before it reached the GPU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaunchError {
    #[error("{what} is {value}, more than the kernel's limit of {limit}")]
    TooLarge {
        what: &'static str,
        value: usize,
        limit: usize,
    },
    #[error("{0}")]
    BadShape(String),
}

/// The quantized weight formats the GPU products read, in GGUF's block layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantKind {
    Q4_0,
    Q4_1,
    Q5_0,
    Q8_0,
    Q4K,
    Q6K,
}

impl QuantKind {
    pub const ALL: [QuantKind; 6] = [
        QuantKind::Q4_0,
        QuantKind::Q4_1,
        QuantKind::Q5_0,
        QuantKind::Q8_0,
        QuantKind::Q4K,
        QuantKind::Q6K,
    ];

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            QuantKind::Q4K | QuantKind::Q6K => 256,
            _ => 32,
        }
    }

    /// Bytes per block (ggml's `block_q*` structs).
    pub fn block_bytes(self) -> usize {
        match self {
            QuantKind::Q4_0 => 18,
            QuantKind::Q4_1 => 20,
            QuantKind::Q5_0 => 22,
            QuantKind::Q8_0 => 34,
            QuantKind::Q4K => 144,
            QuantKind::Q6K => 210,
        }
    }

    /// The product kernel's name in the PTX.
    pub fn kernel(self) -> &'static str {
        match self {
            QuantKind::Q4_0 => "matmul_q4_0",
            QuantKind::Q4_1 => "matmul_q4_1",
            QuantKind::Q5_0 => "matmul_q5_0",
            QuantKind::Q8_0 => "matmul_q8_0",
            QuantKind::Q4K => "matmul_q4_k",
            QuantKind::Q6K => "matmul_q6_k",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantKind::Q4_0 => "Q4_0",
            QuantKind::Q4_1 => "Q4_1",
            QuantKind::Q5_0 => "Q5_0",
            QuantKind::Q8_0 => "Q8_0",
            QuantKind::Q4K => "Q4_K",
            QuantKind::Q6K => "Q6_K",
        }
    }

    /// Bytes of one row of `cols` values; an error when `cols` is not a whole number of blocks.
    pub fn row_bytes(self, cols: usize) -> Result<usize, LaunchError> {
        if cols == 0 || !cols.is_multiple_of(self.block_elems()) {
            return Err(LaunchError::BadShape(format!(
                "a {} row of {cols} values is not a whole number of {}-value blocks",
                self.name(),
                self.block_elems()
            )));
        }
        Ok(cols / self.block_elems() * self.block_bytes())
    }
}

fn grid_dim(what: &'static str, value: usize, limit: u32) -> Result<u32, LaunchError> {
    if value == 0 {
        return Err(LaunchError::BadShape(format!("{what} is 0")));
    }
    u32::try_from(value)
        .ok()
        .filter(|&v| v <= limit)
        .ok_or(LaunchError::TooLarge {
            what,
            value,
            limit: limit as usize,
        })
}

/// `y (tokens x rows) = x (tokens x cols) · Wᵀ`: a warp per row, `MM_ROWS` rows and
/// `MM_TOKENS` token rows per block.
pub fn matmul(
    kind: QuantKind,
    rows: usize,
    cols: usize,
    tokens: usize,
) -> Result<Shape, LaunchError> {
    kind.row_bytes(cols)?;
    let gx = grid_dim(
        "the row blocks of a product",
        rows.div_ceil(MM_ROWS as usize),
        MAX_GRID_X,
    )?;
    let gy = grid_dim(
        "the token blocks of a product",
        tokens.div_ceil(MM_TOKENS as usize),
        MAX_GRID_YZ,
    )?;
    Ok(Shape {
        grid: (gx, gy, 1),
        block: (WARP * MM_ROWS, 1, 1),
    })
}

/// One block per row of `dim` values (RMS norm).
pub fn per_row(rows: usize) -> Result<Shape, LaunchError> {
    Ok(Shape {
        grid: (grid_dim("rows", rows, MAX_GRID_X)?, 1, 1),
        block: (NORM_THREADS, 1, 1),
    })
}

/// One thread per element.
pub fn elementwise(n: usize) -> Result<Shape, LaunchError> {
    let blocks = n.div_ceil(ELEMENTWISE_THREADS as usize);
    Ok(Shape {
        grid: (grid_dim("element blocks", blocks, MAX_GRID_X)?, 1, 1),
        block: (ELEMENTWISE_THREADS, 1, 1),
    })
}

/// One warp per (token row, head): rotary embeddings, q/k norms, the cache store.
pub fn per_head(rows: usize, heads: usize, head_dim: usize) -> Result<Shape, LaunchError> {
    check_head(head_dim)?;
    Ok(Shape {
        grid: (
            grid_dim("token rows", rows, MAX_GRID_X)?,
            grid_dim("heads", heads, MAX_GRID_YZ)?,
            1,
        ),
        block: (WARP, 1, 1),
    })
}

/// One block per (token row, head).
pub fn attention(rows: usize, heads: usize, head_dim: usize) -> Result<Shape, LaunchError> {
    check_head(head_dim)?;
    Ok(Shape {
        grid: (
            grid_dim("token rows", rows, MAX_GRID_X)?,
            grid_dim("heads", heads, MAX_GRID_YZ)?,
            1,
        ),
        block: (ATT_THREADS, 1, 1),
    })
}

fn check_head(head_dim: usize) -> Result<(), LaunchError> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(LaunchError::BadShape(format!(
            "a head of {head_dim} values cannot be rotated in pairs"
        )));
    }
    if head_dim > MAX_HEAD_DIM {
        return Err(LaunchError::TooLarge {
            what: "the head size",
            value: head_dim,
            limit: MAX_HEAD_DIM,
        });
    }
    Ok(())
}

/// Replays the product kernel's indexing over a launch: for each `(token, row)` pair, how many
/// (block, warp, slot) triples compute it. The kernel is right when every pair is computed
/// exactly once and nothing outside the matrix is written.
pub fn cover_matmul(shape: &Shape, rows: usize, tokens: usize) -> Vec<u32> {
    let mut hits = vec![0u32; rows * tokens];
    let warps = shape.block.0 / WARP;
    for bx in 0..shape.grid.0 as usize {
        for by in 0..shape.grid.1 as usize {
            for w in 0..warps as usize {
                let r = bx * MM_ROWS as usize + w;
                if r >= rows {
                    continue; // the kernel returns
                }
                let t0 = by * MM_TOKENS as usize;
                let nt = (MM_TOKENS as usize).min(tokens.saturating_sub(t0));
                for t in t0..t0 + nt {
                    hits[t * rows + r] += 1;
                }
            }
        }
    }
    hits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_output_of_a_product_is_computed_once_for_odd_shapes() {
        for &(rows, tokens) in &[
            (1, 1),
            (3, 1),
            (5, 7),
            (4, 8),
            (9, 9),
            (49_155, 1),
            (33, 17),
            (576, 129),
        ] {
            let s = matmul(QuantKind::Q4K, rows, 256, tokens).unwrap();
            let hits = cover_matmul(&s, rows, tokens);
            assert!(
                hits.iter().all(|&h| h == 1),
                "{rows} rows x {tokens} tokens: {:?}",
                hits.iter().enumerate().find(|(_, h)| **h != 1)
            );
            // No block that does nothing but return: the grid is as small as it can be.
            assert_eq!(s.grid.0 as usize, rows.div_ceil(4));
            assert_eq!(s.grid.1 as usize, tokens.div_ceil(8));
        }
    }

    #[test]
    fn a_product_whose_width_is_not_whole_blocks_is_refused() {
        assert!(matches!(
            matmul(QuantKind::Q4K, 8, 960, 1),
            Err(LaunchError::BadShape(m)) if m.contains("960")
        ));
        assert!(matmul(QuantKind::Q8_0, 8, 960, 1).is_ok());
        assert!(matches!(
            matmul(QuantKind::Q8_0, 8, 0, 1),
            Err(LaunchError::BadShape(_))
        ));
    }

    #[test]
    fn empty_and_oversized_launches_are_refused() {
        assert!(matches!(
            matmul(QuantKind::Q4_1, 0, 64, 1),
            Err(LaunchError::BadShape(_))
        ));
        assert!(matches!(
            matmul(QuantKind::Q4_1, 8, 64, 0),
            Err(LaunchError::BadShape(_))
        ));
        // grid.y caps the tokens of one launch at 65,535 blocks of 8.
        assert!(matmul(QuantKind::Q4_1, 8, 64, 65_535 * 8).is_ok());
        assert!(matches!(
            matmul(QuantKind::Q4_1, 8, 64, 65_535 * 8 + 1),
            Err(LaunchError::TooLarge { .. })
        ));
        assert!(matches!(
            per_head(1, 70_000, 64),
            Err(LaunchError::TooLarge { .. })
        ));
        assert!(matches!(
            attention(1, 8, 512),
            Err(LaunchError::TooLarge { .. })
        ));
        assert!(matches!(attention(1, 8, 63), Err(LaunchError::BadShape(_))));
        assert!(attention(1, 8, 256).is_ok());
    }

    #[test]
    fn element_wise_grids_cover_every_element_with_one_partial_block() {
        for n in [1, 255, 256, 257, 8192 * 3 + 5] {
            let s = elementwise(n).unwrap();
            let threads = s.grid.0 as usize * s.block.0 as usize;
            assert!(
                threads >= n && threads - n < ELEMENTWISE_THREADS as usize,
                "{n}"
            );
        }
    }

    #[test]
    fn row_bytes_match_ggml_block_sizes() {
        // SmolLM2's 576-wide rows and a 1B model's 2048-wide rows.
        assert_eq!(QuantKind::Q8_0.row_bytes(576).unwrap(), 18 * 34);
        assert_eq!(QuantKind::Q4_1.row_bytes(576).unwrap(), 18 * 20);
        assert_eq!(QuantKind::Q5_0.row_bytes(2048).unwrap(), 64 * 22);
        assert_eq!(QuantKind::Q4_0.row_bytes(2048).unwrap(), 64 * 18);
        assert_eq!(QuantKind::Q4K.row_bytes(2048).unwrap(), 8 * 144);
        assert_eq!(QuantKind::Q6K.row_bytes(2048).unwrap(), 8 * 210);
    }

    #[test]
    fn the_constants_match_the_kernel_source() {
        let src = include_str!("../kernels/decoder.cu");
        for (name, value) in [
            ("MM_ROWS", MM_ROWS),
            ("MM_TOKENS", MM_TOKENS),
            ("NORM_THREADS", NORM_THREADS),
            ("ATT_THREADS", ATT_THREADS),
        ] {
            let line = format!("#define {name} {value}\n");
            assert!(
                src.contains(&line),
                "decoder.cu does not say `{}`",
                line.trim()
            );
        }
        for kind in QuantKind::ALL {
            let entry = format!("MATMUL_KERNEL({}, ", kind.kernel());
            assert!(src.contains(&entry), "decoder.cu has no {}", kind.kernel());
        }
    }
}
