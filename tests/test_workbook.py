"""The notebook harness: results JSON, parameter checks, papermill reruns, the welcome notebook."""

import json
import math

import nbformat
import pytest

from pruning_lab import params, workbook
from pruning_lab.__main__ import main
from pruning_lab._io import write_json

from notebook_helpers import write_notebook


def test_recorder_writes_plain_json_atomically(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("PRUNING_LAB_RESULTS", str(tmp_path))
    rec = workbook.Recorder("99_demo", params={"a": 1})
    rec.record(x=torch.tensor(0.5), curve=[{"s": 0.1, "ppl": math.inf}], nested={"n": (1, 2)})
    saved = json.loads((tmp_path / "99_demo.json").read_text())
    assert saved["x"] == 0.5 and saved["curve"][0]["ppl"] is None and saved["nested"]["n"] == [1, 2]
    assert saved["params"] == {"a": 1} and "torch" in saved["environment"]
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_unwritable_results_folder_is_one_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file, not a folder")
    monkeypatch.setenv("PRUNING_LAB_RESULTS", str(blocker / "results"))
    with pytest.raises(PermissionError, match="PRUNING_LAB_RESULTS"):
        workbook.Recorder("99_demo")
    assert blocker.read_text() == "I am a file, not a folder"


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}


def make_notebook(path, params_src="n = 3\nlabel = 'x'\n"):
    return write_notebook(path, params_src, "from pruning_lab.workbook import Recorder\n"
                          "rec = Recorder('98_tiny', params=dict(n=n, label=label))\n"
                          "rec.record(square=n * n)\nprint(label * n)")


def test_unknown_parameter_is_refused_before_running(tmp_path):
    nb = make_notebook(tmp_path / "98_tiny.ipynb")
    assert params.defaults(nb) == {"n": 3, "label": "x"}
    with pytest.raises(SystemExit, match="no parameter named 'nn'.*label, n"):
        params.check(nb, {"nn": 4}, "-p")
    with pytest.raises(SystemExit, match="no parameter named 'nn'"):
        workbook.run_notebook(str(nb), overrides={"nn": 4}, out_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "98_tiny.ipynb").exists()


def test_run_notebook_with_overrides_records_beside_the_copy(tmp_path):
    nb = make_notebook(tmp_path / "98_tiny.ipynb")
    before = nb.read_text()
    out = workbook.run_notebook(str(nb), overrides={"n": 4}, out_dir=tmp_path / "out")
    assert nb.read_text() == before  # the source notebook is untouched
    assert json.loads((tmp_path / "out" / "results" / "98_tiny.json").read_text())["square"] == 16
    executed = nbformat.read(out, as_version=4)
    assert executed.metadata.kernelspec.name == workbook.KERNEL_NAME
    assert "widgets" not in executed.metadata
    assert "xxxx" in "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))


def test_interact_cells_run_headless_and_what_they_draw_lands_in_the_cell(tmp_path):
    # papermill's stock client stands in for the Output widget's frontend, and that exchange sometimes
    # deadlocked on our interact cells; without it, the figure interact draws is an output of the cell
    draw = ("import matplotlib.pyplot as plt\nfrom ipywidgets import IntSlider, interact\n"
            "interact(lambda k: (plt.plot(range(k)), plt.show()), k=IntSlider(value=n, min=1, max=9));")
    nb = write_notebook(tmp_path / "95_widget.ipynb", "n = 3\n", draw, draw, draw)
    out = workbook.run_notebook(str(nb), overrides={"n": 4}, out_dir=tmp_path / "out", cell_timeout=60)
    cells = nbformat.read(out, as_version=4).cells[-3:]
    for cell in cells:
        kinds = [set(o.get("data", {})) for o in cell.outputs]
        assert any("image/png" in k for k in kinds), kinds
        assert any("application/vnd.jupyter.widget-view+json" in k for k in kinds), kinds


def test_a_cell_past_its_timeout_fails_by_name_and_publishes_nothing(tmp_path, monkeypatch):
    import time

    nb = write_notebook(tmp_path / "96_slow.ipynb", "n = 3\n", "import time\ntime.sleep(60)")
    with pytest.raises(ValueError, match="cell_timeout=0"):
        workbook.run_notebook(str(nb), overrides={"n": 1}, out_dir=tmp_path / "out", cell_timeout=0)
    t0 = time.perf_counter()
    with pytest.raises(Exception, match="(?i)timed? ?out|timeout") as err:
        workbook.run_notebook(str(nb), overrides={"n": 1}, out_dir=tmp_path / "out", cell_timeout=3,
                              failed_dir=tmp_path / "failed")
    assert time.perf_counter() - t0 < 45, "the timeout did not stop the sleeping cell"
    assert "partly executed notebook" in "".join(getattr(err.value, "__notes__", []))
    assert not (tmp_path / "out" / "96_slow.ipynb").exists() and not (tmp_path / "out" / "results" / "96_slow.json").exists()
    monkeypatch.setenv("PRUNING_LAB_CELL_TIMEOUT", "3")  # the default when no cell_timeout is given
    t0 = time.perf_counter()
    with pytest.raises(Exception, match="(?i)timed? ?out|timeout"):
        workbook.run_notebook(str(nb), overrides={"n": 1}, out_dir=tmp_path / "out", failed_dir=tmp_path / "failed")
    assert time.perf_counter() - t0 < 45


