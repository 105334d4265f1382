// Host build of the 4-bit decode kernel's code (csrc/lowrank_4bit_decode.cuh): every block of the
// launch runs the same warp_main / store_partials / epilogue functions as on the GPU, each warp
// with its 32 lanes side by side (the tensor-core product emulated from its fragment layout), the
// epilogue phases thread by thread. Loaded with ctypes by tests/test_csrc.py to check the
// indexing, the table decoder, the nested absmax and the epilogue without a GPU.
// Build with -ffp-contract=off (the absmax expansion must not be contracted into an FMA).
#include <memory>

#include "lowrank_4bit_decode.cuh"

namespace {

using namespace fastpeft;
using namespace fastpeft::decode4;

template <typename T, int MG, int RT>
void run(const Params& p) {
  auto sm = std::make_unique<Smem>();
  if (p.a.code2 != nullptr) {
    for (int i = 0; i < 256; ++i) sm->code2[i] = p.a.code2[i];
  }
  const Lut lut = make_lut<T>(p.a.code);
  const int outputs = kDecodeMaxM * kDecodeMaxR;
  for (int n0 = 0; n0 < p.a.N; n0 += kRows) {
    for (int warp = 0; warp < kWarps; ++warp) {
      auto acc = std::make_unique<Acc<MG, RT, 32>>();
      warp_main<T, MG, RT, 32>(p, lut, sm->code2, n0, warp, 0, *acc);
      store_partials<MG, RT, 32>(*sm, warp, 0, *acc);
    }
    for (int o = 0; o < outputs; ++o) epilogue_sums<T>(p, *sm, o, n0 == 0);
    if (p.a.core_kind == 2) {
      for (int o = 0; o < outputs; ++o) epilogue_core<T>(p, *sm, o);
    }
    for (int o = 0; o < kDecodeMaxM * kRows; ++o) epilogue_out<T>(p, *sm, n0, o);
  }
}

template <typename T, int MG>
void run_r(const Params& p) {
  switch ((p.a.R + 15) / 16) {
    case 1: run<T, MG, 1>(p); break;
    case 2: run<T, MG, 2>(p); break;
    case 3: run<T, MG, 3>(p); break;
    default: run<T, MG, 4>(p); break;
  }
}

template <typename T>
void run_m(const Params& p) {
  if (p.a.M <= 8) run_r<T, 1>(p);
  else run_r<T, 2>(p);
}

template <typename T>
void decode(const float* code, uint32_t word, uint32_t* out) {
  uint32_t p[4];
  decode8(make_lut<T>(code), word, p);
  for (int j = 0; j < 4; ++j) out[j] = p[j];
}

}  // namespace

// 0, or 1 with the launcher's reason in *reason for arguments it would refuse.
extern "C" int fastpeft_decode_emulate(const Decode4Args* args, const char** reason) {
  Params p;
  *reason = check_args(*args, &p);
  if (*reason != nullptr) return 1;
  if (args->M == 0) return 0;
  if (args->dtype == kFloat16) run_m<__half>(p);
  else run_m<__nv_bfloat16>(p);
  return 0;
}

// decode8 of one packed word over the table `code` rounded to `dtype`: four pairs of 16-bit codes
extern "C" void fastpeft_decode8(int dtype, const float* code, uint32_t word, uint32_t* out) {
  if (dtype == kFloat16) decode<__half>(code, word, out);
  else decode<__nv_bfloat16>(code, word, out);
}

// block_absmax for blocks 0 .. n - 1 (nested statistics when args->code2 is set)
extern "C" void fastpeft_block_absmax(const Decode4Args* args, int block2_shift, int64_t n, float* out) {
  Params p;
  p.a = *args;
  p.block_shift = 0;
  p.block2_shift = block2_shift;
  const float offset = args->code2 != nullptr ? *args->offset : 0.0f;
  for (int64_t i = 0; i < n; ++i) out[i] = block_absmax(p, args->code2, offset, i);
}
