"""The CUDA decode kernels' per-lane work, run on the CPU: tests/cpp/test_decode.cpp compiled and run here
(CI also runs it through CMake's ctest), so that `pytest tests` checks the vector indexing without a GPU."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_decode_lanes(tmp_path):
    binary = tmp_path / "test_decode"
    subprocess.run([CXX, "-std=c++17", "-O1", "-Wall", "-Werror", "-I", os.path.join(ROOT, "csrc"),
                    os.path.join(ROOT, "tests", "cpp", "test_decode.cpp"), "-o", str(binary)],
                   check=True, capture_output=True, text=True, timeout=300)
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all passed" in result.stdout
