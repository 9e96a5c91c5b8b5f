"""vLLM serves the exact LoRA export: end to end on vLLM's CPU engine (fp32), against this package's model.

A tiny Llama is built from a config and saved (no download), a VeRA adapter with random lambdas is saved as
an adapter file, exported with the command line (``python -m vera_kernels.export``), and one vLLM engine,
started in vLLM's own virtualenv (``.venv-vllm``; ``VERA_KERNELS_VLLM_PYTHON`` names another interpreter), serves
each prompt from the base, the exported directory and the adapter's name (the resolver plugin) in one batch
(tests/vllm_engine.py). Greedy tokens and top-k log-probabilities must equal ours within a tolerance taken
from measured rounding: how far the engine's base-model log-probabilities and our own fp32 ones lie from a
float64 evaluation. Skipped where that virtualenv is absent (CI builds it: .ci/run). The engine start takes
about 90 s on 2 busy cores.
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import vera_kernels  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLLM_PYTHON = os.environ.get("VERA_KERNELS_VLLM_PYTHON") or os.path.join(ROOT, ".venv-vllm", "bin", "python")
RANK = 64
TOP_K = 5
MAX_TOKENS = 8
PROMPTS = [[1, 17, 42, 99, 7, 3], [5, 250, 11, 64, 128, 200, 31, 2, 90]]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

pytestmark = pytest.mark.skipif(not os.path.exists(VLLM_PYTHON),
                                reason=f"vLLM's virtualenv is absent ({VLLM_PYTHON}; .ci/run builds it)")


def tiny_llama():
    # head_dim 32: vLLM's CPU attention takes 32, 64, 80, ... only.
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=0, eos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm")
    base_dir, adapters, lora_dir, cache = (str(tmp / n) for n in ("base", "adapters", "lora", "cache"))
    base = tiny_llama()
    base.save_pretrained(base_dir)
    ours = vera_kernels.apply_vera(copy.deepcopy(base), TARGETS, rank=RANK, seed=5)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer_name, layer in vera_kernels.vera_layers(ours):
            layer.lambda_d.copy_(torch.randn(layer.lambda_d.shape, generator=g))
            layer.lambda_b.copy_(torch.randn(layer.lambda_b.shape, generator=g))
    os.makedirs(adapters)
    vera_kernels.save_adapter(ours, os.path.join(adapters, "tiny-vera.safetensors"))
    # An adapter of another model (its layers are wider than this base's): the resolver must refuse it.
    other = vera_kernels.apply_vera(torch.nn.Sequential(torch.nn.Linear(4, 4)), ["0"], rank=4)
    vera_kernels.save_adapter(other, os.path.join(adapters, "misfit.safetensors"))
    subprocess.run([sys.executable, "-m", "vera_kernels.export", "--lora", os.path.join(adapters, "tiny-vera.safetensors"),
                    "--base", base_dir, lora_dir], check=True, cwd=ROOT, capture_output=True)

    spec = {"base": base_dir, "rank": RANK, "lora_dir": lora_dir, "adapter_name": "tiny-vera",
            "refused_names": ["no-such-adapter", "misfit", "../adapters/tiny-vera"], "prompts": PROMPTS,
            "max_tokens": MAX_TOKENS, "top_k": TOP_K}
    with open(tmp / "spec.json", "w") as f:
        json.dump(spec, f)
    # This tree's package (whichever tree .venv-vllm was installed from); only our plugin among vLLM's general
    # plugins (its own resolvers stay out of the answers); a 1 GiB KV cache; not the Triton interpreter the
    # main suite sets (vLLM's CPU engine runs no Triton).
    env = dict(os.environ, PYTHONPATH=ROOT, VERA_KERNELS_VLLM_ADAPTERS=adapters, VERA_KERNELS_VLLM_LORA_CACHE=cache,
               VLLM_CPU_KVCACHE_SPACE="1", VLLM_PLUGINS="vera_kernels_resolver", TRITON_INTERPRET="0")
    run = subprocess.run([VLLM_PYTHON, os.path.join(ROOT, "tests", "vllm_engine.py"), str(tmp / "spec.json"),
                          str(tmp / "out.json")], env=env, cwd=str(tmp), capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-8000:]
    with open(tmp / "out.json") as f:
        out = json.load(f)
    return dict(out, base=base, ours=ours, lora_dir=lora_dir, cache=cache)


def logprobs_along(model, prompt, tokens, dtype=torch.float32):
    """log-softmax of the model's next-token logits at each generated position, teacher-forced along tokens."""
    ids = torch.tensor([prompt + tokens[:-1]])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:].to(dtype)
    return torch.log_softmax(logits, dim=-1)


