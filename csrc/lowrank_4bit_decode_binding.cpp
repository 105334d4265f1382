// torch binding of the 4-bit decode kernel: fastpeft._C.lowrank4_decode(...)
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "lowrank_4bit_decode.h"

namespace {

int dtype_code(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return fastpeft::kFloat32;
    case at::kHalf: return fastpeft::kFloat16;
    case at::kBFloat16: return fastpeft::kBFloat16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t);
  }
  return -1;
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " has dtype ", t.scalar_type(), " but x has ",
              x.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Y [M, d] = X Wᵀ + bias + scale·(U Bᵀ) ⊙ out_scale for M <= 16, W [d, k] 4-bit.
//   x [M, k] (unit column stride); packed: the uint8 bytes of W; absmax fp32 per block (nested
//   statistics expanded); code fp32 [16]; w_dtype: the quant state's dtype; u [M, r]; lora_b [d, r].
at::Tensor lowrank4_decode(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const at::Tensor& code, at::ScalarType w_dtype, int64_t blocksize, int64_t d,
                           const at::Tensor& u, const at::Tensor& lora_b,
                           const std::optional<at::Tensor>& out_scale, const std::optional<at::Tensor>& bias,
                           double scale) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be 2-D with unit column stride");
  const int64_t M = x.size(0), K = x.size(1), R = u.size(1);
  TORCH_CHECK(M <= fastpeft::kDecodeMaxM, "the decode kernel takes M <= ", fastpeft::kDecodeMaxM,
              " rows, got M=", M);
  TORCH_CHECK(d * K < (int64_t(1) << 62) && K < (int64_t(1) << 31) && d < (int64_t(1) << 31),
              "weight shape [", d, ", ", K, "] out of range");
  TORCH_CHECK(packed.device() == x.device() && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed must be contiguous uint8 on x's device");
  TORCH_CHECK(packed.numel() == (d * K + 1) / 2, "packed has ", packed.numel(), " bytes, the weight [", d,
              ", ", K, "] needs ", (d * K + 1) / 2);
  TORCH_CHECK(absmax.device() == x.device() && absmax.scalar_type() == at::kFloat && absmax.is_contiguous(),
              "absmax must be contiguous float32 on x's device");
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "blocksize must be a power of two in 32..4096, got ", blocksize);
  TORCH_CHECK(absmax.numel() == (d * K + blocksize - 1) / blocksize, "absmax has ", absmax.numel(),
              " entries, the weight needs ", (d * K + blocksize - 1) / blocksize);
  TORCH_CHECK(code.device() == x.device() && code.scalar_type() == at::kFloat && code.numel() == 16 &&
                  code.is_contiguous(),
              "code must be 16 contiguous float32 values on x's device");
  check_like(u, x, "u");
  check_like(lora_b, x, "lora_B");
  TORCH_CHECK(u.dim() == 2 && u.size(0) == M, "u must be [M=", M, ", r], got ", u.sizes());
  TORCH_CHECK(lora_b.dim() == 2 && lora_b.size(0) == d && lora_b.size(1) == R, "lora_B must be [d=", d,
              ", r=", R, "], got ", lora_b.sizes());
  if (out_scale) {
    check_like(*out_scale, x, "out_scale");
    TORCH_CHECK(out_scale->numel() == d, "out_scale must have d=", d, " entries");
  }
  if (bias) {
    check_like(*bias, x, "bias");
    TORCH_CHECK(bias->numel() == d, "bias must have d=", d, " entries");
  }

  auto y = at::empty({M, d}, x.options());
  fastpeft::Decode4Args args;
  args.dtype = dtype_code(x.scalar_type(), "x");
  args.x = x.data_ptr();
  args.stride_xm = x.stride(0);
  args.packed = packed.data_ptr<uint8_t>();
  args.absmax = absmax.data_ptr<float>();
  args.code = code.data_ptr<float>();
  args.w_dtype = dtype_code(w_dtype, "the quant state's dtype");
  args.blocksize = static_cast<int>(blocksize);
  args.u = u.data_ptr();
  args.lora_b = lora_b.data_ptr();
  args.out_scale = out_scale ? out_scale->data_ptr() : nullptr;
  args.bias = bias ? bias->data_ptr() : nullptr;
  args.scale = static_cast<float>(scale);
  args.y = y.data_ptr();
  args.stride_ym = y.stride(0);
  args.M = static_cast<int>(M);
  args.N = static_cast<int>(d);
  args.K = static_cast<int>(K);
  args.R = static_cast<int>(R);

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = fastpeft::lowrank4_decode(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "lowrank4_decode: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastpeft CUDA kernels";
  m.def("lowrank4_decode", &lowrank4_decode,
        "Y = X W^T + bias + scale * (U B^T) * out_scale for M <= 16 over a 4-bit W (bitsandbytes layout)",
        py::arg("x"), py::arg("packed"), py::arg("absmax"), py::arg("code"), py::arg("w_dtype"),
        py::arg("blocksize"), py::arg("d"), py::arg("u"), py::arg("lora_b"), py::arg("out_scale"),
        py::arg("bias"), py::arg("scale"));
}
