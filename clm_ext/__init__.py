"""clm-ext: an alignment dial for Hugging Face causal language models."""
from . import ops

__version__ = "0.1.0"
