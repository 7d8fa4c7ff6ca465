"""The paper's claims at reduced settings: each experiment's direction, with a margin."""

import json
import math

import pytest
import torch

from momres import MomentumNet, to_momentum
from momres.cli import main
from momres.cli.experiments import _common, dynamics1d, finetune, l2o, linear, memory, rings
from momres.models import create_model


def check_outputs(out, result, figures):
    """result.json holds the four fields and matches what run() returned; figures exist."""
    written = json.loads((out / "result.json").read_text())
    assert set(written) == {"claim", "metrics", "config", "reproduced"}
    assert written == json.loads(json.dumps(result))
    assert isinstance(written["reproduced"], bool) and written["config"]["seed"] == 0
    for name in figures:
        assert (out / f"{name}.png").stat().st_size > 10_000


def test_dynamics1d_momentum_learns_the_crossing_map(tmp_path):
    result = dynamics1d.run(tmp_path, dynamics1d.Config(steps=200))
    m = result["metrics"]
    assert m["momentum_loss"] * 10 <= m["resnet_loss"]
    # The ResNet cannot beat the best order-preserving map by much.
    assert m["resnet_loss"] >= 0.8 * m["best_order_preserving_loss"]
    assert result["reproduced"]
    check_outputs(tmp_path, result, ["dynamics1d"])


def test_rings_momentum_separates_nested_rings(tmp_path):
    """At this budget momentum separates the rings and the ResNet does not.  (With unit steps
    the ResNet is no flow: given 3000 steps it separates them too, see docs/experiments.md.)"""
    result = rings.run(tmp_path, rings.Config(steps=400, batch=128))
    m = result["metrics"]
    assert m["momentum_accuracy"] >= 0.85
    assert m["momentum_accuracy"] >= m["resnet_accuracy"] + 0.15
    check_outputs(tmp_path, result, ["rings_decision", "rings_trajectories"])


def test_linear_momentum_fits_a_reflection(tmp_path):
    result = linear.run(tmp_path, linear.Config(depth=16, random_targets=1, steps=300))
    m = result["metrics"]
    assert m["momentum_error"] * 10 <= m["resnet_error"]
    assert m["resnet_error"] >= 0.95 * m["resnet_bound"]  # the det > 0 bound holds
    assert m["momentum_random_error_max"] <= 0.1
    assert -1 < m["lowest_reachable_eigenvalue"] < 0
    assert result["reproduced"]
    check_outputs(tmp_path, result, ["linear"])


def test_l2o_momentum_converges_past_training_depth_revnet_does_not(tmp_path):
    result = l2o.run(tmp_path, l2o.Config(depth=6, steps=200, batch=128))
    m = result["metrics"]
    assert m["momentum_error"] * 10 <= m["revnet_error"]
    assert m["momentum_error"] <= 1e-2 and m["resnet_error"] <= 1e-2
    assert m["iterations"] == [6, 12, 24, 48] and len(m["curves"]["revnet"]) == 48
    assert result["reproduced"]
    check_outputs(tmp_path, result, ["l2o"])


def test_memory_constant_in_depth_and_buffer_rate_matches_theory(tmp_path):
    config = memory.Config(depths=(2, 8), batch=4, channels=8, size=8, gammas=(0.5, 0.9))
    result = memory.run(tmp_path, config)
    m = result["metrics"]
    for system in ("momres-exact", "momres-float", "revnet"):
        assert m[system]["saved_mib"][0] == pytest.approx(m[system]["saved_mib"][1], rel=0.05)
    assert m["resnet"]["saved_mib"][1] >= 3.5 * m["resnet"]["saved_mib"][0]
    assert m["checkpoint"]["saved_mib"][1] < m["resnet"]["saved_mib"][1]
    bits = m["buffer_bits_per_block"]
    assert bits["measured"] == pytest.approx(bits["theory_log2_d_over_n"], rel=0.05)
    assert result["reproduced"]
    check_outputs(tmp_path, result, ["memory"])


def test_finetune_converted_model_matches_resnet_accuracy(tmp_path):
    result = finetune.run(tmp_path, finetune.Config(pretrain_steps=60, finetune_steps=60,
                                                    batch=32))
    m = result["metrics"]
    assert m["resnet_accuracy"] >= 0.9
    assert m["momentum_accuracy"] >= m["resnet_accuracy"] - 0.05
    assert m["momentum_activation_memory_mib"] < m["resnet_activation_memory_mib"]
    check_outputs(tmp_path, result, ["finetune"])


