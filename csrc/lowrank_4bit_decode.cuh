// The 4-bit decode kernel's code, as __host__ __device__ functions: the kernel runs them on the GPU
// with one lane per thread (NL = 1), and a host build runs the very same code with the 32 lanes of
// a warp side by side (NL = 32, tests/csrc), the tensor-core product emulated from its documented
// fragment layout.
//
// Work split. A block of kWarps warps computes kRows = 32 consecutive outputs n0 .. n0 + 31 of Y
// for every row m < M, and the whole T = X Aᵀ [M, r] (every block computes T: r·k values of A,
// read from L2 after the first block, against the block's 32·k/2 bytes of W). The warps split k
// in whole quantisation blocks; within a warp, each step covers 32 columns ("a span") of
// 16-row tiles with mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulate):
//
//   * W is the A operand (16 rows of W × 16 columns), X the B operand (8 rows of X; M > 8 takes a
//     second product with rows 8..15), D [16 rows of W × 8 rows of X];
//   * lane (g = lane / 4, t = lane % 4) loads one 32-bit word of packed W per row (rows g and
//     g + 8 of the tile): columns c0 + 8t .. c0 + 8t + 7, and the 16 bytes of x and of A over the
//     same columns. The product's k slots are a permutation of the span's columns (slot pair
//     2t + 8h of step s holds columns c0 + 8t + 4s + 2h, + 1 for every operand), so each lane's
//     operands come from one contiguous load and no operand is shuffled;
//   * a word's 8 nibbles become four pairs of 16-bit code values with __byte_perm over a 16-entry
//     table held in registers as two byte planes (low and high bytes of the fp16/bf16 code
//     values), four nibbles per permute: 21 instructions per 8 weights (decode8);
//   * the products of one quantisation block accumulate on their own, then add to the output
//     accumulator times the block's fp32 absmax (formed in registers for nested statistics:
//     code2[q]·absmax2[i / blocksize2] + offset, multiply then add, each rounded, as
//     bitsandbytes computes it). W therefore enters as rnd16(code[q])·absmax, while
//     bitsandbytes' dense W is rnd16(code[q]·absmax): the two differ by at most one rounding of
//     the 16-bit dtype per weight.
//
// T = X Aᵀ uses the same X operands, A as the A operand (16 rows of A per tile). After the loop
// the warps' partial sums meet in shared memory and are added in a fixed order (deterministic);
// the epilogue forms U = σ(T)Sᵀ | σ(T) ⊙ S | σ(T) rounded to x's dtype (as the Triton decode
// kernel), Y = X Wᵀ + s·(U Bᵀ) ⊙ o + b, and block 0 writes T.
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

constexpr int kWarps = 4;                // warps per block, splitting k in whole quantisation blocks
constexpr int kTiles = 2;                // 16-row tiles of W per block
constexpr int kRows = 16 * kTiles;       // outputs (rows of W) per block
constexpr int kSpan = 32;                // columns per step: 4 lanes × 8 nibbles
constexpr int kThreads = kWarps * 32;

// Decode4Args plus what the launcher derives from it
struct Params {
  Decode4Args a;
  int block_shift;    // log2(blocksize)
  int block2_shift;   // log2(blocksize2) (nested statistics)
};

// -- scalars ------------------------------------------------------------------------------------

template <typename T> struct DtypeOf;
template <> struct DtypeOf<__half> { static constexpr int value = kFloat16; };
template <> struct DtypeOf<__nv_bfloat16> { static constexpr int value = kBFloat16; };

FASTPEFT_HD float to_float(__half v) { return __half2float(v); }
FASTPEFT_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> FASTPEFT_HD T from_float(float v);
template <> FASTPEFT_HD __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> FASTPEFT_HD __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// v rounded to T (nearest even), back in fp32
template <typename T> FASTPEFT_HD float round_to(float v) { return to_float(from_float<T>(v)); }

template <typename T> FASTPEFT_HD uint16_t bits_of(T v) {
  uint16_t b;
  memcpy(&b, &v, sizeof(b));
  return b;
}

template <typename T> FASTPEFT_HD float float_of_bits(uint32_t b) {
  const uint16_t h = static_cast<uint16_t>(b);
  T v;
  memcpy(&v, &h, sizeof(v));
  return to_float(v);
}

