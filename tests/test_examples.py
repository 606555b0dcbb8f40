"""examples/demo.py, which ``dev.py setup`` runs: its numbers against known values, and its own
checks against the failures they exist to catch. (``finetune_minilm.py`` is run by
``test_pretrained.py``.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import peft_layers as pl

_DEMO_PATH = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def _load_demo():
    spec = importlib.util.spec_from_file_location("peft_layers_demo", _DEMO_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _load_demo()


@pytest.fixture(scope="module")
def tour() -> dict[str, dict]:
    return {result["name"]: result for result in demo.tour_of_layers()}


def test_the_tour_counts_trainable_values_as_known(tour) -> None:
    # r (in + out) per 256 -> 192 layer at rank 8, plus 192 magnitudes for DoRA; the frozen
    # layer's in * out + out on top
    lora_values, frozen = 8 * (256 + 192), 256 * 192 + 192
    assert {name: (r["trainable"], r["total"]) for name, r in tour.items()} == {
        "LoRALinear": (lora_values, lora_values + frozen),
        "DoRALinear": (lora_values + 192, lora_values + 192 + frozen),
        "QLoRALinear nf4": (lora_values, lora_values + frozen),
    }


def test_the_float_layers_learn_the_rank_4_shift(tour) -> None:
    # a rank-8 adapter holds the rank-4 shift exactly, so LoRA and DoRA nearly solve the task;
    # QLoRA stops at the NF4 rounding of W0, which a low-rank update does not undo
    for name in ("LoRALinear", "DoRALinear"):
        assert tour[name]["losses"][-1] < 1e-5 * tour[name]["losses"][0], name
    qlora = tour["QLoRALinear nf4"]["losses"]
    assert qlora[-1] < qlora[0] / 5
    # the same batches: LoRA and DoRA start from the same output (B = 0), hence the same loss
    assert tour["LoRALinear"]["losses"][0] == tour["DoRALinear"]["losses"][0]


def test_the_in_place_merge_over_nf4_requantizes_and_to_linear_does_not(tour) -> None:
    result = tour["QLoRALinear nf4"]
    assert result["to_linear"] < demo.MERGE_TOLERANCE < result["merged"]


def test_the_adapter_file_round_trips_exactly() -> None:
    assert demo.save_and_load() == 0.0


@pytest.mark.parametrize(("field", "value", "message"), [
    ("losses", [1.0, 0.5], "loss fell only"),
    ("to_linear", 1e-2, "to_linear"),
    ("merged", 1e-2, "merge"),
])
def test_the_tour_checks_raise_on_what_they_guard(field, value, message) -> None:
    good = dict(name="LoRALinear", losses=[1.0, 1e-3], to_linear=0.0, merged=0.0, requantizes=False)
    demo.check_layer(good)
    with pytest.raises(AssertionError, match=message):
        demo.check_layer({**good, field: value})


def test_the_round_trip_check_catches_a_magnitude_the_load_drops(monkeypatch) -> None:
    # the trained model's magnitudes moved away from ||W0|| (their value at injection), so a load
    # that kept the fresh magnitudes would differ: the demo's exact check would raise
    real_load = pl.load_adapter

    def load_dropping_magnitudes(model, directory, **kwargs):
        loaded = real_load(model, directory, **kwargs)
        with torch.no_grad():
            for module in loaded.modules():
                if isinstance(module, pl.DoRALinear):
                    module.magnitude.copy_(module.base_layer.weight.norm(dim=1))
        return loaded

    monkeypatch.setattr(demo.pl, "load_adapter", load_dropping_magnitudes)
    with pytest.raises(AssertionError, match="differ"):
        demo.save_and_load()
