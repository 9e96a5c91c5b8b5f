"""Tensor parallelism (VeRAColwiseParallel / VeRARowwiseParallel on PyTorch's DTensor TP) on CPU processes with
gloo, against a single-process run: a tiny Llama with VeRA on every linear and the usual plan (q/k/v/gate/up
colwise, o/down rowwise, lm_head colwise with a replicated output), built on the meta device so that each rank
materializes only its projection shards. One launch per world size (2 and 4 ranks) runs every check: the
README's TP block (2 ranks), sequence parallel (2 ranks), FSDP2 over TP on a 2-D mesh (4 ranks), and for the
`cpu` and `torch` backends: load_adapter placing each rank's shard, save_adapter writing the unsharded model's
file, forward logits, lambda gradients, lambdas after AdamW steps, merge/unmerge of each rank's shard of ΔW."""

import itertools
import os
import re
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import vera_kernels as vk
from vera_kernels import projections

import spawned

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = [b for b in ("cpu", "torch") if vk.backends()[b].available]
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
RANK, SEED, STEPS = 4, 7, 3
TIMEOUT_S = 300


def assert_close(got, want, what=""):
    """Within fp32 rounding: a sum's rounding error scales with its terms, so atol follows the largest value."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()),
                               msg=lambda m: f"{what}: {m}")


def llama_config():
    # head_dim 4; k/v hold 4 heads and q 8, so 4 ranks still get whole heads.
    return transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=16)


def batch():
    return torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(3))


def whole(t):
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return t.detach().clone()


def lambdas(model):
    return [(n, p) for n, p in model.named_parameters() if n.endswith(("lambda_d", "lambda_b"))]


def train(model, ids):
    """STEPS AdamW steps on the cross-entropy of the logits against the input tokens: the first forward's
    logits and gradients, the lambdas after the last step."""
    out = {}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(STEPS):
        logits = model(ids).logits
        F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        if step == 0:
            out["logits"] = logits.detach().clone()
            out["grads"] = {n: whole(p.grad) for n, p in lambdas(model)}
        optimizer.step()
        optimizer.zero_grad()
    out["lambdas"] = {n: whole(p) for n, p in lambdas(model)}
    return out


@torch.no_grad()
def merge_round_trip(model, ids):
    model.eval()
    layers = vk.vera_layers(model)
    out = {"adapted": model(ids).logits.clone()}
    for _, layer in layers:
        layer.merge()
    out["merged"] = model(ids).logits.clone()
    out["merged_weights"] = {n: whole(layer.weight) for n, layer in layers}
    for _, layer in layers:
        layer.unmerge()
    out["unmerged_weights"] = {n: whole(layer.weight) for n, layer in layers}
    return out


_references = {}


def reference(backend, state, adapter):
    if backend not in _references:
        _references[backend] = _reference(backend, state, adapter)
    return _references[backend]


def _reference(backend, state, adapter):
    model = transformers.LlamaForCausalLM(llama_config())
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})
    vk.apply_vera(model, LINEARS, rank=RANK, seed=SEED, backend=backend)
    vk.load_adapter(model, adapter)
    ids = batch()
    return {**train(model, ids), **merge_round_trip(model, ids)}


# --------------------------------------------------------------------------------------------------
# The workers.


def parallelize(model, mesh):
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import parallelize_module

    plan = {f"{part}.{name}": (vk.VeRAColwiseParallel() if name in COLWISE else vk.VeRARowwiseParallel())
            for part, names in (("self_attn", LINEARS[:4]), ("mlp", LINEARS[4:7])) for name in names}
    for block in model.model.layers:
        parallelize_module(block, mesh, plan)
    parallelize_module(model, mesh, {"lm_head": vk.VeRAColwiseParallel(output_layouts=Replicate())})


def tp_llama(backend, mesh, state):
    """The Llama built on the meta device, adapted, parallelized, then materialized and given the base weights:
    nothing but each rank's shards is ever generated."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    projections.clear_projection_cache()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(llama_config())
    vk.apply_vera(model, LINEARS, rank=RANK, seed=SEED, backend=backend)
    parallelize(model, mesh)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
            if name in state:
                if isinstance(t, DTensor):
                    t.to_local().copy_(distribute_tensor(state[name], mesh, t.placements, src_data_rank=None).to_local())
                else:
                    t.copy_(state[name])
    return model


