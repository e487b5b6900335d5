"""Shared fixtures. Tests never write into the committed results/: every run gets its own folder."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

# Set before any kernel starts (nbval's and papermill's kernels inherit it): the committed notebooks
# re-executed by nbval record into a scratch folder, not into the repository's results/.
os.environ.setdefault("PRUNING_LAB_RESULTS", tempfile.mkdtemp(prefix="pruning_lab_results_"))
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory):
    """``smoke_runs(stem)`` executes ``notebooks/<stem>.ipynb`` once with its smoke YAML and returns
    ``(results_dict, executed_notebook_path)``; later calls in the session reuse the run."""
    from pruning_lab.workbook import run_notebook

    done: dict[str, tuple[dict, Path]] = {}

    def run(stem: str):
        if stem not in done:
            out = tmp_path_factory.mktemp(f"smoke_{stem}")
            executed = run_notebook(stem, params="smoke", out_dir=out)
            results = json.loads((out / "results" / f"{stem}.json").read_text())
            done[stem] = (results, executed)
        return done[stem]

    return run
