//! Products with a frozen int8 weight through the CPU's int8 dot product (AVX512-VNNI,
//! `vpdpbusd`: 64 multiply-adds per instruction, twice bf16's and four times f32's):
//! `y = x·Wᵀ` with the activations quantized per token and LLM.int8's outlier decomposition,
//! and `dx (+)= dY·W` with `dY` quantized per token; i32 accumulation, rescaled to f32.
//!
//! The weight is `--load_in_8bit`'s: int8 with an absmax scale per output row (`s_j`), stored
//! as `u8 = w + 128`. That unsigned form is what `vpdpbusd` wants in its first operand, and the
//! activations (signed int8) are the second, so for a row `i` of activations quantized as
//! `x_ik ≈ a_i·q_ik`
//!
//! `Σ_k x_ik·W_jk ≈ a_i·s_j·(Σ_k (w_jk + 128)·q_ik − 128·Σ_k q_ik)`:
//!
//! the correction is a sum over the activation row, taken while quantizing it, so any rows of
//! a packed weight (a module's share of `q|k|v`) reduce correctly.
//!
//! - **Forward** (LLM.int8's decomposition): a token's features of magnitude above
//!   [`OUTLIER_THRESHOLD`] are left out of its int8 row and of its scale, and go through an
//!   f32 product with their dequantized weight columns instead, so one large feature does not
//!   wipe out the resolution of the others. bitsandbytes takes a whole column out once any
//!   token of the batch exceeds the threshold; per token, each token's result depends on its
//!   own features only, whatever else its micro-batch holds (padding in the model's graph,
//!   other sequences).
//! - **Backward**: `dY·W = (dY·diag(s))·Wq`, so the row scales fold into `dY` before it is
//!   quantized per token and the same kernel runs over W packed the other way.
//!
//! Layout: `vpdpbusd` adds four adjacent byte products into each 32-bit lane, so a packed
//! operand holds, per panel of 16 output columns, the quads `(k..k + 4)` of each column:
//! `[panel][k/4][16][4]` (2 bytes per weight for both products). Every element of C sums its
//! k-blocks in a fixed order whatever the thread count (deterministic).
//!
//! Why hand-written: no crate in reach has an int8 GEMM with this instruction for these
//! formats. candle's quantized matmul (`quantized/repack_x86.rs` has VNNI kernels) works on
//! GGML's Q8_0 blocks of 32 with f16 scales and quantizes activations per block of 32 (not per
//! token, no outlier columns); `gemm` 0.19 has no integer kernels; oneDNN and FBGEMM are C++
//! libraries a cold CI would build or download. Without VNNI (or with `LORAFLEET_NARROW=f32`)
//! callers use the dequantize-and-f32 path (`kernels_available` says which).

use super::gemm::{MatMut, MatRef};
use super::narrow::PANEL;
use rayon::prelude::*;

/// A token's features whose magnitude exceeds this run in f32 (bitsandbytes'
/// `llm_int8_threshold` default).
pub const OUTLIER_THRESHOLD: f32 = 6.0;

/// Reduction elements per 32-bit lane.
const QUAD: usize = 4;

/// One packed operand `B` (`k × n`) of `C = A·B`, as `u8 = int8 + 128`: panels of 16
/// columns, quads of k (padded with 128, a zero weight).
#[derive(Debug, Default)]
struct Quads {
    data: Vec<u8>,
    /// Quads of k per panel.
    quads: usize,
}

impl Quads {
    /// Packs `get(k, j)` for `k < rows`, `j < cols`.
    fn pack(rows: usize, cols: usize, get: impl Fn(usize, usize) -> u8 + Sync) -> Self {
        let quads = rows.div_ceil(QUAD);
        let stride = quads * PANEL * QUAD;
        let mut data = vec![128u8; cols.div_ceil(PANEL) * stride];
        data.par_chunks_mut(stride.max(1)).enumerate().for_each(|(panel, dst)| {
            for c in 0..PANEL.min(cols - panel * PANEL) {
                let j = panel * PANEL + c;
                for k in 0..rows {
                    dst[((k / QUAD) * PANEL + c) * QUAD + k % QUAD] = get(k, j);
                }
            }
        });
        Self { data, quads }
    }

    /// Bytes from one panel to the next.
    fn stride(&self) -> usize {
        self.quads * PANEL * QUAD
    }