def check_only_shards_generated(model, mesh):
    """Each layer holds exactly its shard (colwise: rows o0:o1 of B, A whole; rowwise: columns i0:i1 of A, B
    whole), bit-equal to that slice of the full pair, and nothing else was generated on this rank."""
    world, me = mesh.size(), mesh.get_local_rank()
    expected_A, expected_B = set(), set()
    for name, layer in vk.vera_layers(model):
        source = layer.projections
        assert isinstance(source, vk.SeededProjectionShard), name
        colwise = name.endswith(COLWISE)
        size = layer.out_features if colwise else layer.in_features
        chunk = -(-size // world)
        lo, hi = me * chunk, min((me + 1) * chunk, size)
        ranges = ((0, layer.in_features), (lo, hi - lo)) if colwise else ((lo, hi - lo), (0, layer.out_features))
        assert ((source.in_offset, source.in_features), (source.out_offset, source.out_features)) == ranges, name
        (device_dtype, (A, B)), = source._pairs.items()
        assert A.shape == (RANK, ranges[0][1]) and B.shape == (ranges[1][1], RANK), name
        expected_A.add((source.in_offset, source.in_features))
        expected_B.add((source.out_offset, source.out_features))
    # Every block generated on this rank (keys: tag, seed, rank, [max_in,] offset, width, device, dtype), each
    # once: the colwise layers share one A.
    generated = [(key[0], key[-4:-2]) for key in projections._blocks]
    assert sorted(generated) == sorted([(0, r) for r in expected_A] + [(1, r) for r in expected_B])
    assert len(expected_A) == 3  # A[:, :hidden] (colwise), A[:, i0:i1] of o_proj's and of down_proj's in
    A_max, B_max = vk.generate_projections(SEED, RANK, source.max_in, source.max_out)  # uncached
    for name, layer in vk.vera_layers(model):
        s = layer.projections
        A, B = s.pair(torch.device("cpu"), torch.float32)
        assert torch.equal(A, A_max[:, s.in_offset:s.in_offset + s.in_features])
        assert torch.equal(B, B_max[s.out_offset:s.out_offset + s.out_features])


def run_tp(backend, mesh, tmp, state):
    model = tp_llama(backend, mesh, state)
    check_only_shards_generated(model, mesh)
    adapter = os.path.join(tmp, "adapter.safetensors")
    vk.load_adapter(model, adapter)
    file_tensors = vk.read_adapter(adapter)[1]
    for name, layer in vk.vera_layers(model):  # each rank took its own shard
        tp = layer._tensor_parallel
        want_b = file_tensors[f"{name}.lambda_b"]
        if tp.kind == "colwise":
            want_b = want_b[tp.lo:tp.hi]
        assert torch.equal(layer.lambda_b.to_local(), want_b) and torch.equal(layer.lambda_d.to_local(),
                                                                              file_tensors[f"{name}.lambda_d"])
    vk.save_adapter(model, os.path.join(tmp, f"saved-{mesh.size()}-{backend}.safetensors"))
    ids = batch()
    return {**train(model, ids), **merge_round_trip(model, ids)}


def run_2d(backend, tmp, state):
    """FSDP2 over the TP model: dp x tp = 2 x 2; each dp rank trains on half the batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = tp_llama(backend, mesh["tp"], state)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    # Into and out of the lambdas sharded both ways (dp x tp).
    vk.load_adapter(model, os.path.join(tmp, "adapter.safetensors"))
    vk.save_adapter(model, os.path.join(tmp, f"saved-2d-{backend}.safetensors"))
    half = mesh["dp"].get_local_rank()
    out = train(model, batch()[2 * half:2 * half + 2])
    return {"grads": out["grads"], "lambdas": out["lambdas"]}


def run_sequence_parallel(mesh):
    """colwise(input Shard(1)) -> GELU -> rowwise(output Shard(1)) on a sequence-sharded input, as the stock
    styles do sequence parallel: the output shard, the gradients of the lambdas and the trained biases."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import parallelize_module

    def block():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 14), nn.GELU(), nn.Linear(14, 6))
        vk.apply_vera(model, ["0", "2"], rank=RANK, seed=SEED, bias="vera_only")  # the biases train too
        with torch.no_grad():
            for _, p in lambdas(model):
                p.normal_()
        return model

    x = torch.randn(2, 6, 10, generator=torch.Generator().manual_seed(4))
    ref, tp = block(), block()
    parallelize_module(tp, mesh, {"0": vk.VeRAColwiseParallel(input_layouts=Shard(1)),
                                  "2": vk.VeRARowwiseParallel(output_layouts=Shard(1))})
    rows = slice(3 * mesh.get_local_rank(), 3 * mesh.get_local_rank() + 3)
    y_ref, y = ref(x), tp(x[:, rows])
    assert_close(y, y_ref[:, rows], "sequence-parallel output")
    y_ref.square().sum().backward()
    y.square().sum().backward()  # the ranks' losses add up to the whole one
    trained = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    assert len(trained) == 6
    for (name, p_ref), (_, p) in zip(trained, [(n, p) for n, p in tp.named_parameters() if p.requires_grad]):
        assert_close(whole(p.grad), p_ref.grad, f"sequence parallel, gradient of {name}")


