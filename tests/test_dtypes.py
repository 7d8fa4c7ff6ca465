"""Narrow dtypes (float16, bfloat16) and empty batches: the memory-free stage against its
plain-autograd twin over the same blocks."""

import pytest
import torch
from torch import nn

import momres

from helpers import output_and_gradients, relative_error

#: Significant bits of each dtype (implicit bit included): its rounding unit is 2**-bits.
BITS = {torch.float16: 11, torch.bfloat16: 8}


def blocks(depth: int, dtype: torch.dtype) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)).to(dtype)
            for _ in range(depth)]


def both(functions, x, **options):
    """Output and gradients of the memory-free net and of its plain-autograd twin."""
    return [output_and_gradients(momres.MomentumNet(functions, 0.9, memory_efficient=me,
                                                    **options), x)
            for me in (True, False)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("depth", [1, 2, 8])
def test_exact_mode_in_narrow_dtypes_matches_autograd(dtype, depth):
    torch.manual_seed(1)
    x = torch.randn(16, 8, dtype=dtype)
    functions = blocks(depth, dtype)
    with momres.debug.record_states() as log:
        (out, grads), (plain_out, plain_grads) = both(functions, x)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert torch.isfinite(out).all()
    # The backward rebuilds the forward's state bit for bit...
    for n, state in log["forward"].items():
        for a, b in zip(state, log["backward"][n], strict=True):
            assert torch.equal(a, b), n
    # ...but that state is the fixed-point one, finer than the dtype: plain autograd rounds x
    # and v to the dtype at every block.  So the outputs differ by the dtype's rounding of the
    # running state (a few units of its last place), and so do the gradients, computed at
    # states that differ by that much; measured up to ~2 units of 2**-bits relative.
    unit = 2.0 ** -BITS[dtype]
    assert relative_error([out.double()], [plain_out.double()]) < 2 * unit
    assert relative_error([g.double() for g in grads], [g.double() for g in plain_grads]) \
        < 4 * unit


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float_mode_in_narrow_dtypes_matches_autograd(dtype):
    torch.manual_seed(1)
    x = torch.randn(16, 8, dtype=dtype)
    (out, grads), (plain_out, plain_grads) = both(blocks(8, dtype), x, exact=False)
    # The forward is the plain rule, operation for operation: the same numbers.
    assert torch.equal(out, plain_out)
    # The backward divides by gamma in the dtype: each block adds a rounding of 2**-bits.
    unit = 2.0 ** -BITS[dtype]
    assert relative_error([g.double() for g in grads], [g.double() for g in plain_grads]) \
        < 4 * unit


@pytest.mark.parametrize("depth", [1, 2])
def test_single_half_linear_block_is_finite(depth):
    """The quantisation of ``(1 - gamma) g * 2**30`` must not overflow float16 (max 65504)."""
    torch.manual_seed(0)
    net = momres.MomentumNet([nn.Linear(8, 8).half() for _ in range(depth)], 0.9)
    x = torch.randn(4, 8, dtype=torch.half, requires_grad=True)
    out = net(x)
    assert torch.isfinite(out).all()
    out.float().square().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_half_precision_model_trains_a_step():
    model = momres.models.create_model("mresnet20").half()
    x = torch.randn(2, 3, 32, 32, dtype=torch.half)
    out = model(x)
    assert torch.isfinite(out).all()
    out.float().logsumexp(1).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_narrow_dtypes_keep_float32_quantisation():
    """Narrow types are quantised in float64; float32 keeps its own (bit-for-bit) arithmetic."""
    from momres import _exact

    g = torch.tensor([1.0, -3.0, 1e-3, 65504.0], dtype=torch.float16)
    scale = 0.1 * 2.0**30
    out = _exact.quantise(g, scale, out=torch.empty(4, dtype=torch.float64))
    assert torch.equal(out, (g.double() * scale).round())
    g32 = torch.randn(100)
    out32 = _exact.quantise(g32, scale, out=torch.empty(100, dtype=torch.float64))
    assert torch.equal(out32, (g32 * scale).double().round())


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_empty_batch_like_plain_autograd(exact, dtype):
    functions = blocks(3, dtype)
    x = torch.randn(0, 8, dtype=dtype)
    (out, grads), (plain_out, plain_grads) = both(functions, x, exact=exact)
    assert out.shape == plain_out.shape == (0, 8)
    for g, p in zip(grads, plain_grads, strict=True):
        assert g.shape == p.shape and not g.any() and not p.any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_on_cpu_matches_plain_autograd(dtype):
    """float32 parameters and input, blocks run in ``dtype`` under autocast: the state is
    float32's (frac_bits 30), the blocks' outputs are rounded to ``dtype``."""
    functions = blocks(8, torch.float32)
    torch.manual_seed(1)
    x = torch.randn(16, 8)
    with torch.autocast("cpu", dtype=dtype):
        (out, grads), (plain_out, plain_grads) = both(functions, x)
    unit = 2.0 ** -BITS[dtype]
    assert relative_error([out.double()], [plain_out.double()]) < 2 * unit
    assert relative_error([g.double() for g in grads], [g.double() for g in plain_grads]) \
        < 4 * unit
