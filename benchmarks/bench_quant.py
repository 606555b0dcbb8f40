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
    RANK,
    SHAPES,
    Case,
    OthersCpuShare,
    hf_peft_layer,
    make_linear,
    paired_rounds,
    perturb_adapter_,
    rounds_for,
    shape_id,
    step_memory,
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
    elif name == "qdora":
        layer = qlora.QDoRALinear.from_linear(linear, quant=SCHEME, rank=RANK, alpha=ALPHA, **options)
    elif name == "hf_qlora":
        layer = hf_peft_layer(bnb_linear4bit(linear), use_dora=False)
    elif name == "hf_qdora":
        layer = hf_peft_layer(bnb_linear4bit(linear), use_dora=True)
    else:
        raise ValueError(f"variant: unknown quantized variant {name!r}")
    perturb_adapter_(layer)
    return layer


def _case(variant: str, shape: tuple[int, int, int]) -> Case:
    tokens, in_features, out_features = shape
    return Case(variant, build_quant_variant(variant, in_features, out_features), tokens)


def _params(variants: tuple[str, ...]) -> list:
    return [pytest.param(shape, v, id=f"{shape_id(shape)}-{v}") for shape in SHAPES for v in variants]


@pytest.mark.parametrize(("shape", "variant"), _params(TRAIN_VARIANTS))
def test_train_step(benchmark, shape, variant):
    case = _case(variant, shape)
    benchmark.group = f"quant train {shape_id(shape)}"
    benchmark.extra_info.update(suite="quant", kind="train", shape=shape_id(shape), variant=variant)
    with OthersCpuShare() as others:
        benchmark.pedantic(case.operation("train"), rounds=rounds_for(shape, 15, 4), warmup_rounds=2, iterations=1)
    benchmark.extra_info["others_cpu_share"] = others.share


@pytest.mark.parametrize(("shape", "variant"), _params(FORWARD_VARIANTS))
def test_forward(benchmark, shape, variant):
    case = _case(variant, shape)
    benchmark.group = f"quant forward {shape_id(shape)}"
    benchmark.extra_info.update(suite="quant", kind="forward", shape=shape_id(shape), variant=variant)
    with OthersCpuShare() as others:
        benchmark.pedantic(case.operation("forward"), rounds=rounds_for(shape, 20, 5), warmup_rounds=2, iterations=1)
    benchmark.extra_info["others_cpu_share"] = others.share


@pytest.mark.parametrize(
    ("shape", "kind"),
    [pytest.param(shape, kind, id=f"{shape_id(shape)}-{kind}") for shape in SHAPES for kind in ("train", "forward")],
)
def test_paired(benchmark, shape, kind):
    cases = {variant: _case(variant, shape) for variant in PAIRED_VARIANTS}
    one_round, times = paired_rounds({name: case.operation(kind) for name, case in cases.items()})
    benchmark.group = f"quant paired {kind} {shape_id(shape)}"
    benchmark.extra_info.update(suite="quant", kind=kind, shape=shape_id(shape), mode="paired", times=times)
    rounds = rounds_for(shape, 120, 25) if kind == "train" else rounds_for(shape, 150, 30)
    with OthersCpuShare() as others:
        benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=0, iterations=1)
    benchmark.extra_info["others_cpu_share"] = others.share


@pytest.mark.parametrize(("shape", "variant"), _params(MEMORY_VARIANTS))
def test_peak_memory(benchmark, shape, variant):
    case = _case(variant, shape)
    step = case.operation("train")
    step()  # first step outside: lazy caches and optimizer state exist before measuring
    benchmark.group = f"quant memory {shape_id(shape)}"
    benchmark.extra_info.update(suite="quant", kind="memory", shape=shape_id(shape), variant=variant)
    weight_bytes = 4 * shape[1] * shape[2]
    memory = benchmark.pedantic(lambda: step_memory(step, weight_bytes), rounds=1, iterations=1)
    benchmark.extra_info.update(memory)
