"""Edges of the seventeenth session's changes, from a review of them: 16-bit merges rounded
once (and float32 ones unchanged, bit for bit), float16 DoRA rows whose gain underflows,
``torch.jit.trace`` of a 16-bit DoRA layer with gradients, and ``merge_and_unload`` leaving a
quantization record it does not own. Each compares with a float64 formula or a known value."""

from __future__ import annotations

import dataclasses
import types
import warnings

import pytest
import torch
from reference import direct_row_norm, f64, materialised_weight
from torch import nn

import peft_layers as pl


def _set_adapters(layer: pl.LoRALinear, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) * 0.3)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.3)


def _merged64(layer: pl.LoRALinear) -> torch.Tensor:
    """``W0 + s B A`` (DoRA: scaled to ``m / ||.||`` per row) in float64, from the layer's tensors."""
    w0, a, b = f64(layer.base_layer.weight), f64(layer.lora_A), f64(layer.lora_B)
    merged = materialised_weight(w0, a, b, layer.scaling)
    if isinstance(layer, pl.DoRALinear):
        gain = f64(layer.magnitude) / direct_row_norm(w0, a, b, layer.scaling, layer.epsilon)
        merged = merged * gain[:, None]
    return merged


@pytest.mark.parametrize("cls", [pl.LoRALinear, pl.DoRALinear])
def test_bf16_merge_is_the_float64_merge_rounded_once(cls: type) -> None:
    """A bf16 base with float32 adapters merges in float32 and rounds once: the stored weight is
    the float64 merge rounded to bf16 (but for the rare double rounding through float32), never
    more than one bf16 ulp off. Rounding delta (or DoRA's W') to bf16 first put ~30% of the
    entries a ulp or more off, up to 24% relative near cancellation."""
    torch.manual_seed(0)
    layer = cls.from_linear(nn.Linear(80, 96).to(torch.bfloat16), rank=8, alpha=16)
    _set_adapters(layer)
    expected = _merged64(layer)
    layer.merge()
    merged = layer.base_layer.weight.detach()
    assert merged.dtype == torch.bfloat16
    exact = (merged == expected.to(torch.bfloat16)).double().mean().item()
    assert exact > 0.999, exact
    ulp = torch.finfo(torch.bfloat16).eps * expected.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    assert bool(((merged.double() - expected).abs() <= ulp).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_lora_merge_with_adapters_in_the_bases_dtype_is_one_addmm_bit_for_bit(dtype: torch.dtype) -> None:
    """A LoRA layer whose adapters share its base's dtype (float32; a 16-bit model cast whole,
    adapters included) merges as one ``addmm`` in that dtype, bit for bit, rounded once: no
    float32 copy of a 16-bit ``W0`` (twice the memory, and a double rounding in float16)."""
    torch.manual_seed(0)
    layer = pl.LoRALinear.from_linear(nn.Linear(80, 96), rank=8, alpha=16).to(dtype)
    _set_adapters(layer)
    w0 = layer.base_layer.weight.detach().clone()
    expected = torch.addmm(w0, layer.lora_B.detach(), layer.lora_A.detach(), alpha=layer.scaling)
    layer.merge()
    assert torch.equal(layer.base_layer.weight.detach(), expected)


def test_float16_dora_rows_whose_gain_underflows_are_restored_exactly() -> None:
    """DoRA over a float16 base: a row whose gain m / ||W'|| is subnormal in float16 (1e-6, 3e-5)
    merges to (nearly) nothing there, though the float32 merge weight holds it; the check against
    the stored dtype keeps those rows' W' so that unmerge() gives W0 back exactly (checking the
    float32 merge dtype instead keeps none, and unmerge divides float16 subnormals: 2e-3 off)."""
    torch.manual_seed(0)
    layer = pl.DoRALinear.from_linear(nn.Linear(64, 4).to(torch.float16), rank=4, alpha=8)
    _set_adapters(layer)
    with torch.no_grad():
        layer.magnitude.copy_(layer.weight_norm().float() * torch.tensor([1e-6, 3e-5, 1.0, 0.5]))
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight.detach()[:2], w0[:2])


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace:DeprecationWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_jit_trace_with_gradients_of_a_16bit_dora_layer(dtype: torch.dtype) -> None:
    """``torch.jit.trace`` records the norm's ops without their ``no_grad`` block; over a 16-bit
    weight they include ``torch.mm(..., out=...)`` on ``A``, which raised once the graph ran with
    gradients on (while tracing, and on every training call of the traced module). The traced
    gradients are the eager ones (to 16-bit rounding)."""
    torch.manual_seed(0)
    layer = pl.DoRALinear.from_linear(nn.Linear(64, 32).to(dtype), rank=4)
    _set_adapters(layer)
    x = torch.randn(5, 64, dtype=dtype)
    traced = torch.jit.trace(layer, (x,))
    traced_grads = torch.autograd.grad(traced(x).float().square().sum(), [layer.lora_A, layer.magnitude])
    eager_grads = torch.autograd.grad(layer(x).float().square().sum(), [layer.lora_A, layer.magnitude])
    for got, expected in zip(traced_grads, eager_grads):
        assert ((got - expected).abs().max() / expected.abs().max()).item() < 5e-2


@dataclasses.dataclass(frozen=True)
class _FrozenConfig:
    quantization_config: dict


@pytest.mark.parametrize(
    "config",
    [
        types.SimpleNamespace(quantization_config={"quant_method": "gptq", "bits": 4}),
        _FrozenConfig({"load_in_4bit": True}),
    ],
    ids=["gptq-record", "frozen-config"],
)
def test_merge_and_unload_leaves_a_record_it_does_not_own(config: object) -> None:
    """``merge_and_unload`` clears a quantization record only for
    a transformers model loaded by bitsandbytes. A record of another method (GPTQ: its layers
    are no bitsandbytes modules and stay quantized) was deleted, so the checkpoint lost it; a
    config that cannot delete the attribute raised after every layer was merged."""
    pytest.importorskip("bitsandbytes")
    model = nn.Sequential(nn.Linear(64, 64))
    model.config = config
    pl.inject_adapters(model, ["0"], method="qlora", rank=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.merge_and_unload(model)
    assert model.config.quantization_config == config.quantization_config