def check_refusals(mesh):
    """What the styles refuse, each before changing the layer."""
    from torch.distributed.tensor.parallel import parallelize_module

    def layer(out_features=6, **kwargs):
        return vk.FusedVeRALinear(5, out_features, rank=RANK, seed=SEED, **kwargs)

    cases = [
        (vk.VeRAWrapper(nn.Linear(5, 6), rank=RANK), NotImplementedError, "FusedVeRALinear"),
        (layer(out_features=1), ValueError, "out_features=1 can't be split over a mesh of 2"),
        (layer(projections=vk.ExplicitProjections(torch.randn(RANK, 5), torch.randn(6, RANK))),
         NotImplementedError, "seeded pair"),
    ]
    merged = layer()
    merged.merge()
    cases.append((merged, ValueError, "merged"))
    banked = layer()
    banked.add_adapter("other", torch.ones(RANK), torch.ones(6))
    cases.append((banked, NotImplementedError, "bank"))
    for module, error, match in cases:
        before = {n: p for n, p in module.named_parameters()}
        with pytest.raises(error, match=match):
            parallelize_module(module, mesh, vk.VeRAColwiseParallel())
        assert {n: p for n, p in module.named_parameters()} == before  # the same Parameters, unchanged
    sharded = parallelize_module(layer(), mesh, vk.VeRARowwiseParallel())
    with pytest.raises(ValueError, match="already tensor-parallel"):
        parallelize_module(sharded, mesh, vk.VeRAColwiseParallel())
    with pytest.raises(NotImplementedError, match="adapter bank"):
        sharded(torch.randn(2, 3), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="tensor-parallel rank's slice"):
        layer(projections=sharded.projections)


def run_readme(tmp):
    """The README's TP block, as torchrun would run it (it initializes the process group from the env)."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"```python\n(.*?)```", readme[readme.index("## Tensor parallelism"):], re.S).group(1)
    os.makedirs(os.path.join(tmp, "readme"), exist_ok=True)
    os.chdir(os.path.join(tmp, "readme"))  # it writes adapter.safetensors
    scope = {"__name__": "readme_tp"}
    exec(compile(block, "README.md (Tensor parallelism)", "exec"), scope)
    assert scope["A"].shape == (64, 256) and scope["B"].shape == (256 // 2, 64)


def worker(rank, world, port, tmp):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    from torch.distributed.device_mesh import init_device_mesh

    if world == 2:
        run_readme(tmp)  # its init_device_mesh starts the process group from the environment, as under torchrun
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        mesh = init_device_mesh("cpu", (world,))
        if world == 2:
            run_sequence_parallel(mesh)
            check_refusals(mesh)
        state = torch.load(os.path.join(tmp, "state.pt"))
        results = {backend: run_tp(backend, mesh, tmp, state) for backend in BACKENDS}
        if world == 4:
            results["2d"] = {backend: run_2d(backend, tmp, state) for backend in BACKENDS}
        if rank == 0:
            torch.save(results, os.path.join(tmp, f"results-{world}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # gloo may abort at interpreter exit (see test_distributed.py): the results are on disk


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The base weights (parameters and buffers) and an adapter file with random lambdas, written by the
    unsharded model."""
    tmp = tmp_path_factory.mktemp("tp")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(llama_config())
    state = {n: t.detach().clone() for n, t in itertools.chain(base.named_parameters(), base.named_buffers())}
    torch.save(state, tmp / "state.pt")
    vk.apply_vera(base, LINEARS, rank=RANK, seed=SEED)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in lambdas(base):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    vk.save_adapter(base, tmp / "adapter.safetensors")
    return tmp, state


