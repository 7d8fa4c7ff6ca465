"""The ReLU tail (``_tail``): a torchvision block's own add and ReLU taken in the rule's pass
under plain autograd and in the memory-free passes.  The kernels give the eager operations'
numbers bit for bit, the step differentiates what it computes (gradcheck, double backward), a
stage of such blocks gives the rule written out with the blocks called whole (memory-free: the
same stage with its blocks called whole, bit for bit), and blocks that could see the split
(hooks, their own ``forward``, a downsample, arguments) are run whole."""

import copy
import shutil

import pytest
import torch
from torch import nn
from torch.nn.modules import module as torch_module
from torchvision.models.resnet import BasicBlock, Bottleneck

import momres
from momres import _kernels, _tail
from momres._rule import RuleStep

from helpers import kernel_library, output_and_gradients, private_kernel_cache  # noqa: F401

needs_compiler = pytest.mark.skipif(shutil.which(_kernels.compiler()) is None,
                                    reason="no C compiler: the fused kernels cannot be built")
GAMMA = 0.9
# The kernels, where built, come from a cache of this session's own.
pytestmark = pytest.mark.usefixtures("private_kernel_cache")


def values(n, dtype, generator):
    """Spread magnitudes, with both zeros and NaN at the front."""
    t = torch.randn(n, generator=generator, dtype=torch.float64)
    t *= 10.0 ** torch.randint(-6, 3, (n,), generator=generator)
    t[:4] = torch.tensor([0.0, -0.0, 0.5, float("nan")])
    return t.to(dtype)


def bits(t):
    """The tensor's bit patterns: tells -0 from 0 and compares NaN."""
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def eager_tail(x, v, r):
    """The block's ``out += identity; relu(out)``, then the rule: what the kernel replaces."""
    s = r + x
    v_new = torch.mul(v, GAMMA).add_(torch.relu(s) - x, alpha=1 - GAMMA)
    return x + v_new, v_new, s > 0


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("own_v", [False, True])
def test_tail_kernel_matches_the_eager_operations(dtype, own_v):
    gen, n = torch.Generator().manual_seed(11), 100_003
    x, v, r = (values(n, dtype, gen) for _ in range(3))
    r[4:6] = -x[4:6]  # r + x == 0 exactly: the ReLU's kink, where no gradient passes
    want = eager_tail(x, v, r)
    v_in = v.clone()
    x_out, v_out, mask = _kernels.rule_tail(kernel_library(), x, v_in, r, GAMMA, own_v)
    assert (v_out.data_ptr() == v_in.data_ptr()) == own_v
    assert torch.equal(bits(x_out), bits(want[0])) and torch.equal(bits(v_out), bits(want[1]))
    assert torch.equal(mask, want[2]) and not mask[4:6].any()


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("given", ["both", "x", "v"])
def test_tail_backward_kernel_matches_the_eager_formulas(dtype, given):
    gen, n = torch.Generator().manual_seed(12), 100_003
    a_x, a_v = (values(n, dtype, gen) if given in (name, "both") else None for name in "xv")
    mask = torch.rand(n, generator=gen) < 0.5
    zero = torch.zeros(n, dtype=dtype)
    ax, av = (zero if a is None else a for a in (a_x, a_v))
    b = ax + av if given == "both" else ax if given == "x" else av
    d = b * (1 - GAMMA)
    want = torch.where(mask, ax, ax - d), b * GAMMA, torch.where(mask, d, 0)
    got = _kernels.rule_tail_backward(kernel_library(), a_x, a_v, mask, GAMMA)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(bits(g), bits(w))


