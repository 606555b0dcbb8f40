"""Speed of a mixed-adapter batch: ``MultiLoRALinear`` under ``adapter_batch`` against the frozen
``nn.Linear`` and Hugging Face PEFT's mixed-batch forward (``adapter_names=``), no-grad.

A batch of 8 rows of 64 tokens (512 tokens, as in ``bench_layers.py``), at (in, out) = (1024,
1024) and (4096, 4096); four rank-16 adapters, rows ``a b c d a b - c`` (``-``: the base alone).
Every variant holds the same base weight and the same adapters. Timed interleaved
(``test_paired``); ``report.py`` prints the ratios. Nothing here asserts a timing.
"""

from __future__ import annotations

import pytest
import torch

from harness import ALPHA, RANK, hf_peft_model, make_linear, time_operations

import peft_layers as pl

peft = pytest.importorskip("peft")

ROWS = ["a", "b", "c", "d", "a", "b", None, "c"]
TOKENS_PER_ROW = 64
#: (in, out) -> interleaved rounds
SHAPES = {(1024, 1024): 100, (4096, 4096): 20}


def _adapters(in_features: int, out_features: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return {
        name: (torch.randn(RANK, in_features, generator=generator) / in_features**0.5,
               torch.randn(out_features, RANK, generator=generator) * 0.1)
        for name in "abcd"
    }


@pytest.mark.parametrize("shape", list(SHAPES), ids=[f"512x{i}x{o}" for i, o in SHAPES])
def test_paired(benchmark, shape: tuple[int, int]) -> None:
    in_features, out_features = shape
    adapters = _adapters(in_features, out_features)
    linear = make_linear(in_features, out_features)
    stack = pl.MultiLoRALinear(make_linear(in_features, out_features))
    for name, (lora_A, lora_B) in adapters.items():
        stack.add_adapter(name, lora_A, lora_B, ALPHA / RANK)
    stack.row_adapters = list(ROWS)
    hf_layer = hf_peft_model(make_linear(in_features, out_features), adapters).base_model.model.proj.eval()
    hf_names = [name or "__base__" for name in ROWS]
    x = torch.randn(len(ROWS), TOKENS_PER_ROW, in_features, generator=torch.Generator().manual_seed(2))

    def no_grad(call):
        def run() -> None:
            with torch.no_grad():
                call()
        return run

    operations = {
        "linear": no_grad(lambda: linear(x)),
        "multi_lora": no_grad(lambda: stack(x)),
        "hf_mixed": no_grad(lambda: hf_layer(x, adapter_names=hf_names)),
    }
    time_operations(
        benchmark, operations, suite="serving", kind="forward",
        shape=f"{len(ROWS) * TOKENS_PER_ROW}x{in_features}x{out_features}", rounds=SHAPES[shape],
    )

    # the three compute what they should: the same outputs where rows share an adapter
    with torch.no_grad():
        ours, theirs = stack(x), hf_layer(x, adapter_names=hf_names)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours[6], linear(x[6]), rtol=1e-5, atol=1e-5)
