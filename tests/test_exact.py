"""The exact arithmetic against a reference written with Python integers."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import momres
from momres import _exact

from helpers import gradients, relative_error

LIMIT = 2**51


def reference_mul(c: int, i: int, num: int, den: int) -> tuple[int, int]:
    """DESIGN.md's multiplication c <- c*num/den with floor division and floor modulo."""
    i = i * den + c % den
    c //= den
    c = c * num + i % num
    i //= num
    return c, i


fractions = st.tuples(st.integers(1, 2**16), st.integers(1, 2**16)).map(
    lambda t: (min(t), max(t))
)


@settings(max_examples=300, deadline=None)
@given(
    frac=fractions,
    values=st.lists(st.integers(-LIMIT, LIMIT), min_size=1, max_size=16),
    buffers=st.lists(st.integers(0, 2**30), min_size=16, max_size=16),
)
def test_multiply_matches_integer_reference_and_reverses(frac, values, buffers):
    num, den = frac
    buffers = buffers[: len(values)]
    c = torch.tensor(values, dtype=torch.float64)
    i = torch.tensor(buffers, dtype=torch.float64)
    c2, i2, tmp = _exact.mul_frac_(c.clone(), i.clone(), torch.empty_like(c), num, den)
    expected = [reference_mul(v, b, num, den) for v, b in zip(values, buffers, strict=True)]
    assert [int(x) for x in c2.tolist()] == [e[0] for e in expected]
    assert [int(x) for x in i2.tolist()] == [e[1] for e in expected]
    # The same call with num and den swapped is the exact inverse.
    c3, i3, _ = _exact.mul_frac_(c2, i2, tmp, den, num)
    assert torch.equal(c3, c) and torch.equal(i3, i)


@settings(max_examples=50, deadline=None)
@given(frac=fractions, depth=st.integers(1, 400))
def test_spill_schedule_keeps_buffer_exact(frac, depth):
    """Driving the worst case (largest remainders) through the schedule never leaves 2**53."""
    num, den = frac
    bound = 0
    schedule, final = _exact.spill_schedule(num, den, depth)
    for spill in schedule:
        if spill:
            bound = 0
        assert bound * den + den - 1 < _exact.EXACT_LIMIT
        bound = (bound * den + den - 1) // num
    assert final == bound


def test_spills_happen_and_depth_is_unlimited():
    schedule, _ = _exact.spill_schedule(1, 20, 1000)  # gamma = 0.05: 4.3 bits per block
    assert 50 < sum(schedule) < 120
    assert not any(_exact.spill_schedule(9, 10, 300)[0])  # 0.15 bits per block fit in one word


@pytest.mark.parametrize("depth, dtype", [(32, torch.uint8), (64, torch.int16),
                                          (128, torch.int32), (256, torch.float64)])
def test_buffer_is_stored_as_narrow_as_its_bound_allows(depth, dtype):
    """At gamma = 0.9 the buffer gains 0.15 bits a block: 32 blocks fit in a byte."""
    _, bound = _exact.spill_schedule(9, 10, depth)
    buffer = torch.full((3,), float(bound), dtype=torch.float64)
    narrow = buffer.to(_exact.narrow_dtype(bound))
    assert narrow.dtype == dtype
    assert torch.equal(narrow.to(torch.float64), buffer)  # the largest value survives


def test_snap_gamma_and_buffer_growth():
    assert _exact.snap_gamma(0.9) == _exact.snap_gamma(0.9000001)
    assert _exact.snap_gamma(0.9).denominator == 10
    assert _exact.snap_gamma(0.123456789).denominator <= 2**16
    assert abs(_exact.buffer_bits_per_block(9, 10) - 0.152) < 1e-3


def test_grid_and_units_round_trip():
    x = torch.randn(1000, dtype=torch.float64) * 100
    k = 30
    grid = _exact.to_grid(x, k)
    assert (grid - x).abs().max() <= 2.0 ** (-k - 1)
    assert torch.equal(_exact.from_units(_exact.to_units(grid, k), k, torch.float64), grid)
    assert torch.equal(_exact.to_units(grid, k), grid * 2.0**k)


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(st.integers(-(2**52) + 1, 2**52 - 1), min_size=1, max_size=32),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
)
def test_split_grid_round_trip_over_the_whole_range(values, dtype):
    """Output value + remainder rebuild the grid state exactly (k = 30: |x| < 2**22)."""
    k = 30
    grid = torch.tensor(values, dtype=torch.float64) * 2.0**-k
    value, remainder = _exact.split_grid_(grid.clone(), k, dtype)
    assert value.dtype == dtype
    if dtype == torch.float16:  # beyond float16's range the value is inf: not a use case
        finite = value.isfinite()
        grid, value = grid[finite], value[finite]
        remainder = None if remainder is None else remainder[finite]
    assert torch.equal(_exact.join_grid(value, remainder, k), grid)


