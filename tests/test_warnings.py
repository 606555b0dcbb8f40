"""Every warning of the library names the user's line: the file and line of the call that led to
it, whether that call is a layer's method, a model tool, or ``model(x)`` running the layer's
forward under ``nn.Module.__call__``. A fixed ``stacklevel`` named a line inside the library."""

from __future__ import annotations

import inspect
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import peft_layers as pl
from peft_layers._warnings import warn
from peft_layers.quant import QuantizedLinear

from models import bnb_linear4bit


def _merged_training_forward_of_a_layer() -> None:
    layer = pl.LoRALinear.from_linear(nn.Linear(8, 8), rank=2)
    layer.merge()
    layer(torch.randn(2, 8))


def _merged_training_forward_of_a_model() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    pl.inject_adapters(model, ["0"], method="lora", rank=2)
    pl.merge_adapters(model)
    model(torch.randn(2, 8))


def _load_into_a_merged_layer() -> None:
    layer = pl.LoRALinear.from_linear(nn.Linear(8, 8), rank=2)
    layer.merge()
    state = {key: value + 1 for key, value in layer.state_dict().items()}
    layer.load_state_dict(state)


def _merge_of_a_quantized_layer() -> None:
    pl.QLoRALinear.from_linear(nn.Linear(64, 64), rank=2, quant="nf4").merge()


def _merge_adapters_over_quantized_layers() -> None:
    model = nn.Sequential(nn.Linear(64, 64))
    pl.inject_adapters(model, ["0"], method="qlora", rank=2)
    pl.merge_adapters(model)


def _merge_and_unload_of_a_model_loaded_quantized() -> None:
    from models import bnb_linear4bit

    # as transformers loads it in 4 bits; "1" stays quantized (merged in full, nothing would warn)
    model = nn.Sequential(bnb_linear4bit(nn.Linear(64, 64)), bnb_linear4bit(nn.Linear(64, 64)))
    model.config = types.SimpleNamespace(quantization_config={"load_in_4bit": True})
    pl.inject_adapters(model, ["0"], method="qlora", rank=2)
    pl.merge_and_unload(model)


def _injection_on_the_meta_device() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8))
    pl.inject_adapters(model, ["0"], method="lora", rank=2)


def _layer_on_the_meta_device() -> None:
    pl.DoRALinear.from_linear(nn.Linear(8, 8, device="meta"), rank=2)


def _pissa_over_a_quantized_base() -> None:
    base = QuantizedLinear.from_linear(nn.Linear(64, 64), scheme="nf4")
    pl.QLoRALinear.from_linear(base, rank=2, init="pissa")


class _TiedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embedding.weight


def _tied_target() -> None:
    pl.inject_adapters(_TiedHead(), ["head"], method="lora", rank=2)


def _tied_module_to_save() -> None:
    model = nn.Sequential(_TiedHead(), nn.Linear(8, 8))
    pl.inject_adapters(model, ["1"], method="lora", rank=2, modules_to_save=["0.head"])


def _dora_forward_over_a_hooked_base() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    model[0].register_forward_hook(lambda *args: None)
    pl.inject_adapters(model, ["0"], method="dora", rank=2)
    model(torch.randn(2, 8))


def _from_bnb_of_a_hooked_module() -> None:
    module = bnb_linear4bit(nn.Linear(64, 64))
    module.register_forward_hook(lambda *args: None)
    QuantizedLinear.from_bnb(module)


def _save_of_a_shared_module(directory: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    model.alias = model[0]
    pl.inject_adapters(model, ["0"], method="lora", rank=2)
    pl.save_adapter(model, directory)


class _SuffixNames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.pre_classifier = nn.Linear(8, 8)
        self.classifier = nn.Linear(8, 2)


def _save_of_modules_to_save_that_peft_would_widen(directory: Path) -> None:
    model = _SuffixNames()
    pl.inject_adapters(model, ["body"], method="lora", rank=2, modules_to_save=["classifier"])
    pl.save_adapter(model, directory)


def _merged_training_forward_inside_a_transformers_model() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config)
    pl.inject_adapters(model, ["q_proj"], rank=2)
    pl.merge_adapters(model)
    model.train()
    model(torch.randint(0, 32, (1, 4)))  # the frames between are transformers' and torch's


SCENARIOS: list[Callable[..., None]] = [
    _merged_training_forward_of_a_layer,
    _merged_training_forward_of_a_model,
    _merged_training_forward_inside_a_transformers_model,
    _load_into_a_merged_layer,
    _merge_of_a_quantized_layer,
    _merge_adapters_over_quantized_layers,
    _merge_and_unload_of_a_model_loaded_quantized,
    _injection_on_the_meta_device,
    _layer_on_the_meta_device,
    _pissa_over_a_quantized_base,
    _tied_target,
    _tied_module_to_save,
    _dora_forward_over_a_hooked_base,
    _from_bnb_of_a_hooked_module,
    _save_of_a_shared_module,
    _save_of_modules_to_save_that_peft_would_widen,
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda scenario: scenario.__name__.strip("_"))
def test_a_warning_names_the_line_of_user_code_that_led_to_it(scenario: Callable[..., None], tmp_path: Path) -> None:
    arguments = (tmp_path,) if inspect.signature(scenario).parameters else ()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        scenario(*arguments)
    package = str(Path(pl.__file__).parent)
    ours = [w for w in record if w.category is UserWarning and not w.filename.startswith(package)]
    library = [(w.filename, w.lineno, str(w.message)[:80]) for w in record if w.filename.startswith(package)]
    assert ours and not library
    lines, first = inspect.getsourcelines(scenario)
    for w in ours:
        assert w.filename == __file__
        assert first < w.lineno < first + len(lines), (w.lineno, str(w.message)[:80])


def test_warn_called_from_user_code_names_that_line() -> None:
    with pytest.warns(UserWarning, match="^direct$") as record:
        warn("direct")
    assert record[0].filename == __file__
    assert record[0].lineno == inspect.currentframe().f_lineno - 2
