"""The vLLM side of tests/test_vllm.py, run by it in vLLM's own virtualenv (.venv-vllm): one CPU engine start.

    python tests/vllm_engine.py SPEC.json OUT.json

SPEC: {"base": model dir, "rank": r, "lora_dir": an exported LoRA directory, "adapter_name": a name the
vera-kernels resolver answers (its plugin registered by vLLM from the package's entry point, with
VERA_KERNELS_VLLM_ADAPTERS set by the caller), "refused_names": names it must not answer, "prompts":
[[token ids]], "max_tokens": n, "top_k": k}.

The engine (fp32, LoRA on) resolves the name through vLLM's own serving path (OpenAIServingModels.resolve_lora,
what the OpenAI server calls for an unknown model name), then serves every prompt three ways - the base, the
exported directory, the resolved name - in one batch: the engine is paused while the requests are queued,
and each request's scheduling timestamp is reported so the caller can check they were scheduled in one step.
OUT: greedy tokens and the top-k log-probabilities of every step of every request, and the HTTP status
vLLM gives each refused name. No assertion here: the caller compares with vera-kernels' own model.
"""

import asyncio
import json
import os
import sys
import time


async def serve(spec):
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.openai.models.protocol import BaseModelPath
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    t0 = time.monotonic()
    # max_loras 3 for 2 adapters: vLLM 0.32's CPU LoRA ops (torch_ops/lora_ops.py) gather the rows without an
    # adapter (index -1) from the last slot, so a base row beside LoRA rows gets the last slot's adapter when
    # it holds one (vllm-project/vllm PR #48421); an empty last slot is zeros.
    args = AsyncEngineArgs(model=spec["base"], dtype="float32", enable_lora=True, max_lora_rank=spec["rank"],
                           max_loras=3, max_model_len=64, max_num_seqs=8, skip_tokenizer_init=True,
                           enforce_eager=True, seed=0)
    engine = AsyncLLM.from_engine_args(args)
    started = time.monotonic() - t0
    try:
        models = OpenAIServingModels(engine, [BaseModelPath(name="base", model_path=spec["base"])])
        resolved = await models.resolve_lora(spec["adapter_name"])
        if not isinstance(resolved, LoRARequest):
            raise RuntimeError(f"the resolver did not answer {spec['adapter_name']!r}: {resolved}")
        # Names the resolver must not answer: no such file, and a file that does not fit the base (logged).
        refused = {name: getattr(await models.resolve_lora(name), "error", None) for name in spec["refused_names"]}
        exported = LoRARequest(lora_name="exported", lora_int_id=resolved.lora_int_id + 1, lora_path=spec["lora_dir"])
        sampling = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, logprobs=spec["top_k"],
                                  detokenize=False)

        async def one(request_id, prompt, lora):
            final = None
            async for out in engine.generate({"prompt_token_ids": prompt}, sampling, request_id, lora_request=lora):
                final = out
            completion = final.outputs[0]
            return {
                "tokens": list(completion.token_ids),
                "logprobs": [{str(token): lp.logprob for token, lp in step.items()} for step in completion.logprobs],
                "scheduled_ts": getattr(final.metrics, "scheduled_ts", None),
            }

        await engine.pause_generation(mode="keep")
        tasks = {}
        for i, prompt in enumerate(spec["prompts"]):
            for kind, lora in (("base", None), ("exported", exported), ("resolved", resolved)):
                tasks[f"{kind}-{i}"] = asyncio.create_task(one(f"{kind}-{i}", prompt, lora))
        await asyncio.sleep(1.0)  # every request reaches the engine's queue before it runs again
        await engine.resume_generation()
        results = {key: await task for key, task in tasks.items()}
        return {"engine_start_s": started, "resolved_path": resolved.lora_path, "results": results,
                "refused": {name: None if error is None else error.code for name, error in refused.items()}}
    finally:
        engine.shutdown()


def main(spec_path, out_path):
    with open(spec_path) as f:
        spec = json.load(f)
    out = asyncio.run(serve(spec))
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
    os._exit(0)  # vLLM's engine processes and threads are gone; don't wait on interpreter teardown
