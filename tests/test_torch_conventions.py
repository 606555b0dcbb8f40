"""The adapter layers against the nn.Module conventions a PyTorch user relies on (nn.Linear side by
side): dynamic-shape compiles, skip_init, dtype round trips and requires_grad_. Each result is
compared with the float64 formula."""

from __future__ import annotations

import pytest
import torch
from reference import assert_close64, dora_ref, f64, lora_ref, randomize_adapter
from torch import nn

import peft_layers as pl


def _reference(layer: nn.Module, x: torch.Tensor, params: dict | None = None) -> torch.Tensor:
    """The layer's float64 output from its current tensors (``params``: float64 leaves to use)."""
    p = params or {name: f64(value) for name, value in layer.named_parameters()}
    if isinstance(layer, pl.DoRALinear):
        return dora_ref(f64(x), p["base_layer.weight"], p["base_layer.bias"], p["lora_A"], p["lora_B"],
                        p["magnitude"], layer.scaling, layer.epsilon)
    return lora_ref(f64(x), p["base_layer.weight"], p["base_layer.bias"], p["lora_A"], p["lora_B"], layer.scaling)


@pytest.mark.parametrize("cls", [pl.LoRALinear, pl.DoRALinear])
def test_dynamic_compile_traces_one_graph_for_every_sequence_length(cls: type) -> None:
    """``torch.compile(dynamic=True)`` over inputs of several sequence lengths compiles one graph,
    as for ``nn.Linear`` (a Python int taken from the input's shape in the forward would specialise
    it and recompile per length), and each output and gradient is the float64 one."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = cls(16, 8, rank=4).train()
    randomize_adapter(layer)
    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter, dynamic=True)
    for length in (3, 5, 9):
        x = torch.randn(2, length, 16)
        layer.zero_grad()
        y = compiled(x)
        y.square().sum().backward()
        params = {name: f64(value, requires_grad=True) for name, value in layer.named_parameters()}
        expected = _reference(layer, x, params)
        expected.square().sum().backward()
        assert_close64(y, expected, 1e-5, what=f"output, length {length}")
        assert_close64(layer.lora_A.grad, params["lora_A"].grad, 1e-4, what=f"grad A, length {length}")
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for 3 sequence lengths (recompiled)"


@pytest.mark.parametrize("cls", [pl.LoRALinear, pl.LoRAPlusLinear, pl.DoRALinear])
def test_skip_init_then_reset_parameters_gives_a_layer_equal_to_its_base(cls: type) -> None:
    """``torch.nn.utils.skip_init`` (needs a ``device`` argument in the constructor's signature:
    LoRA+ and DoRA hid theirs in ``**kwargs``) builds the layer on the meta device and
    materialises it uninitialised, as for ``nn.Linear``; ``reset_parameters()`` on its modules,
    children first, then gives a fresh layer (``B = 0``, DoRA's ``m = ||W0||``) equal to its base."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="the base layer is on the meta device, so the adapter holds no values yet"):
        layer = torch.nn.utils.skip_init(cls, 16, 8, rank=4)
    assert layer.lora_A.device.type == "cpu" and layer.weight.device.type == "cpu"
    layer.apply(lambda module: module.reset_parameters() if hasattr(module, "reset_parameters") else None)
    x = torch.randn(5, 16)
    assert torch.equal(layer.lora_B, torch.zeros(8, 4))
    assert_close64(layer(x), f64(x) @ f64(layer.weight).T + f64(layer.bias), 1e-6)
    assert_close64(layer(x), _reference(layer, x), 1e-6)


def test_dora_dtype_round_trip_does_not_reuse_the_old_norm() -> None:
    """``.bfloat16().float()`` rounds the base weight while keeping its Parameter object, dtype
    and often its storage address and version: DoRA's cached ``||W0||^2`` and ``m / n`` must not
    survive it (``_apply`` drops them), so the next forward is the float64 DoRA of the rounded
    tensors (a stale norm is off by bf16's rounding, ~1e-3)."""
    torch.manual_seed(0)
    layer = pl.DoRALinear(64, 32, rank=4).eval()
    randomize_adapter(layer)
    x = torch.randn(6, 64)
    for _ in range(3):
        with torch.no_grad():
            layer(x)  # fills both caches
        layer.bfloat16().float()
        with torch.no_grad():
            assert_close64(layer(x), _reference(layer, x), 1e-5, what="after a bf16 round trip")


@pytest.mark.parametrize("cls", [pl.LoRALinear, pl.DoRALinear])
def test_requires_grad_true_trains_every_parameter_with_float64_gradients(cls: type) -> None:
    """``layer.requires_grad_(True)``, as on an ``nn.Linear`` (full fine-tuning plus adapter), makes
    the base weight and bias trainable too: one backward gives every parameter the float64
    autograd gradient (the fused step, which gives ``W0`` none, must not run then)."""
    torch.manual_seed(0)
    layer = cls(16, 8, rank=4).train()
    randomize_adapter(layer)
    layer.requires_grad_(True)
    x = torch.randn(2, 5, 16)
    layer(x).square().sum().backward()
    params = {name: f64(value, requires_grad=True) for name, value in layer.named_parameters()}
    _reference(layer, x, params).square().sum().backward()
    for name, value in layer.named_parameters():
        assert value.grad is not None, f"{name} got no gradient"
        assert_close64(value.grad, params[name].grad, 1e-5, what=name)
