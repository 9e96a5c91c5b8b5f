"""The README's Usage block runs as written."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def usage_block() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index("## Usage"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_usage_block_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)  # it writes adapter.safetensors
    exec(compile(usage_block(), "README.md (Usage)", "exec"), {"__name__": "readme_usage"})
    assert (tmp_path / "adapter.safetensors").exists()
    out = capsys.readouterr().out
    assert "trainable parameters" in out and "merged vs adapted" in out
