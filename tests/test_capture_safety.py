"""CUDA-graph safety of the Triton backend, with the capture simulated on CPU: the query the package asks
(``torch.cuda.is_current_stream_capturing``, behind ``buffers.graph_capturing``) is made to answer yes.

- Workspaces: a buffer handed out during a capture is never a cached one, and the cache is left alone, so
  no later eager call (a larger M replaces cached buffers and frees the old ones) can free or reuse memory
  a graph reads. What a capture allocates lives in the graph's private pool: torch's guarantee, which only
  a GPU shows (tests/test_cuda_graphs.py captures and replays for real).
- Autotuning: never runs during a capture (it synchronizes): the tuned choice for the launch's key, else
  the first candidate with one warning naming the shape.
- The autotune key covers every constexpr no config sets: vera_delta's GEMM does not reuse vera_linear's
  choice.
"""

import warnings

import pytest
import torch

from vera_kernels import buffers, verify

from conftest import backend_params

pytestmark = pytest.mark.parametrize("backend", backend_params("triton"))


@pytest.fixture
def capture(monkeypatch):
    """A switch: ``capture.on = True`` makes the current stream "capturing" for the package's query."""

    class Switch:
        on = False

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: Switch.on)
    return Switch


def _forward(m, seed=0, backward=False):
    """y and s of the Triton forward; with ``backward``, also dx, dd, db and dbias (the backward's workspaces:
    the fold b ⊙ B, split partials and tickets)."""
    from vera_kernels.triton import linear

    torch.manual_seed(seed)
    p = verify.random_problem(m, 40, 48, 24, seed=seed)
    p = {k: (v.float() if k.startswith("lambda") else v.to(torch.bfloat16)) for k, v in p.items()}
    y, s = linear.forward(p["x"], p["weight"], p["bias"], p["A"], p["B"], p["lambda_d"], p["lambda_b"], None, 0, 40)
    if not backward:
        return y, s
    grads = linear.backward(torch.randn_like(y), s, p["weight"], p["A"], p["B"], p["lambda_d"], p["lambda_b"],
                            in_features=40, with_bias=True, need_dx=True, seed=0, max_in=40)
    return (y, s, *grads)


def test_the_query_is_the_current_streams_capture_status(backend, capture):
    assert not buffers.graph_capturing()
    capture.on = True
    assert buffers.graph_capturing() and buffers.graph_capturing(torch.device("cpu"))


@pytest.mark.parametrize("m", [4, 40])  # decode (split-K partials and tickets, t) and a larger M
def test_a_capture_takes_no_cached_workspace_and_leaves_the_cache_alone(backend, capture, monkeypatch, m):
    from vera_kernels.triton import linear

    _forward(m, backward=True)  # eager: the cache holds this M's workspaces, the backward's too
    cached = dict(linear._workspaces)
    assert cached
    handed_out = []
    real = linear.workspace
    monkeypatch.setattr(linear, "workspace", lambda *a: handed_out.append(real(*a)) or handed_out[-1])

    def storages(buffers_):
        return {b.untyped_storage().data_ptr() for b in buffers_}

    capture.on = True
    for captured_m in (m, 2 * m + 7):  # the same M (fits the cache) and a larger one (would grow it)
        captured = _forward(captured_m, seed=captured_m, backward=True)
        assert handed_out and not storages(handed_out) & storages(linear._workspaces.values())
        assert linear._workspaces.keys() == cached.keys()
        assert all(linear._workspaces[k] is v for k, v in cached.items())
        assert all(torch.isfinite(t).all() for t in captured)
    capture.on = False
    # Eager again, larger still: the cache grows (old buffers freed), none of them was a graph's.
    # The capture's buffers stay referenced, as a graph's pool keeps them reserved (on CPU, freed memory could
    # come back to the eager call below).
    graphs_buffers = list(handed_out)
    during_capture = storages(graphs_buffers)
    handed_out.clear()
    _forward(8 * m + 3, backward=True)
    assert not during_capture & storages(cached.values()) and not during_capture & storages(linear._workspaces.values())


def test_captured_results_equal_eager_ones(backend, capture):
    eager = _forward(9, seed=3, backward=True)
    capture.on = True
    captured = _forward(9, seed=3, backward=True)
    assert all(torch.equal(verify.bits_of(a), verify.bits_of(b)) for a, b in zip(eager, captured, strict=True))


# ---------------------------------------------------------------------------------------------------
# Autotuning: the GPU path of autotune.launch, on CPU, with the real kernels' parameters and the launch
# arguments the ops pass (the static check's capture), a launcher that records instead of running, and a
# stand-in for Triton's autotuner that records that it ran.


def _gemm_launch(scenario: str, m: int = 512):
    from vera_kernels.triton import static

    chosen = [s for s in static.SCENARIOS if s.name == scenario]
    launches = [launch for *_, launch in static.capture(chosen, [torch.bfloat16], [m]) if launch.kernel == "gemm"]
    assert len(launches) == 1
    return launches[0]


