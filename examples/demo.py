"""A one-minute tour: wrap an nn.Linear in LoRA, DoRA and QLoRA, train a few steps, merge, compare.

The task is synthetic: a frozen "pretrained" layer W0 must learn a rank-4 shift W0 + U V^T of its
weights, about a third of W0's size (a fine-tuning-sized change), from input/output pairs. Every
method sees the same data. At the end each adapter is merged and the merged layer is checked
against the unmerged one; then a small model is trained, its adapter saved in Hugging Face PEFT's
file layout and loaded back into a fresh model. Every check raises if it fails.
Run with ``python3 dev.py demo`` or ``python examples/demo.py``.
"""

from __future__ import annotations

import tempfile
import warnings

import torch
from torch import nn

import peft_layers as pl

#: how far a float merge may move an output (float32 rounding; outputs are of size ~1)
MERGE_TOLERANCE = 1e-4


def make_task(in_features: int, out_features: int, shift_rank: int, seed: int = 0):
    """A "pretrained" layer (weights ~ N(0, 1/in)) and the target weight ``W0 + U V^T``."""
    generator = torch.Generator().manual_seed(seed)
    pretrained = nn.Linear(in_features, out_features)
    with torch.no_grad():
        pretrained.weight.copy_(torch.randn(out_features, in_features, generator=generator) / in_features**0.5)
    shift = (torch.randn(out_features, shift_rank, generator=generator)
             @ torch.randn(shift_rank, in_features, generator=generator)) * 0.01
    target_weight = pretrained.weight.detach() + shift
    return pretrained, target_weight


def train(layer: nn.Module, target_weight: torch.Tensor, steps: int, lr: float) -> list[float]:
    """AdamW on the mean squared error against ``x W^T + b``; the same batches for every layer."""
    layer.train()
    optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(256, target_weight.shape[1], generator=generator)
        target = x @ target_weight.t() + layer.bias.detach()
        loss = nn.functional.mse_loss(layer(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def tour_of_layers(in_features: int = 256, out_features: int = 192, steps: int = 150) -> list[dict]:
    """Train, merge and compare each layer kind; one summary dict per layer."""
    results = []
    for cls, kwargs in ((pl.LoRALinear, {}), (pl.DoRALinear, {}), (pl.QLoRALinear, {"quant": "nf4"})):
        pretrained, target_weight = make_task(in_features, out_features, shift_rank=4)
        layer = cls.from_linear(pretrained, rank=8, alpha=16.0, **kwargs)
        trainable, total = pl.trainable_parameters(layer)
        losses = train(layer, target_weight, steps=steps, lr=1e-2)
        layer.eval()
        x = torch.randn(64, in_features, generator=torch.Generator().manual_seed(2))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # QLoRA warns that an in-place merge requantizes
            unmerged = layer(x)
            plain = layer.to_linear()  # a plain nn.Linear: the exact float merge
            layer.merge()
            merged = layer(x)
            layer.unmerge()
            to_linear_difference = (plain(x) - unmerged).abs().max().item()
        name = cls.__name__ + (" " + kwargs["quant"] if kwargs else "")
        result = dict(name=name, trainable=trainable, total=total, losses=losses,
                      to_linear=to_linear_difference, merged=(merged - unmerged).abs().max().item(),
                      requantizes="quant" in kwargs)
        print(f"{name}: trainable {trainable:,} of {total:,} params ({100 * trainable / total:.2f}%)")
        print(f"  loss  step 1: {losses[0]:.5f}   step {len(losses)}: {losses[-1]:.2e}"
              + ("   (its floor: W0's NF4 rounding, which no rank-8 update undoes)" if result["requantizes"] else ""))
        print(f"  max |to_linear - unmerged| = {result['to_linear']:.2e}")
        print(f"  max |merged - unmerged|    = {result['merged']:.2e}"
              + ("   (in-place merge requantizes to NF4)" if result["requantizes"] else ""))
        check_layer(result)
        results.append(result)
    return results


def check_layer(result: dict) -> None:
    """The layer learned, and ``to_linear()`` (and, over a float base, ``merge()``) kept its outputs."""
    name, losses = result["name"], result["losses"]
    if not losses[-1] < losses[0] / 5:
        raise AssertionError(f"{name}: the loss fell only from {losses[0]:.3g} to {losses[-1]:.3g}")
    if not result["to_linear"] < MERGE_TOLERANCE:
        raise AssertionError(f"{name}: to_linear() moved an output by {result['to_linear']:.2e}")
    if not result["requantizes"] and not result["merged"] < MERGE_TOLERANCE:
        raise AssertionError(f"{name}: merge() moved an output by {result['merged']:.2e}")


def save_and_load(steps: int = 20) -> float:
    """Inject DoRA into a small model, train it (A, B and the magnitudes all move), save the
    adapter in Hugging Face PEFT's layout, load it into a fresh copy, and return the largest output
    difference (0 expected: same base, same tensors)."""

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))

    trained = pl.inject_adapters(model(), ["0", "2"], method="dora", rank=4)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.randn(32, 64, generator=generator)
        loss = nn.functional.mse_loss(trained(x), x.flip(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    trained.eval()
    with tempfile.TemporaryDirectory() as directory:
        pl.save_adapter(trained, directory)
        loaded = pl.load_adapter(model(), directory).eval()
    x = torch.randn(8, 64, generator=generator)
    with torch.no_grad():
        difference = (loaded(x) - trained(x)).abs().max().item()
    print(f"save_adapter -> load_adapter into a fresh model: max |difference| = {difference:.1e}")
    pl.print_trainable_parameters(loaded)
    if difference != 0.0:
        raise AssertionError(f"the loaded model's outputs differ from the trained one's by {difference:.2e}")
    return difference


def main() -> dict:
    """Run the tour and the save/load round trip; return their summaries."""
    return {"layers": tour_of_layers(), "save_and_load": save_and_load()}


if __name__ == "__main__":
    main()
