"""Every refusal is a clear error that names the problem and the remedy."""

import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

import momres


def blocks(depth: int = 3) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(4, 4) for _ in range(depth)]


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan"), "0.9", True])
def test_gamma_outside_unit_interval(gamma):
    with pytest.raises(ValueError, match=r"gamma must be a number in \[0, 1\]"):
        momres.MomentumNet(blocks(), gamma)


def test_gamma_zero_memory_free_names_the_remedy():
    with pytest.raises(ValueError, match="memory_efficient=False"):
        momres.MomentumNet(blocks(), 0.0)
    momres.MomentumNet(blocks(), 0.0, memory_efficient=False)  # accepted


@pytest.mark.parametrize("strategy", ["exact", "autograd", "checkpoint",
                                      momres.Strategy("exact", keep_last=1),
                                      momres.Strategy("checkpoint", segment=2),
                                      momres.Strategy("checkpoint", keep_last=1, segment=2)])
def test_block_changing_shape_names_block_and_shapes(strategy):
    """The block named is the stage's, however the strategy splits the stage into runs."""
    net = momres.MomentumNet([*blocks(3), nn.Linear(4, 5)], 0.9)
    net.strategy = strategy
    with pytest.raises(ValueError, match=r"block 3 \(Linear\).*\(2, 4\) to \(2, 5\)"):
        net(torch.randn(2, 4, requires_grad=True))


def test_not_a_module_and_empty_and_integer_input():
    with pytest.raises(TypeError, match="block 1 is a builtin_function_or_method, not an nn"):
        momres.MomentumNet([nn.Linear(4, 4), torch.tanh])
    with pytest.raises(ValueError, match="at least one block"):
        momres.MomentumNet([])
    with pytest.raises(TypeError, match="floating-point"):
        momres.MomentumNet(blocks())(torch.ones(2, 4, dtype=torch.long))


def test_double_backward_is_refused():
    net = momres.MomentumNet(blocks(), 0.9)
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward.*memory_efficient=False"):
        torch.autograd.grad(net(x).square().sum(), x, create_graph=True)


def test_fixed_point_overflow_names_the_remedies():
    net = momres.MomentumNet(blocks(), 0.9)
    with pytest.raises(OverflowError, match="frac_bits.*exact=False"):
        net(torch.full((2, 4), 1e7, requires_grad=True))
    # Fewer fractional bits buy range.
    momres.MomentumNet(blocks(), 0.9, frac_bits=20)(torch.full((2, 4), 1e7, requires_grad=True))


def test_non_finite_block_output():
    class Bad(nn.Module):
        def forward(self, x):
            return x / 0

    with pytest.raises(FloatingPointError, match="block 0 returned non-finite"):
        momres.MomentumNet([Bad()], 0.9)(torch.ones(2, 4, requires_grad=True))


def test_non_deterministic_block_fails_the_self_check():
    class Noisy(nn.Module):
        """Draws from a private generator the replay cannot know about."""

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.gen = torch.Generator().manual_seed(0)

        def forward(self, x):
            return self.lin(x) + 1e-3 * torch.randn(x.shape, generator=self.gen)

    net = momres.MomentumNet([Noisy() for _ in range(3)], 0.9)
    out = net(torch.randn(2, 4, requires_grad=True))
    with pytest.raises(RuntimeError, match="did not rebuild the forward's exact state"):
        out.sum().backward()


def test_in_place_modification_of_the_input_is_refused():
    net = momres.MomentumNet([nn.ReLU(inplace=True)], 0.9, exact=False)
    with pytest.raises(RuntimeError, match="modified its input in place"):
        net(torch.randn(2, 4, requires_grad=True))


def test_init_velocity_of_wrong_shape():
    net = momres.MomentumNet(blocks(), 0.9, init_velocity=nn.Linear(4, 3))
    with pytest.raises(ValueError, match="initial velocity must have the shape of x"):
        net(torch.randn(2, 4))


@pytest.mark.parametrize("gamma", [np.float32(0.9), np.float64(0.9), Fraction(9, 10), 1])
def test_gamma_any_real_number(gamma):
    net = momres.MomentumNet(blocks(), gamma)
    assert net.gamma_fraction == ((9, 10) if gamma != 1 else (1, 1))


@pytest.mark.parametrize("gamma", [np.True_, np.float32("nan"), torch.tensor(0.9), None])
def test_gamma_not_a_real_number(gamma):
    with pytest.raises(ValueError, match=r"gamma must be a number in \[0, 1\]"):
        momres.MomentumNet(blocks(), gamma)


@pytest.mark.parametrize("gamma, used", [(0.99999, "65535/65536"), (1.2e-5, "1/65536")])
def test_gamma_snapped_far_warns_with_the_value_used(gamma, used):
    with pytest.warns(UserWarning, match=f"gamma={gamma!r} is snapped to {used}"):
        momres.MomentumNet(blocks(), gamma)


@pytest.mark.parametrize("gamma", [0.9, 0.9000001, 0.123456789, 0.99, 0.0, 1.0])
def test_gamma_snapped_close_is_silent(gamma):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        momres.MomentumNet(blocks(), gamma, memory_efficient=gamma > 0)


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_gamma_below_one_snapped_to_one_is_refused(memory_efficient):
    """At gamma = 1 the velocity never changes: the stage would silently ignore its blocks."""
    with pytest.raises(ValueError, match=r"gamma=0.999999 is too close to 1.*gamma <= 0.99998"):
        momres.MomentumNet(blocks(), 0.999999, memory_efficient=memory_efficient)


def test_half_output_beyond_its_range_is_refused():
    class Push(nn.Module):
        def forward(self, x):
            return torch.full_like(x, 1e4)

    net = momres.MomentumNet([Push()], 0.9)
    with pytest.raises(OverflowError, match="output overflows torch.float16"):
        net(torch.full((2, 4), 65000.0, dtype=torch.half, requires_grad=True))
