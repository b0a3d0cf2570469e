"""The competing dials (DeRa, ExPO, LoRA scale) against independent references, and benchmarks/bench_dials.py
end to end at tiny sizes."""
import copy
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from clm_ext.demo.dials import DeRa, extrapolate, weight_delta

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_dials", ROOT / "benchmarks" / "bench_dials.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy():
    """A tiny random Llama and a tokenizer trained on the demo's corpus, and a perturbed copy ("aligned")."""
    from clm_ext.demo import corpus, lm
    from clm_ext.demo.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([r.text for r in corpus.make_corpus(300, 0)], 300)
    base = lm.make_model(tokenizer, "tiny", 0).eval()
    aligned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in aligned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return tokenizer, base, aligned


def _reference_mix(aligned, base, ids, mask, strength, steps, eos, pad):
    """Greedy decoding of base + strength (aligned - base), recomputing both models over the whole sequence at
    every step (no cache): what DeRa's cached mix must reproduce. A row that emitted EOS continues with pad."""
    finished = torch.zeros(ids.shape[0], 1, dtype=torch.bool)
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            a = aligned(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
            b = base(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        nxt = (b + strength * (a - b)).argmax(-1, keepdim=True).masked_fill(finished, pad)
        finished |= nxt == eos
        ids = torch.cat([ids, nxt], -1)
        mask = torch.cat([mask, torch.ones_like(nxt)], -1)
        if finished.all():
            break
    return ids


@pytest.mark.parametrize("strength", [-0.5, 0.5, 2.0])
def test_dera_mixes_logits_per_token_like_an_uncached_reference(toy, strength):
    tokenizer, base, aligned = toy
    prompts = ["the food was", "a long and quiet walk to the old", "it"]  # different lengths: left padding
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    steps = 8
    got = DeRa(aligned, base, strength).generate(**batch, do_sample=False, max_new_tokens=steps,
                                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    want = _reference_mix(aligned, base, batch["input_ids"], batch["attention_mask"], strength, steps,
                          tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert torch.equal(got, want)


def test_expo_sets_base_plus_strength_times_delta(toy):
    _, base, aligned = toy
    model = copy.deepcopy(aligned)
    extrapolate(model, base.state_dict(), weight_delta(aligned, base), 1.5)
    for (name, p), b, a in zip(model.named_parameters(), base.parameters(), aligned.parameters()):
        torch.testing.assert_close(p, b + 1.5 * (a - b), msg=name)


def test_best_within_interpolates_where_the_curve_crosses_the_limit():
    best_within = _bench().best_within
    rows = [{"perplexity": p, "heldout_reward": r} for p, r in [(10, 0.2), (12, 0.3), (20, 0.5), (40, 0.9)]]
    assert best_within(rows, 15) == pytest.approx(0.3 + 3 / 8 * 0.2)
    assert best_within(rows, 9) is None
    back = rows + [{"perplexity": 11, "heldout_reward": 0.95}]  # the curve comes back under the limit
    assert best_within(back, 15) == pytest.approx(0.95)


def test_bench_dials_end_to_end_at_tiny_sizes(tmp_path, toy):
    tokenizer, base, _ = toy
    from clm_ext.demo.requests import make_requests

    model_dir = tmp_path / "base"
    base.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r, "chosen": " a lovely great day", "rejected": " awful bad"}) + "\n"
                             for r in make_requests(8, "train", 0)))
    out, cache = tmp_path / "out", tmp_path / "cache"
    bench = _bench()
    argv = ["--model", str(model_dir), "--pairs", str(pairs), "--cache", str(cache), "--out", str(out), "--quick",
            "--values", "0,1,2", "--methods", "dera,expo,lora-scale,block/logits", "--threads", "1"]
    assert bench.main(argv) == 0
    results = json.loads((out / "dials.json").read_text())
    assert set(results["methods"]) == {"dera", "expo", "lora-scale", "block/logits"}
    for method, row in results["table"].items():
        assert row["identical_to_base_at_0"] == 1.0, method  # every dial at 0 is the base model
        assert [r["value"] for r in results["methods"][method]["rows"]] == [0.0, 1.0, 2.0]
    assert results["table"]["dera"]["extra_params"] == sum(p.numel() for p in base.parameters())
    sweeps = {m: json.loads((cache / "sweeps" / f"{m}.json").read_text()) for m in ("dera", "expo")}
    # DeRa at 1 samples the full DPO model, as ExPO at 1 is it: same samples (common random numbers)
    assert sweeps["dera"]["rows"][1]["completions"] == sweeps["expo"]["rows"][1]["completions"]
    assert (cache / "full-dpo").is_dir() and (cache / "lora-dpo" / "adapter_config.json").is_file()
    lines = (out / "dials.csv").read_text().splitlines()
    assert len(lines) == 1 + 4 * 3
    for name in ("frontier.png", "reward_vs_dial.png", "table.md"):
        assert os.path.getsize(out / name) > 0
    # a second run reads the cached sweeps and refuses a non-empty --out without --force
    with pytest.raises(SystemExit, match="--out"):
        bench.main(argv)
    assert bench.main(argv + ["--force"]) == 0
    with pytest.raises(SystemExit, match="--cache: .* other dial values"):
        bench.main(argv[:argv.index("--values")] + ["--values", "0,1"] + argv[argv.index("--values") + 2:] + ["--force"])


def test_compare_modes_flags_alphas_where_embed_leaves_the_standard_error():
    spec = importlib.util.spec_from_file_location("compare_modes", ROOT / "benchmarks" / "compare_modes.py")
    modes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(modes)

    def sweep(rewards):
        return [{"alpha": a, "reward": r, "reward_stderr": 0.05, "heldout_reward": r / 2, "heldout_reward_stderr": 0.02,
                 "perplexity": 10.0, "unknown_words": 0.02, "distinct_2": 0.8} for a, r in zip([-1, 0, 1, 2, 3], rewards)]

    results = {"variants": {"block/logits": {"sweep": sweep([0.1, 0.3, 0.6, 0.7, 0.8])},
                            "block/embed": {"sweep": sweep([0.12, 0.3, 0.63, 0.72, 0.2])}}}
    c = modes.compare(results, "block", -1, 2)
    assert c["embed_within_stderr_of_logits"]  # alpha 1: 0.03 <= 0.05, 0.015 <= 0.02; 3 is out of range
    results["variants"]["block/embed"]["sweep"][2]["heldout_reward"] = 0.35  # 0.05 above logits' 0.30
    c = modes.compare(results, "block", -1, 2)
    assert not c["embed_within_stderr_of_logits"]
    assert c["outside"] == [{"alpha": 1, "judge": "TextBlob", "embed_minus_logits": pytest.approx(0.05)}]
    with pytest.raises(ValueError, match="linear/logits"):
        modes.compare(results, "linear", -1, 2)
