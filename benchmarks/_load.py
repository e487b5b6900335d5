"""Benchmarks on a busy laptop: the same measurement with the machine idle and beside CPU-bound competitors.

A student's laptop always runs something else (a browser, JupyterLab itself). ``busy()`` starts
``python -c "while True: pass"`` processes — one per core minus one by default — and stops them on
exit, also on error; ``idle_and_busy()`` interleaves rounds of both states and keeps the best time of
each, so a ratio between two methods always compares runs taken under the same load. ``busy_check()`` puts
each hot path's busy/idle slowdown beside its baseline's and flags a path that degrades more than 2x as much.
A method may time only part of what it runs (say the decode steps after an untimed prefill) by returning
``Timed(seconds)``.
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
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=_die_with_parent)
             for _ in range(n)]
    try:
        time.sleep(0.3)  # let them reach the scheduler's steady state
        yield n
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


class Timed(float):
    """Seconds a method measured itself (returned by it instead of being timed from outside)."""


def _die_with_parent() -> None:
    """Linux: the competitor gets SIGKILL when the benchmark dies, even by a signal that skips ``finally``
    (a killed benchmark must not leave a process spinning on a student's laptop)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def best_time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    out = fn()
    return float(out) if isinstance(out, Timed) else time.perf_counter() - t0


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


def busy_check(methods: dict[str, Callable[[], object]], baselines: dict[str, str], rounds: int = 2,
               competitors: int | None = None, log=print, after: dict[str, Callable[[], object]] | None = None) -> dict:
    """``idle_and_busy`` over ``methods``, then each path's slowdown (busy / idle) over its baseline's slowdown
    (``baselines``: path -> baseline method). A path whose ratio exceeds 2 degrades more than 2x its baseline:
    it is listed under ``degrades_more_than_2x_baseline`` (to be fixed or explained)."""
    times = idle_and_busy(methods, rounds=rounds, competitors=competitors, log=log, after=after)
    slow = slowdowns(times)
    rel = {f"{path} vs {base}": slow[path] / slow[base] for path, base in baselines.items()}
    return {"competitors": times["competitors"], "rounds": rounds, "statistic": "best",
            "seconds_idle": times["idle"], "seconds_busy": times["busy"], "busy_over_idle": slow,
            "baseline_of": dict(baselines), "slowdown_over_baseline": rel,
            "degrades_more_than_2x_baseline": sorted(k for k, r in rel.items() if r > 2)}


def print_busy_check(check: dict, log=print) -> None:
    log(f"  busy check ({check['competitors']} CPU-bound competitor(s), best of {check['rounds']} interleaved rounds):")
    for name, s in check["busy_over_idle"].items():
        log(f"    {name:<28s} idle {check['seconds_idle'][name]:8.3f} s, busy {check['seconds_busy'][name]:8.3f} s: "
            f"busy/idle {s:.2f}x")
    for key, r in check["slowdown_over_baseline"].items():
        path, base = key.split(" vs ", 1)
        log(f"    {path} slows {r:.2f}x as much as its baseline {base}"
            f"{'  <- more than 2x: fix or explain' if r > 2 else ''}")


def merge_busy_check(name: str, check: dict, extra: dict | None = None) -> str:
    """``--busy-only``: put ``check`` (and ``extra`` figures) into the committed ``results/benchmarks/<name>.json``
    beside its other figures, which keep their own date; the check records its own date and thread count."""
    import datetime
    import json
    from pathlib import Path

    import torch

    from pruning_lab._io import write_json

    path = Path(__file__).resolve().parents[1] / "results" / "benchmarks" / f"{name}.json"
    payload = json.loads(path.read_text())
    check = dict(check, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 torch_threads=torch.get_num_threads(), measured_separately="--busy-only run; the other figures are "
                 f"from the run of {payload['date']}")
    payload["figures"].update({"busy_check": check, **(extra or {})})
    write_json(path, payload)
    return str(path)
