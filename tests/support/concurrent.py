"""Run one callable from several threads at once (a barrier releases them together) and collect what they raise."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_together(work: Callable[[int], None], threads: int, timeout: float = 240) -> None:
    """``work(n)`` for n in 0..threads-1, each in its own thread, all started at the same moment; fails the test with
    every exception a thread raised."""
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            start.wait()
            work(n)
        except BaseException as exc:
            errors.append(exc)

    started = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join(timeout=timeout)
    assert not any(thread.is_alive() for thread in started), "a thread did not finish in time"
    assert not errors, errors
