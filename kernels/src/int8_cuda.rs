//! The CUDA body of the int8 linear op: `src/cuda/int8.cu` dequantizes one tile of output
//! rows into a dense buffer of the compute dtype, cuBLAS (through candle's matmul) multiplies
//! it, and the tile is freed before the next one.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaStorage, DType, Device, Layout, Result, Shape, Storage, Tensor, WithDType};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/int8.ptx"));
const TILE_ROWS: usize = 256;

/// `x·Wᵀ` (`transpose`) or `x·W` for a dense 2-D `x` on the GPU.
pub fn matmul(
    q: &Tensor,
    scales: &Tensor,
    group: usize,
    transpose: bool,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let x = Tensor::from_storage(Storage::Cuda(s.try_clone(l)?), l.shape().clone(), BackpropOp::none(), false);
    let Device::Cuda(dev) = x.device().clone() else { bail!("int8 linear: input is not on a CUDA device") };
    let y = match x.dtype() {
        DType::F32 => tiles::<f32>(&dev, "dequant_rows_f32", q, scales, group, transpose, &x)?,
        DType::BF16 => tiles::<half::bf16>(&dev, "dequant_rows_bf16", q, scales, group, transpose, &x)?,
        other => bail!("int8 linear: no CUDA kernel for {other:?} inputs"),
    };
    crate::fallback::storage_of(&crate::dense(&y)?)
}

fn tiles<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    kernel: &str,
    q: &Tensor,
    scales: &Tensor,
    group: usize,
    transpose: bool,
    x: &Tensor,
) -> Result<Tensor> {
    let (n, k) = q.dims2()?;
    let func = dev.get_or_load_custom_func(kernel, "lorafleet_int8", PTX)?;
    let (qg, _) = q.storage_and_layout();
    let (sg, _) = scales.storage_and_layout();
    let (Storage::Cuda(qc), Storage::Cuda(sc)) = (&*qg, &*sg) else { bail!("int8 linear: weights are not on the GPU") };
    let q_slice = <u8 as CudaDType>::as_cuda_slice(qc)?;
    let s_slice = <f32 as CudaDType>::as_cuda_slice(sc)?;
    crate::int8_linear::combine_tiles(x, n, TILE_ROWS, transpose, |r0, rows| {
        // SAFETY: the kernel writes every one of the rows·k elements before they are read.
        let buf = unsafe { dev.alloc::<T>(rows * k)? };
        let (r0_i, rows_i, k_i, group_i) = (r0 as i32, rows as i32, k as i32, group as i32);
        let mut launch = func.builder();
        launch.arg(q_slice);
        launch.arg(s_slice);
        launch.arg(&buf);
        launch.arg(&r0_i);
        launch.arg(&rows_i);
        launch.arg(&k_i);
        launch.arg(&group_i);
        // SAFETY: argument types and order match `dequant_rows_*` in int8.cu.
        unsafe { launch.launch(LaunchConfig::for_num_elems((rows * k) as u32)) }.w()?;
        Ok(Tensor::from_storage(
            Storage::Cuda(<T as CudaDType>::wrap_cuda_slice(buf, dev.clone())),
            (rows, k),
            BackpropOp::none(),
            false,
        ))
    })
}
