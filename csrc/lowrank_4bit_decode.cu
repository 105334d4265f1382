// CUDA kernel of the 4-bit decode forward (M <= 16): Y = X Wᵀ + b + s·(U Bᵀ) ⊙ o with W read
// once, 4 bits per weight, and dequantised in registers. No torch headers: the binding
// (lowrank_4bit_decode_binding.cpp) passes raw pointers and the stream.
#include <cuda_runtime.h>

#include "lowrank_4bit_decode.cuh"

namespace fastpeft {
namespace decode4 {

// blocks per SM the register budget must allow: MT·kRows accumulators and kRows·kGroup weights
// per thread
template <int MT>
constexpr int min_blocks() { return MT <= 4 ? 8 : (MT <= 8 ? 5 : 4); }

// grid: ceil(N / kRows) blocks of kWarps warps; MT >= M rows of X per launch (1, 4, 8 or 16);
// WK: the quant state's dtype
template <typename T, int MT, int WK>
__global__ void __launch_bounds__(kWarps * 32, min_blocks<MT>()) lowrank4_decode_kernel(const Params p) {
  __shared__ float code[16];
  __shared__ float partial[kWarps][MT * kRows];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (threadIdx.x < 16) code[threadIdx.x] = p.a.code[threadIdx.x];
  __syncthreads();

  const int n0 = blockIdx.x * kRows;
  float acc[MT][kRows];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[m][r] = 0.0f;
  }
  decode_thread<T, MT, WK>(p, code, n0, warp, lane, acc);

  // sum over the lanes of each warp, then over the warps in order
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float v = acc[m][r];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane == 0) partial[warp][m * kRows + r] = v;
    }
  }
  __syncthreads();

  for (int o = threadIdx.x; o < MT * kRows; o += blockDim.x) {
    const int m = o / kRows;
    const int n = n0 + o % kRows;
    if (m < p.a.M && n < p.a.N) {
      float xw = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) xw += partial[w][o];
      T* y = static_cast<T*>(p.a.y) + static_cast<int64_t>(m) * p.a.stride_ym + n;
      *y = from_float<T>(decode_epilogue<T>(p, m, n, xw));
    }
  }
}

template <typename T, int WK>
cudaError_t launch(const Params& p, cudaStream_t stream) {
  const dim3 grid((p.a.N + kRows - 1) / kRows);
  const dim3 block(kWarps * 32);
  if (p.a.M <= 1) {
    lowrank4_decode_kernel<T, 1, WK><<<grid, block, 0, stream>>>(p);
  } else if (p.a.M <= 4) {
    lowrank4_decode_kernel<T, 4, WK><<<grid, block, 0, stream>>>(p);
  } else if (p.a.M <= 8) {
    lowrank4_decode_kernel<T, 8, WK><<<grid, block, 0, stream>>>(p);
  } else {
    lowrank4_decode_kernel<T, 16, WK><<<grid, block, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const Params& p, cudaStream_t stream) {
  switch (p.a.w_dtype) {
    case kFloat32: return launch<T, kFloat32>(p, stream);
    case kFloat16: return launch<T, kFloat16>(p, stream);
    default: return launch<T, kBFloat16>(p, stream);
  }
}

}  // namespace decode4

cudaError_t lowrank4_decode(const Decode4Args& args, cudaStream_t stream) {
  decode4::Params p;
  if (!decode4::make_params(args, &p)) return cudaErrorInvalidValue;
  if (args.M == 0 || args.N == 0) return cudaSuccess;
  switch (args.dtype) {
    case kFloat32: return decode4::launch<float>(p, stream);
    case kFloat16: return decode4::launch<__half>(p, stream);
    default: return decode4::launch<__nv_bfloat16>(p, stream);
  }
}

}  // namespace fastpeft
