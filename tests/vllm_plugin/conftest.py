"""Fixtures for the vLLM plugin tests (they need .venv-vllm: `./run test-vllm`; skipped elsewhere).

vLLM runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), with a 1 GiB KV cache, so the tests can
reach the engine's hooks and the machine's shared memory is spared.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import checkpoints  # noqa: E402  (needs clm_ext only; each test module skips itself without vLLM)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """arch -> {"base", "alignment", "exported", "model"} (tiny random Llama and tied-embedding Qwen2)."""
    return {arch: checkpoints.make(str(tmp_path_factory.mktemp(arch)), arch) for arch in ("llama", "qwen2")}
