"""Builds diffcirc._C: the CPU kernels always, the CUDA kernels whenever nvcc and a CUDA-enabled
torch are present (a GPU is not needed to compile them). DIFFCIRC_CUDA=0|1 forces CUDA off|on.
TORCH_CUDA_ARCH_LIST picks the architectures (default: 8.0 and 9.0, plus PTX for newer GPUs).
"""

import glob
import os
import shutil

from setuptools import setup

import torch

# A toolkit under the standard prefix wins over torch's guess from the nvcc on PATH (which may be
# a wrapper script outside the toolkit, leaving torch without the CUDA runtime library to link).
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def want_cuda() -> bool:
    forced = os.environ.get("DIFFCIRC_CUDA")
    available = torch.version.cuda is not None and CUDA_HOME is not None and (
        shutil.which("nvcc") is not None or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    if forced == "1":
        if not available:
            raise RuntimeError("DIFFCIRC_CUDA=1 but nvcc or a CUDA-enabled torch is missing "
                               f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
        return True
    if forced == "0":
        return False
    return available


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-Wall", "-Wno-unused-function", "-Wno-maybe-uninitialized"]
    srcs = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    cuda_srcs = sources("csrc/cuda/*.cu")
    if want_cuda() and cuda_srcs:
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        macros = [("DIFFCIRC_CUDA_ARCHS", f'"{archs}"')]
        nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        return CUDAExtension("diffcirc._C", srcs + cuda_srcs, define_macros=macros,
                             extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])
    return CppExtension("diffcirc._C", srcs, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
