"""MomentumNet: the memory-free backward against plain autograd through the same rule."""

import copy
import functools

import pytest
import torch
from torch import nn

import momres

import helpers
from helpers import relative_error


def mlp(width: int = 6, hidden: int = 12) -> nn.Module:
    return nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, width))


def stack(depth: int, seed: int = 0, dtype=torch.float64) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [mlp().to(dtype) for _ in range(depth)]


def gradients(net: nn.Module, x: torch.Tensor, *args, **kwargs) -> list[torch.Tensor]:
    """Gradients of a fixed loss of both outputs, ``x_N`` and ``v_N``."""
    return helpers.gradients(functools.partial(net, return_velocity=True), x, *args,
                             wrt=[p for p in net.parameters() if p.requires_grad], **kwargs)


def pair(functions, gamma, **options):
    """The memory-free net and its plain-autograd twin over the same blocks."""
    return (momres.MomentumNet(functions, gamma, **options),
            momres.MomentumNet(functions, gamma, memory_efficient=False,
                               **{k: v for k, v in options.items() if k != "exact"}))


@pytest.mark.parametrize("gamma", [0.99, 0.9, 0.5, 0.2, 0.05])
@pytest.mark.parametrize("depth", [1, 7, 64, 256])
def test_exact_gradients_match_autograd(gamma, depth):
    fast, plain = pair(stack(depth), gamma)
    x = torch.randn(5, 6, dtype=torch.float64)
    assert relative_error(gradients(fast, x), gradients(plain, x)) <= 1e-6


def test_float_mode_gradients_match_at_moderate_depth():
    fast, plain = pair(stack(8), 0.9, exact=False)
    x = torch.randn(5, 6, dtype=torch.float64)
    assert relative_error(gradients(fast, x), gradients(plain, x)) <= 1e-9


def test_float_mode_drifts_where_exact_mode_does_not():
    """The reason exact mode exists: float inversion amplifies rounding by 1/gamma per block.
    Where that ruins the gradients, float mode's self-check says so instead of returning them."""
    blocks = stack(64, dtype=torch.float32)
    x = torch.randn(5, 6)
    reference = gradients(momres.MomentumNet(blocks, 0.5, memory_efficient=False), x)
    exact = relative_error(gradients(momres.MomentumNet(blocks, 0.5), x), reference)
    assert exact < 1e-4
    with pytest.raises(RuntimeError, match="rebuilt the stage's input with a relative error"):
        gradients(momres.MomentumNet(blocks, 0.5, exact=False), x)
    shallow = stack(8, dtype=torch.float32)  # where float inversion is accurate, it passes
    drift = relative_error(gradients(momres.MomentumNet(shallow, 0.5, exact=False), x),
                           gradients(momres.MomentumNet(shallow, 0.5, memory_efficient=False), x))
    assert drift < 1e-3


def test_gradcheck_small_stack_with_argument_and_velocity():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = mlp().double()

        def forward(self, x, c, *, shift):
            return self.inner(x) * c + shift

    torch.manual_seed(1)
    net = momres.MomentumNet([Scaled() for _ in range(4)], 0.6,
                             init_velocity=nn.Linear(6, 6).double())
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    c = torch.rand(3, 6, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, c, s: net(x, c, shift=s), (x, c, shift))


def test_state_is_rebuilt_bit_exactly_with_spills():
    """The integer state rebuilt in the backward equals the forward's at every block."""
    depth = 600
    net = momres.MomentumNet(stack(depth, dtype=torch.float32), 0.05)
    x = torch.randn(4, 6, requires_grad=True)
    with momres.debug.record_states() as log:
        net(x).sum().backward()
    assert sorted(log["forward"]) == sorted(log["backward"]) == list(range(depth))
    for n in range(depth):
        for fwd, bwd in zip(log["forward"][n], log["backward"][n], strict=True):
            assert torch.equal(fwd, bwd), f"block {n}"
    # gamma = 0.05 adds 4.3 bits per block: the buffer was spilled many times on the way.
    assert sum(momres._exact.spill_schedule(1, 20, depth)[0]) > 30


def test_shared_weights_frozen_parameters_and_inputs_without_grad():
    torch.manual_seed(0)
    shared = mlp().double()
    frozen = mlp().double().requires_grad_(False)
    blocks = [shared] * 5 + [frozen, mlp().double()]
    fast, plain = pair(blocks, 0.8)
    x = torch.randn(4, 6, dtype=torch.float64)  # no grad
    for net in (fast, plain):
        for p in net.parameters():
            p.grad = None
        net(x).square().sum().backward()
    grads_fast = [p.grad.clone() for p in fast.parameters() if p.requires_grad]
    for p in plain.parameters():
        p.grad = None
    plain(x).square().sum().backward()
    grads_plain = [p.grad for p in plain.parameters() if p.requires_grad]
    assert relative_error(grads_fast, grads_plain) <= 1e-9
    assert all(p.grad is None for p in frozen.parameters())