FASTPEFT_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// a·b and a + b, each rounded to fp32 on its own (never contracted into an FMA)
FASTPEFT_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;   // the host build compiles with -ffp-contract=off
#endif
}

FASTPEFT_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// PTX prmt (default mode) for selectors whose nibbles are all below 8: byte i of the result is
// byte (s >> 4i) & 7 of the pair (x = bytes 0..3, y = bytes 4..7). Inline PTX rather than
// __byte_perm, which masks its selector on every call.
FASTPEFT_HD uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(x), "r"(y), "r"(s));
  return r;
#else
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
#endif
}

// (a & b) | c in one instruction (LOP3)
FASTPEFT_HD uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
#else
  return (a & b) | c;
#endif
}

// -- the code table and the nibble decoder ----------------------------------------------------------

// The 16 code values in T as two byte planes: byte q % 4 of lo[q / 4] (hi[q / 4]) is the low (high)
// byte of code[q].
struct Lut {
  uint32_t lo[4];
  uint32_t hi[4];
};

template <typename T>
FASTPEFT_HD Lut make_lut(const float* code) {
  Lut l = {{0, 0, 0, 0}, {0, 0, 0, 0}};
  for (int q = 0; q < 16; ++q) {
    const uint32_t b = bits_of(from_float<T>(code[q]));
    l.lo[q / 4] |= (b & 0xffu) << (8 * (q % 4));
    l.hi[q / 4] |= (b >> 8) << (8 * (q % 4));
  }
  return l;
}

// Nibbles 0..3 of the selectors: s holds each nibble's low 3 bits, u selects, per byte, the
// lower or the upper half-table (byte i, or byte 4 + i where bit 3 of nibble i is set). Returns
// the code values of nibbles (1, 0) and (3, 2) as pairs (low half first): the elements in
// memory order, the high nibble of a byte coming first.
FASTPEFT_HD void lookup4(const Lut& l, uint32_t s, uint32_t u, uint32_t& p0, uint32_t& p1) {
  const uint32_t lo = byte_perm(byte_perm(l.lo[0], l.lo[1], s), byte_perm(l.lo[2], l.lo[3], s), u);
  const uint32_t hi = byte_perm(byte_perm(l.hi[0], l.hi[1], s), byte_perm(l.hi[2], l.hi[3], s), u);
  p0 = byte_perm(lo, hi, 0x4051u);
  p1 = byte_perm(lo, hi, 0x6273u);
}

// The 8 weights of a packed word (little endian: byte j holds elements 2j, high nibble, and
// 2j + 1) as four pairs of 16-bit code values: pair j = (code of element 2j, of element 2j + 1).
FASTPEFT_HD void decode8(const Lut& l, uint32_t w, uint32_t (&p)[4]) {
  const uint32_t s = w & 0x77777777u;
  const uint32_t u = and_or(w >> 1, 0x44444444u, 0x32103210u);
  lookup4(l, s, u, p[0], p[1]);
  lookup4(l, s >> 16, u >> 16, p[2], p[3]);
}

// -- loads ------------------------------------------------------------------------------------------

// 8 consecutive 16-bit values (16-byte aligned) as 4 pairs
FASTPEFT_HD void load_pairs(const void* ptr, uint32_t (&q)[4]) {
#if defined(__CUDA_ARCH__)
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(ptr));
  q[0] = v.x;
  q[1] = v.y;
  q[2] = v.z;
  q[3] = v.w;
#else
  memcpy(q, ptr, sizeof(q));
#endif
}

FASTPEFT_HD uint32_t load_word(const uint8_t* ptr) {
#if defined(__CUDA_ARCH__)
  return __ldg(reinterpret_cast<const unsigned int*>(ptr));
#else
  uint32_t w;
  memcpy(&w, ptr, sizeof(w));
  return w;
#endif
}

// the fp32 absmax of quantisation block `idx` (nested statistics expanded here, bit-exact)
FASTPEFT_HD float block_absmax(const Params& p, const float* code2, float offset, int64_t idx) {
  if (p.a.code2 == nullptr) return static_cast<const float*>(p.a.absmax)[idx];
  const int q = static_cast<const uint8_t*>(p.a.absmax)[idx];
  return add_rn(mul_rn(code2[q], p.a.absmax2[idx >> p.block2_shift]), offset);
}

