"""Loaded by every pytest run in this repository, including `pytest --nbval-lax notebooks/...` alone.

Set before any kernel starts (nbval's and papermill's kernels inherit the environment): notebooks that
tests execute record into a scratch folder, never into the committed results/.
"""

import os
import tempfile

import pytest

os.environ.setdefault("PRUNING_LAB_RESULTS", tempfile.mkdtemp(prefix="pruning_lab_results_"))
os.environ.setdefault("MPLBACKEND", "Agg")
# every notebook a test runs with papermill (smoke runs, sweeps): a cell that hangs fails after 10 minutes
os.environ.setdefault("PRUNING_LAB_CELL_TIMEOUT", "600")

_ENVIRONMENT = dict(os.environ)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """nbval starts each notebook's kernel from this process's environment: give it the environment the
    session started with, whatever a test changed since (a leaked OMP_NUM_THREADS=1 once ran every classroom
    notebook on one of the two cores)."""
    if str(item.fspath).endswith(".ipynb") and dict(os.environ) != _ENVIRONMENT:
        os.environ.clear()
        os.environ.update(_ENVIRONMENT)
