"""to_momentum: drop-in conversion, checked against the original models."""

from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

import momres
from momres import models, to_momentum
from momres.convert import momentum_stages

from helpers import gradients


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_gamma_zero_computes_the_original_resnet(arch):
    torch.manual_seed(0)
    original = getattr(torchvision.models, arch)(num_classes=10).double()
    converted = to_momentum(original, 0.0, memory_efficient=False)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for train in (False, True):
        original.train(train), converted.train(train)
        with torch.no_grad():
            assert rel(converted(x), original(x)) < 1e-12
    for a, b in zip(converted.buffers(), original.buffers(), strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)  # the same BatchNorm statistics
    with torch.no_grad():  # not a vacuous check: gamma changes the function
        momentum = to_momentum(original, 0.5, memory_efficient=False).eval()
        assert rel(momentum(x), original.eval()(x)) > 1e-2


def small_vit() -> nn.Module:
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=5,
    )
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts it at zero
    return vit.double()


def test_gamma_zero_computes_the_original_vit():
    vit = small_vit()
    converted = to_momentum(vit, 0.0, memory_efficient=False)
    assert {p: s.plain for p, s in momentum_stages(converted).items()} == {"encoder.layers": 0}
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for train in (False, True):
        vit.train(train), converted.train(train)
        with torch.no_grad():
            assert rel(converted(x), vit(x)) < 1e-12


def test_vit_in_eval_mode_gets_plain_autograds_gradients():
    """Eval-mode attention has a fused kernel for no-grad calls; the memory-free forward (no
    grad) and its recompute (grad) must still compute the same numbers, bit for bit (float32:
    in float64 the two kernels' differences vanish in the fixed-point rounding)."""
    vit = small_vit().float().eval()
    x = torch.randn(2, 3, 16, 16)
    fast = gradients(to_momentum(vit, 0.9).eval(), x)
    plain = gradients(to_momentum(vit, 0.9, memory_efficient=False).eval(), x)
    for a, b in zip(fast, plain, strict=True):
        assert (a - b).norm() <= 1e-5 * b.norm()


def transformer_encoder(dropout: float = 0.0) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=dropout, batch_first=True)
    return nn.TransformerEncoder(layer, 3, norm=nn.LayerNorm(16), enable_nested_tensor=True)


PADDING = torch.tensor([[False] * 6, [False] * 4 + [True] * 2, [False] * 5 + [True]])


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_gamma_zero_computes_the_original_transformer_encoder():
    encoder = transformer_encoder().double()
    converted = to_momentum(encoder, 0.0, memory_efficient=False)
    assert list(converted.state_dict()) == list(encoder.state_dict())
    src = torch.randn(3, 6, 16, dtype=torch.float64)
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    valid = ~PADDING
    for train in (False, True):
        encoder.train(train), converted.train(train)
        for masks in ({"src_key_padding_mask": PADDING}, {"mask": causal},
                      {"mask": causal, "src_key_padding_mask": PADDING, "is_causal": True}):
            assert rel(converted(src, **masks), encoder(src, **masks)) < 1e-12
        with torch.no_grad():  # torch's eval fast path zeroes padded positions: compare the rest
            ours, theirs = converted(src, src_key_padding_mask=PADDING), encoder(
                src, src_key_padding_mask=PADDING)
            assert rel(ours[valid], theirs[valid]) < 1e-12


def test_masks_reach_every_layer_of_a_memory_free_encoder():
    encoder = transformer_encoder(dropout=0.1).double().train()
    src = torch.randn(3, 6, 16, dtype=torch.float64)
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    masks = {"mask": causal, "src_key_padding_mask": PADDING}
    results = []
    for me in (True, False):
        torch.manual_seed(1)  # the same dropout masks
        results.append(gradients(to_momentum(encoder, 0.8, memory_efficient=me), src, **masks))
    for a, b in zip(*results, strict=True):
        assert (a - b).norm() <= 1e-8 * b.norm()
    # Independent check of each mask's effect: what it hides cannot change the output.
    converted = to_momentum(encoder, 0.8).eval()
    changed = src.clone()
    changed[1, 4:] += 1.0  # the padded positions of sequence 1
    changed[0, 5] += 1.0  # the last position of sequence 0
    with torch.no_grad():
        unmasked, padded, causal = (
            [converted(z, **masks) for z in (src, changed)]
            for masks in ({}, {"src_key_padding_mask": PADDING}, {"mask": causal})
        )
    assert not torch.allclose(*(out[1, :4] for out in unmasked))
    assert torch.allclose(*(out[1, :4] for out in padded), atol=1e-12)
    assert not torch.allclose(*(out[0, :5] for out in unmasked))
    assert torch.allclose(*(out[0, :5] for out in causal), atol=1e-12)


def test_transformer_encoder_inside_a_model_is_found():
    torch.manual_seed(0)
    model = nn.Transformer(16, 2, num_encoder_layers=2, num_decoder_layers=1,
                           dim_feedforward=32, dropout=0.0, batch_first=True).double()
    converted = to_momentum(model, 0.0, memory_efficient=False)
    assert list(momentum_stages(converted)) == ["encoder.layers"]
    src = torch.randn(3, 6, 16, dtype=torch.float64)
    tgt = torch.randn(3, 4, 16, dtype=torch.float64)
    out = converted(src, tgt, src_key_padding_mask=PADDING, memory_key_padding_mask=PADDING)
    assert rel(out, model(src, tgt, src_key_padding_mask=PADDING,
                          memory_key_padding_mask=PADDING)) < 1e-12


