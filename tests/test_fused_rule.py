"""The rule's buffer-saving paths (issue 15) give the numbers of the paths they replace, bit for
bit: ``RuleStep`` updating the rule's own velocity in place, and the fused kernels of the
memory-free backward."""

import shutil

import pytest
import torch
from torch import nn

import momres
from momres import _kernels
from momres._rule import RuleStep

from helpers import kernel_library, private_kernel_cache  # noqa: F401 (a fixture)

# Every test builds into (or reuses) one cache of this session's own.
pytestmark = [pytest.mark.skipif(shutil.which(_kernels.compiler()) is None,
                                 reason="no C compiler: the fused kernels cannot be built"),
              pytest.mark.usefixtures("private_kernel_cache")]


def values(n, dtype, generator):
    """Random values of widely spread magnitudes, with exact zeros of both signs."""
    t = torch.randn(n, generator=generator, dtype=torch.float64)
    t *= 10.0 ** torch.randint(-6, 3, (n,), generator=generator)
    t[:3] = torch.tensor([0.0, -0.0, 0.5])
    return t.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("residual", [True, False])
def test_rule_step_kernel_matches_the_eager_operations(dtype, residual):
    """An odd length: the vectorised body and the scalar tail."""
    gen, n = torch.Generator().manual_seed(5), 100_003
    x, v, y = (values(n, dtype, gen) for _ in range(3))
    g = y if residual else y - x
    v_new = torch.mul(v, 0.9).add_(g, alpha=1 - 0.9)
    x_new = _kernels.rule_step_(kernel_library(), x, v, y, 0.9, residual)
    assert torch.equal(v, v_new) and torch.equal(x_new, x + v_new)


@pytest.mark.parametrize("kernels", ["1", "0"])
def test_autograd_with_the_velocity_updated_in_place_matches_fresh_tensors(monkeypatch,
                                                                           kernels):
    """``momentum_rule`` (own velocity updated in place after the first block) against the
    same steps with a new velocity each: the same outputs and gradients, bit for bit."""
    monkeypatch.setenv("MOMRES_KERNELS", kernels)
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh()) for _ in range(5)]
    net = momres.MomentumNet(blocks, 0.9, residual=False, memory_efficient=False)
    x = torch.randn(8, 4, 6, 6, requires_grad=True)

    def fresh(x):
        v = torch.zeros_like(x)
        for f in blocks:
            x, v = RuleStep.apply(x, v, f(x), net.gamma, False, False, False)
        return x, v

    results = []
    for run in (lambda x: net(x, return_velocity=True), fresh):
        x_out, v_out = run(x)
        grads = torch.autograd.grad((x_out.square().sum() + v_out.sin().sum()),
                                    [x, *net.parameters()])
        results.append([x_out.detach(), v_out.detach(), *grads])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("residual", [True, False])
def test_backward_gradient_kernel_matches_the_eager_operations(dtype, residual):
    gen, n, gamma = torch.Generator().manual_seed(6), 100_003, 0.9
    a_x, b, grad = (values(n, dtype, gen) for _ in range(3))
    want_x = a_x.clone().add_(grad if residual else grad - b, alpha=1 - gamma)
    want_v = b * gamma
    assert _kernels.rule_grads_(kernel_library(), a_x, b, grad, gamma, residual)
    assert torch.equal(a_x, want_x) and torch.equal(b, want_v)


def test_backward_gradient_kernel_refuses_a_gradient_sharing_the_cotangent():
    b = torch.randn(10)
    assert not _kernels.rule_grads_(kernel_library(), torch.randn(10), b, b, 0.9, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rebuilds_from_a_blocks_output_and_input_match_the_difference(dtype):
    """``g = y - x`` taken in the rebuild's pass: float mode's kernel and the exact one."""
    gen, n, lib = torch.Generator().manual_seed(7), 100_003, kernel_library()
    v, y, x = (values(n, dtype, gen) for _ in range(3))
    want, got = v.clone(), v.clone()
    assert _kernels.rule_rebuild_(lib, want, y - x, 0.9)
    assert _kernels.rule_rebuild_(lib, got, y, 0.9, x)
    assert torch.equal(got, want)
    units = torch.randint(-2**40, 2**40, (n,), generator=gen).double()
    buf = torch.randint(0, 2**31 - 1, (n,), generator=gen).to(torch.int32)
    results = []
    for g, skip in ((y - x, None), (y, x)):
        vt, bt = units.clone(), buf.clone()
        assert _kernels.backward_step_(lib, vt, bt, g, 9, 10, 0.1 * 2.0**30, skip)
        results.append((vt, bt))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_advance_from_a_blocks_output_matches_the_difference(dtype):
    """Float mode's forward step given ``y`` at the position ``x`` itself: ``g = y - x``."""
    gen, n, lib = torch.Generator().manual_seed(8), 100_003, kernel_library()
    x, v, y = (values(n, dtype, gen) for _ in range(3))
    want_x, want_v = x.clone(), v.clone()
    assert _kernels.rule_advance_(lib, want_x, want_v, y - x, 0.9)
    assert _kernels.rule_advance_(lib, x, v, y, 0.9, skip=True)
    assert torch.equal(x, want_x) and torch.equal(v, want_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_forward_step_writes_the_next_input_as_the_conversion_would(dtype):
    gen, n, lib = torch.Generator().manual_seed(9), 100_003, kernel_library()
    x = torch.randn(n, generator=gen, dtype=torch.float64) * 2.0**20
    v = torch.randint(-2**40, 2**40, (n,), generator=gen).double()
    buf, g = torch.zeros(n, dtype=torch.float64), values(n, dtype, gen)
    pos = torch.empty(n, dtype=dtype)
    assert _kernels.forward_step_(lib, x, v, buf, g, 9, 10, 0.1 * 2.0**30, 2.0**-30, pos)
    assert torch.equal(pos, x.to(dtype))
