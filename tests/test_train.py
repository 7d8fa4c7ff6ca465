"""``momres train``: outputs, resume, divergence, fine-tuning, torchrun, clear errors."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torchvision

from momres import cli, models
from momres.training import Config, Trainer, load_pretrained, lr_factor


def settings(tmp_path, name="run", **changes) -> Config:
    base = Config(out=tmp_path / name, dataset="synthetic", model="mresnet20", epochs=1,
                  batch_size=64, device="cpu", progress=False)
    return dataclasses.replace(base, **changes)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_command_writes_metrics_checkpoints_and_figures(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "--dataset", "synthetic", "--model", "mresnet20", "--epochs", "2",
                   "--batch-size", "32", "--train-subset", "64", "--schedule", "cosine",
                   "--lr", "0.2",
                   "--device", "cpu", "--no-progress", "--out", str(out)])
    assert rc == 0
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy",
                    "epoch_seconds", "peak_memory_mib"):
            assert isinstance(r[key], float), key
        assert 0 <= r["train_accuracy"] <= 1 and 0 <= r["test_accuracy"] <= 1
        assert (r["test_accuracy"] * 64).is_integer()  # all 64 test images, counted once
        assert r["peak_memory_mib"] > 0
    assert records[0]["lr"] == 0.2 and records[1]["lr"] == pytest.approx(0.1)  # cosine, 2 epochs
    config = json.loads((out / "config.json").read_text())
    assert config["schedule"] == "cosine" and config["out"] == str(out)
    assert config["train_subset"] == 64
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["activation_memory_mib"] > 0
    assert summary["test_accuracy"] == records[-1]["test_accuracy"]
    assert json.loads(capsys.readouterr().out)["model"] == "mresnet20"
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2
    assert torch.load(out / "best.pt", weights_only=True)["best_accuracy"] == max(
        r["test_accuracy"] for r in records)
    assert not list(out.glob(".*tmp"))  # no temporary files left behind


def test_learning_rate_schedules(tmp_path):
    step = Config(out=tmp_path, epochs=8, milestones=[4, 6], lr_decay=0.1)
    assert [lr_factor(step, e) for e in range(8)] == pytest.approx(
        [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    cosine = Config(out=tmp_path, epochs=5, schedule="cosine", warmup_epochs=1)
    factors = [lr_factor(cosine, e) for e in range(5)]
    assert factors[:3] == pytest.approx([0.1, 1, 0.5 * (1 + 2**-0.5)])
    assert all(a > b for a, b in zip(factors[1:], factors[2:], strict=False))
    with pytest.raises(ValueError, match="warmup-epochs"):
        Config(out=tmp_path, epochs=2, warmup_epochs=2).check()


def test_resumed_run_ends_with_the_parameters_of_an_uninterrupted_one(tmp_path):
    common = {"epochs": 2, "schedule": "step", "milestones": [1], "lr": 0.05}
    Trainer(settings(tmp_path, "straight", **common)).fit()

    interrupted = Trainer(settings(tmp_path, "resumed", **common))
    interrupted.run_epoch(0)  # then the process "dies"
    del interrupted
    resumed = Trainer(settings(tmp_path, "resumed", resume=True, **common))
    assert resumed.start_epoch == 1
    resumed.fit()

    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    momentum = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    assert all(torch.equal(x, s["momentum_buffer"])
               for x, s in zip(momentum, b["optimizer"]["state"].values(), strict=True))
    same = ("epoch", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy")
    assert [{k: r[k] for k in same} for r in read_metrics(tmp_path / "straight")] == [
        {k: r[k] for k in same} for r in read_metrics(tmp_path / "resumed")]
    assert read_metrics(tmp_path / "resumed")[1]["lr"] == pytest.approx(0.005)  # the schedule too


def test_bfloat16_autocast_step(tmp_path):
    trainer = Trainer(settings(tmp_path, amp="bfloat16", batch_size=16))
    x, y = next(iter(trainer.train_loader))
    before = trainer.model.fc.weight.detach().clone()
    loss, correct = trainer._step(x, y)
    assert torch.isfinite(loss) and 0 <= correct <= len(y)
    assert not torch.equal(before, trainer.model.fc.weight)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(settings(tmp_path, epochs=2))
    trainer.run_epoch(0)
    good = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with torch.no_grad():
        trainer.model.fc.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError,
                       match=r"diverged at epoch 2, step 1.*checkpoint\.pt, after epoch 1"):
        trainer.run_epoch(1)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == good
    assert len(read_metrics(tmp_path / "run")) == 1


def test_init_from_torchvision_state_dict(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=1000).state_dict()
    model = models.create_model("mresnet18", num_classes=10, in_channels=1)
    fresh = load_pretrained_from(tmp_path, model, reference)
    assert fresh == ["fc.weight", "fc.bias"]
    state = model.state_dict()
    assert torch.equal(state["conv1.weight"], reference["conv1.weight"].sum(1, keepdim=True))
    for key in ("layer3.1.conv2.weight", "layer4.0.downsample.1.running_var", "bn1.bias"):
        assert torch.equal(state[key], reference[key]), key
    cifar_stem = models.create_model("mresnet18", num_classes=10, stem="cifar")
    assert load_pretrained_from(tmp_path, cifar_stem, reference) == [
        "conv1.weight", "fc.weight", "fc.bias"]


def load_pretrained_from(tmp_path, model, state):
    path = tmp_path / "weights.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # as saved by a DDP model
    return load_pretrained(model, path)


def test_fine_tuning_run_starts_from_the_weights_with_a_new_head(tmp_path):
    torch.manual_seed(1)
    source = models.create_model("resnet20", num_classes=100)  # torchvision module names
    torch.save(source.state_dict(), tmp_path / "resnet20.pth")
    trainer = Trainer(settings(tmp_path, init_from=tmp_path / "resnet20.pth"))
    state = trainer.model.state_dict()
    assert state["fc.weight"].shape == (10, 64)
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(state[key], value), key
    record = trainer.run_epoch(0)
    assert record["train_loss"] < 10


def torchrun(out, *options: str) -> subprocess.CompletedProcess:
    """``momres train`` on the synthetic set under torchrun, 2 CPU processes (faulthandler on:
    a native abort prints each thread's Python stack)."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "momres", "train", "--dataset", "synthetic", "--model", "mresnet20",
         "--device", "cpu", "--no-progress", "--out", str(out), *options],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"},
    )


