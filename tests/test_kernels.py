"""The fused C kernels (``momres._kernels``) compute the eager arithmetic's integers bit for bit,
fall back to it (with one warning) where they cannot be built, and are built once per cache."""

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import momres
from momres import _exact, _kernels

from helpers import kernel_library, private_kernel_cache  # noqa: F401 (a fixture)

# Every test builds into (or reuses) one cache of this session's own.
pytestmark = [pytest.mark.skipif(shutil.which(_kernels.compiler()) is None,
                                 reason="no C compiler: the fused kernels cannot be built"),
              pytest.mark.usefixtures("private_kernel_cache")]

#: gamma = num/den: common, tiny, near one, coprime odd, the largest denominator.
FRACTIONS = [(9, 10), (1, 20), (65535, 65536), (3, 7), (1, 65536), (1234, 4321)]
BUFFERS = [torch.uint8, torch.int16, torch.int32, torch.float64]


def integers(n, magnitude, generator, nonnegative=False):
    """Random integers as float64, of every size up to ``magnitude``, with the extremes."""
    bits = torch.randint(0, max(1, int(magnitude).bit_length()), (n,), generator=generator)
    ints = (torch.rand(n, generator=generator, dtype=torch.float64) * 2.0**bits).floor()
    # A quarter in the top octave, where a product by a reciprocal can miss the floor by one.
    top = torch.rand(n // 4, generator=generator, dtype=torch.float64).add_(1).mul_(magnitude / 2)
    ints[: n // 4] = top.floor_()
    ints[:4] = torch.tensor([0.0, 1.0, magnitude, magnitude - 1])
    if not nonnegative:
        ints *= torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    return ints.clamp(-magnitude, magnitude)


def activations(n, dtype, generator):
    """Random values of widely spread magnitudes (and exact zeros, halves of the grid)."""
    g = torch.randn(n, generator=generator, dtype=torch.float64)
    g *= 10.0 ** torch.randint(-6, 3, (n,), generator=generator)
    g[:3] = torch.tensor([0.0, 0.5, -2.5])
    return g.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num,den", FRACTIONS)
def test_forward_step_matches_eager(dtype, num, den):
    gen = torch.Generator().manual_seed(num * den)
    n, k = 100_003, _exact.default_frac_bits(dtype)
    scale, unit = (1 - num / den) * 2.0**k, 2.0**-k
    x = integers(n, 2.0**51, gen) * unit
    v = integers(n, 2.0**50, gen)
    buf = integers(n, (2**53 - den) // den, gen, nonnegative=True)  # up to a spill's bound
    g = activations(n, dtype, gen)
    ex, ev, ebuf = x.clone(), v.clone(), buf.clone()
    ev, ebuf, _ = _exact.forward_step_(ex, ev, ebuf, torch.empty_like(x), g, num, den, scale,
                                       unit)
    _kernels.forward_step_(kernel_library(), x, v, buf, g, num, den, scale, unit)
    assert torch.equal(x, ex) and torch.equal(v, ev) and torch.equal(buf, ebuf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("buffer", BUFFERS)
@pytest.mark.parametrize("num,den", FRACTIONS)
def test_backward_step_matches_eager(dtype, buffer, num, den):
    gen = torch.Generator().manual_seed(num + den)
    n, k = 100_003, _exact.default_frac_bits(dtype)
    scale = (1 - num / den) * 2.0**k
    top = 2.0**52 if buffer == torch.float64 else torch.iinfo(buffer).max
    v = integers(n, max(1.0, 2.0**50 * num // den), gen)  # v*den/num stays below 2**52
    buf = integers(n, min(top, (2**53 - den) // den), gen, nonnegative=True).to(buffer)
    g = activations(n, dtype, gen)
    ev, ebuf = v.clone(), buf.clone()
    _exact.backward_chunk_(ev, ebuf, g, torch.empty_like(v), torch.empty_like(v), num, den,
                           scale)
    _kernels.backward_step_(kernel_library(), v, buf, g, num, den, scale)
    assert torch.equal(v, ev) and torch.equal(buf, ebuf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_retreat_matches_eager(dtype):
    gen = torch.Generator().manual_seed(1)
    n, k = 100_003, _exact.default_frac_bits(dtype)
    grid = integers(n, 2.0**51, gen) * 2.0**-k
    x, remainder = _exact.split_grid_(grid, k, dtype)
    v = integers(n, 2.0**50, gen)
    ex = x.clone()
    er = None if remainder is None else remainder.clone()
    if er is None:
        ex.sub_(v, alpha=2.0**-k)
    else:
        _exact.retreat_chunk_(ex, er, v, torch.empty_like(v), k)
    _kernels.retreat_(kernel_library(), x, remainder, v, k)
    assert torch.equal(x, ex)
    assert remainder is None or torch.equal(remainder, er)


def stage_gradients(monkeypatch, kernels, dtype=torch.float32, channels_last=False):
    monkeypatch.setenv("MOMRES_KERNELS", "1" if kernels else "0")
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh()) for _ in range(40)]
    net = momres.MomentumNet(blocks, 0.9).to(dtype)
    x = torch.randn(64, 4, 8, 8, dtype=dtype)  # 16384 elements: more than one thread's share
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with momres.debug.record_states() as log:
        net(x).square().sum().backward()
    return log, [x.grad] + [p.grad for p in net.parameters()]


def test_threads_split_the_work_without_changing_it():
    """Each element's arithmetic is its own: any number of threads gives the same integers."""
    gen = torch.Generator().manual_seed(2)
    n, lib = 200_003, kernel_library()
    v = integers(n, 2.0**45, gen)
    buf = integers(n, 2.0**31 - 1, gen, nonnegative=True).to(torch.int32)
    g = activations(n, torch.float32, gen)
    results = []
    for threads in (1, 3):
        vt, buft = v.clone(), buf.clone()
        lib.momres_backward_f32_i32(vt.data_ptr(), buft.data_ptr(), g.data_ptr(), n, 9, 10,
                                    0.1 * 2.0**30, threads)
        results.append((vt, buft))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert not torch.equal(results[0][0], v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stage_with_kernels_matches_eager(monkeypatch, dtype):
    log, grads = stage_gradients(monkeypatch, True, dtype)
    eager_log, eager_grads = stage_gradients(monkeypatch, False, dtype)
    for phase in ("forward", "backward"):
        for n, state in eager_log[phase].items():
            for a, b in zip(state, log[phase][n], strict=True):
                assert torch.equal(a, b), (phase, n)
    for a, b in zip(grads, eager_grads, strict=True):
        assert torch.equal(a, b)


def test_channels_last_stage_with_kernels_matches_eager(monkeypatch):
    _, grads = stage_gradients(monkeypatch, True, channels_last=True)
    _, eager_grads = stage_gradients(monkeypatch, False, channels_last=True)
    for a, b in zip(grads, eager_grads, strict=True):
        assert torch.equal(a, b)


def test_missing_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    _, eager_grads = stage_gradients(monkeypatch, False)
    monkeypatch.setenv("MOMRES_CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("MOMRES_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(_kernels, "_library", None)
    monkeypatch.setattr(_kernels, "_failed", False)
    with pytest.warns(RuntimeWarning, match="could not build the fused") as caught:
        _, grads = stage_gradients(monkeypatch, True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            stage_gradients(monkeypatch, True)
    assert len([w for w in caught if "fused" in str(w.message)]) == 1
    for a, b in zip(grads, eager_grads, strict=True):
        assert torch.equal(a, b)


def test_a_compiler_without_openmp_builds_them_single_threaded(monkeypatch, tmp_path):
    cc = tmp_path / "cc-without-openmp"
    cc.write_text(f'#!/bin/sh\ncase "$*" in *-fopenmp*) exit 1;; esac\n'
                  f'exec {shutil.which(_kernels.compiler())} "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv("MOMRES_CC", str(cc))
    monkeypatch.setenv("MOMRES_CACHE_DIR", str(tmp_path / "cache"))
    lib = _kernels.load()
    assert not hasattr(lib, "omp_get_num_threads")
    gen = torch.Generator().manual_seed(3)
    v, g = integers(100_000, 2.0**40, gen), activations(100_000, torch.float32, gen)
    buf = integers(100_000, 255, gen, nonnegative=True).to(torch.uint8)
    ev, ebuf = v.clone(), buf.clone()
    _exact.backward_chunk_(ev, ebuf, g, torch.empty_like(v), torch.empty_like(v), 9, 10, 2.0**20)
    lib.momres_backward_f32_u8(v.data_ptr(), buf.data_ptr(), g.data_ptr(), v.numel(), 9, 10,
                               2.0**20, 4)
    assert torch.equal(v, ev) and torch.equal(buf, ebuf)


def test_kernels_are_off_where_they_cannot_run(monkeypatch):
    assert _kernels.kernels(torch.zeros(1)) is not None
    monkeypatch.setenv("MOMRES_KERNELS", "0")
    assert _kernels.kernels(torch.zeros(1)) is None
    assert not _kernels.supported(torch.zeros(4, 4).t())  # strided view
    assert not _kernels.supported(torch.zeros(4, dtype=torch.float16))
    assert not _kernels.supported(torch.zeros(4), torch.zeros(2, 2))


def test_the_cache_is_reused_in_a_new_process(tmp_path):
    """A fresh process builds the library once; the next one loads it without compiling."""
    script = ("import time, torch\nfrom momres import _kernels\nt = time.perf_counter()\n"
              "assert _kernels.kernels(torch.zeros(1)) is not None\n"
              "print(time.perf_counter() - t)\n")
    env = {**os.environ, "MOMRES_CACHE_DIR": str(tmp_path)}

    def run():
        out = subprocess.run([sys.executable, "-c", script], env=env, check=True,
                             capture_output=True, text=True)
        return float(out.stdout)

    run()
    built = sorted(tmp_path.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary left behind
    mtime = built[0].stat().st_mtime_ns
    run()
    assert sorted(tmp_path.iterdir()) == built and built[0].stat().st_mtime_ns == mtime


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("gamma", [0.9, 0.0, 1 / 3])
def test_rule_kernels_match_the_eager_operations(dtype, residual, gamma):
    """The floating-point rule's kernels give torch's numbers bit for bit (an odd length, so
    that a vectorised body and its scalar tail are both checked)."""
    gen, lib, n = torch.Generator().manual_seed(3), kernel_library(), 100_003
    x, v, y, a_x, a_v = (activations(n, dtype, gen) for _ in range(5))
    g = y if residual else y - x
    v_new = torch.mul(v, gamma).add_(g, alpha=1 - gamma)
    for got, want in zip(_kernels.rule_forward(lib, x, v, y, gamma, residual),
                         (x + v_new, v_new), strict=True):
        assert torch.equal(got, want)
    xa, va = x.clone(), v.clone()
    assert _kernels.rule_advance_(lib, xa, va, g, gamma)
    assert torch.equal(va, v_new) and torch.equal(xa, x + v_new)
    if gamma:
        vr = v.clone()
        assert _kernels.rule_rebuild_(lib, vr, g, gamma)
        assert torch.equal(vr, v.clone().sub_(g, alpha=1 - gamma).div_(gamma))
    b = a_x + a_v
    d_y = b * (1 - gamma)
    want = (a_x if residual else a_x - d_y, b * gamma, d_y)
    for got, w in zip(_kernels.rule_backward(lib, a_x, a_v, gamma, residual), want, strict=True):
        assert torch.equal(got, w)


def test_rule_kernels_refuse_mixed_or_strided_tensors():
    lib, x = kernel_library(), torch.randn(8, 6)
    assert _kernels.rule_forward(lib, x, x.double(), x, 0.9, True) is None
    assert _kernels.rule_backward(lib, x.t(), x.t().contiguous(), 0.9, True) is None
    assert not _kernels.rule_advance_(lib, x.half(), x.half(), x.half(), 0.9)


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_momentum_rule_with_kernels_matches_eager(monkeypatch, memory_efficient):
    """A stage under autograd (``RuleStep``) and in float mode, kernels on and off: the same
    outputs and gradients; and the two modes agree with each other as before."""
    def run(kernels):
        monkeypatch.setenv("MOMRES_KERNELS", "1" if kernels else "0")
        torch.manual_seed(0)
        blocks = [nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh()) for _ in range(6)]
        net = momres.MomentumNet(blocks, 0.9, residual=False, exact=False,
                                 memory_efficient=memory_efficient)
        x = torch.randn(64, 4, 8, 8, requires_grad=True)
        out = net(x)
        out.square().sum().backward()
        return [out.detach(), x.grad, *(p.grad for p in net.parameters())]

    for a, b in zip(run(True), run(False), strict=True):
        assert torch.equal(a, b)


def test_double_backward_through_the_rule_runs_the_differentiable_operations(monkeypatch):
    torch.manual_seed(0)
    net = momres.MomentumNet([nn.Sequential(nn.Linear(5, 5), nn.Tanh()) for _ in range(3)],
                             0.9, memory_efficient=False).double()
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(net, (x,))