def worst(result, reference):
    """Largest |vLLM log-prob - reference| over every step's top-k entries."""
    return max(abs(lp - reference[step, int(token)].item())
               for step, entries in enumerate(result["logprobs"]) for token, lp in entries.items())


def measured_tolerance(served):
    """From measured rounding: the engine's base-model error and our fp32 adapted-model error, both against
    float64 evaluations of the same models, times a margin for the two adding up and differing per step."""
    base64, ours64 = copy.deepcopy(served["base"]).double(), copy.deepcopy(served["ours"]).double()
    engine = max(worst(served["results"][f"base-{i}"], logprobs_along(base64, p, served["results"][f"base-{i}"]["tokens"],
                                                                        torch.float64))
                 for i, p in enumerate(PROMPTS))
    ours = 0.0
    for i, p in enumerate(PROMPTS):
        tokens = served["results"][f"exported-{i}"]["tokens"]
        ours = max(ours, (logprobs_along(served["ours"], p, tokens).double()
                          - logprobs_along(ours64, p, tokens, torch.float64)).abs().max().item())
    return 4 * max(engine, ours), engine, ours


@pytest.mark.parametrize("kind", ["exported", "resolved"])
def test_vllm_serves_the_export_as_our_model(served, kind):
    tol, engine_error, our_error = measured_tolerance(served)
    assert 0 < tol < 1e-4, (engine_error, our_error)
    for i, prompt in enumerate(PROMPTS):
        result = served["results"][f"{kind}-{i}"]
        tokens = result["tokens"]
        assert len(tokens) == MAX_TOKENS and all(len(step) >= TOP_K for step in result["logprobs"])
        ours = logprobs_along(served["ours"], prompt, tokens)
        # Greedy: each token is our argmax, by a margin the rounding can't flip.
        top2 = ours.topk(2, dim=-1)
        assert tokens == top2.indices[:, 0].tolist()
        assert (top2.values[:, 0] - top2.values[:, 1]).min() > 2 * tol
        assert worst(result, ours) <= tol, (worst(result, ours), tol)
        # The adapter matters: the base model's log-probabilities along the same tokens are far off.
        assert worst(result, logprobs_along(served["base"], prompt, tokens)) > 1000 * tol


def test_vllm_base_rows_are_the_base_model(served):
    # The base rows of the same batch: the engine's LoRA machinery leaves them alone.
    tol, _, _ = measured_tolerance(served)
    for i, prompt in enumerate(PROMPTS):
        result = served["results"][f"base-{i}"]
        reference = logprobs_along(served["base"], prompt, result["tokens"])
        assert result["tokens"] == reference.argmax(dim=-1).tolist()
        assert worst(result, reference) <= tol


def test_the_resolver_answers_only_its_files(served):
    # vLLM answers 404 (no resolver knows the name) for a missing file, a file that does not fit the base
    # (the resolver logs why) and a name that would walk out of the adapter directory.
    assert served["refused"] == {"no-such-adapter": 404, "misfit": 404, "../adapters/tiny-vera": 404}


def test_one_batch_and_the_resolver_cache(served):
    # Every request was first scheduled in the same engine step (one timestamp per step).
    stamps = {r["scheduled_ts"] for r in served["results"].values()}
    assert len(stamps) == 1 and None not in stamps, stamps
    # The resolver's directory is in its cache, and is what the command line writes.
    resolved = served["resolved_path"]
    assert os.path.dirname(resolved) == served["cache"]
    from safetensors.torch import load_file

    a = load_file(os.path.join(resolved, "adapter_model.safetensors"))
    b = load_file(os.path.join(served["lora_dir"], "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
