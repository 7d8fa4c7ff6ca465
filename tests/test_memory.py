"""activation_memory: what a forward pass keeps for the backward pass."""

import os

import pytest
import torch
from torch import nn

import momres
from momres.baselines import conv_stage


def test_memory_free_is_bounded_in_depth_and_plain_grows_linearly():
    x = torch.randn(4, 32, 8, 8, requires_grad=True)
    saved = {
        (system, depth): momres.activation_memory(conv_stage(system, depth), x)
        for system in ("plain", "momres-exact", "momres-float")
        for depth in (8, 128)
    }
    assert saved["momres-float", 8] == saved["momres-float", 128]
    # Plain autograd keeps about four activations per block: linear growth.
    assert 15.5 < saved["plain", 128] / saved["plain", 8] < 16.5
    element = x.numel()
    # Exact mode keeps the float32 output, an int32 remainder, v as float64 and the buffer in
    # as many bytes as its bound needs (gamma = 0.9: one byte for 8 blocks, four for 128),
    # plus two checksums; float mode keeps its two float32 outputs and four float64 moments.
    assert 17 * element <= saved["momres-exact", 8] <= 17 * element + 64
    assert 20 * element <= saved["momres-exact", 128] <= 20 * element + 64
    assert saved["momres-float", 8] == 8 * element + 32


def test_exact_state_costs_13_bytes_when_the_next_layer_keeps_the_output():
    """The output is stored once, by whichever layer keeps it: a 16-block stage adds 13 bytes
    (remainder 4, v 8, buffer 1)."""
    x = torch.randn(4, 32, 8, 8, requires_grad=True)
    head = nn.Conv2d(32, 8, 3)  # keeps its input, the stage's output
    alone = momres.activation_memory(head, x)
    combined = momres.activation_memory(nn.Sequential(conv_stage("momres-exact", 16), head), x)
    assert 13 * x.numel() <= combined - alone <= 13 * x.numel() + 64


def test_counts_each_storage_once_and_skips_parameters():
    lin = nn.Linear(16, 16)
    x = torch.randn(8, 16, requires_grad=True)
    # A Linear saves its input (and its weight, which is a parameter): just x.
    assert momres.activation_memory(lin, x) == x.numel() * 4
    # Two uses of the same input share one storage.
    assert momres.activation_memory(nn.Bilinear(16, 16, 4), x, x) == x.numel() * 4


def test_no_grad_stores_nothing():
    net = momres.MomentumNet([nn.Linear(8, 8) for _ in range(4)], 0.9)
    with torch.no_grad():
        out = net(torch.randn(2, 8))
    assert out.grad_fn is None


def test_dropout_blocks_keep_only_their_generator_state():
    x = torch.randn(4, 32, requires_grad=True)
    plain = momres.MomentumNet([nn.Linear(32, 32) for _ in range(8)], 0.9)
    noisy = momres.MomentumNet(
        [nn.Sequential(nn.Linear(32, 32), nn.Dropout(0.1)) for _ in range(8)], 0.9
    )
    extra = momres.activation_memory(noisy, x) - momres.activation_memory(plain, x)
    assert extra == 8 * torch.get_rng_state().numel()  # one CPU generator state per block


def test_peak_bytes_of_a_step_above_what_was_in_use():
    kept = torch.ones(2**20)  # in use before the step: not counted

    def step():
        a = torch.ones(2**20)  # 4 MiB
        b = torch.ones(2**19)  # 2 MiB, while a lives: the peak is 6 MiB
        del a, b
        c = torch.ones(2**18)  # 1 MiB after both are freed
        return c

    peak = momres.memory.peak_bytes(step, "cpu")
    assert 6 * 2**20 <= peak < 6.1 * 2**20
    assert kept.sum() == 2**20


def test_peak_bytes_of_training_steps_grows_with_plain_depth_not_memory_free():
    x = torch.randn(8, 8, 8, 8)
    peaks = {}
    for system in ("plain", "momres-exact"):
        for depth in (2, 8):
            model = conv_stage(system, depth, channels=8)
            step = lambda m=model: m(x.requires_grad_()).square().mean().backward()  # noqa: B023
            peaks[system, depth] = momres.memory.peak_bytes(step)
    assert peaks["plain", 8] > 2.5 * peaks["plain", 2]
    assert peaks["momres-exact", 8] < 1.2 * peaks["momres-exact", 2]
    assert peaks["momres-exact", 8] < peaks["plain", 8]


