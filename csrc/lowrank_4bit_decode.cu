// CUDA kernel of the 4-bit decode forward (M <= 16, no adapter dropout), one launch per call:
// T = X Aᵀ, U = σ(T)Sᵀ | σ(T) ⊙ S | σ(T) and Y = X Wᵀ + b + s·(U Bᵀ) ⊙ o, with W read once, 4 bits
// per weight, dequantised in registers (lowrank_4bit_decode.cuh says how). No torch headers: the
// binding (lowrank_4bit_decode_binding.cpp) passes raw pointers and the stream.
#include <cuda_runtime.h>

#include "lowrank_4bit_decode.cuh"

namespace fastpeft {
namespace decode4 {

// grid: ceil(N / kRows) blocks of kWarps warps; MG: groups of 8 rows of X (M <= 8: 1, else 2);
// RT: 16-row tiles of A (ceil(r / 16))
template <typename T, int MG, int RT>
__global__ void __launch_bounds__(kThreads) lowrank4_decode_kernel(const Params p) {
  __shared__ Smem sm;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (p.a.code2 != nullptr) {
    for (int i = threadIdx.x; i < 256; i += kThreads) sm.code2[i] = p.a.code2[i];
  }
  const Lut lut = make_lut<T>(p.a.code);
  __syncthreads();

  const int n0 = blockIdx.x * kRows;
  Acc<MG, RT, 1> acc;
  warp_main<T, MG, RT, 1>(p, lut, sm.code2, n0, warp, lane, acc);
  store_partials<MG, RT, 1>(sm, warp, lane, acc);
  __syncthreads();

  const int outputs = kDecodeMaxM * kDecodeMaxR;   // >= M·kRows and M·r
  for (int o = threadIdx.x; o < outputs; o += kThreads) epilogue_sums<T>(p, sm, o, blockIdx.x == 0);
  __syncthreads();
  if (p.a.core_kind == 2) {
    for (int o = threadIdx.x; o < outputs; o += kThreads) epilogue_core<T>(p, sm, o);
    __syncthreads();
  }
  for (int o = threadIdx.x; o < kDecodeMaxM * kRows; o += kThreads) epilogue_out<T>(p, sm, n0, o);
}

template <typename T, int MG>
cudaError_t launch(const Params& p, cudaStream_t stream) {
  const dim3 grid((p.a.N + kRows - 1) / kRows);
  switch ((p.a.R + 15) / 16) {
    case 1: lowrank4_decode_kernel<T, MG, 1><<<grid, kThreads, 0, stream>>>(p); break;
    case 2: lowrank4_decode_kernel<T, MG, 2><<<grid, kThreads, 0, stream>>>(p); break;
    case 3: lowrank4_decode_kernel<T, MG, 3><<<grid, kThreads, 0, stream>>>(p); break;
    default: lowrank4_decode_kernel<T, MG, 4><<<grid, kThreads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const Params& p, cudaStream_t stream) {
  return p.a.M <= 8 ? launch<T, 1>(p, stream) : launch<T, 2>(p, stream);
}

}  // namespace decode4

const char* lowrank4_decode_unsupported(const Decode4Args& args) {
  decode4::Params p;
  return decode4::check_args(args, &p);
}

cudaError_t lowrank4_decode(const Decode4Args& args, cudaStream_t stream) {
  decode4::Params p;
  if (decode4::check_args(args, &p) != nullptr) return cudaErrorInvalidValue;
  if (args.M == 0) return cudaSuccess;
  return args.dtype == kFloat16 ? decode4::launch<__half>(p, stream) : decode4::launch<__nv_bfloat16>(p, stream);
}

}  // namespace fastpeft
