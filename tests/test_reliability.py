"""Gradients equal to plain autograd, or a clear error: the cases a demanding user probes
(issue 14). Each compares the memory-free path with plain autograd over the same blocks."""

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

import momres
from momres.convert import momentum_stages

from helpers import gradients, relative_error


def linears(n: int = 3, width: int = 4) -> list[nn.Module]:
    return [nn.Sequential(nn.Linear(width, width), nn.Tanh()).double() for _ in range(n)]


@pytest.mark.parametrize("exact", [True, False])
def test_a_block_replaced_after_conversion_is_the_one_that_runs(exact):
    torch.manual_seed(0)
    converted = momres.to_momentum(torchvision.models.resnet18(), 0.9, exact=exact).double()
    converted.layer1[1] = BasicBlock(64, 64).double()
    new = converted.layer1[1]
    reference = copy.deepcopy(converted)
    for stage in momentum_stages(reference).values():
        stage.momentum.memory_efficient = False
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    fast = gradients(converted.eval(), x)
    assert all(p.grad is None for p in new.parameters())  # gradients() does not accumulate
    assert relative_error(fast, gradients(reference.eval(), x)) <= 1e-8
    converted(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in new.parameters())


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_parameter_hooks_fire_once(memory_efficient):
    torch.manual_seed(0)
    blocks = linears()
    calls = []

    def double(grad):
        calls.append(1)
        return 2 * grad

    blocks[0][0].weight.register_hook(double)
    x = torch.randn(5, 4, dtype=torch.float64)
    net = momres.MomentumNet(blocks, 0.9, memory_efficient=memory_efficient)
    net(x).square().sum().backward()
    hooked = blocks[0][0].weight.grad.clone()
    assert len(calls) == 1
    for b in blocks:
        b.zero_grad(set_to_none=True)
    blocks[0][0].weight._backward_hooks.clear()
    momres.MomentumNet(blocks, 0.9, memory_efficient=False)(x).square().sum().backward()
    assert torch.allclose(hooked, 2 * blocks[0][0].weight.grad, rtol=1e-10)


@pytest.mark.parametrize("exact", [True, False])
def test_functional_call_differentiates_the_tensors_passed_in(exact):
    torch.manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64)
    grads = []
    for memory_efficient in (True, False):
        net = momres.MomentumNet(linears(), 0.8, memory_efficient=memory_efficient, exact=exact)
        net.functions[1][0].bias.requires_grad_(False)  # a frozen tensor is swapped in too
        torch.manual_seed(1)
        params = {name: torch.randn_like(p, requires_grad=p.requires_grad)
                  for name, p in net.named_parameters()}
        out = torch.func.functional_call(net, params, (x,))
        wrt = [t for t in params.values() if t.requires_grad]
        grads.append(torch.autograd.grad(out.square().sum(), wrt))
    assert relative_error(*grads) <= 1e-9


def test_exact_mode_under_torch_compile_equals_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), momres.MomentumNet(
        [nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4)], 0.9), nn.Linear(8, 2))
    x = torch.randn(5, 6)
    eager = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    compiled = torch.compile(model)  # inductor: the stage is a graph break
    got = torch.autograd.grad(compiled(x).square().sum(), list(model.parameters()))
    assert relative_error(got, eager) <= 1e-6


def test_float_mode_refuses_a_block_that_changes_between_calls():
    class Drifting(nn.Linear):
        calls = 0

        def forward(self, x):
            Drifting.calls += 1
            return torch.tanh(super().forward(x)) * (1 + 0.5 * (Drifting.calls % 2))

    torch.manual_seed(0)
    net = momres.MomentumNet([Drifting(4, 4).double() for _ in range(4)], 0.9, exact=False)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="does not compute the same function twice"):
        net(x).sum().backward()


@pytest.mark.parametrize("exact", [True, False])
def test_a_parameter_changed_in_place_before_backward_is_refused(exact):
    torch.manual_seed(0)
    blocks = linears()
    out = momres.MomentumNet(blocks, 0.9, exact=exact)(torch.randn(5, 4, dtype=torch.float64))
    with torch.no_grad():
        blocks[1][0].weight.add_(0.1)
    with pytest.raises(RuntimeError, match="modified in place between the forward and"):
        out.sum().backward()


def test_transformer_encoder_layers_named_as_a_stage_run_in_eval_without_grad():
    torch.manual_seed(0)
    model = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=2,
                           dim_feedforward=32, dropout=0.0, batch_first=True).eval()
    converted = momres.to_momentum(model, 0.0, stages=["encoder.layers", "decoder.layers"],
                                   keep_first=False, memory_efficient=False)
    src, tgt = torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])  # torch's nested-tensor path
    with torch.no_grad():
        for mask in (None, padding):
            out = converted(src, tgt, src_key_padding_mask=mask, memory_key_padding_mask=mask)
            expected = model(src, tgt, src_key_padding_mask=mask, memory_key_padding_mask=mask)
            assert torch.allclose(out, expected, atol=1e-5)
    fast = momres.to_momentum(model, 0.9, stages=["encoder.layers"]).train()
    slow = momres.to_momentum(model, 0.9, stages=["encoder.layers"], memory_efficient=False)
    assert relative_error(gradients(fast, src, tgt), gradients(slow.train(), src, tgt)) < 1e-4
