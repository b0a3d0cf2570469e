"""Shared test helpers: tiny random causal LMs built from configs and a tiny local tokenizer.

Nothing is downloaded: every model comes from a config with random (seeded) weights, the tokenizer from a
WordLevel vocabulary over a few made-up words. Import them (`from helpers import tiny_causal_lm,
tiny_tokenizer`) or use the fixtures of the same names (tests/conftest.py).
"""
from __future__ import annotations

import torch

ARCHS = ("llama", "qwen2", "mistral", "gpt2", "gemma")

WORDS = (
    "the a cat dog bird sun moon tree river stone happy sad good bad great awful love hate "
    "is was runs sleeps sings shines flows falls and but very not today tomorrow here there"
).split()
SPECIAL = {"pad": "<pad>", "eos": "</s>", "bos": "<s>", "unk": "<unk>"}
VOCAB = 128  # models use this vocabulary size; the tokenizer's ids all lie below it

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               pad_token_id=0, eos_token_id=1, bos_token_id=2)


def _config(arch: str, **overrides):
    import transformers as tf

    if arch == "llama":
        cfg = tf.LlamaConfig(**_COMMON)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**_COMMON, tie_word_embeddings=True)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**_COMMON, sliding_window=None)
    elif arch == "gemma":
        cfg = tf.GemmaConfig(**_COMMON, head_dim=8, tie_word_embeddings=True)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                            pad_token_id=0, eos_token_id=1, bos_token_id=2,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        raise ValueError(f"tiny_causal_lm: arch must be one of {ARCHS}, got {arch!r}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_causal_lm(arch: str = "llama", seed: int = 0, **overrides):
    """A tiny random AutoModelForCausalLM of `arch` (hidden 32, 2 layers, vocab 128), fp32, eval mode.

    `overrides` are set on the config (e.g. tie_word_embeddings=False, hidden_size=64).
    """
    from transformers import AutoModelForCausalLM

    cfg = _config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.eval()


def tiny_tokenizer(padding_side: str = "left"):
    """A PreTrainedTokenizerFast over WORDS plus fillers up to VOCAB (WordLevel, whitespace split), with
    <pad>=0, </s>=1, <s>=2 (prepended), <unk>=3."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([SPECIAL["pad"], SPECIAL["eos"], SPECIAL["bos"], SPECIAL["unk"]])}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    while len(vocab) < VOCAB:  # made-up filler words, so every id a model can emit decodes to text
        vocab[f"w{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL['bos']} $A", special_tokens=[(SPECIAL["bos"], vocab[SPECIAL["bos"]])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL["pad"], eos_token=SPECIAL["eos"], bos_token=SPECIAL["bos"], unk_token=SPECIAL["unk"],
        padding_side=padding_side,
    )
    return fast