@pytest.mark.parametrize("kernels", [pytest.param("1", marks=needs_compiler), "0"])
def test_tail_step_differentiates_what_it_computes(monkeypatch, kernels):
    """gradcheck (the kernel's backward when built) and gradgradcheck (double backward runs
    the eager formulas) in float64, with gradients into both outputs and into one."""
    monkeypatch.setenv("MOMRES_KERNELS", kernels)
    gen = torch.Generator().manual_seed(13)
    x, v, r = (torch.randn(3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))

    def both(x, v, r):
        return RuleStep.apply(x, v, r, GAMMA, False, False, True)

    assert torch.autograd.gradcheck(both, (x, v, r))
    assert torch.autograd.gradcheck(lambda *a: both(*a)[0], (x, v, r))
    assert torch.autograd.gradcheck(lambda *a: both(*a)[1], (x, v, r))
    assert torch.autograd.gradgradcheck(both, (x, v, r))
    with torch.no_grad():  # the eager path's numbers
        want = eager_tail(x, v, r)
    got = both(x, v, r)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def written_out(blocks, x):
    """The rule with each block called whole: ``v <- gamma v + (1-gamma)(f(x) - x)``."""
    v = torch.zeros_like(x)
    for f in blocks:
        v = GAMMA * v + (1 - GAMMA) * (f(x) - x)
        x = x + v
    return x


def stage_blocks(kind):
    torch.manual_seed(0)
    if kind == "basic":
        return [BasicBlock(8, 8) for _ in range(3)]
    return [Bottleneck(16, 4) for _ in range(3)]


