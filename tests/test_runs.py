"""pruning_lab.runs: folders named by a hash, results computed once, seeds shipped in assets/ (the trained runs'
seeds are tested with the reasoner, tests/test_reasoner.py)."""

import json

import pytest

from pruning_lab import runs
from pruning_lab.__main__ import main


def test_a_results_folder_computes_once_and_refuses_other_hyperparameters(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNING_LAB_SEEDS", "none")
    calls = []
    folder = runs.RunFolder(tmp_path, kind="sums", spec={"a": 1})
    assert folder.dir == tmp_path / runs.digest({"spec": {"a": 1}})
    assert folder.cached("sum", {"x": [1, 2]}, lambda: calls.append(1) or 3) == 3
    assert runs.RunFolder(tmp_path, kind="sums", spec={"a": 1}).cached("sum", {"x": [1, 2]}, lambda: 0) == 3
    assert calls == [1] and json.loads((folder.dir / "hparams.json").read_text()) == {"a": 1}
    (folder.dir / "hparams.json").write_text('{"a": 2}')  # a folder that holds something else
    with pytest.raises(ValueError, match="different hyperparameters.*a: folder has 2, you asked 1"):
        runs.RunFolder(tmp_path, kind="sums", spec={"a": 1}).cached("sum", {"x": [3]}, lambda: 0)


def test_a_cache_folder_is_seeded_from_the_command_line_and_read_by_a_fresh_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRUNING_LAB_SEEDS", "none")
    made = runs.RunFolder(tmp_path / "cache" / "sums", kind="sums", spec={"a": 1})
    made.cached("sum", {"x": 1}, lambda: 41)
    assert main(["seed", str(made.dir), "--to", str(tmp_path / "assets")]) == 0
    seed = tmp_path / "assets" / "sums" / made.hash
    assert "wrote the seed" in capsys.readouterr().out
    manifest = json.loads((seed / "seed.json").read_text())
    assert manifest["hash"] == made.hash and set(manifest["files"]) == {
        "hparams.json", f"results/sum-{runs.digest({'x': 1})}.json"}
    monkeypatch.setenv("PRUNING_LAB_SEEDS", str(tmp_path / "assets"))
    fresh = runs.RunFolder(tmp_path / "fresh", kind="sums", spec={"a": 1})
    assert fresh.cached("sum", {"x": 1}, lambda: pytest.fail("computed a seeded result")) == 41
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        runs.open_folder(tmp_path)
