"""Start-up work off the main thread, so the server's process keeps one OpenMP thread pool.

torch's CPU ops run on libgomp, which keeps a pool of worker threads for every thread that ever ran a
parallel region. Loading a model (and building the alignment layer's tables) runs such regions; done on the
main thread, that pool outlives start-up beside the generation thread's own. libgomp then counts more
threads than cores and stops spinning at barriers ("throttled" waits): every small op of the generation
thread sleeps and wakes, and on 2 cores a third of the CPU sat idle while serving (0.8x the tokens/s of
`transformers serve`). A thread that exits frees its pool, so start-up runs in one.
"""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def in_passing_thread(fn: Callable[[], T]) -> T:
    """fn() run in a new thread that exits when it returns; its result returned, its exception raised here."""
    result: list = []

    def target():
        try:
            result.append((True, fn()))
        except BaseException as e:  # noqa: BLE001 - handed to the caller as raised
            result.append((False, e))

    thread = threading.Thread(target=target, name="clm-serve-start-up")
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value
