"""The Triton ops are public (``torch.ops.vera_kernels.triton_forward``, ``triton_backward``,
``triton_forward_multi``): called directly, each refuses a bad argument with an error that names it, before
any launch, as the C++ ops do. Ids out of range (up to 2**40) are refused, never read.

The table runs in a subprocess (this file run as a script): a call that reads outside a tensor may crash the
process, and then the test fails instead of pytest dying. On CUDA each id-range case runs alone (the
device-side assert loses the CUDA context).
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

if __name__ != "__main__":
    from conftest import DEVICE, backend_params

    pytestmark = pytest.mark.parametrize("backend", backend_params("triton"))
else:
    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

M, IN, OUT, RANK, ADAPTERS = 5, 12, 10, 4, 2


def _t(*shape, dtype=torch.float32, device=None):
    return torch.randn(*shape, dtype=dtype, device=device or DEVICE)


def _forward():
    return dict(x=_t(M, IN), weight=_t(OUT, IN), bias=_t(OUT), A=_t(RANK, IN), B=_t(OUT, RANK), lambda_d=_t(RANK),
                lambda_b=_t(OUT), base_out=None, seed=0, max_in=0)


def _on_the_fly():
    return {**_forward(), "A": None, "B": None, "seed": 3, "max_in": IN}


def _backward():
    return dict(grad=_t(M, OUT), s=_t(M, RANK), weight=_t(OUT, IN), A=_t(RANK, IN), B=_t(OUT, RANK), lambda_d=_t(RANK),
                lambda_b=_t(OUT), in_features=IN, need_dx=True, need_dd=True, need_db=True, need_dbias=True, seed=0,
                max_in=0)


def _multi():
    return dict(x=_t(M, IN), weight=_t(OUT, IN), bias=_t(OUT), A=_t(RANK, IN), B=_t(OUT, RANK),
                lambda_d_bank=_t(ADAPTERS, RANK), lambda_b_bank=_t(ADAPTERS, OUT),
                adapter_ids=torch.tensor([0, 1, -1, 1, 0], device=DEVICE), base_out=None)


def _ids(*values):
    return torch.tensor(values, dtype=torch.int64, device=DEVICE)


# name -> (op, good arguments, change, pattern the error must match). Built lazily (on the subprocess's device).
def _cases():
    # Not here: tensors on another device (a call with a meta tensor dispatches to the fake kernel, which
    # computes shapes only; CPU-only CI has no second device), inputs that require grad in the multi op
    # (it has no autograd: the output does not require grad).
    return {
        # triton_forward
        "forward x 3-D": ("triton_forward", _forward, dict(x=_t(1, M, IN)), "x: expected a 2-D tensor"),
        "forward x float64": ("triton_forward", _forward, dict(x=_t(M, IN, dtype=torch.float64)), "x: expected dtype"),
        "forward x int": ("triton_forward", _forward, dict(x=torch.ones(M, IN, dtype=torch.int32, device=DEVICE)),
                          "x: expected dtype"),
        "forward x sparse": ("triton_forward", _forward, dict(x=_t(M, IN).to_sparse()), "x: expected a dense"),
        "forward A in_features": ("triton_forward", _forward, dict(A=_t(RANK, IN + 1)), "A: expected shape"),
        "forward A 1-D": ("triton_forward", _forward, dict(A=_t(IN)), "A: expected shape"),
        "forward A alone": ("triton_forward", _forward, dict(B=None), "A, B: expected both"),
        "forward B rank": ("triton_forward", _forward, dict(B=_t(OUT, RANK - 1)), "B: expected shape"),
        "forward B rows": ("triton_forward", _forward, dict(B=_t(OUT - 1, RANK)), "weight: expected shape"),
        "forward weight shape": ("triton_forward", _forward, dict(weight=_t(OUT, IN - 1)), "weight: expected shape"),
        "forward weight dtype": ("triton_forward", _forward, dict(weight=_t(OUT, IN, dtype=torch.bfloat16)),
                                 "weight: expected dtype"),
        "forward weight trains": ("triton_forward", _forward, dict(weight=_t(OUT, IN).requires_grad_()),
                                  "weight: must be frozen"),
        "forward bias shape": ("triton_forward", _forward, dict(bias=_t(OUT + 1)), "bias: expected shape"),
        "forward lambda_d shape": ("triton_forward", _forward, dict(lambda_d=_t(RANK + 1)), "lambda_d: expected shape"),
        "forward lambda_d dtype": ("triton_forward", _forward, dict(lambda_d=_t(RANK, dtype=torch.float64)),
                                   "lambda_d: expected dtype"),
        "forward lambda_b shape": ("triton_forward", _forward, dict(lambda_b=_t(OUT, 1)), "lambda_b: expected shape"),
        "forward lambda_b short": ("triton_forward", _forward, dict(lambda_b=_t(OUT - 3)), "lambda_b: expected shape"),
        "forward weight and base_out": ("triton_forward", _forward, dict(base_out=_t(M, OUT)), "exactly one"),
        "forward neither": ("triton_forward", _forward, dict(weight=None, bias=None), "exactly one"),
        "forward bias without weight": ("triton_forward", _forward, dict(weight=None, base_out=_t(M, OUT)),
                                        "bias: only allowed with weight"),
        "forward base_out shape": ("triton_forward", _forward, dict(weight=None, bias=None, base_out=_t(M, OUT - 1)),
                                   "base_out: expected shape"),
        "forward base_out rows": ("triton_forward", _forward, dict(weight=None, bias=None, base_out=_t(M - 1, OUT)),
                                  "base_out: expected shape"),
        "on-the-fly seed": ("triton_forward", _on_the_fly, dict(seed=-1), "seed"),
        "on-the-fly max_in small": ("triton_forward", _on_the_fly, dict(max_in=IN - 1), "max_in"),
        "on-the-fly max_in zero": ("triton_forward", _on_the_fly, dict(max_in=0), "max_in"),
        "on-the-fly lambda_d 2-D": ("triton_forward", _on_the_fly, dict(lambda_d=_t(RANK, 1)), "lambda_d"),
        "on-the-fly lambda_b short": ("triton_forward", _on_the_fly, dict(lambda_b=_t(OUT - 1)), "lambda_b"),
        # triton_backward
        "backward grad 1-D": ("triton_backward", _backward, dict(grad=_t(OUT)), "grad: expected a 2-D tensor"),
        "backward grad float64": ("triton_backward", _backward, dict(grad=_t(M, OUT, dtype=torch.float64)),
                                  "grad: expected dtype"),
        "backward grad columns": ("triton_backward", _backward, dict(grad=_t(M, OUT + 2)), "shape"),
        "backward s rows": ("triton_backward", _backward, dict(s=_t(M - 1, RANK)), "s: expected shape"),
        "backward s dtype": ("triton_backward", _backward, dict(s=_t(M, RANK, dtype=torch.bfloat16)),
                             "s: expected dtype"),
        "backward A rank": ("triton_backward", _backward, dict(A=_t(RANK + 1, IN)), "A: expected shape"),
        "backward B shape": ("triton_backward", _backward, dict(B=_t(OUT + 1, RANK)), "B: expected shape"),
        "backward B alone": ("triton_backward", _backward, dict(A=None), "A, B: expected both"),
        "backward weight shape": ("triton_backward", _backward, dict(weight=_t(OUT, IN + 1)), "weight: expected shape"),
        "backward in_features": ("triton_backward", _backward, dict(in_features=IN + 3), "A: expected shape"),
        "backward in_features zero": ("triton_backward", _backward, dict(in_features=0), "in_features"),
        "backward lambda_d shape": ("triton_backward", _backward, dict(lambda_d=_t(RANK - 1)), "lambda_d: expected shape"),
        "backward lambda_b dtype": ("triton_backward", _backward, dict(lambda_b=_t(OUT, dtype=torch.float16)),
                                    "lambda_b: expected dtype"),
        "backward on-the-fly max_in": ("triton_backward", _backward, dict(A=None, B=None, seed=1, max_in=IN - 1),
                                       "max_in"),
        "backward on-the-fly in_features": ("triton_backward", _backward, dict(A=None, B=None, seed=1, max_in=IN,
                                                                              in_features=-2), "in_features"),
        # triton_forward_multi
        "multi x 3-D": ("triton_forward_multi", _multi, dict(x=_t(1, M, IN)), "x: expected a 2-D tensor"),
        "multi x float64": ("triton_forward_multi", _multi, dict(x=_t(M, IN, dtype=torch.float64)), "dtype"),
        "multi A in_features": ("triton_forward_multi", _multi, dict(A=_t(RANK, IN - 2)), "A: expected shape"),
        "multi bank rows differ": ("triton_forward_multi", _multi, dict(lambda_b_bank=_t(ADAPTERS + 1, OUT)),
                                   "lambda_b_bank"),
        "multi bank_d rank": ("triton_forward_multi", _multi, dict(lambda_d_bank=_t(ADAPTERS, RANK + 1)),
                              "lambda_d_bank"),
        "multi bank_b out": ("triton_forward_multi", _multi, dict(lambda_b_bank=_t(ADAPTERS, OUT - 1)),
                             "lambda_b_bank"),
        "multi bank 1-D": ("triton_forward_multi", _multi, dict(lambda_d_bank=_t(RANK)), "lambda_d_bank"),
        "multi bank dtype": ("triton_forward_multi", _multi, dict(lambda_b_bank=_t(ADAPTERS, OUT, dtype=torch.float64)),
                             "lambda_b_bank: expected dtype"),
        "multi bank sparse": ("triton_forward_multi", _multi, dict(lambda_d_bank=_t(ADAPTERS, RANK).to_sparse()),
                              "lambda_d_bank: expected a dense"),
        "multi ids int32": ("triton_forward_multi", _multi, dict(adapter_ids=_ids(0, 1, -1, 1, 0).int()),
                            "adapter_ids: expected dtype"),
        "multi ids short": ("triton_forward_multi", _multi, dict(adapter_ids=_ids(0, 1, -1, 1)),
                            "adapter_ids: expected shape"),
        "multi ids 2-D": ("triton_forward_multi", _multi, dict(adapter_ids=_ids(0, 1, -1, 1, 0)[:, None]),
                          "adapter_ids: expected shape"),
        "multi weight and base_out": ("triton_forward_multi", _multi, dict(base_out=_t(M, OUT)), "exactly one"),
        "multi bias without weight": ("triton_forward_multi", _multi, dict(weight=None, base_out=_t(M, OUT)),
                                      "bias: only allowed with weight"),
        "multi base_out shape": ("triton_forward_multi", _multi, dict(weight=None, bias=None, base_out=_t(M, OUT + 1)),
                                 "base_out: expected shape"),
        "multi id = adapters": ("triton_forward_multi", _multi, dict(adapter_ids=_ids(0, 1, ADAPTERS, 1, 0)),
                                r"adapter_ids: values must be in \[-1, 2\)"),
        "multi id -5": ("triton_forward_multi", _multi, dict(adapter_ids=_ids(0, -5, -1, 1, 0)),
                        r"adapter_ids: values must be in \[-1, 2\)"),
        "multi id 2**40": ("triton_forward_multi", _multi, dict(adapter_ids=_ids(0, 1, 2**40, 1, 0)),
                           r"adapter_ids: values must be in \[-1, 2\)"),
        "multi id -2**40": ("triton_forward_multi", _multi, dict(adapter_ids=_ids(-2**40, 1, 0, 1, 0)),
                            r"adapter_ids: values must be in \[-1, 2\)"),
        "multi empty bank": ("triton_forward_multi", _multi, dict(lambda_d_bank=_t(0, RANK), lambda_b_bank=_t(0, OUT)),
                             r"adapter_ids: values must be in \[-1, 0\)"),
    }


def _call(name):
    op, good, change, _ = _cases()[name]
    args = {**good(), **change}
    with torch.enable_grad():
        out = getattr(torch.ops.vera_kernels, op)(**args)
    if DEVICE == "cuda":
        torch.cuda.synchronize()  # a device-side assert surfaces here
    return out


def _run_here(names):
    """The subprocess: each case's outcome as one JSON line, printed as soon as it is known."""
    import vera_kernels.triton.function  # noqa: F401  (registers the triton_* ops)

    for name in names:
        try:
            _call(name)
            outcome = dict(case=name, error=None)
        except Exception as exc:  # noqa: BLE001  (the parent judges the type and the message)
            outcome = dict(case=name, error=type(exc).__name__, message=str(exc))
        print(json.dumps(outcome), flush=True)


