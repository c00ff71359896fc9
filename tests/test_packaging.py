"""The artefact users install: a wheel built from the tree holds every module, the licence and the version pld
reports. (.ci/wheel_check.sh installs that wheel into a fresh environment outside the checkout and runs pld from it.)"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import pld_pipeline
from pld_pipeline_cli.app import app

ROOT = Path(__file__).resolve().parents[1]
# Where each source folder's modules land in the wheel: cli/ installs as pld_pipeline_cli (a bare `cli` would clash).
INSTALLED_AS = {"pld_pipeline": "pld_pipeline", "cli": "pld_pipeline_cli"}


def tree_modules() -> set[str]:
    """Every module and package-data file under the source folders, as a wheel would name it."""
    names = set()
    for folder, installed in INSTALLED_AS.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".typed"):
                names.add(f"{installed}/{path.relative_to(ROOT / folder).as_posix()}")
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built the way `python -m build` builds it, from a copy of the tree (the checkout stays untouched)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "results", "pld-demo"))
    run = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist"),
                          str(src)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (built,) = (tmp / "dist").glob("*.whl")
    return built


@pytest.mark.slow
def test_a_built_wheel_holds_every_module_of_the_tree_the_licence_and_the_entry_point(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = tree_modules()
    assert {"pld_pipeline/cache/__init__.py", "pld_pipeline/py.typed", "pld_pipeline_cli/app.py"} <= expected
    assert not expected - names, f"modules of the tree missing from {wheel.name}: {sorted(expected - names)}"
    dist_info = f"pld_pipeline-{pld_pipeline.__version__}.dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(f"{dist_info}/METADATA").decode()
        entry_points = z.read(f"{dist_info}/entry_points.txt").decode()
    assert f"Version: {pld_pipeline.__version__}\n" in metadata
    assert "License-Expression: Apache-2.0\n" in metadata
    assert "pld = pld_pipeline_cli.app:main" in entry_points
    run = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(wheel)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_version_has_one_source_and_pld_version_prints_it(monkeypatch):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pld_pipeline.__version__"}
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"pld-pipeline {pld_pipeline.__version__}\n"
    monkeypatch.setattr(pld_pipeline, "__version__", "9.8.7")  # the next release: read, never written twice
    assert CliRunner().invoke(app, ["--version"]).output == "pld-pipeline 9.8.7\n"


def test_the_licence_file_is_the_one_pyproject_declares():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0, January 2004" in (ROOT / "LICENSE").read_text()


def test_ci_builds_the_wheel_and_runs_pld_from_a_fresh_environment_outside_the_checkout():
    ci = (ROOT / ".ci" / "run").read_text()
    check = (ROOT / ".ci" / "wheel_check.sh").read_text()
    assert "wheel_check.sh" in ci
    for step in ("python3 -m build", "twine check", "-m venv", 'pip install -q "$wheel"', "pld --version",
                 "pld demo --quick", "pld cache-teacher", "pld verify", "pld distill --cache"):
        assert step in check, step
