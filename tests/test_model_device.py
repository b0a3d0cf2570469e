"""The dial on every device and dtype: CPU here, CUDA too where a GPU is present (`-k cuda` selects those).

Why a file of its own: these are the model-level checks the GPU run (`./run gpu-check`) must make on CUDA
(alpha 0 = the base model, mixed alphas = each sequence alone, generate with the KV cache, bf16, and values
against a float64 CPU reference of the same weights). Running them on CPU as well keeps the checks
themselves tested on machines without a GPU.
"""
import pytest
import torch
from helpers import tiny_causal_lm, tiny_tokenizer

import clm_ext
from clm_ext.model import alignment_parameters

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# ||got - ref|| / ||ref|| allowed against a float64 reference (METHOD: fp32 far under 1e-3, bf16 ~1e-2).
REL_ERROR = {torch.float32: 1e-4, torch.bfloat16: 4e-2}
PROMPTS = ["the cat runs here", "a dog", "sun shines very good today"]
ALPHAS = [-0.5, 1.0, 2.5]  # outside [0, 1] too


def _model(arch, device, dtype, **wrap):
    """A tiny model on `device` in `dtype` with the dial and a layer far from the identity (seeded, so every
    call with the same arch gives the same weights, up to the dtype's rounding)."""
    model = tiny_causal_lm(arch).to(device=device, dtype=dtype)
    clm_ext.add_alignment_control(model, **wrap)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in alignment_parameters(model):
            p.add_((0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(p.device, p.dtype))
    return model


def _rel_error(got, ref):
    return ((got.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm()).item()


def _padded(device, side="left"):
    batch = tiny_tokenizer(padding_side=side)(PROMPTS, return_tensors="pt", padding=True)
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device), position_ids.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("mode", ["embed", "logits"])
def test_alpha_zero_is_the_base_model(device, dtype, mode):
    """Embed mode: bit for bit (the op returns x itself at alpha 0). Logits mode runs 2B rows, and a GEMM of
    another size may sum in another order on a GPU: equal on CPU, within rounding elsewhere."""
    ids, mask, pos = _padded(device)
    base = tiny_causal_lm("llama").to(device=device, dtype=dtype)
    with torch.no_grad():
        want = base(ids, attention_mask=mask, position_ids=pos).logits
        model = _model("llama", device, dtype, mode=mode)
        got = model(ids, attention_mask=mask, position_ids=pos).logits
        clm_ext.set_alpha(model, 1.0)
        moved = model(ids, attention_mask=mask, position_ids=pos).logits
    if mode == "embed" or device == "cpu":
        assert torch.equal(got, want)
    else:
        assert _rel_error(got, want) < REL_ERROR[dtype]
    assert _rel_error(moved, want) > 0.05  # the layer is far from the identity: alpha 1 is another model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("layer,mode", [("linear", "embed"), ("linear", "logits"), ("block", "logits"),
                                        ("block", "embed")])
def test_mixed_alphas_equal_each_sequence_alone(device, dtype, layer, mode):
    ids, mask, pos = _padded(device)
    model = _model("llama", device, dtype, mode=mode, layer=layer)
    clm_ext.set_alpha(model, torch.tensor(ALPHAS))
    with torch.no_grad():
        mixed = model(ids, attention_mask=mask, position_ids=pos).logits
        # Each row alone at its alpha, then row 0 at alpha 0 instead of its own: that one must differ.
        for row, alpha in list(enumerate(ALPHAS)) + [(0, 0.0)]:
            clm_ext.set_alpha(model, alpha)
            alone = model(ids[row:row + 1], attention_mask=mask[row:row + 1], position_ids=pos[row:row + 1]).logits
            keep = mask[row].bool()
            error = _rel_error(mixed[row][keep], alone[0][keep])
            assert error < REL_ERROR[dtype] if alpha == ALPHAS[row] else error > 0.05


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logits_and_layer_gradients_match_a_float64_cpu_reference(device, dtype, arch):
    """Forward and backward through the whole model at mixed alphas against the same weights in float64 on
    the CPU: the fused kernels of `device` against an independent computation. Right padding: a left pad
    attends to nothing, which float64 eager attention turns into NaN."""
    ids, mask, pos = _padded(device, side="right")
    model = _model(arch, device, dtype)
    # The reference holds exactly the weights `model` holds (the base rounded to dtype, the fp32 layer).
    ref = tiny_causal_lm(arch).to(dtype).to(torch.float64)
    clm_ext.add_alignment_control(ref)
    with torch.no_grad():
        for p, q in zip(alignment_parameters(ref), alignment_parameters(model)):
            p.copy_(q.double().cpu())
    kwargs = dict(attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    if arch != "gpt2":
        kwargs["position_ids"] = pos
    outs = []
    for m, dev in ((model, device), (ref, "cpu")):
        clm_ext.set_alpha(m, torch.tensor(ALPHAS))
        out = m(ids.to(dev), **{k: v.to(dev) for k, v in kwargs.items()})
        out.loss.backward()
        outs.append((out.logits.detach(), [p.grad for p in alignment_parameters(m)]))
    (logits, grads), (ref_logits, ref_grads) = outs
    assert logits.device.type == device and logits.dtype == dtype
    assert _rel_error(logits, ref_logits) < REL_ERROR[dtype]
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float32  # a 16-bit model trains a float32 layer
        assert _rel_error(got, want) < REL_ERROR[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("mode", ["embed", "logits"])
def test_generate_with_the_kv_cache_follows_each_rows_alpha(device, dtype, mode):
    """Greedy generate with the KV cache at mixed alphas: every new token is the argmax of a full forward
    (no cache) of the sequence so far at that row's alpha, up to the dtype's rounding (near ties in bf16)."""
    ids, mask, _ = _padded(device)
    model = _model("llama", device, dtype, mode=mode)
    clm_ext.set_alpha(model, torch.tensor(ALPHAS))
    new = 6
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)
        full_mask = torch.cat([mask, torch.ones_like(out[:, ids.shape[1]:])], dim=1)
        pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(out, attention_mask=full_mask, position_ids=pos).logits.float()
        if dtype == torch.float32 and device == "cpu":  # elsewhere other GEMM shapes may break near ties
            no_cache = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                      do_sample=False, pad_token_id=0, use_cache=False)
            assert torch.equal(out, no_cache)
    steps = logits[:, ids.shape[1] - 1:-1]  # the logits that chose each new token
    chosen = steps.gather(-1, out[:, ids.shape[1]:, None])[..., 0]
    slack = 0.0 if dtype == torch.float32 and device == "cpu" else 0.05 * steps.std().item()
    assert (chosen >= steps.max(-1).values - slack - 1e-6).all()
