//! Splitting a matrix product's output rows over candle's worker threads.
//!
//! The engine's other operations already run on candle's persistent barrier pool; using the
//! same pool keeps one set of threads busy instead of two sets fighting over the cores.

use std::sync::Mutex;

use crate::q8_1::Q8_1Row;

/// Multiply-adds below which a product runs on the calling thread alone.
const INLINE_BELOW: usize = 1 << 18;

/// Calls `fill(rows, buf)` for disjoint row ranges covering `0..rows` on the pool's threads;
/// `buf` holds `m` values per row of the range, token-major (`buf[t * len + i]`). The results
/// are written to `out` (`m` x `rows`, token-major). `work` is the product's multiply-add count.
pub(crate) fn for_row_ranges<F>(rows: usize, m: usize, work: usize, out: &mut [f32], fill: F)
where
    F: Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
{
    debug_assert_eq!(out.len(), rows * m);
    let Some((pool, piece)) = plan(rows, 8, work) else {
        // Over the whole range `buf`'s layout is `out`'s.
        fill(0..rows, out);
        return;
    };
    if m == 1 {
        // One token: the output rows are contiguous, each piece writes its own slice.
        for_item_ranges_in(pool, piece, rows, 1, out, fill);
        return;
    }
    let pieces = rows.div_ceil(piece);
    let bufs: Vec<Mutex<Vec<f32>>> = (0..pieces).map(|_| Mutex::new(Vec::new())).collect();
    pool.execute_chunked(pieces, |range| {
        for p in range {
            let start = p * piece;
            let end = rows.min(start + piece);
            let mut buf = vec![0f32; m * (end - start)];
            fill(start..end, &mut buf);
            *bufs[p].lock().unwrap_or_else(|e| e.into_inner()) = buf;
        }
    });
    for (p, buf) in bufs.into_iter().enumerate() {
        let buf = buf.into_inner().unwrap_or_else(|e| e.into_inner());
        let start = p * piece;
        let len = buf.len() / m;
        for t in 0..m {
            out[t * rows + start..t * rows + start + len]
                .copy_from_slice(&buf[t * len..(t + 1) * len]);
        }
    }
}

/// Calls `fill(items, out_part)` for disjoint item ranges covering `0..items` on the pool's
/// threads, where `out` holds `width` values per item, item-major, and `out_part` is the slice
/// of `out` belonging to the range. `work` is the operation count, as for `for_row_ranges`.
/// `per_thread` ranges per thread: a few balance threads slowed by something else; one keeps
/// adjacent items together for callers whose neighbours share reads.
pub(crate) fn for_item_ranges<F>(
    items: usize,
    width: usize,
    work: usize,
    per_thread: usize,
    out: &mut [f32],
    fill: F,
) where
    F: Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
{
    debug_assert_eq!(out.len(), items * width);
    match plan_split(items, 1, work, per_thread) {
        Some((pool, piece)) => for_item_ranges_in(pool, piece, items, width, out, fill),
        None => fill(0..items, out),
    }
}

/// The pool and the piece size (at least `min_piece` items) to split `items` into, or `None`
/// when `work` is too small to be worth waking the other threads for.
fn plan(
    items: usize,
    min_piece: usize,
    work: usize,
) -> Option<(&'static candle_core::utils::BarrierPool, usize)> {
    plan_split(items, min_piece, work, 4)
}

fn plan_split(
    items: usize,
    min_piece: usize,
    work: usize,
    per_thread: usize,
) -> Option<(&'static candle_core::utils::BarrierPool, usize)> {
    if work < INLINE_BELOW {
        return None;
    }
    let pool = candle_core::utils::barrier_pool();
    let threads = pool.n_workers() + 1;
    // A few pieces per thread so a thread slowed by something else is made up for by the others.
    Some((pool, items.div_ceil(threads * per_thread).max(min_piece)))
}