def randomise_batchnorm(blocks):
    """Non-trivial affine parameters and running statistics: eval mode then means something."""
    for m in nn.ModuleList(blocks).modules():
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean):
                nn.init.normal_(t.data, 0.0, 0.5)
            m.running_var.data.uniform_(0.5, 2.0)


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_stage_of_torchvision_blocks_matches_the_rule_written_out(kind, train, channels_last):
    """Outputs, gradients and BatchNorm statistics (updated once per block) of the tailed
    stage against the rule with the blocks called whole, float64."""
    blocks = stage_blocks(kind)
    randomise_batchnorm(blocks)
    assert all(_tail.branch(f, (), {}) is not None for f in blocks)
    reference = copy.deepcopy(blocks)
    net = momres.MomentumNet(blocks, GAMMA, residual=False, memory_efficient=False)
    for m in (net, *reference):
        m.double().train(train)
    x = torch.randn(4, blocks[0].conv1.in_channels, 6, 6, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        for m in (net, *reference):
            m.to(memory_format=torch.channels_last)
    out, grads = output_and_gradients(net, x)
    ref_params = [p for f in reference for p in f.parameters()]
    want, want_grads = output_and_gradients(lambda x: written_out(reference, x), x,
                                            wrt=ref_params)
    assert (out - want).abs().max() <= 1e-12 * want.abs().max()
    for g, w in zip(grads, want_grads, strict=True):
        assert (g - w).norm() <= 1e-10 * w.norm()
    for a, b in zip(net.buffers(), nn.ModuleList(reference).buffers(), strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)  # num_batches_tracked: equal


class OwnForward(BasicBlock):
    def forward(self, x):
        return super().forward(x) * 1.0


class OwnCall(BasicBlock):
    def __call__(self, x):
        return super().__call__(x) * 1.0


class KeepsForward(BasicBlock):
    """A subclass that changes nothing of the computation: still split."""


class LoudReLU(nn.ReLU):
    pass


@pytest.mark.parametrize("case", ["block hook", "relu pre-hook", "backward hook", "downsample",
                                  "own forward", "own call", "instance forward", "relu subclass",
                                  "global hook", "arguments"])
def test_blocks_that_could_see_the_split_are_run_whole(case):
    calls = []
    f = {"own forward": OwnForward, "own call": OwnCall}.get(case, BasicBlock)(8, 8)
    args, handle = (), None
    if case == "block hook":
        f.register_forward_hook(lambda *a: calls.append("block"))
    elif case == "relu pre-hook":
        f.relu.register_forward_pre_hook(lambda *a: calls.append("relu"))
    elif case == "backward hook":
        f.register_full_backward_hook(lambda *a: None)
    elif case == "downsample":
        f.downsample = nn.Identity()
    elif case == "instance forward":
        f.forward = lambda x: BasicBlock.forward(f, x)
    elif case == "relu subclass":
        f.relu = LoudReLU(inplace=True)
    elif case == "global hook":
        handle = torch_module.register_module_forward_hook(lambda *a: None)
    elif case == "arguments":
        args = (1,)
    try:
        assert _tail.branch(f, args, {}) is None
    finally:
        if handle is not None:
            handle.remove()
    assert _tail.branch(KeepsForward(8, 8), (), {}) is not None
    if case in ("block hook", "relu pre-hook"):  # hooks see the calls the block makes
        net = momres.MomentumNet([f, f], GAMMA, residual=False, memory_efficient=False)
        net(torch.randn(2, 8, 4, 4))
        assert len(calls) == 2 * (2 if case == "relu pre-hook" else 1)


@pytest.mark.parametrize("branch_dtype", [torch.bfloat16, torch.float64])
def test_a_branch_of_another_type_is_added_as_the_block_adds_it(branch_dtype):
    """``out += identity`` keeps the branch's type, then the rule promotes: the tailed step
    (the eager path: the kernels need one type) rounds the same way, and gives each input its
    gradient in its own type."""
    gen = torch.Generator().manual_seed(14)
    x, v = (torch.randn(2, 8, 5, 5, generator=gen, requires_grad=True) for _ in range(2))
    r = torch.randn(2, 8, 5, 5, generator=gen).to(branch_dtype).requires_grad_()
    out = r.detach().clone()
    out += x.detach()
    g = torch.relu(out) - x.detach()
    want_v = torch.mul(v.detach(), GAMMA).add_(g, alpha=1 - GAMMA)
    x_new, v_new = RuleStep.apply(x, v, r, GAMMA, False, False, True)
    assert torch.equal(v_new, want_v) and torch.equal(x_new, x.detach() + want_v)
    grads = torch.autograd.grad((x_new.sum() + v_new.square().sum()), (x, v, r))
    assert [t.dtype for t in grads] == [torch.float32, torch.float32, branch_dtype]


# The memory-free passes: float mode's advance and rebuild, the exact rebuild, the gradients.

def eager_relu_tail(r, x, b):
    """The block's output ``relu(r + x)`` and the cotangent its ReLU hands the branch."""
    s = r + x
    return torch.relu(s), torch.where(s > 0, b, torch.zeros_like(b))


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_memory_free_tail_kernels_match_the_eager_operations(dtype):
    """Each kernel against the operations it replaces, with the block's output given whole:
    float advance and rebuild, the exact rebuild, and the gradients with the cotangent."""
    gen, n, lib = torch.Generator().manual_seed(15), 100_003, kernel_library()
    x, v, r, b, grad, a_x = (values(n, dtype, gen) for _ in range(6))
    r[4:6] = -x[4:6]  # the kink
    y, want_c = eager_relu_tail(r, x, b)

    want_x, want_v, got_x, got_v = x.clone(), v.clone(), x.clone(), v.clone()
    assert _kernels.rule_advance_(lib, want_x, want_v, y, GAMMA, skip=True)
    assert _kernels.rule_advance_(lib, got_x, got_v, r, GAMMA, tail=True)
    assert torch.equal(bits(got_x), bits(want_x)) and torch.equal(bits(got_v), bits(want_v))

    want_v, got_v = v.clone(), v.clone()
    assert _kernels.rule_rebuild_(lib, want_v, y, GAMMA, x) is True
    c = _kernels.rule_rebuild_(lib, got_v, r, GAMMA, x, b)
    assert torch.equal(bits(got_v), bits(want_v)) and torch.equal(bits(c), bits(want_c))

    units = torch.randint(-2**40, 2**40, (n,), generator=gen).double()
    buf = torch.randint(0, 2**31 - 1, (n,), generator=gen).to(torch.int32)
    want_u, want_buf, got_u, got_buf = units.clone(), buf.clone(), units.clone(), buf.clone()
    assert _kernels.backward_step_(lib, want_u, want_buf, y, 9, 10, 0.1 * 2.0**30, x) is True
    c = _kernels.backward_step_(lib, got_u, got_buf, r, 9, 10, 0.1 * 2.0**30, x, b)
    assert torch.equal(bits(got_u), bits(want_u)) and torch.equal(got_buf, want_buf)
    assert torch.equal(bits(c), bits(want_c))

    want_ax, want_b, got_ax, got_b = a_x.clone(), b.clone(), a_x.clone(), b.clone()
    assert _kernels.rule_grads_(lib, want_ax, want_b, grad + want_c, GAMMA, False)
    assert _kernels.rule_grads_(lib, got_ax, got_b, grad, GAMMA, False, want_c)
    assert torch.equal(bits(got_ax), bits(want_ax)) and torch.equal(bits(got_b), bits(want_b))


def whole(blocks):
    """The blocks with a no-op forward hook each, so that they run whole (``_tail.branch``)."""
    for f in blocks:
        f.register_forward_hook(lambda *a: None)
    return blocks


@pytest.mark.parametrize("kernels", [pytest.param("1", marks=needs_compiler), "0"])
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("kind, train, channels_last", [
    ("basic", True, False), ("basic", False, False), ("bottleneck", True, False),
    ("basic", True, True)])
def test_memory_free_stage_with_tails_matches_its_blocks_run_whole(monkeypatch, kernels,
                                                                    exact, kind, train,
                                                                    channels_last):
    """Outputs, every gradient and BatchNorm's statistics, bit for bit: the tails change how
    many passes run, not one number; and against plain autograd through the blocks run whole
    (the memory-free backward's own tolerance)."""
    monkeypatch.setenv("MOMRES_KERNELS", kernels)
    blocks = stage_blocks(kind)
    randomise_batchnorm(blocks)
    twins = [whole(copy.deepcopy(blocks)), whole(copy.deepcopy(blocks))]
    nets = [momres.MomentumNet(bs, GAMMA, residual=False, exact=exact).train(train)
            for bs in (blocks, twins[0])]
    nets.append(momres.MomentumNet(twins[1], GAMMA, residual=False, memory_efficient=False)
                .train(train))
    assert all(_tail.branch(f, (), {}) is not None for f in blocks)
    assert all(_tail.branch(f, (), {}) is None for f in twins[0])
    x = torch.randn(4, blocks[0].conv1.in_channels, 6, 6, generator=torch.Generator()
                    .manual_seed(16))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        for net in nets:
            net.to(memory_format=torch.channels_last)
    name = "_basic" if kind == "basic" else "_bottleneck"
    branch, branch_calls = getattr(_tail, name), []
    monkeypatch.setattr(_tail, name, lambda f, x: branch_calls.append(f) or branch(f, x))
    results = [output_and_gradients(net, x) for net in nets]
    # The forward, and the recompute where the rebuild comes first (not the eager exact one,
    # which needs scratch memory: it runs after the block's backward, which runs whole).
    assert len(branch_calls) == len(blocks) * (1 if exact and kernels == "0" else 2)
    (out, grads), (out_whole, grads_whole), (out_auto, grads_auto) = results
    assert torch.equal(out, out_whole)
    assert all(torch.equal(g, w) for g, w in zip(grads, grads_whole, strict=True))
    for a, b in zip(nets[0].buffers(), nets[1].buffers(), strict=True):
        assert torch.equal(a, b)
    assert (out - out_auto).abs().max() <= 1e-5 * out_auto.abs().max()
    for g, w in zip(grads, grads_auto, strict=True):
        assert (g - w).norm() <= 1e-4 * w.norm()


@pytest.mark.parametrize("strategy", ["exact", "float", "autograd"])
def test_tails_under_autocast_match_the_blocks_run_whole(strategy):
    """A bfloat16 branch on a float32 stage: the cotangent the ReLU hands the branch, and the
    skip's share of x's gradient, are rounded as the block's own backward rounds them (through
    its bfloat16 output), memory-free and under autograd: every gradient bit for bit the
    blocks-run-whole ones."""
    blocks = stage_blocks("basic")
    randomise_batchnorm(blocks)
    x = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(17))
    results = []
    for run_whole in (False, True):
        copies = copy.deepcopy(blocks)
        net = momres.MomentumNet(whole(copies) if run_whole else copies, GAMMA, residual=False)
        net.strategy = strategy
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grads = output_and_gradients(net, x)
        results.append([out, *grads])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_a_forward_patched_over_torchvisions_is_run_whole(monkeypatch):
    """A library that replaces ``BasicBlock.forward`` on the class (stochastic depth, say):
    the split would skip the patch, so the block runs whole."""
    original = BasicBlock.forward
    monkeypatch.setattr(BasicBlock, "forward", lambda self, x: original(self, x) * 0.5)
    assert _tail.branch(BasicBlock(8, 8), (), {}) is None
