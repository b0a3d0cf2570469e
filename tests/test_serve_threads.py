"""`clm serve` loads its model in a thread that exits (clm_ext.serve.threads): results and errors cross back."""
import threading

import pytest

from clm_ext.cli import UsageError
from clm_ext.serve.threads import in_passing_thread


def test_returns_the_result_from_a_thread_that_has_exited():
    caller = threading.get_ident()
    ran_in = in_passing_thread(threading.get_ident)
    assert ran_in != caller
    assert not any(t.name == "clm-serve-start-up" for t in threading.enumerate())


def test_raises_the_start_up_error_itself():
    def fail():
        raise UsageError("--model nowhere: not found")

    with pytest.raises(UsageError, match="--model nowhere: not found"):
        in_passing_thread(fail)
