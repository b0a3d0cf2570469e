"""`./run gpu-check --dry-run`: the rehearsal of the one GPU run, end to end on this CPU, and its parts.

Why: the GPU machine is lent for minutes, so the real call must not fail on a typo. The dry run goes through
every stage (wheel install, the extension build in a scratch copy, the tests, the benchmarks, the summary and
the files that come back) with tiny sizes; these tests check what it leaves behind.
"""
import base64
import hashlib
import importlib.util
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(gpu_check)


def make_wheel(folder: Path, name: str, version: str, tag: str = "py3-none-any", requires=()) -> Path:
    """A minimal valid wheel of one empty module, so pip can install it without a network."""
    path = folder / f"{name}-{version}-{tag}.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": "",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
            name, version, "".join(f"Requires-Dist: {r}\n" for r in requires)),
        f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n",
    }
    record = []
    with zipfile.ZipFile(path, "w") as z:
        for arc, text in files.items():
            z.writestr(arc, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{arc},sha256={digest},{len(text.encode())}")
        z.writestr(f"{info}/RECORD", "\n".join(record + [f"{info}/RECORD,,"]) + "\n")
    return path


_spec8 = importlib.util.spec_from_file_location("bench_dpo_8b", REPO / "benchmarks" / "bench_dpo_8b.py")
bench_dpo_8b = importlib.util.module_from_spec(_spec8)
_spec8.loader.exec_module(bench_dpo_8b)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run for the module: a carried wheel to install, one for another python, a fresh OUT."""
    wheels = tmp_path_factory.mktemp("wheels")
    make_wheel(wheels, "clm_gpu_check_probe", "1.0", requires=["pytest>=1"])
    make_wheel(wheels, "clm_gpu_check_other", "1.0", tag="cp399-cp399-manylinux_2_17_x86_64")
    out = tmp_path_factory.mktemp("out")
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), str(out), "--dry-run", "--wheels", str(wheels),
           "--time-limit", "1500"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1700, cwd=REPO)
    return proc, out


def _has_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


@pytest.mark.slow
def test_dry_run_passes_every_stage(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    # vllm-gpu skips, with the reason, where vLLM is not installed (as on the H200 machine).
    expected = [(s.name, "skipped" if s.name == "vllm-gpu" and not _has_vllm() else "ok") for s in gpu_check.STAGES]
    assert [(r["stage"], r["status"]) for r in summary["stages"]] == expected
    if not _has_vllm():
        assert summary["stages"][[s.name for s in gpu_check.STAGES].index("vllm-gpu")]["detail"] == \
            gpu_check.VLLM_CANNOT_CARRY
    # The summary is the last thing printed: the device tool's reply holds the end of the output.
    assert proc.stdout.rstrip().splitlines()[-1].startswith("[gpu-check]")
    assert "| bench-dpo | ok |" in proc.stdout and "| dpo-8b | ok |" in proc.stdout


@pytest.mark.slow
def test_dry_run_installs_only_the_carried_wheels_this_python_takes(dry_run):
    _, out = dry_run
    wheels = json.loads((out / "summary.json").read_text())["env"]["wheels"]
    assert wheels["install"] == ["clm_gpu_check_probe-1.0-py3-none-any.whl"]
    assert wheels["incompatible"] == ["clm_gpu_check_other-1.0-cp399-cp399-manylinux_2_17_x86_64.whl"]
    assert wheels["failed"] == [] and wheels["unmet"] == []


@pytest.mark.slow
def test_dry_run_brings_back_at_most_eight_files_with_results_logs_and_tests(dry_run):
    _, out = dry_run
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "gpu_check.tar.gz", "summary.json", "summary.md"]
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = set(tar.getnames())
        for script in ("bench_op", "bench_generate", "bench_dpo"):
            assert {f"results/{script}_cpu.json", f"results/{script}_cpu.csv"} <= names
            rows = json.load(tar.extractfile(f"results/{script}_cpu.json"))
            assert rows and all(r["device"] == "cpu" for r in rows)
        for suite in ("op-tests", "model-tests"):
            junit = tar.extractfile(f"logs/{suite}.xml").read().decode()
            assert 'failures="0"' in junit and 'errors="0"' in junit and 'tests="0"' not in junit
        assert {"logs/build.log", "logs/gpu_check.log", "summary.md"} <= names
        # The new stages' results, in their own folders (their names do not clash with bench-generate's).
        for path in ("results/dpo-8b/bench_dpo_8b_cpu.json", "results/generate-long/bench_generate_cpu.json"):
            rows = json.load(tar.extractfile(path))
            assert rows and all(r["device"] == "cpu" for r in rows)
    md = (out / "summary.md").read_text()
    assert "| design target | bound | measured | met | at |" in md
    assert "fused op fwd+bwd: eager / clm | >= 1.3 |" in md
    for provider in bench_dpo_8b.PROVIDERS:  # every provider of the 8B stage ran, at the tiny shape
        assert f"| {provider} | " in md
    assert "## Generation, longer run" in md and "| clm_mixed | " in md
    assert "serve, linear layer on cpu: ok: 14/14 completions equal" in md


@pytest.mark.slow
def test_a_rerun_of_some_stages_reuses_the_build_and_names_its_device(dry_run, tmp_path):
    """`--only` on a warm machine: the stages named, on the first run's scratch, with the device in the summary."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), str(tmp_path / "out"), "--dry-run", "--only",
           "summary", "--time-limit", "200"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(r["stage"], r["status"]) for r in summary["stages"]] == [("summary", "ok")]
    assert summary["torch"] == __import__("torch").__version__ and summary["device_name"]


