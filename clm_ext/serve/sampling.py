"""Sampling for every sampled request of a batch in one step on the logits' device.

Each request keeps its own temperature, top_p and generator (its seed): the generator draws one uniform
number per request and step, and the token is where that number falls in the request's (top-p truncated)
cumulative distribution (in vocabulary order). So a seeded request gives the same tokens whatever else shares
its batches, and
the tensor work (softmax, sort, cumulative sums, search) is one batched call, not a loop over requests.
"""
from __future__ import annotations

import torch
from torch import Tensor


def sample_rows(logits: Tensor, temperature: Tensor, top_p: Tensor, uniform: Tensor) -> tuple:
    """Sample one token per row of `logits` [k, V]; returns (tokens [k], ok [k]).

    temperature, top_p: [k] on the CPU, each row's own (temperature above clm_ext.generation.GREEDY_BELOW;
    top_p in (0, 1]); uniform: [k] in [0, 1), each row's draw. `ok` is False for a row whose distribution is
    not one (non-finite or all -inf logits): its token is meaningless and its request must fail. Three passes
    over the vocabulary per row (max, exp, cumulative sum) and no normalisation: the draw is scaled by the
    row's total instead (float32 throughout, as torch.multinomial on a float32 input).
    """
    weights = logits.float() / temperature.to(logits.device, torch.float32).unsqueeze(1)
    weights = weights.sub_(weights.amax(-1, keepdim=True)).exp_()  # softmax numerators; at most 1
    cut = (top_p < 1.0).nonzero().squeeze(1)  # top_p is on the CPU: no device sync
    if cut.numel():
        # Keep the smallest set of most likely tokens reaching top_p, but in vocabulary order: a row's token
        # then depends on its own draw only, never on whether another row of the batch needed sorting.
        rows = weights[cut.to(weights.device)]
        ranked = rows.sort(dim=-1, descending=True).values
        share = top_p[cut].to(weights.device, torch.float32).unsqueeze(1) * ranked.sum(-1, keepdim=True)
        keep = ranked.cumsum(-1) - ranked < share
        keep[:, 0] = True
        smallest = ranked.gather(1, keep.sum(-1, keepdim=True) - 1)
        weights[cut.to(weights.device)] = torch.where(rows >= smallest, rows, torch.zeros_like(rows))
    cdf = weights.cumsum_(-1)
    total = cdf[:, -1]
    ok = torch.isfinite(total) & (total > 0)
    # The draw stays 8 float32 steps below the total, so it never lands past the last token with weight.
    target = (uniform.to(cdf.device, torch.float32) * (1 - 2**-20) * total).unsqueeze(1)
    index = torch.searchsorted(cdf, target, right=True).clamp_(max=logits.shape[1] - 1)
    return index.squeeze(1), ok


def draw_uniform(generators: list) -> Tensor:
    """One uniform number in [0, 1) from each generator (float32, on the CPU)."""
    return torch.cat([torch.rand(1, generator=g) for g in generators])
