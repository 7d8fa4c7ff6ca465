"""The model registry: every registered model builds, runs, trains, and its memory-free
backward gives plain autograd's gradients."""

import pytest
import torch
import torchvision

from momres import ReversibleStage, models
from momres.convert import momentum_stages

from helpers import gradients, output_and_gradients

IMAGENET = {f"{prefix}resnet{d}" for prefix in ("", "m") for d in models.imagenet.DEPTHS}
HEAVY = {"resnet101", "resnet152", "mresnet101", "mresnet152"}


def set_memory_efficient(model: torch.nn.Module, on: bool) -> None:
    for stage in momentum_stages(model).values():
        stage.momentum.memory_efficient = on
    for m in model.modules():
        if isinstance(m, ReversibleStage):
            m.memory_efficient = on


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in models.list_models()],
)
def test_registered_model_trains_memory_free_like_plain_autograd(name):
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=7).double()
    # Train mode exercises the BatchNorm replay.  The ImageNet family runs in eval mode: at
    # 8x8 its last stages are 1x1, where train-mode BatchNorm over 2 values per channel makes
    # the gradient chaotic (a 1e-12 change of x changes plain autograd's gradient by O(1)).
    model.train(name not in IMAGENET)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out, fast = output_and_gradients(model, x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in fast)
    if not (name.startswith("m") or name.startswith("revnet")):
        return  # a plain ResNet: nothing memory-free to compare
    set_memory_efficient(model, False)
    plain = gradients(model, x)
    for a, b in zip(fast, plain, strict=True):
        assert (a - b).norm() <= 1e-7 * b.norm()


def test_registry_lists_and_creates_by_name():
    assert models.list_models("mresnet*") == [
        "mresnet18", "mresnet20", "mresnet32", "mresnet34", "mresnet44", "mresnet50",
        "mresnet56", "mresnet101", "mresnet110", "mresnet152",
    ]
    assert models.list_models("revnet*") == ["revnet38", "revnet110"]
    with pytest.raises(ValueError, match="no model named 'resnet19'.*resnet18"):
        models.create_model("resnet19")
    net = models.create_model("mresnet20", gamma=0.5, memory_efficient=False, exact=False)
    stages = momentum_stages(net)
    assert list(stages) == ["layer1", "layer2", "layer3"]
    assert all(s.gamma == 0.5 and not s.momentum.memory_efficient for s in stages.values())


@pytest.mark.parametrize("depth, millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85),
                                             (110, 1.7)])
def test_cifar_resnets_have_the_papers_parameter_counts(depth, millions):
    """He et al. 2016, table 6 (option-A shortcuts have no parameters)."""
    for name in (f"resnet{depth}", f"mresnet{depth}"):
        count = sum(p.numel() for p in models.create_model(name).parameters())
        assert round(count / 1e6, 2 if depth < 110 else 1) == millions


@pytest.mark.parametrize("name, millions", [("revnet38", 0.46), ("revnet110", 1.73)])
def test_revnets_have_the_papers_parameter_counts(name, millions):
    """Gomez et al. 2017, table 2."""
    count = sum(p.numel() for p in models.create_model(name).parameters())
    assert round(count / 1e6, 2) == millions


def test_imagenet_family_is_torchvisions_with_the_same_state_dict():
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    net = models.create_model("mresnet18", gamma=0.0, memory_efficient=False)
    net.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), reference.eval()(x), rtol=1e-5, atol=1e-6)
    torchvision.models.resnet18().load_state_dict(net.state_dict())


@pytest.mark.parametrize("name", ["resnet20", "mresnet32", "mresnet18", "revnet38"])
def test_one_channel_inputs_options_and_cifar_stem(name):
    options = {"stem": "cifar"} if name == "mresnet18" else {}
    if name.startswith("m"):
        options |= {"gamma": 0.5, "memory_efficient": True, "exact": False, "checkpoint": True}
    if name.startswith("revnet"):
        options["memory_efficient"] = False
    assert set(options) <= set(models.model_options(name))
    net = models.create_model(name, num_classes=10, in_channels=1, **options)
    out = net(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)
    if name == "mresnet18":  # 3x3 stride-1 stem, no max-pool: layer1 sees the full image
        assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
        assert isinstance(net.maxpool, torch.nn.Identity)


@pytest.mark.parametrize("name, option", [("resnet56", "gamma"), ("resnet18", "exact"),
                                          ("revnet38", "gamma"), ("revnet110", "checkpoint"),
                                          ("mresnet20", "stem"), ("mresnet50", "width")])
def test_an_option_a_model_does_not_take_is_refused(name, option):
    with pytest.raises(TypeError, match=f"model '{name}' takes no option '{option}'"):
        models.create_model(name, **{option: 0.5})


def test_models_reachable_after_import_momres():
    import momres

    assert "mresnet56" in momres.models.list_models()
    assert "stem" in momres.models.model_options("mresnet50")


def test_bad_options_are_refused_clearly():
    with pytest.raises(ValueError, match="stem must be one of"):
        models.create_model("resnet18", stem="tiny")
    with pytest.raises(ValueError, match="6n\\+2"):
        models.cifar.CifarResNet(21)
