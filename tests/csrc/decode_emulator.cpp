// Host build of the 4-bit decode kernel's per-thread code (csrc/lowrank_4bit_decode.cuh): every
// (block, warp, lane) of the launch runs the same decode_thread / decode_epilogue functions as
// on the GPU, lanes and warps summed in order. Loaded with ctypes by tests/test_csrc.py to check
// the indexing, the dequantisation and the epilogue against the float64 reference without a GPU.
#include "lowrank_4bit_decode.cuh"

namespace {

using namespace fastpeft;
using namespace fastpeft::decode4;

template <typename T, int MT, int WK>
void run(const Params& p) {
  for (int n0 = 0; n0 < p.a.N; n0 += kRows) {
    float total[MT][kRows] = {};
    for (int warp = 0; warp < kWarps; ++warp) {
      for (int lane = 0; lane < 32; ++lane) {
        float acc[MT][kRows] = {};
        decode_thread<T, MT, WK>(p, p.a.code, n0, warp, lane, acc);
        for (int m = 0; m < MT; ++m)
          for (int r = 0; r < kRows; ++r) total[m][r] += acc[m][r];
      }
    }
    for (int m = 0; m < p.a.M; ++m) {
      for (int r = 0; r < kRows && n0 + r < p.a.N; ++r) {
        T* y = static_cast<T*>(p.a.y) + static_cast<int64_t>(m) * p.a.stride_ym + n0 + r;
        *y = from_float<T>(decode_epilogue<T>(p, m, n0 + r, total[m][r]));
      }
    }
  }
}

template <typename T, int WK>
void run_m(const Params& p) {
  if (p.a.M <= 1) run<T, 1, WK>(p);
  else if (p.a.M <= 4) run<T, 4, WK>(p);
  else if (p.a.M <= 8) run<T, 8, WK>(p);
  else run<T, 16, WK>(p);
}

template <typename T>
void run_w(const Params& p) {
  if (p.a.w_dtype == kFloat32) run_m<T, kFloat32>(p);
  else if (p.a.w_dtype == kFloat16) run_m<T, kFloat16>(p);
  else run_m<T, kBFloat16>(p);
}

}  // namespace

// Returns 0, or 1 for arguments the launcher would refuse. `vec` reports the path taken.
extern "C" int fastpeft_decode_emulate(const Decode4Args* args, int* vec) {
  Params p;
  if (!make_params(*args, &p)) return 1;
  *vec = p.vec;
  if (p.a.dtype == kFloat32) run_w<float>(p);
  else if (p.a.dtype == kFloat16) run_w<__half>(p);
  else run_w<__nv_bfloat16>(p);
  return 0;
}