// -- the tensor-core product ------------------------------------------------------------------------

// d += a·b for the NL lanes held (m16n8k16, row.col, fp32 accumulate). On the device NL = 1 (this
// thread's fragments); on the host NL = 32 (a whole warp), emulated from the PTX fragment layout.
template <typename T, int NL>
FASTPEFT_HD void mma(float (&d)[NL][4], const uint32_t (&a)[NL][4], const uint32_t (&b)[NL][2]) {
#if defined(__CUDA_ARCH__)
  static_assert(NL == 1, "one lane per thread on the device");
  if constexpr (DtypeOf<T>::value == kFloat16) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3])
                 : "r"(a[0][0]), "r"(a[0][1]), "r"(a[0][2]), "r"(a[0][3]), "r"(b[0][0]), "r"(b[0][1]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3])
                 : "r"(a[0][0]), "r"(a[0][1]), "r"(a[0][2]), "r"(a[0][3]), "r"(b[0][0]), "r"(b[0][1]));
  }
#else
  static_assert(NL == 32, "a whole warp on the host");
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = float_of_bits<T>(a[lane][0] >> (16 * h));
      A[g + 8][2 * t + h] = float_of_bits<T>(a[lane][1] >> (16 * h));
      A[g][2 * t + 8 + h] = float_of_bits<T>(a[lane][2] >> (16 * h));
      A[g + 8][2 * t + 8 + h] = float_of_bits<T>(a[lane][3] >> (16 * h));
      B[2 * t + h][g] = float_of_bits<T>(b[lane][0] >> (16 * h));
      B[2 * t + 8 + h][g] = float_of_bits<T>(b[lane][1] >> (16 * h));
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int c = 0; c < 4; ++c) {
      const int row = g + 8 * (c / 2), col = 2 * t + c % 2;
      float s = d[lane][c];
      for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
      d[lane][c] = s;
    }
  }
#endif
}

// d[mg] += (16 rows × 32 columns of the A operand) · (X rows mg·8 .. mg·8 + 7)ᵀ over one span: two
// k16 steps. lo / hi: each lane's pairs of rows g and g + 8; xq: its X pairs (row mg·8 + g); pair
// 2·step of a row fills k slots 2t, 2t + 1, pair 2·step + 1 slots 2t + 8, 2t + 9.
template <typename T, int MG, int NL>
FASTPEFT_HD void mma_pairs(float (&d)[MG][NL][4], const uint32_t (&lo)[NL][4], const uint32_t (&hi)[NL][4],
                           const uint32_t (&xq)[MG][NL][4]) {
#pragma unroll
  for (int step = 0; step < 2; ++step) {
    uint32_t af[NL][4];
    for (int i = 0; i < NL; ++i) {
      af[i][0] = lo[i][2 * step];
      af[i][1] = hi[i][2 * step];
      af[i][2] = lo[i][2 * step + 1];
      af[i][3] = hi[i][2 * step + 1];
    }
#pragma unroll
    for (int mg = 0; mg < MG; ++mg) {
      uint32_t bf[NL][2];
      for (int i = 0; i < NL; ++i) {
        bf[i][0] = xq[mg][i][2 * step];
        bf[i][1] = xq[mg][i][2 * step + 1];
      }
      mma<T, NL>(d[mg], af, bf);
    }
  }
}

// -- the main loop of one warp ----------------------------------------------------------------------

// Accumulators of one warp: W tiles [kTiles][MG] and T tiles [RT][MG], each [NL lanes][4].
template <int MG, int RT, int NL>
struct Acc {
  float w[kTiles][MG][NL][4];
  float t[RT][MG][NL][4];
};

