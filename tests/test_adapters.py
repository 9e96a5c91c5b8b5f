"""Adapter files: safetensors with the seed and sizes in the metadata and only the trained vectors; loading
checks everything before it touches the model."""

import copy
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import vera_kernels
from vera_kernels import apply_vera, load_adapter, save_adapter


class Net(nn.Module):
    def __init__(self, dim=16, hidden=24):
        super().__init__()
        self.encoder = nn.ModuleDict({"q": nn.Linear(dim, dim), "v": nn.Linear(dim, dim)})
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.encoder["q"](x) * torch.sigmoid(self.encoder["v"](x))
        return self.mlp(x)


TARGETS = ["q", "v", "mlp.0", "mlp.2"]


def trained(model, seed=0, **kwargs):
    """A base model with an adapter whose vectors are random (as if trained)."""
    apply_vera(model, TARGETS, rank=8, seed=5, dropout=0.1, d_initial=0.05, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
    }


def assert_untouched(model, before):
    after = snapshot(model)
    assert after["modules"] == before["modules"] and after["grad"] == before["grad"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())


@pytest.fixture
def base():
    torch.manual_seed(0)
    return Net()


@pytest.fixture
def saved(base, tmp_path):
    model = trained(copy.deepcopy(base))
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    return model, path


def test_file_holds_the_config_and_the_vectors_only(saved):
    model, path = saved
    tensors = load_file(path)
    expected = {f"{name}.{v}" for name in ("encoder.q", "encoder.v", "mlp.0", "mlp.2") for v in ("lambda_d", "lambda_b")}
    assert set(tensors) == expected
    assert torch.equal(tensors["mlp.0.lambda_b"], model.mlp[0].lambda_b)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        metadata = json.loads(f.read(header_len))["__metadata__"]
    assert metadata == {
        "format": "vera-kernels-adapter", "format_version": "1", "scheme": vera_kernels.SCHEME,
        "seed": "5", "rank": "8", "max_in": "24", "max_out": "24", "dropout": "0.1", "d_initial": "0.05",
    }
    # 4 layers x (8 + out) fp32 values plus the header: no weights, no projections.
    assert path.stat().st_size < 4 * (8 + 24) * 4 + 2000


def test_load_onto_a_fresh_base_rebuilds_the_adapter(base, saved):
    model, path = saved
    fresh = load_adapter(copy.deepcopy(base), path).eval()
    x = torch.randn(3, 16)
    assert torch.equal(fresh(x), model(x))
    layer = fresh.encoder["q"]
    assert (layer.projections.seed, layer.rank, layer.dropout, layer.d_initial) == (5, 8, 0.1, 0.05)
    assert sum(p.numel() for p in fresh.parameters() if p.requires_grad) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


def test_load_onto_an_adapted_model_replaces_the_vectors(base, saved):
    model, path = saved
    other = copy.deepcopy(base)
    apply_vera(other, TARGETS, rank=8, seed=5)
    load_adapter(other, path)
    x = torch.randn(3, 16)
    assert torch.equal(other.eval()(x), model(x))


def test_trained_biases_round_trip(base, tmp_path):
    model = trained(copy.deepcopy(base), bias="vera_only")
    path = tmp_path / "with_bias.safetensors"
    save_adapter(model, path)
    assert "mlp.2.bias" in load_file(path)
    fresh = load_adapter(copy.deepcopy(base), path).eval()
    assert torch.equal(fresh.mlp[2].bias, model.mlp[2].bias) and fresh.mlp[2].bias.requires_grad
    x = torch.randn(2, 16)
    assert torch.equal(fresh(x), model(x))


def rewrite(path, tmp_path, tensors=None, **metadata_changes):
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        metadata = json.loads(f.read(header_len))["__metadata__"]
    metadata.update(metadata_changes)
    metadata = {k: v for k, v in metadata.items() if v is not None}
    out = tmp_path / f"changed{len(list(tmp_path.iterdir()))}.safetensors"
    save_file(tensors if tensors is not None else load_file(path), out, metadata=metadata)
    return out


