"""activation_memory: what a forward pass keeps for the backward pass."""

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
    # plus two checksums; float mode keeps its two float32 outputs.
    assert 17 * element <= saved["momres-exact", 8] <= 17 * element + 64
    assert 20 * element <= saved["momres-exact", 128] <= 20 * element + 64
    assert saved["momres-float", 8] == 8 * element


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
