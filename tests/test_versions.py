"""The narrow ranges are checked where internals are read, with one line naming the supported versions."""
import pytest

from clm_ext import versions
from clm_ext.versions import UnsupportedVersion, require


def test_installed_versions_pass_and_others_are_named(monkeypatch):
    require("transformers", versions.SERVE_TRANSFORMERS, "clm serve")  # the suite runs on the tested releases
    require("trl", versions.TRAINER_TRL, "CLMDPOTrainer")
    monkeypatch.setattr(versions.metadata, "version", lambda package: "5.23.1")
    with pytest.raises(UnsupportedVersion, match=r"^clm serve supports transformers>=5.24,<5.25 only .* found "
                                                 r"transformers 5.23.1: pip install 'transformers>=5.24,<5.25'$"):
        require("transformers", versions.SERVE_TRANSFORMERS, "clm serve")


def test_trainer_and_engine_check_at_construction(monkeypatch):
    from clm_ext.serve.engine import Engine
    from clm_ext.train import CLMDPOTrainer

    monkeypatch.setattr(versions.metadata, "version", lambda package: "1.17.0" if package == "trl" else "5.25.0")
    with pytest.raises(UnsupportedVersion, match="CLMDPOTrainer supports trl>=1.16,<1.17 only"):
        CLMDPOTrainer(model=None)
    with pytest.raises(UnsupportedVersion, match="clm serve supports transformers>=5.24,<5.25 only"):
        Engine(model=None, tokenizer=None)
