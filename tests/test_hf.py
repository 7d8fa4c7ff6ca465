"""Hugging Face models converted whole (``to_momentum(model)``): each layer a link of a chain.

References are independent of the chain: the original model (``gamma = 0``) and plain
autograd through the same rule (``memory_efficient=False``), which runs no Function.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import momres
from momres.convert import momentum_chains

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 64, 10


def tiny(name: str) -> torch.nn.Module:
    """A tiny model of architecture ``name`` (hidden 32, 3 layers), float64, seeded."""
    torch.manual_seed(0)
    t = transformers
    decoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                   max_position_embeddings=64)
    encoder = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                   intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64)
    model = {
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(
            n_embd=32, n_layer=3, n_head=2, vocab_size=VOCAB, n_positions=64)),
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**decoder)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**decoder, sliding_window=4)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(
            **decoder, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
        "bert": lambda: t.BertForMaskedLM(t.BertConfig(**encoder)),
        "roberta": lambda: t.RobertaForMaskedLM(t.RobertaConfig(**encoder, pad_token_id=1)),
        "bart": lambda: t.BartForConditionalGeneration(t.BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=3, decoder_layers=3,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
            decoder_ffn_dim=64, max_position_embeddings=64)),
        "vit": lambda: t.ViTForImageClassification(t.ViTConfig(
            hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
            image_size=16, patch_size=4, num_labels=3)),
    }[name]()
    return model.double()


ARCHS = ["gpt2", "llama", "mistral", "qwen2", "bert", "roberta", "bart", "vit"]
STACKS = {"gpt2": ["transformer.h"], "llama": ["model.layers"], "mistral": ["model.layers"],
          "qwen2": ["model.layers"], "bert": ["bert.encoder.layer"],
          "roberta": ["roberta.encoder.layer"],
          "bart": ["model.encoder.layers", "model.decoder.layers"],  # cross-attention
          "vit": ["vit.layers"]}


def inputs(name: str) -> dict:
    """A batch with padding (text) and labels, so the loss is the model's own."""
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64),
                "labels": torch.tensor([0, 2])}
    ids = torch.randint(2, VOCAB, (2, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    kwargs = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    if name == "bart":
        kwargs["labels"] = ids[:, :6].contiguous()
    if name not in ("bert", "roberta"):
        kwargs["use_cache"] = False
    return kwargs


def output(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", ARCHS)
def test_stack_found_and_gamma_zero_is_the_original(name):
    model = tiny(name).eval()
    converted = momres.to_momentum(model, 0.0, memory_efficient=False).eval()
    assert list(momentum_chains(converted)) == STACKS[name]
    assert [n for n, _ in converted.named_parameters()] == [
        n for n, _ in model.named_parameters()]
    batch = inputs(name)
    with torch.no_grad():
        assert rel(output(converted, batch), output(model, batch)) < 1e-12
    model.train()  # dropout replayed from the same seed
    converted.train()
    torch.manual_seed(3)
    expected = output(model, batch)
    torch.manual_seed(3)
    assert rel(output(converted, batch), expected) < 1e-12


def gradients(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    model.zero_grad()
    torch.manual_seed(5)  # the same dropout masks in both models
    model(**batch).loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("name", ARCHS)
def test_memory_free_gradients_equal_plain_autograd(name):
    """Train mode (dropout replayed), padding masks, rotary embeddings, sliding windows."""
    model = tiny(name).train()
    batch = inputs(name)
    fast = momres.to_momentum(model, 0.9)
    plain = momres.to_momentum(model, 0.9, memory_efficient=False)
    assert rel(gradients(fast, batch), gradients(plain, batch)) < 1e-8


def test_float_inversion_chain_gradients():
    """exact=False: the links return copies of the float state, which goes on changing
    (the parent keeps every layer's output here)."""
    model = tiny("llama").train()
    batch = inputs("llama")

    def run(m: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        m.zero_grad()
        out = m(**batch, output_hidden_states=True)
        (out.loss + out.hidden_states[2].square().mean()).backward()
        grads = torch.cat([p.grad.flatten() for p in m.parameters()])
        return torch.stack(out.hidden_states).detach(), grads

    fast = run(momres.to_momentum(model, 0.9, exact=False))
    plain = run(momres.to_momentum(model, 0.9, memory_efficient=False))
    assert rel(fast[0], plain[0]) < 1e-12
    assert rel(fast[1], plain[1]) < 1e-8


def test_outputs_recorded_inside_the_layers_are_refused_while_training_memory_free():
    model = momres.to_momentum(tiny("gpt2"), 0.9).train()
    batch = inputs("gpt2")
    out = model(**batch, output_hidden_states=True)  # recorded around the links: fine
    assert len(out.hidden_states) == 4 and out.hidden_states[-1].requires_grad
    with pytest.raises(RuntimeError, match="records attentions"):
        model(**batch, output_attentions=True)
    with torch.no_grad():  # without grad nothing is lost
        model(**batch, output_attentions=True)


def test_hf_checkpointing_leaves_converted_layers_memory_free():
    """Layers that store nothing are not checkpointed again: same gradients."""
    model = tiny("gpt2").train()
    batch = inputs("gpt2")
    fast = momres.to_momentum(model, 0.9)
    fast.activation_checkpointing_enable({"use_reentrant": False})
    plain = momres.to_momentum(model, 0.9, memory_efficient=False)
    assert rel(gradients(fast, batch), gradients(plain, batch)) < 1e-8


def test_a_loss_on_intermediate_hidden_states_too():
    """Their gradient joins the chain's at that layer (autograd adds it to dL/dx_n)."""
    model = tiny("llama").train()
    batch = inputs("llama")

    def grads(m: torch.nn.Module) -> torch.Tensor:
        m.zero_grad()
        out = m(**batch, output_hidden_states=True)
        (out.loss + out.hidden_states[2].square().mean()).backward()
        return torch.cat([p.grad.flatten() for p in m.parameters()])

    fast = grads(momres.to_momentum(model, 0.9))
    assert rel(fast, grads(momres.to_momentum(model, 0.9, memory_efficient=False))) < 1e-8


def test_each_layer_is_audited_once_not_every_step(monkeypatch):
    """The graph audit (forward with grad, graphs walked) runs on a layer's first step only."""
    from momres import _recompute

    calls = []
    audited = _recompute.Recorder._audited
    monkeypatch.setattr(_recompute.Recorder, "_audited",
                        lambda self, *a: calls.append(1) or audited(self, *a))
    original = tiny("gpt2").train()
    model = momres.to_momentum(original, 0.9)
    batch = inputs("gpt2")
    plain = momres.to_momentum(original, 0.9, memory_efficient=False)
    expected = gradients(plain, batch)
    for step in range(3):
        assert rel(gradients(model, batch), expected) < 1e-8
        assert len(calls) == 3, step  # three layers, on the first step
    twin = copy.deepcopy(model)  # a copy's layers are new modules: audited again
    gradients(twin, batch)
    assert len(calls) == 6


def test_the_incoming_gradient_is_read_not_written():
    """The links take dL/dx_n into the vector-Jacobian product's memory, not into autograd's
    incoming gradient, which others (a hook, another branch) may hold."""
    batch = inputs("llama")

    def grads(m: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        kept = []
        m.zero_grad()
        out = m(**batch, output_hidden_states=True)
        for h in out.hidden_states[1:]:
            h.register_hook(lambda g: kept.append(g))
        (out.loss + out.hidden_states[2].square().mean()).backward()
        return torch.cat([p.grad.flatten() for p in m.parameters()]), [g.clone() for g in kept]

    model = tiny("llama").train()
    fast, fast_kept = grads(momres.to_momentum(model, 0.9))
    plain, plain_kept = grads(momres.to_momentum(model, 0.9, memory_efficient=False))
    assert rel(fast, plain) < 1e-8
    assert len(fast_kept) == len(plain_kept) == 3
    assert all(rel(a, b) < 1e-8 for a, b in zip(fast_kept, plain_kept, strict=True))


def test_backward_twice_needs_retain_graph():
    torch.manual_seed(0)
    model = Parent("loop").double()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    fast = momres.to_momentum(model, 0.9)
    plain = momres.to_momentum(model, 0.9, memory_efficient=False)
    loss = fast(x).square().sum()
    first = torch.autograd.grad(loss, x, retain_graph=True)[0]
    second = torch.autograd.grad(loss, x)[0]
    expected = torch.autograd.grad(plain(x).square().sum(), x)[0]
    assert rel(first, expected) < 1e-10 and torch.equal(first, second)
    with pytest.raises(RuntimeError, match="a second time"):
        torch.autograd.grad(loss, x)


def test_state_dicts_round_trip_and_deepcopy():
    model = tiny("llama")
    converted = momres.to_momentum(model, 0.9)
    assert list(converted.state_dict()) == list(model.state_dict())
    twin = tiny("llama")
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
    converted.load_state_dict(twin.state_dict())
    back = tiny("llama")
    back.load_state_dict(converted.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.parameters(), twin.parameters(),
                                                 strict=True))
    copied = copy.deepcopy(converted)
    batch = inputs("llama")
    with torch.no_grad():
        assert torch.equal(output(copied, batch), output(converted, batch))
    assert momentum_chains(copied)["model.layers"] is not momentum_chains(converted)[
        "model.layers"]


def test_named_stack_keeps_its_first_layer_plain_when_the_parent_slices_it():
    """Llama runs ``self.layers[: n]``: the slice holds the same links."""
    model = tiny("llama").eval()
    converted = momres.to_momentum(model, 0.9, stages=["model.layers"])
    layers = model.model.layers
    rule = momres.MomentumNet(list(layers)[1:], 0.9, residual=False, memory_efficient=False)
    batch = inputs("llama")
    with torch.no_grad():
        got = converted.model(batch["input_ids"], attention_mask=batch["attention_mask"])
        captured = {}
        layers[1].register_forward_pre_hook(
            lambda _, args, kwargs: captured.update(kwargs=kwargs), with_kwargs=True)
        x = model.model(batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True).hidden_states[1]
        kwargs = {k: v for k, v in captured["kwargs"].items() if k != "cache"}
        expected = model.model.norm(rule(x, **kwargs))
    assert rel(got.last_hidden_state, expected) < 1e-12


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_with_and_without_cache_gives_the_same_tokens(name):
    model = momres.to_momentum(tiny(name), 0.9).eval()
    prompt = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_kv_cache_while_training_memory_free():
    """Training with the default use_cache=True works (the cache is left empty, as under
    gradient checkpointing); a cache with past tokens, or the unfilled one reused, is refused."""
    model = momres.to_momentum(tiny("llama"), 0.9).train()
    batch = {k: v for k, v in inputs("llama").items() if k != "use_cache"}
    plain = momres.to_momentum(tiny("llama"), 0.9, memory_efficient=False).train()
    with pytest.warns(UserWarning, match="without the KV cache"):
        out = model(**batch, use_cache=True)
    out.loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert rel(grads, gradients(plain, inputs("llama"))) < 1e-8
    with pytest.raises(RuntimeError, match="left empty"), torch.no_grad():
        model(batch["input_ids"], cache=out.cache)
    with torch.no_grad():
        past = model(batch["input_ids"][:, :4], use_cache=True).cache
    with pytest.raises(RuntimeError, match="past tokens"):
        model(batch["input_ids"][:, 4:], cache=past)


class Parent(torch.nn.Module):
    """Runs a converted stack the ways a momentum chain cannot follow."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.layers = torch.nn.ModuleList(
            transformers.models.llama.modeling_llama.LlamaMLP(
                transformers.LlamaConfig(hidden_size=8, intermediate_size=16,
                                        num_attention_heads=2))
            for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self.layers)
        if self.how == "scale":
            return layers[2](2 * layers[1](layers[0](x)))
        if self.how == "skip":
            return layers[2](layers[0](x))
        if self.how == "repeat":
            y = layers[0](x)
            return layers[1](y) + layers[1](y)
        if self.how == "inplace":
            y = layers[0](x)
            return layers[1](y.mul_(2))
        if self.how in ("loop", "checkpointed"):
            for layer in layers:
                x = (layer(x) if self.how == "loop" else
                     torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False))
            return x
        if self.how == "no_grad_midway":
            y = layers[0](x)
            with torch.no_grad():
                return layers[2](layers[1](y))
        if self.how == "twice":  # two passes over the stack: two chains
            for layer in [*layers, *layers]:
                x = layer(x)
            return x
        if self.how == "intermediate":  # the loss ignores the last layer's output
            y = layers[1](layers[0](x))
            layers[2](y)
            return y
        raise AssertionError(self.how)


@pytest.mark.parametrize("how, match", [
    ("scale", "not the output of layer 1"), ("skip", "runs its layers in order"),
    ("repeat", "runs its layers in order"), ("inplace", "modified in place"),
    ("intermediate", "must depend on the output of the last layer"),
    ("no_grad_midway", "keeps one mode"),
])
def test_patterns_the_chain_cannot_follow_are_refused(how, match):
    model = momres.to_momentum(Parent(how), 0.9)
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match=match):
        model(x).sum().backward()


def test_a_parent_that_checkpoints_its_layers():
    """Memory-free links save no tensor for the parent's checkpoint to recompute, so it never
    replays them: plain autograd's gradients.  Under plain autograd the replay would call each
    layer a second time in the backward pass: refused."""
    torch.manual_seed(0)
    model = Parent("checkpointed").double()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    loop = copy.deepcopy(model)
    loop.how = "loop"
    grads = [torch.cat([g.flatten() for g in torch.autograd.grad(
        m(x).square().sum(), [x, *m.parameters()])])
        for m in (momres.to_momentum(model, 0.9),
                  momres.to_momentum(loop, 0.9, memory_efficient=False))]
    assert rel(grads[0], grads[1]) < 1e-8
    with pytest.raises(RuntimeError, match="turn its checkpointing off"):
        momres.to_momentum(model, 0.9, memory_efficient=False)(x).sum().backward()


def test_a_stack_holding_one_layer_several_times_is_refused():
    model = Parent("loop")
    model.layers = torch.nn.ModuleList([model.layers[0]] * 3)
    with pytest.raises(ValueError, match="no stage to convert"):
        momres.to_momentum(model, 0.9)
    with pytest.raises(ValueError, match="same layer object several times"):
        momres.to_momentum(model, 0.9, stages=["layers"], keep_first=False)


def test_a_stack_run_twice_is_two_momentum_stages():
    torch.manual_seed(0)
    model = Parent("twice").double()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    rule = momres.MomentumNet(list(model.layers), 0.9, residual=False, memory_efficient=False)
    fast = momres.to_momentum(model, 0.9)
    with torch.no_grad():
        assert rel(fast(x), rule(rule(x))) < 1e-12
    plain = momres.to_momentum(model, 0.9, memory_efficient=False)
    grads = []
    for m in (fast, plain):
        out = m(x)
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(
            out.square().sum(), [x, *m.parameters()])]))
    assert rel(grads[0], grads[1]) < 1e-8


class TupleLayer(torch.nn.Module):
    """A layer returning ``(hidden_states, extra)``, as older Hugging Face layers do."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, extra: bool = False) -> tuple:
        y = x + torch.tanh(self.lin(x))
        return y, (y.sum() if extra else None)


class TupleParent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(TupleLayer() for _ in range(3))

    def forward(self, x: torch.Tensor, extra: bool = False) -> torch.Tensor:
        for layer in self.layers:
            x, _ = layer(x, extra=extra)
        return x


def test_layers_returning_tuples():
    torch.manual_seed(0)
    model = TupleParent().double()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    fast = momres.to_momentum(model, 0.9)
    plain = momres.to_momentum(model, 0.9, memory_efficient=False)
    rule = momres.MomentumNet([HiddenOnly(m) for m in model.layers], 0.9, residual=False,
                              memory_efficient=False)
    with torch.no_grad():
        assert rel(fast(x), rule(x)) < 1e-12
    grads = [torch.cat([g.flatten() for g in torch.autograd.grad(
        m(x).square().sum(), [x, *m.parameters()])]) for m in (fast, plain)]
    assert rel(grads[0], grads[1]) < 1e-8
    with pytest.raises(RuntimeError, match="besides its hidden states"):
        fast(x, extra=True)


class HiddenOnly(torch.nn.Module):
    """A tuple layer's hidden states only, for the reference ``MomentumNet``."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)[0]


def test_hf_trainer_smoke(tmp_path):
    model = momres.to_momentum(tiny("gpt2").float(), 0.9)
    ids = torch.randint(2, VOCAB, (8, SEQ), generator=torch.Generator().manual_seed(4))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert torch.isfinite(torch.tensor(result.training_loss))


def test_lm_experiment_runs_at_a_tiny_size(tmp_path):
    from momres.cli.experiments import lm

    config = lm.Config(layers=2, hidden=32, seq=32, batch=4, steps=20, corpus_bytes=100_000,
                       val_batches=2, timing_rounds=2, depths=(2, 4))
    result = lm.run(tmp_path, config)
    m = result["metrics"]
    written = json.loads((tmp_path / "result.json").read_text())
    assert written["metrics"]["plain_val_loss"] == m["plain_val_loss"]
    assert (tmp_path / "lm.png").stat().st_size > 10_000
    # 20 steps of a byte-level model: all three fall well below log(256) = 5.5 nats.
    for key in ("plain_val_loss", "momentum_val_loss", "retrofit_val_loss"):
        assert m[key] < 4.5
    assert abs(m["momentum_val_loss"] / m["plain_val_loss"] - 1) < 0.1
    assert m["momentum_peak_mib"] < m["plain_peak_mib"]
    assert m["retrofit_val_loss_at_conversion"] > 0
    curve = m["depth_curve"]
    assert curve["layers"] == [2, 4] and len(curve["momentum_peak_mib"]) == 2
    # Checkpointing stores each layer's input: its peak grows with depth, plain's more so.
    assert curve["checkpointing_peak_mib"][1] > curve["checkpointing_peak_mib"][0]
    assert curve["plain_peak_mib"][1] - curve["plain_peak_mib"][0] > (
        curve["momentum_peak_mib"][1] - curve["momentum_peak_mib"][0])


def test_lm_depth_crossing():
    from momres.cli.experiments.lm import crossing

    layers = [6, 12, 24, 48]
    assert crossing(layers, [1.2, 0.9, 0.7, 0.55], 0.5) is None
    assert crossing(layers, [1.2, 0.9, 0.7, 0.4], 0.5) == 40  # 24 + 24 * 0.2 / 0.3 = 40
    assert crossing(layers, [1.2, 0.9, 0.7, 0.4], 1.0) == 10  # 6 + 6 * 0.2 / 0.3
    assert crossing(layers, [0.8, 0.6, 0.5, 0.4], 1.0) == 6


def test_strategies_of_a_layer_stack():
    """A chain runs memory-free (exact or float) or under autograd; the per-block strategies
    of ``nn.Sequential`` stages that it cannot honour are refused, not ignored."""
    model = tiny("gpt2")
    (options,) = momentum_chains(momres.to_momentum(model, strategy="float")).values()
    assert (options.memory_efficient, options.exact) == (True, False)
    (options,) = momentum_chains(momres.to_momentum(model, strategy="autograd")).values()
    assert not options.memory_efficient
    (options,) = momentum_chains(momres.to_momentum(model)).values()
    assert (options.memory_efficient, options.exact) == (True, True)  # whatever its depth
    for strategy in ("checkpoint", momres.Strategy("exact", keep_last=1)):
        with pytest.raises(ValueError, match="not available for a layer stack"):
            momres.to_momentum(model, strategy=strategy)
