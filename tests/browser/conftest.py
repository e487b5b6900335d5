"""Fixtures of the real-browser tests (helpers in browserlab.py)."""

from __future__ import annotations

import pytest

from browserlab import CHROMIUM, FLAGS, Shots, free_port, require_chromium, running_jupyterlab


@pytest.fixture
def shots(tmp_path):
    return Shots(tmp_path / "screenshots")


@pytest.fixture(scope="session")
def browser():
    require_chromium(CHROMIUM)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory):
    """JupyterLab on a free port in a temporary copy of ``notebooks/``; stopped even when a test fails."""
    with running_jupyterlab(tmp_path_factory.mktemp("jupyterlab"), free_port()) as lab:
        yield lab