    /// The stored int8 value at `(k, j)`.
    fn get(&self, k: usize, j: usize) -> i32 {
        let at = (j / PANEL) * self.stride() + ((k / QUAD) * PANEL + j % PANEL) * QUAD + k % QUAD;
        i32::from(self.data[at]) - 128
    }
}

/// A frozen int8 `[out, in]` weight with one scale per row, packed for both products.
#[derive(Debug)]
pub struct PackedInt8 {
    /// `Wᵀ` (`in × out`), for `x·Wᵀ`.
    fwd: Quads,
    /// `W` (`out × in`), for `dY·W`.
    bwd: Quads,
    /// `[out]`.
    scales: Vec<f32>,
    /// The first row of each module the weight concatenates (q|k|v): the backward
    /// quantizes each module's share of dY on its own.
    modules: Vec<usize>,
    out: usize,
    inp: usize,
}

impl PackedInt8 {
    /// Packs `q` (`[out, in]` row-major, `u8 = int8 + 128`) with its row scales.
    pub fn new(q: &[u8], scales: &[f32], out: usize, inp: usize) -> Self {
        assert!(
            q.len() == out * inp && scales.len() == out,
            "int8 pack: {} values, {} scales for {out}x{inp}",
            q.len(),
            scales.len()
        );
        let fwd = Quads::pack(inp, out, |k, j| q[j * inp + k]);
        let bwd = Quads::pack(out, inp, |k, j| q[k * inp + j]);
        Self { fwd, bwd, scales: scales.to_vec(), modules: vec![0], out, inp }
    }

    /// The same weight as the concatenation of modules whose first rows are `starts`
    /// (each a multiple of 16, the first 0), as [`PackedInt8::rows`] views them.
    pub fn with_modules(mut self, starts: &[usize]) -> Self {
        assert!(starts.first() == Some(&0) && starts.iter().all(|s| s.is_multiple_of(PANEL) && *s < self.out.max(1)));
        self.modules = starts.to_vec();
        self
    }

    /// `[out, in]`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// The whole weight.
    pub fn full(&self) -> Int8Weight<'_> {
        Int8Weight { packed: self, r0: 0, rows: self.out }
    }

    /// Rows `r0..r0 + rows` (a module's share of a concatenated weight); `None` unless `r0`
    /// starts a panel.
    pub fn rows(&self, r0: usize, rows: usize) -> Option<Int8Weight<'_>> {
        (r0.is_multiple_of(PANEL) && r0 + rows <= self.out).then_some(Int8Weight { packed: self, r0, rows })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.fwd.data.len() + self.bwd.data.len() + 4 * self.scales.len()
    }
}

/// Rows `r0..r0 + rows` of a [`PackedInt8`]: the weight of one module.
#[derive(Clone, Copy, Debug)]
pub struct Int8Weight<'a> {
    packed: &'a PackedInt8,
    r0: usize,
    rows: usize,
}

/// Reused buffers of one caller: the quantized activations with their scales and
/// corrections, and the outlier columns' operands.
#[derive(Default, Debug)]
pub struct Int8Scratch {
    narrow: Vec<i8>,
    scale: Vec<f32>,
    corr: Vec<i32>,
    outliers: Vec<usize>,
    /// The outlier columns' weights, one row of `rows` per column.
    w_out: Vec<f32>,
}

