// Per-thread work of the 4-bit decode kernel, as __host__ __device__ functions: the kernel runs
// them on the GPU, and a host build runs the very same code lane by lane (tests/csrc).
//
// Work split. A block of kWarps warps computes kRows consecutive outputs n0 .. n0 + kRows - 1 for
// every row m < M. Along k, thread (warp, lane) takes groups of kGroup consecutive columns
// c0 = (warp·32 + lane)·kGroup + j·kWarps·32·kGroup, so a block reads each of its rows of W once,
// in contiguous 1024-column stretches: 4 bits per weight. Per group and row of W it loads one
// 32-bit word (8 codes, one absmax: a group never straddles a quantisation block, since groups
// and blocks both start at multiples of 8 of the flattened index when k % 8 == 0) or, for k odd
// or not a multiple of 8, gathers each element's byte and absmax. Every product is accumulated
// in fp32; lanes and warps are summed at the end in a fixed order (deterministic).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "lowrank_4bit_decode.h"

#if defined(__CUDACC__)
#define FASTPEFT_HD __host__ __device__ __forceinline__
#else
#define FASTPEFT_HD inline
#endif

namespace fastpeft {
namespace decode4 {

constexpr int kWarps = 4;                       // warps per block, splitting k
constexpr int kRows = 4;                        // outputs (rows of W) per block
constexpr int kGroup = 8;                       // consecutive columns per thread and step
constexpr int kBlockStride = kWarps * 32 * kGroup;

// Decode4Args plus what the launcher derives from it
struct Params {
  Decode4Args a;
  int block_shift;   // log2(blocksize)
  bool vec;          // k % 8 == 0 and aligned x / packed: word and 16-byte loads
};

template <typename T> struct DtypeOf;
template <> struct DtypeOf<float> { static constexpr int value = kFloat32; };
template <> struct DtypeOf<__half> { static constexpr int value = kFloat16; };
template <> struct DtypeOf<__nv_bfloat16> { static constexpr int value = kBFloat16; };

FASTPEFT_HD float to_float(float v) { return v; }
FASTPEFT_HD float to_float(__half v) { return __half2float(v); }
FASTPEFT_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> FASTPEFT_HD T from_float(float v);
template <> FASTPEFT_HD float from_float<float>(float v) { return v; }
template <> FASTPEFT_HD __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> FASTPEFT_HD __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// v rounded (to nearest even) to the dtype `kind`, returned in fp32
FASTPEFT_HD float round_to(float v, int kind) {
  if (kind == kFloat16) return __half2float(__float2half_rn(v));
  if (kind == kBFloat16) return __bfloat162float(__float2bfloat16_rn(v));
  return v;
}

// W[n, c] as the dense reference holds it in x's dtype XK: code[q]·absmax in fp32, rounded to the
// quant state's dtype WK (bitsandbytes' dequantisation), then to XK
template <int XK, int WK>
FASTPEFT_HD float weight_value(const float* code, int q, float absmax) {
  float w = round_to(code[q] * absmax, WK);
  if (XK != kFloat32 && XK != WK) w = round_to(w, XK);
  return w;
}

template <typename T>
struct alignas(16) Vec8 {
  T v[kGroup];
};

template <typename V>
FASTPEFT_HD V load_aligned(const void* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const V*>(p);
#else
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
#endif
}

// x[m, c0 : c0 + kGroup] in fp32 (0 past k)
template <typename T>
FASTPEFT_HD void load_x(const Params& p, int m, int c0, bool fast, float (&xv)[kGroup]) {
  const T* row = static_cast<const T*>(p.a.x) + static_cast<int64_t>(m) * p.a.stride_xm;
  if (fast) {
    const Vec8<T> v = load_aligned<Vec8<T>>(row + c0);
#pragma unroll
    for (int j = 0; j < kGroup; ++j) xv[j] = to_float(v.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kGroup; ++j) xv[j] = c0 + j < p.a.K ? to_float(row[c0 + j]) : 0.0f;
  }
}

// W[n, c0 : c0 + kGroup] dequantised (0 past k)
template <int XK, int WK>
FASTPEFT_HD void load_w(const Params& p, const float* code, int n, int c0, bool fast, float (&w)[kGroup]) {
  const int64_t i0 = static_cast<int64_t>(n) * p.a.K + c0;
  if (fast) {
    const uint32_t word = load_aligned<uint32_t>(p.a.packed + (i0 >> 1));
    const float absmax = p.a.absmax[i0 >> p.block_shift];
#pragma unroll
    for (int j = 0; j < kGroup / 2; ++j) {
      const int byte = (word >> (8 * j)) & 0xff;   // little endian: byte j holds elements 2j, 2j + 1
      w[2 * j] = weight_value<XK, WK>(code, byte >> 4, absmax);
      w[2 * j + 1] = weight_value<XK, WK>(code, byte & 15, absmax);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      w[j] = 0.0f;
      if (c0 + j < p.a.K) {
        const int64_t i = i0 + j;
        const int byte = p.a.packed[i >> 1];
        const int q = (i & 1) ? (byte & 15) : (byte >> 4);
        w[j] = weight_value<XK, WK>(code, q, p.a.absmax[i >> p.block_shift]);
      }
    }
  }
}

// acc[m][r] += Σ_c x[m, c] · W[n0 + r, c] over the groups of thread (warp, lane); WK: the quant
// state's dtype
template <typename T, int MT, int WK>
FASTPEFT_HD void decode_thread(const Params& p, const float* code, int n0, int warp, int lane,
                               float (&acc)[MT][kRows]) {
  constexpr int XK = DtypeOf<T>::value;
  for (int c0 = (warp * 32 + lane) * kGroup; c0 < p.a.K; c0 += kBlockStride) {
    const bool fast = p.vec && c0 + kGroup <= p.a.K;
    float w[kRows][kGroup];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (n0 + r < p.a.N) {
        load_w<XK, WK>(p, code, n0 + r, c0, fast, w[r]);
      } else {
#pragma unroll
        for (int j = 0; j < kGroup; ++j) w[r][j] = 0.0f;
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < p.a.M) {
        float xv[kGroup];
        load_x<T>(p, m, c0, fast, xv);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
#pragma unroll
          for (int j = 0; j < kGroup; ++j) acc[m][r] = fmaf(xv[j], w[r][j], acc[m][r]);
        }
      }
    }
  }
}

