//! A frozen linear layer stored as int8 with absmax scales (LLM.int8's vector-wise
//! quantization, optionally per group of input features), `y = x·Wᵀ` and `dx = dy·W` with
//! W dequantized one tile of output rows at a time: the full-precision weight never exists.
//!
//! Error bound: each weight is off by at most half a quantization step, |ΔW_jk| ≤ s_jg / 2
//! with s_jg = absmax_jg / 127, so |Δy_j| ≤ Σ_k |x_k| · s_jg(k) / 2 ≤ ‖x‖₁ · absmax_j / 254.

use crate::fallback::via_tensor_ops;
use crate::fused::gemm::{MatMut, MatRef};
use crate::fused::int8::{self, Int8Scratch, Int8Weight, PackedInt8};
use crate::FrozenBias;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Storage, Tensor};
use std::sync::Arc;

/// Elements dequantized per tile (4 MiB of f32): large enough that each gemm call is
/// efficient, small enough that the tile stays in cache-sized memory for 7B layers
/// (256 rows of a 4096-wide layer). Small layers are done in one tile.
const TILE_ELEMS: usize = 1 << 20;

/// Output rows per tile for a layer with `k` input features.
fn tile_rows(k: usize) -> usize {
    (TILE_ELEMS / k.max(1)).max(16)
}

/// Quantized weights shared by the forward and backward ops.
struct Weights {
    /// `[out, in]` as u8, the int8 value plus 128 (candle has no i8 dtype).
    q: Tensor,
    /// `[out, groups]` f32 scales.
    scales: Tensor,
    group: usize,
    /// The same values packed for the int8 micro-kernel (CPU, one scale per row): a pack
    /// and the first of its rows that are this layer's (a pack may hold q|k|v).
    packed: Option<(Arc<PackedInt8>, usize)>,
}

/// A frozen int8 linear layer (gradient to the input only).
#[derive(Clone)]
pub struct Int8Linear {
    weights: Arc<Weights>,
    bias: Option<FrozenBias>,
}

impl Int8Linear {
    /// Quantizes `weight` `[out, in]` (any float dtype) with one scale per row, or per
    /// `group` input features when given (it must divide `in`). The result lives on `device`.
    pub fn quantize(weight: &Tensor, group: Option<usize>, bias: Option<Tensor>, device: &Device) -> Result<Self> {
        let (q, scales, group) = quantize_rows(weight, group)?;
        let (n, k) = weight.dims2()?;
        // Packed on the CPU for per-row scales, the format the micro-kernel rescales by.
        let packed = (device.is_cpu() && group == k && int8::kernels_available())
            .then(|| (Arc::new(PackedInt8::new(&q, &scales, n, k)), 0));
        Self::from_parts(q, scales, (n, k, group), packed, bias, device)
    }

    /// Quantizes layers that read the same input (q, k, v; gate, up) with one scale per row,
    /// on the CPU, and packs them for the int8 kernel as one weight, each layer a view of its
    /// rows, so the engine quantizes the input once and runs one product. Layers whose rows
    /// do not start a 16-row panel are packed apart.
    pub fn quantize_shared(weights: &[Tensor], biases: Vec<Option<Tensor>>) -> Result<Vec<Self>> {
        let parts = weights.iter().map(|w| quantize_rows(w, None)).collect::<Result<Vec<_>>>()?;
        let dims = weights.iter().map(|w| w.dims2()).collect::<Result<Vec<_>>>()?;
        let starts: Vec<usize> = dims.iter().scan(0, |r, &(n, _)| Some(std::mem::replace(r, *r + n))).collect();
        let k = dims.first().map_or(0, |d| d.1);
        let shared = int8::kernels_available()
            && dims.iter().all(|d| d.1 == k)
            && starts.iter().all(|s| s.is_multiple_of(crate::fused::narrow::PANEL));
        let pack = shared.then(|| {
            let q: Vec<u8> = parts.iter().flat_map(|p| p.0.iter().copied()).collect();
            let scales: Vec<f32> = parts.iter().flat_map(|p| p.1.iter().copied()).collect();
            Arc::new(PackedInt8::new(&q, &scales, scales.len(), k).with_modules(&starts))
        });
        let layers = parts.into_iter().zip(dims).zip(starts).zip(biases);
        layers
            .map(|((((q, scales, group), (n, k)), r0), bias)| {
                let packed = match &pack {
                    Some(p) => Some((p.clone(), r0)),
                    None => int8::kernels_available().then(|| (Arc::new(PackedInt8::new(&q, &scales, n, k)), 0)),
                };
                Self::from_parts(q, scales, (n, k, group), packed, bias, &Device::Cpu)
            })
            .collect()
    }

    fn from_parts(
        q: Vec<u8>,
        scales: Vec<f32>,
        (n, k, group): (usize, usize, usize),
        packed: Option<(Arc<PackedInt8>, usize)>,
        bias: Option<Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let weights = Weights {
            q: Tensor::from_vec(q, (n, k), device)?,
            scales: Tensor::from_vec(scales, (n, k / group), device)?,
            group,
            packed,
        };
        let bias = bias.map(|b| FrozenBias::new(b.to_device(device)?, n)).transpose()?;
        Ok(Self { weights: Arc::new(weights), bias })
    }