def bad_files(path, tmp_path):
    tensors = load_file(path)
    yield "projection scheme 'vera-philox-v0'", rewrite(path, tmp_path, scheme="vera-philox-v0")
    yield "metadata 'seed' missing", rewrite(path, tmp_path, seed=None)
    yield "not a vera-kernels adapter", rewrite(path, tmp_path, format="lora")
    yield "lambda_d is \\(8,\\) torch.float64", rewrite(path, tmp_path, {**tensors, "mlp.0.lambda_d": tensors["mlp.0.lambda_d"].double()})
    yield "lambda_b is \\(23,\\)", rewrite(path, tmp_path, {**tensors, "mlp.0.lambda_b": tensors["mlp.0.lambda_b"][:23].clone()})
    yield "unexpected tensor 'mlp.0.weight'", rewrite(path, tmp_path, {**tensors, "mlp.0.weight": torch.zeros(24, 16)})
    yield "without both lambda_d and lambda_b", rewrite(path, tmp_path, {k: v for k, v in tensors.items() if k != "mlp.2.lambda_b"})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-40])
    yield "not a valid safetensors file", truncated
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 5)
    yield "not a valid safetensors file", garbage
    pickled = tmp_path / "pickled.pt"
    torch.save(tensors, pickled)  # a pickle is never unpickled: it fails as not being safetensors
    yield "not a valid safetensors file", pickled


@pytest.mark.parametrize("adapted", [False, True], ids=["fresh-base", "adapted"])
def test_bad_files_fail_clearly_and_leave_the_model_untouched(base, saved, tmp_path, adapted):
    _, path = saved
    for words, bad in bad_files(path, tmp_path):
        target = copy.deepcopy(base)
        if adapted:
            apply_vera(target, TARGETS, rank=8, seed=5)
        before = snapshot(target)
        with pytest.raises(ValueError, match=words):
            load_adapter(target, bad)
        assert_untouched(target, before)


def mismatched_models(base):
    """(expected words, a model the file does not fit)."""
    yield "has projections .*'seed': 5.*'seed': 6", apply_vera(copy.deepcopy(base), TARGETS, rank=8, seed=6)
    yield "has projections .*'rank': 8.*'rank': 4", apply_vera(copy.deepcopy(base), TARGETS, rank=4, seed=5)
    yield "not in the file \\[\\].*not in the model \\['mlp.2'\\]", apply_vera(copy.deepcopy(base), TARGETS[:3], rank=8, seed=5)
    yield "lambda_b is \\(24,\\) torch.float32, the model expects \\(20,\\)", Net(hidden=20)
    renamed = copy.deepcopy(base)
    renamed.encoder["k"] = renamed.encoder.pop("q")
    yield "it has no module \\['encoder.q'\\]", renamed


def test_models_that_differ_fail_clearly_and_stay_untouched(base, saved):
    _, path = saved
    for words, model in mismatched_models(base):
        before = snapshot(model)
        with pytest.raises(ValueError, match=words):
            load_adapter(model, path)
        assert_untouched(model, before)


def test_save_needs_an_adapter_and_seeded_projections(base, tmp_path):
    with pytest.raises(ValueError, match="no VeRA layer"):
        save_adapter(base, tmp_path / "a.safetensors")
    A, B = torch.randn(4, 24), torch.randn(24, 4)
    model = apply_vera(copy.deepcopy(base), TARGETS, rank=4, projections=vera_kernels.ExplicitProjections(A, B))
    with pytest.raises(ValueError, match="explicit projections"):
        save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(FileNotFoundError):
        load_adapter(base, tmp_path / "missing.safetensors")


