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
``runs/sweeps/<name>/<id>/`` (executed notebook + ``results/<stem>.json`` + ``identity.json``). Every value is
read and checked by ``params`` before anything starts. A run's identity is its content: every parameter value
(the notebook's defaults, the base file's values, the grid's) and the SHA-256 of the notebook's code cells. On
rerun a combination is skipped only when its results exist with the same identity; one whose base file, grid
value or notebook code changed is run again, a failed one is reported and retried. ``summary.json`` holds only
runs of the current identities (the others are listed as stale until they are rerun).
Engines: a ``LocalCluster`` (default), ``--scheduler tcp://host:port``, or ``--cluster slurm.yaml``
(``dask_jobqueue.SLURMCluster``/``PBSCluster`` with the YAML's options). Command line:
``python -m pruning_lab sweep FILE.yaml``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from . import params as _params
from . import workbook
from ._io import read_json, read_json_in, write_json, write_text
from .stats import mean_std

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
    base: dict = field(default_factory=dict)      # the base file's values, checked and converted
    defaults: dict = field(default_factory=dict)  # the notebook's own values of every parameter
    code: str = ""                                # SHA-256 of the notebook's code cells

    @property
    def root(self) -> Path:
        return Path(self.folder) / self.name

    def values(self, combo: dict) -> dict:
        """What one run injects: the base file's values, then the combination's."""
        return {**self.base, **combo}

    def identity(self, combo: dict) -> dict:
        """Everything that determines the run's result: all parameter values and the notebook's code."""
        resolved = {**self.defaults, **self.values(combo)}
        text = json.dumps({"notebook": self.notebook.stem, "params": resolved, "code": self.code}, sort_keys=True)
        return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "params": resolved, "code": self.code}


def run_id(combo: dict) -> str:
    """A readable folder name: ``seed=1,ratio=0.3``."""
    parts = []
    for k in sorted(combo):
        v = combo[k]
        text = json.dumps(v) if not isinstance(v, str) else v
        parts.append(f"{k}={re.sub(r'[^A-Za-z0-9._-]+', '_', text)}")
    return ",".join(parts) or "default"


SWEEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _find_sweep_file(spec: str | os.PathLike) -> Path:
    path = Path(spec)
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        raise SystemExit(f"No sweep file {spec}: {path.resolve()} does not exist.")
    named = SWEEP_DEFS / f"{spec}.yaml"
    if not named.is_file():
        names = sorted(p.stem for p in SWEEP_DEFS.glob("*.yaml") if not p.stem.endswith(".example"))
        raise SystemExit(f"No sweep {spec!r}: give a YAML path or one of the sweeps in {SWEEP_DEFS}: "
                         f"{', '.join(names)}.")
    return named


def load_sweep(spec: str | os.PathLike | dict, folder: str | os.PathLike | None = None) -> Sweep:
    """Read and check a sweep (YAML path, name in notebooks/params/sweeps/, or dict) before any run: every value
    of the base file and of the grid against the notebook's declared types and ranges (``params``)."""
    if isinstance(spec, dict):
        raw, default_name, where = spec, "sweep", "the sweep"
    else:
        path = _find_sweep_file(spec)
        raw, default_name, where = _params.load_yaml(path), path.stem, workbook.display_path(path)
    if not isinstance(raw, dict) or "notebook" not in raw:
        raise SystemExit(f"{where}: a sweep needs a mapping with at least 'notebook' and 'grid' (or 'runs').")
    name = str(raw.get("name") or default_name)
    if not SWEEP_NAME.fullmatch(name):
        raise SystemExit(f"{where}: sweep name {name!r} must be a plain name: letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit (it names a folder of runs/sweeps/).")
    nb = workbook.find_notebook(str(raw["notebook"]))
    base_values, _, base_source = workbook.load_params(nb, raw.get("params"))
    parameters = _params.declared(nb)
    base = _params.check(nb, base_values, base_source or where, parameters)
    if "runs" in raw and "grid" in raw:
        raise SystemExit(f"{where}: give either 'grid' or 'runs' in a sweep, not both.")
    if "runs" in raw:
        if not all(isinstance(r, dict) for r in raw["runs"] or []):
            raise SystemExit(f"{where}: 'runs' must be a list of mappings of parameter names to values.")
        runs = [dict(r) for r in raw["runs"] or []]
        label = f"{where} runs"
    else:
        grid = raw.get("grid") or {}
        if not isinstance(grid, dict):
            raise SystemExit(f"{where}: 'grid' must map parameter names to lists of values.")
        grid = {k: v if isinstance(v, list) else [v] for k, v in grid.items()}
        empty = [k for k, v in grid.items() if not v]
        if empty:
            raise SystemExit(f"{where}: the grid is empty for {', '.join(empty)}: give each parameter at least one value.")
        runs = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())] if grid else []
        label = f"{where} grid"
    if not runs:
        raise SystemExit(f"{where}: the sweep is empty: give a non-empty 'grid' or 'runs'. Nothing was run.")
    runs = [_params.check(nb, combo, label, parameters) for combo in runs]
    ids = [run_id(c) for c in runs]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"{where}: two combinations of the sweep are the same; remove the duplicates.")
    defaults = {k: p.default for k, p in parameters.items()}
    return Sweep(name=name, notebook=nb, params=raw.get("params"), runs=runs, keys=raw.get("keys"),
                 aggregate=list(raw.get("aggregate") or []), resources=dict(raw.get("resources") or {}),
                 folder=Path(folder) if folder else SWEEPS, base=base, defaults=defaults,
                 code=workbook.code_sha256(nb))