@pytest.fixture(scope="module")
def ranks2(inputs):
    return launch(2, *inputs)


@pytest.fixture(scope="module")
def ranks4(inputs):
    return launch(4, *inputs)


def launch(world, tmp, state):
    spawned.run(worker, (world, spawned.free_port(), str(tmp)), world, TIMEOUT_S)
    return world, torch.load(tmp / f"results-{world}.pt"), tmp, state


def assert_all_close(got: dict, want: dict, what: str):
    assert got.keys() == want.keys() and want, what
    for name in want:
        assert_close(got[name], want[name], f"{what} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_equals_one_process(world, backend, request):
    world, results, tmp, state = request.getfixturevalue(f"ranks{world}")
    got, want = results[backend], reference(backend, state, tmp / "adapter.safetensors")
    assert_close(got["logits"], want["logits"], "logits")
    assert len(want["grads"]) == 2 * (7 * 2 + 1)
    assert_all_close(got["grads"], want["grads"], "gradient of")
    assert all(g.abs().max() > 0 for g in want["grads"].values())
    assert_all_close(got["lambdas"], want["lambdas"], "after AdamW:")
    # merge() under TP: each rank folds its shard of ΔW; the merged model computes the adapted one.
    assert_close(got["merged"], got["adapted"], "merged logits")
    assert_all_close(got["merged_weights"], want["merged_weights"], "merged")
    assert_all_close(got["unmerged_weights"], {n: state[f"{n}.weight"] for n in want["merged_weights"]},
                     "unmerged")
    # save_adapter from the TP model (gathered, written by rank 0) writes the unsharded model's file: the same
    # metadata and tensors, bit for bit (not the same bytes: safetensors orders the metadata by hash).
    assert_same_adapter_file(tmp / f"saved-{world}-{backend}.safetensors", tmp / "adapter.safetensors")


def assert_same_adapter_file(path, want_path):
    import safetensors

    metadata = []
    for p in (path, want_path):
        with safetensors.safe_open(str(p), framework="pt") as f:
            metadata.append(f.metadata())
    assert metadata[0] == metadata[1]
    tensors, want = vk.read_adapter(path)[1], vk.read_adapter(want_path)[1]
    assert tensors.keys() == want.keys() and all(torch.equal(tensors[k], want[k]) for k in tensors)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_over_tensor_parallel_on_a_2d_mesh(ranks4, backend):
    world, results, tmp, state = ranks4  # the 2-D mesh (dp 2 x tp 2) runs in the 4-rank launch
    got, want = results["2d"][backend], reference(backend, state, tmp / "adapter.safetensors")
    assert_same_adapter_file(tmp / f"saved-2d-{backend}.safetensors", tmp / "adapter.safetensors")
    assert_all_close(got["grads"], want["grads"], "gradient of")
    assert_all_close(got["lambdas"], want["lambdas"], "after AdamW:")


def test_readme_tp_block_ran(ranks2):
    world, _, tmp, _ = ranks2  # the README block runs in the 2-rank launch
    config, tensors = vk.read_adapter(tmp / "readme" / "adapter.safetensors")
    assert (config["seed"], config["rank"], len(tensors)) == (0, 64, 2 * (7 * 2 + 1))
