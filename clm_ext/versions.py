"""The narrow version ranges of the two places that read another library's internals, checked where they are
used. The package itself installs with wide ranges (pyproject.toml); only these features need the tested
release, and they say so in one line instead of failing somewhere inside that library."""
from __future__ import annotations

from importlib import metadata

from packaging.specifiers import SpecifierSet

# clm serve: transformers' continuous-batching internals (clm_ext/serve/batch_hooks.py).
SERVE_TRANSFORMERS = ">=5.24,<5.25"
# CLMDPOTrainer: how TRL's DPOTrainer builds, prepares and calls its reference model (clm_ext/train.py).
TRAINER_TRL = ">=1.16,<1.17"


class UnsupportedVersion(ValueError):
    """An installed library outside the range a feature supports (a ValueError: the CLI prints it in one line)."""


def require(package: str, spec: str, feature: str) -> None:
    """Raise UnsupportedVersion unless the installed `package` lies in `spec`."""
    installed = metadata.version(package)
    if not SpecifierSet(spec).contains(installed, prereleases=True):
        raise UnsupportedVersion(
            f"{feature} supports {package}{spec} only (it reads {package}'s internals), found {package} {installed}: "
            f"pip install '{package}{spec}'"
        )