def test_a_failing_stage_is_reported_and_the_others_still_run(tmp_path):
    def boom(c):
        raise gpu_check.Failed("exit 1: boom")

    def missing(c):
        raise gpu_check.Skipped("trl not importable")

    c = gpu_check.Check(out=tmp_path, scratch=tmp_path, wheels=tmp_path, dry=True)
    c.end = gpu_check.time.monotonic() + 60
    stages = [gpu_check.Stage("a", 5, 5, boom), gpu_check.Stage("b", 5, 5, lambda c: "fine"),
              gpu_check.Stage("c", 5, 5, lambda c: "never", ("a",)), gpu_check.Stage("d", 5, 5, missing),
              gpu_check.Stage("e", 5, 5, lambda c: 1 / 0)]
    records = gpu_check.run_stages(c, stages)
    assert [(r["stage"], r["status"], r["detail"]) for r in records] == [
        ("a", "failed", "exit 1: boom"), ("b", "ok", "fine"), ("c", "skipped", "needs a"),
        ("d", "skipped", "trl not importable"), ("e", "failed", "ZeroDivisionError: division by zero")]


def test_a_stage_past_its_budget_is_killed_and_reported(tmp_path):
    c = gpu_check.Check(out=tmp_path, scratch=tmp_path, wheels=tmp_path, dry=True)
    (tmp_path / "logs").mkdir()
    c.end = gpu_check.time.monotonic() + 60
    slow = gpu_check.Stage("slow", 2, 2, lambda c: c.call([sys.executable, "-c", "import time; time.sleep(30)"],
                                                           "slow.log", cwd=tmp_path))
    t0 = gpu_check.time.monotonic()
    (record,) = gpu_check.run_stages(c, [slow])
    assert record["status"] == "failed" and record["detail"].startswith("timed out after")
    assert gpu_check.time.monotonic() - t0 < 10


def test_wheel_plan_installs_what_is_missing_or_too_old(tmp_path):
    trl = make_wheel(tmp_path, "trl", "1.16.0", requires=["datasets>=4.7.0", "transformers>=4.56.2"])
    datasets = make_wheel(tmp_path, "datasets", "5.2.0", requires=["fsspec<=2026.9.0", "pyarrow>=24"])
    fsspec = make_wheel(tmp_path, "fsspec", "2026.9.0")
    dill = make_wheel(tmp_path, "dill", "0.4.1")
    installed = {"transformers": "5.17.0", "fsspec": "2026.10.0", "dill": "0.4.1", "pyarrow": "21.0.0"}
    plan = gpu_check.plan_wheels([trl, datasets, fsspec, dill], installed, ["transformers>=4.56,<6"])
    # trl and datasets are missing; fsspec is present but newer than datasets allows; dill is fine as it is.
    assert [w.name for w in plan["install"]] == [datasets.name, fsspec.name, trl.name]
    assert plan["present"] == ["dill"]
    assert plan["unmet"] == ["pyarrow>=24 (have 21.0.0)"]


