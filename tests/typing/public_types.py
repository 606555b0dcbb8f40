"""What a user's type checker infers from the public API; checked by mypy in ``dev.py test``,
never run (pytest collects only ``test_*.py``).

Each ``assert_type`` fails mypy when an annotation stops saying what the call returns, e.g. a
``from_linear`` that returns the base class would hide ``DoRALinear.magnitude`` from users.
"""

from pathlib import Path

import torch
from torch import Tensor, nn
from typing_extensions import assert_type

import peft_layers as pl

linear = nn.Linear(8, 8)

assert_type(pl.LoRALinear.from_linear(linear), pl.LoRALinear)
assert_type(pl.LoRAPlusLinear.from_linear(linear), pl.LoRAPlusLinear)
assert_type(pl.DoRALinear.from_linear(linear), pl.DoRALinear)
assert_type(pl.QLoRALinear.from_linear(linear), pl.QLoRALinear)
assert_type(pl.QDoRALinear.from_linear(linear), pl.QDoRALinear)

assert_type(pl.DoRALinear.from_linear(linear).magnitude, nn.Parameter)
assert_type(pl.QDoRALinear.from_linear(linear, quant="fp4").magnitude, nn.Parameter)
assert_type(pl.LoRAPlusLinear.from_linear(linear, lr_ratio=4.0).lr_ratio, float)

layer = pl.LoRALinear(8, 8, rank=2)
assert_type(layer.rank, int)
assert_type(layer.alpha, float)
assert_type(layer.use_rslora, bool)
assert_type(layer.init, str)
assert_type(layer.forward(torch.ones(2, 8)), Tensor)  # Module.__call__ is typed Any by torch
assert_type(layer.to_linear(), nn.Linear)

model = nn.Sequential(nn.Linear(8, 8))
pl.inject_adapters(model, ["0"], "lora")
assert_type(pl.save_adapter(model, Path("adapter")), Path)
pl.load_adapter(model, Path("adapter"))