// Adds this warp's share of k (whole quantisation blocks) of X Wᵀ (rows n0 .. n0 + kRows - 1 of
// W) and of X Aᵀ to `acc`; lanes lane0 .. lane0 + NL - 1.
template <typename T, int MG, int RT, int NL>
FASTPEFT_HD void warp_main(const Params& p, const Lut& lut, const float* code2, int n0, int warp, int lane0,
                           Acc<MG, RT, NL>& acc) {
  const Decode4Args& a = p.a;
  const int64_t blocks = a.K >> p.block_shift;                       // quantisation blocks per row
  const int64_t b_begin = warp * blocks / kWarps, b_end = (warp + 1) * blocks / kWarps;
  const int spans = a.blocksize / kSpan;
  const float offset = a.code2 != nullptr ? *a.offset : 0.0f;
  // Each lane's operands at the warp's first column, c = first + 8t: rows g and g + 8 of each
  // W tile with their first absmax block, rows mg·8 + g of X, rows 16j + g and 16j + g + 8 of A.
  // Rows past N, M or r read the last row: their products land in outputs that are never read.
  const uint8_t* wp[kTiles][2][NL];
  int64_t wblock[kTiles][2][NL];
  const T* xp[MG][NL];
  const T* ap[RT][2][NL];
  for (int i = 0; i < NL; ++i) {
    const int lane = lane0 + i;
    const int64_t col = (b_begin << p.block_shift) + 8 * (lane % 4);
    for (int j = 0; j < kTiles; ++j) {
      for (int h = 0; h < 2; ++h) {
        const int64_t row = min64(n0 + 16 * j + 8 * h + lane / 4, a.N - 1);
        wp[j][h][i] = a.packed + ((row * a.K + col) >> 1);
        wblock[j][h][i] = row * blocks + b_begin;
      }
      for (int mg = 0; mg < MG; ++mg) acc.w[j][mg][i][0] = acc.w[j][mg][i][1] = acc.w[j][mg][i][2] = acc.w[j][mg][i][3] = 0.0f;
    }
    for (int mg = 0; mg < MG; ++mg)
      xp[mg][i] = static_cast<const T*>(a.x) + min64(mg * 8 + lane / 4, a.M - 1) * a.stride_xm + col;
    for (int j = 0; j < RT; ++j) {
      for (int h = 0; h < 2; ++h) ap[j][h][i] = static_cast<const T*>(a.lora_a) + min64(16 * j + 8 * h + lane / 4, a.R - 1) * a.K + col;
      for (int mg = 0; mg < MG; ++mg) acc.t[j][mg][i][0] = acc.t[j][mg][i][1] = acc.t[j][mg][i][2] = acc.t[j][mg][i][3] = 0.0f;
    }
  }
  for (int64_t b = b_begin; b < b_end; ++b) {
    float blk[kTiles][MG][NL][4];
    for (int j = 0; j < kTiles; ++j)
      for (int mg = 0; mg < MG; ++mg)
        for (int i = 0; i < NL; ++i) blk[j][mg][i][0] = blk[j][mg][i][1] = blk[j][mg][i][2] = blk[j][mg][i][3] = 0.0f;
#pragma unroll 2
    for (int s = 0; s < spans; ++s) {
      // X operands: pairs of columns c .. c + 7
      uint32_t xq[MG][NL][4];
#pragma unroll
      for (int mg = 0; mg < MG; ++mg) {
#pragma unroll
        for (int i = 0; i < NL; ++i) {
          load_pairs(xp[mg][i], xq[mg][i]);
          xp[mg][i] += kSpan;
        }
      }
#pragma unroll
      for (int j = 0; j < kTiles; ++j) {
        uint32_t wlo[NL][4], whi[NL][4];
#pragma unroll
        for (int i = 0; i < NL; ++i) {
          decode8(lut, load_word(wp[j][0][i]), wlo[i]);
          decode8(lut, load_word(wp[j][1][i]), whi[i]);
          wp[j][0][i] += kSpan / 2;
          wp[j][1][i] += kSpan / 2;
        }
        mma_pairs<T, MG, NL>(blk[j], wlo, whi, xq);
      }
#pragma unroll
      for (int j = 0; j < RT; ++j) {
        uint32_t alo[NL][4], ahi[NL][4];
#pragma unroll
        for (int i = 0; i < NL; ++i) {
          load_pairs(ap[j][0][i], alo[i]);
          load_pairs(ap[j][1][i], ahi[i]);
          ap[j][0][i] += kSpan;
          ap[j][1][i] += kSpan;
        }
        mma_pairs<T, MG, NL>(acc.t[j], alo, ahi, xq);
      }
    }
    // the block's products times its absmax: D rows g and g + 8 are rows g, g + 8 of the tile
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
#pragma unroll
      for (int i = 0; i < NL; ++i) {
        const float s_lo = block_absmax(p, code2, offset, wblock[j][0][i]++);
        const float s_hi = block_absmax(p, code2, offset, wblock[j][1][i]++);
#pragma unroll
        for (int mg = 0; mg < MG; ++mg) {
          acc.w[j][mg][i][0] = fmaf(s_lo, blk[j][mg][i][0], acc.w[j][mg][i][0]);
          acc.w[j][mg][i][1] = fmaf(s_lo, blk[j][mg][i][1], acc.w[j][mg][i][1]);
          acc.w[j][mg][i][2] = fmaf(s_hi, blk[j][mg][i][2], acc.w[j][mg][i][2]);
          acc.w[j][mg][i][3] = fmaf(s_hi, blk[j][mg][i][3], acc.w[j][mg][i][3]);
        }
      }
    }
  }
}

