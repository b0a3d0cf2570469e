"""Smoke tests of the benchmark scripts (benchmarks/): each runs on its tiniest settings through `clm bench`,
so that the scripts do not rot. They check that rows are written, never how fast anything is."""
import importlib.util
import json
import subprocess
import sys

import pytest

from clm_ext.cli import bench

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location("clm_benchmarks_common", bench.benchmarks_dir() / "common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def clm_bench(*args):
    cmd = [sys.executable, "-c", "import sys; from clm_ext.cli import main; sys.exit(main())", "bench", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    for script in ("op", "generate", "dpo"):
        clm_bench(script, "--device", "cpu", "--smoke", "--threads", "1", "--out", str(out))
    return out


@pytest.mark.parametrize("script,metrics", [
    ("bench_op", {"time_s", "roofline_fraction", "saved_bytes", "flop", "bytes"}),
    ("bench_generate", {"time_s", "tokens_per_s"}),
    ("bench_dpo", {"step_s", "first_step_s", "accounted_bytes", "peak_rss_delta_bytes"}),
])
def test_script_writes_rows(results, script, metrics):
    rows = json.loads((results / f"{script}_cpu.json").read_text())
    assert metrics <= {r["metric"] for r in rows}
    providers = {r["provider"] for r in rows}
    if script == "bench_generate":  # the layer variants: linear/embed, linear/logits, block/logits, block/embed
        assert {"base", "clm_mixed", "clm_logits", "clm_block_logits", "clm_block_embed"} <= providers
    if script == "bench_dpo":
        assert {"clm", "clm-block", "full", "lora"} <= providers
        params = {r["provider"]: r["median"] for r in rows if r["metric"] == "trainable_params"}
        assert 0 < params["clm"] < params["clm-block"] < params["full"]
    assert all(r["p20"] <= r["median"] <= r["p80"] for r in rows)
    header = (results / f"{script}_cpu.csv").read_text().splitlines()[0].split(",")
    assert header == list(common.COLUMNS)


def test_plot_draws_and_tabulates(results):
    out = clm_bench("plot", "--results", str(results), "--table")
    assert sorted(p.name for p in results.glob("*.png")) == [
        "dpo_cpu.png", "generate_cpu.png", "op_decode_cpu.png", "op_fwdbwd_cpu.png", "variants_cpu.png"]
    assert "| target |" in out and "pending: no cuda results" in out
    side = out[out.index("Side-by-side of the variants, tiny"):]
    for variant in ("linear/embed", "linear/logits", "block/logits", "full FT DPO"):
        assert f"| {variant} |" in side


def test_saved_bytes_count_activations_not_parameters():
    import torch

    w = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    assert common.saved_activation_bytes(lambda: (x @ w).sum()) == x.untyped_storage().nbytes()


def test_quantiles():
    assert common.quantiles([3.0, 1.0, 2.0, 4.0, 5.0]) == (3.0, 1.8, 4.2)


def test_missing_checkout_fails_clearly(monkeypatch, tmp_path, capsys):
    from clm_ext.cli import main

    monkeypatch.setattr(bench, "benchmarks_dir", lambda: tmp_path / "nowhere")
    assert main(["bench", "op"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clm bench: error: ") and "source checkout" in err and err.count("\n") == 1


def test_real_model_dpo_cost_writes_rows(tmp_path):
    """bench_dpo_real on a tiny local checkpoint (the real run uses SmolLM2-135M-Instruct): every provider runs,
    CLM's checkpoint is the layer-only one and the smallest, full fine-tuning trains the most parameters."""
    from helpers import tiny_causal_lm, tiny_tokenizer

    tiny_causal_lm("llama").save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    clm_bench("dpo-real", "--model", str(tmp_path / "model"), "--device", "cpu", "--threads", "1", "--rounds", "1",
              "--steps", "1", "--batch", "2", "--max-length", "24", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "bench_dpo_real_cpu.json").read_text())
    value = {(r["provider"], r["metric"]): r["median"] for r in rows}
    providers = ("clm", "clm-precompute", "full", "lora")
    assert {p for p, _ in value} == set(providers)
    assert all((p, m) in value for p in providers for m in ("step_s", "peak_rss_delta_bytes", "construct_s"))
    assert value["clm", "trainable_params"] == 32 * 32 + 32 == value["clm-precompute", "trainable_params"]
    assert value["full", "trainable_params"] == max(value[p, "trainable_params"] for p in providers)
    assert value["clm", "checkpoint_bytes"] < value["lora", "checkpoint_bytes"] < value["full", "checkpoint_bytes"]
