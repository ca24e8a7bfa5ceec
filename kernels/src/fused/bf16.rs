//! Products with a frozen weight in bf16: `y = x·Wᵀ` and `dx (+)= dY·W` with bf16 operands
//! and f32 accumulation, W packed once at load time (`--torch_dtype bf16`).
//!
//! Why hand-written: no crate in reach does a bf16 GEMM with the CPU's bf16 dot product.
//! `gemm` 0.19 (candle's CPU matmul) has f32/f64/f16 kernels, its f16 path converting to f32;
//! candle's quantized matmul covers GGML block formats, not bf16; OpenBLAS's `sbgemm` and
//! oneDNN are C/C++ libraries that a cold CI would build or download. So this file holds one
//! packed micro-kernel (`vdpbf16ps`, AVX512-BF16), chosen at run time, and an f32 fallback
//! (W unpacked a tile at a time into the f32 GEMM) that runs everywhere else or when
//! `LORAFLEET_NARROW=f32` forces it.
//!
//! Layout: `vdpbf16ps` multiplies pairs of bf16 that are adjacent along the reduction and
//! adds both products into one f32 lane, so a packed operand holds, per panel of 16 output
//! columns, the pairs `(k, k+1)` of each column: `[panel][k/2][16][2]`. The forward reduces
//! over W's inputs and the backward over its outputs, so W is packed twice (4 bytes per
//! weight: what f32 took, in two layouts that each run at twice the f32 rate).
//!
//! Every element of C sums its k-blocks in a fixed order whatever the thread count, so the
//! result is deterministic.

use super::gemm::{matmul, MatMut, MatRef, Par};
use super::narrow::PANEL;
use half::bf16;
use rayon::prelude::*;

/// One packed operand `B` (`k × n`) of `C = A·B`: panels of 16 columns, pairs of k.
#[derive(Debug, Default)]
struct Panels {
    data: Vec<u16>,
    /// Pairs of k per panel (`k` rounded up to even, halved).
    pairs: usize,
}

impl Panels {
    /// Packs `get(k, j)` for `k < rows`, `j < cols` (zeros past the edges).
    fn pack(rows: usize, cols: usize, get: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        let pairs = rows.div_ceil(2);
        let stride = pairs * PANEL * 2;
        let mut data = vec![0u16; cols.div_ceil(PANEL) * stride];
        data.par_chunks_mut(stride.max(1)).enumerate().for_each(|(panel, dst)| {
            for c in 0..PANEL.min(cols - panel * PANEL) {
                let j = panel * PANEL + c;
                for k in 0..rows {
                    dst[((k / 2) * PANEL + c) * 2 + k % 2] = bf16::from_f32(get(k, j)).to_bits();
                }
            }
        });
        Self { data, pairs }
    }

    /// u16s from one panel to the next.
    fn stride(&self) -> usize {
        self.pairs * PANEL * 2
    }

    /// Element `(k, j)` as f32.
    fn get(&self, k: usize, j: usize) -> f32 {
        bf16::from_bits(self.data[(j / PANEL) * self.stride() + ((k / 2) * PANEL + j % PANEL) * 2 + k % 2]).to_f32()
    }
}

/// A frozen `[out, in]` weight rounded to bf16 and packed for both products.
#[derive(Debug)]
pub struct PackedBf16 {
    /// `Wᵀ` (`in × out`), for `x·Wᵀ`.
    fwd: Panels,
    /// `W` (`out × in`), for `dY·W`.
    bwd: Panels,
    out: usize,
    inp: usize,
}

impl PackedBf16 {
    /// Rounds `w` (`[out, in]`, row-major) to bf16 (nearest, ties to even) and packs it.
    pub fn new(w: &[f32], out: usize, inp: usize) -> Self {
        assert_eq!(w.len(), out * inp, "bf16 pack: {} values for a {out}x{inp} weight", w.len());
        let fwd = Panels::pack(inp, out, |k, j| w[j * inp + k]);
        let bwd = Panels::pack(out, inp, |k, j| w[k * inp + j]);
        Self { fwd, bwd, out, inp }
    }

