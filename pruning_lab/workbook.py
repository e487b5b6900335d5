"""The notebook harness: results JSON, figures, and rerunning notebooks with papermill.

In a notebook::

    from pruning_lab.workbook import Recorder
    rec = Recorder("01_global_magnitude", params=dict(sparsity=0.9, seed=0))
    rec.record(dense_accuracy=0.89)          # results/01_global_magnitude.json, written atomically
    rec.figure(fig, "accuracy_vs_sparsity")  # results/figures/01_global_magnitude/accuracy_vs_sparsity.png

From Python, ``run_notebook("01", "smoke", {"seeds": [0]})``; from a shell, ``python -m pruning_lab run ...``
(the command line is ``pruning_lab/__main__.py``). Parameter values are read and checked by ``params``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import data, default_device, models, params as _params
from ._io import atomic_path, honour_umask, plain, write_json
from .eval import count_parameters

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL_NAME = "pruning-lab"
KERNEL_DISPLAY = "Python (pruning_lab)"


def results_dir() -> Path:
    """``$PRUNING_LAB_RESULTS`` if set (test and parameter runs use their own), else ``results/``."""
    return Path(os.environ.get("PRUNING_LAB_RESULTS", ROOT / "results"))


class Recorder:
    """Collects a notebook's key numbers and writes ``results/<stem>.json`` after every change."""

    def __init__(self, stem: str, params: dict | None = None):
        self.stem = stem
        self.path = results_dir() / f"{stem}.json"
        self.figures = results_dir() / "figures" / stem
        import torch

        self.data: dict[str, Any] = {
            "notebook": stem,
            "params": plain(params or {}),
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "device": default_device().type,
                            "threads": torch.get_num_threads()},
        }
        write_json(self.path, self.data)  # fail now, not after an hour, if the folder is not writable

    def record(self, **numbers: Any) -> None:
        """Add or replace top-level keys and rewrite the JSON atomically."""
        self.data.update(plain(numbers))
        write_json(self.path, self.data)

    def figure(self, fig, name: str, dpi: int = 110) -> Path:
        """Save a matplotlib figure as PNG (atomically) and return its path."""
        path = self.figures / f"{name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        return path


def record_benchmark(name: str, figures: dict, *, folder: str | os.PathLike | None = None) -> Path:
    """Write a benchmark's figures to ``results/benchmarks/<name>.json`` (atomically), with the machine.

    ``figures`` holds what the README quotes (ratios first, raw timings beside them). The file also
    records the date, the host's CPU count, torch's thread count and versions, so a quoted number can
    always be traced to the run that produced it. ``folder`` overrides ``results/benchmarks``.
    """
    import datetime

    import torch

    path = Path(folder) if folder is not None else ROOT / "results" / "benchmarks"
    payload = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "device": default_device().type},
        "figures": figures,
    }
    return write_json(path / f"{name}.json", payload)


# --------------------------------------------------------------------------- rerunning notebooks


def notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def find_notebook(key: str) -> Path:
    """``"01"``, ``"01_global_magnitude"`` or a path -> the notebook's path."""
    path = Path(key)
    if path.suffix == ".ipynb" and path.is_file():
        return path.resolve()
    hits = [nb for nb in notebooks() if nb.stem == key or nb.stem.startswith(f"{key}_")]
    if len(hits) != 1:
        names = ", ".join(nb.stem for nb in notebooks())
        raise SystemExit(f"No single notebook matches {key!r}. Available: {names}.")
    return hits[0]


