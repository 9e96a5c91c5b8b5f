"""vLLM serves vera-kernels adapter files by name: a LoRA resolver plugin.

vLLM asks its LoRA resolvers (``vllm.lora.resolver.LoRAResolver``) for a model name it does not know when
runtime LoRA loading is on (``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``); this one answers a name ``NAME`` for
which ``$VERA_KERNELS_VLLM_ADAPTERS/NAME.safetensors`` (an adapter file, ``save_adapter``) exists, with its
exact LoRA directory (``lora_export.cached_export``: generated on first use under ``$VERA_KERNELS_VLLM_LORA_CACHE``,
default ``~/.cache/vera-kernels/vllm-lora``, and found there afterwards).

The package registers it through the ``vllm.general_plugins`` entry point, which vLLM loads in each of its
processes; it does nothing where ``VERA_KERNELS_VLLM_ADAPTERS`` is unset. Serve with::

    VERA_KERNELS_VLLM_ADAPTERS=/srv/adapters VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 \\
        vllm serve MODEL_DIR --enable-lora --max-lora-rank R

and request ``"model": "NAME"``. vLLM's ``--max-lora-rank`` must be at least the adapters' rank, and it
serves no trained biases (it refuses such adapters when it loads them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re

ADAPTERS_ENV = "VERA_KERNELS_VLLM_ADAPTERS"
CACHE_ENV = "VERA_KERNELS_VLLM_LORA_CACHE"
RESOLVER_NAME = "vera-kernels adapter files"
# An adapter name is a file name in the adapter directory, nothing that walks out of it.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

logger = logging.getLogger(__name__)


def adapter_path(adapter_dir: str, lora_name: str) -> str | None:
    """The adapter file a request for ``lora_name`` means, or None: not a plain name, or no such file."""
    if not isinstance(lora_name, str) or not _NAME.fullmatch(lora_name) or ".." in lora_name:
        return None
    path = os.path.join(adapter_dir, lora_name + ".safetensors")
    return path if os.path.isfile(path) else None


def _resolver_class():
    # vLLM is imported only here: the module stays importable where vLLM is not installed.
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    from .lora_export import cached_export

    class VeRAAdapterResolver(LoRAResolver):
        """Answers ``NAME`` with the exact LoRA of ``adapter_dir/NAME.safetensors`` for the served base model."""

        def __init__(self, adapter_dir: str, cache_dir: str):
            self.adapter_dir, self.cache_dir = adapter_dir, cache_dir

        async def resolve_lora(self, base_model_name: str, lora_name: str):
            path = adapter_path(self.adapter_dir, lora_name)
            if path is None:
                return None
            try:
                # The export reads the base model's config and the file: off the server's event loop.
                lora_dir = await asyncio.to_thread(cached_export, path, base_model_name, self.cache_dir)
            except (ValueError, TypeError, OSError, ImportError) as exc:
                # None lets the other resolvers try; the reason is in the log.
                logger.error("%s: %r can't be exported for %r: %s", RESOLVER_NAME, path, base_model_name, exc)
                return None
            lora_id = int(os.path.basename(lora_dir).rsplit("-", 1)[-1][:7], 16) + 1  # vLLM renumbers it
            return LoRARequest(lora_name=lora_name, lora_int_id=lora_id, lora_path=lora_dir)

    return VeRAAdapterResolver


def register() -> None:
    """vLLM's plugin hook (entry point group ``vllm.general_plugins``): register the resolver when
    ``VERA_KERNELS_VLLM_ADAPTERS`` names a directory; nothing when it is unset."""
    adapter_dir = os.environ.get(ADAPTERS_ENV)
    if not adapter_dir:
        return
    if not os.path.isdir(adapter_dir):
        raise ValueError(f"{ADAPTERS_ENV}={adapter_dir!r} is not a directory (of adapter files NAME.safetensors)")
    cache_dir = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "vera-kernels", "vllm-lora")
    from vllm.lora.resolver import LoRAResolverRegistry

    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, _resolver_class()(adapter_dir, cache_dir))
