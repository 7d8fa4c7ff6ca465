"""ReversibleStage: the memory-free backward against plain autograd through the same rule."""

import functools

import pytest
import torch
from torch import nn

import momres
from momres import ReversibleStage

from helpers import gradients, output_and_gradients


def mlp(width: int = 3, hidden: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, width)).double()


def conv_branch(dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(
        nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1), nn.Dropout(dropout),
        nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1),
    ).double()


def reference(fs, gs, x, *args, **kwargs):
    """The coupling written out, for plain autograd."""
    x1, x2 = x[:, : x.shape[1] // 2], x[:, x.shape[1] // 2 :]
    for f, g in zip(fs, gs, strict=True):
        x1 = x1 + f(x2, *args, **kwargs)
        x2 = x2 + g(x1, *args, **kwargs)
    return torch.cat([x1, x2], 1)


def test_memory_free_gradients_equal_plain_autograd():
    torch.manual_seed(0)
    fs, gs = [mlp() for _ in range(6)], [mlp() for _ in range(6)]
    stage = ReversibleStage(fs, gs)
    x = torch.randn(5, 6, dtype=torch.float64)
    params = list(stage.parameters())
    out, fast = output_and_gradients(stage, x, wrt=params)
    expected, plain = output_and_gradients(functools.partial(reference, fs, gs), x, wrt=params)
    assert torch.allclose(out, expected, rtol=0, atol=1e-14)
    for a, b in zip(fast, plain, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck():
    torch.manual_seed(1)
    stage = ReversibleStage([mlp(2, 4) for _ in range(3)], [mlp(2, 4) for _ in range(3)])
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(stage, (x,))


def test_shared_blocks_and_tensor_argument_as_in_learning_to_optimize():
    """One F and one G across all layers, each also given a tensor y that needs a gradient."""

    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3).double()

        def forward(self, z, y, *, scale):
            return torch.tanh(self.lin(z) - y) * scale

    torch.manual_seed(2)
    f, g, depth = Step(), Step(), 20
    x = torch.randn(4, 6, dtype=torch.float64)
    y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    params = [*f.parameters(), *g.parameters()]
    results = []
    for me in (True, False):
        stage = ReversibleStage([f] * depth, [g] * depth, memory_efficient=me)
        assert len(list(stage.parameters())) == 4  # shared, counted once
        results.append(gradients(stage, x, y, wrt=[y, *params], scale=0.5))
    written_out = functools.partial(reference, [f] * depth, [g] * depth)
    results.append(gradients(written_out, x, y, wrt=[y, *params], scale=0.5))
    for a, b, c in zip(*results, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
        assert torch.allclose(b, c, rtol=1e-12, atol=1e-14)


def test_batchnorm_and_dropout_replayed_in_train_mode():
    torch.manual_seed(3)
    fs, gs = [conv_branch(0.3) for _ in range(4)], [conv_branch(0.3) for _ in range(4)]
    x = torch.randn(4, 4, 5, 5, dtype=torch.float64)
    initial = [b.clone() for f in fs + gs for b in f.buffers()]
    runs = []
    for me in (True, False):
        for block, value in zip([b for f in fs + gs for b in f.buffers()], initial, strict=True):
            block.copy_(value)
        stage = ReversibleStage(fs, gs, memory_efficient=me).train()
        params = list(stage.parameters())
        torch.manual_seed(4)
        runs.append((gradients(stage, x, wrt=params),
                     [b.clone() for f in fs + gs for b in f.buffers()], torch.get_rng_state()))
    (fast, buffers_fast, rng_fast), (plain, buffers_plain, rng_plain) = runs
    for a, b in zip(fast, plain, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    # Running statistics updated once per forward, as with plain autograd.
    for a, b in zip(buffers_fast, buffers_plain, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(rng_fast, rng_plain)


def test_inverse_reconstructs_the_input():
    torch.manual_seed(5)
    stage = ReversibleStage([mlp() for _ in range(32)], [mlp() for _ in range(32)])
    x = torch.randn(8, 6, dtype=torch.float64)
    with torch.no_grad():
        back = stage.inverse(stage(x))
    assert torch.allclose(back, x, rtol=0, atol=1e-12)
    conv = ReversibleStage([conv_branch() for _ in range(3)], [conv_branch() for _ in range(3)])
    z = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(conv.inverse(conv.eval()(z)), z, rtol=0, atol=1e-12)


def test_stores_one_output_whatever_the_depth():
    x = torch.randn(16, 6, dtype=torch.float64, requires_grad=True)
    sizes = {}
    for depth in (2, 16):
        blocks = [[mlp(3, 64) for _ in range(depth)] for _ in range(2)]
        sizes[depth] = (momres.activation_memory(ReversibleStage(*blocks), x),
                        momres.activation_memory(ReversibleStage(*blocks, memory_efficient=False),
                                                 x))
    assert sizes[2][0] == sizes[16][0] <= 2 * x.numel() * 8  # input and output
    assert sizes[16][1] > 7 * sizes[2][1] / 2


def test_errors():
    with pytest.raises(ValueError, match="as many F blocks as G blocks"):
        ReversibleStage([mlp()], [])
    stage = ReversibleStage([mlp()], [mlp()])
    with pytest.raises(ValueError, match="two halves.*even"):
        stage(torch.randn(2, 5, dtype=torch.float64, requires_grad=True))
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(stage(x).sum(), x, create_graph=True)