def load_params(nb: Path, spec: str | None) -> tuple[dict, str | None, str | None]:
    """Parameters from ``notebooks/params/<stem>.<spec>.yaml`` (``spec`` = smoke, paper, ...) or a YAML path:
    ``(values, tag, source)``; the source (the file) is what a refusal names. Read by ``params``' one rule."""
    if spec is None:
        return {}, None, None
    path = Path(spec)
    if not path.is_file():
        if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
            raise SystemExit(f"No parameter file {spec}: {path.resolve()} does not exist.")
        path = NOTEBOOKS / "params" / f"{nb.stem}.{spec}.yaml"
        if not path.is_file():
            tags = sorted(p.name[len(nb.stem) + 1:-len(".yaml")] for p in (NOTEBOOKS / "params").glob(f"{nb.stem}.*.yaml"))
            raise SystemExit(f"No parameter set {spec!r} for {nb.stem}: give a YAML path, or one of "
                             f"{', '.join(tags) or '(none)'} (the files notebooks/params/{nb.stem}.<name>.yaml).")
    values = _params.load_yaml(path)
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise SystemExit(f"{path} must hold a mapping of parameter names to values.")
    tag = path.stem.split(".")[-1] if path.parent == NOTEBOOKS / "params" else path.stem
    return values, tag, display_path(path)


def display_path(path: Path) -> str:
    """A path as a user would type it: relative to the project or the current folder when inside them."""
    path = Path(path).resolve()
    for base in (Path.cwd(), ROOT):
        if path.is_relative_to(base):
            return str(path.relative_to(base))
    return str(path)


def resolve_parameters(nb: Path, params: str | None = None, overrides: dict | None = None,
                       overrides_from: str = "overrides") -> tuple[dict, str | None]:
    """The values a run will inject: the parameter file's, then ``overrides``; each checked against the
    notebook's declared types and ranges and converted (``params.resolve``). ``(values, tag)``."""
    base, tag, source = load_params(nb, params)
    return _params.resolve(nb, (source or "", base), (overrides_from, overrides or {})), tag


def code_sha256(nb: Path) -> str:
    """SHA-256 of a notebook's code, the ``parameters`` cell excepted (its values enter a run separately):
    prose, outputs and metadata do not change it."""
    import hashlib

    cells = json.loads(Path(nb).read_text()).get("cells", [])
    code = ["".join(c.get("source", "")) for c in cells
            if c.get("cell_type") == "code" and "parameters" not in c.get("metadata", {}).get("tags", [])]
    return hashlib.sha256(json.dumps(code).encode()).hexdigest()


def clean_notebook(path: Path) -> None:
    """Make an executed notebook fit to commit: project kernelspec, no widget state, no absolute paths."""
    nb = json.loads(path.read_text())
    meta = nb.setdefault("metadata", {})
    meta.pop("widgets", None)
    meta["kernelspec"] = {"name": KERNEL_NAME, "display_name": KERNEL_DISPLAY, "language": "python"}
    pm = meta.get("papermill", {})
    for key in ("input_path", "output_path"):
        if key in pm and pm[key]:
            pm[key] = Path(pm[key]).name
    for cell in nb.get("cells", []):
        cell.get("metadata", {}).pop("widgets", None)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def _publish(staging: Path, final: Path, stem: str) -> None:
    """Move a finished run's ``<stem>.json`` and ``figures/<stem>/`` from ``staging`` into ``final``."""
    figures = staging / "figures" / stem
    if figures.is_dir():
        dest = final / "figures" / stem
        dest.parent.mkdir(parents=True, exist_ok=True)
        old = final / "figures" / f".old-{stem}-{os.getpid()}"
        if dest.exists():
            os.replace(dest, old)
        os.replace(figures, dest)
        shutil.rmtree(old, ignore_errors=True)
    if (staging / f"{stem}.json").is_file():
        os.replace(staging / f"{stem}.json", final / f"{stem}.json")