// -- the block's epilogue ---------------------------------------------------------------------------

struct Smem {
  float code2[256];
  float xw[kWarps][kDecodeMaxM][kRows];        // per warp: (X Wᵀ)[m, n0 + row]; [0]: the sum
  float t[kWarps][kDecodeMaxM][kDecodeMaxR];   // per warp: T[m, j]; [0]: the sum
  float z[kDecodeMaxM][kDecodeMaxR];           // σ(T) rounded to x's dtype (full core)
  float u[kDecodeMaxM][kDecodeMaxR];           // U rounded to x's dtype
};

// D fragments to shared memory: c0, c1 at (row g, X rows 2t, 2t + 1), c2, c3 at row g + 8
template <int MG, int RT, int NL>
FASTPEFT_HD void store_partials(Smem& sm, int warp, int lane0, const Acc<MG, RT, NL>& acc) {
  for (int i = 0; i < NL; ++i) {
    const int lane = lane0 + i, g = lane / 4, t = lane % 4;
    for (int mg = 0; mg < MG; ++mg) {
      const int m = mg * 8 + 2 * t;
      for (int c = 0; c < 4; ++c) {
        const int dm = m + c % 2, dr = g + 8 * (c / 2);
        for (int j = 0; j < kTiles; ++j) sm.xw[warp][dm][16 * j + dr] = acc.w[j][mg][i][c];
        for (int j = 0; j < RT; ++j) sm.t[warp][dm][16 * j + dr] = acc.t[j][mg][i][c];
      }
    }
  }
}

FASTPEFT_HD float activation(float t, int kind) {
  if (kind == 1) return t > 0.0f ? t : 0.0f;
  if (kind == 2) return 0.5f * t * (1.0f + erff(t * 0.7071067811865476f));
  if (kind == 3) return t * (1.0f / (1.0f + expf(-t)));
  return t;
}

// Phase 1, thread `o` of the block: the warps' sums in order, T written by block 0, σ(T) and
// U = σ(T) ⊙ S | σ(T) (rounded to T's dtype), or σ(T) alone for a full core (phase 2 applies it).
template <typename T>
FASTPEFT_HD void epilogue_sums(const Params& p, Smem& sm, int o, bool write_t) {
  const Decode4Args& a = p.a;
  if (o < a.M * kRows) {
    const int m = o / kRows, n = o % kRows;
    float v = sm.xw[0][m][n];
    for (int w = 1; w < kWarps; ++w) v += sm.xw[w][m][n];
    sm.xw[0][m][n] = v;
  }
  if (o < a.M * a.R) {
    const int m = o / a.R, j = o % a.R;
    float v = sm.t[0][m][j];
    for (int w = 1; w < kWarps; ++w) v += sm.t[w][m][j];
    if (write_t) static_cast<T*>(a.t)[o] = from_float<T>(v);
    const float z = activation(v, a.activation);
    if (a.core_kind == 2) {
      sm.z[m][j] = round_to<T>(z);
    } else {
      const float sj = a.core_kind == 1 ? to_float(static_cast<const T*>(a.core)[j]) : 1.0f;
      sm.u[m][j] = round_to<T>(a.core_kind == 1 ? z * sj : z);
    }
  }
}