def test_init_velocity_is_trained_through_the_same_backward():
    torch.manual_seed(0)
    phi = nn.Linear(6, 6).double()
    fast, plain = pair(stack(6), 0.9, init_velocity=phi)
    x = torch.randn(4, 6, dtype=torch.float64)
    assert relative_error(gradients(fast, x), gradients(plain, x)) <= 1e-9
    assert any(p is phi.weight for p in fast.parameters())


@pytest.mark.parametrize("strategy", [
    momres.Strategy("checkpoint", segment=3), momres.Strategy("checkpoint", segment=3, keep_last=2),
    momres.Strategy("checkpoint", segment=9), momres.Strategy("checkpoint", keep_last=7)], ids=str)
@pytest.mark.parametrize("with_phi", [False, True], ids=["v0=0", "v0=phi(x)"])
def test_checkpointed_segments_give_autograds_gradients(strategy, with_phi):
    """Seven blocks in segments of three (the last shorter), past the end, or all kept: both
    outputs and every gradient as plain autograd's, whether v_0 is made again or stored."""
    torch.manual_seed(0)
    phi = nn.Linear(6, 6).double() if with_phi else None
    net, plain = pair(stack(7), 0.9, init_velocity=phi)
    net.strategy = strategy
    x = torch.randn(4, 6, dtype=torch.float64)
    got, expected = gradients(net, x), gradients(plain, x)
    assert relative_error(got, expected) <= 1e-12


def test_tensor_arguments_receive_gradients():
    """A decoder's encoder memory (a kwarg needing grad) gets plain autograd's gradient."""

    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(6, 6).double()

        def forward(self, x, memory, scale=1.0):
            attention = torch.softmax(self.q(x) @ memory.T * scale, dim=-1)
            return attention @ memory

    torch.manual_seed(0)
    blocks = [Attend() for _ in range(5)]
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    results = []
    for me in (True, False):
        net = momres.MomentumNet(blocks, 0.7, memory_efficient=me)
        out = net(x, memory=memory, scale=0.5)
        results.append(torch.autograd.grad(out.square().sum(), [x, memory]))
    assert relative_error(results[0], results[1]) <= 1e-9


def test_residual_false_at_gamma_zero_is_the_plain_stack():
    torch.manual_seed(0)

    class Block(nn.Module):  # a block with its own skip connection
        def __init__(self):
            super().__init__()
            self.f = mlp().double()

        def forward(self, x):
            return torch.relu(x + self.f(x))

    blocks = [Block() for _ in range(6)]
    x = torch.randn(4, 6, dtype=torch.float64)
    net = momres.MomentumNet(blocks, 0.0, residual=False, memory_efficient=False)
    assert torch.allclose(net(x), nn.Sequential(*blocks)(x), rtol=0, atol=1e-12)


def test_return_velocity_inverse_and_gamma_snapping():
    net = momres.MomentumNet(stack(10), 0.9)
    assert net.gamma_fraction == (9, 10) and net.gamma == 0.9
    x = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        x_n, v_n = net(x, return_velocity=True)
        x_0, v_0 = net.inverse(x_n, v_n)
    assert torch.allclose(x_0, x, atol=1e-9) and v_0.abs().max() < 1e-9


def test_no_grad_stores_nothing_and_all_modes_agree():
    blocks = stack(12)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        reference = momres.MomentumNet(blocks, 0.9, memory_efficient=False)(x)
        fast = momres.MomentumNet(blocks, 0.9)(x)
    assert fast.grad_fn is None and torch.equal(fast, reference)
    for exact in (True, False):
        out = momres.MomentumNet(blocks, 0.9, exact=exact)(x)
        assert torch.allclose(out, reference, atol=1e-10)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("used", ["x", "v"])
def test_one_output_unused(exact, used):
    """An unused output's gradient reaches the backward as None, not as a tensor of zeros."""
    grads, x0 = [], torch.randn(5, 6, dtype=torch.float64)
    for net in pair(stack(6), 0.8, exact=exact):
        x = x0.clone().requires_grad_()
        x_n, v_n = net(x, return_velocity=True)
        loss = (x_n if used == "x" else v_n).square().sum()
        grads.append(torch.autograd.grad(loss, [x, *net.parameters()]))
    assert relative_error(*grads) <= 1e-9


def test_retain_graph_backward_twice():
    net = momres.MomentumNet(stack(8), 0.5)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    out = net(x).square().sum()
    first = torch.autograd.grad(out, x, retain_graph=True)[0]
    second = torch.autograd.grad(out, x)[0]
    assert torch.equal(first, second)