def _writable(folder: Path) -> None:
    """Fail before a run, with the fix, if ``folder`` cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise PermissionError(f"Cannot write to {folder} ({e.strerror or e}): choose a writable folder (for "
                              "results, set PRUNING_LAB_RESULTS) or fix its permissions. Nothing was run.") from e


ENGINE = "pruning_lab"


def _register_engine() -> None:
    """papermill's nbclient engine without nbclient's stand-in for the Output widget's frontend.

    To mimic JupyterLab, nbclient answers an Output widget's comm messages and reroutes the cell's
    messages to it while the kernel draws into it (what ``interact`` does). That exchange sometimes
    deadlocks (nbclient #312, nbconvert #1921): twice our runs stopped on an ``interact`` cell with the
    kernel idle and the client waiting. Without a frontend there is nothing to draw into anyway: here the
    widgets' comm messages are received and left unanswered, and what the cell draws lands in its outputs.
    """
    from papermill import engines
    from papermill.clientwrap import PapermillNotebookClient

    class Client(PapermillNotebookClient):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.comm_open_handlers = {"jupyter.widget": lambda msg: None}

    class Engine(engines.NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, log_output=False, stdout_file=None,
                                     stderr_file=None, start_timeout=60, execution_timeout=None, **kwargs):
            kwargs = engines.remove_args(["input_path", "timeout", "startup_timeout"], **kwargs)
            return Client(nb_man, timeout=execution_timeout, startup_timeout=start_timeout, kernel_name=kernel_name,
                          log=engines.logger, log_output=log_output, stdout_file=stdout_file,
                          stderr_file=stderr_file, **kwargs).execute()

    engines.papermill_engines.register(ENGINE, Engine)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


_LEFTOVER = re.compile(r"\.(?:running|staging)-.*?(?:-(\d+)-[a-z0-9_]+)?(?:\.ipynb)?")


def _remove_leftovers(folder: Path, pattern: str) -> None:
    """Remove what killed runs left in ``folder`` (``.running-*`` notebooks, ``.staging-*`` folders), and say so.

    Their names carry the pid of the run that made them: those of a run still alive are kept."""
    for path in folder.glob(pattern):
        m = _LEFTOVER.fullmatch(path.name)
        if m is None or (m[1] is not None and _alive(int(m[1]))):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        print(f"[pruning_lab] removed {path}, left by a run that was killed", file=sys.stderr, flush=True)


def run_notebook(key: str, params: str | None = None, overrides: dict | None = None,
                 out_dir: str | os.PathLike | None = None, kernel: str = KERNEL_NAME,
                 failed_dir: str | os.PathLike | None = None, cell_timeout: float | None = None, *,
                 overrides_from: str = "overrides") -> Path:
    """Execute one notebook with papermill and return the executed notebook's path.

    Without ``params``/``overrides`` the notebook runs with its committed parameters, in place, and
    records to ``results/``. Otherwise the executed copy goes to ``runs/<tag>/`` (or ``out_dir``)
    and its results JSON beside it, so the committed run is never overwritten by a smoke run.

    Every value is checked against the notebook's declared types and ranges before the kernel starts
    (``params``); a refusal is one line naming the parameter, the value, what is allowed and where it came from
    (the parameter file, or ``overrides_from``: ``-p`` on the command line).

    A run records into a staging folder; only when every cell has run are the executed notebook, its
    results JSON and its figures moved into place. A failed run changes nothing there: its partly
    executed notebook is kept in ``failed_dir`` (default ``runs/failed/``; named in the error) to show
    where it stopped. What a killed run left behind is removed by the next run in the same folders, and reported.

    ``cell_timeout`` (seconds; default ``$PRUNING_LAB_CELL_TIMEOUT``, which the test session sets, else none:
    paper-scale cells may run for hours) stops a cell that runs longer, so that a hung kernel becomes a named
    failure instead of a run that never ends.
    """
    import papermill

    if cell_timeout is None and os.environ.get("PRUNING_LAB_CELL_TIMEOUT"):
        cell_timeout = float(os.environ["PRUNING_LAB_CELL_TIMEOUT"])
    if cell_timeout is not None and not cell_timeout > 0:
        raise ValueError(f"cell_timeout={cell_timeout}: give a positive number of seconds, or None for no limit.")

    nb = find_notebook(key)
    values, tag = resolve_parameters(nb, params, overrides, overrides_from)
    if not values and out_dir is None:
        target, final = nb, results_dir()
    else:
        folder = Path(out_dir) if out_dir is not None else ROOT / "runs" / (tag or "custom")
        target, final = folder / nb.name, folder / "results"
    _writable(final)
    _writable(target.parent)
    _remove_leftovers(final, ".staging-*")
    _remove_leftovers(target.parent, ".running-*.ipynb")
    pid = os.getpid()
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{nb.stem}-{pid}-", dir=final))
    saved = {var: os.environ.get(var) for var in ("PRUNING_LAB_RESULTS", "MPLBACKEND")}
    os.environ.setdefault("MPLBACKEND", "Agg")  # for a kernel whose spec does not set it (ours does: inline)
    os.environ["PRUNING_LAB_RESULTS"] = str(staging)
    fd, tmp = tempfile.mkstemp(prefix=f".running-{nb.stem}-{pid}-", suffix=".ipynb", dir=target.parent)
    os.close(fd)
    try:
        try:
            _register_engine()
            papermill.execute_notebook(str(nb), tmp, parameters=values, kernel_name=kernel, engine_name=ENGINE,
                                       cwd=str(nb.parent), progress_bar=sys.stderr.isatty(),
                                       execution_timeout=cell_timeout)
        except BaseException as e:
            failed = Path(failed_dir if failed_dir is not None else ROOT / "runs" / "failed") / nb.name
            if Path(tmp).is_file() and Path(tmp).stat().st_size:
                failed.parent.mkdir(parents=True, exist_ok=True)
                honour_umask(tmp)
                os.replace(tmp, failed)
                e.add_note(f"The partly executed notebook is {failed}; {target.name} and its results were "
                           "left as they were.")
            raise
        clean_notebook(Path(tmp))
        _publish(staging, final, nb.stem)
        os.replace(tmp, target)
    finally:
        if Path(tmp).exists():
            os.unlink(tmp)
        shutil.rmtree(staging, ignore_errors=True)
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
    return target


def check_setup(load_model: bool = True) -> dict:
    """What the workbook needs, found or not: torch, the image data, the text corpus, the model."""
    import warnings

    import torch

    report: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                              "device": default_device().type,
                              "threads": torch.get_num_threads()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = data.load_image_data()
    report["images"] = {"name": images.name, "train": len(images.x_train), "val": len(images.x_val),
                        "test": len(images.x_test), "warning": str(caught[0].message) if caught else None}
    try:
        corpus = data.python_docs_corpus()
        report["text"] = {"name": corpus.name, "calibration_chars": len(corpus.calibration),
                          "heldout_chars": len(corpus.heldout)}
    except FileNotFoundError as e:
        report["text"] = {"error": str(e)}
    if load_model:
        model, _ = models.load_llm()
        cfg = model.config
        report["model"] = {"class": type(model).__name__, "layers": cfg.num_hidden_layers,
                           "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                           "mlp": cfg.intermediate_size, "parameters": count_parameters(model)}
    return report


def install_kernel() -> Path:
    """Register this interpreter as the ``pruning-lab`` kernel inside its own prefix (not ``--user``).

    The kernelspec pins the inline plotting backend, so executed notebooks keep their figures even
    when the calling shell sets ``MPLBACKEND=Agg`` for headless scripts and tests; and a passive
    OpenMP wait policy, so that a kernel sharing 2 cores with another busy process does not spin
    (measured here: a LeNet run 5.7x slower with spinning threads under load, no loss when idle).
    """
    from ipykernel.kernelspec import install

    folder = Path(install(kernel_name=KERNEL_NAME, display_name=KERNEL_DISPLAY, prefix=sys.prefix))
    spec = json.loads((folder / "kernel.json").read_text())
    spec["env"] = {"MPLBACKEND": "module://matplotlib_inline.backend_inline", "OMP_WAIT_POLICY": "PASSIVE"}
    with atomic_path(folder / "kernel.json") as tmp:
        tmp.write_text(json.dumps(spec, indent=1) + "\n")
    return folder
