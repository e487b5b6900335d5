"""The browser tests' own harness: no Chromium fails with the install command; a port in use is avoided; the
server's token is not on its command line; a killed test run leaves no server or kernel behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from browserlab import free_port, require_chromium, running_jupyterlab


def test_no_chromium_fails_and_says_how_to_install_it(tmp_path):
    with pytest.raises(pytest.fail.Exception, match=r"sudo apt-get install -y chromium"):
        require_chromium(tmp_path / "no-chromium-here")


def test_a_port_in_use_is_avoided_and_the_server_is_stopped_after(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with running_jupyterlab(tmp_path, port) as lab:
            assert lab.port != port
            with urllib.request.urlopen(lab.url("api/status"), timeout=5) as r:
                assert r.status == 200
        with pytest.raises(OSError):  # stopped: nothing answers there any more
            urllib.request.urlopen(lab.url("api/status"), timeout=5)


def test_the_token_is_not_on_the_command_line(tmp_path):
    import psutil

    with running_jupyterlab(tmp_path, free_port()) as lab:
        server = psutil.Process(lab.pid)
        for proc in [server, *server.children(recursive=True)]:
            assert lab.token not in " ".join(proc.cmdline()), proc.cmdline()  # what `ps` shows every user


KILLED_RUN = """
import json, sys, time, urllib.request
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from browserlab import free_port, running_jupyterlab
with running_jupyterlab(Path(sys.argv[1]), free_port()) as lab:
    req = urllib.request.Request(lab.url("api/kernels"), data=json.dumps({"name": "pruning-lab"}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=120).read()
    print(json.dumps({"server": lab.pid}), flush=True)
    time.sleep(600)
"""


def gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_killed_test_run_leaves_no_server_or_kernel_behind(tmp_path):
    import psutil

    run = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path), str(Path(__file__).parent)],
                           stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        server = json.loads(run.stdout.readline())["server"]
        deadline = time.monotonic() + 120
        kernels = []
        while not kernels and time.monotonic() < deadline:
            kernels = [p.pid for p in psutil.Process(server).children(recursive=True)
                       if "ipykernel" in " ".join(p.cmdline())]
            time.sleep(0.5)
        assert kernels, "the kernel did not start"
    finally:
        run.send_signal(signal.SIGKILL)  # no finally, no atexit: what a killed pytest leaves
        run.wait()
    deadline = time.monotonic() + 60
    while not all(gone(pid) for pid in [server, *kernels]) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [pid for pid in [server, *kernels] if not gone(pid)]
    for pid in left:  # do not leave them running for the next test either
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running after the test process was killed: {left} (server {server}, kernels {kernels})"
