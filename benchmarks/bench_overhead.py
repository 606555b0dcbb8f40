"""Per-call cost of the layers on one token: what a step costs beyond its arithmetic.

At (tokens, in, out) = (1, 64, 64) the products take a few microseconds, so these ratios measure
the Python and dispatch work of a call (module call, checks, casts, the adapter's extra ops)
against a frozen ``nn.Linear`` and Hugging Face PEFT's layers: the cost that dominates
token-by-token generation with unmerged adapters on a fast device. fp32, rank 16, two threads.
Timed interleaved (``test_paired``); ``report.py`` prints the ratios. Nothing here asserts a
timing.
"""

from __future__ import annotations

import pytest

from harness import Case, build_dense_variant, time_paired

#: one token through a small layer: the call's own cost, not its arithmetic
SHAPE = (1, 64, 64)
VARIANTS = ("linear", "lora", "dora", "hf_lora", "hf_dora")


@pytest.mark.parametrize("kind", ["forward", "train"])
def test_paired(benchmark, kind: str) -> None:
    tokens, in_features, out_features = SHAPE
    cases = {variant: Case(variant, build_dense_variant(variant, in_features, out_features), tokens)
             for variant in VARIANTS}
    time_paired(benchmark, cases, suite="overhead", kind=kind, shape=SHAPE, rounds=3000)
