"""The projection scheme (docs/DESIGN.md section 3): known answers, bit-equality across backends, argument checks."""

import pytest
import torch

import vera_kernels
from vera_kernels import verify
from vera_kernels.projections import (
    TAG_A,
    TAG_B,
    fp32_bits_to_fp16_bits,
    get_projections,
    philox4x32_10_torch,
    projection_block,
    projection_bound,
)

from conftest import DEVICE, backend_params

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ALL_BACKENDS = backend_params()


@pytest.fixture(scope="module")
def golden():
    return verify.load_golden()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_philox_known_answers(backend, golden):
    assert verify.philox_kat_mismatches(backend, DEVICE, golden) == 0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_golden_words(backend, golden):
    assert verify.golden_word_mismatches(backend, DEVICE, golden) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_golden_elements_and_blocks(backend, dtype, golden):
    assert verify.golden_element_mismatches(backend, DEVICE, golden, dtype) == 0
    assert verify.golden_block_mismatches(backend, DEVICE, golden, dtype) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", backend_params("triton", "cpu", "cuda"))
def test_full_pair_equals_torch_backend(backend, dtype):
    assert verify.cross_backend_mismatches(backend, DEVICE, dtype, rank=256, dim=4096) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_slices_equal_smaller_blocks(backend, dtype):
    assert verify.slice_mismatches(backend, DEVICE, dtype) == 0


@pytest.mark.parametrize("seed", [0, 1, 2**32, 2**63 - 1])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_seeds_match_torch_backend_and_differ_from_each_other(backend, seed):
    A, B = vera_kernels.generate_projections(seed, 9, 70, 50, device=DEVICE, backend=backend)
    A_ref, B_ref = vera_kernels.generate_projections(seed, 9, 70, 50, backend="torch")
    assert torch.equal(A.cpu(), A_ref) and torch.equal(B.cpu(), B_ref)
    A_next, _ = vera_kernels.generate_projections(seed ^ 1, 9, 70, 50, backend="torch")
    assert (A_next != A_ref).float().mean() > 0.99


def test_distribution_is_kaiming_uniform():
    A, B = vera_kernels.generate_projections(3, 64, 4096, 512)
    for matrix, fan_in in ((A, 4096), (B, 64)):
        bound = projection_bound(fan_in)
        assert matrix.abs().max() < bound
        # Uniform on (-bound, bound): mean 0, variance bound^2 / 3.
        assert abs(matrix.mean().item()) < 0.01 * bound
        assert matrix.var().item() == pytest.approx(bound**2 / 3, rel=0.01)


def test_bound_is_peft_value():
    # PEFT's _kaiming_init: gain sqrt(2), std = gain / sqrt(fan), bound = sqrt(3) * std.
    assert projection_bound(4096) == pytest.approx((3.0**0.5) * (2.0**0.5 / 4096**0.5), rel=1e-7)


def test_torch_philox_broadcasts_keys():
    counters = torch.tensor([[0, 0, 0, 0], [1, 2, 3, 4]])
    one_key = philox4x32_10_torch(counters, torch.tensor([5, 6]))
    per_row = philox4x32_10_torch(counters, torch.tensor([[5, 6], [5, 6]]))
    assert torch.equal(one_key, per_row)


def test_fp16_integer_rounding_matches_ieee_cast():
    # Every exponent from deep subnormal to overflow, random mantissas, both signs, plus exact ties.
    gen = torch.Generator().manual_seed(0)
    exponents = torch.arange(90, 145).repeat_interleave(2000)
    mantissas = torch.randint(0, 2**23, exponents.shape, generator=gen)
    signs = torch.randint(0, 2, exponents.shape, generator=gen) << 31
    ties = (torch.arange(90, 145) << 23) | 0x1000  # halfway between two normals
    bits = torch.cat([signs | (exponents << 23) | mantissas, ties, torch.tensor([0, 0x80000000, 0x33000000])])
    values = bits.to(torch.int32).view(torch.float32)
    expected = values.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    assert torch.equal(fp32_bits_to_fp16_bits(bits), expected)


def test_cache_shares_one_pair_per_key():
    vera_kernels.clear_projection_cache()
    first = get_projections(0, 8, 64, 32)
    assert get_projections(0, 8, 64, 32) is first
    assert get_projections(0, 8, 64, 32, dtype=torch.bfloat16) is not first
    assert get_projections(1, 8, 64, 32) is not first
    vera_kernels.clear_projection_cache()
    assert get_projections(0, 8, 64, 32) is not first


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=2**63), ValueError, "seed"),
        (dict(seed=1.0), TypeError, "seed"),
        (dict(seed=True), TypeError, "seed"),
        (dict(seed="0"), TypeError, "seed"),
        (dict(rank=0), ValueError, "rank"),
        (dict(max_in=0), ValueError, "max_in"),
        (dict(max_out=-3), ValueError, "max_out"),
        (dict(rank=2.5), TypeError, "rank"),
        (dict(dtype=torch.float64), TypeError, "dtype"),
        (dict(dtype=torch.int32), TypeError, "dtype"),
        (dict(backend="tpu"), ValueError, "backend"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, words):
    args = dict(seed=0, rank=4, max_in=8, max_out=8) | kwargs
    with pytest.raises(error, match=words):
        vera_kernels.generate_projections(**args)


def test_unavailable_backend_says_why():
    missing = [s for s in vera_kernels.backends().values() if not s.available]
    for status in missing:
        with pytest.raises(RuntimeError, match="not available"):
            vera_kernels.generate_projections(0, 4, 8, 8, backend=status.name)


