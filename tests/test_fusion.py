"""The fused (compiled) exact kernels compute the same integers as the eager ones."""

import torch
from torch import nn

import momres


def run(monkeypatch, fuse: str):
    monkeypatch.setenv("MOMRES_FUSE", fuse)
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)) for _ in range(40)]
    net = momres.MomentumNet(blocks, 0.3)
    x = torch.randn(16, 8, requires_grad=True)
    with momres.debug.record_states() as log:
        net(x).square().sum().backward()
    return log, [x.grad] + [p.grad for p in net.parameters()]


def test_fused_kernels_match_eager_bit_for_bit(monkeypatch):
    fused_log, fused_grads = run(monkeypatch, "1")
    eager_log, eager_grads = run(monkeypatch, "0")
    for phase in ("forward", "backward"):
        for n, state in eager_log[phase].items():
            for a, b in zip(state, fused_log[phase][n], strict=True):
                assert torch.equal(a, b), (phase, n)
    for n, state in fused_log["forward"].items():  # and the fused backward is exact
        for a, b in zip(state, fused_log["backward"][n], strict=True):
            assert torch.equal(a, b), n
    for a, b in zip(fused_grads, eager_grads, strict=True):
        assert torch.equal(a, b)
