"""A one-minute tour: wrap an nn.Linear in LoRA, DoRA and QLoRA, train a few steps, merge, compare.

The task is synthetic but honest: a frozen "pretrained" layer W0 must learn a low-rank shift
W0 + U V^T of its weights from input/output pairs. Every method sees the same data; at the end
each adapter is merged and the merged layer is checked against the unmerged one, and the adapter
is saved in Hugging Face PEFT's file layout and loaded back into a fresh model.
Run with ``python3 dev.py demo`` or ``python examples/demo.py``.
"""

from __future__ import annotations

import tempfile
import warnings

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
    for cls, kwargs in ((pl.LoRALinear, {}), (pl.DoRALinear, {}), (pl.QLoRALinear, {"quant": "nf4"})):
        pretrained, target_weight = make_task(in_features, out_features, shift_rank=4)
        layer = cls.from_linear(pretrained, rank=8, alpha=16.0, **kwargs)
        trainable, total = pl.trainable_parameters(layer)
        losses = train(layer, target_weight, steps=150, lr=1e-2)
        x = torch.randn(64, in_features)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # QLoRA warns that an in-place merge requantizes
            unmerged = layer(x)
            plain = layer.to_linear()  # a plain nn.Linear: the exact float merge
            layer.merge()
            merged = layer(x)
            layer.unmerge()
        print(f"{cls.__name__}{' ' + kwargs['quant'] if kwargs else ''}: trainable {trainable:,} of "
              f"{total:,} params ({100 * trainable / total:.2f}%)")
        print(f"  loss  step 1: {losses[0]:.5f}   step {len(losses)}: {losses[-1]:.6f}")
        print(f"  max |to_linear - unmerged| = {(plain(x) - unmerged).abs().max().item():.2e}")
        print(f"  max |merged - unmerged|    = {(merged - unmerged).abs().max().item():.2e}"
              + ("   (in-place merge requantizes to NF4)" if kwargs else ""))

    # a model: inject, train, save in Hugging Face PEFT's layout, load into a fresh copy
    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))

    trained = pl.inject_adapters(model(), ["0", "2"], method="dora", rank=4)
    with torch.no_grad():
        for layer in (trained[0], trained[2]):
            layer.lora_B.normal_(std=0.1)
    with tempfile.TemporaryDirectory() as directory:
        pl.save_adapter(trained, directory)
        loaded = pl.load_adapter(model(), directory)
    x = torch.randn(8, 64)
    with torch.no_grad():
        difference = (loaded(x) - trained(x)).abs().max().item()
    print(f"save_adapter -> load_adapter into a fresh model: max |difference| = {difference:.1e}")
    pl.print_trainable_parameters(loaded)


if __name__ == "__main__":
    main()