// Phase 2 (full core only): U[m, i] = Σ_j σ(T)[m, j]·S[i, j]
template <typename T>
FASTPEFT_HD void epilogue_core(const Params& p, Smem& sm, int o) {
  const Decode4Args& a = p.a;
  if (o < a.M * a.R) {
    const int m = o / a.R, i = o % a.R;
    const T* s = static_cast<const T*>(a.core) + static_cast<int64_t>(i) * a.R;
    float v = 0.0f;
    for (int j = 0; j < a.R; ++j) v = fmaf(sm.z[m][j], to_float(s[j]), v);
    sm.u[m][i] = round_to<T>(v);
  }
}

// Phase 3: y[m, n] = (X Wᵀ)[m, n] + s·o[n]·(U Bᵀ)[m, n] + b[n]
template <typename T>
FASTPEFT_HD void epilogue_out(const Params& p, const Smem& sm, int n0, int o) {
  const Decode4Args& a = p.a;
  if (o >= a.M * kRows) return;
  const int m = o / kRows, n = n0 + o % kRows;
  if (n >= a.N) return;
  const T* b = static_cast<const T*>(a.lora_b) + static_cast<int64_t>(n) * a.R;
  float ub = 0.0f;
  for (int j = 0; j < a.R; ++j) ub = fmaf(sm.u[m][j], to_float(b[j]), ub);
  float col_scale = a.scale;
  if (a.out_scale != nullptr) col_scale *= to_float(static_cast<const T*>(a.out_scale)[n]);
  float y = sm.xw[0][m][o % kRows] + ub * col_scale;
  if (a.bias != nullptr) y += to_float(static_cast<const T*>(a.bias)[n]);
  static_cast<T*>(a.y)[static_cast<int64_t>(m) * a.stride_ym + n] = from_float<T>(y);
}

// -- arguments --------------------------------------------------------------------------------------

inline int log2_exact(int64_t v) {
  int s = 0;
  while (s < 62 && (int64_t(1) << s) < v) ++s;
  return (int64_t(1) << s) == v ? s : -1;
}

// Why the kernel cannot take `a` (nullptr: it can); fills `p`.
inline const char* check_args(const Decode4Args& a, Params* p) {
  if (a.dtype != kFloat16 && a.dtype != kBFloat16) return "x must be float16 or bfloat16";
  if (a.M < 0 || a.M > kDecodeMaxM) return "M must be at most 16";
  if (a.R < 1 || a.R > kDecodeMaxR) return "r must be in 1..64";
  if (a.N < 0 || a.K < 0) return "negative sizes";
  if (a.M > 0 && a.N == 0) return "d must be positive (T is computed by the blocks over d)";
  const int shift = log2_exact(a.blocksize);
  if (shift < 5 || shift > 12) return "blocksize must be a power of two in 32..4096";
  if (a.K % a.blocksize != 0) return "k must be a multiple of the blocksize";
  if (reinterpret_cast<uintptr_t>(a.x) % 16 != 0 || a.stride_xm % 8 != 0)
    return "x must be 16-byte aligned with a row stride that is a multiple of 8";
  if (reinterpret_cast<uintptr_t>(a.lora_a) % 16 != 0) return "lora_A must be 16-byte aligned";
  if (reinterpret_cast<uintptr_t>(a.packed) % 4 != 0) return "the packed weight must be 4-byte aligned";
  if (a.core_kind < 0 || a.core_kind > 2 || (a.core_kind != 0 && a.core == nullptr)) return "bad core";
  if (a.activation < 0 || a.activation > 3) return "unknown activation";
  int shift2 = 0;
  if (a.code2 != nullptr) {
    shift2 = log2_exact(a.blocksize2);
    if (shift2 < 0 || a.absmax2 == nullptr || a.offset == nullptr)
      return "nested statistics need absmax2, the offset and a power-of-two blocksize2";
  }
  p->a = a;
  p->block_shift = shift;
  p->block2_shift = shift2;
  return nullptr;
}

}  // namespace decode4
}  // namespace fastpeft