    /// The pack this layer's rows are a view of, and where they start, when the int8 kernel
    /// runs (see [`Int8Linear::packed`]).
    pub fn shared_pack(&self) -> Option<(&Arc<PackedInt8>, usize)> {
        self.weights.packed.as_ref().filter(|_| int8::kernels_available()).map(|(p, r0)| (p, *r0))
    }

    /// `[out, in]`.
    pub fn dims(&self) -> (usize, usize) {
        let d = self.weights.q.dims();
        (d[0], d[1])
    }

    /// The quantized weight (u8 = value + 128, `[out, in]`), its f32 scales (`[out, in /
    /// group]`) and the group size, for the training engine's tiled bodies.
    pub fn quantized_parts(&self) -> (&Tensor, &Tensor, usize) {
        (&self.weights.q, &self.weights.scales, self.weights.group)
    }

    /// The weight packed for the int8 micro-kernel, when products take it: on a CPU with
    /// AVX512-VNNI, unless `LORAFLEET_NARROW=f32`, with one scale per row (a grouped or GPU
    /// weight takes the dequantize-and-f32 path).
    pub fn packed(&self) -> Option<Int8Weight<'_>> {
        self.weights.packed()
    }

    /// The frozen bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref().map(FrozenBias::values)
    }

    /// The u8 storage of the quantized weight (value + 128).
    pub fn quantized(&self) -> &Tensor {
        &self.weights.q
    }

    /// The dequantized weight in f32 (for tests and reports; training never builds it).
    pub fn dequantize(&self) -> Result<Tensor> {
        let (n, _) = self.dims();
        self.weights.tile(0, n, DType::F32)
    }

    /// Applies the layer to `x` `[..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let op = Int8Matmul { w: self.weights.clone(), transpose: true };
        crate::frozen_linear::apply_to_rows("int8 linear", x, self.dims(), op, self.bias.as_ref())
    }
}

/// `weight` `[out, in]` as `u8 = int8 + 128` with an absmax scale per row, or per `group`
/// inputs (which must divide `in`); returns the values, the scales and the group size.
fn quantize_rows(weight: &Tensor, group: Option<usize>) -> Result<(Vec<u8>, Vec<f32>, usize)> {
    let (n, k) = weight.dims2()?;
    let group = group.unwrap_or(k);
    if group == 0 || k % group != 0 {
        bail!("int8 group size {group} does not divide the {k} input features");
    }
    let w: Vec<f32> = weight.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
    let mut q = vec![128u8; n * k];
    let mut scales = vec![0f32; n * (k / group)];
    for (g, chunk) in w.chunks_exact(group).enumerate() {
        let absmax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = absmax / 127.0;
        scales[g] = scale;
        if scale > 0.0 {
            for (dst, &v) in q[g * group..(g + 1) * group].iter_mut().zip(chunk) {
                *dst = ((v / scale).round().clamp(-127.0, 127.0) as i32 + 128) as u8;
            }
        }
    }
    Ok((q, scales, group))
}

impl Weights {
    /// The packed weight, when the micro-kernel runs (see [`Int8Linear::packed`]).
    fn packed(&self) -> Option<Int8Weight<'_>> {
        let rows = self.q.dims()[0];
        let (p, r0) = self.packed.as_ref().filter(|_| int8::kernels_available())?;
        p.rows(*r0, rows)
    }

    /// Rows `r0..r0+rows` of W dequantized to `dtype`, by tensor ops (any device).
    fn tile(&self, r0: usize, rows: usize, dtype: DType) -> Result<Tensor> {
        let k = self.q.dims()[1];
        let groups = k / self.group;
        let q = (self.q.narrow(0, r0, rows)?.to_dtype(DType::F32)? - 128.0)?;
        let s = self.scales.narrow(0, r0, rows)?.reshape((rows, groups, 1))?;
        q.reshape((rows, groups, self.group))?.broadcast_mul(&s)?.reshape((rows, k))?.to_dtype(dtype)
    }
}

