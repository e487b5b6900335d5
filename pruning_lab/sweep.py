"""Parameter sweeps: many papermill runs of one notebook on a Dask cluster (issue 12).

A sweep is a small YAML file::

    name: lottery-seeds          # folder runs/sweeps/<name>/
    notebook: "02"               # number, stem or path
    params: smoke                # base parameters: smoke, paper, a YAML path, or omitted (committed defaults)
    grid: {seed: [0, 1, 2]}      # product of the lists ...
    # runs: [{seed: 0}, {seed: 5}]   # ... or an explicit list of combinations
    keys: [ticket_acc]           # result keys copied into the summary (default: all scalar keys)
    aggregate: [ticket_acc]      # keys averaged over seeds (mean, std, n)
    resources: {GPU: 1}          # Dask worker resources each run needs (optional)

Each combination is one ``workbook.run_notebook`` call in a Dask worker process, into
``runs/sweeps/<name>/<id>/`` (executed notebook + ``results/<stem>.json``); a combination whose
results JSON exists is skipped on rerun, a failed one is reported and retried on the next rerun.
Engines: a ``LocalCluster`` (default), ``--scheduler tcp://host:port``, or ``--cluster slurm.yaml``
(``dask_jobqueue.SLURMCluster``/``PBSCluster`` with the YAML's options).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from . import workbook

SWEEPS = workbook.ROOT / "runs" / "sweeps"
SWEEP_DEFS = workbook.NOTEBOOKS / "params" / "sweeps"


@dataclass
class Sweep:
    name: str
    notebook: Path
    params: str | None
    runs: list[dict]
    keys: list[str] | None = None
    aggregate: list[str] = field(default_factory=list)
    resources: dict = field(default_factory=dict)
    folder: Path = SWEEPS

    @property
    def root(self) -> Path:
        return Path(self.folder) / self.name


def run_id(combo: dict) -> str:
    """A readable folder name: ``seed=1,ratio=0.3``."""
    parts = []
    for k in sorted(combo):
        v = combo[k]
        text = json.dumps(v) if not isinstance(v, str) else v
        parts.append(f"{k}={re.sub(r'[^A-Za-z0-9._-]+', '_', text)}")
    return ",".join(parts) or "default"


def load_sweep(spec: str | os.PathLike | dict, folder: str | os.PathLike | None = None) -> Sweep:
    """Read and check a sweep (YAML path, name in notebooks/params/sweeps/, or dict) before any run."""
    import yaml

    if isinstance(spec, dict):
        raw, default_name = spec, "sweep"
    else:
        path = Path(spec)
        if not path.is_file():
            path = SWEEP_DEFS / f"{spec}.yaml"
        if not path.is_file():
            raise SystemExit(f"No sweep file {spec!r}: give a YAML path or a name in {SWEEP_DEFS}.")
        raw, default_name = yaml.safe_load(path.read_text()) or {}, path.stem
    if not isinstance(raw, dict) or "notebook" not in raw:
        raise SystemExit("A sweep needs a mapping with at least 'notebook' and 'grid' (or 'runs').")
    nb = workbook.find_notebook(str(raw["notebook"]))
    base, _ = workbook.load_params(nb, raw.get("params"))
    if "runs" in raw and "grid" in raw:
        raise SystemExit("Give either 'grid' or 'runs' in a sweep, not both.")
    if "runs" in raw:
        runs = [dict(r) for r in raw["runs"] or []]
        if not all(isinstance(r, dict) for r in raw["runs"] or []):
            raise SystemExit("'runs' must be a list of mappings of parameter names to values.")
    else:
        grid = raw.get("grid") or {}
        if not isinstance(grid, dict):
            raise SystemExit("'grid' must map parameter names to lists of values.")
        grid = {k: v if isinstance(v, list) else [v] for k, v in grid.items()}
        empty = [k for k, v in grid.items() if not v]
        if empty:
            raise SystemExit(f"The grid is empty for {', '.join(empty)}: give each parameter at least one value.")
        runs = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())] if grid else []
    if not runs:
        raise SystemExit("The sweep is empty: give a non-empty 'grid' or 'runs'. Nothing was run.")
    for combo in runs:
        workbook.check_parameters(nb, {**base, **combo})
    ids = [run_id(c) for c in runs]
    if len(set(ids)) != len(ids):
        raise SystemExit("Two combinations of the sweep are the same; remove the duplicates.")
    name = str(raw.get("name") or default_name)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise SystemExit(f"Sweep name {name!r} must be letters, digits, '.', '_' or '-'.")
    return Sweep(name=name, notebook=nb, params=raw.get("params"), runs=runs, keys=raw.get("keys"),
                 aggregate=list(raw.get("aggregate") or []), resources=dict(raw.get("resources") or {}),
                 folder=Path(folder) if folder else SWEEPS)


def _manifest(sw: Sweep) -> dict:
    return {"notebook": sw.notebook.stem, "params": sw.params,
            "parameters": sorted({k for c in sw.runs for k in c})}


def _check_folder(sw: Sweep) -> None:
    """Refuse to mix runs of a different sweep into one folder."""
    path = sw.root / "sweep.json"
    mine = _manifest(sw)
    if path.is_file():
        theirs = json.loads(path.read_text())
        diff = [k for k in mine if theirs.get(k) != mine[k]]
        if diff:
            detail = "; ".join(f"{k}: folder has {theirs.get(k)!r}, this sweep {mine[k]!r}" for k in diff)
            raise SystemExit(f"{sw.root} holds runs of a different sweep ({detail}). Use another name "
                             "or remove that folder. Nothing was run.")
    sw.root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=1) + "\n")


def result_path(sw: Sweep, combo: dict) -> Path:
    return sw.root / run_id(combo) / "results" / f"{sw.notebook.stem}.json"


_KERNEL_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")


def run_one(notebook: str, params: str | None, combo: dict, out_dir: str, threads: int = 1) -> dict:
    """One combination, in a worker process: a papermill run into ``out_dir``. Never raises.

    The notebook's kernel inherits this process's environment, so it is set for the run and put back
    afterwards (a caller in the same process, e.g. a test, keeps its own threads)."""
    saved = {var: os.environ.get(var) for var in _KERNEL_ENV}
    for var in _KERNEL_ENV[:3]:
        os.environ[var] = str(threads)
    # Dask's nanny makes glibc give memory back eagerly in its workers (MALLOC_TRIM_THRESHOLD_=65536); the notebook's
    # kernel would inherit it and pay for every tensor allocation (about 10% of a lottery smoke run here)
    os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    try:
        return _run_one(notebook, params, combo, out_dir)
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _run_one(notebook: str, params: str | None, combo: dict, out_dir: str) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    def log(what: str) -> None:  # one line per event: shows how often a combination was started and finished
        with open(out / "attempts.log", "a") as f:
            f.write(f"{what} {os.getpid()} {time.time():.3f}\n")

    log("start")
    t0 = time.perf_counter()
    try:
        # the notebook and results reach out_dir only when every cell has run (workbook.run_notebook stages
        # them): an attempt killed with its worker leaves nothing there but this log and its temporary files
        workbook.run_notebook(notebook, params, combo, out_dir=out, failed_dir=out / "failed")
    except BaseException as e:  # noqa: BLE001 - reported to the client, the sweep goes on
        failed = out / "failed" / Path(notebook).name
        msg = str(e).strip().splitlines()
        log("failed")
        return {"id": out.name, "ok": False, "seconds": time.perf_counter() - t0,
                "error": f"{type(e).__name__}: " + (msg[-1] if msg else ""),
                "notebook": str(failed if failed.is_file() else "")}
    log("done")
    return {"id": out.name, "ok": True, "seconds": time.perf_counter() - t0}


def _reachable(address: str, timeout: float = 3.0) -> None:
    u = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        socket.create_connection((u.hostname, u.port or 8786), timeout=timeout).close()
    except OSError as e:
        raise SystemExit(f"Cannot reach the Dask scheduler at {address} ({e}). Start one with "
                         "`dask scheduler` (and workers with `dask worker <address>`), or drop "
                         "--scheduler to use a local cluster. Nothing was run.") from None


def make_client(engine: str = "local", scheduler: str | None = None, cluster: str | None = None,
                n_workers: int | None = None):
    """A ``dask.distributed.Client`` for the chosen engine (and the cluster object to close, if ours)."""
    from dask.distributed import Client, LocalCluster

    if scheduler:
        _reachable(scheduler)
        return Client(scheduler, timeout="10s"), None
    if cluster:
        import yaml

        opts = yaml.safe_load(Path(cluster).read_text()) or {}
        kind = str(opts.pop("kind", "slurm")).lower()
        jobs = int(opts.pop("jobs", 1))
        try:
            import dask_jobqueue
        except ImportError:
            raise SystemExit("--cluster needs dask-jobqueue: pip install -e '.[cluster]'.") from None
        cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[kind]
        cl = cls(**opts)
        cl.scale(jobs=jobs)
        return Client(cl), cl
    if engine != "local":
        raise SystemExit(f"Unknown engine {engine!r}: use 'local', --scheduler or --cluster.")
    n = n_workers or os.cpu_count() or 1
    import dask

    # Dask's statistical profiler samples the running task's stack every 10 ms, in the process that runs the
    # notebook: of no use for a sweep of papermill runs, and measurable on 2 cores. And Dask's nanny writes its
    # pre-spawn environment (OMP_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_, ...) into *this* process's os.environ,
    # where every kernel started later (a notebook, nbval) would inherit it; run_one sets the threads per run.
    with dask.config.set({"distributed.worker.profile.enabled": False, "distributed.nanny.pre-spawn-environ": {}}):
        cl = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(cl), cl


def run_sweep(sw: Sweep, client, *, progress: bool = True) -> dict:
    """Submit every unfinished combination; wait; write the summary. Returns the summary dict."""
    from dask.distributed import as_completed

    _check_folder(sw)
    todo = [c for c in sw.runs if not result_path(sw, c).is_file()]
    skipped = len(sw.runs) - len(todo)
    futures = {}
    for combo in todo:
        fut = client.submit(run_one, str(sw.notebook), sw.params, combo, str(sw.root / run_id(combo)),
                            key=f"{sw.name}-{run_id(combo)}-{time.time_ns()}", pure=False,
                            resources=sw.resources or None, retries=0)
        futures[fut] = combo
    reports = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sw.runs), initial=skipped, desc=f"sweep {sw.name}", unit="run")
    failed = 0
    for fut in as_completed(futures):
        rep = fut.result()
        reports.append(rep)
        failed += not rep["ok"]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(failed=failed, running=len(futures) - len(reports))
        if not rep["ok"]:
            print(f"FAILED {rep['id']}: {rep['error']} (partial notebook: {rep['notebook'] or 'none'})",
                  flush=True)
    if bar is not None:
        bar.close()
    summary = write_summary(sw)
    summary["skipped"], summary["failed"] = skipped, [r for r in reports if not r["ok"]]
    summary["ran"] = [r["id"] for r in reports if r["ok"]]
    return summary


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


def write_summary(sw: Sweep) -> dict:
    """``summary.json`` + ``summary.csv``: one row per finished run, plus aggregates over seeds."""
    rows = []
    for combo in sw.runs:
        path = result_path(sw, combo)
        if not path.is_file():
            continue
        res = json.loads(path.read_text())
        nums = res.get("numbers", res)
        nums = {k: nums.get(k) for k in sw.keys} if sw.keys else _scalars(nums)
        rows.append({"id": run_id(combo), "params": combo, "results": nums})
    summary = {"name": sw.name, "notebook": sw.notebook.stem, "base_params": sw.params,
               "n_runs": len(sw.runs), "n_complete": len(rows), "rows": rows,
               "aggregate": aggregate(rows, sw.aggregate)}
    (sw.root / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    pcols = sorted({k for r in rows for k in r["params"]})
    rcols = sorted({k for r in rows for k in _scalars(r["results"])})  # lists and tables stay in the JSON
    with open(sw.root / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", *pcols, *rcols])
        for r in rows:
            w.writerow([r["id"], *(r["params"].get(k) for k in pcols), *(r["results"].get(k) for k in rcols)])
    return summary


def aggregate(rows: list[dict], keys: list[str], over: tuple[str, ...] = ("seed", "seeds")) -> list[dict]:
    """Group rows by every parameter but those in ``over`` (the seed: ``seed``, or ``seeds`` for notebooks
    such as 02 that take a list); mean, std (sample, n-1) and n of each key."""
    over = (over,) if isinstance(over, str) else tuple(over)
    groups: dict[str, dict] = {}
    for r in rows:
        rest = {k: v for k, v in r["params"].items() if k not in over}
        g = groups.setdefault(json.dumps(rest, sort_keys=True), {"params": rest, "values": {}})
        for k in keys:
            v = r["results"].get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                g["values"].setdefault(k, []).append(float(v))
    out = []
    for g in groups.values():
        stats = {}
        for k, vals in g["values"].items():
            n = len(vals)
            mean = sum(vals) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
            stats[k] = {"mean": mean, "std": std, "n": n}
        out.append({"params": g["params"], **stats})
    return out


def load_summary(path: str | os.PathLike) -> dict:
    """A finished sweep's summary (folder or summary.json): ``{"rows": [...], "aggregate": [...]}``.

    For a notebook: ``s = load_summary(sweep_summary)``; each row is ``{"id", "params", "results"}``,
    each aggregate ``{"params": {...}, "<key>": {"mean", "std", "n"}}`` (grouped over ``seed``/``seeds``).
    """
    p = Path(path)
    if p.is_dir():
        p = p / "summary.json"
    if not p.is_file():
        raise FileNotFoundError(f"No sweep summary at {p}: run `python -m pruning_lab.workbook sweep ...` first.")
    return json.loads(p.read_text())


def main(argv: list[str] | None = None, args=None) -> int:
    """CLI body of ``python -m pruning_lab.workbook sweep``."""
    sw = load_sweep(args.sweep, args.out)
    client, cluster = make_client(args.engine, args.scheduler, args.cluster, args.workers)
    try:
        print(f"sweep {sw.name}: {len(sw.runs)} runs of {sw.notebook.stem} into {sw.root}; "
              f"dashboard {client.dashboard_link}", flush=True)
        s = run_sweep(sw, client)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    print(f"{s['n_complete']}/{s['n_runs']} complete ({s['skipped']} skipped, {len(s['failed'])} failed); "
          f"summary {sw.root / 'summary.json'}")
    return 1 if s["failed"] else 0