def torchrun_all(tmp_path, runs: list[tuple[str, tuple[str, ...]]]):
    """``torchrun(tmp_path / name, *options)`` for each run in order, all of them once more
    in a fresh folder if a rank died of SIGABRT (gloo has aborted a process at teardown,
    rarely, on a loaded machine); any other failure fails the test.  The folder they ran in."""
    for retry in (False, True):
        base = tmp_path / ("again" if retry else "first")
        results = []
        for name, options in runs:
            results.append(torchrun(base / name, *options))
            if results[-1].returncode:
                break
        else:
            return base, results
        if retry or "Signal 6 (SIGABRT)" not in results[-1].stderr:
            pytest.fail(results[-1].stderr[-3000:])


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    base, (result,) = torchrun_all(tmp_path, [("ddp", ("--epochs", "1", "--batch-size", "32"))])
    out = base / "ddp"
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    (record,) = read_metrics(out)
    assert (record["test_accuracy"] * 64).is_integer()  # both halves of the test set, summed
    assert record["images_per_second"] > 0
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(checkpoint["rng"]) == 2  # every rank's random state, for --resume
    assert not any(k.startswith("module.") for k in checkpoint["model"])
    assert result.stdout.count('"model": "mresnet20"') == 1  # rank 0 alone reports


# 2 steps per epoch each, a constant learning rate (a 1-epoch run then follows the same
# schedule as the first epoch of 2).
SHORT = ("--batch-size", "16", "--train-subset", "64", "--lr-decay", "1")