def test_loading_into_a_merged_model_is_refused_and_changes_nothing(base, saved):
    # Regression: the load was accepted, the forward kept the old ΔW and unmerge() then subtracted the new
    # one from W0. A merged layer's weight holds W0 + ΔW(lambdas): its lambdas can't change under it.
    trained_model, path = saved
    target = trained(copy.deepcopy(base), seed=1)
    for _, layer in vera_kernels.vera_layers(target):
        layer.merge()
    before = snapshot(target)
    with pytest.raises(ValueError, match="merged.*unmerge"):
        load_adapter(target, path)
    assert_untouched(target, before)
    with pytest.raises(RuntimeError, match="merged.*unmerge"):
        target.load_state_dict(trained_model.state_dict())
    assert_untouched(target, before)
    layer = target.mlp[2]
    with pytest.raises(RuntimeError, match="merged.*unmerge"):
        layer.load_state_dict(trained_model.mlp[2].state_dict())
    assert_untouched(target, before)
    # Unmerged, the same loads work and the weights are W0 again.
    for _, layer in vera_kernels.vera_layers(target):
        layer.unmerge()
    load_adapter(target, path)
    x = torch.randn(5, 16)
    torch.testing.assert_close(target(x), trained_model(x))
    target.load_state_dict(trained_model.state_dict())


def test_a_huge_max_in_costs_no_memory(base, saved, tmp_path):
    # Regression: a 400-byte file with max_in = 2**28 made load_adapter generate the full rank x max_in A
    # (8 GB at rank 8). Only the slices the layers use are generated; max_in sets their scale.
    _, path = saved
    from vera_kernels.projections import TAG_A, TAG_B, projection_block

    for max_in, max_out in ((2**20, 24), (2**28, 2**31), (2**34, 2**32)):
        big = rewrite(path, tmp_path, max_in=str(max_in), max_out=str(max_out))
        model = load_adapter(copy.deepcopy(base), big)
        layer = model.mlp[0]
        A, B = layer.projections.pair(torch.device("cpu"), torch.float32)
        assert tuple(A.shape) == (8, 24) and tuple(B.shape) == (24, 8)  # the widest layer: 24 -> 24
        assert torch.equal(A, projection_block(5, TAG_A, 8, 24, max_in))
        assert torch.equal(B, projection_block(5, TAG_B, 24, 8, 8))
        x = torch.randn(3, 16)
        model(x)  # runs on those slices
        assert (layer.projections.max_in, layer.projections.max_out) == (max_in, max_out)
        out = tmp_path / "resaved.safetensors"
        save_adapter(model, out)  # and saves the file's sizes again
        assert vera_kernels.read_adapter(out)[0]["max_in"] == max_in


def test_a_load_that_fails_building_the_layers_changes_nothing(base, saved, monkeypatch):
    # Regression: when generating the projections failed (out of memory, say), the first target's weight
    # was already frozen, and the error named neither the file nor its metadata.
    _, path = saved
    import vera_kernels.projection_sources

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(vera_kernels.projection_sources, "get_projections", out_of_memory)
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=f"adapter file '{path}'.*max_in=24.*not enough memory"):
        load_adapter(model, path)
    assert_untouched(model, before)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("field, text", [
    ("seed", " 5 "), ("seed", "1_000"), ("seed", "+5"), ("seed", "-1"), ("seed", "0x5"), ("seed", str(2**63)),
    ("rank", "8.0"), ("rank", "0"), ("max_in", str(2**34 + 1)), ("max_out", str(2**32 + 1)),
    ("d_initial", "nan"), ("d_initial", "inf"), ("d_initial", "1e999"), ("d_initial", " 0.05"),
    ("dropout", "1.0"), ("dropout", "-0.1"), ("dropout", "NaN"),
])
def test_metadata_is_parsed_strictly_and_errors_name_file_and_field(base, saved, tmp_path, field, text):
    # Regression: int() and float() accepted ' 7 ', '1_000' and NaN; out-of-range values failed later, in
    # the middle of building the layers.
    _, path = saved
    bad = rewrite(path, tmp_path, **{field: text})
    for model in (copy.deepcopy(base), apply_vera(copy.deepcopy(base), TARGETS, rank=8, seed=5)):
        before = snapshot(model)
        with pytest.raises(ValueError, match=f"adapter file '{bad}': metadata '{field}'"):
            load_adapter(model, bad)
        assert_untouched(model, before)


