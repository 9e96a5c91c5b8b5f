"""backend="auto" on measured times (vera_kernels/auto_table.py): the shipped table, the choice per GPU,
dtype and M bucket, and the table written from the GPU benchmark's records."""

import json

import pytest
import torch

from vera_kernels import auto_table, dispatch


def _entry(best, m_bucket, gpu="NVIDIA H200", capability="9.0", dtype="bfloat16", in_f=4096, out_f=4096, rank=256):
    return dict(gpu=gpu, capability=capability, op="vera_linear", dtype=dtype, m_bucket=m_bucket, out=out_f,
                rank=rank, times_us={best: 1.0}, best=best, **{"in": in_f})


def test_shipped_table_loads():
    entries = auto_table.load()
    assert isinstance(entries, tuple)
    assert all({"gpu", "capability", "op", "dtype", "m_bucket", "best"} <= set(e) for e in entries)


def test_m_buckets():
    assert [auto_table.m_bucket(m) for m in (0, 1, 2, 3, 16, 17, 8192, 8193)] == [1, 1, 2, 4, 16, 32, 8192, 16384]


def test_best_backend_per_gpu_dtype_and_bucket():
    entries = [_entry("triton", 16), _entry("cuda", 8192), _entry("triton", 8192, dtype="float16"),
               _entry("triton", 8192, gpu="NVIDIA H100 80GB HBM3")]
    choose = auto_table.best_backend
    assert choose(entries, "NVIDIA H200", "9.0", "vera_linear", "bfloat16", 8, 4096, 4096, 256) == "triton"
    assert choose(entries, "NVIDIA H200", "9.0", "vera_linear", "bfloat16", 5000, 4096, 4096, 256) == "cuda"
    assert choose(entries, "NVIDIA H200", "9.0", "vera_linear", "float16", 5000, 4096, 4096, 256) == "triton"
    # An unmeasured GPU of a measured capability takes that capability's entries.
    assert choose(entries[:2], "NVIDIA H20", "9.0", "vera_linear", "bfloat16", 64, 4096, 4096, 256) == "triton"
    assert choose(entries, "NVIDIA A100", "8.0", "vera_linear", "bfloat16", 8, 4096, 4096, 256) is None
    assert choose(entries, "NVIDIA H200", "9.0", "vera_delta", "bfloat16", 8, 4096, 4096, 256) is None


def test_chooser_calls_the_measured_backend():
    calls = []
    implementations = {name: (lambda name: lambda *args: calls.append(name))(name) for name in ("cuda", "triton")}
    chooser = auto_table._Chooser("vera_linear", "NVIDIA H200", "9.0", (_entry("triton", 16), _entry("cuda", 8192)),
                                  implementations)
    A, B = torch.empty(256, 4096), torch.empty(4096, 256)
    for m in (4, 8192):
        chooser(torch.empty(m, 4096, dtype=torch.bfloat16), None, None, A, B, None, None)
    assert calls == ["triton", "cuda"]


def test_no_measurement_keeps_the_fixed_order_on_cpu():
    assert auto_table.measured_choice("vera_linear", torch.device("cpu"), lambda name: name) is None
    assert dispatch.lookup("vera_linear", "auto", torch.device("cpu")) is not None


def test_table_from_benchmark_records(tmp_path):
    rows = [dict(impl=impl, pass_="forward", m=m, in_features=1024, out_features=1024, rank=64, dtype="bfloat16",
                 seconds=seconds) for impl, m, seconds in
            (("vera-cuda", 16, 3e-5), ("vera-triton", 16, 2e-5), ("vera-cuda", 512, 1e-4), ("vera-triton", 512, 2e-4),
             ("base", 512, 5e-5))]
    rows.append(dict(rows[0], pass_="backward"))
    records = dict(environment=dict(device="NVIDIA H200", capability="9.0"), results=rows)
    entries = auto_table.entries_from_records(records)
    assert [(e["m_bucket"], e["best"]) for e in entries] == [(16, "triton"), (512, "cuda")]
    assert entries[0]["times_us"] == {"cuda": 30.0, "triton": 20.0}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(dict(format=auto_table.FORMAT, entries=[_entry("cuda", 1, gpu="other")])))
    auto_table.write(entries, str(path))
    written = json.loads(path.read_text())["entries"]
    assert len(written) == 3 and {e["gpu"] for e in written} == {"other", "NVIDIA H200"}
    auto_table.load.cache_clear()


