"""A one-minute tour: wrap an nn.Linear in LoRA and DoRA, train a few steps, merge, compare.

The task is synthetic but honest: a frozen "pretrained" layer W0 must learn a low-rank shift
W0 + U V^T of its weights from input/output pairs. LoRA and DoRA see the same data; at the end
each adapter is merged into the base and the merged layer is checked against the unmerged one.
Run with ``make demo`` or ``python examples/demo.py``.
"""

from __future__ import annotations

import torch
from torch import nn

import peft_layers as pl


def make_task(in_features: int, out_features: int, shift_rank: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    pretrained = nn.Linear(in_features, out_features)
    with torch.no_grad():
        pretrained.weight.copy_(torch.randn(out_features, in_features, generator=generator) / in_features**0.5)
    shift = (torch.randn(out_features, shift_rank, generator=generator)
             @ torch.randn(shift_rank, in_features, generator=generator)) * 0.05
    target_weight = pretrained.weight.detach() + shift
    return pretrained, target_weight


def train(layer: nn.Module, target_weight: torch.Tensor, steps: int, lr: float) -> list[float]:
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


def main() -> None:
    torch.manual_seed(0)
    in_features, out_features = 256, 192
    for cls in (pl.LoRALinear, pl.DoRALinear):
        pretrained, target_weight = make_task(in_features, out_features, shift_rank=4)
        layer = cls.from_linear(pretrained, rank=8, alpha=16.0)
        trainable = sum(p.numel() for p in layer.adapter_parameters())
        total = trainable + sum(p.numel() for p in layer.base_layer.parameters())
        losses = train(layer, target_weight, steps=150, lr=1e-2)
        x = torch.randn(64, in_features)
        with torch.no_grad():
            unmerged = layer(x)
            layer.merge()
            merged = layer(x)
            plain = layer.to_linear()  # a plain nn.Linear; the layer stays merged
            layer.unmerge()
        print(f"{cls.__name__}: trainable {trainable:,} of {total:,} params "
              f"({100 * trainable / total:.2f}%)")
        print(f"  loss  step 1: {losses[0]:.5f}   step {len(losses)}: {losses[-1]:.6f}")
        print(f"  max |merged - unmerged|    = {(merged - unmerged).abs().max().item():.2e}")
        print(f"  max |to_linear - unmerged| = {(plain(x) - unmerged).abs().max().item():.2e}")
        print(f"  {layer}")


if __name__ == "__main__":
    main()
