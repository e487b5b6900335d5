"""Parameter sweeps on Dask: a tiny notebook, a LocalCluster of 2 workers and a real scheduler."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pruning_lab import sweep, workbook

from notebook_helpers import write_notebook

BIN = Path(sys.executable).parent


def make_notebook(path):
    return write_notebook(path, "seed = 0\nscale = 1.0\nsleep = 0.0\n",
                          "import time\nfrom pruning_lab.workbook import Recorder\n"
                          "assert scale > 0, 'scale must be positive'\n"
                          "time.sleep(sleep)\n"
                          "rec = Recorder('97_sweepy', params=dict(seed=seed, scale=scale))\n"
                          "rec.record(score=(seed + 1) * scale, tag='x')\n")


@pytest.fixture
def nb(tmp_path):
    return make_notebook(tmp_path / "97_sweepy.ipynb")


def spec(nb, **kw):
    return {"name": "t", "notebook": str(nb), "grid": {"seed": [0, 1], "scale": [1.0, 2.0]},
            "aggregate": ["score"], **kw}


@pytest.fixture(scope="module")
def local_client():
    before = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")}
    client, cluster = sweep.make_client("local", n_workers=2)
    try:
        # Dask's nanny would write its worker environment into this process, where later kernels inherit it
        assert {k: os.environ.get(k) for k in before} == before
        yield client
    finally:
        client.close()
        cluster.close()


def test_grid_product_ids_and_bad_input_refused_before_running(nb, tmp_path):
    sw = sweep.load_sweep(spec(nb), tmp_path / "out")
    assert [c for c in sw.runs] == [{"seed": 0, "scale": 1.0}, {"seed": 0, "scale": 2.0},
                                   {"seed": 1, "scale": 1.0}, {"seed": 1, "scale": 2.0}]
    assert sweep.run_id({"seed": 1, "scale": 2.0}) == "scale=2.0,seed=1"
    with pytest.raises(SystemExit, match="no parameter named 'sede'"):
        sweep.load_sweep(spec(nb, grid={"sede": [0, 1]}), tmp_path / "out")
    with pytest.raises(SystemExit, match="empty"):
        sweep.load_sweep(spec(nb, grid={"seed": []}), tmp_path / "out")
    with pytest.raises(SystemExit, match="empty"):
        sweep.load_sweep(spec(nb, grid={}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_aggregate_by_hand():
    rows = [{"params": {"seed": s, "r": 0.1}, "results": {"acc": a}} for s, a in [(0, 1.0), (1, 3.0)]]
    rows.append({"params": {"seed": 0, "r": 0.5}, "results": {"acc": 7.0}})
    agg = sweep.aggregate(rows, ["acc"])
    assert agg[0] == {"params": {"r": 0.1}, "acc": {"mean": 2.0, "std": 2 ** 0.5, "n": 2}}
    assert agg[1] == {"params": {"r": 0.5}, "acc": {"mean": 7.0, "std": 0.0, "n": 1}}


def test_local_cluster_grid_rerun_failure_and_summary(nb, tmp_path, local_client):
    sw = sweep.load_sweep(spec(nb), tmp_path / "out")
    s = sweep.run_sweep(sw, local_client, progress=False)
    assert s["n_complete"] == 4 and not s["failed"] and s["skipped"] == 0
    by_id = {r["id"]: r["results"]["score"] for r in s["rows"]}
    assert by_id == {"scale=1.0,seed=0": 1.0, "scale=2.0,seed=0": 2.0, "scale=1.0,seed=1": 2.0,
                     "scale=2.0,seed=1": 4.0}
    agg = {a["params"]["scale"]: a["score"] for a in s["aggregate"]}
    assert agg[1.0]["mean"] == 1.5 and agg[2.0]["mean"] == 3.0 and agg[2.0]["n"] == 2
    assert (sw.root / "scale=1.0,seed=0" / "97_sweepy.ipynb").is_file()
    assert (sw.root / "summary.csv").read_text().splitlines()[0].startswith("id,scale,seed,")
    assert sweep.load_summary(sw.root)["aggregate"] == s["aggregate"]
    # rerun: everything skipped
    s2 = sweep.run_sweep(sw, local_client, progress=False)
    assert s2["skipped"] == 4 and s2["ran"] == [] and s2["n_complete"] == 4
    # a bad value fails one combination; the others complete and the failure names the cell error
    sw3 = sweep.load_sweep(spec(nb, name="bad", grid={"seed": [0, 1], "scale": [1.0, -1.0]}), tmp_path / "out")
    s3 = sweep.run_sweep(sw3, local_client, progress=False)
    assert s3["n_complete"] == 2 and len(s3["failed"]) == 2
    assert all("scale must be positive" in f["error"] for f in s3["failed"])
    for f in s3["failed"]:  # the partly executed notebook stays in the combination's own folder
        assert Path(f["notebook"]).is_file() and Path(f["notebook"]).parent == sw3.root / f["id"] / "failed"
    assert not (sweep.workbook.ROOT / "runs" / "failed" / nb.name).exists()
    # a folder of a different grid is refused, naming the parameters
    with pytest.raises(SystemExit, match="different sweep.*parameters"):
        other = sweep.load_sweep({"name": "t", "notebook": str(nb), "grid": {"sleep": [0.0]}}, tmp_path / "out")
        sweep.run_sweep(other, local_client, progress=False)
    assert s2["n_complete"] == 4 and sweep.load_summary(sw.root)["n_complete"] == 4


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_scheduler_is_a_clear_error_fast():
    t0 = time.perf_counter()
    with pytest.raises(SystemExit, match="Cannot reach the Dask scheduler"):
        sweep.make_client(scheduler=f"tcp://127.0.0.1:{free_port()}")
    assert time.perf_counter() - t0 < 5


def test_real_scheduler_and_worker_processes(nb, tmp_path):
    port = free_port()
    procs = []
    try:
        procs.append(subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                       "--dashboard-address", ":0"], start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        addr = f"tcp://127.0.0.1:{port}"
        for _ in range(2):
            procs.append(subprocess.Popen([str(BIN / "dask"), "worker", addr, "--nthreads", "1",
                                           "--host", "127.0.0.1"], start_new_session=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, "scheduler did not start"
                time.sleep(0.3)
        client, cluster = sweep.make_client(scheduler=addr)
        try:
            client.wait_for_workers(2, timeout=30)
            sw = sweep.load_sweep(spec(nb, grid={"seed": [0, 1], "scale": [1.0, 2.0, ], "sleep": [3.0]}),
                                  tmp_path / "out")
            # kill one worker (its whole process group) while tasks run; Dask reschedules its task
            import threading

            def killer():  # once both workers have started a combination (each runs one at a time), mid-run
                end = time.time() + 60
                while len(list(sw.root.glob("*/attempts.log"))) < 2 and time.time() < end:
                    time.sleep(0.1)
                time.sleep(1.0)
                os.killpg(procs[1].pid, signal.SIGKILL)

            threading.Thread(target=killer, daemon=True).start()
            s = sweep.run_sweep(sw, client, progress=False)
            assert s["n_complete"] == 4 and not s["failed"]
            starts = 0
            for combo in sw.runs:
                folder = sw.root / sweep.run_id(combo)
                assert (folder / "results" / "97_sweepy.json").is_file()
                events = [line.split()[0] for line in (folder / "attempts.log").read_text().splitlines()]
                assert events.count("done") == 1, (folder.name, events)  # published by exactly one attempt
                assert events[-1] == "done"
                starts += events.count("start")
                assert not list(folder.glob("results/.staging-*"))  # no half-written results left behind
            assert starts > 4  # the kill interrupted a running combination, which Dask ran again
        finally:
            client.close()
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def test_cli_sweep_runs_and_refuses_unknown_key(nb, tmp_path):
    import yaml

    good = tmp_path / "s.yaml"
    good.write_text(yaml.safe_dump({"name": "cli", "notebook": str(nb), "grid": {"seed": [3]}, "aggregate": ["score"]}))
    r = subprocess.run([sys.executable, "-m", "pruning_lab", "sweep", str(good), "--workers", "1",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "1/1 complete" in r.stdout
    assert sweep.load_summary(tmp_path / "o" / "cli")["rows"][0]["results"]["score"] == 4.0
    bad = tmp_path / "b.yaml"
    bad.write_text(yaml.safe_dump({"name": "cli2", "notebook": str(nb), "grid": {"sede": [3]}}))
    r = subprocess.run([sys.executable, "-m", "pruning_lab", "sweep", str(bad),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "no parameter named 'sede'" in r.stderr
    assert not (tmp_path / "o" / "cli2").exists()


def test_sweep_names_are_plain_and_bad_files_are_one_line(nb, tmp_path):
    for bad in ("..", ".", "a/b", "-x", ".hidden", "two words"):
        with pytest.raises(SystemExit, match="must be a plain name"):
            sweep.load_sweep(spec(nb, name=bad), tmp_path / "out")
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"name: t\nnotebook: {nb}\ngrid: {{seed: [0, 1}}\n")
    with pytest.raises(SystemExit) as err:
        sweep.load_sweep(str(broken), tmp_path / "out")
    assert str(err.value).startswith(f"{broken}:3:") and "\n" not in str(err.value)
    with pytest.raises(SystemExit, match="No sweep 'lottery-5seed': .* lottery-5seeds-paper, lottery-5seeds-smoke"):
        sweep.load_sweep("lottery-5seed", tmp_path / "out")
    with pytest.raises(SystemExit, match=f"No sweep file nope.yaml: {Path.cwd() / 'nope.yaml'} does not exist"):
        sweep.load_sweep("nope.yaml", tmp_path / "out")
    with pytest.raises(SystemExit, match=r"the sweep grid: scale='2' is not allowed; 97_sweepy.ipynb takes a number"):
        sweep.load_sweep(spec(nb, grid={"scale": ["2"]}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def one_run(nb, out, client, **kw):
    sw = sweep.load_sweep({"name": "ident", "notebook": str(nb), "grid": {"seed": [1]}, **kw}, out)
    return sw, sweep.run_sweep(sw, client, progress=False)


def test_a_changed_base_params_file_reruns_the_run(nb, tmp_path, local_client):
    base = tmp_path / "base.yaml"
    base.write_text("scale: 2.0\n")
    sw, s = one_run(nb, tmp_path / "out", local_client, params=str(base))
    assert s["ran"] == ["seed=1"] and s["rows"][0]["results"]["score"] == 4.0
    assert one_run(nb, tmp_path / "out", local_client, params=str(base))[1]["skipped"] == 1  # unchanged: reused
    base.write_text("scale: 3.0\n")  # the same file name, another value: before, "1/1 complete (1 skipped)"
    sw, s = one_run(nb, tmp_path / "out", local_client, params=str(base))
    assert s["changed"] == ["seed=1"] and s["ran"] == ["seed=1"] and s["skipped"] == 0
    assert s["rows"][0]["results"]["score"] == 6.0 and s["rows"][0]["identity"] == sw.identity({"seed": 1})["sha256"]
    assert sweep.load_summary(sw.root)["rows"][0]["results"]["score"] == 6.0


def test_a_changed_smoke_yaml_reruns_the_run(tmp_path, local_client, monkeypatch):
    notebooks = tmp_path / "notebooks"
    (notebooks / "params").mkdir(parents=True)
    nb = make_notebook(notebooks / "97_sweepy.ipynb")
    monkeypatch.setattr(workbook, "NOTEBOOKS", notebooks)  # "smoke" = notebooks/params/97_sweepy.smoke.yaml
    smoke = notebooks / "params" / "97_sweepy.smoke.yaml"
    smoke.write_text("scale: 0.5\n")
    sw, s = one_run(nb, tmp_path / "out", local_client, params="smoke")
    assert s["rows"][0]["results"]["score"] == 1.0
    smoke.write_text("# edited\nscale: 0.25\n")
    sw, s = one_run(nb, tmp_path / "out", local_client, params="smoke")
    assert s["changed"] == ["seed=1"] and s["rows"][0]["results"]["score"] == 0.5
    smoke.write_text("# only a comment changed\nscale: 0.25\n")  # the same values: the same identity
    assert one_run(nb, tmp_path / "out", local_client, params="smoke")[1]["skipped"] == 1


def test_changed_notebook_code_reruns_and_the_summary_never_mixes_identities(nb, tmp_path, local_client):
    import nbformat

    sw, s = one_run(nb, tmp_path / "out", local_client)
    assert s["rows"][0]["results"]["score"] == 2.0
    book = nbformat.read(nb, as_version=4)
    book.cells[-1].source = book.cells[-1].source.replace("(seed + 1) * scale", "10 * (seed + 1) * scale")
    book.cells.insert(1, nbformat.v4.new_markdown_cell("Prose changes nothing."))
    nbformat.write(book, nb)
    sw, s = one_run(nb, tmp_path / "out", local_client)
    assert s["changed"] == ["seed=1"] and s["rows"][0]["results"]["score"] == 20.0
    book.cells[1].source = "Other prose: still the same identity."
    nbformat.write(book, nb)
    assert one_run(nb, tmp_path / "out", local_client)[1]["skipped"] == 1
    book.cells[-1].source = "raise RuntimeError('broken edit')"
    nbformat.write(book, nb)
    sw, s = one_run(nb, tmp_path / "out", local_client)  # the rerun fails: its old results stay on disk ...
    assert len(s["failed"]) == 1 and "broken edit" in s["failed"][0]["error"]
    assert sweep.result_path(sw, {"seed": 1}).is_file()
    summary = sweep.load_summary(sw.root)  # ... but are not this notebook's: never in the summary
    assert summary["n_complete"] == 0 and summary["rows"] == [] and summary["stale"] == ["seed=1"]
    assert summary["code_sha256"] == workbook.code_sha256(nb)


@pytest.mark.parametrize("name", ["lottery-5seeds-paper", "lottery-5seeds-smoke", "structured-llama7b-paper"])
def test_committed_sweep_files_load(name, tmp_path):
    sw = sweep.load_sweep(name, tmp_path)
    assert len(sw.runs) in (5, 16) and sw.name == name