def test_a_directory_is_not_reported_missing(base, tmp_path):
    # Regression: a directory was reported as "does not exist".
    with pytest.raises(IsADirectoryError, match="is a directory.*safetensors file"):
        load_adapter(copy.deepcopy(base), tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(copy.deepcopy(base), tmp_path / "missing.safetensors")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_vectors_in_a_file_are_refused_unless_allowed(base, saved, tmp_path, value):
    # Regression: NaN/inf lambdas were loaded silently (into the layers and into the bank).
    _, path = saved
    tensors = load_file(path)
    tensors["mlp.2.lambda_b"][3] = value
    bad = rewrite(path, tmp_path, tensors)
    for adapted, name in ((False, None), (True, None), (True, "other")):
        model = copy.deepcopy(base)
        if adapted:
            apply_vera(model, TARGETS, rank=8, seed=5)
        before = snapshot(model)
        with pytest.raises(ValueError, match=f"adapter file '{bad}': mlp.2.lambda_b holds non-finite values.*allow_nonfinite=True"):
            load_adapter(model, bad, name=name)
        assert_untouched(model, before)
        assert all("other" not in layer.adapters for _, layer in vera_kernels.vera_layers(model))
        load_adapter(model, bad, name=name, allow_nonfinite=True)
        if name is None:
            got = model.mlp[2].lambda_b[3].item()
        else:
            got = model.mlp[2]._bank_b[model.mlp[2].adapter_index(name), 3].item()
        assert got == value or (got != got and value != value)


def test_a_huge_number_in_the_metadata_names_file_and_field(base, saved, tmp_path):
    # Regression: a 5001-digit max_in gave Python's int-digit-limit error, naming neither file nor field.
    _, path = saved
    for field in ("max_in", "seed"):
        bad = rewrite(path, tmp_path, **{field: "9" * 5001})
        with pytest.raises(ValueError, match=f"adapter file '{bad}': metadata '{field}' must be in .*5001-digit number"):
            load_adapter(copy.deepcopy(base), bad)


def test_what_the_layers_accept_the_files_hold():
    # Regression: max_in = 2**40 was accepted by the layer, then save_adapter wrote a file load_adapter refused.
    # One limit (the scheme's), in projections.py, for both.
    from vera_kernels import adapters, projections

    assert adapters._INT_RANGES["max_in"][1] == projections.MAX_COLS
    assert adapters._INT_RANGES["max_out"][1] == adapters._INT_RANGES["rank"][1] == projections.MAX_ROWS
    with pytest.raises(ValueError, match="max_in must be <="):
        vera_kernels.SeededProjections(0, 4, projections.MAX_COLS + 1, 8, in_features=8)


def test_only_regular_files_are_read(base, tmp_path):
    # Regression: a FIFO or /dev/zero was reported as "does not exist".
    import os

    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    link = tmp_path / "zero.safetensors"
    link.symlink_to("/dev/zero")
    for path in (fifo, link, "/dev/zero"):
        model = copy.deepcopy(base)
        before = snapshot(model)
        with pytest.raises(ValueError, match="is not a regular file"):
            load_adapter(model, path)
        assert_untouched(model, before)


def test_bytes_and_pathlike_paths(base, saved, tmp_path):
    # Regression: a bytes path gave safetensors' TypeError.
    import os

    trained_model, path = saved
    out = tmp_path / "bytes.safetensors"
    save_adapter(trained_model, os.fsencode(out))
    model = load_adapter(copy.deepcopy(base), os.fsencode(out)).eval()
    x = torch.randn(2, 16)
    assert torch.equal(model(x), trained_model(x))
    assert vera_kernels.read_adapter(os.fsencode(path))[0]["rank"] == 8
    for function, args in ((load_adapter, (copy.deepcopy(base), 3)), (save_adapter, (trained_model, None)),
                           (vera_kernels.read_adapter, (1.5,))):
        with pytest.raises(TypeError, match="path must be a str, bytes or os.PathLike"):
            function(*args)
