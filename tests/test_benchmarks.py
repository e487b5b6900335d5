"""The README quotes benchmark figures only from the committed runs in results/benchmarks/*.json."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\|[^|]+\|\s*([\d.,]+)[^|]*\|\s*`(\w+\.json)`\s+`([^`]+)`\s*\|\s*$", re.M)


def _rows():
    return ROW.findall((ROOT / "README.md").read_text())


def _lookup(figures, key):
    for part in key.split("."):
        figures = figures[part]
    return figures


def test_every_benchmark_script_has_its_committed_json():
    names = {p.stem.removeprefix("bench_") for p in (ROOT / "benchmarks").glob("bench_*.py")}
    committed = {p.stem for p in (ROOT / "results" / "benchmarks").glob("*.json")}
    assert names <= committed, f"benchmarks without a committed run: {sorted(names - committed)}"
    quoted = {f.removesuffix(".json") for _, f, _ in _rows()}
    assert names <= quoted, f"benchmarks the README does not quote: {sorted(names - quoted)}"


@pytest.mark.parametrize("quoted, file, key", _rows())
def test_readme_number_matches_the_committed_run(quoted, file, key):
    saved = json.loads((ROOT / "results" / "benchmarks" / file).read_text())
    assert saved["machine"]["cpus"] >= 1 and saved["date"]
    value = float(_lookup(saved["figures"], key))
    text = quoted.replace(",", "").rstrip(".")
    decimals = len(text.split(".")[1]) if "." in text else 0
    assert float(text) == pytest.approx(round(value, decimals), abs=10 ** -decimals / 2 + 1e-12), \
        f"README says {quoted} for {file} {key}; the committed run has {value}"