def _manifest(sw: Sweep) -> dict:
    return {"notebook": sw.notebook.stem, "params": sw.params,
            "parameters": sorted({k for c in sw.runs for k in c})}


def _check_folder(sw: Sweep) -> None:
    """Refuse to mix runs of a different sweep into one folder."""
    path = sw.root / "sweep.json"
    mine = _manifest(sw)
    if path.is_file():
        theirs = read_json(path)
        diff = [k for k in mine if theirs.get(k) != mine[k]]
        if diff:
            detail = "; ".join(f"{k}: folder has {theirs.get(k)!r}, this sweep {mine[k]!r}" for k in diff)
            raise SystemExit(f"{sw.root} holds runs of a different sweep ({detail}). Use another name "
                             "or remove that folder. Nothing was run.")
    write_json(path, mine)


def result_path(sw: Sweep, combo: dict) -> Path:
    return sw.root / run_id(combo) / "results" / f"{sw.notebook.stem}.json"


_KERNEL_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")


def identity_path(sw: Sweep, combo: dict) -> Path:
    return sw.root / run_id(combo) / "identity.json"


def _recorded_identity(sw: Sweep, combo: dict) -> str | None:
    """The identity the combination's finished results were made with, or None (none recorded, or no results)."""
    try:
        return read_json(identity_path(sw, combo))["sha256"] if result_path(sw, combo).is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_current(sw: Sweep, combo: dict) -> bool:
    """The combination's results exist and were made with today's parameters and notebook code."""
    return _recorded_identity(sw, combo) == sw.identity(combo)["sha256"]


_KERNEL_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")


