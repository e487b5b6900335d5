"""Loaded by every pytest run in this repository, including `pytest --nbval-lax notebooks/...` alone.

Set before any kernel starts (nbval's and papermill's kernels inherit the environment): notebooks that
tests execute record into a scratch folder, never into the committed results/.
"""

import os
import tempfile

os.environ.setdefault("PRUNING_LAB_RESULTS", tempfile.mkdtemp(prefix="pruning_lab_results_"))
os.environ.setdefault("MPLBACKEND", "Agg")