def test_input_model_is_untouched():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    converted = to_momentum(model).train()
    converted(torch.randn(2, 3, 32, 32)).sum().backward()
    with torch.no_grad():
        for p in converted.parameters():
            p.add_(1.0)
    assert [type(m) for m in model.modules()] == kinds
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_state_dicts_load_both_ways():
    torch.manual_seed(0)
    source = torchvision.models.resnet18(num_classes=10).eval()
    converted = to_momentum(torchvision.models.resnet18(num_classes=10), 0.0,
                            memory_efficient=False).eval()
    converted.load_state_dict(source.state_dict())  # strict: same names, same shapes
    assert list(converted.state_dict()) == list(source.state_dict())
    back = torchvision.models.resnet18(num_classes=10).eval()
    back.load_state_dict(converted.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel(converted(x), source(x)) < 1e-5
        assert torch.equal(back(x), source(x))


def test_keep_first_and_inspection():
    model = torchvision.models.resnet18()
    converted = to_momentum(model, 0.9)
    stages = momentum_stages(converted)
    assert list(stages) == ["layer1", "layer2", "layer3", "layer4"]
    assert all(s.plain == 1 and s.gamma == 0.9 and s.momentum.exact for s in stages.values())
    # Without keep_first, only the first blocks that change the shape stay plain.
    loose = momentum_stages(to_momentum(model, 0.9, keep_first=False, exact=False))
    assert [s.plain for s in loose.values()] == [0, 1, 1, 1]
    assert len(loose["layer1"].momentum.functions) == 2 and not loose["layer1"].momentum.exact


class Block(nn.Module):
    """A block with its own skip connection."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return torch.relu(x + scale * self.lin(x))


class Net(nn.Module):
    """A Sequential stage called as a whole, a ModuleList stage run by the parent's loop."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.seq = nn.Sequential(*(Block() for _ in range(4)))
        self.blocks = nn.ModuleList(Block() for _ in range(5))
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.seq(self.inp(x))
        for block in self.blocks:
            x = block(x, scale=0.5)
        return self.out(x)


def test_named_sequential_and_module_list_stages():
    torch.manual_seed(0)
    net = Net().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    names = ["seq", "blocks"]
    same = to_momentum(net, 0.0, memory_efficient=False, stages=names, keep_first=False)
    with torch.no_grad():
        assert rel(same(x), net(x)) < 1e-12
    assert list(same.state_dict()) == list(net.state_dict())
    # At gamma > 0 the parent's loop runs the ModuleList's blocks as links of one momentum
    # chain: compare with MomentumNet applied by hand (blocks "0" of each stage kept plain).
    fast = to_momentum(net, 0.7, stages=names)
    seq = momres.MomentumNet(list(net.seq)[1:], 0.7, residual=False, memory_efficient=False)
    blocks = momres.MomentumNet(list(net.blocks)[1:], 0.7, residual=False,
                                memory_efficient=False)
    with torch.no_grad():
        x1 = seq(net.seq[0](net.inp(x)))
        expected = net.out(blocks(net.blocks[0](x1, scale=0.5), scale=0.5))
        assert rel(fast(x), expected) < 1e-12
    plain = to_momentum(net, 0.7, stages=names, memory_efficient=False)
    for a, b in zip(gradients(fast, x), gradients(plain, x), strict=True):
        assert (a - b).norm() <= 1e-8 * b.norm()


@pytest.mark.parametrize("checkpoint", [False, True])
def test_checkpointed_plain_blocks(checkpoint):
    """Same gradients and BatchNorm statistics as plain autograd, less memory."""
    torch.manual_seed(0)
    model = models.create_model("resnet20").double().train()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    fast = to_momentum(model, 0.9, checkpoint=checkpoint)
    plain = to_momentum(model, 0.9, memory_efficient=False)
    for a, b in zip(gradients(fast, x), gradients(plain, x), strict=True):
        assert (a - b).norm() <= 1e-8 * b.norm()
    for a, b in zip(fast.buffers(), plain.buffers(), strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    if checkpoint:
        stored = momres.activation_memory(to_momentum(model, 0.9, checkpoint=False), x)
        assert momres.activation_memory(fast, x) < 0.8 * stored


def test_checkpoint_defaults_to_memory_efficient():
    model = models.create_model("resnet20")
    for memory_efficient in (True, False):
        converted = to_momentum(model, 0.9, memory_efficient=memory_efficient)
        assert all(stage.checkpoint == memory_efficient
                   for stage in momentum_stages(converted).values())
        registry = models.create_model("mresnet20", memory_efficient=memory_efficient)
        assert all(stage.checkpoint == memory_efficient
                   for stage in momentum_stages(registry).values())


def test_unconvertible_models_get_clear_errors():
    model = nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)),
        head=nn.Linear(8, 2),
    ))
    with pytest.raises(ValueError, match=r"(?s)no stage to convert.*stages=.*"
                                         r"features \(Sequential, 3 blocks\)"):
        to_momentum(model)
    with pytest.raises(ValueError, match="(?s)no submodule 'head.weights'.*features"):
        to_momentum(model, stages=["head.weights"])
    with pytest.raises(TypeError, match="'head' is a Linear"):
        to_momentum(model, stages=["head"])
    with pytest.raises(TypeError, match="list of dotted paths"):
        to_momentum(model, stages="features")
    with pytest.raises(ValueError, match="already a momentum stage"):
        to_momentum(to_momentum(torchvision.models.resnet18()), stages=["layer1"])
    with pytest.raises(ValueError, match="gamma=0.*not invertible"):
        to_momentum(torchvision.models.resnet18(), 0.0)