def _run_in_subprocess(names):
    env = dict(os.environ)
    if DEVICE == "cpu":
        env["TRITON_INTERPRET"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *names], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    outcomes = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            outcome = json.loads(line)
            outcomes[outcome["case"]] = outcome
    for name in names:
        outcomes.setdefault(name, dict(case=name, crashed=done.returncode, stderr=done.stderr[-2000:]))
    return outcomes


ID_RANGE = ("multi id = adapters", "multi id -5", "multi id 2**40", "multi id -2**40", "multi empty bank")


@pytest.fixture(scope="module")
def outcomes():
    names = list(_cases())
    if DEVICE == "cuda":  # a device-side assert loses the context: each id-range case alone
        groups = [[n for n in names if n not in ID_RANGE]] + [[n] for n in ID_RANGE]
    else:
        groups = [names]
    found = {}
    for group in groups:
        found.update(_run_in_subprocess(group))
    return found


@pytest.mark.parametrize("case", list(_cases()))
def test_bad_call_is_refused(outcomes, case, backend):
    outcome = outcomes[case]
    assert "crashed" not in outcome, f"the process died (exit {outcome.get('crashed')}): {outcome.get('stderr')}"
    assert outcome["error"] is not None, f"{case}: accepted"
    pattern = _cases()[case][3]
    if DEVICE == "cuda" and case in ID_RANGE:  # the device-side assert carries no message of ours
        pattern = f"device-side assert|{pattern}"

    assert outcome["error"] in ("ValueError", "TypeError", "RuntimeError"), outcome
    assert re.search(pattern, outcome["message"]), f"{case}: {outcome['error']}: {outcome['message']}"


def test_good_calls_are_accepted(backend):
    # The same good arguments every case above starts from run, and agree with the torch backend.
    import vera_kernels.triton.function  # noqa: F401
    from vera_kernels import reference

    torch.manual_seed(0)
    with torch.no_grad():
        args = _forward()
        y, _ = torch.ops.vera_kernels.triton_forward(**args)
        want = reference.vera_linear(*(args[k] for k in ("x", "weight", "bias", "A", "B", "lambda_d", "lambda_b")))
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
        args = _multi()
        y = torch.ops.vera_kernels.triton_forward_multi(**args)
        want = reference.vera_forward_multi(*args.values())
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
        dx, dd, db, dbias = torch.ops.vera_kernels.triton_backward(**_backward())
    assert dx.shape == (M, IN) and dd.shape == (RANK,) and db.shape == (OUT,) and dbias.shape == (OUT,)


if __name__ == "__main__":
    _run_here(sys.argv[1:])
