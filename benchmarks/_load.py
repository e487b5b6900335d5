"""Benchmarks on a busy laptop: the same measurement with the machine idle and beside CPU-bound competitors.

A student's laptop always runs something else (a browser, JupyterLab itself). ``busy()`` starts
``python -c "while True: pass"`` processes — one per core minus one by default — and stops them on
exit, also on error; ``idle_and_busy()`` interleaves rounds of both states and keeps the best time of
each, so a ratio between two methods always compares runs taken under the same load.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Callable


def competitors_default() -> int:
    return max(1, (os.cpu_count() or 2) - 1)


@contextmanager
def busy(n: int | None = None):
    """``n`` CPU-bound competitor processes for the duration of the block (default: cores − 1, at least 1)."""
    n = competitors_default() if n is None else n
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.3)  # let them reach the scheduler's steady state
        yield n
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def best_time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def idle_and_busy(methods: dict[str, Callable[[], object]], rounds: int = 3, competitors: int | None = None,
                  log=print, after: dict[str, Callable[[], object]] | None = None) -> dict:
    """Best-of-``rounds`` seconds of every method, idle and busy, rounds interleaved (idle, busy, idle, ...).
    ``after[name]`` runs untimed after each call of that method (e.g. to undo what it changed).

    Returns ``{"idle": {name: s}, "busy": {name: s}, "competitors": n, "rounds": rounds}``."""
    out = {"idle": {k: float("inf") for k in methods}, "busy": {k: float("inf") for k in methods}}
    n = competitors_default() if competitors is None else competitors
    for r in range(rounds):
        for state in ("idle", "busy"):
            ctx = busy(n) if state == "busy" else _nothing()
            with ctx:
                for name, fn in methods.items():
                    s = best_time(fn)
                    if after and name in after:
                        after[name]()
                    out[state][name] = min(out[state][name], s)
                    log(f"  round {r + 1} {state:4s} {name:<24s} {s:8.3f} s")
    return {**out, "competitors": n, "rounds": rounds}


@contextmanager
def _nothing():
    yield


def slowdowns(times: dict) -> dict:
    """busy / idle seconds of each method (how much a busy core costs it)."""
    return {k: times["busy"][k] / times["idle"][k] for k in times["idle"]}