fn for_item_ranges_in<F>(
    pool: &candle_core::utils::BarrierPool,
    piece: usize,
    items: usize,
    width: usize,
    out: &mut [f32],
    fill: F,
) where
    F: Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
{
    let slices: Vec<Mutex<&mut [f32]>> = out.chunks_mut(piece * width).map(Mutex::new).collect();
    pool.execute_chunked(items.div_ceil(piece), |range| {
        for p in range {
            let start = p * piece;
            let mut slice = slices[p].lock().unwrap_or_else(|e| e.into_inner());
            let n = slice.len() / width;
            fill(start..start + n, &mut slice);
        }
    });
}

/// `out = x · Wᵀ` for a `rows` x `cols` quantized matrix `W` given by `row_dot(r, a)`, the dot
/// product of its row `r` with one quantized activation row. `x` is `m` x `cols`, `out` is
/// `m` x `rows`. Panics if the lengths do not match (a bug in the caller, not bad input).
pub(crate) fn quantized_product<F>(
    rows: usize,
    cols: usize,
    x: &[f32],
    m: usize,
    out: &mut [f32],
    row_dot: F,
) where
    F: Fn(usize, &Q8_1Row) -> f32 + Sync,
{
    quantized_product_prepared(
        rows,
        cols,
        x,
        m,
        out,
        |r, row: &mut usize| *row = r,
        |&r, a| row_dot(r, a),
    );
}

/// Like `quantized_product`, for weights whose rows are worth decoding once per product rather
/// than once per activation row: `prepare(r, scratch)` decodes row `r` into `scratch` (one per
/// thread, reused), then `row_dot(scratch, a)` runs for each activation row `a`.
pub(crate) fn quantized_product_prepared<S, P, F>(
    rows: usize,
    cols: usize,
    x: &[f32],
    m: usize,
    out: &mut [f32],
    prepare: P,
    row_dot: F,
) where
    S: Default,
    P: Fn(usize, &mut S) + Sync,
    F: Fn(&S, &Q8_1Row) -> f32 + Sync,
{
    assert_eq!(x.len(), m * cols, "activations do not match the matrix");
    assert_eq!(out.len(), m * rows, "output does not match the matrix");
    if m == 0 || rows == 0 {
        return;
    }
    // One quantizer serves Q8_0 and Q8_1 activations: Q8_0's are Q8_1's without the sum term.
    let acts: Vec<Q8_1Row> = x.chunks_exact(cols).map(Q8_1Row::quantize).collect();
    for_row_ranges(rows, m, rows * cols * m, out, |range, buf| {
        let len = range.len();
        let mut scratch = S::default();
        for (i, r) in range.enumerate() {
            prepare(r, &mut scratch);
            for (t, a) in acts.iter().enumerate() {
                buf[t * len + i] = row_dot(&scratch, a);
            }
        }
    });
}

/// Like `quantized_product_prepared`, with `row_dots(scratch, acts, out)` computing the prepared
/// row's products with all the activation rows at once (`out[t]` for `acts[t]`), so a kernel can
/// unpack each weight block once for several activation rows.
pub(crate) fn quantized_product_batched<S, P, F>(
    rows: usize,
    cols: usize,
    x: &[f32],
    m: usize,
    out: &mut [f32],
    prepare: P,
    row_dots: F,
) where
    S: Default,
    P: Fn(usize, &mut S) + Sync,
    F: Fn(&S, &[Q8_1Row], &mut [f32]) + Sync,
{
    assert_eq!(x.len(), m * cols, "activations do not match the matrix");
    assert_eq!(out.len(), m * rows, "output does not match the matrix");
    if m == 0 || rows == 0 {
        return;
    }
    let acts: Vec<Q8_1Row> = x.chunks_exact(cols).map(Q8_1Row::quantize).collect();
    for_row_ranges(rows, m, rows * cols * m, out, |range, buf| {
        let len = range.len();
        let mut scratch = S::default();
        let mut dots = vec![0f32; m];
        for (i, r) in range.enumerate() {
            prepare(r, &mut scratch);
            row_dots(&scratch, &acts, &mut dots);
            for (t, d) in dots.iter().enumerate() {
                buf[t * len + i] = *d;
            }
        }
    });
}
