import os

import pytest
import torch

# Triton runs on CPU tensors only under its interpreter, which is chosen when a kernel is decorated:
# set it before any test imports vera_kernels.triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def backend_params(*names):
    """pytest params for the backends named, each skipped with its reason where it can't run on DEVICE."""
    from vera_kernels import backends

    params = []
    for name in names or ("torch", "triton", "cpu", "cuda"):
        status = backends()[name]
        runnable = status.available and torch.device(DEVICE).type in status.devices
        reason = status.reason if not status.available else f"{name} does not run on {DEVICE}"
        params.append(pytest.param(name, id=name, marks=() if runnable else pytest.mark.skip(reason=reason)))
    return params