@pytest.mark.slow
def test_torchrun_fsdp_resumed_equals_ddp(tmp_path):
    """--fsdp (each momentum block and the model sharded) trains as DDP does, and its
    checkpoints (whole tensors, from rank 0) resume: 1 epoch + 1 resumed = 2 epochs of DDP."""
    base, _ = torchrun_all(tmp_path, [
        ("fsdp", (*SHORT, "--epochs", "1", "--fsdp")),
        ("fsdp", (*SHORT, "--epochs", "2", "--fsdp", "--resume")),
        ("ddp", (*SHORT, "--epochs", "2")),
    ])
    assert [r["epoch"] for r in read_metrics(base / "fsdp")] == [1, 2]
    fsdp, ddp = (torch.load(base / run / "checkpoint.pt", weights_only=True)["model"]
                 for run in ("fsdp", "ddp"))
    assert fsdp.keys() == ddp.keys()
    for name, value in ddp.items():
        assert type(fsdp[name]) is torch.Tensor  # whole, not a shard
        assert torch.allclose(fsdp[name], value, rtol=1e-4, atol=1e-6), name


@pytest.mark.slow
def test_short_digits_run_reaches_90_percent(tmp_path):
    summary = Trainer(Config(out=tmp_path / "digits", dataset="digits", model="mresnet20",
                             epochs=3, batch_size=32, lr=0.1, schedule="cosine", device="cpu",
                             progress=False)).fit()
    assert summary["test_accuracy"] >= 0.90


def train(tmp_path, capsys, *args):
    rc = cli.main(["train", "--device", "cpu", "--no-progress", *args])
    return rc, capsys.readouterr().err


def test_clear_errors(tmp_path, capsys):
    out = ["--out", str(tmp_path / "run")]
    rc, err = train(tmp_path, capsys, "--model", "resnet7", *out)
    assert rc == 2 and "unknown model 'resnet7'" in err and "mresnet56" in err
    rc, err = train(tmp_path, capsys, "--dataset", "cifar10", "--data-dir", str(tmp_path), *out)
    assert rc == 2 and "cifar-10-batches-py" in err and "--download" in err
    (tmp_path / "file").write_text("")
    rc, err = train(tmp_path, capsys, "--dataset", "synthetic", "--out",
                    str(tmp_path / "file" / "run"))
    assert rc == 2 and "cannot write to the output folder" in err and "--out" in err
    rc, err = train(tmp_path, capsys, "--dataset", "synthetic", "--resume", *out)
    assert rc == 2 and "no checkpoint" in err
    rc, err = train(tmp_path, capsys, "--dataset", "synthetic", "--init-from",
                    str(tmp_path / "missing.pth"), *out)
    assert rc == 2 and "missing.pth: no such file" in err
    rc, err = train(tmp_path, capsys, "--dataset", "synthetic", "--amp", "float16", *out)
    assert rc == 2 and "float16 needs CUDA" in err
    rc, err = train(tmp_path, capsys, "--dataset", "synthetic", "--fsdp", *out)
    assert rc == 2 and "--fsdp shards the model across the processes of a torchrun" in err
    with pytest.raises(SystemExit):  # argparse: invalid choice
        cli.main(["train", "--dataset", "mnist", *out])
    with pytest.raises(ValueError, match="unknown data set 'mnist'"):
        Trainer(Config(out=tmp_path / "run", dataset="mnist"))


def test_an_earlier_run_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"precious")
    rc, err = train(tmp_path, capsys, "--dataset", "synthetic", "--out", str(tmp_path / "run"))
    assert rc == 2 and "already holds a training run" in err and "--resume" in err
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == b"precious"


def snapshot(out):
    """Every file in ``out`` and its bytes: what a refused command must leave as it was."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-epoch run (the options of ``settings``) to resume, copied by each test."""
    out = tmp_path_factory.mktemp("finished") / "run"
    Trainer(Config(out=out, dataset="synthetic", model="mresnet20", epochs=1, batch_size=64,
                   device="cpu", progress=False)).fit()
    return out


