"""Build script: pure Python unless a CUDA build is asked for or possible.

``fastpeft._C`` (the CUDA C++ kernels in csrc/) is built when ``FASTPEFT_BUILD_CUDA=1``, or when
torch with CUDA support and a CUDA toolchain are both present at build time (and
``FASTPEFT_BUILD_CUDA`` is not ``0``). Without it the package is complete in pure Python.
"""

import glob
import os
import shutil

from setuptools import setup


def _cuda_extensions():
    flag = os.environ.get("FASTPEFT_BUILD_CUDA")
    if flag == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if flag == "1":
            raise RuntimeError("FASTPEFT_BUILD_CUDA=1 needs torch in the build environment "
                               "(pip install --no-build-isolation .)")
        return [], {}
    has_toolchain = CUDA_HOME is not None and (shutil.which("nvcc") or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    if flag != "1" and not (torch.version.cuda and has_toolchain):
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources:
        return [], {}
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    ext = CUDAExtension(
        "fastpeft._C", sources,
        # the C++ standard is left to torch's BuildExtension (the one its headers need)
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