/// `x·Wᵀ` (`transpose`) or `x·W` for a W of `n` rows delivered `tile` rows at a time by
/// `tile_of(first_row, rows)` (dequantized, in x's dtype and on x's device).
pub(crate) fn combine_tiles(
    x: &Tensor,
    n: usize,
    tile: usize,
    transpose: bool,
    mut tile_of: impl FnMut(usize, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut parts = Vec::with_capacity(n.div_ceil(tile));
    let mut acc: Option<Tensor> = None;
    for r0 in (0..n).step_by(tile) {
        let rows = tile.min(n - r0);
        let w = tile_of(r0, rows)?;
        if transpose {
            parts.push(x.matmul(&w.t()?)?);
        } else {
            let part = x.narrow(1, r0, rows)?.matmul(&w)?;
            acc = Some(match acc {
                Some(a) => (a + part)?,
                None => part,
            });
        }
    }
    match acc {
        Some(a) => Ok(a),
        None => Tensor::cat(&parts, 1),
    }
}

/// `x·Wᵀ` (`transpose`) or `x·W` over a dense 2-D input.
struct Int8Matmul {
    w: Arc<Weights>,
    transpose: bool,
}

impl Int8Matmul {
    /// The CPU body through the int8 micro-kernel: the training engine's products.
    fn vnni(&self, x: &[f32], m: usize, w: Int8Weight<'_>) -> Vec<f32> {
        let (n, k) = w.dims();
        let mut scratch = Int8Scratch::default();
        if self.transpose {
            let mut y = vec![0f32; m * n];
            w.forward(MatRef::new(x, m, k), MatMut::new(&mut y, m, n), &mut scratch);
            y
        } else {
            let mut y = vec![0f32; m * k];
            w.backward(MatRef::new(x, m, n), MatMut::new(&mut y, m, k), false, &mut scratch);
            y
        }
    }

    /// The same product by tensor ops, one tile of W at a time (any device and dtype).
    fn by_tiles(&self, x: &Tensor) -> Result<Tensor> {
        let k = self.w.q.dims()[1];
        combine_tiles(x, self.w.q.dims()[0], tile_rows(k), self.transpose, |r0, rows| self.w.tile(r0, rows, x.dtype()))
    }

    /// The CPU body for f32: dequantize a tile into a reused buffer, then one gemm call
    /// writes (or accumulates) its block of the output.
    fn cpu_f32(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let (qg, _) = self.w.q.storage_and_layout();
        let (sg, _) = self.w.scales.storage_and_layout();
        let (Storage::Cpu(CpuStorage::U8(q)), Storage::Cpu(CpuStorage::F32(scales))) = (&*qg, &*sg) else {
            bail!("int8 linear: CPU weights expected");
        };
        let (n, k) = (self.w.q.dims()[0], self.w.q.dims()[1]);
        let (group, groups) = (self.w.group, k / self.w.group);
        let out_cols = if self.transpose { n } else { k };
        let mut out = vec![0f32; m * out_cols];
        let tile_n = tile_rows(k).min(n);
        let mut tile = vec![0f32; tile_n * k];
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        for r0 in (0..n).step_by(tile_n) {
            let rows = tile_n.min(n - r0);
            for r in 0..rows {
                let row = r0 + r;
                let src = &q[row * k..(row + 1) * k];
                let dst = &mut tile[r * k..(r + 1) * k];
                for g in 0..groups {
                    let s = scales[row * groups + g];
                    for (d, &v) in dst[g * group..(g + 1) * group].iter_mut().zip(&src[g * group..(g + 1) * group]) {
                        *d = (f32::from(v) - 128.0) * s;
                    }
                }
            }
            // SAFETY: every pointer/stride pair stays inside its slice: x is m×k, tile is
            // rows×k, out is m×out_cols and the written block is m×rows (or m×k).
            unsafe {
                if self.transpose {
                    // out[:, r0..r0+rows] = x (m×k) · tileᵀ (k×rows)
                    gemm::gemm(
                        m,
                        rows,
                        k,
                        out.as_mut_ptr().add(r0),
                        1,
                        n as isize,
                        false,
                        x.as_ptr(),
                        1,
                        k as isize,
                        tile.as_ptr(),
                        k as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        parallelism,
                    );
                } else {
                    // out (m×k) += x[:, r0..r0+rows] (m×rows) · tile (rows×k)
                    gemm::gemm(
                        m,
                        k,
                        rows,
                        out.as_mut_ptr(),
                        1,
                        k as isize,
                        r0 > 0,
                        x.as_ptr().add(r0),
                        1,
                        n as isize,
                        tile.as_ptr(),
                        1,
                        k as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        parallelism,
                    );
                }
            }
        }
        Ok(out)
    }
}

impl CustomOp1 for Int8Matmul {
    fn name(&self) -> &'static str {
        "int8-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = (self.w.q.dims()[0], self.w.q.dims()[1]);
        match (s, self.w.q.device()) {
            (CpuStorage::F32(x), Device::Cpu) => {
                let m = l.dims()[0];
                let x = &x[l.start_offset()..l.start_offset() + l.shape().elem_count()];
                let out = match self.w.packed() {
                    Some(w) => self.vnni(x, m, w),
                    None => self.cpu_f32(x, m)?,
                };
                Ok((CpuStorage::F32(out), Shape::from((m, if self.transpose { n } else { k }))))
            }
            _ => via_tensor_ops(s, l, |x| self.by_tiles(x)),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::int8_cuda::matmul(&self.w.q, &self.w.scales, self.w.group, self.transpose, s, l)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = Int8Matmul { w: self.w.clone(), transpose: !self.transpose };
        Ok(Some(crate::dense(grad)?.apply_op1(back)?))
    }
}
