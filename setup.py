"""Builds clm_ext._C against the installed torch: C++ kernels always, CUDA kernels where possible.
The package itself (metadata, dependencies, the `clm` command) is described in pyproject.toml.

Environment:
  CLM_EXT_CUDA=auto|1|0   build the CUDA kernels when a CUDA toolkit and a CUDA torch are present
                          (auto, the default), always (1: fail if that is impossible), or never (0).
  TORCH_CUDA_ARCH_LIST    GPU architectures, default "8.0;9.0+PTX": sm_80 and sm_90 binaries, plus sm_90 PTX
                          that the driver compiles for newer GPUs (without it they fail with "no kernel image").
  CLM_EXT_DEBUG=1         -O0 -g builds.
"""
import glob
import os
import sysconfig

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def build_cuda() -> bool:
    choice = os.environ.get("CLM_EXT_CUDA", "auto").lower()
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if choice in ("0", "false", "no"):
        return False
    if choice in ("1", "true", "yes") and not possible:
        raise RuntimeError(
            f"CLM_EXT_CUDA={choice} but CUDA cannot be built here: torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}), CUDA_HOME={CUDA_HOME}"
        )
    return possible


def nvidia_wheel_includes() -> list:
    """Headers of the pip-installed CUDA libraries (cuBLAS, cuSPARSE, ...) that torch's headers include."""
    site = sysconfig.get_paths()["purelib"]
    return sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))


def extension():
    debug = os.environ.get("CLM_EXT_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = [os.path.join("csrc", "alignment_mix.cpp"), os.path.join("csrc", "dial_mix.cpp"), *sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))]
    cxx = opt + ["-fopenmp", "-std=c++20", "-Wno-psabi"]
    if not build_cuda():
        return CppExtension("clm_ext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    return CUDAExtension(
        "clm_ext._C",
        sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))),
        include_dirs=nvidia_wheel_includes(),
        extra_compile_args={"cxx": cxx, "nvcc": opt + ["-std=c++20"]},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