def test_deepcopy_and_state_dict():
    net = momres.MomentumNet(stack(3), 0.9)
    clone = copy.deepcopy(net)
    clone.load_state_dict(net.state_dict())
    x = torch.randn(2, 6, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(clone(x), net(x))


def test_state_logging_is_a_debug_switch_for_both_inversions():
    torch.manual_seed(0)
    for exact in (True, False):
        net = momres.MomentumNet(stack(4), 0.8, exact=exact)
        x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
        with momres.debug.record_states() as log:
            net(x).sum().backward()
        assert sorted(log["forward"]) == sorted(log["backward"]) == [0, 1, 2, 3]
        forward, rebuilt = log["forward"][0], log["backward"][0]
        assert torch.allclose(forward[0], x.detach(), atol=1e-9)  # x_0 entering block 0
        for a, b in zip(forward, rebuilt, strict=True):
            assert torch.equal(a, b) if exact else torch.allclose(a, b, atol=1e-12)
        assert momres.debug.state_log() is None  # off again outside the context


def reference_rule(blocks, gamma, x, v, residual):
    """The rule written out with plain torch operations: the independent reference."""
    for f in blocks:
        y = f(x)
        v = v * gamma + (1 - gamma) * (y if residual else y - x)
        x = x + v
    return x, v


@pytest.mark.parametrize("residual", [True, False])
def test_rule_under_autograd_matches_the_rule_written_out(residual):
    """``memory_efficient=False`` runs each block's update as one Function (``RuleStep``)
    with a hand-written backward: the same values and gradients as the rule in plain ops."""
    blocks = stack(5)
    x = torch.randn(4, 6, dtype=torch.float64)
    # v_0 = x_0 (init_velocity=Identity): both the x and the v paths carry gradients.
    net = momres.MomentumNet(blocks, 0.7, memory_efficient=False, residual=residual,
                             init_velocity=nn.Identity())
    ours = helpers.output_and_gradients(functools.partial(net, return_velocity=True), x,
                                        wrt=list(net.parameters()))
    written = helpers.output_and_gradients(
        lambda x: reference_rule(blocks, 0.7, x, x, residual), x, wrt=list(net.parameters()))
    for a, b in zip(ours[0], written[0], strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert relative_error(ours[1], written[1]) <= 1e-12


@pytest.mark.parametrize("residual", [True, False])
def test_rule_under_autograd_is_twice_differentiable(residual):
    torch.manual_seed(2)
    net = momres.MomentumNet(stack(3), 0.6, memory_efficient=False, residual=residual,
                             init_velocity=nn.Linear(6, 6).double())
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: net(x, return_velocity=True), (x,))
    assert torch.autograd.gradgradcheck(lambda x: net(x, return_velocity=True), (x,))


def test_retain_graph_backward_twice_with_spills():
    """The spilled buffers are rebuilt in place only when no later backward needs them."""
    net = momres.MomentumNet(stack(40), 0.05)
    assert any(momres._exact.spill_schedule(1, 20, 40)[0])
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    out = net(x).square().sum()
    first = torch.autograd.grad(out, [x, *net.parameters()], retain_graph=True)
    second = torch.autograd.grad(out, [x, *net.parameters()])
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


class _Ending(nn.Module):
    """A block ending in ``last``: some operations' backward keeps their output (tanh,
    softmax, ReLU), others' does not (add, layer norm), some blocks keep it themselves; the
    recompute hands the output over as a gradient edge before its backward, and whatever
    still holds it must still read it."""

    def __init__(self, last: str, residual: bool) -> None:
        super().__init__()
        self.lin, self.norm, self.last, self.residual = nn.Linear(6, 6), nn.LayerNorm(6), last, \
            residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        h = {"tanh": torch.tanh, "softmax": lambda t: t.softmax(-1), "relu": torch.relu,
             "sigmoid": torch.sigmoid, "norm": self.norm, "add": lambda t: t + 1,
             "view": lambda t: torch.tanh(t).view(t.shape), "mul": lambda t: t * t,
             "kept": lambda t: t + 1, "kept detached": lambda t: t + 1}[self.last](h)
        out = h if self.residual else x + h
        if self.last == "kept":
            self.kept = out
        elif self.last == "kept detached":
            self.kept = out.detach()
        return out


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("last", ["tanh", "softmax", "relu", "sigmoid", "norm", "add", "view",
                                  "mul", "kept", "kept detached"])
def test_block_outputs_let_go_before_the_backward_keep_the_gradients(last, residual):
    torch.manual_seed(0)
    blocks = [_Ending(last, residual).double() for _ in range(3)]
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    fast = helpers.gradients(momres.MomentumNet(blocks, 0.9, residual=residual), x)
    if "kept" in last:  # what the block kept in the recompute is still readable
        assert all(torch.isfinite(b.kept).all() for b in blocks)
    slow = helpers.gradients(momres.MomentumNet(blocks, 0.9, residual=residual,
                                                memory_efficient=False), x)
    assert relative_error(fast, slow) < 1e-9
