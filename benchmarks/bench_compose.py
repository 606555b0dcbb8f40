"""Speed of combining adapters by SVD: ``peft_layers.compose.combine`` against Hugging Face PEFT's
``add_weighted_adapter(combination_type="svd")`` on the same two rank-16 adapters of one layer,
(out, in) = (1024, 1024) and (4096, 4096), result rank 16, two threads.

Ours takes the SVD of the small core of the concatenated factors; Hugging Face PEFT forms the
dense (out, in) update and takes its full SVD. The two are timed interleaved
(:func:`harness.time_operations`) as ``test_paired``; ``report.py`` prints the ratio. Hugging Face
PEFT's call includes building its new adapter's modules, which is part of what a user waits for.
Nothing here asserts a timing.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from harness import ALPHA, RANK, hf_peft_model, time_operations

from peft_layers.compose import combine
from peft_layers.lora import LoRALinear

peft = pytest.importorskip("peft")

#: (out, in) of the combined layer, and interleaved rounds (a dense SVD at 4096 takes seconds)
SHAPES = {(1024, 1024): 10, (4096, 4096): 3}
WEIGHTS = (0.6, 0.4)


def _adapted_layers(out_features: int, in_features: int) -> list[LoRALinear]:
    generator = torch.Generator().manual_seed(0)
    base = nn.Linear(in_features, out_features)
    layers = []
    for _ in WEIGHTS:
        layer = LoRALinear.from_linear(base, rank=RANK, alpha=ALPHA)
        with torch.no_grad():
            layer.lora_B.normal_(generator=generator)
        layers.append(layer)
    return layers


def _hf_model(layers: list[LoRALinear]) -> nn.Module:
    """A PeftModel over one linear layer holding the same two adapters as ``layers``."""
    return hf_peft_model(
        layers[0].base_layer,
        {name: (layer.lora_A, layer.lora_B) for name, layer in zip(("first", "second"), layers)},
    )


@pytest.mark.parametrize("shape", list(SHAPES), ids=[f"{o}x{i}" for o, i in SHAPES])
def test_paired(benchmark, shape: tuple[int, int]) -> None:
    layers = _adapted_layers(*shape)
    model = _hf_model(layers)
    names: list[str] = []

    def ours() -> None:
        combine(layers, list(WEIGHTS), method="svd", rank=RANK)

    def hf_peft() -> None:
        # a new name each call: add_weighted_adapter does nothing for a name that exists
        names.append(f"combo{len(names)}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.add_weighted_adapter(
                ["first", "second"], list(WEIGHTS), names[-1], combination_type="svd", svd_rank=RANK
            )

    time_operations(
        benchmark, {"ours": ours, "hf_peft": hf_peft}, suite="compose", kind="svd",
        shape=f"{shape[0]}x{shape[1]}", rounds=SHAPES[shape], warmup=1,
    )

    # both computed the same update: the timing compares like with like
    target = model.base_model.model.proj
    theirs = target.lora_B[names[-1]].weight @ target.lora_A[names[-1]].weight
    lora_A, lora_B = combine(layers, list(WEIGHTS), method="svd", rank=RANK)
    torch.testing.assert_close(lora_B @ lora_A, theirs, rtol=1e-3, atol=1e-4 * theirs.abs().max().item())
