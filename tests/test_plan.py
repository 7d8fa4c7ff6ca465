"""Execution strategies, the default per stage, and momres.plan: memory changes, never results."""

import copy
import sys

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock
from torchvision.models.vision_transformer import VisionTransformer

import momres
from momres import Strategy, models
from momres.cli import main
from momres.convert import (
    MEMORY_FREE_FROM,
    MomentumStage,
    checkpoint_part,
    find_parts,
    momentum_stages,
    part_checkpointed,
)
from momres.plan import measure, parse_bytes, traced_peak

from helpers import gradients, output_and_gradients, relative_error

STRATEGIES = ["autograd", "checkpoint", "exact", "float", Strategy("exact", keep_last=1),
              Strategy("float", keep_last=2), Strategy("exact", keep_last=9),
              Strategy("checkpoint", segment=2), Strategy("checkpoint", keep_last=1),
              Strategy("checkpoint", keep_last=1, segment=3)]


def small_model(name: str = "mresnet20") -> nn.Module:
    torch.manual_seed(0)
    return models.create_model(name, num_classes=4).double()


def run_as(model: nn.Module, strategy, checkpoint: bool) -> nn.Module:
    model = copy.deepcopy(model)
    for stage in momentum_stages(model).values():
        stage.strategy, stage.checkpoint = strategy, checkpoint
    return model


def batchnorm_statistics(model: nn.Module) -> list[torch.Tensor]:
    return [b for name, b in model.named_buffers() if "running" in name]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
def test_every_strategy_gives_plain_autograds_gradients_and_statistics(strategy):
    model = small_model()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    reference = run_as(model, "autograd", checkpoint=False)
    expected = gradients(reference, x)
    for checkpoint in (False, True):
        candidate = run_as(model, strategy, checkpoint)
        got = gradients(candidate, x)
        tolerance = 1e-5 if "float" in str(strategy) else 1e-10
        assert relative_error(got, expected) <= tolerance
        # One training step updates the BatchNorm statistics once, as plain autograd does.
        stats = batchnorm_statistics(candidate)
        assert relative_error(stats, batchnorm_statistics(reference)) <= tolerance
        assert all(s.num_batches_tracked == 1 for s in candidate.modules()
                   if isinstance(s, nn.BatchNorm2d))


def test_strategy_api_and_the_flags_it_maps():
    stage = momentum_stages(small_model())["layer1"]
    stage.strategy = "float"
    assert stage.momentum.memory_efficient and not stage.momentum.exact
    stage.strategy = Strategy("exact", keep_last=1)
    assert str(stage.strategy) == "exact, keep_last=1" and stage.momentum.exact
    stage.strategy = "checkpoint"
    assert not stage.momentum.memory_efficient and stage.strategy == Strategy("checkpoint")
    stage.momentum.memory_efficient = True  # the flags remain, and are views of the strategy
    assert stage.strategy == Strategy("exact")
    with pytest.raises(ValueError, match="unknown strategy 'fast'"):
        stage.strategy = "fast"
    stage.strategy = Strategy("checkpoint", keep_last=1, segment=2)
    assert str(stage.strategy) == "checkpoint, keep_last=1, segment=2"
    assert (stage.momentum.keep_last, stage.momentum.segment) == (1, 2)
    with pytest.raises(ValueError, match="keep_last applies to the strategies that recompute"):
        Strategy("autograd", keep_last=1)
    with pytest.raises(ValueError, match="keep_last must be an integer >= 0"):
        Strategy("exact", keep_last=-1)
    for bad in (0, -2, 1.5, True, "3"):
        with pytest.raises(ValueError, match="segment must be an integer >= 1"):
            Strategy("checkpoint", segment=bad)
    with pytest.raises(ValueError, match="segment applies to 'checkpoint' only"):
        Strategy("exact", segment=2)
    with pytest.raises(TypeError, match="a strategy is a Strategy"):
        stage.strategy = 3
    plain = momres.to_momentum(torch.nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 0.0,
                               stages=[""], keep_first=False, memory_efficient=False)
    with pytest.raises(ValueError, match="gamma=0 is not invertible"):
        plain.strategy = "exact"
    converted = momres.to_momentum(models.create_model("resnet56"), strategy="float")
    assert {str(s.strategy) for s in momentum_stages(converted).values()} == {"float"}


