"""Train mode replayed exactly: BatchNorm statistics, dropout, autocast."""

import pytest
import torch
from torch import nn

import momres


def conv_block(dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Dropout(dropout), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
    )


def train_step(memory_efficient: bool, dtype=torch.float64, seed: int = 0, **options):
    """One training step from identical weights and RNG state; what it leaves behind."""
    torch.manual_seed(0)
    blocks = [conv_block(dropout=0.3).to(dtype) for _ in range(6)]
    net = momres.MomentumNet(blocks, 0.8, memory_efficient=memory_efficient, **options).train()
    x = torch.randn(8, 4, 6, 6, dtype=dtype, requires_grad=True)
    torch.manual_seed(seed)
    net(x).square().mean().backward()
    return {
        "grads": [x.grad] + [p.grad for p in net.parameters()],
        "buffers": [b.clone() for b in net.buffers()],
        "rng": torch.get_rng_state(),
    }


@pytest.mark.parametrize("exact", [True, False])
def test_batchnorm_and_dropout_match_plain_autograd(exact):
    fast, plain = train_step(True, exact=exact), train_step(False)
    for a, b in zip(fast["grads"], plain["grads"], strict=True):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-10)
    # Running statistics and num_batches_tracked were updated once, as in plain autograd (the
    # exact mode feeds the blocks x rounded to its 2**-40 grid, hence the tiny tolerance).
    for a, b in zip(fast["buffers"], plain["buffers"], strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12) and a.dtype == b.dtype
    counts = [b for b in fast["buffers"] if b.dtype == torch.long]
    assert len(counts) == 12 and all(c.item() == 1 for c in counts)
    updated = momres.MomentumNet([conv_block()], 0.8).train()
    assert not torch.equal(plain["buffers"][0], updated.functions[0][1].running_mean)
    # The replay forked the generator: the global stream is where plain autograd left it.
    assert torch.equal(fast["rng"], plain["rng"])


def test_dropout_masks_are_really_replayed():
    """Different seeds give different gradients, so equality above is not an accident."""
    a, b = train_step(True, seed=0), train_step(True, seed=1)
    assert not torch.allclose(a["grads"][0], b["grads"][0])


def test_float32_conv_stage_with_batchnorm():
    torch.manual_seed(0)
    blocks = [conv_block() for _ in range(16)]
    x = torch.randn(8, 4, 6, 6)
    grads = []
    for me in (True, False):
        net = momres.MomentumNet(blocks, 0.9, memory_efficient=me)
        xr = x.clone().requires_grad_()
        net(xr).square().mean().backward()
        first = [p.grad.flatten() for p in blocks[0].parameters()]
        grads.append(torch.cat([xr.grad.flatten(), *first]))
        for p in net.parameters():
            p.grad = None
    # float32 arithmetic in both: agreement to a few float32 ulps of the gradient's scale.
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < 1e-4


def test_autocast_bfloat16_on_cpu_matches_plain_autograd_under_autocast():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(8)]
    x = torch.randn(4, 16)
    grads = []
    for me in (True, False):
        net = momres.MomentumNet(blocks, 0.9, memory_efficient=me)
        xr = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(xr)
        out.float().square().mean().backward()
        grads.append(torch.cat([xr.grad.flatten(), blocks[0][0].weight.grad.flatten()]))
        for p in net.parameters():
            p.grad = None
    # Agreement at bfloat16's resolution (2**-8): the blocks see x rounded to the exact grid,
    # which can flip bf16 roundings, so bit-equality is not expected.
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < 5e-3


def test_recompute_runs_under_the_forward_autocast_state():
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return self.lin(x)

    net = momres.MomentumNet([Probe(), Probe()], 0.9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 8, requires_grad=True))
    out.float().sum().backward()  # outside autocast, like a training loop
    assert seen == [(True, torch.bfloat16)] * 4  # two forwards, two recomputes


class HiddenNoise(nn.Module):
    """Randomness no module announces: a mask drawn with ``torch.rand_like`` in ``forward``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.linear(x)) * (torch.rand_like(x) > 0.3)


@pytest.mark.parametrize("exact", [True, False])
def test_random_and_deterministic_blocks_interleaved(exact):
    """Each block's generator state is the one after the block before it (the recorder
    captures once per block): blocks drawing random numbers, visibly (dropout) or not, between
    blocks that draw none, each replay their own numbers."""
    def step(memory_efficient, seed=0):
        torch.manual_seed(0)
        blocks = [nn.Sequential(nn.Linear(6, 6), nn.Tanh()), HiddenNoise(6),
                  nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.4)), HiddenNoise(6),
                  nn.Sequential(nn.Linear(6, 6), nn.Tanh()),
                  nn.Sequential(nn.Linear(6, 6), nn.Tanh()), HiddenNoise(6)]
        net = momres.MomentumNet([b.double() for b in blocks], 0.7, exact=exact,
                                 memory_efficient=memory_efficient).train()
        x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
        torch.manual_seed(seed)
        net(x).square().sum().backward()
        return [x.grad] + [p.grad for p in net.parameters()], torch.get_rng_state()

    (fast, rng), (plain, plain_rng) = step(True), step(False)
    for a, b in zip(fast, plain, strict=True):  # exact: the blocks see x on a 2**-40 grid
        assert ((a - b).norm() / b.norm()).item() <= 1e-9
    assert torch.equal(rng, plain_rng)
    assert not torch.allclose(step(True, seed=1)[0][0], fast[0])  # the masks matter


class SeesAutocast(nn.Linear):
    """Records whether autocast is on in each of its calls."""

    def __init__(self, width: int) -> None:
        super().__init__(width, width)
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(torch.is_autocast_enabled("cpu"))
        return torch.tanh(super().forward(x))


@pytest.mark.parametrize("forward_autocast", [False, True])
def test_the_recompute_runs_under_the_forwards_autocast(forward_autocast):
    """Whatever surrounds backward(): off in the forward pass, off in its recompute (the
    replay is skipped only where autocast is off in both passes); on, on."""
    blocks = [SeesAutocast(8) for _ in range(3)]
    net = momres.MomentumNet(blocks, 0.8, exact=False)
    x = torch.randn(5, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=forward_autocast):
        out = net(x)
    for around in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=around):
            out.float().square().sum().backward(retain_graph=True)
    assert all(b.seen == [forward_autocast] * 3 for b in blocks)
