"""Shared fixtures. Tests never write into the committed results/ (see the root conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory):
    """``smoke_runs(stem)`` executes ``notebooks/<stem>.ipynb`` once with its smoke YAML and returns
    ``(results_dict, executed_notebook_path)``; later calls in the session reuse the run, and a chapter the
    browser tests already ran with its smoke parameters in JupyterLab is not run again (``SMOKE_DONE``)."""
    from notebook_helpers import SMOKE_DONE

    from pruning_lab.workbook import run_notebook

    done: dict[str, tuple[dict, Path]] = {}

    def run(stem: str):
        if stem not in done and stem in SMOKE_DONE:
            done[stem] = SMOKE_DONE[stem]
        if stem not in done:
            out = tmp_path_factory.mktemp(f"smoke_{stem}")
            executed = run_notebook(stem, params="smoke", out_dir=out)  # cells time out: PRUNING_LAB_CELL_TIMEOUT
            results = json.loads((out / "results" / f"{stem}.json").read_text())
            done[stem] = (results, executed)
        return done[stem]

    return run