impl Int8Weight<'_> {
    /// `[rows, in]`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.packed.inp)
    }

    /// Weight `(j, c)` of this view, dequantized.
    fn dequantized(&self, j: usize, c: usize) -> f32 {
        let row = self.r0 + j;
        self.packed.fwd.get(c, row) as f32 * self.packed.scales[row]
    }

    /// The weight dequantized to f32 `[rows, in]`.
    pub fn to_f32(&self) -> Vec<f32> {
        let k = self.packed.inp;
        let mut out = vec![0f32; self.rows * k];
        out.par_chunks_mut(k.max(1)).enumerate().for_each(|(j, row)| {
            for (c, v) in row.iter_mut().enumerate() {
                *v = self.dequantized(j, c);
            }
        });
        out
    }

    /// `y = x·Wᵀ`: `x` `[N, in]`, `y` `[N, rows]` (both with unit column stride), with the
    /// outlier columns of `x` through f32.
    pub fn forward(&self, x: MatRef<'_>, mut y: MatMut<'_>, scratch: &mut Int8Scratch) {
        let (n, k) = (x.rows(), self.packed.inp);
        assert!(x.cols() == k && y.rows() == n && y.cols() == self.rows, "int8 forward shapes");
        assert!(x.col_stride() == 1 && y.col_stride() == 1, "int8 forward: unit column strides");
        if n == 0 {
            return;
        }
        find_outliers(x, scratch);
        let fwd = &self.packed.fwd;
        let limit = OUTLIER_THRESHOLD;
        let a = quantize(x, None, limit, fwd.quads, &mut scratch.narrow, &mut scratch.scale, &mut scratch.corr);
        let b = BRef { data: &fwd.data, stride: fwd.stride(), panel0: self.r0 / PANEL, quad0: 0, quads: fwd.quads };
        let col_scale = Some(&self.packed.scales[self.r0..self.r0 + self.rows]);
        let rows = RowFactors { scale: &scratch.scale, corr: &scratch.corr };
        kernel::gemm(y.rb(), a, QUAD * fwd.quads, b, rows, col_scale, false);
        // Each token's outliers, added one weight column at a time (row by row, so a token's
        // result does not depend on the others).
        let o = scratch.outliers.len();
        if o > 0 {
            let wo = sized(&mut scratch.w_out, o * self.rows);
            wo.par_chunks_mut(self.rows).zip(&scratch.outliers).for_each(|(dst, &c)| {
                for (j, d) in dst.iter_mut().enumerate() {
                    *d = self.dequantized(j, c);
                }
            });
            let (wo, outliers, rs) = (&*wo, &scratch.outliers, y.row_stride());
            let out = super::narrow::SharedOut(y.as_mut_ptr());
            (0..n).into_par_iter().for_each(|i| {
                // SAFETY: row i of y (`rows` values from `i·rs`), written by this task only.
                let yi = unsafe { std::slice::from_raw_parts_mut(out.at(i * rs), self.rows) };
                let xi = x.row(i);
                super::simd::vectorized(|| {
                    for (u, &c) in outliers.iter().enumerate() {
                        let v = xi[c];
                        if v.abs() > limit {
                            for (y, &w) in yi.iter_mut().zip(&wo[u * self.rows..(u + 1) * self.rows]) {
                                *y += v * w;
                            }
                        }
                    }
                });
            });
        }
    }

    /// `dx (+)= dY·W`: `dy` `[N, rows]`, `dx` `[N, in]` (unit column strides; overwritten
    /// unless `accumulate`).
    pub fn backward(&self, dy: MatRef<'_>, dx: MatMut<'_>, accumulate: bool, scratch: &mut Int8Scratch) {
        let (n, k) = (dy.rows(), self.packed.inp);
        assert!(dy.cols() == self.rows && dx.rows() == n && dx.cols() == k, "int8 backward shapes");
        assert!(dy.col_stride() == 1 && dx.col_stride() == 1, "int8 backward: unit column strides");
        if n == 0 {
            return;
        }
        let bwd = &self.packed.bwd;
        let mut dx = dx;
        // One product per module the view covers, each quantizing its own share of dY (one
        // scale per token and module: a scale shared with a module of larger gradients would
        // coarsen the others'), added up in row order.
        let (end, m) = (self.r0 + self.rows, &self.packed.modules);
        let cuts = m.iter().copied().filter(|&c| c > self.r0 && c < end);
        let bounds: Vec<usize> = std::iter::once(self.r0).chain(cuts).chain(std::iter::once(end)).collect();
        for (i, w) in bounds.windows(2).enumerate() {
            let (s, e) = (w[0], w[1]);
            // A module starts a panel (16 rows), so its rows are a run of quads; a last quad
            // that reaches into the next module's rows meets zeros in the padded activations.
            let quads = (e - s).div_ceil(QUAD);
            let row_scale = Some(&self.packed.scales[s..e]);
            let dy_m = dy.sub(0, n, s - self.r0, e - s);
            let (buf, scale, corr) = (&mut scratch.narrow, &mut scratch.scale, &mut scratch.corr);
            let a = quantize(dy_m, row_scale, f32::INFINITY, quads, buf, scale, corr);
            let b = BRef { data: &bwd.data, stride: bwd.stride(), panel0: 0, quad0: s / QUAD, quads };
            let rows = RowFactors { scale: &scratch.scale, corr: &scratch.corr };
            kernel::gemm(dx.rb(), a, QUAD * quads, b, rows, None, accumulate || i > 0);
        }
    }
}

