"""The workbook's command line: ``python -m pruning_lab COMMAND`` (``./lab`` calls it).

    python -m pruning_lab list                                  # notebooks, their parameters and what each takes
    python -m pruning_lab run all                               # every notebook, committed parameters, in place
    python -m pruning_lab run 01 --params smoke                 # notebooks/params/01_*.smoke.yaml -> runs/smoke/
    python -m pruning_lab run 02 --params my.yaml -p lr 1e-3    # a YAML file, then one value changed
    python -m pruning_lab sweep notebooks/params/sweeps/lottery-5seeds-smoke.yaml
    python -m pruning_lab check                                 # the set-up: data, corpus, model cache (checksums)
    python -m pruning_lab book                                  # the web edition in build/book/
    python -m pruning_lab seed ~/.cache/pruning_lab/lora_recovery/<hash>   # ship a cache folder in assets/

Values of ``-p`` and of YAML files are read by one rule (``1e-3`` is a float, ``no`` a string, ``[0, 1]`` a list)
and every value is checked against the notebook's declared types and ranges before any kernel starts
(``pruning_lab.params``). This module sits on top: it imports the harness, the sweeps and the web edition, and
nothing imports it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import params, workbook


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pruning_lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the notebooks, their parameters and what each takes")
    sub.add_parser("install-kernel", help="register the venv's Jupyter kernel 'pruning-lab'")
    sub.add_parser("check", help="check the set-up (data, corpus, model cache and its checksums) and print it")
    run = sub.add_parser("run", help="execute notebooks with papermill")
    run.add_argument("notebook", help="'all', a number like 01, a stem, or a path")
    run.add_argument("--params", help="'smoke', 'paper', or a YAML file")
    run.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="override one parameter: 3, 1e-3, true, null, [0, 1] or text")
    run.add_argument("--out", help="folder for the executed copies (default: in place, or runs/<tag>/)")
    run.add_argument("--cell-timeout", type=float, metavar="SECONDS",
                     help="fail a cell that runs longer than this (default: no limit)")
    bk = sub.add_parser("book", help="render the committed notebooks to a static web edition (build/book/)")
    bk.add_argument("--out", default=str(workbook.ROOT / "build" / "book"), help="output folder (default: build/book/)")
    sd = sub.add_parser("seed", help="write a run folder of the cache as a seed in assets/ (computed once, shipped)")
    sd.add_argument("folder", help="<cache>/<kind>/<hash>, a folder with hparams.json")
    sd.add_argument("--weights", action="store_true", help="ship its trained weights too (default: results only)")
    sd.add_argument("--to", help="the seeds' root (default: the repository's assets/)")
    sw = sub.add_parser("sweep", help="run a parameter sweep (a YAML of notebook, params, grid) on Dask")
    sw.add_argument("sweep", help="a sweep YAML path or a name in notebooks/params/sweeps/")
    sw.add_argument("--engine", default="local", help="'local': a LocalCluster, one 1-thread worker per core")
    sw.add_argument("--workers", type=int, help="local workers (default: one per core)")
    sw.add_argument("--scheduler", help="address of a running Dask scheduler, e.g. tcp://host:8786")
    sw.add_argument("--cluster", help="YAML of dask_jobqueue.SLURMCluster/PBSCluster options (kind, jobs, ...)")
    sw.add_argument("--out", help="parent folder of the sweep's folder (default: runs/sweeps/)")
    return parser


def _list() -> int:
    for nb in workbook.notebooks():
        print(nb.stem)
        for name, p in params.declared(nb).items():
            print(f"  {name} = {p.default!r}   ({p.allowed()})")
    return 0


def _check() -> int:
    from . import models

    t0 = time.perf_counter()
    try:
        folder = models.embedded_model_folder()  # sizes and SHA-256 of every file; rebuilt (with a warning) if damaged
        print(f"  cache: {folder} (sizes and SHA-256 checked in {time.perf_counter() - t0:.1f} s)")
    except FileNotFoundError as e:
        print(f"  cache: {e}")
    for key, value in workbook.check_setup().items():
        print(f"{key:>7}: {value}")
    return 0


def _run(args) -> int:
    overrides = {}
    for name, text in args.p:
        overrides[name] = params.parse_value(text, where=f"-p {name}")
    targets = [nb.stem for nb in workbook.notebooks()] if args.notebook == "all" else [args.notebook]
    for key in targets:  # every notebook's values are checked before the first kernel starts
        workbook.resolve_parameters(workbook.find_notebook(key), args.params, overrides, "-p")
    for key in targets:
        print(f"== {key}", flush=True)
        path = workbook.run_notebook(key, args.params, overrides, args.out, cell_timeout=args.cell_timeout,
                                     overrides_from="-p")
        shown = path.relative_to(workbook.ROOT) if path.is_relative_to(workbook.ROOT) else path
        print(f"   wrote {shown}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "list":
        return _list()
    if args.cmd == "install-kernel":
        print(f"installed kernel {workbook.KERNEL_NAME!r} in {workbook.install_kernel()}")
        return 0
    if args.cmd == "check":
        return _check()
    if args.cmd == "book":
        from . import book

        res = book.build(workbook.notebooks(), workbook.ROOT / "results", workbook.ROOT / "README.md", Path(args.out))
        print(f"wrote {len(res.pages)} pages to {res.out} in {res.seconds:.1f} s; open {res.out / 'index.html'}")
        for f in res.failures:
            print(f"not rendered: {f}", file=sys.stderr)
        return 1 if res.failures else 0
    if args.cmd == "seed":
        from . import runs

        dest = runs.write_seed(runs.open_folder(args.folder), args.to or runs.SEED_ROOT, weights=args.weights)
        print(f"wrote the seed {dest} ({sum(1 for p in dest.rglob('*') if p.is_file())} files)")
        return 0
    if args.cmd == "sweep":
        from . import sweep

        return sweep.main(args)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
