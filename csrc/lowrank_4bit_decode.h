// Small-M (decode) forward of the low-rank op over a 4-bit weight in bitsandbytes' layout:
//
//     Y = X Wᵀ + b + s·(U Bᵀ) ⊙ o          X [M, k], M <= 16;  W [d, k] NF4/FP4;  U [M, r];  B [d, r]
//
// This header is plain C++ (no torch, no CUDA device code): the torch binding includes it.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fastpeft {

// dtype codes of the floating-point tensors (x, u, lora_b, out_scale, bias, y share one)
// and of the quant state's dtype (the dequantised values are rounded to it first)
enum DecodeDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kDecodeMaxM = 16;

struct Decode4Args {
  int dtype;                 // DecodeDtype of x, u, lora_b, out_scale, bias and y
  const void* x;             // [M, k], row stride stride_xm elements, unit column stride
  int64_t stride_xm;
  const uint8_t* packed;     // ceil(d·k / 2) bytes: element i in nibble i & 1 (0 = high) of byte i >> 1
  const float* absmax;       // fp32 [ceil(d·k / blocksize)] (nested statistics already expanded)
  const float* code;         // fp32 [16]: the NF4 or FP4 table
  int w_dtype;               // DecodeDtype of the quant state
  int blocksize;             // a power of two, 32..4096
  const void* u;             // [M, r] contiguous
  const void* lora_b;        // [d, r] contiguous
  const void* out_scale;     // [d] or nullptr
  const void* bias;          // [d] or nullptr
  float scale;
  void* y;                   // [M, d], row stride stride_ym elements, unit column stride
  int64_t stride_ym;
  int M, N, K, R;            // N = d, K = k, R = r
};

// Launches the kernel on `stream`; returns the launch error (cudaSuccess when it started), or
// cudaErrorInvalidValue for arguments out of range (M > kDecodeMaxM, an unknown dtype or blocksize).
cudaError_t lowrank4_decode(const Decode4Args& args, cudaStream_t stream);

}  // namespace fastpeft