    /// `[out, in]`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// The whole weight.
    pub fn full(&self) -> Bf16Weight<'_> {
        Bf16Weight { packed: self, r0: 0, rows: self.out }
    }

    /// Rows `r0..r0 + rows` (a module's share of a concatenated weight); `None` unless `r0`
    /// starts a panel.
    pub fn rows(&self, r0: usize, rows: usize) -> Option<Bf16Weight<'_>> {
        (r0.is_multiple_of(PANEL) && r0 + rows <= self.out).then_some(Bf16Weight { packed: self, r0, rows })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        2 * (self.fwd.data.len() + self.bwd.data.len())
    }
}

/// Rows `r0..r0 + rows` of a [`PackedBf16`]: the weight of one module.
#[derive(Clone, Copy, Debug)]
pub struct Bf16Weight<'a> {
    packed: &'a PackedBf16,
    r0: usize,
    rows: usize,
}

/// Reused buffers of one caller: the activation operand in bf16, and the f32 tile of the
/// fallback.
#[derive(Default, Debug)]
pub struct Bf16Scratch {
    narrow: Vec<u16>,
    tile: Vec<f32>,
}

/// Rows of W unpacked per fallback tile (as the int8 tiles: 4 MiB of f32).
const TILE_ELEMS: usize = 1 << 20;

impl Bf16Weight<'_> {
    /// `[rows, in]`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.packed.inp)
    }

    /// The weight as f32 `[rows, in]` (bf16 values widened exactly).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.packed.inp];
        self.unpack(0, self.rows, &mut out);
        out
    }

    /// Rows `i0..i0 + m` of this weight as f32 into `dst`.
    fn unpack(&self, i0: usize, m: usize, dst: &mut [f32]) {
        let k = self.packed.inp;
        dst[..m * k].par_chunks_mut(k.max(1)).enumerate().for_each(|(i, row)| {
            for (c, v) in row.iter_mut().enumerate() {
                *v = self.packed.fwd.get(c, self.r0 + i0 + i);
            }
        });
    }

    /// `y = x·Wᵀ`: `x` `[N, in]`, `y` `[N, rows]` (rows contiguous).
    pub fn forward(&self, x: MatRef<'_>, mut y: MatMut<'_>, scratch: &mut Bf16Scratch) {
        let (n, k) = (x.rows(), self.packed.inp);
        assert!(x.cols() == k && y.rows() == n && y.cols() == self.rows, "bf16 forward shapes");
        let fwd = &self.packed.fwd;
        if kernels_available() && x.col_stride() == 1 && y.col_stride() == 1 && n > 0 {
            let a = to_bf16(x, fwd.pairs, &mut scratch.narrow);
            let b = BRef { data: &fwd.data, stride: fwd.stride(), panel0: self.r0 / PANEL, pair0: 0, pairs: fwd.pairs };
            kernel::gemm(y, a, 2 * fwd.pairs, b, false);
            return;
        }
        let rows = (TILE_ELEMS / k.max(1)).clamp(16, self.rows.max(16));
        for i0 in (0..self.rows).step_by(rows) {
            let m = rows.min(self.rows - i0);
            let t = sized(&mut scratch.tile, m * k);
            self.unpack(i0, m, t);
            matmul(y.sub(0, n, i0, m), x, MatRef::new(t, m, k).t(), 1.0, false, Par::Pool);
        }
    }

    /// `dx (+)= dY·W`: `dy` `[N, rows]`, `dx` `[N, in]` (overwritten unless `accumulate`).
    pub fn backward(&self, dy: MatRef<'_>, dx: MatMut<'_>, accumulate: bool, scratch: &mut Bf16Scratch) {
        let (n, k) = (dy.rows(), self.packed.inp);
        assert!(dy.cols() == self.rows && dx.rows() == n && dx.cols() == k, "bf16 backward shapes");
        let bwd = &self.packed.bwd;
        if kernels_available() && dy.col_stride() == 1 && dx.col_stride() == 1 && n > 0 {
            let pairs = self.rows.div_ceil(2);
            let a = to_bf16(dy, pairs, &mut scratch.narrow);
            let b = BRef { data: &bwd.data, stride: bwd.stride(), panel0: 0, pair0: self.r0 / 2, pairs };
            kernel::gemm(dx, a, 2 * pairs, b, accumulate);
            return;
        }
        let mut dx = dx;
        let rows = (TILE_ELEMS / k.max(1)).clamp(16, self.rows.max(16));
        for i0 in (0..self.rows).step_by(rows) {
            let m = rows.min(self.rows - i0);
            let t = sized(&mut scratch.tile, m * k);
            self.unpack(i0, m, t);
            matmul(dx.rb(), dy.sub(0, n, i0, m), MatRef::new(t, m, k), 1.0, accumulate || i0 > 0, Par::Pool);
        }
    }
}

