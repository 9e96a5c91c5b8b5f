"""docs/API.md is what `python docs/build_api.py` makes of today's docstrings: it cannot rot unnoticed."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build_api():
    spec = importlib.util.spec_from_file_location("build_api", os.path.join(ROOT, "docs", "build_api.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_page_matches_the_docstrings():
    pytest.importorskip("triton")  # the page documents vera_kernels.triton too
    build_api = _build_api()
    with open(build_api.API_MD, encoding="utf-8") as f:
        committed = f.read()
    assert committed == build_api.render(), "docs/API.md is out of date: run `python docs/build_api.py`"


def test_every_public_name_is_documented():
    import vera_kernels

    with open(os.path.join(ROOT, "docs", "API.md"), encoding="utf-8") as f:
        page = f.read()
    missing = [name for name in vera_kernels.__all__ if f"### `vera_kernels.{name}`" not in page]
    assert not missing, f"not in docs/API.md: {missing}"
