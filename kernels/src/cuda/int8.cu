// Dequantization of int8 row tiles for lorafleet's frozen int8 linear layers.
//
// Weights are stored as uint8 (value + 128) with one f32 absmax scale per group of
// `group` input features of each output row (group == k: one scale per row, LLM.int8's
// vector-wise quantization). A launch writes rows [row0, row0 + rows) of W, dequantized,
// into a dense [rows, k] buffer that cuBLAS then multiplies: the full-precision weight
// never exists, only one tile of it.
#include <stdint.h>
#include <cuda_bf16.h>

template <typename T>
__device__ __forceinline__ T from_float(float v);

template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }

template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

template <typename T>
__device__ void dequant_rows(const uint8_t* q, const float* scales, T* out, int row0, int rows, int k, int group) {
    const long total = (long)rows * k;
    const int groups = (k + group - 1) / group;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)blockDim.x * gridDim.x) {
        const int r = (int)(i / k);
        const int c = (int)(i % k);
        const long row = (long)row0 + r;
        const float s = scales[row * groups + c / group];
        out[i] = from_float<T>(((float)q[row * k + c] - 128.0f) * s);
    }
}

extern "C" __global__ void dequant_rows_f32(const uint8_t* q, const float* scales, float* out, int row0, int rows, int k, int group) {
    dequant_rows<float>(q, scales, out, row0, rows, k, group);
}

extern "C" __global__ void dequant_rows_bf16(const uint8_t* q, const float* scales, __nv_bfloat16* out, int row0, int rows, int k, int group) {
    dequant_rows<__nv_bfloat16>(q, scales, out, row0, rows, k, group);
}