def test_peak_resident_bytes_and_its_reset():
    before = momres.memory.peak_resident_bytes()
    big = torch.ones(2**26)  # 256 MiB, touched
    assert momres.memory.peak_resident_bytes() >= before
    assert momres.memory.peak_resident_bytes() > 200 * 2**20
    del big
    if momres.memory.reset_peak_resident():  # Linux: the peak falls back to what is resident
        assert momres.memory.peak_resident_bytes() < before + 128 * 2**20


def test_tensor_bytes_counts_each_storage_once():
    a = torch.ones(100)
    assert momres.memory.tensor_bytes([a, a[:10], a.view(10, 10)]) == 400


def working_set(system: str, x: torch.Tensor, depth: int = 4) -> float:
    """Bytes per element of ``x`` that a training step of the stage allocates beyond what its
    forward pass saves: at its peak, what the backward pass holds while it rebuilds a block."""
    model = conv_stage(system, depth)
    saved = momres.activation_memory(model, x.clone().requires_grad_())
    peak = momres.memory.peak_bytes(
        lambda: model(x.clone().requires_grad_()).square().mean().backward(), "cpu")
    return (peak - saved) / x.numel()


def test_working_set_of_the_memory_free_backward():
    """Measured with the allocation tracer (deterministic).  Exact mode holds x in the compact
    form it was saved in (its value, which is the block's input, and the remainder, rebuilt in
    place), v and the buffer in their saved tensors; float mode holds a copy of x (the stage's
    output) and v.  Both rebuild v in place before the block's backward (exact mode: with the C
    kernels, which need no scratch), so the block's output is not held through it.  The rest is
    the block's own graph and the gradients flowing through it, which plain autograd's
    backward holds too (about 20 bytes per element here)."""
    x = torch.randn(16, 32, 16, 16)  # two chunks of the exact arithmetic
    plain, exact, floating = (working_set(s, x) for s in ("plain", "momres-exact",
                                                          "momres-float"))
    kernels = momres._kernels.kernels(x) is not None
    assert exact <= (48 if kernels else 52)  # 74 before the compact state, 50 before kernels
    assert floating <= 48  # 54 before v was rebuilt in place and early
    assert plain < exact


def test_keep_freed_memory_reuses_freed_blocks_instead_of_faulting_new_pages():
    """In a fresh process under glibc's own defaults, a freed 64 MiB tensor leaves the process
    (its pages are unmapped); after ``keep_freed_memory`` it stays and the next one reuses it
    (after a warm-up: the first blocks freed may be split by small allocations)."""
    code = """
import sys, torch, momres.memory as m
kept = m.keep_freed_memory() if sys.argv[-1] == "keep" else False
def resident():
    status = open('/proc/self/status').read().split('VmRSS:')[1]
    return int(status.split()[0]) * 1024
for _ in range(4):  # warm-up steps, then the one measured: 64 MiB touched and freed
    t = torch.ones(2**24); del t
after_free = resident()
t = torch.ones(2**24)
print(int(kept), after_free, resident() - after_free)
"""
    import subprocess
    import sys

    def run(mode: str) -> list[int]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                             check=True, env=env).stdout.split()
        return [int(v) for v in out]

    _, free_default, grown_default = run("default")
    kept, free_kept, grown_kept = run("keep")
    if not kept:
        pytest.skip("not glibc: keep_freed_memory changes nothing")
    assert grown_default > 48 * 2**20  # the second tensor faulted its pages in again
    assert grown_kept < 8 * 2**20  # ... or reused the freed ones
    assert free_kept > free_default + 48 * 2**20  # which had stayed in the process


def test_the_momres_command_keeps_freed_memory_unless_told_not_to(monkeypatch):
    import momres.cli

    calls = []
    monkeypatch.setattr(momres.memory, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(momres.cli, "report_errors", lambda action: 0)  # the command not run
    for setting in ("1", "0"):
        monkeypatch.setenv("MOMRES_KEEP_FREED_MEMORY", setting)
        assert momres.cli.main(["plan", "--model", "mresnet20", "--batch-size", "2"]) == 0
    assert calls == [1]
