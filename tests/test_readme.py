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


def quick_start_block() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index("## Quick start"):readme.index("## Supported hardware")]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quick_start_runs_with_a_small_gpt2(tmp_path, monkeypatch):
    # The quick start as written, with two substitutions only: a 2-block GPT-2 built from a config (the same
    # weights at every call, as from_pretrained gives) in place of the download, and this machine's device.
    transformers = pytest.importorskip("transformers")
    import torch

    code = quick_start_block()
    download = 'AutoModelForCausalLM.from_pretrained("gpt2")'
    assert code.count(download) == 1 and code.count('"cuda"') == 2
    code = code.replace(download, "small_gpt2()")
    if not torch.cuda.is_available():
        code = code.replace('"cuda"', '"cpu"')

    def small_gpt2():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100,
                                                                    n_positions=128))

    monkeypatch.chdir(tmp_path)  # it writes adapter.safetensors
    scope = {"__name__": "readme_quick_start", "small_gpt2": small_gpt2}
    exec(compile(code, "README.md (Quick start)", "exec"), scope)
    model, tuned = scope["model"].eval(), scope["tuned"].eval()
    assert any(p.requires_grad and p.abs().sum() > 0 for n, p in model.named_parameters() if "lambda_b" in n)
    with torch.no_grad():
        assert torch.equal(tuned(scope["batch"]).logits, model(scope["batch"]).logits)
