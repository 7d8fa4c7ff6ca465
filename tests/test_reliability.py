"""Gradients equal to plain autograd, or a clear error: the cases a demanding user probes
(issue 14). Each compares the memory-free path with plain autograd over the same blocks."""

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

import momres
from momres.convert import momentum_stages

from helpers import DetachesOnItsSecondCall, gradients, relative_error


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


class CachesItsWeight(nn.Linear):
    """Derives a tensor from its weight on the first call and reuses it afterwards."""

    cache = None

    def __init__(self, width: int) -> None:
        super().__init__(width, width)

    def forward(self, x):
        if self.cache is None:
            self.cache = 2 * self.weight
        return torch.tanh(nn.functional.linear(x, self.cache, self.bias))


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("block, lost", [(DetachesOnItsSecondCall, "its input x"),
                                         (CachesItsWeight, "parameter 'weight'")])
def test_a_recompute_through_another_graph_is_refused(block, lost, exact):
    torch.manual_seed(0)
    net = momres.MomentumNet([block(4).double() for _ in range(3)], 0.9, exact=exact)
    out = net(torch.randn(5, 4, dtype=torch.float64, requires_grad=True))
    with pytest.raises(RuntimeError, match=rf"block 2 \({block.__name__}\) builds another graph"
                                           rf".*forward pass differentiates {lost} and the "
                                           "recompute does not"):
        out.sum().backward()


@pytest.mark.parametrize("stage", ["momentum", "reversible"])
def test_a_tensor_requiring_grad_outside_parameters_and_arguments_is_refused(stage):
    hidden = torch.ones(4, dtype=torch.float64, requires_grad=True)

    class Closure(nn.Linear):
        def forward(self, x):
            return torch.tanh(super().forward(x) * hidden)

    blocks = [Closure(4, 4).double() for _ in range(2)]
    net = (momres.MomentumNet(blocks, 0.9) if stage == "momentum"
           else momres.ReversibleStage(blocks[:1], blocks[1:]))
    x = torch.randn(5, 8 if stage == "reversible" else 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"block 0 \(Closure\) uses a tensor that requires "
                                           r"grad .*shape \(4,\)"):
        net(x[:, :4] if stage == "momentum" else x)


class StopsGradients(nn.Module):
    """Legitimate blocks whose graph reaches fewer tensors than they read: a detached weight,
    a weight used for its shape, an unused parameter, a detached input (in every call)."""

    def __init__(self, width: int, mode: str) -> None:
        super().__init__()
        self.lin, self.mode = nn.Linear(width, width), mode
        self.unused = nn.Parameter(torch.ones(1))

    def forward(self, x):
        if self.mode == "weight":
            return torch.tanh(x @ self.lin.weight.detach().T + self.lin.bias)
        if self.mode == "input":
            return torch.tanh(self.lin(x.detach()))
        if self.mode == "identity":
            return x
        return torch.tanh(self.lin(x)) * self.unused.new_ones(self.unused.shape).sum()


@pytest.mark.parametrize("residual", [True, False])
def test_blocks_that_stop_gradients_consistently_pass_the_audit(residual):
    torch.manual_seed(0)
    blocks = [StopsGradients(4, mode).double()
              for mode in ("weight", "input", "identity", "unused", "weight")]
    x = torch.randn(5, 4, dtype=torch.float64)
    grads = []
    for memory_efficient in (True, False):
        net = momres.MomentumNet(blocks, 0.9, residual=residual, memory_efficient=memory_efficient)
        grads.append(gradients(net, x))
    assert relative_error(*grads) <= 1e-9
    fast = momres.MomentumNet(blocks, 0.9, residual=residual)
    fast(x.requires_grad_()).sum().backward()
    assert blocks[3].unused.grad is None  # as in plain autograd: never differentiated


class Force(nn.Linear):
    """``-dE/dx`` of an energy ``E(x) = sum tanh(W x + b)``: autograd inside the forward."""

    def forward(self, x):
        with torch.enable_grad():
            x = x if x.requires_grad else x.detach().requires_grad_()
            energy = torch.tanh(super().forward(x)).sum()
            return -torch.autograd.grad(energy, x, create_graph=True)[0]


def test_a_block_that_differentiates_inside_its_forward_passes_the_audit():
    torch.manual_seed(0)
    blocks = [Force(4, 4).double() for _ in range(3)]
    x = torch.randn(5, 4, dtype=torch.float64)
    fast = gradients(momres.MomentumNet(blocks, 0.9), x)
    slow = gradients(momres.MomentumNet(blocks, 0.9, memory_efficient=False), x)
    assert relative_error(fast, slow) <= 1e-9


def test_a_block_that_changes_its_graph_after_its_first_backward_is_not_detected():
    """Documents the audit's limit: it compares the graphs until each block has passed one
    backward, then trusts it; later changes go unseen (README, "not detected")."""
    torch.manual_seed(0)
    block = DetachesOnItsSecondCall(4).double()
    block.calls = 2  # the detached call comes after the audit
    net = momres.MomentumNet([block], 0.9)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    net(x).sum().backward()  # audited: forward (3rd call) and recompute (4th) agree
    block.calls = 0  # the next forward is call 1, its recompute call 2: detached
    x.grad = None
    net(x).sum().backward()
    silent = x.grad.clone()
    x.grad = None
    momres.MomentumNet([block], 0.9, memory_efficient=False)(x).sum().backward()
    assert relative_error([silent], [x.grad]) > 0.01


def test_export_and_trace_of_a_converted_model_in_eval_give_the_eager_outputs():
    torch.manual_seed(0)
    resnet = momres.models.create_model("resnet20", num_classes=3, in_channels=1)
    converted = momres.to_momentum(resnet, 0.9).eval()
    x, other = torch.randn(2, 1, 8, 8), torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        exported = torch.export.export(converted, (x,)).module()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks, constant
            traced = torch.jit.trace(converted, x)
        for inputs in (x, other):
            eager = converted(inputs)
            assert torch.equal(traced(inputs), eager)
        assert torch.equal(exported(x), converted(x))


class TiedTwice(nn.Module):
    """One weight in two layers of the block (tied), and a frozen bias."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)
        self.b.weight = self.a.weight
        self.b.bias.requires_grad_(False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).transpose(0, 1)


@pytest.mark.parametrize("exact", [True, False])
def test_tied_weights_and_parametrizations_inside_a_block(exact):
    """The recompute swaps its leaves into every slot of a parameter: both layers of a tied
    weight, and the original of a parametrized one."""
    torch.manual_seed(0)
    blocks = [TiedTwice(4), nn.Sequential(nn.Linear(4, 4), nn.Tanh()), TiedTwice(4)]
    torch.nn.utils.parametrize.register_parametrization(blocks[1][0], "weight", Symmetric())
    blocks = [b.double() for b in blocks]
    x = torch.randn(3, 4, dtype=torch.float64)
    fast = momres.MomentumNet(blocks, 0.6, exact=exact)
    plain = momres.MomentumNet(blocks, 0.6, memory_efficient=False)
    assert len(list(fast.parameters())) == 8  # tied counted once
    assert relative_error(gradients(fast, x), gradients(plain, x)) <= 1e-10
    # The blocks hold their own parameters again afterwards.
    assert all(isinstance(p, nn.Parameter) for b in blocks for p in b._parameters.values()
               if p is not None)
    assert blocks[0].b.weight is blocks[0].a.weight
