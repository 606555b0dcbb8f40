"""LoRA+ parameter groups and optimizer factory."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import peft_layers as pl
from peft_layers.model import iter_adapter_layers

from models import tiny_model, tokens


def lm_loss(model: nn.Module) -> torch.Tensor:
    batch = tokens()
    logits = model(batch[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def group_of(groups: list[dict], parameter: torch.Tensor) -> dict:
    (group,) = [g for g in groups if any(p is parameter for p in g["params"])]
    return group


def test_groups_place_every_trainable_parameter_once() -> None:
    model = pl.inject_adapters(tiny_model(), ["q_proj", "v_proj"], method="dora", bias="all", rank=4)
    groups = pl.loraplus_param_groups(model, 1e-3, lr_ratio=8.0, weight_decay=0.1)
    placed = [id(p) for g in groups for p in g["params"]]
    assert sorted(placed) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert len(placed) == len(set(placed))
    for _, layer in iter_adapter_layers(model):
        assert group_of(groups, layer.lora_B)["lr"] == pytest.approx(8e-3)
        assert group_of(groups, layer.lora_B)["weight_decay"] == 0.1
        assert group_of(groups, layer.lora_A)["lr"] == 1e-3
        assert group_of(groups, layer.lora_A)["weight_decay"] == 0.1
        assert group_of(groups, layer.magnitude)["weight_decay"] == 0.0
        assert group_of(groups, layer.bias)["weight_decay"] == 0.0


def test_a_frozen_lora_b_is_left_out() -> None:
    model = pl.inject_lora(tiny_model(), ["q_proj", "v_proj"], rank=4)
    frozen = model.layers[0].attn.q_proj.lora_B.requires_grad_(False)
    groups = pl.loraplus_param_groups(model, 1e-3)
    assert not any(p is frozen for g in groups for p in g["params"])
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in model.parameters() if p.requires_grad)


def test_a_lora_b_shared_by_two_layers_steps_once() -> None:
    """Two layers tied to one ``lora_B``: it is in its group once, so an SGD step moves it by
    ``lr * ratio * grad``, not twice that."""
    torch.manual_seed(0)
    model = pl.inject_lora(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6)), ["0", "1"], rank=2)
    model[1].lora_B = model[0].lora_B
    with torch.no_grad():
        model[0].lora_B.normal_()
    lr, ratio = 1e-2, 16.0
    optimizer = pl.create_loraplus_optimizer(model, torch.optim.SGD, lr=lr, lr_ratio=ratio)
    assert sum(p is model[0].lora_B for g in optimizer.param_groups for p in g["params"]) == 1
    before = model[0].lora_B.detach().clone()
    model(torch.randn(4, 6)).square().sum().backward()
    grad = model[0].lora_B.grad.clone()
    optimizer.step()
    torch.testing.assert_close(model[0].lora_B.detach(), before - lr * ratio * grad, rtol=1e-5, atol=1e-6)


def test_layer_ratio_wins_then_argument_then_default() -> None:
    model = pl.inject_adapters(tiny_model(), "q_proj", method="lora_plus", lr_ratio=4.0, rank=2)
    pl.inject_lora(model, "k_proj", rank=2)
    # an explicit ratio that a LoRAPlusLinear's own overrides says so (it was ignored silently)
    with pytest.warns(UserWarning, match=r"lr_ratio=2.0 applies to the plain LoRA layers only; .*own lr_ratio \(4.0\)"):
        groups = pl.loraplus_param_groups(model, 1.0, lr_ratio=2.0)
    layers = dict(iter_adapter_layers(model))
    assert group_of(groups, layers["layers.0.attn.q_proj"].lora_B)["lr"] == 4.0
    assert group_of(groups, layers["layers.0.attn.k_proj"].lora_B)["lr"] == 2.0
    groups = pl.loraplus_param_groups(model, 1.0)
    assert group_of(groups, layers["layers.1.attn.k_proj"].lora_B)["lr"] == 16.0


def test_sgd_step_moves_b_at_ratio_times_a() -> None:
    model = pl.inject_lora(tiny_model(), ["q_proj", "up_proj"], rank=4)
    with torch.no_grad():
        for _, layer in iter_adapter_layers(model):
            layer.lora_B.normal_(std=0.1)  # so A gets a gradient too
    lr, ratio = 1e-2, 16.0
    optimizer = pl.create_loraplus_optimizer(model, torch.optim.SGD, lr=lr, lr_ratio=ratio)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    lm_loss(model).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        step_lr = lr * ratio if name.endswith("lora_B") else lr
        torch.testing.assert_close(parameter.detach(), before[name] - step_lr * grads[name], rtol=0, atol=1e-7)


def test_adam_first_step_sizes_are_in_ratio() -> None:
    # Adam's first step moves every element by lr * sign(grad) (up to eps): B by lr * ratio
    model = pl.inject_lora(tiny_model(), "v_proj", rank=4)
    with torch.no_grad():
        for _, layer in iter_adapter_layers(model):
            layer.lora_B.normal_(std=0.1)
    optimizer = pl.create_loraplus_optimizer(model, torch.optim.Adam, lr=1e-3, lr_ratio=10.0, eps=1e-12)
    layer = model.layers[0].attn.v_proj
    a0, b0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    lm_loss(model).backward()
    optimizer.step()
    step_a = (layer.lora_A.detach() - a0).abs()
    step_b = (layer.lora_B.detach() - b0).abs()
    torch.testing.assert_close(step_a.median(), torch.tensor(1e-3), rtol=1e-3, atol=0)
    torch.testing.assert_close(step_b.median(), torch.tensor(1e-2), rtol=1e-3, atol=0)


@pytest.mark.parametrize("optimizer_cls", [torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Rprop, torch.optim.Adagrad])
def test_any_torch_optimizer_trains(optimizer_cls: type) -> None:
    model = pl.inject_lora(tiny_model(), ["q_proj", "v_proj", "up_proj"], rank=4)
    optimizer = pl.create_loraplus_optimizer(model, optimizer_cls, lr=1e-3, weight_decay=0.0)
    # the optimizer holds LoRA+'s groups: every A at lr, every B at lr * 16, each once
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    layers = [layer for _, layer in iter_adapter_layers(model)]
    assert len(rate) == sum(p.numel() > 0 for p in model.parameters() if p.requires_grad) == 2 * len(layers)
    assert all(rate[id(layer.lora_A)] == 1e-3 and rate[id(layer.lora_B)] == 16e-3 for layer in layers)
    losses = []
    for _ in range(5):
        loss = lm_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bad_arguments() -> None:
    model = pl.inject_lora(tiny_model(), "q_proj")
    with pytest.raises(ValueError, match="lr"):
        pl.loraplus_param_groups(model, 0.0)
    with pytest.raises(ValueError, match="lr_ratio"):
        pl.loraplus_param_groups(model, 1e-3, lr_ratio=-1)
    with pytest.raises(ValueError, match="weight_decay"):
        pl.loraplus_param_groups(model, 1e-3, weight_decay=-0.1)
    for keywords, name in (({"lr": math.inf}, "lr"), ({"lr": 1e-3, "lr_ratio": math.inf}, "lr_ratio"),
                           ({"lr": 1e-3, "weight_decay": math.nan}, "weight_decay")):
        with pytest.raises(ValueError, match=f"^{name}: expected a finite number .*, got (inf|nan)"):
            pl.loraplus_param_groups(model, **keywords)
    with pytest.raises(ValueError, match="no trainable parameters"):
        pl.loraplus_param_groups(tiny_model().requires_grad_(False), 1e-3)
    with pytest.raises(TypeError, match="optimizer_cls"):
        pl.create_loraplus_optimizer(model, "adam", lr=1e-3)
    # Hugging Face PEFT's names get ours, not AdamW's "unexpected keyword argument"
    for theirs, ours in (("loraplus_lr_ratio", "lr_ratio= here"), ("loraplus_weight_decay", "weight_decay= here"),
                         ("loraplus_lr_embedding", "for adapters on embeddings")):
        with pytest.raises(TypeError, match=rf"^{theirs}: .*got {theirs}=4\); Hugging Face PEFT's {theirs} is {ours}"):
            pl.create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, **{theirs: 4})


def test_a_model_without_adapter_layers_is_refused() -> None:
    """Before, a model whose adapters were not injected (yet) got a full fine-tuning optimizer,
    its trainable weights at ``lr``, and no ``lora_B`` group."""
    model = nn.Sequential(nn.Linear(8, 8))
    message = r"^model: has no adapter layers \(a Sequential whose .*no lora_B group\); inject_adapters\(\) first$"
    with pytest.raises(ValueError, match=message):
        pl.loraplus_param_groups(model, 1e-3)
    with pytest.raises(ValueError, match=message):
        pl.create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3)
    with pytest.raises(TypeError, match="^model: expected an nn.Module, got NoneType$"):
        pl.loraplus_param_groups(None, 1e-3)


def test_bitsandbytes_8bit_adam_keeps_embedding_state_in_32_bits() -> None:
    """As Hugging Face PEFT's create_loraplus_optimizer: 8-bit Adam state is unstable for
    embeddings, so a trained embedding keeps 32-bit state; other large weights stay 8-bit."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(200, 64), nn.Linear(64, 64), nn.Linear(64, 128))
    pl.inject_adapters(model, ["1"], rank=4, modules_to_save=["0", "2"])
    optimizer = pl.create_loraplus_optimizer(model, bnb.optim.AdamW8bit, lr=1e-3)
    model(torch.randint(0, 200, (4, 5))).square().mean().backward()
    optimizer.step()

    def state_dtypes(parameter: torch.Tensor) -> set[torch.dtype]:
        return {value.dtype for key, value in optimizer.state[parameter].items() if key in ("state1", "state2")}

    assert state_dtypes(model[0].trained.weight) == {torch.float32}  # 12800 values: 8-bit otherwise
    assert state_dtypes(model[2].trained.weight) == {torch.uint8}  # 8192 values, no embedding


def test_an_explicit_ratio_equal_to_the_layers_own_or_without_lora_plus_layers_does_not_warn(recwarn) -> None:
    model = pl.inject_adapters(tiny_model(), "q_proj", method="lora_plus", lr_ratio=4.0, rank=2)
    groups = pl.loraplus_param_groups(model, 1.0, lr_ratio=4.0)
    assert group_of(groups, dict(iter_adapter_layers(model))["layers.0.attn.q_proj"].lora_B)["lr"] == 4.0
    pl.loraplus_param_groups(pl.inject_lora(tiny_model(), "q_proj", rank=2), 1.0, lr_ratio=2.0)
    assert not [w for w in recwarn if "lr_ratio" in str(w.message)]
