"""Builds clm_ext._C against the installed torch: C++ kernels always, CUDA kernels where possible.

Environment:
  CLM_EXT_CUDA=auto|1|0   build the CUDA kernels when a CUDA toolkit and a CUDA torch are present
                          (auto, the default), always (1: fail if that is impossible), or never (0).
  TORCH_CUDA_ARCH_LIST    GPU architectures, default "8.0;9.0" (sm_80 and sm_90).
  CLM_EXT_DEBUG=1         -O0 -g builds.
"""
import glob
import os
import sysconfig

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


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
    sources = [os.path.join("csrc", "alignment_mix.cpp"), *sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))]
    cxx = opt + ["-fopenmp", "-std=c++20", "-Wno-psabi"]
    if not build_cuda():
        return CppExtension("clm_ext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return CUDAExtension(
        "clm_ext._C",
        sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))),
        include_dirs=nvidia_wheel_includes(),
        extra_compile_args={"cxx": cxx, "nvcc": opt + ["-std=c++20"]},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="clm-ext",
    version="0.1.0",
    description="An alignment dial for Hugging Face causal language models (CLM), with fused C++/CUDA ops",
    packages=find_packages(include=["clm_ext", "clm_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "transformers>=4.56",
        "trl>=1.16,<1.17",
        "safetensors",
        "accelerate",
        "datasets",
        "tqdm",
    ],
    extras_require={
        "demo": ["vaderSentiment", "matplotlib"],
        "test": ["pytest", "peft", "vaderSentiment", "matplotlib"],
    },
    entry_points={
        "console_scripts": ["clm=clm_ext.cli:main"],
        # Loaded by vLLM in each of its processes where clm-ext is installed beside it (clm_ext/vllm).
        "vllm.general_plugins": ["clm_ext = clm_ext.vllm:register"],
    },
)
