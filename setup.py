"""Package discovery only (metadata lives in pyproject.toml). Packages are found, never listed, so a new subpackage of
pld_pipeline/ or cli/ cannot be left out of the wheel; tests/test_packaging.py checks a built wheel against the tree.

The Typer app lives in ./cli but installs as `pld_pipeline_cli`: a bare top-level `cli` package would clash with
other projects'.
"""
from setuptools import find_packages, setup

LIBRARY = find_packages(include=["pld_pipeline", "pld_pipeline.*"])
CLI = ["pld_pipeline_cli" + name[len("cli"):] for name in find_packages(include=["cli", "cli.*"])]

setup(packages=LIBRARY + CLI, package_dir={"pld_pipeline_cli": "cli"})