def test_out_that_holds_files_is_refused_without_force(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    assert gpu_check.main([str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an empty folder: pass --force" in err
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    assert gpu_check.main([str(tmp_path / "new"), "--only", "bench-nope"]) == 2
    assert "unknown stage(s) bench-nope" in capsys.readouterr().err
    assert gpu_check.main([str(tmp_path / "new"), "--dry-run", "--scratch", str(tmp_path)]) == 2
    assert "holds files this script did not write" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------------------------------------
# The stages the scale run adds, piece by piece (fast: no dry run).


def test_two_calls_of_540_s_run_every_stage_each_with_its_set_up():
    table = gpu_check.budget_table()
    assert [n for n, _, _ in table] == [1, 2]
    for n, names, total in table:
        assert total <= gpu_check.CALL_LIMIT_S == 540, f"call {n}: {total} s of budgets"
        assert names[:3] == gpu_check.SETUP  # each call also runs on a fresh machine
    rest = [x for _, names, _ in table for x in names[3:]]
    assert sorted(rest) == sorted(s.name for s in gpu_check.STAGES if s.name not in gpu_check.SETUP)
    assert len(rest) == len(set(rest))
    # The new stages come first, in their order of value.
    assert gpu_check.CALLS[1][3:] == ("dpo-8b", "vllm-gpu", "new-kernels", "generate-long")


def test_a_call_runs_only_its_stages_and_needs_them_to_succeed(tmp_path):
    c = gpu_check.Check(out=tmp_path, scratch=tmp_path, wheels=tmp_path, dry=True)
    c.end = gpu_check.time.monotonic() + 60
    stages = [gpu_check.Stage("build", 5, 5, lambda c: "built"), gpu_check.Stage("x", 5, 5, lambda c: "x", ("build",)),
              gpu_check.Stage("y", 5, 5, lambda c: "y", ("nope",))]
    records = gpu_check.run_stages(c, stages, {"build", "y"}, rerun=False)
    assert [(r["stage"], r["status"], r["detail"]) for r in records] == [("build", "ok", "built"),
                                                                         ("y", "skipped", "needs nope")]


def test_call_and_only_together_are_refused(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path / "o"), "--call", "1", "--only", "env"]) == 2
    assert "--call and --only" in capsys.readouterr().err


def test_the_8b_model_built_on_meta_equals_the_same_weights_built_normally():
    """The meta -> device path: weights initialised, norms at 1, the rotary buffers rebuilt (to_empty leaves
    them as garbage), so the output equals a model built the usual way with the same weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import torch

    model = bench_dpo_8b.materialise("tiny", torch.device("cpu"), torch.float32)
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    weights = [p for p in model.parameters() if p.dim() == 2]
    assert all(abs(p.std().item() - 0.02) < 0.005 for p in weights)
    assert all(torch.equal(p, torch.ones_like(p)) for p in model.parameters() if p.dim() == 1)
    cfg = LlamaConfig(**bench_dpo_8b.SHAPES["tiny"], pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False)
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=0, atol=0)
    # The 8B shape really is Llama-3.1-8B's: 8.03B parameters, counted on the meta device (no memory).
    with torch.device("meta"):
        big = AutoModelForCausalLM.from_config(LlamaConfig(**bench_dpo_8b.SHAPES["llama-3.1-8b"],
                                                           tie_word_embeddings=False), dtype=torch.bfloat16)
    assert round(sum(p.numel() for p in big.parameters()) / 1e9, 2) == 8.03


def test_after_an_oom_the_search_halves_to_the_largest_batch_that_fits():
    tried = []

    def fits_up_to(limit):
        def try_batch(b):
            tried.append(b)
            return dict(pairs=b, oom=b > limit)
        return try_batch

    assert bench_dpo_8b.largest_fitting(fits_up_to(1), 4)["pairs"] == 1 and tried == [2, 1]
    tried.clear()
    assert bench_dpo_8b.largest_fitting(fits_up_to(2), 4)["pairs"] == 2 and tried == [2]
    tried.clear()
    assert bench_dpo_8b.largest_fitting(fits_up_to(0), 4) is None and tried == [2, 1]
    assert bench_dpo_8b.halvings(1) == [] and bench_dpo_8b.halvings(5) == [2, 1]


def _row(case, provider, metric, median, shape="llama-3.1-8b: 8.03B params, 4 pairs, seq=512+512, checkpointing on"):
    return dict(case=case, shape=shape, provider=provider, metric=metric, median=median, p20=median, p80=median, n=3)


def test_the_8b_table_gives_ratios_against_full_and_lora_and_reports_an_oom():
    gib = 2**30
    rows = [_row("dpo_step", "clm", "step_s", 1.0), _row("dpo_step", "clm", "peak_bytes", 30 * gib),
            _row("dpo_step", "full", "oom_at_pairs", 4), _row("dpo_step", "full", "largest_fitting_pairs", 2),
            _row("dpo_step_largest_fitting", "full", "step_s", 2.0,
                 shape="llama-3.1-8b: 8.03B params, 2 pairs, seq=512+512, checkpointing on"),
            _row("dpo_step_largest_fitting", "full", "peak_bytes", 120 * gib,
                 shape="llama-3.1-8b: 8.03B params, 2 pairs, seq=512+512, checkpointing on"),
            _row("dpo_step", "lora", "step_s", 4.0), _row("dpo_step", "lora", "peak_bytes", 40 * gib)]
    lines = gpu_check.dpo_8b_lines(rows)
    assert "| clm | 1.000 | 30.00 | — | — | 0.250x | 0.750x |" in lines  # no full row at 4 pairs: no ratio
    assert "| full | out of memory at 4 pairs | | | | | |" in lines
    assert "| full (2 pairs, the largest that fits) | 2.000 | 120.00 | — | — | 0.500x | 3.000x |" in lines
    detail = gpu_check.dpo_8b_detail(rows)
    assert detail == "clm 1.00 s 30.0 GiB; full OOM at 4 pairs (2.00 s at 2); lora 4.00 s 40.0 GiB"
    rows = [_row("dpo_step", "clm", "step_s", 1.0), _row("dpo_step", "clm", "peak_bytes", 30 * gib),
            _row("dpo_step", "full", "step_s", 1.25), _row("dpo_step", "full", "peak_bytes", 100 * gib)]
    assert "| clm | 1.000 | 30.00 | 0.800x | 0.300x | — | — |" in gpu_check.dpo_8b_lines(rows)


def test_generate_long_states_the_spread_of_the_per_round_ratios():
    rows = [_row("generate", "base", "tokens_per_s", 2000.0), _row("generate", "base", "tokens_per_s_vs_base", 1.0),
            dict(_row("generate", "merged", "tokens_per_s", 2100.0), p20=2050.0, p80=2150.0),
            dict(_row("generate", "merged", "tokens_per_s_vs_base", 1.05), p20=1.01, p80=1.08)]
    lines = gpu_check.generate_long_lines(rows)
    assert "| merged | 2100 [2050, 2150] | 1.050x [1.010, 1.080] | 3 |" in lines
    assert "| base | 2000 [2000, 2000] | 1.000x [1.000, 1.000] | 3 |" in lines


def _check_on(tmp_path, **facts):
    c = gpu_check.Check(out=tmp_path, scratch=tmp_path, wheels=tmp_path, dry=True)
    (tmp_path / "logs").mkdir()
    c.deadline = gpu_check.time.monotonic() + 120
    c.facts.update(facts)
    return c


@pytest.mark.skipif(_has_vllm(), reason="vLLM is installed here: the stage would run it")
def test_vllm_stage_skips_with_the_reason_where_vllm_is_absent(tmp_path):
    with pytest.raises(gpu_check.Skipped, match="228 MiB .* at most 64 MiB"):
        gpu_check.stage_vllm_gpu(_check_on(tmp_path))


def test_new_kernel_tests_are_picked_up_when_present_and_skipped_with_a_line_when_absent(tmp_path):
    c = _check_on(tmp_path)
    parts, failed = [], []
    gpu_check.new_kernel_tests(c, parts, failed)
    assert parts == [f"{t}: absent, skipped" for t in gpu_check.NEW_KERNEL_TESTS] and failed == []
    test = c.src / gpu_check.NEW_KERNEL_TESTS[0]
    test.parent.mkdir(parents=True)
    # Parametrised as such files are: CUDA only where a GPU is seen; the dry run runs the CPU opcheck.
    body = ("import pytest, torch\nDEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])\n"
            "@pytest.mark.parametrize('device', DEVICES)\ndef test_opcheck(device):\n    assert {}\n")
    test.write_text(body.format("True"))
    gpu_check.new_kernel_tests(c, parts, failed)
    assert parts[-1].startswith(f"{gpu_check.NEW_KERNEL_TESTS[0]}: 1 passed") and failed == []
    test.write_text(body.format("False"))
    gpu_check.new_kernel_tests(c, parts, failed)
    assert len(failed) == 1 and "1 failed" in failed[0]


def test_new_kernel_op_rows_give_the_op_against_the_eager_composition(tmp_path):
    case = gpu_check.NEW_KERNEL_CASE + "/K=3/fwdbwd"
    rows = [_row(case, "clm", "time_s", 0.002, shape="N=16384 d=4096"),
            _row(case, "eager", "time_s", 0.005, shape="N=16384 d=4096"),
            _row("alignment_mix/per_seq/fwdbwd", "clm", "time_s", 0.001, shape="N=16384 d=4096")]
    (tmp_path / "bench_op_cuda.json").write_text(json.dumps(rows))
    assert gpu_check.new_kernel_op_lines(tmp_path) == [f"{case} N=16384 d=4096: clm 2.000 ms, eager / clm 2.50x"]


@pytest.mark.slow
def test_serve_equality_passes_on_cpu_and_reports_a_refused_layer_as_skipped(capsys):
    spec = importlib.util.spec_from_file_location("serve_equality", REPO / "benchmarks" / "serve_equality.py")
    serve_equality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_equality)
    assert serve_equality.main(["--device", "cpu", "--threads", "1", "--requests", "7", "--new-tokens", "6"]) == 0
    results = [json.loads(ln[len("RESULT "):]) for ln in capsys.readouterr().out.splitlines()
               if ln.startswith("RESULT ")]
    assert [r["layer"] for r in results] == ["linear", "block"]
    assert results[0]["status"] == "ok" and results[0]["equal"] == 7 and results[0]["distinct_over_alphas"] > 1
    assert results[1]["status"] in ("ok", "skipped")  # skipped until the engine serves the block layer


@pytest.mark.slow
def test_bench_dpo_8b_smoke_measures_clm_and_full_from_a_meta_built_model(tmp_path):
    assert bench_dpo_8b.main(["--smoke", "--device", "cpu", "--threads", "1", "--providers", "clm,full",
                              "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_dpo_8b_cpu.json").read_text())
    steps = {r["provider"]: r for r in rows if r["metric"] == "step_s"}
    assert set(steps) == {"clm", "full"} and all(r["n"] == 3 and r["median"] > 0 for r in steps.values())
    trainable = {r["provider"]: r["median"] for r in rows if r["metric"] == "trainable_params"}
    import torch

    every = sum(p.numel() for p in bench_dpo_8b.materialise("tiny", torch.device("cpu"), torch.float32).parameters())
    assert trainable == {"clm": 64 * 64 + 64, "full": every}  # the d x d layer and its bias; every weight


def test_bench_generate_takes_models_and_new_tokens_and_gives_the_per_round_ratio(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_generate", REPO / "benchmarks" / "bench_generate.py")
    bench_generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_generate)
    with pytest.raises(SystemExit, match="--models: unknown nope"):
        bench_generate.main(["--device", "cpu", "--smoke", "--models", "nope"])
    with pytest.raises(SystemExit, match="--new-tokens: expected a positive"):
        bench_generate.main(["--device", "cpu", "--smoke", "--new-tokens", "0"])
    assert bench_generate.main(["--device", "cpu", "--smoke", "--threads", "1", "--models", "tiny", "--new-tokens",
                                "3", "--repeats", "3", "--providers", "base,merged", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_generate_cpu.json").read_text())
    ratio = {r["provider"]: r for r in rows if r["metric"] == "tokens_per_s_vs_base"}
    assert ratio["base"]["median"] == ratio["base"]["p20"] == ratio["base"]["p80"] == 1.0
    assert ratio["merged"]["n"] == 3 and ratio["merged"]["p20"] <= ratio["merged"]["median"] <= ratio["merged"]["p80"]
    assert all("new=3" in r["shape"] for r in rows)


def test_build_check_takes_the_new_ops_and_checks_those_registered():
    """The build stage's check: the five ops always, the new kernels' ops when this build registers them."""
    proc = subprocess.run([sys.executable, "-c", gpu_check.BUILT, "CPU", str(REPO), *gpu_check.NEW_KERNEL_OPS],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import torch

    import clm_ext  # noqa: F401  (registers the ops)

    registered = sum(hasattr(torch.ops.clm_ext, op) for op in gpu_check.NEW_KERNEL_OPS)
    assert proc.stdout.startswith(f"{5 + registered} ops have CPU kernels")