// y[m, n] = s·(U Bᵀ)[m, n]·o[n] + b[n] + (X Wᵀ)[m, n], in fp32
template <typename T>
FASTPEFT_HD float decode_epilogue(const Params& p, int m, int n, float xw) {
  const T* u = static_cast<const T*>(p.a.u) + static_cast<int64_t>(m) * p.a.R;
  const T* b = static_cast<const T*>(p.a.lora_b) + static_cast<int64_t>(n) * p.a.R;
  float ub = 0.0f;
  for (int j = 0; j < p.a.R; ++j) ub = fmaf(to_float(u[j]), to_float(b[j]), ub);
  float col_scale = p.a.scale;
  if (p.a.out_scale != nullptr) col_scale *= to_float(static_cast<const T*>(p.a.out_scale)[n]);
  float y = ub * col_scale;
  if (p.a.bias != nullptr) y += to_float(static_cast<const T*>(p.a.bias)[n]);
  return y + xw;
}

// launch-independent checks and derived values; false when the arguments are out of range
inline bool make_params(const Decode4Args& a, Params* p) {
  if (a.M < 0 || a.M > kDecodeMaxM || a.N < 0 || a.K < 0 || a.R < 0) return false;
  if (a.dtype < kFloat32 || a.dtype > kBFloat16 || a.w_dtype < kFloat32 || a.w_dtype > kBFloat16) return false;
  int shift = 0;
  while ((1 << shift) < a.blocksize && shift < 13) ++shift;
  if (a.blocksize < 32 || (1 << shift) != a.blocksize) return false;
  const int elem = a.dtype == kFloat32 ? 4 : 2;
  p->a = a;
  p->block_shift = shift;
  p->vec = a.K % kGroup == 0 && reinterpret_cast<uintptr_t>(a.packed) % 4 == 0 &&
           reinterpret_cast<uintptr_t>(a.x) % 16 == 0 && (a.stride_xm * elem) % 16 == 0;
  return true;
}

}  // namespace decode4
}  // namespace fastpeft
