"""Fixtures shared by the tests (the helpers behind them live in tests/helpers.py), and the rule that a test
of a slow kind (distributed, serve, real_model, build) is also `slow`, so `pytest -m "not slow"` skips it."""
from __future__ import annotations

import pytest

from helpers import ARCHS, tiny_causal_lm, tiny_tokenizer

SLOW_KINDS = ("distributed", "serve", "real_model", "build")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(kind) for kind in SLOW_KINDS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(name="tiny_causal_lm")
def tiny_causal_lm_fixture():
    """The factory `tiny_causal_lm(arch, **overrides)`."""
    return tiny_causal_lm


@pytest.fixture(name="tiny_tokenizer")
def tiny_tokenizer_fixture():
    """The factory `tiny_tokenizer(padding_side="left")`."""
    return tiny_tokenizer


@pytest.fixture(params=ARCHS)
def arch(request):
    """Parametrises a test over all five architectures."""
    return request.param
