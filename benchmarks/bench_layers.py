"""Speed and memory of the full-precision layers (issue 2): LoRA, DoRA and their merged forms
against the frozen ``nn.Linear`` and Hugging Face PEFT, at (tokens, in, out) = (512, 1024, 1024)
and (512, 4096, 4096), fp32, rank 16, two threads.

Two kinds of timing, both recorded by pytest-benchmark:

- ``test_train_step`` / ``test_forward``: one benchmark per variant, run one after another with
  the variants of a shape adjacent (pytest-benchmark's usual per-test statistics, grouped by shape).
- ``test_paired``: all variants of a shape in one benchmark, interleaved round by round
  (``harness.paired_rounds``); the per-variant times land in ``extra_info["times"]``. ``report.py``
  takes its ratios from these, round by round, and shows the sequential ratios beside them.

``test_peak_memory`` records, for one train step per variant, the peak tensor bytes and the number
of allocations as large as the fp32 (out, in) weight (``extra_info["peak_bytes"]``,
``extra_info["weight_sized"]``). Nothing here asserts a timing.
"""

from __future__ import annotations

import pytest

from harness import (
    KINDS,
    Case,
    build_dense_variant,
    measure_memory,
    rounds_for,
    shape_params,
    time_paired,
    time_sequential,
)

TRAIN_VARIANTS = ("linear", "lora", "dora", "hf_lora", "hf_dora")
FORWARD_VARIANTS = ("linear", "lora", "dora", "hf_lora", "hf_dora", "lora_merged", "dora_merged")
# linear_copy is an A/A control: a second, identical nn.Linear; its ratio to linear is the noise
PAIRED_VARIANTS = {
    "train": ("linear", "linear_copy", "lora", "dora", "hf_lora", "hf_dora"),
    "forward": (
        "linear", "linear_copy", "lora", "dora", "hf_lora", "hf_dora", "lora_merged", "dora_merged",
        "dora_uncached", "hf_dora_cached",  # the gain computed every call; Hugging Face's cache on
    ),
}


def _case(variant: str, shape: tuple[int, int, int]) -> Case:
    tokens, in_features, out_features = shape
    return Case(variant, build_dense_variant(variant, in_features, out_features), tokens)


@pytest.mark.parametrize(("shape", "variant"), shape_params(TRAIN_VARIANTS))
def test_train_step(benchmark, shape, variant):
    time_sequential(benchmark, _case(variant, shape), suite="layers", kind="train", shape=shape,
                    rounds=rounds_for(shape, 20, 6), warmup_rounds=3)


@pytest.mark.parametrize(("shape", "variant"), shape_params(FORWARD_VARIANTS))
def test_forward(benchmark, shape, variant):
    time_sequential(benchmark, _case(variant, shape), suite="layers", kind="forward", shape=shape,
                    rounds=rounds_for(shape, 30, 8), warmup_rounds=3)


@pytest.mark.parametrize(("shape", "kind"), shape_params(KINDS))
def test_paired(benchmark, shape, kind):
    cases = {variant: _case(variant, shape) for variant in PAIRED_VARIANTS["forward" if kind == "forward" else "train"]}
    rounds = rounds_for(shape, 150, 30) if kind.startswith("train") else rounds_for(shape, 200, 40)
    time_paired(benchmark, cases, suite="layers", kind=kind, shape=shape, rounds=rounds)


@pytest.mark.parametrize(("shape", "variant"), shape_params(TRAIN_VARIANTS))
def test_peak_memory(benchmark, shape, variant):
    measure_memory(benchmark, _case(variant, shape), suite="layers", shape=shape)