def _bad_tables(tmp_path):
    """(what the warning says, a table file that is not one)."""
    import os

    def write(name, text):
        path = tmp_path / name
        path.write_text(text)
        return path

    good = _entry("triton", 16)
    yield "not JSON", write("truncated.json", '{"format": 1, "entries": [')
    yield "not JSON", write("binary.json", "\x00\x01")
    yield "format 1, got 'list'", write("list.json", "[]")
    yield "format 1, got 2", write("format.json", json.dumps({"format": 2, "entries": []}))
    yield "'entries' must be a list", write("entries.json", json.dumps({"format": 1, "entries": {"a": 1}}))
    yield "entry 0 is a str", write("str_entry.json", json.dumps({"format": 1, "entries": ["x"]}))
    yield "entry 1 has no 'best'", write("missing.json", json.dumps(
        {"format": 1, "entries": [good, {k: v for k, v in good.items() if k != "best"}]}))
    yield "'m_bucket' is '16'", write("type.json", json.dumps({"format": 1, "entries": [dict(good, m_bucket="16")]}))
    yield "'best' must name a measured backend", write("best.json", json.dumps({"format": 1, "entries": [dict(good, best="x")]}))
    yield "more than the 1048576", write("big.json", json.dumps({"format": 1, "entries": [good] * 20000}))
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    yield "not a regular file", zero
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    yield "not a regular file", fifo


def test_a_bad_table_is_ignored_once_with_a_warning_naming_it(tmp_path, monkeypatch):
    # Regression: a malformed table raised raw KeyError/AttributeError/JSONDecodeError on every auto call, a
    # link to /dev/zero exhausted memory. Each is checked once, bounded in size, and auto keeps its fixed order.
    import warnings

    for words, path in _bad_tables(tmp_path):
        auto_table.load.cache_clear()
        with pytest.warns(RuntimeWarning, match=f"auto table '{path}' is ignored .*{words}.*keeps its fixed order"):
            assert auto_table.load(str(path)) == ()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert auto_table.load(str(path)) == ()  # checked once: no second warning
        # The dispatch on a GPU this table would cover keeps the fixed order (here: the unmeasured preference).
        monkeypatch.setattr(auto_table, "TABLE_PATH", str(path))
        monkeypatch.setattr(auto_table, "_device_key", lambda device: ("NVIDIA H200", "9.0"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert auto_table.measured_choice("vera_linear", torch.device("cuda"), lambda name: name) is None
    auto_table.load.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert auto_table.load(str(tmp_path / "absent.json")) == ()  # no table: no warning


def test_the_choice_is_searched_once_per_call_shape(monkeypatch):
    # Regression: every call searched the whole table (100k entries: 144 ms per call).
    searched = []
    real = auto_table.best_backend

    def counting(*args):
        searched.append(args[4:])
        return real(*args)

    monkeypatch.setattr(auto_table, "best_backend", counting)
    implementations = {"cuda": lambda *args: "cuda", "triton": lambda *args: "triton"}
    entries = tuple(_entry("triton", 16, in_f=i + 1) for i in range(1000)) + (_entry("cuda", 8192),)
    chooser = auto_table._Chooser("vera_linear", "NVIDIA H200", "9.0", entries, implementations)
    A, B = torch.empty(256, 4096), torch.empty(4096, 256)
    got = [chooser(torch.empty(m, 4096, dtype=torch.bfloat16), None, None, A, B, None, None)
           for m in (4, 3, 4, 8192, 5000, 8192, 4)]
    assert got == ["triton"] * 3 + ["cuda"] * 3 + ["triton"]
    assert len(searched) == 2  # one per (dtype, M bucket, layer size)
