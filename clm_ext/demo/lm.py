"""The demo's tiny Llama-architecture language model and its pretraining on the review corpus.

A plain torch loop (no Trainer): little per-step overhead for a model this small, and short enough to read.
Seeded: the same seed gives the same weights. "tiny" (133k parameters) is the demo's default; "small"
(0.86M) is there for a slower, larger run (`clm demo --model-size small`).
"""
import math
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    intermediate: int


SIZES = {
    "tiny": ModelSize(hidden=64, layers=2, heads=4, intermediate=176),
    "small": ModelSize(hidden=128, layers=4, heads=4, intermediate=344),
}


def make_model(tokenizer, size: str, seed: int, max_positions: int = 128) -> LlamaForCausalLM:
    """A freshly initialised Llama whose special tokens match `tokenizer`."""
    if size not in SIZES:
        raise ValueError(f"make_model: size must be one of {sorted(SIZES)}, got {size!r}")
    s = SIZES[size]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _batch(ids: list, pad_id: int) -> dict:
    """Right-padded rows of token ids; padding is masked out of the loss."""
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad_id)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def pretrain(model, tokenizer, texts: list, steps: int, batch_size: int, lr: float, seed: int, progress=None) -> list:
    """Next-token training on `texts` with AdamW and a warmup + cosine schedule; returns the loss per step."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"pretrain: steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    eos = [tokenizer.eos_token_id]
    rows = [ids + eos for ids in tokenizer(texts)["input_ids"]]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    model.train()
    losses = []
    for _ in range(steps):
        pick = torch.randint(len(rows), (batch_size,), generator=gen).tolist()
        loss = model(**_batch([rows[i] for i in pick], tokenizer.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress is not None:
            progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            progress.update(1)
    model.eval()
    return losses