def test_yaml_params_and_cli(tmp_path, capsys):
    nb = make_notebook(tmp_path / "98_tiny.ipynb")
    (tmp_path / "bad.yaml").write_text("n: 2\nwrong: 1\n")
    with pytest.raises(SystemExit, match="bad.yaml: 98_tiny.ipynb has no parameter named 'wrong'"):
        main(["run", str(nb), "--params", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="No parameter set 'nonexistent' for 98_tiny: give a YAML path, or one of"):
        workbook.load_params(nb, "nonexistent")
    with pytest.raises(SystemExit, match="No single notebook"):
        workbook.find_notebook("77")


def test_every_notebook_follows_the_conventions():
    nbs = workbook.notebooks()
    assert [nb.stem for nb in nbs][0] == "00_welcome"
    for path in nbs:
        nb = json.loads(path.read_text())
        assert nb["metadata"]["kernelspec"]["name"] == workbook.KERNEL_NAME, path
        assert "widgets" not in nb["metadata"], path
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        tagged = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: one cell tagged 'parameters'"
        assert any(c.get("outputs") for c in code), f"{path.name} is committed without outputs"
        for p in params.declared(path).values():  # every default within the range its comment declares
            assert p.check(p.default) == p.default, (path.name, p.name)
        for kind in ("smoke", "paper"):  # every committed parameter file passes the check runs make
            workbook.resolve_parameters(path, kind)
        assert (workbook.ROOT / "results" / f"{path.stem}.json").is_file(), f"no committed results for {path.stem}"


def test_welcome_smoke_run(smoke_runs):
    results, executed = smoke_runs("00_welcome")
    setup = results["setup"]
    assert setup["images"]["name"] == "fashion-mnist" and setup["images"]["test"] == 10000
    assert setup["text"]["heldout_chars"] > 200_000
    assert results["params"]["load_model"] is False and "model" not in setup


def test_committed_welcome_results():
    saved = json.loads((workbook.ROOT / "results" / "00_welcome.json").read_text())
    model = saved["setup"]["model"]
    assert (model["layers"], model["heads"], model["kv_heads"], model["mlp"]) == (30, 9, 3, 1536)
    assert model["parameters"] == 134_515_008


def test_record_benchmark_writes_figures_with_the_machine(tmp_path):
    path = workbook.record_benchmark("demo", {"speedup": 2.5, "seconds": {"ours": 1.0, "peer": 2.5}},
                                     folder=tmp_path)
    saved = json.loads(path.read_text())
    assert path == tmp_path / "demo.json"
    assert saved["benchmark"] == "demo" and saved["figures"]["speedup"] == 2.5
    assert saved["figures"]["seconds"] == {"ours": 1.0, "peer": 2.5}
    assert saved["machine"]["cpus"] >= 1 and saved["machine"]["torch_threads"] >= 1 and saved["date"][:2] == "20"


def _staged_notebook(path, fail: bool):
    """A notebook that records a number and a figure, then (optionally) fails in its last cell."""
    return write_notebook(path, "n = 3\n",
                          "import matplotlib.pyplot as plt\nfrom pruning_lab.workbook import Recorder\n"
                          "rec = Recorder('97_staged', params=dict(n=n))\nrec.record(square=n * n)\n"
                          "fig, ax = plt.subplots(); ax.plot([n, n * n]); rec.figure(fig, 'curve')",
                          "raise RuntimeError('injected failure')" if fail else "n")


def test_a_failed_in_place_run_changes_nothing(tmp_path, monkeypatch):
    import papermill

    results = tmp_path / "results"
    monkeypatch.setenv("PRUNING_LAB_RESULTS", str(results))
    nb = _staged_notebook(tmp_path / "97_staged.ipynb", fail=False)
    workbook.run_notebook(str(nb))  # in place: the committed run
    committed = {p: p.read_bytes() for p in [nb, results / "97_staged.json", results / "figures/97_staged/curve.png"]}
    assert json.loads(committed[results / "97_staged.json"])["square"] == 9

    failing = _staged_notebook(tmp_path / "97_staged.ipynb", fail=True)
    source = failing.read_bytes()
    with pytest.raises(papermill.PapermillExecutionError, match="injected failure") as err:
        workbook.run_notebook(str(failing))
    assert "partly executed notebook" in "".join(getattr(err.value, "__notes__", []))
    assert failing.read_bytes() == source  # the notebook file is untouched
    for path, before in committed.items():
        if path != nb:
            assert path.read_bytes() == before, f"{path} changed after a failed run"
    assert not list(results.glob(".staging-*")) and not list(tmp_path.glob(".running-*"))
    partial = workbook.ROOT / "runs" / "failed" / "97_staged.ipynb"
    assert "injected failure" in partial.read_text()
    partial.unlink()


def test_a_successful_run_replaces_results_and_figures_together(tmp_path, monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setenv("PRUNING_LAB_RESULTS", str(results))
    (results / "figures" / "97_staged").mkdir(parents=True)
    (results / "figures" / "97_staged" / "stale.png").write_bytes(b"old figure")
    (results / ".staging-97_staged-killed").mkdir()  # what a killed run leaves behind
    (results / ".staging-97_staged-killed" / "97_staged.json").write_text('{"square": -1}')
    nb = _staged_notebook(tmp_path / "97_staged.ipynb", fail=False)
    workbook.run_notebook(str(nb), overrides={"n": 4}, out_dir=tmp_path / "out")
    assert json.loads((tmp_path / "out/results/97_staged.json").read_text())["square"] == 16
    workbook.run_notebook(str(nb))
    assert json.loads((results / "97_staged.json").read_text())["square"] == 9
    assert sorted(p.name for p in (results / "figures" / "97_staged").iterdir()) == ["curve.png"]
    assert not list(results.glob(".staging-*")) and not list((results / "figures").glob(".old-*"))


def test_unwritable_results_fail_before_the_notebook_runs(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("PRUNING_LAB_RESULTS", str(blocker / "results"))
    nb = _staged_notebook(tmp_path / "97_staged.ipynb", fail=False)
    before = nb.read_bytes()
    with pytest.raises(PermissionError, match="Nothing was run"):
        workbook.run_notebook(str(nb))
    assert nb.read_bytes() == before


def test_files_honour_the_umask(tmp_path, monkeypatch):
    import os
    import stat

    results = tmp_path / "results"
    monkeypatch.setenv("PRUNING_LAB_RESULTS", str(results))
    nb = _staged_notebook(tmp_path / "97_staged.ipynb", fail=False)
    old = os.umask(0o022)  # a classroom machine: everyone may read
    try:
        out = workbook.run_notebook(str(nb), overrides={"n": 2}, out_dir=tmp_path / "out")
        write_json(tmp_path / "plain.json", {"a": 1})
        os.umask(0o077)  # a private machine: nobody else
        write_json(tmp_path / "private.json", {"a": 1})
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    for path in (out, tmp_path / "out/results/97_staged.json", tmp_path / "out/results/figures/97_staged/curve.png",
                 tmp_path / "plain.json"):
        assert mode(path) == 0o644, (path, oct(mode(path)))
    assert mode(tmp_path / "out/results/figures/97_staged") == 0o755
    assert mode(tmp_path / "private.json") == 0o600


def test_leftovers_of_killed_runs_are_removed_and_reported_but_a_live_runs_are_kept(tmp_path, capsys, monkeypatch):
    import os
    import subprocess
    import sys

    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = _staged_notebook(tmp_path / "97_staged.ipynb", fail=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    out = tmp_path / "out"
    (out / "results").mkdir(parents=True)
    killed = out / f".running-97_staged-{dead_pid}-abc_1.ipynb"
    old_style = out / ".running-xyz12345.ipynb"  # named before runs carried their pid
    live = out / f".running-97_staged-{os.getppid()}-abc_2.ipynb"  # a run in another process still going
    staged = out / "results" / f".staging-97_staged-{dead_pid}-q1"
    for f in (killed, old_style, live):
        f.write_text("{}")
    staged.mkdir()
    workbook.run_notebook(str(nb), overrides={"n": 2}, out_dir=out)
    err = capsys.readouterr().err
    assert not killed.exists() and not old_style.exists() and not staged.exists() and live.exists()
    for gone in (killed, old_style, staged):
        assert f"removed {gone}, left by a run that was killed" in err
    assert str(live) not in err
    assert "MPLBACKEND" not in os.environ  # set for the kernel, put back afterwards