def copy_run(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


RESUME = ("--dataset", "synthetic", "--model", "mresnet20", "--batch-size", "64", "--resume")


def test_resume_refuses_an_unreadable_checkpoint_and_changes_nothing(
        finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    checkpoint = out / "checkpoint.pt"
    good = checkpoint.read_bytes()
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "dict.pt")
    state = torch.load(checkpoint, weights_only=True)
    del state["optimizer"]
    torch.save(state, tmp_path / "partial.pt")
    foreign = {
        "truncated": good[: len(good) // 2], "random bytes": os.urandom(4096), "empty": b"",
        "a plain tensor": (tmp_path / "tensor.pt").read_bytes(),
        "a dict without the momres keys": (tmp_path / "dict.pt").read_bytes(),
        "a checkpoint without its optimizer": (tmp_path / "partial.pt").read_bytes(),
    }
    for name, content in foreign.items():
        checkpoint.write_bytes(content)
        before = snapshot(out)
        rc, err = train(tmp_path, capsys, *RESUME, "--out", str(out))
        assert rc == 2, name
        assert f"{checkpoint} is not a momres checkpoint" in err, (name, err)
        assert "another --out" in err and "restore" in err, (name, err)
        assert snapshot(out) == before, name


@pytest.mark.parametrize(("option", "message"), [
    (["--workers", "-1"], "--workers must be at least 0"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--train-subset", "0"], "--train-subset must be at least 1"),
    (["--train-subset", "129"], "--train-subset 129 is more than the 128 training images"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be in [0, --epochs)"),
    (["--lr", "0"], "--lr must be > 0 and finite"),
    (["--lr", "inf"], "--lr must be > 0 and finite"),
    (["--weight-decay", "nan"], "--weight-decay must be >= 0 and finite"),
    (["--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--lr-decay", "0"], "--lr-decay must be in (0, 1]"),
    (["--milestones", "0", "5"], "--milestones must be epochs >= 1"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--gamma", "nan"], "--gamma must be in [0, 1]"),
])
def test_numeric_options_are_checked(tmp_path, capsys, option, message):
    rc, err = train(tmp_path, capsys, "--dataset", "synthetic", *option,
                    "--out", str(tmp_path / "run"))
    assert rc == 2 and message in err, err


def test_resume_refuses_options_that_change_the_training(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    rc, err = train(tmp_path, capsys, *RESUME, "--epochs", "2", "--gamma", "0.5",
                    "--lr", "0.2", "--no-memory-efficient", "--amp", "--milestones", "3",
                    "--out", str(out))
    assert rc == 2, err
    for change in ("--gamma 0.9 then, --gamma 0.5 now", "--lr 0.1 then, --lr 0.2 now",
                   "no --no-memory-efficient then, --no-memory-efficient now",
                   "no --amp then, --amp bfloat16 now", "no --milestones then, --milestones 3 now"):
        assert change in err, (change, err)
    assert "--epochs" not in err.split("then")[0]  # --epochs may change: it extends the run
    assert snapshot(out) == before

    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["epoch"] = 3
    torch.save(state, out / "checkpoint.pt")
    before = snapshot(out)
    rc, err = train(tmp_path, capsys, *RESUME, "--epochs", "2", "--out", str(out))
    assert rc == 2 and "already holds 3 epochs" in err and "--epochs 3" in err, err
    assert snapshot(out) == before


def test_resume_may_extend_the_run_and_follows_the_new_schedule(tmp_path, capsys):
    out = tmp_path / "run"
    common = ("--dataset", "synthetic", "--batch-size", "64", "--schedule", "cosine",
              "--out", str(out))
    assert train(tmp_path, capsys, *common, "--epochs", "1")[0] == 0
    rc, err = train(tmp_path, capsys, *common, "--resume", "--epochs", "2", "--workers", "0",
                    "--data-dir", str(tmp_path))
    assert rc == 0, err
    assert [r["lr"] for r in read_metrics(out)] == pytest.approx([0.1, 0.05])  # cosine of 2
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 2 and config["workers"] == 0


def test_non_finite_test_loss_stops_the_run(tmp_path, capsys, monkeypatch):
    evaluate = Trainer.evaluate
    calls = []

    def diverging(self):
        calls.append(1)
        return evaluate(self) if len(calls) == 1 else (float("nan"), 0.1)

    monkeypatch.setattr(Trainer, "evaluate", diverging)
    out = tmp_path / "run"
    rc, err = train(tmp_path, capsys, "--dataset", "synthetic", "--epochs", "2",
                    "--batch-size", "64", "--out", str(out))
    assert rc == 2, err
    assert "diverged at epoch 2: the test loss is nan" in err and "after epoch 1" in err, err
    assert "another --out" in err  # not --resume: that refuses a changed --lr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert len(read_metrics(out)) == 1 and not (out / "summary.json").exists()
