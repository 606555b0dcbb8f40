"""Parity with Hugging Face PEFT (a second implementation of the same math): the same start, the
same data and the same optimizer give the same training trajectory, LoRA, rsLoRA and DoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peft_layers as pl

peft = pytest.importorskip("peft")


def trajectory(model: nn.Module, steps: int, target: nn.Linear) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, target.in_features, generator=generator)
        with torch.no_grad():
            y = target(x)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(("use_dora", "use_rslora"), [(False, False), (False, True), (True, False)])
def test_training_trajectory_equals_hugging_face_peft(use_dora: bool, use_rslora: bool) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(48, 40), nn.Tanh(), nn.Linear(40, 24))
    target = nn.Linear(48, 24)
    ours = pl.inject_adapters(copy.deepcopy(base), ["0", "2"], method="dora" if use_dora else "lora",
                              rank=4, alpha=8.0, use_rslora=use_rslora)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], use_dora=use_dora, use_rslora=use_rslora)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name in ("0", "2"):
            mine, other = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
            other.lora_A["default"].weight.copy_(mine.lora_A)
            if use_dora:  # same start: their magnitude is ||W0|| per row, as ours
                torch.testing.assert_close(other.lora_magnitude_vector["default"].weight, mine.magnitude)
    ours_losses = trajectory(ours, 25, target)
    theirs_losses = trajectory(theirs, 25, target)
    assert ours_losses[-1] < 0.7 * ours_losses[0]
    torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(theirs_losses), rtol=1e-4, atol=1e-7)
