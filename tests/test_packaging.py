"""The installed distribution (issue 19): one version everywhere (the Cargo workspace, the wheel's
metadata, `pystrands.__version__`, the native module, `pystrands-broker --version`), the LICENSE
shipped with it, the project URLs and classifiers, and no test extra for users to see."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import tomllib

import pystrands
from pystrands import _core

ROOT = Path(__file__).resolve().parents[1]


def workspace_version() -> str:
    return str(tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"])


def test_one_version_from_the_cargo_workspace_to_the_command_line():
    version = workspace_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+", version) and int(version.split(".")[0]) >= 2, "newer than 1.0.0 on PyPI"
    assert importlib.metadata.version("pystrands") == version
    assert pystrands.__version__ == version
    assert _core.__version__ == version
    out = subprocess.run([sys.executable, "-m", "pystrands", "server", "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.split()[-1] == version, out


def test_the_license_and_the_metadata_ship_with_the_package():
    dist = importlib.metadata.distribution("pystrands")
    files = [str(f) for f in dist.files or []]
    license_files = [f for f in files if f.endswith("LICENSE")]
    assert license_files, files
    text = dist.locate_file(license_files[0]).read_text()
    assert "MIT License" in text and text == (ROOT / "LICENSE").read_text()
    meta = dist.metadata
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert {"Homepage", "Documentation", "Changelog", "Issues"} <= set(urls)
    classifiers = meta.get_all("Classifier") or []
    assert "Programming Language :: Python :: 3.10" in classifiers and "Typing :: Typed" in classifiers
    # The tools of the project's own tests are a dependency group, not an extra users see.
    assert "test" not in (meta.get_all("Provides-Extra") or [])
    assert meta.get("License-Expression") == "MIT" or meta.get("License") == "MIT"
