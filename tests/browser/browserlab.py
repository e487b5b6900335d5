"""What the browser tests share: Debian's Chromium, screenshots of every step, and a JupyterLab server.

Nothing here downloads a browser: Playwright launches ``/usr/bin/chromium`` (or ``$PRUNING_LAB_CHROMIUM``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("PRUNING_LAB_CHROMIUM", "/usr/bin/chromium")
# Chromium's own calls home are refused on a closed network, many at a time: switch them off
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def require_chromium(path: str | Path = CHROMIUM) -> None:
    """Fail (never skip) with the one command that installs Chromium when it is not there."""
    if not Path(path).is_file():
        pytest.fail(f"No Chromium at {path}: install Debian's with `sudo apt-get install -y chromium` "
                    "(./lab setup does it when apt is available), or point PRUNING_LAB_CHROMIUM at a Chromium.",
                    pytrace=False)


class Shots:
    """Numbered screenshots of each step in the test's folder; ``step()`` adds the last one's path to a failure."""

    def __init__(self, folder: Path):
        self.folder, self.n = folder, 0
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, page, name: str) -> Path:
        self.n += 1
        path = self.folder / f"{self.n:02d}_{name}.png"
        page.screenshot(path=str(path), full_page=False)
        return path

    @contextmanager
    def step(self, page, name: str):
        try:
            yield
        except Exception as e:  # noqa: BLE001 - any failure gets the picture of what the browser showed
            try:
                path = self(page, f"FAILED_{name}")
            except Exception as shot_error:  # noqa: BLE001
                path = f"(no screenshot: {shot_error})"
            raise AssertionError(f"{name}: {type(e).__name__}: {e}\nscreenshot: {path}\nall steps: {self.folder}") from e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(folder: Path) -> None:
    """User settings for the test's JupyterLab: no news toast, every cell in the DOM (no windowing), and no
    autosave (a save during a long run would look like the one the test asked for)."""
    for plugin, values in {"@jupyterlab/apputils-extension/notification": {"fetchNews": "false",
                                                                           "checkForUpdates": False},
                           "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
                           "@jupyterlab/docmanager-extension/plugin": {"autosave": False}}.items():
        path = folder / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


class Lab:
    """A running JupyterLab: ``url(path)`` with the token, ``root`` the folder it serves."""

    def __init__(self, root: Path, port: int, token: str, log: Path, pid: int = 0):
        self.root, self.port, self.token, self.log, self.pid = root, port, token, log, pid

    def url(self, path: str = "lab") -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def open_url(self, notebook: str) -> str:
        """The notebook alone in a new, empty workspace (no tabs restored from an earlier test)."""
        return self.url(f"lab/workspaces/{secrets.token_hex(4)}/tree/{notebook}") + "&reset"

    def last_modified(self, name: str) -> str:
        """When the server last wrote ``name`` (the contents API's ``last_modified``)."""
        with urllib.request.urlopen(self.url(f"api/contents/{name}") + "&content=0", timeout=30) as r:
            return json.loads(r.read())["last_modified"]

    def shutdown_kernels(self) -> None:
        """Stop every kernel the server runs (between tests: each chapter gets the cores to itself)."""
        with urllib.request.urlopen(self.url("api/kernels"), timeout=10) as r:
            kernels = json.loads(r.read())
        for k in kernels:
            urllib.request.urlopen(urllib.request.Request(self.url(f"api/kernels/{k['id']}"), method="DELETE"),
                                   timeout=30)


def _die_with_parent(parent: int):
    """For ``preexec_fn``: the child (the server) gets SIGTERM when the process that started it dies, even by
    SIGKILL (Linux's parent-death signal), and stops at once if that process is already gone. The server's
    own shutdown stops its kernels, and a kernel also exits when its server is gone (ipykernel's parent poller)."""
    def set_signal():
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # died between the fork and the prctl
            os._exit(1)
    return set_signal


@contextmanager
def running_jupyterlab(work: Path, port: int):
    """JupyterLab from the venv serving ``work/notebooks`` (a copy of the committed ones) on 127.0.0.1 with a
    token, asked for ``port`` (if that is taken it moves on to another and we read which from its runtime
    file); yields a ``Lab`` once it answers, and stops the server and its kernels when the block ends,
    also on error, and when this process is killed. Kernels record into ``work/results``, never into the
    committed ``results/``."""
    root = work / "notebooks"
    if not root.exists():
        shutil.copytree(ROOT / "notebooks", root, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "runs"))
    _settings(work / "settings")
    token = secrets.token_hex(16)
    runtime = work / "runtime"
    # the token goes through the environment (readable by this user only), never the command line (`ps` shows it)
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(work / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(work / "workspaces"), JUPYTER_RUNTIME_DIR=str(runtime),
               PRUNING_LAB_RESULTS=str(work / "results"), JUPYTER_TOKEN=token)
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--port-retries=50", f"--ServerApp.root_dir={root}",
           "--LabApp.news_url=", "--ServerApp.shutdown_no_activity_timeout=0"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # JupyterLab refuses to start as root without it
    log = work / "jupyterlab.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root,
                                start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
    lab = None
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and lab is None:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode} before answering; its log:\n"
                            + log.read_text()[-3000:], pytrace=False)
            for info in runtime.glob(f"jpserver-{proc.pid}.json"):  # the port it really took
                bound = json.loads(info.read_text())["port"]
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{bound}/api/status?token={token}", timeout=2):
                        lab = Lab(root, bound, token, log, proc.pid)
                except OSError:
                    pass
            time.sleep(0.3)
        if lab is None:
            pytest.fail("JupyterLab did not answer within 90 s; its log:\n" + log.read_text()[-3000:], pytrace=False)
        yield lab
    finally:
        if lab is not None:  # the server's own shutdown stops its kernels too
            try:
                urllib.request.urlopen(urllib.request.Request(lab.url("api/shutdown"), method="POST"), timeout=10)
                proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # whatever is left of it
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