fn sized<T: Default + Clone>(buf: &mut Vec<T>, n: usize) -> &mut [T] {
    if buf.len() < n {
        buf.resize(n, T::default());
    }
    &mut buf[..n]
}

/// `a` (`N × k`, unit column stride) in bf16, each row padded with zeros to `2·pairs`.
fn to_bf16<'s>(a: MatRef<'_>, pairs: usize, buf: &'s mut Vec<u16>) -> &'s [u16] {
    let (n, k, lda) = (a.rows(), a.cols(), 2 * pairs);
    let out = sized(buf, n * lda);
    out.par_chunks_mut(lda).enumerate().for_each(|(i, dst)| {
        let row = a.row(i);
        kernel::convert(row, &mut dst[..k]);
        dst[k..].fill(0);
    });
    out
}

/// The packed `B` operand of one product: pairs `pair0..pair0 + pairs` of panels from
/// `panel0` on.
#[derive(Clone, Copy)]
struct BRef<'a> {
    data: &'a [u16],
    stride: usize,
    panel0: usize,
    pair0: usize,
    pairs: usize,
}

/// Whether the bf16 micro-kernel runs: the CPU has AVX512-BF16 and `LORAFLEET_NARROW=f32`
/// (or [`force_fallback`]) does not ask for the f32 fallback.
pub fn kernels_available() -> bool {
    !super::narrow::forced() && kernel::detected()
}

pub use super::narrow::force_fallback;

#[cfg(target_arch = "x86_64")]
mod kernel {
    //! The AVX512-BF16 micro-kernel and its driver.

    use super::BRef;
    use crate::fused::gemm::MatMut;
    use crate::fused::narrow::{for_each_micro_tile, lanes, SharedOut, MR, PANEL};
    use std::arch::x86_64::*;

    /// Pairs of k per pass: an A block of 64 × 256 bf16 and a B block of 256 × 192 stay
    /// in L2.
    const KC: usize = 128;

