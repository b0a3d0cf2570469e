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


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run for the module: a carried wheel to install, one for another python, a fresh OUT."""
    wheels = tmp_path_factory.mktemp("wheels")
    make_wheel(wheels, "clm_gpu_check_probe", "1.0", requires=["pytest>=1"])
    make_wheel(wheels, "clm_gpu_check_other", "1.0", tag="cp399-cp399-manylinux_2_17_x86_64")
    out = tmp_path_factory.mktemp("out")
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), str(out), "--dry-run", "--wheels", str(wheels),
           "--time-limit", "800"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    return proc, out


def test_dry_run_passes_every_stage(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert [(r["stage"], r["status"]) for r in summary["stages"]] == [(s.name, "ok") for s in gpu_check.STAGES]
    # The summary is the last thing printed: the device tool's reply holds the end of the output.
    assert proc.stdout.rstrip().splitlines()[-1].startswith("[gpu-check]")
    assert "| bench-dpo | ok |" in proc.stdout


def test_dry_run_installs_only_the_carried_wheels_this_python_takes(dry_run):
    _, out = dry_run
    wheels = json.loads((out / "summary.json").read_text())["env"]["wheels"]
    assert wheels["install"] == ["clm_gpu_check_probe-1.0-py3-none-any.whl"]
    assert wheels["incompatible"] == ["clm_gpu_check_other-1.0-cp399-cp399-manylinux_2_17_x86_64.whl"]
    assert wheels["failed"] == [] and wheels["unmet"] == []


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
    md = (out / "summary.md").read_text()
    assert "| design target | bound | measured | met | at |" in md
    assert "fused op fwd+bwd: eager / clm | >= 1.3 |" in md


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
