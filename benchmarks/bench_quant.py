"""Speed and memory of the quantized layers (issue 3): QLoRA and QDoRA over an NF4 base, against
the bare ``QuantizedLinear`` and Hugging Face PEFT's QLoRA/QDoRA over a bitsandbytes
``Linear4bit``, at the shapes of ``bench_layers.py`` (fp32 compute, rank 16, two threads).

Every variant quantizes the same seeded weight: NF4, blocks of 64, double quantization. Same
structure as ``bench_layers.py``: per-variant ``test_train_step``/``test_forward``, interleaved
``test_paired`` (the ratios of ``report.py``), and ``test_peak_memory``. Skipped as a whole when
``peft_layers.quant`` or bitsandbytes cannot be imported. Nothing here asserts a timing.

Each test builds its own modules: bitsandbytes repacks a 4-bit weight in place on its first CPU
eval-mode forward, so a module timed in eval is never reused for a train step.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness import (
    ALPHA,
    KINDS,
    RANK,
    Case,
    hf_peft_layer,
    make_linear,
    measure_memory,
    perturb_adapter_,
    rounds_for,
    shape_params,
    time_paired,
    time_sequential,
    wrapped_for,
)

quant = pytest.importorskip("peft_layers.quant", exc_type=ImportError)
qlora = pytest.importorskip("peft_layers.qlora", exc_type=ImportError)
bnb = pytest.importorskip("bitsandbytes", exc_type=ImportError)

SCHEME = "nf4"
BLOCKSIZE = 64

TRAIN_VARIANTS = ("quantized", "qlora", "qdora", "bnb_4bit", "hf_qlora", "hf_qdora")
FORWARD_VARIANTS = TRAIN_VARIANTS
# quantized_copy is an A/A control: a second, identical QuantizedLinear
PAIRED_VARIANTS = ("quantized", "quantized_copy", "qlora", "qdora", "bnb_4bit", "hf_qlora", "hf_qdora")
#: no-grad forwards also time QDoRA with its adapter changed before each call (no cached gain)
#: and Hugging Face PEFT's QDoRA with its opt-in DoraCaching on
PAIRED_FORWARD_VARIANTS = (*PAIRED_VARIANTS, "qdora_uncached", "hf_qdora_cached")
MEMORY_VARIANTS = ("quantized", "qlora", "qdora", "hf_qlora", "hf_qdora")


def bnb_linear4bit(linear: nn.Linear) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` (NF4, double quantization, fp32 compute) holding ``linear``'s
    weight, quantized the way transformers' 4-bit loading does it (on ``.to(device)``)."""
    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=torch.float32, compress_statistics=True, quant_type=SCHEME,
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.detach().clone(), requires_grad=False, quant_type=SCHEME,
        compress_statistics=True, blocksize=BLOCKSIZE,
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to(linear.weight.device)


def build_quant_variant(name: str, in_features: int, out_features: int) -> nn.Module:
    """One quantized variant over the seeded weight (see the module docstring)."""
    linear = make_linear(in_features, out_features)
    options = dict(blocksize=BLOCKSIZE, double_quant=True, compute_dtype=torch.float32)
    if name in ("quantized", "quantized_copy"):
        return quant.QuantizedLinear.from_linear(linear, scheme=SCHEME, **options)
    if name == "bnb_4bit":
        return bnb_linear4bit(linear)
    if name == "qlora":
        layer: nn.Module = qlora.QLoRALinear.from_linear(linear, quant=SCHEME, rank=RANK, alpha=ALPHA, **options)
    elif name in ("qdora", "qdora_uncached"):
        layer = qlora.QDoRALinear.from_linear(linear, quant=SCHEME, rank=RANK, alpha=ALPHA, **options)
    elif name == "hf_qlora":
        layer = hf_peft_layer(bnb_linear4bit(linear), use_dora=False)
    elif name in ("hf_qdora", "hf_qdora_cached"):
        layer = hf_peft_layer(bnb_linear4bit(linear), use_dora=True)
    else:
        raise ValueError(f"variant: unknown quantized variant {name!r}")
    perturb_adapter_(layer)
    return wrapped_for(name, layer)


def _case(variant: str, shape: tuple[int, int, int]) -> Case:
    tokens, in_features, out_features = shape
    return Case(variant, build_quant_variant(variant, in_features, out_features), tokens)


@pytest.mark.parametrize(("shape", "variant"), shape_params(TRAIN_VARIANTS))
def test_train_step(benchmark, shape, variant):
    time_sequential(benchmark, _case(variant, shape), suite="quant", kind="train", shape=shape,
                    rounds=rounds_for(shape, 15, 4), warmup_rounds=2)


@pytest.mark.parametrize(("shape", "variant"), shape_params(FORWARD_VARIANTS))
def test_forward(benchmark, shape, variant):
    time_sequential(benchmark, _case(variant, shape), suite="quant", kind="forward", shape=shape,
                    rounds=rounds_for(shape, 20, 5), warmup_rounds=2)


@pytest.mark.parametrize(("shape", "kind"), shape_params(KINDS))
def test_paired(benchmark, shape, kind):
    variants = PAIRED_FORWARD_VARIANTS if kind == "forward" else PAIRED_VARIANTS
    cases = {variant: _case(variant, shape) for variant in variants}
    rounds = rounds_for(shape, 120, 25) if kind.startswith("train") else rounds_for(shape, 150, 30)
    time_paired(benchmark, cases, suite="quant", kind=kind, shape=shape, rounds=rounds)


@pytest.mark.parametrize(("shape", "variant"), shape_params(MEMORY_VARIANTS))
def test_peak_memory(benchmark, shape, variant):
    measure_memory(benchmark, _case(variant, shape), suite="quant", shape=shape)