def tiny_pair(scale: float, dtype=torch.float32, **options):
    """Memory-free and plain gradients of bias-free blocks on ``x`` of magnitude ``scale``."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(8, 16, bias=False), nn.Tanh(),
                            nn.Linear(16, 8, bias=False)).to(dtype) for _ in range(4)]
    x = torch.randn(4, 8, dtype=dtype) * scale
    return [gradients(momres.MomentumNet(blocks, 0.9, memory_efficient=me, **options), x)
            for me in (True, False)]


@pytest.mark.parametrize("scale", [1e-5, 1e-6, 1e-7, 1e-8, 1e-9])
def test_tiny_activations_warn_and_name_the_remedies(scale):
    """Below 2**16 grid units (6.1e-5 at frac_bits=30) the grid, not float32, sets the error:
    measured 3e-4 (1e-5) to 0.6 (1e-8) relative."""
    with pytest.warns(RuntimeWarning, match="tiny.*frac_bits.*rescale.*exact=False"):
        tiny_pair(scale)


@pytest.mark.parametrize("scale, frac_bits", [(1e-6, 46), (1e-8, 50)])
def test_tiny_activations_are_precise_with_more_frac_bits(scale, frac_bits):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact, plain = tiny_pair(scale, frac_bits=frac_bits)
    assert relative_error(exact, plain) < 1e-5


@pytest.mark.parametrize("scale, dtype", [(1.0, torch.float32), (1e-3, torch.float32),
                                          (1e-5, torch.float64), (1e-5, torch.bfloat16)])
def test_normal_activations_do_not_warn(scale, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_pair(scale, dtype)


def test_zero_activations_do_not_warn():
    """An exact zero loses nothing on the grid (zero-initialised blocks at the start)."""
    block = nn.Linear(8, 8)
    nn.init.zeros_(block.weight)
    nn.init.zeros_(block.bias)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        momres.MomentumNet([block], 0.9)(torch.zeros(2, 8, requires_grad=True)).sum().backward()


@settings(max_examples=50, deadline=None)
@given(frac=fractions, depth=st.integers(1, 400))
def test_each_block_buffer_type_holds_its_segment_bound(frac, depth):
    """The buffer of block n is stored in a type that holds every value it can reach before
    its next spill, and one type serves a whole segment (the tensor is reused across it)."""
    num, den = frac
    schedule, _ = _exact.spill_schedule(num, den, depth)
    dtypes = _exact.segment_dtypes(num, den, schedule)
    bound = 0
    for n, spill in enumerate(schedule):
        if spill:
            bound = 0
        bound = (bound * den + den - 1) // num
        assert bound <= (2**53 if dtypes[n] == torch.float64 else torch.iinfo(dtypes[n]).max)
        if n and not spill:
            assert dtypes[n] == dtypes[n - 1]


@pytest.mark.parametrize("shape, channels_last", [((37, 16384), False),
                                                  ((40, 8, 32, 32), True), ((300,), False)])
def test_chunked_arithmetic_rebuilds_every_layout_exactly(shape, channels_last):
    """Chunks are slices along dim 0, the last one shorter; every layout is cut alike."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        assert _exact.chunk_rows(x) == 32  # chunks of 32 and 8 rows
        blocks = [nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Tanh()) for _ in range(3)]
    elif len(shape) == 2:
        blocks = [nn.Sequential(nn.Linear(16384, 8), nn.Tanh(), nn.Linear(8, 16384))
                  for _ in range(3)]
        assert _exact.chunk_rows(x) == 16  # chunks of 16, 16 and 5 rows
    else:
        blocks = [nn.Tanh() for _ in range(3)]
    net = momres.MomentumNet(blocks, 0.9)
    with momres.debug.record_states() as log:
        exact = gradients(net, x)
    for n in range(3):
        for a, b in zip(log["forward"][n], log["backward"][n], strict=True):
            assert torch.equal(a, b), n
    plain = gradients(momres.MomentumNet(blocks, 0.9, memory_efficient=False), x)
    assert relative_error(exact, plain) < 1e-4
