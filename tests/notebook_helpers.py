"""Tiny notebooks for the workbook's and the sweeps' own tests (one builder for both), and the chapters'
smoke runs already done in this session."""

from pathlib import Path

# stem -> (results, executed notebook): a chapter run with its smoke parameters by the browser tests' Run All in
# JupyterLab (tests/browser/ run first). The ``smoke_runs`` fixture reuses it instead of running the chapter again.
SMOKE_DONE: dict = {}


def keep_smoke_run(stem: str, notebook: Path, results: Path, dest: Path) -> None:
    """Copy a finished smoke run (the saved ``notebook`` and the files of ``stem`` in the ``results`` folder its
    kernel recorded into) to ``dest``, laid out as ``run_notebook`` lays out its runs, and register it in
    ``SMOKE_DONE``."""
    import json
    import shutil

    (dest / "results").mkdir(parents=True, exist_ok=True)
    shutil.copy2(notebook, dest / notebook.name)
    shutil.copy2(results / f"{stem}.json", dest / "results" / f"{stem}.json")
    if (results / "figures" / stem).is_dir():
        shutil.copytree(results / "figures" / stem, dest / "results" / "figures" / stem)
    SMOKE_DONE[stem] = (json.loads((dest / "results" / f"{stem}.json").read_text()), dest / notebook.name)


def write_notebook(path, params_src: str, *cells: str):
    """A notebook for the workbook's own tests: a ``parameters`` cell, then code cells, on the lab's kernel."""
    import nbformat

    from pruning_lab import workbook

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": workbook.KERNEL_NAME, "display_name": "x", "language": "python"}
    p = nbformat.v4.new_code_cell(params_src)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, *(nbformat.v4.new_code_cell(c) for c in cells)]
    nbformat.write(nb, path)
    return path
