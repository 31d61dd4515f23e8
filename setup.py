"""Builds lightcnn._C: the C++ kernels in csrc/*.cpp and, when CUDA is available, csrc/cuda/*.cu.

CUDA is compiled when a GPU is visible or LIGHTCNN_FORCE_CUDA=1 (CI sets it so that the CUDA code is
proved to compile and link without a GPU; it then also needs CUDA_HOME and TORCH_CUDA_ARCH_LIST).
A CPU-only torch or a missing CUDA toolkit gives a CPU-only build and a one-line message.
"""
import glob
import os
import platform

import torch
from setuptools import setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    force = os.environ.get("LIGHTCNN_FORCE_CUDA", "0") == "1"
    if not (force or torch.cuda.is_available()):
        print("lightcnn: no GPU visible and LIGHTCNN_FORCE_CUDA unset: building the CPU kernels only")
        return False
    if torch.version.cuda is None:
        print("lightcnn: this torch was built without CUDA: building the CPU kernels only")
        return False
    if cpp_extension.CUDA_HOME is None or not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        print("lightcnn: no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc): "
              "building the CPU kernels only")
        return False
    return True


def _extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx = ["-O3", "-std=c++20", "-Wno-unknown-pragmas"]  # torch >= 2.10 headers need C++20
    if platform.machine() in ("x86_64", "AMD64"):
        # at::vec uses AVX2 only when compiled for it; every x86-64 server since 2013 has AVX2 + FMA.
        cxx += ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    # ATen inlines at::parallel_for as OpenMP pragmas when torch uses OpenMP (the libgomp torch ships is reused).
    cxx += ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() else []
    if _want_cuda():
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        nvcc = ["-O3", "-std=c++20", "-DWITH_CUDA"]  # no fast-math: outputs must match the references
        return cpp_extension.CUDAExtension(
            "lightcnn._C", sources, extra_compile_args={"cxx": cxx + ["-DWITH_CUDA"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"] if "-fopenmp" in cxx else [],
        )
    return cpp_extension.CppExtension(
        "lightcnn._C", sources, extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"] if "-fopenmp" in cxx else [],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
