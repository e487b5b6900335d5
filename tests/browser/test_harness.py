"""The browser tests' own bad input: no Chromium fails with the install command; a port in use is avoided."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from browserlab import require_chromium, running_jupyterlab


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