fn sized<T: Default + Clone>(buf: &mut Vec<T>, n: usize) -> &mut [T] {
    if buf.len() < n {
        buf.resize(n, T::default());
    }
    &mut buf[..n]
}

/// The columns of `x` with a magnitude above [`OUTLIER_THRESHOLD`] in some token, into
/// `scratch.outliers`.
fn find_outliers(x: MatRef<'_>, scratch: &mut Int8Scratch) {
    let k = x.cols();
    let rows_per = 64;
    let max = (0..x.rows().div_ceil(rows_per))
        .into_par_iter()
        .map(|b| {
            let mut m = vec![0f32; k];
            super::simd::vectorized(|| {
                for i in b * rows_per..(x.rows()).min((b + 1) * rows_per) {
                    for (m, &v) in m.iter_mut().zip(x.row(i)) {
                        let v = v.abs();
                        *m = if v > *m { v } else { *m };
                    }
                }
            });
            m
        })
        .reduce(
            || vec![0f32; k],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, &b)| *a = a.max(b));
                a
            },
        );
    scratch.outliers.clear();
    scratch.outliers.extend((0..k).filter(|&c| max[c] > OUTLIER_THRESHOLD));
}

/// `a` (`N × k`, unit column stride) times the column factors `mul` (when given), quantized
/// per row to int8 without its elements above `limit` and padded with zeros to `4·quads`,
/// with each row's scale and correction (see `kernel::quantize_row`).
fn quantize<'s>(
    a: MatRef<'_>,
    mul: Option<&[f32]>,
    limit: f32,
    quads: usize,
    buf: &'s mut Vec<i8>,
    scale: &mut Vec<f32>,
    corr: &mut Vec<i32>,
) -> &'s [i8] {
    let (n, k, lda) = (a.rows(), a.cols(), QUAD * quads);
    let out = sized(buf, n * lda);
    let (scale, corr) = (sized(scale, n), sized(corr, n));
    out.par_chunks_mut(lda)
        .zip(scale.par_iter_mut())
        .zip(corr.par_iter_mut())
        .enumerate()
        .for_each(|(i, ((dst, s), c))| (*s, *c) = kernel::quantize_row(&a.row(i)[..k], mul, limit, dst));
    out
}

/// The packed `B` operand of one product: quads `quad0..quad0 + quads` of panels from
/// `panel0` on.
#[derive(Clone, Copy)]
struct BRef<'a> {
    data: &'a [u8],
    stride: usize,
    panel0: usize,
    quad0: usize,
    quads: usize,
}

/// Per row of A: its scale and its correction `128·Σ q`.
#[derive(Clone, Copy)]
struct RowFactors<'a> {
    scale: &'a [f32],
    corr: &'a [i32],
}

