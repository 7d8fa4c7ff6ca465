"""``momres demo``: the table, the report and its figures (on a slice of digits, for time)."""

import json

from torch.utils.data import Subset

from momres import cli, training
from momres.cli import demo


def test_demo_prints_the_table_and_writes_the_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DEPTHS", (20, 32))
    load = training.load_dataset

    def first_images(*args, **kwargs):  # the real digits, fewer of them
        data = load(*args, **kwargs)
        data.train, data.test = Subset(data.train, range(128)), Subset(data.test, range(64))
        return data

    monkeypatch.setattr(training, "load_dataset", first_images)
    out = tmp_path / "demo"
    for _ in range(2):  # a second demo in the same folder replaces the first
        assert cli.main(["demo", "--out", str(out), "--depth", "20", "--epochs", "2",
                         "--batch-size", "32"]) == 0
    printed = capsys.readouterr().out
    assert "| resnet20 |" in printed and "| mresnet20 |" in printed

    report = (out / "report.md").read_text()
    for figure in ("accuracy.png", "memory_vs_depth.png"):
        assert f"]({figure})" in report
        assert (out / figure).read_bytes()[:4] == b"\x89PNG"
    result = json.loads((out / "demo.json").read_text())
    plain, momentum = result["summaries"]["resnet20"], result["summaries"]["mresnet20"]
    assert momentum["activation_memory_mib"] < plain["activation_memory_mib"]
    assert 0 <= momentum["test_accuracy"] <= 1 and plain["epochs"] == 2
    for row in result["memory_by_depth"]:
        assert row["mresnet_mib"] < row["resnet_mib"]
    deeper = result["memory_by_depth"][1]["resnet_mib"] / result["memory_by_depth"][0][
        "resnet_mib"]
    assert deeper > 1.3  # a ResNet's activation memory grows with depth
    assert f"| {plain['test_accuracy']:.1%} |" in report
    assert len((out / "train-mresnet20" / "metrics.jsonl").read_text().splitlines()) == 2