class _Recorder:
    """Stands for a jit function: ``fn[grid](**kwargs)`` records the launch; parameters from the real one."""

    def __init__(self, real, launched):
        self.fn, self.launched = real.fn, launched

    def __getitem__(self, grid):
        return lambda **kwargs: self.launched.append(kwargs)


@pytest.fixture
def gpu_path(monkeypatch):
    """autotune.launch as on an sm_90 GPU, with autotuning recorded (``state.tuned``) instead of run."""
    from vera_kernels.triton import autotune

    state = type("State", (), {"tuned": [], "launched": []})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(autotune, "on_device", lambda device: __import__("contextlib").nullcontext())
    monkeypatch.setattr(autotune, "_chosen", {})
    monkeypatch.setattr(autotune, "_warned", set())

    class Tuner:
        def __init__(self, kernel, fn, arch, ieee):
            self.kernel, self.fn, self.arch, self.cache = kernel, fn, arch, {}

        def __getitem__(self, grid):
            def run(**args):
                # What Triton's autotuner does: time the candidates of a new key (here: choose the last),
                # then launch the key's choice.
                key = autotune.tune_key(self.kernel, self.fn, args)
                if key not in self.cache:
                    state.tuned.append(args)
                    self.cache[key] = autotune.candidates(self.kernel, self.arch, args)[-1]
                self.best_config = self.cache[key]
                self.fn.launched.append({**args, **self.best_config.kwargs})
            return run

    monkeypatch.setattr(autotune, "_tuner", Tuner)

    def launch(launch_, **overrides):
        args = {**launch_.args, **overrides}
        autotune.launch(launch_.kernel, _Recorder(launch_.fn, state.launched), (1,), args, interpreted=False,
                        device=torch.device("cuda"))
        return state.launched[-1]

    state.launch = launch
    return state


def test_no_autotuning_during_a_capture_one_warning_naming_the_shape(backend, capture, gpu_path):
    from vera_kernels.triton import autotune

    launch = _gemm_launch("vera_linear")
    candidates = autotune.candidates("gemm", 90, launch.args)
    assert len(candidates) > 1
    capture.on = True
    with pytest.warns(RuntimeWarning) as caught:
        first = gpu_path.launch(launch)
        again = gpu_path.launch(launch)
    assert gpu_path.tuned == []
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "CUDA graph capture" in message and "M_BUCKET=512 N=512 K_ADAPTER=256 K_BASE=512" in message
    assert "bfloat16" in message and "HAS_BASE_GEMM" in message
    for launched in (first, again):
        assert {k: launched[k] for k in candidates[0].kwargs} == candidates[0].kwargs
    # Outside the capture the shape is tuned; captures then take that choice, silently.
    capture.on = False
    gpu_path.launch(launch)
    assert len(gpu_path.tuned) == 1
    capture.on = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        captured = gpu_path.launch(launch)
    assert len(gpu_path.tuned) == 1
    assert {k: captured[k] for k in candidates[-1].kwargs} == candidates[-1].kwargs
    assert autotune.choices() and autotune.choices()[0]["kernel"] == "gemm"


def test_the_autotune_key_covers_every_constexpr_no_config_sets(backend):
    from vera_kernels.triton import autotune

    for scenario in ("vera_linear", "backward"):
        from vera_kernels.triton import static

        chosen = [s for s in static.SCENARIOS if s.name == scenario]
        for *_, launch in static.capture(chosen, [torch.bfloat16], [512]):
            if launch.kernel not in ("rank", "gemm"):
                continue
            set_by_configs = {n for arch in (80, 90) for ieee in (False, True)
                              for c in autotune.configs(launch.kernel, arch, ieee) for n in c.kwargs}
            key = autotune.tune_key(launch.kernel, launch.fn, launch.args)
            for name, constexpr in autotune.parameters(launch.fn):
                if constexpr and name not in set_by_configs:
                    value = launch.args[name]
                    changed = {**launch.args, name: (not value) if isinstance(value, bool) else value + 1}
                    assert autotune.tune_key(launch.kernel, launch.fn, changed) != key, (launch.kernel, name)


def test_vera_delta_does_not_reuse_vera_linears_choice(backend, capture, gpu_path):
    linear_launch, delta_launch = _gemm_launch("vera_linear without bias"), _gemm_launch("vera_delta")
    for name in ("M_BUCKET", "N", "K_ADAPTER"):
        assert linear_launch.args[name] == delta_launch.args[name]
    gpu_path.launch(linear_launch)
    gpu_path.launch(delta_launch)
    assert len(gpu_path.tuned) == 2  # two keys, each tuned
    capture.on = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gpu_path.launch(delta_launch)
        gpu_path.launch(linear_launch)
    assert len(gpu_path.tuned) == 2
