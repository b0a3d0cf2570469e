"""docs/building.md's build commands in fresh virtual environments that have `wheel` installed (where pip 23 without a
pyproject.toml took setuptools' legacy `develop` path, which re-ran pip *with* build isolation and failed for
want of torch): editable, non-editable, and a wheel that installs and runs in another environment.

Each build compiles the extension (a minute or more on 2 cores), so these run in `./run test` and CI but can be
left out locally with `-m "not build"`.
"""
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

build = pytest.mark.build

ROOT = Path(__file__).resolve().parents[1]
TORCH = torch.__version__.split("+")[0]  # the same torch as this environment (./run pins the CPU build)
# Runs outside the source tree: the layer on x = [[1, 2, 3], [4, 5, 6]] with W = 2I, b = 1, alpha = 0.5 is
# x + 0.5 (2x + 1 - x) = 1.5 x + 0.5.
CHECK = (
    "import clm_ext, torch, sys\n"
    "x = torch.tensor([[1., 2., 3.], [4., 5., 6.]])\n"
    "h = clm_ext.ops.alignment_mix(x, 2 * torch.eye(3), torch.ones(3), 0.5)\n"
    "assert torch.equal(h, 1.5 * x + 0.5), h\n"
    "print(clm_ext.__version__, clm_ext.__file__)\n"
)


def run(*cmd, cwd, timeout=900):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def make_venv(path: Path) -> Path:
    """A fresh environment (no system site-packages) with this torch, `wheel`, setuptools and ninja."""
    venv.create(path, with_pip=True)
    python = path / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", f"torch=={TORCH}", "wheel", "setuptools>=64", "ninja", cwd=path)
    return python


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the checkout's files (tracked and new, not ignored ones: no .venv, no build/, no .so)."""
    dest = tmp_path_factory.mktemp("source")
    files = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes((ROOT / name).read_bytes())
    return dest


@pytest.fixture(scope="module")
def python(tmp_path_factory) -> Path:
    return make_venv(tmp_path_factory.mktemp("venv") / "env")


@build
def test_dependencies_keep_the_installed_torch(source, python, tmp_path):
    """What `pip install --no-build-isolation .` would install: the declared dependencies, never a second torch."""
    report = tmp_path / "report.json"
    run(python, "-m", "pip", "install", "-q", "--dry-run", "--no-build-isolation", "--report", report, ".", cwd=source)
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "clm-ext" in names and {"transformers", "trl"} <= names
    assert not {n for n in names if n == "torch" or n.startswith("nvidia")}, names


@build
def test_wheel_installs_and_runs_in_another_environment(source, python, tmp_path):
    run(python, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", ".", "-w", tmp_path / "dist",
        cwd=source)
    wheels = list((tmp_path / "dist").glob("clm_ext-*.whl"))
    assert len(wheels) == 1
    other = make_venv(tmp_path / "other")
    run(other, "-m", "pip", "install", "-q", "--no-deps", wheels[0], cwd=tmp_path)
    out = run(other, "-c", CHECK, cwd=tmp_path)
    assert str(tmp_path / "other") in out  # imported from the installed wheel, not from a source tree
    assert "usage: clm" in run(other.parent / "clm", "--help", cwd=tmp_path)


@build
def test_non_editable_install(source, python, tmp_path):
    run(python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", ".", cwd=source)
    try:
        out = run(python, "-c", CHECK, cwd=tmp_path)
        assert str(source) not in out and "site-packages" in out
        assert "usage: clm" in run(python.parent / "clm", "--help", cwd=tmp_path)
    finally:
        run(python, "-m", "pip", "uninstall", "-q", "-y", "clm-ext", cwd=tmp_path)


@build
def test_editable_install(source, python, tmp_path):
    run(python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", ".", cwd=source)
    out = run(python, "-c", CHECK, cwd=tmp_path)
    assert str(source / "clm_ext" / "__init__.py") in out  # the checkout itself, with its extension built in place
    assert "usage: clm" in run(python.parent / "clm", "--help", cwd=tmp_path)


def test_default_cuda_architectures_include_ptx_for_newer_gpus():
    """setup.py's default TORCH_CUDA_ARCH_LIST ends in +PTX, so GPUs newer than sm_90 JIT the kernels."""
    namespace = {}
    for line in (ROOT / "setup.py").read_text().splitlines():
        if line.startswith("DEFAULT_CUDA_ARCHS"):
            exec(line, namespace)
    assert namespace["DEFAULT_CUDA_ARCHS"] == "8.0;9.0+PTX"
