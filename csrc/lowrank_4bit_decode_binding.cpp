// torch binding of the 4-bit decode kernel: fastpeft._C.lowrank4_decode(...)
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "lowrank_4bit_decode.h"

namespace {

int dtype_code(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kHalf: return fastpeft::kFloat16;
    case at::kBFloat16: return fastpeft::kBFloat16;
    default: TORCH_CHECK(false, name, " must be float16 or bfloat16, got ", t);
  }
  return -1;
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " has dtype ", t.scalar_type(), " but x has ",
              x.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

const void* optional_ptr(const std::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; }

// (Y [M, d], T [M, r]): T = X Aᵀ, U = σ(T)Sᵀ | σ(T) ⊙ S | σ(T), Y = X Wᵀ + bias + scale·(U Bᵀ) ⊙ out_scale
// for M <= 16, W [d, k] 4-bit, in one launch.
//   x [M, k] float16/bfloat16 (unit column stride); packed: the uint8 bytes of W; absmax: fp32
//   per block, or (nested) the uint8 codes with code2 fp32 [256], absmax2 fp32 and offset fp32
//   [1]; code fp32 [16]; lora_a [r, k]; core none, [r] or [r, r]; lora_b [d, r]; activation 0..3
//   (identity, relu, gelu, silu).
std::vector<at::Tensor> lowrank4_decode(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& code2,
    const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& offset, int64_t blocksize2,
    const at::Tensor& code, int64_t blocksize, int64_t d, const at::Tensor& lora_a,
    const std::optional<at::Tensor>& core, int64_t activation, const at::Tensor& lora_b,
    const std::optional<at::Tensor>& out_scale, const std::optional<at::Tensor>& bias, double scale) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be 2-D [M, k] with unit column stride, got sizes ",
              x.sizes(), " and strides ", x.strides());
  const int64_t M = x.size(0), K = x.size(1), R = lora_a.size(0);
  TORCH_CHECK(M <= fastpeft::kDecodeMaxM, "the decode kernel takes M <= ", fastpeft::kDecodeMaxM,
              " rows, got M=", M);
  TORCH_CHECK(d * K < (int64_t(1) << 62) && K < (int64_t(1) << 31) && d < (int64_t(1) << 31),
              "weight shape [", d, ", ", K, "] out of range");
  TORCH_CHECK(packed.device() == x.device() && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed must be contiguous uint8 on x's device (", x.device(), "), got ", packed.scalar_type(),
              " on ", packed.device());
  TORCH_CHECK(packed.numel() == (d * K + 1) / 2, "packed has ", packed.numel(), " bytes, the weight [", d,
              ", ", K, "] needs ", (d * K + 1) / 2);
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "blocksize must be a power of two in 32..4096, got ", blocksize);
  const bool nested = code2.has_value();
  TORCH_CHECK(absmax.device() == x.device() && absmax.is_contiguous() &&
                  absmax.scalar_type() == (nested ? at::kByte : at::kFloat),
              "absmax must be contiguous ", nested ? "uint8 (nested statistics)" : "float32", " on x's device, got ",
              absmax.scalar_type(), " on ", absmax.device());
  TORCH_CHECK(absmax.numel() == (d * K + blocksize - 1) / blocksize, "absmax has ", absmax.numel(),
              " entries, the weight needs ", (d * K + blocksize - 1) / blocksize);
  if (nested) {
    TORCH_CHECK(absmax2.has_value() && offset.has_value(), "nested statistics need absmax2 and offset");
    for (const auto* t : {&*code2, &*absmax2, &*offset}) {
      TORCH_CHECK(t->device() == x.device() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                  "code2, absmax2 and offset must be contiguous float32 on x's device");
    }
    TORCH_CHECK(code2->numel() == 256, "code2 must have 256 entries, got ", code2->numel());
    TORCH_CHECK(offset->numel() == 1, "offset must have one entry, got ", offset->numel());
    TORCH_CHECK(blocksize2 > 0 && (blocksize2 & (blocksize2 - 1)) == 0 &&
                    absmax2->numel() == (absmax.numel() + blocksize2 - 1) / blocksize2,
                "absmax2 must have one entry per ", blocksize2, " blocks (a power of two), got ", absmax2->numel());
  }
  TORCH_CHECK(code.device() == x.device() && code.scalar_type() == at::kFloat && code.numel() == 16 &&
                  code.is_contiguous(),
              "code must be 16 contiguous float32 values on x's device");
  check_like(lora_a, x, "lora_A");
  check_like(lora_b, x, "lora_B");
  TORCH_CHECK(lora_a.dim() == 2 && lora_a.size(1) == K, "lora_A must be [r, k=", K, "], got ", lora_a.sizes());
  TORCH_CHECK(lora_b.dim() == 2 && lora_b.size(0) == d && lora_b.size(1) == R, "lora_B must be [d=", d,
              ", r=", R, "], got ", lora_b.sizes());
  int core_kind = 0;
  if (core) {
    check_like(*core, x, "core");
    core_kind = core->dim() == 1 ? 1 : 2;
    TORCH_CHECK((core_kind == 1 && core->numel() == R) || (core->dim() == 2 && core->size(0) == R && core->size(1) == R),
                "core must be [r=", R, "] or [r, r], got ", core->sizes());
  }
  if (out_scale) {
    check_like(*out_scale, x, "out_scale");
    TORCH_CHECK(out_scale->numel() == d, "out_scale must have d=", d, " entries, got ", out_scale->numel());
  }
  if (bias) {
    check_like(*bias, x, "bias");
    TORCH_CHECK(bias->numel() == d, "bias must have d=", d, " entries, got ", bias->numel());
  }

  auto y = at::empty({M, d}, x.options());
  auto t = at::empty({M, R}, x.options());
  fastpeft::Decode4Args args{};
  args.dtype = dtype_code(x.scalar_type(), "x");
  args.x = x.data_ptr();
  args.stride_xm = x.stride(0);
  args.packed = packed.data_ptr<uint8_t>();
  args.absmax = absmax.data_ptr();
  args.code2 = nested ? code2->data_ptr<float>() : nullptr;
  args.absmax2 = nested ? absmax2->data_ptr<float>() : nullptr;
  args.offset = nested ? offset->data_ptr<float>() : nullptr;
  args.blocksize2 = static_cast<int>(blocksize2);
  args.code = code.data_ptr<float>();
  args.blocksize = static_cast<int>(blocksize);
  args.lora_a = lora_a.data_ptr();
  args.core = optional_ptr(core);
  args.core_kind = core_kind;
  args.activation = static_cast<int>(activation);
  args.lora_b = lora_b.data_ptr();
  args.out_scale = optional_ptr(out_scale);
  args.bias = optional_ptr(bias);
  args.scale = static_cast<float>(scale);
  args.y = y.data_ptr();
  args.stride_ym = y.stride(0);
  args.t = t.data_ptr();
  args.M = static_cast<int>(M);
  args.N = static_cast<int>(d);
  args.K = static_cast<int>(K);
  args.R = static_cast<int>(R);
  if (const char* why = fastpeft::lowrank4_decode_unsupported(args)) {
    TORCH_CHECK(false, "lowrank4_decode: ", why);
  }

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = fastpeft::lowrank4_decode(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "lowrank4_decode: ", cudaGetErrorString(err));
  return {y, t};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastpeft CUDA kernels";
  m.def("lowrank4_decode", &lowrank4_decode,
        "(Y, T) of the 4-bit low-rank forward for M <= 16 in one launch (bitsandbytes layout)",
        py::arg("x"), py::arg("packed"), py::arg("absmax"), py::arg("code2"), py::arg("absmax2"), py::arg("offset"),
        py::arg("blocksize2"), py::arg("code"), py::arg("blocksize"), py::arg("d"), py::arg("lora_a"),
        py::arg("core"), py::arg("activation"), py::arg("lora_b"), py::arg("out_scale"), py::arg("bias"),
        py::arg("scale"));
}