def test_default_checkpoints_shallow_stages_and_frees_deep_ones():
    for name, depth in (("mresnet20", 2), ("mresnet110", 17)):
        stages = momentum_stages(models.create_model(name))
        expected = "exact" if depth >= MEMORY_FREE_FROM else "checkpoint"
        assert {s.strategy.mode for s in stages.values()} == {expected}
        assert all(s.checkpoint for s in stages.values())
    float_model = models.create_model("mresnet110", exact=False)
    assert {s.strategy.mode for s in momentum_stages(float_model).values()} == {"float"}
    plain = models.create_model("mresnet110", memory_efficient=False)
    assert {s.strategy.mode for s in momentum_stages(plain).values()} == {"autograd"}


@pytest.mark.parametrize("name", models.list_models("mresnet*"))
def test_default_never_peaks_above_plain_autograd(name):
    """Every registry momentum model (torchvision's ResNet-18 to 152 among them), small input."""
    size = 16 if name.removeprefix("mresnet") in ("20", "32", "44", "56", "110") else 64
    x = torch.randn(2, 3, size, size)
    torch.manual_seed(0)
    plain = models.create_model(name.removeprefix("m"))
    torch.manual_seed(0)
    default = models.create_model(name)
    assert traced_peak(default, x) <= traced_peak(plain, x)


def test_plan_least_peak_matches_trace_and_keeps_gradients():
    model = small_model("mresnet32").float()
    x = torch.randn(8, 3, 16, 16)
    before = [b.clone() for b in model.buffers()]
    plan = momres.plan(model, x)
    # Planning leaves the model's statistics as they were.
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers(), strict=True))
    assert plan.peak <= plan.plain_peak and plan.least_peak == plan.peak
    assert abs(plan.traced_peak - plan.peak) <= 0.15 * plan.traced_peak
    text = str(plan)
    assert "layer1" in text and "working set" in text and "predicted peak" in text
    assert "conv1+bn1+relu" in text and f"peak is reached in {plan.peak_at}" in text
    planned = model.double()
    reference = run_as(planned, "autograd", checkpoint=False)
    x64 = x.double()
    assert relative_error(gradients(planned, x64), gradients(reference, x64)) <= 1e-10


def test_budget_plans_fit_are_deterministic_and_bad_budgets_are_clear_errors():
    model = small_model("mresnet32").float()
    x = torch.randn(8, 3, 16, 16)
    measured = measure(model, x)
    least = measured.choose()
    budget = (least.peak + measured.plain_peak) // 2
    first = measured.choose(budget)
    again = measure(model, x).choose(budget)  # measured anew: the same plan
    assert [(s.strategy, s.checkpoint) for s in first.stages] == \
        [(s.strategy, s.checkpoint) for s in again.stages]
    assert first.peak == again.peak <= budget and first.time <= least.time
    assert abs(traced_peak(model, x) - first.peak) <= 0.15 * first.peak
    with pytest.raises(ValueError, match=f"least peak.*{least.peak} bytes"):
        measured.choose(least.peak - 1)
    for bad in (-1, 0, "lots", "3 parsecs", float("nan"), True):
        with pytest.raises(ValueError, match="momres: .*budget"):
            momres.plan(model, x, budget=bad)
    assert parse_bytes("6GiB") == 6 * 2**30 and parse_bytes("500MB") == 500 * 10**6
    assert parse_bytes(" 1.5 kib ") == 1536 and parse_bytes(4096) == 4096


def test_a_budget_plan_whose_traced_peak_is_over_is_chosen_again(monkeypatch):
    """The prediction can miss: with every traced peak made 10% higher than it is, a budget
    plan is re-chosen until its traced peak fits (a lower predicted peak), and a budget that
    nothing fits then warns with the figures."""
    model = small_model("mresnet32").float()
    x = torch.randn(8, 3, 16, 16)
    measured = measure(model, x)
    planning = sys.modules["momres.plan"]
    monkeypatch.setattr(planning, "traced_peak", lambda *a: int(1.1 * traced_peak(*a)))
    budget = (measured.choose().peak + measured.plain_peak) // 2
    first = measured.choose(budget)
    first_traced = int(1.1 * traced_peak(model, x))
    assert first_traced > budget  # the first choice does not fit
    fitted = momres.plan(model, x, budget=budget)
    assert fitted.budget == budget and fitted.traced_peak <= budget < first_traced
    assert fitted.peak < first.peak
    assert int(1.1 * traced_peak(model, x)) == fitted.traced_peak  # the model runs that plan
    with pytest.warns(UserWarning, match="over the budget"):
        tight = momres.plan(model, x, budget=measured.choose().peak)
    assert tight.traced_peak > tight.budget


