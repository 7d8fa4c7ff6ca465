"""`momres bench`: the command end to end on tiny settings, and its measurements."""

import json

import pytest
import torch

from momres import memory
from momres.cli import bench, main
from momres.timing import floor_step_time


def test_bench_quick_writes_records_and_plots(tmp_path):
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    by = {(r["case"], r["system"]): r for r in data["records"]}
    for system in ("plain", "checkpoint", "momres-exact", "momres-float", "revnet"):
        assert ("conv", system) in by
    for record in data["records"]:
        assert record["step_time_ratio"] > 0 and record["max_batch_at_budget"] > 0
    assert by["conv", "plain"]["step_time_ratio"] == 1.0
    assert by["conv", "momres-exact"]["recompute_floor"] > 0
    assert by["conv", "revnet"]["baseline"] == "revnet-plain"
    # Memory-free systems keep less than plain autograd even at depth 3.
    assert by["conv", "momres-exact"]["saved_mib"] < by["conv", "plain"]["saved_mib"]
    assert by["transformer", "momres-exact"]["saved_mib"] < by["transformer", "plain"]["saved_mib"]
    assert (tmp_path / "saved_mib.png").stat().st_size > 0
    assert "torch" in data["machine"]


@pytest.mark.parametrize("system", ["checkpoint", "revnet"])
def test_baselines_compute_the_right_gradients(system):
    """checkpoint and revnet differ from their plain twins only in memory."""
    case = bench.Case("conv", 2, depth=4, width=8, size=6)
    twin = bench.TWIN.get(system, "plain")
    grads = []
    for name in (system, twin):
        model = case.build(name).double()
        x = case.input().double().requires_grad_()
        model(x).square().mean().backward()
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def test_peak_memory_runs_in_a_fresh_process_and_is_its_own():
    case = bench.Case("conv", 2, depth=2, width=8, size=8)
    big = torch.ones(2**28 // 4)  # 256 MiB resident in this process
    parent = memory.peak_resident_bytes() / memory.MIB
    child = bench.peak_memory_mib(case, "momres-exact", "cpu")
    del big
    assert child > 50  # torch itself is larger
    assert child < parent - 200  # the parent's peak is not inherited


def test_recompute_floor_is_one_step_plus_a_forward_without_grad():
    calls = []

    class Probe(torch.nn.Linear):
        def forward(self, x):
            calls.append(torch.is_grad_enabled())
            return super().forward(x)

    model = Probe(3, 3)
    assert floor_step_time(model, torch.randn(2, 3)) > 0
    assert calls == [False, True]  # the extra forward, then the training step
    assert model.weight.grad is not None


def test_bench_whole_model_quick(tmp_path):
    assert main(["bench", "--whole-model", "--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "whole_model.json").read_text())["results"]
    assert len(results) == 2
    for result in results:
        by = {r["system"]: r for r in result["records"]}
        assert {"plain", "checkpoint", "momres-default", "momres-least"} <= set(by)
        assert by["plain"]["traced_peak_ratio"] == 1.0
        assert by["momres-least"]["predicted_peak"] > 0 and by["momres-least"]["strategies"]
        assert by["plain"]["over_gradients_ratio"] == 1.0
        for r in (r for r in by.values() if r["budget"] is None):  # gradients not counted
            assert r["traced_peak"] - r["gradient_bytes"] <= r["over_gradients_peak"] \
                < r["traced_peak"]
    budgets = [r for r in results[0]["records"] if r["system"].startswith("momres-budget")]
    assert budgets and all(r["predicted_peak"] <= r["budget"] for r in budgets)
    assert (tmp_path / "whole_model_curve.png").stat().st_size > 0


def test_gpu_check_script_runs_at_toy_sizes(tmp_path):
    """The device check prepared for a lent GPU, on the CPU, so that it does not rot unseen."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
    subprocess.run([sys.executable, str(script), "--device", "cpu", "--quick", "--out",
                    str(tmp_path)], check=True, capture_output=True, text=True)
    records = json.loads((tmp_path / "gpu_check.json").read_text())["records"]
    small = {(r["config"], r["system"]) for r in records if r["part"] == "small"}
    assert {("demo", "exact"), ("resnet110", "autograd"), ("demo", "exact fused")} <= small
    whole = [r for r in records if r["part"] == "whole-model"]
    assert {r["system"] for r in whole} >= {"plain", "checkpoint", "momres-checkpoint-segments"}
    plain = next(r for r in whole if r["system"] == "plain")
    assert plain["peak_ratio"] == 1.0 and plain["peak_bytes"] > 0
