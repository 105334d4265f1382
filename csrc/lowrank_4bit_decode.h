// Small-M (decode) forward of the low-rank op over a 4-bit weight in bitsandbytes' layout, in one
// kernel launch:
//
//     T = X Aᵀ,  U = σ(T)Sᵀ | σ(T) ⊙ S | σ(T),  Y = X Wᵀ + b + s·(U Bᵀ) ⊙ o
//
// X [M, k], M <= 16 (no adapter dropout);  W [d, k] NF4/FP4;  A [r, k], r <= 64;  B [d, r].
// This header is plain C++ (no torch, no CUDA device code): the torch binding includes it.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fastpeft {

// dtype codes of the floating-point tensors (x, lora_a, lora_b, core, out_scale, bias, y, t share
// one: float16 or bfloat16, the tensor cores' input types)
enum DecodeDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kDecodeMaxM = 16;
constexpr int kDecodeMaxR = 64;

struct Decode4Args {
  int dtype;                 // DecodeDtype of x and every adapter tensor, y and t: kFloat16 or kBFloat16
  const void* x;             // [M, k], row stride stride_xm elements, unit column stride
  int64_t stride_xm;
  const uint8_t* packed;     // d·k / 2 bytes: element i in nibble i & 1 (0 = high) of byte i >> 1
  const void* absmax;        // per block of `blocksize` elements: fp32, or (nested) uint8 codes
  const float* code2;        // nested: fp32 [256], the second-level table; nullptr: absmax is fp32
  const float* absmax2;      // nested: fp32, one per `blocksize2` blocks
  const float* offset;       // nested: fp32 [1]
  int blocksize2;            // nested: a power of two
  const float* code;         // fp32 [16]: the NF4 or FP4 table
  int blocksize;             // a power of two, 32..4096, dividing k
  const void* lora_a;        // [r, k] contiguous
  const void* core;          // nullptr, [r] (core_kind 1) or [r, r] (core_kind 2), contiguous
  int core_kind;
  int activation;            // 0 identity, 1 relu, 2 gelu (erf), 3 silu
  const void* lora_b;        // [d, r] contiguous
  const void* out_scale;     // [d] or nullptr
  const void* bias;          // [d] or nullptr
  float scale;
  void* y;                   // [M, d], row stride stride_ym elements, unit column stride
  int64_t stride_ym;
  void* t;                   // [M, r] contiguous: T, for the backward pass
  int M, N, K, R;            // N = d, K = k, R = r
};

// Why the kernel cannot take these arguments (a sentence), or nullptr when it can.
const char* lowrank4_decode_unsupported(const Decode4Args& args);

// Launches the kernel on `stream`; returns the launch error (cudaSuccess when it started), or
// cudaErrorInvalidValue for arguments lowrank4_decode_unsupported refuses.
cudaError_t lowrank4_decode(const Decode4Args& args, cudaStream_t stream);

}  // namespace fastpeft
