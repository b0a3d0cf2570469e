"""clm-ext: an alignment dial for Hugging Face causal language models."""
from . import ops
from .generation import chat_prompt, generate
from .model import (
    add_alignment_control,
    alignment_strength,
    load_alignment,
    merge_alignment,
    save_alignment,
    set_alpha,
)
from .version import __version__

__all__ = [
    "ops",
    "add_alignment_control",
    "set_alpha",
    "alignment_strength",
    "save_alignment",
    "load_alignment",
    "merge_alignment",
    "generate",
    "chat_prompt",
]
