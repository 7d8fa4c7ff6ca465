"""`momres bench --quick`: a smoke test of the benchmark command (no timing assertions)."""

import json

from momres.cli import main


def test_bench_quick_writes_records(tmp_path):
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    systems = {r["system"] for r in data["records"]}
    assert {"plain", "momres-exact", "momres-float"} <= systems
    for record in data["records"]:
        assert record["step_time_ratio"] > 0 and record["saved_mib"] > 0
    assert "torch" in data["machine"]