def test_converted_deep_resnet_has_lower_peak_memory():
    """The memory half of the fine-tuning claim, at the depth of ``finetune --full``."""
    torch.manual_seed(0)
    resnet = create_model("resnet56", num_classes=5, in_channels=1)
    x = torch.randn(16, 1, 16, 16)
    momentum_peak = _common.peak_step_memory(to_momentum(resnet, 0.9), x)
    assert momentum_peak <= 0.75 * _common.peak_step_memory(resnet, x)


def test_trajectory_records_every_state():
    torch.manual_seed(0)
    block = _common.tanh_block(2, 4)
    net = MomentumNet([block] * 5, 0.5)  # one block shared by every layer
    x = torch.randn(3, 2)
    states = _common.trajectory(net, x)
    assert states.shape == (6, 3, 2)
    assert torch.equal(states[0], x)
    with torch.no_grad():
        assert torch.allclose(states[-1], net(x))
        assert torch.allclose(states[2], MomentumNet([block] * 2, 0.5)(x))


def test_scale_error_is_the_sine_of_the_angle():
    a = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    assert linear.scale_error(3 * a, a).item() == pytest.approx(0, abs=1e-7)
    assert linear.scale_error(-a, a).item() == 1  # no positive factor helps
    assert linear.scale_error(torch.eye(2, dtype=torch.float64), a).item() == pytest.approx(1)
    assert linear.scale_error(torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64)),
                              a).item() == pytest.approx(2**-0.5)


def test_reach_solves_the_second_order_ode():
    lam = torch.tensor([-30.0, -2.0, 0.0, 1.0], dtype=torch.float64)
    # Small epsilon: the first-order flow, exp(lambda).
    assert torch.allclose(linear.reach(torch.tensor(1e-4, dtype=torch.float64), lam),
                          lam.exp(), atol=1e-3)
    # Closed form for real roots r1, r2 of eps r^2 + r - lambda: (r2 e^r1 - r1 e^r2) / (r2 - r1).
    eps, lam = 0.1, torch.tensor(2.0, dtype=torch.float64)
    disc = math.sqrt(1 + 4 * eps * lam.item())
    r1, r2 = (-1 + disc) / (2 * eps), (-1 - disc) / (2 * eps)
    expected = (r2 * math.exp(r1) - r1 * math.exp(r2)) / (r2 - r1)
    assert linear.reach(torch.tensor(eps, dtype=torch.float64), lam).item() == pytest.approx(
        expected)
    # Momentum reaches negative eigenvalues, more of them as epsilon grows.
    low = linear.lowest_reachable(torch.tensor([0.05, 1.0, 10.0], dtype=torch.float64))
    assert low[0] > low[1] > low[2] and low[1] < -0.5


def test_cli_writes_result_and_figures(tmp_path, monkeypatch):
    quick = dynamics1d.Config(steps=3)
    monkeypatch.setattr(dynamics1d, "Config", lambda: quick)
    assert main(["experiment", "dynamics1d", "--out", str(tmp_path / "run"), "--seed",
                 "0"]) == 0
    check_outputs(tmp_path / "run", json.loads((tmp_path / "run" / "result.json").read_text()),
                  ["dynamics1d"])


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    afile = tmp_path / "file"
    afile.write_text("")
    assert main(["experiment", "rings", "--out", str(afile)]) == 2
    assert "momres: --out" in capsys.readouterr().err
    assert main(["experiment", "rings", "--out", str(tmp_path), "--seed", "-1"]) == 2
    assert "momres: --seed" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: no such experiment
        main(["experiment", "nonsense", "--out", str(tmp_path)])


def test_result_json_is_strict_json(tmp_path):
    """A diverged error (inf) is written as null, not as the non-standard Infinity."""
    result = _common.finish(tmp_path, "claim", {"error": math.inf, "curve": [1.0, math.nan]},
                            dynamics1d.Config(), seed=0, reproduced=True)
    assert result["metrics"] == {"error": None, "curve": [1.0, None]}
    assert "Infinity" not in (tmp_path / "result.json").read_text()
