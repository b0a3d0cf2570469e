"""The clm-ext plugin for vLLM: the alignment dial per request, without a fork of vLLM.

vLLM loads it through the `vllm.general_plugins` entry point (in every process it starts); nothing in
clm_ext imports it. `register()` registers `Clm<Arch>ForCausalLM` for the architectures of
`clm_ext.vllm_format.ARCHITECTURES` and installs the hooks that carry each request's alpha
(`hooks.py`). Serve a directory written by `clm export-vllm`; a request sends
`vllm_xargs: {"alpha": a}` (or a top-level `"alpha"` through `clm_ext.vllm.middleware.AlphaMiddleware`).
"""
from __future__ import annotations


def register() -> None:
    """vLLM's entry point: make the plugin's model classes known and hook the alpha in."""
    from vllm import ModelRegistry

    from ..vllm_format import ARCHITECTURES
    from . import hooks

    supported = ModelRegistry.get_supported_archs()
    for name in ARCHITECTURES.values():
        if name not in supported:
            ModelRegistry.register_model(name, f"clm_ext.vllm.models:{name}")
    hooks.install()