def test_plans_that_checkpoint_in_segments_or_keep_blocks_are_predicted_within_15_percent():
    """Between the least peak and plain autograd's, some plans checkpoint a stage in segments
    and some checkpoint its first blocks and store the last: their traced peaks are as
    predicted."""
    model = small_model("mresnet32").float()
    x = torch.randn(8, 3, 16, 16)
    measured = measure(model, x)
    least, plain = measured.choose().peak, measured.plain_peak
    seen = set()
    for k in range(1, 8):
        plan = measured.choose(least + (plain - least) * k // 8)
        new = {name for s in plan.stages if s.strategy.mode == "checkpoint"
               for name, used in (("segment", s.strategy.segment > 1),
                                  ("keep_last", s.strategy.keep_last > 0)) if used}
        if new:
            traced = traced_peak(model, x)
            assert abs(traced - plan.peak) <= 0.15 * traced
            seen |= new
    assert seen == {"segment", "keep_last"}


def test_plan_of_a_model_without_stages_is_refused():
    with pytest.raises(ValueError, match="no momentum stage"):
        momres.plan(models.create_model("resnet20"), torch.randn(2, 3, 8, 8))


def test_plan_command(capsys):
    assert main(["plan", "--model", "mresnet20", "--batch-size", "2", "--image-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "layer3" in out and "predicted peak" in out and "traced peak" in out
    assert main(["plan", "--model", "mresnet20", "--batch-size", "2", "--budget", "-1"]) == 2
    assert "positive number of bytes" in capsys.readouterr().err
    assert main(["plan", "--model", "mresnet20", "--batch-size", "2", "--image-size", "8",
                 "--budget", "1KiB"]) == 2
    assert "below the least peak" in capsys.readouterr().err


def test_strategies_store_what_they_say():
    """Per element of x: checkpointing stores (x, v) at each block but v = 0 at the first;
    memory-free with the last blocks kept stores those blocks as autograd does."""
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    stage = MomentumStage({str(n): BasicBlock(8, 8) for n in range(4)}, 0.9)
    stored = {}
    for strategy in ("autograd", "checkpoint", "exact", Strategy("exact", keep_last=2),
                     Strategy("checkpoint", segment=2), Strategy("checkpoint", segment=3),
                     Strategy("checkpoint", keep_last=2, segment=2)):
        stage.strategy = strategy
        stored[str(strategy)] = momres.activation_memory(stage, x) / x.numel()
    assert stored["checkpoint"] == 4 + 8 * 3
    assert stored["exact"] < stored["exact, keep_last=2"] < stored["autograd"]
    # In segments, (x, v) only at the start of each: x at the first, both at the others.
    assert stored["checkpoint, segment=2"] == stored["checkpoint, segment=3"] == 4 + 8
    blocks_kept = stored["autograd"] / 2  # per element of x, what two blocks store (of four)
    assert stored["checkpoint, keep_last=2, segment=2"] == pytest.approx(4 + blocks_kept,
                                                                         abs=0.5)


def _parts_of_copy(model: nn.Module, x: torch.Tensor) -> list:
    """The parts of ``model`` (found on a copy: the pass updates BatchNorm statistics)."""
    twin = copy.deepcopy(model)
    with torch.no_grad(), find_parts(twin) as found:
        twin(x)
    return found


@pytest.mark.parametrize("name", models.list_models("mresnet*"))
def test_checkpointed_parts_give_plain_gradients_and_statistics(name):
    """The stem and the head of every registry model, checkpointed: the same outputs and
    gradients as stored (float64), the BatchNorm statistics updated once."""
    size = 16 if name.removeprefix("mresnet") in ("20", "32", "44", "56", "110") else 64
    torch.manual_seed(0)
    model = run_as(models.create_model(name).double(), "checkpoint", checkpoint=True)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    found = _parts_of_copy(model, x)
    assert [str(f.part) for f in found if f.gap == 0] == \
        ["conv1+bn1+relu" + ("+maxpool" if size == 64 else "")]
    stored = copy.deepcopy(model)
    for f in found:
        checkpoint_part(model, f.part)
        assert part_checkpointed(model, f.part) and not part_checkpointed(stored, f.part)
    out, grads = output_and_gradients(model, x)
    expected_out, expected = output_and_gradients(stored, x)
    assert relative_error([out], [expected_out]) <= 1e-10
    assert relative_error(grads, expected) <= 1e-10
    assert relative_error(batchnorm_statistics(model), batchnorm_statistics(stored)) <= 1e-12
    assert all(m.num_batches_tracked == 1 for m in model.modules()
               if isinstance(m, nn.BatchNorm2d))
    for f in found:
        checkpoint_part(model, f.part, False)
        assert not part_checkpointed(model, f.part)


def test_checkpointed_parts_replay_dropout_and_survive_a_copy():
    """A ViT's parts (patch embedding, dropout, final norm, head): the recompute draws the same
    random numbers; a deep copy of a model with checkpointed parts runs its own modules."""
    torch.manual_seed(0)
    vit = VisionTransformer(16, 8, 2, 2, 16, 32, dropout=0.2)
    nn.init.normal_(vit.heads.head.weight)  # (zeros in torchvision)
    vit = momres.to_momentum(vit).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    found = _parts_of_copy(vit, x)
    assert {str(f.part) for f in found} >= {"conv_proj", "encoder.dropout", "encoder.ln"}
    stored = copy.deepcopy(vit)
    for f in found:
        checkpoint_part(vit, f.part)
    twin = copy.deepcopy(vit)
    for model in (vit, twin):
        torch.manual_seed(1)
        got = output_and_gradients(model, x)
        torch.manual_seed(1)
        expected = output_and_gradients(stored, x)
        assert relative_error([got[0], *got[1]], [expected[0], *expected[1]]) <= 1e-10
    with torch.no_grad():
        twin.conv_proj.weight.add_(1.0)  # the copy's parts run the copy's modules
        assert not torch.equal(twin(x), vit(x))
    plan = momres.plan(stored.float(), x.float())  # dropout: every traced run draws alike
    assert {str(p) for g in plan.parts for p in g.parts} == {str(f.part) for f in found}


def test_plan_checkpoints_the_stem_where_it_lowers_the_peak():
    torch.manual_seed(0)
    model = models.create_model("mresnet18").float()
    x = torch.randn(4, 3, 64, 64)
    measured = measure(model, x)
    assert not any(part_checkpointed(model, f.part) for f in measured.parts)  # left as it was
    plan = measured.choose()
    stem = next(g for g in plan.parts if g.gap == 0)
    assert stem.checkpoint and "conv1+bn1+relu+maxpool" in str(plan)
    assert all(part_checkpointed(model, p) for p in stem.parts)
    traced = traced_peak(model, x)
    assert abs(traced - plan.peak) <= 0.15 * traced
    # Without the stem checkpointed the least plan peaks higher.
    plan.parts[0].checkpoint = False
    plan.apply(model)
    assert traced_peak(model, x) > traced
    again = measure(model, x).choose()
    assert [(g.gap, g.checkpoint) for g in again.parts] == [(g.gap, g.checkpoint)
                                                           for g in measured.choose().parts]


def test_the_traces_see_blocks_run_as_they_run_unobserved():
    """The planner marks block boundaries without hooks on the blocks, which would keep the
    rule from taking a torchvision block's add and ReLU (``_tail``): its autograd trace peaks
    where the model under autograd does."""
    model = small_model("mresnet32").float()
    x = torch.randn(8, 3, 16, 16)
    measured = measure(model, x)
    assert not momres.momentum.BLOCK_OBSERVERS  # removed after tracing
    autograd = run_as(model, "autograd", False)
    assert abs(traced_peak(autograd, x) - measured.plain_peak) <= 0.01 * measured.plain_peak