/// Whether the int8 micro-kernel runs: the CPU has AVX512-VNNI and `LORAFLEET_NARROW=f32`
/// (or [`super::narrow::force_fallback`]) does not ask for the f32 fallback.
pub fn kernels_available() -> bool {
    !super::narrow::forced() && kernel::detected()
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    //! The AVX512-VNNI micro-kernel and its driver.

    use super::{BRef, RowFactors, QUAD};
    use crate::fused::gemm::MatMut;
    use crate::fused::narrow::{for_each_micro_tile, lanes, SharedOut, MR, PANEL};
    use std::arch::x86_64::*;

    /// Quads of k per pass: an A block of 64 × 1024 bytes and a B block of 1024 × 192 stay
    /// in L2.
    const KC: usize = 256;

    pub(super) fn detected() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni")
    }

    /// `v = src ∘ mul` (elementwise, when `mul` is given) quantized to int8 by the absmax of
    /// its elements of magnitude up to `limit` (`q = round(v·127 / absmax)`, nearest, ties to
    /// even; 0 for the elements above `limit`, which the caller takes in f32) into `dst`,
    /// zeros past `src.len()`; returns the scale `absmax / 127` and the correction `128·Σ q`.
    /// A row holding a NaN or an infinity gets a NaN scale, so its products are NaN as in f32.
    pub(super) fn quantize_row(src: &[f32], mul: Option<&[f32]>, limit: f32, dst: &mut [i8]) -> (f32, i32) {
        assert!(dst.len() >= src.len() && mul.is_none_or(|m| m.len() >= src.len()));
        assert!(detected(), "int8 quantization without AVX-512");
        // SAFETY: the CPU has AVX-512F; the lengths are checked above.
        unsafe { quantize_avx512(src, mul, limit, dst) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn quantize_avx512(src: &[f32], mul: Option<&[f32]>, limit: f32, dst: &mut [i8]) -> (f32, i32) {
        let k = src.len();
        // SAFETY (all loads and stores): lanes past `k` are masked off.
        let load = |c: usize, mask: __mmask16| unsafe {
            let v = _mm512_maskz_loadu_ps(mask, src.as_ptr().add(c));
            match mul {
                Some(m) => _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, m.as_ptr().add(c))),
                None => v,
            }
        };
        let limit = _mm512_set1_ps(limit);
        // The lanes past `k` and the elements above the limit, as zeros.
        let inliers = |c: usize, mask: __mmask16| {
            let v = load(c, mask);
            _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_LE_OQ>(_mm512_abs_ps(v), limit), v)
        };
        let (mut max, mut non_finite) = (_mm512_setzero_ps(), 0);
        let inf = _mm512_set1_ps(f32::INFINITY);
        for c in (0..k).step_by(PANEL) {
            let mask = lanes(k - c);
            // One load for both: |inliers| is |v| where |v| ≤ limit, else 0.
            let a = _mm512_abs_ps(load(c, mask));
            max = _mm512_max_ps(max, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_LE_OQ>(a, limit), a));
            non_finite |= _mm512_mask_cmp_ps_mask::<_CMP_NLT_UQ>(mask, a, inf);
        }
        if non_finite != 0 {
            // A NaN or an infinity makes every product of the row non-finite in f32; a NaN
            // scale says so (an int8 row has no way to).
            dst.fill(0);
            return (f32::NAN, 0);
        }
        let absmax = _mm512_reduce_max_ps(max);
        // A row of zeros (or of magnitudes too small for 127 / absmax) quantizes to zeros.
        let inv = 127.0 / absmax;
        let inv = _mm512_set1_ps(if absmax > 0.0 && inv.is_finite() { inv } else { 0.0 });
        let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
        let mut sum = _mm512_setzero_si512();
        for c in (0..k).step_by(PANEL) {
            let mask = lanes(k - c);
            let q = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
                inliers(c, mask),
                inv,
            ));
            let q = _mm512_min_epi32(_mm512_max_epi32(q, lo), hi);
            sum = _mm512_add_epi32(sum, q);
            unsafe { _mm512_mask_cvtepi32_storeu_epi8(dst.as_mut_ptr().add(c) as *mut _, mask, q) };
        }
        dst[k..].fill(0);
        (absmax / 127.0, 128 * _mm512_reduce_add_epi32(sum))
    }

    /// `C (+)= diag(row scales)·(A·B − corrections)·diag(col_scale)`: `c` `m × n` with unit
    /// column stride, `a` `m × (4·quads)` int8 rows `lda` apart, `b` packed.
    pub(super) fn gemm(
        mut c: MatMut<'_>,
        a: &[i8],
        lda: usize,
        b: BRef<'_>,
        rows: RowFactors<'_>,
        col_scale: Option<&[f32]>,
        accumulate: bool,
    ) {
        let (m, n, ldc) = (c.rows(), c.cols(), c.row_stride());
        assert!(c.col_stride() == 1 && a.len() >= m * lda && lda >= QUAD * b.quads);
        assert!(rows.scale.len() >= m && rows.corr.len() >= m && col_scale.is_none_or(|s| s.len() >= n));
        let block = PANEL * QUAD;
        assert!((b.panel0 + n.div_ceil(PANEL)) * b.stride <= b.data.len() && (b.quad0 + b.quads) * block <= b.stride);
        assert!(detected(), "int8 kernel without AVX512-VNNI");
        let out = SharedOut(c.as_mut_ptr());
        for_each_micro_tile(m, n, b.quads, KC, |t| {
            let epi = Epilogue {
                scale: rows.scale[t.i..].as_ptr(),
                corr: (t.k0 == 0).then(|| rows.corr[t.i..].as_ptr()),
                col_scale: col_scale.map(|s| s[t.j..].as_ptr()),
                load: accumulate || t.k0 > 0,
            };
            // SAFETY: the asserts above bound every panel, quad, scale and correction read;
            // row pointers stay inside `a`'s m rows; the tile lies inside the m × n view of C
            // and is this task's only.
            unsafe {
                let bp = b.data.as_ptr().add((b.panel0 + t.j / PANEL) * b.stride + (b.quad0 + t.k0) * block);
                let ap = a.as_ptr().add(t.i * lda + QUAD * t.k0);
                let cp = out.at(t.i * ldc + t.j);
                match t.panels() {
                    3 => tile::<3>(ap, lda, t.rows, bp, b.stride, t.kn, cp, ldc, t.cols, &epi),
                    2 => tile::<2>(ap, lda, t.rows, bp, b.stride, t.kn, cp, ldc, t.cols, &epi),
                    _ => tile::<1>(ap, lda, t.rows, bp, b.stride, t.kn, cp, ldc, t.cols, &epi),
                }
            }
        });
    }

    /// How a tile's i32 sums become C: per row a scale and (first k-block only) the
    /// correction, per column an optional scale; added to C with `load`.
    struct Epilogue {
        scale: *const f32,
        corr: Option<*const i32>,
        col_scale: Option<*const f32>,
        load: bool,
    }

    /// One `rows × cols` tile of C (`rows ≤ MR`, `cols ≤ P·16`) over `quads` quads of k.
    #[target_feature(enable = "avx512f,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const P: usize>(
        a: *const i8,
        lda: usize,
        rows: usize,
        b: *const u8,
        stride: usize,
        quads: usize,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        epi: &Epilogue,
    ) {
        let mut acc = [[_mm512_setzero_si512(); P]; MR];
        // Rows past the edge read row 0 again; their sums are never stored.
        let row: [*const i32; MR] = std::array::from_fn(|i| unsafe { a.add(if i < rows { i } else { 0 } * lda) } as _);
        for p in 0..quads {
            let bv: [__m512i; P] = std::array::from_fn(|q| unsafe {
                _mm512_loadu_si512(b.add(q * stride + p * PANEL * QUAD) as *const _)
            });
            for i in 0..MR {
                // SAFETY: quad p of a row of at least 4·quads bytes.
                let av = _mm512_set1_epi32(unsafe { row[i].add(p).read_unaligned() });
                for q in 0..P {
                    acc[i][q] = _mm512_dpbusd_epi32(acc[i][q], bv[q], av);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate().take(rows) {
            // SAFETY: the epilogue's row pointers hold at least `rows` entries, its column
            // pointer `cols`; the masked lanes are columns of this tile inside C.
            unsafe {
                let corr = _mm512_set1_epi32(epi.corr.map_or(0, |p| *p.add(i)));
                let scale = _mm512_set1_ps(*epi.scale.add(i));
                for (q, &v) in acc.iter().enumerate() {
                    let valid = cols.saturating_sub(q * PANEL).min(PANEL);
                    if valid == 0 {
                        break;
                    }
                    let mask: __mmask16 = lanes(valid);
                    let mut v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(v, corr)), scale);
                    if let Some(s) = epi.col_scale {
                        v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, s.add(q * PANEL)));
                    }
                    let dst = c.add(i * ldc + q * PANEL);
                    if epi.load {
                        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, dst));
                    }
                    _mm512_mask_storeu_ps(dst, mask, v);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    //! No int8 dot product kernel on this architecture: callers take the f32 path.

    use super::{BRef, RowFactors};
    use crate::fused::gemm::MatMut;

    pub(super) fn detected() -> bool {
        false
    }

    pub(super) fn gemm(_: MatMut<'_>, _: &[i8], _: usize, _: BRef<'_>, _: RowFactors<'_>, _: Option<&[f32]>, _: bool) {
        unreachable!("the int8 kernel is only chosen where it was detected")
    }

    pub(super) fn quantize_row(_: &[f32], _: Option<&[f32]>, _: f32, _: &mut [i8]) -> (f32, i32) {
        unreachable!("the int8 kernel is only chosen where it was detected")
    }
}