def run_one(notebook: str, values: dict, out_dir: str, identity: dict, threads: int = 1) -> dict:
    """One combination, in a worker process: a papermill run into ``out_dir``. Never raises.

    ``values`` are the run's checked parameter values (base file and combination); ``identity`` is recorded in
    ``identity.json`` once the run has published its results (and removed when it starts, so that results of an
    earlier identity are never taken for this one).

    The notebook's kernel inherits this process's environment, so it is set for the run and put back
    afterwards (a caller in the same process, e.g. a test, keeps its own threads)."""
    saved = {var: os.environ.get(var) for var in _KERNEL_ENV}
    for var in _KERNEL_ENV[:3]:
        os.environ[var] = str(threads)
    # Dask's nanny makes glibc give memory back eagerly in its workers (MALLOC_TRIM_THRESHOLD_=65536); the notebook's
    # kernel would inherit it and pay for every tensor allocation (about 10% of a lottery smoke run here)
    os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    try:
        return _run_one(notebook, values, out_dir, identity)
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _run_one(notebook: str, values: dict, out_dir: str, identity: dict) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def log(what: str) -> None:  # one line per event: shows how often a combination was started and finished
        with open(out / "attempts.log", "a") as f:
            f.write(f"{what} {os.getpid()} {time.time():.3f}\n")

    log("start")
    (out / "identity.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        # the notebook and results reach out_dir only when every cell has run (workbook.run_notebook stages
        # them): an attempt killed with its worker leaves nothing there but this log and its temporary files
        workbook.run_notebook(notebook, None, values, out_dir=out, failed_dir=out / "failed",
                              overrides_from=f"sweep run {out.name}")
    except BaseException as e:  # noqa: BLE001 - reported to the client, the sweep goes on
        failed = out / "failed" / Path(notebook).name
        msg = str(e).strip().splitlines()
        log("failed")
        return {"id": out.name, "ok": False, "seconds": time.perf_counter() - t0,
                "error": f"{type(e).__name__}: " + (msg[-1] if msg else ""),
                "notebook": str(failed if failed.is_file() else "")}
    write_json(out / "identity.json", identity)
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
        opts = _params.load_yaml(cluster) or {}
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
    """Submit every combination without current results; wait; write the summary. Returns the summary dict.

    A combination is skipped only when its results were made with today's identity (``is_current``); one
    whose parameter values or notebook code changed since is run again, and said so."""
    from dask.distributed import as_completed

    _check_folder(sw)
    todo = [c for c in sw.runs if not is_current(sw, c)]
    changed = [run_id(c) for c in todo if result_path(sw, c).is_file()]
    if changed:
        print(f"sweep {sw.name}: {len(changed)} finished run(s) were made with other parameter values or notebook "
              f"code, so they run again: {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}", flush=True)
    skipped = len(sw.runs) - len(todo)
    futures = {}
    for combo in todo:
        fut = client.submit(run_one, str(sw.notebook), sw.values(combo), str(sw.root / run_id(combo)),
                            sw.identity(combo), key=f"{sw.name}-{run_id(combo)}-{time.time_ns()}", pure=False,
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
    summary["changed"] = changed
    return summary


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


def write_summary(sw: Sweep) -> dict:
    """``summary.json`` + ``summary.csv`` (atomically): one row per run whose results have today's identity, plus
    aggregates over seeds; runs whose results are of another identity are listed as ``stale``, never mixed in."""
    rows, stale = [], []
    for combo in sw.runs:
        path = result_path(sw, combo)
        if not path.is_file():
            continue
        ident = sw.identity(combo)["sha256"]
        if _recorded_identity(sw, combo) != ident:
            stale.append(run_id(combo))
            continue
        res = read_json(path)
        nums = res.get("numbers", res)
        nums = {k: nums.get(k) for k in sw.keys} if sw.keys else _scalars(nums)
        rows.append({"id": run_id(combo), "identity": ident, "params": combo, "results": nums})
    summary = {"name": sw.name, "notebook": sw.notebook.stem, "base_params": sw.params, "code_sha256": sw.code,
               "n_runs": len(sw.runs), "n_complete": len(rows), "stale": stale, "rows": rows,
               "aggregate": aggregate(rows, sw.aggregate)}
    write_json(sw.root / "summary.json", summary)
    pcols = sorted({k for r in rows for k in r["params"]})
    rcols = sorted({k for r in rows for k in _scalars(r["results"])})  # lists and tables stay in the JSON
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["id", *pcols, *rcols])
    for r in rows:
        w.writerow([r["id"], *(r["params"].get(k) for k in pcols), *(r["results"].get(k) for k in rcols)])
    write_text(sw.root / "summary.csv", buf.getvalue())
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
            mean, std = mean_std(vals)
            stats[k] = {"mean": mean, "std": std, "n": len(vals)}
        out.append({"params": g["params"], **stats})
    return out


def load_summary(path: str | os.PathLike) -> dict:
    """A finished sweep's summary (folder or summary.json): ``{"rows": [...], "aggregate": [...]}``.

    For a notebook: ``s = load_summary(sweep_summary)``; each row is ``{"id", "params", "results"}``,
    each aggregate ``{"params": {...}, "<key>": {"mean", "std", "n"}}`` (grouped over ``seed``/``seeds``).
    """
    return read_json_in(path, "summary.json", what="sweep summary", how="run `python -m pruning_lab sweep ...` first")


def main(args) -> int:
    """CLI body of ``python -m pruning_lab sweep`` (``args``: its parsed arguments)."""
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
