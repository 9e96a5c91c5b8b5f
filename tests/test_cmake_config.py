"""The README's CMake command configures the extension as written: a relative -DPython_EXECUTABLE is
resolved, and a Python that cannot give Torch is an error, not a silent build of the unit test alone.
(Configure only: CI builds and runs the CMake targets.)"""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMAKE = shutil.which("cmake")


def _cmake_version():
    out = subprocess.run([CMAKE, "--version"], capture_output=True, text=True).stdout.split()
    return tuple(int(part) for part in out[2].split(".")[:2])


pytestmark = pytest.mark.skipif(CMAKE is None or _cmake_version() < (3, 25), reason="needs cmake >= 3.25")


def configure(tmp_path, python):
    # From the repository root, as the README's command runs.
    result = subprocess.run([CMAKE, "-S", ".", "-B", str(tmp_path / "build"), f"-DPython_EXECUTABLE={python}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    result.errors = " ".join(result.stderr.split())  # CMake wraps its messages
    return result


def test_relative_python_executable_finds_torch(tmp_path):
    try:
        python = os.path.relpath(sys.executable, ROOT)  # e.g. .venv/bin/python; not resolved through symlinks
    except ValueError:
        pytest.skip("the interpreter is on another drive than the repository")
    result = configure(tmp_path, python)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Torch not found" not in result.stdout
    assert os.path.exists(tmp_path / "build" / "Makefile") or os.path.exists(tmp_path / "build" / "build.ninja")
    cache = (tmp_path / "build" / "CMakeCache.txt").read_text()
    assert f"Python_EXECUTABLE:FILEPATH={os.path.join(ROOT, python)}" in cache


def test_missing_python_executable_fails_loudly(tmp_path):
    result = configure(tmp_path, "no/such/python")
    assert result.returncode != 0
    assert "Python_EXECUTABLE=no/such/python: no such file" in result.errors


def test_python_without_torch_fails_loudly(tmp_path):
    # A Python that cannot import torch: this interpreter with torch hidden behind a failing import hook.
    fake = tmp_path / "python-without-torch"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    fake.chmod(0o755)
    check = subprocess.run([str(fake), "-c", "import torch"], capture_output=True)
    if check.returncode == 0:
        pytest.skip("torch is importable even without site-packages here")
    result = configure(tmp_path, str(fake))
    assert result.returncode != 0
    assert "Torch not found through Python_EXECUTABLE" in result.errors