def test_backends_report_one_line_each():
    statuses = vera_kernels.backends()
    assert set(statuses) == {"torch", "triton", "cpu", "cuda"}
    assert statuses["torch"].available
    for status in statuses.values():
        assert status.reason and "\n" not in status.reason


def test_block_offsets_reach_the_scheme_limits():
    with pytest.raises(ValueError, match="rows < 2\\*\\*32"):
        projection_block(0, TAG_B, 2, 4, 4, row_offset=2**32 - 1)
    with pytest.raises(ValueError, match="tag"):
        projection_block(0, 2, 2, 4, 4)
    # The last addressable row still works and matches an element computed by hand from the words.
    last = projection_block(5, TAG_A, 1, 1, 4, row_offset=2**32 - 1, col_offset=7)
    word = philox4x32_10_torch(torch.tensor([7 >> 2, 2**32 - 1, TAG_A, 0]), torch.tensor([5, 0]))[7 & 3]
    odd = 2 * (int(word) >> 8) + 1 - 2**24
    # The double product of two 24-bit significands is exact: rounding it once to fp32 is the IEEE multiply.
    expected = torch.tensor(odd * projection_bound(4) * 2**-24, dtype=torch.float32)
    assert torch.equal(last[0, 0], expected)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(seed=7.0), TypeError, "seed"), (dict(seed=True), TypeError, "seed"), (dict(seed=-1), ValueError, "seed"),
    (dict(rank=8.0), TypeError, "rank"), (dict(max_in=True), TypeError, "max_in"),
    (dict(dtype=torch.float64), TypeError, "dtype"), (dict(in_features=65), ValueError, "in_features"),
    (dict(in_offset=60, in_features=5), ValueError, "in_features"), (dict(out_offset=32), ValueError, "out_offset"),
    (dict(in_offset=-1), ValueError, "in_offset"), (dict(out_offset=1.0), ValueError, "out_offset"),
])
def test_get_projections_checks_every_call(kwargs, error, words):
    # Regression: the seed was checked on a cache miss only, so 7.0 or True were accepted after 7 or 1 had
    # been cached (they hash and compare equal).
    vera_kernels.clear_projection_cache()
    get_projections(7, 8, 64, 32)
    get_projections(1, 8, 64, 32)
    get_projections(7, 8, 64, 32, dtype=torch.float32)
    args = dict(seed=7, rank=8, max_in=64, max_out=32) | kwargs
    with pytest.raises(error, match=words):
        get_projections(**args)


def test_cache_is_bounded_and_keeps_the_recently_used():
    # Regression: the cache kept every pair ever made (600 seeds: ~200 MB).
    from vera_kernels import projections

    vera_kernels.clear_projection_cache()
    kept = get_projections(0, 8, 64, 32)
    for seed in range(1, 600):
        get_projections(seed, 8, 64, 32)
        assert get_projections(0, 8, 64, 32) is kept  # used again: never the one evicted
    assert len(projections._cache) <= projections.CACHE_ENTRIES
    assert len(projections._blocks) <= 2 * projections.CACHE_ENTRIES
    vera_kernels.clear_projection_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_offset_slices_equal_the_full_pairs_slices(dtype):
    # A tensor-parallel rank generates only its shard: bit-equal to that slice of the full pair.
    A_max, B_max = vera_kernels.generate_projections(9, 8, 64, 40, dtype=dtype)
    A, B = get_projections(9, 8, 64, 40, dtype=dtype, in_offset=13, in_features=22, out_offset=5, out_features=30)
    assert torch.equal(A, A_max[:, 13:35]) and torch.equal(B, B_max[5:35])
    A, B = get_projections(9, 8, 64, 40, dtype=dtype, in_offset=61, out_offset=39)  # widths: the rest
    assert torch.equal(A, A_max[:, 61:]) and torch.equal(B, B_max[39:])


def test_pairs_share_the_blocks_they_have_in_common():
    # The colwise layers of a tensor-parallel rank: different rows of B, one A (generated once).
    vera_kernels.clear_projection_cache()
    A1, B1 = get_projections(9, 8, 64, 40, in_features=32, out_offset=0, out_features=10)
    A2, B2 = get_projections(9, 8, 64, 40, in_features=32, out_offset=10, out_features=10)
    A3, _ = get_projections(9, 8, 48, 40, in_features=32, out_offset=10, out_features=10)
    assert A2 is A1 and B2 is not B1 and not torch.equal(B2, B1)
    assert A3 is not A1 and not torch.equal(A3, A1)  # another max_in: another scale
    vera_kernels.clear_projection_cache()


def test_projection_shard_is_the_slice_and_keys_as_its_pair():
    from vera_kernels import SeededProjectionShard, SeededProjections

    whole = SeededProjections(3, 4, 20, 30)
    shard = SeededProjectionShard(3, 4, 20, 30, in_offset=0, in_features=20, out_offset=15, out_features=15)
    assert shard.key() == whole.key()  # one shared pair for save_adapter
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        A, B = whole.pair(torch.device("cpu"), dtype)
        A_s, B_s = shard.pair(torch.device("cpu"), dtype)
        assert torch.equal(A_s, A) and torch.equal(B_s, B[15:])
    with pytest.raises(ValueError, match="out_offset 16 \\+ out_features 15"):
        SeededProjectionShard(3, 4, 20, 30, in_offset=0, in_features=20, out_offset=16, out_features=15)