    pub(super) fn detected() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }

    /// f32 → bf16 (nearest, ties to even) of `src` into `dst`.
    pub(super) fn convert(src: &[f32], dst: &mut [u16]) {
        if detected() {
            // SAFETY: the CPU has the features `convert_avx512` is compiled for.
            unsafe { convert_avx512(src, dst) }
        } else {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = half::bf16::from_f32(s).to_bits();
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn convert_avx512(src: &[f32], dst: &mut [u16]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n, inside both slices.
            let v = unsafe { _mm512_loadu_ps(src.as_ptr().add(i)) };
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            unsafe { _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, h) };
            i += 16;
        }
        for j in i..n {
            dst[j] = half::bf16::from_f32(src[j]).to_bits();
        }
    }

    /// `C (+)= A·B`: `c` `m × n` with unit column stride, `a` `m × (2·pairs)` bf16 rows
    /// `lda` apart, `b` packed.
    pub(super) fn gemm(mut c: MatMut<'_>, a: &[u16], lda: usize, b: BRef<'_>, accumulate: bool) {
        let (m, n, ldc) = (c.rows(), c.cols(), c.row_stride());
        assert!(c.col_stride() == 1 && a.len() >= m * lda && lda >= 2 * b.pairs);
        assert!(
            (b.panel0 + n.div_ceil(PANEL)) * b.stride <= b.data.len() && (b.pair0 + b.pairs) * PANEL * 2 <= b.stride
        );
        assert!(detected(), "bf16 kernel without AVX512-BF16");
        let out = SharedOut(c.as_mut_ptr());
        for_each_micro_tile(m, n, b.pairs, KC, |t| {
            let load = accumulate || t.k0 > 0;
            // SAFETY: the asserts above bound every panel and pair read; row pointers stay
            // inside `a`'s m rows; the tile lies inside the m × n view of C and is this
            // task's only.
            unsafe {
                let bp = b.data.as_ptr().add((b.panel0 + t.j / PANEL) * b.stride + (b.pair0 + t.k0) * PANEL * 2);
                let ap = a.as_ptr().add(t.i * lda + 2 * t.k0);
                let cp = out.at(t.i * ldc + t.j);
                match t.panels() {
                    3 => tile::<3>(ap, lda, t.rows, bp, b.stride, t.kn, cp, ldc, t.cols, load),
                    2 => tile::<2>(ap, lda, t.rows, bp, b.stride, t.kn, cp, ldc, t.cols, load),
                    _ => tile::<1>(ap, lda, t.rows, bp, b.stride, t.kn, cp, ldc, t.cols, load),
                }
            }
        });
    }

    /// One `rows × cols` tile of C (`rows ≤ MR`, `cols ≤ P·16`) over `pairs` pairs of k:
    /// registers accumulate `A·B`, then C is overwritten (or added to, with `load`).
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const P: usize>(
        a: *const u16,
        lda: usize,
        rows: usize,
        b: *const u16,
        stride: usize,
        pairs: usize,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        load: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); P]; MR];
        // Rows past the edge read row 0 again; their sums are never stored.
        let row: [*const i32; MR] = std::array::from_fn(|i| unsafe { a.add(if i < rows { i } else { 0 } * lda) } as _);
        for p in 0..pairs {
            let bv: [__m512bh; P] = std::array::from_fn(|q| unsafe {
                std::mem::transmute(_mm512_loadu_si512(b.add(q * stride + p * PANEL * 2) as *const _))
            });
            for i in 0..MR {
                // SAFETY: pair p of a row of at least 2·pairs bf16 values.
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(unsafe { row[i].add(p).read_unaligned() }));
                for q in 0..P {
                    acc[i][q] = _mm512_dpbf16_ps(acc[i][q], av, bv[q]);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate().take(rows) {
            for (q, &v) in acc.iter().enumerate() {
                let valid = cols.saturating_sub(q * PANEL).min(PANEL);
                if valid == 0 {
                    break;
                }
                let mask: __mmask16 = lanes(valid);
                // SAFETY: the masked lanes are columns of this tile inside C.
                unsafe {
                    let dst = c.add(i * ldc + q * PANEL);
                    let v = if load { _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, dst)) } else { v };
                    _mm512_mask_storeu_ps(dst, mask, v);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    //! No bf16 dot product on this architecture: the f32 fallback always runs.

    use super::BRef;
    use crate::fused::gemm::MatMut;

    pub(super) fn detected() -> bool {
        false
    }

    pub(super) fn convert(src: &[f32], dst: &mut [u16]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = half::bf16::from_f32(s).to_bits();
        }
    }

    pub(super) fn gemm(_: MatMut<'_>, _: &[u16], _: usize, _: BRef<'_>, _: bool) {
        unreachable!("the bf16 kernel is only chosen where it was detected")
    }
}
