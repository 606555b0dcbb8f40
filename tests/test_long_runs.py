"""State that goes stale over a run: checks that single-step tests miss (from an audit of the
eighteenth session; each failed before its fix).

Each test compares against a float64 reference computed from the layer's current tensors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_layers import DoRALinear, LoRALinear, QDoRALinear


def _dora_reference(layer: DoRALinear, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """(m / ||W0 + s B A||) x (W0 + s B A)^T + b in float64, from the layer's tensors now."""
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    merged = base.double() + layer.scaling * b @ a
    gain = layer.magnitude.detach().double() / merged.norm(dim=1).clamp_min(layer.epsilon)
    return gain * (x.double() @ merged.t()) + layer.bias.detach().double()


def _dense_dora() -> tuple[DoRALinear, callable]:
    layer = DoRALinear(64, 32, rank=4)
    return layer, lambda: layer.base_layer.weight.detach()


def _qdora() -> tuple[QDoRALinear, callable]:
    layer = QDoRALinear.from_linear(nn.Linear(64, 32), rank=4)
    return layer, lambda: layer.base_layer.dequantize(torch.float32)


@pytest.mark.parametrize("make", [_dense_dora, _qdora], ids=["dora", "qdora"])
def test_eval_gain_not_stale_after_fused_steps_on_refrozen_adapter(make):
    """The no-grad DoRA gain m / n is cached under the version keys of A, B and m, which count
    optimizer steps only while a tensor requires grad (fused optimizers write without bumping the
    version counter). Evaluate frozen (cache filled), unfreeze, train with fused AdamW, freeze
    again (``model.eval().requires_grad_(False)``, as lora.py advises for inference) and evaluate:
    the key is the one of the first evaluation, so the old gain came back (outputs off by ~0.4)."""
    torch.manual_seed(0)
    layer, base = make()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 64)
    layer.eval().requires_grad_(False)
    with torch.no_grad():
        layer(x)
    for parameter in layer.adapter_parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(layer.adapter_parameters(), lr=0.05, fused=True)
    layer.train()
    for _ in range(3):
        optimizer.zero_grad()
        layer(x).pow(2).sum().backward()
        optimizer.step()
    layer.eval().requires_grad_(False)
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out.double(), _dora_reference(layer, x, base()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_unmerge_after_adapter_changed_while_merged(cls):
    """A merge folds s B A (DoRA: and m / n) into W0; unmerge() takes out s B A with the factors
    of the moment. If the adapter changed while merged (an AdamW step with zeroed, not None,
    gradients: momentum and weight decay still move A and B), W0 came back off by
    s (B'A' - BA), silently and for good. The layer keeps copies of A and B as merged, so
    unmerge() gives W0 back, and the layer then computes with the moved factors."""
    torch.manual_seed(0)
    linear = nn.Linear(16, 12)
    original = linear.weight.detach().clone()
    layer = cls.from_linear(linear, rank=4)
    optimizer = torch.optim.AdamW(layer.adapter_parameters(), lr=1e-2)
    x = torch.randn(5, 16)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=False)
        layer(x).pow(2).sum().backward()
        optimizer.step()
    layer.merge()
    optimizer.zero_grad(set_to_none=False)
    optimizer.step()  # a step while merged: zero gradients, but momentum and decay move A and B
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight.detach(), original, rtol=0, atol=1e-6)
    x64 = x.double()
    expected = x64 @ original.double().T + linear.bias.detach().double()
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    if cls is LoRALinear:
        expected = expected + layer.scaling * (x64 @ a.T) @ b.T
    else:
        merged = original.double() + layer.scaling * b @ a
        gain = layer.magnitude.detach().double() / merged.norm(dim=1)
        expected = gain * (x64 @ merged.T) + linear.bias.detach().double()
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
