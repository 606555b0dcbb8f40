"""The public surface: every name a module's ``__all__`` exports exists, carries a docstring and
is listed in docs/api.md, and the defaults and constants the docs state are the code's, so the
reference page and the code cannot drift apart silently."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import peft_layers as pl
import peft_layers.io as pio
import peft_layers.model as plm
import peft_layers.quant as plq
from peft_layers.lora import LORA_INITS
from peft_layers.optim import DEFAULT_LR_RATIO
from peft_layers.quant import QuantizedLinear
from peft_layers.quant.linear import COMPUTE_DTYPES, DECODE_BLOCK_BYTES

API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"

PUBLIC_MODULES = (
    "peft_layers",
    "peft_layers.adapter",
    "peft_layers.lora",
    "peft_layers.dora",
    "peft_layers.qlora",
    "peft_layers.model",
    "peft_layers.modules_to_save",
    "peft_layers.optim",
    "peft_layers.compose",
    "peft_layers.serving",
    "peft_layers.io",
    "peft_layers.quant",
    "peft_layers.quant.linear",
    "peft_layers.quant.reference",
)


def _exports() -> list[tuple[str, str]]:
    pairs = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        pairs += [(module_name, name) for name in module.__all__]
    return pairs


def _code_spans(markdown: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", markdown)


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_module_declares_its_public_names(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert isinstance(getattr(module, "__all__", None), list), f"{module_name} has no __all__ list"
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{module_name}.__all__ names what the module lacks: {missing}"
    assert len(set(module.__all__)) == len(module.__all__), f"{module_name}.__all__ repeats a name"


@pytest.mark.parametrize(("module_name", "name"), _exports())
def test_every_public_name_is_in_the_api_page(module_name: str, name: str) -> None:
    word = re.compile(rf"(?<![\w]){re.escape(name)}(?![\w])")
    assert any(word.search(span) for span in _code_spans(API_PAGE.read_text())), (
        f"{module_name}.{name} is exported but docs/api.md does not list it"
    )


@pytest.mark.parametrize(("module_name", "name"), _exports())
def test_every_public_function_and_class_has_a_docstring(module_name: str, name: str) -> None:
    value = getattr(importlib.import_module(module_name), name)
    if inspect.isfunction(value) or inspect.isclass(value) or inspect.ismodule(value):
        assert inspect.getdoc(value), f"{module_name}.{name} has no docstring"


def test_the_word_match_is_strict() -> None:
    # "unload" inside "merge_and_unload" does not count as listing unload
    spans = _code_spans("`pl.merge_and_unload(model)`")
    word = re.compile(r"(?<![\w])unload(?![\w])")
    assert not any(word.search(span) for span in spans)
    assert any(word.search(span) for span in _code_spans("`pl.unload(model)`"))


def test_layer_defaults_are_the_documented_ones() -> None:
    """docs/layers.md and docs/api.md ("ours are rank=8, alpha=16.0 (scaling 2)"): rank 8, alpha
    16, scaling 2, no rsLoRA, dropout 0, kaiming init (B = 0); LoRA+'s ratio 16, DoRA's epsilon
    1e-8; ``inject_adapters`` defaults to LoRA with no bias trained. ``from_linear`` takes
    ``**kwargs``, so no signature shows these defaults."""
    for layer in (pl.LoRALinear(16, 16), pl.LoRALinear.from_linear(nn.Linear(16, 16))):
        assert (layer.rank, layer.alpha, layer.scaling) == (8, 16.0, 2.0)
        assert (layer.dropout, layer.use_rslora, layer.init) == (0.0, False, "kaiming")
        assert torch.count_nonzero(layer.lora_B) == 0
    assert pl.LoRAPlusLinear.from_linear(nn.Linear(16, 16)).lr_ratio == 16.0
    assert pl.DoRALinear.from_linear(nn.Linear(16, 16)).epsilon == 1e-8
    assert pl.QDoRALinear.from_linear(nn.Linear(64, 16)).epsilon == 1e-8
    model = pl.inject_adapters(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)), "0")
    assert type(model[0]) is pl.LoRALinear and model[0].scaling == 2.0
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == ["0.lora_A", "0.lora_B"]


def test_quantization_defaults_are_the_documented_ones() -> None:
    """docs/api.md and docs/quantization.md: NF4, blocks of 64, double quantization, float32
    compute, for ``QuantizedLinear`` and the QLoRA layers (a bf16 ``nn.Linear`` too); int8 has no
    blocks and no double quantization, whatever it is given."""
    linear = nn.Linear(128, 32)
    for q in (
        QuantizedLinear.from_linear(linear),
        QuantizedLinear(128, 32),
        pl.QLoRALinear.from_linear(linear).base_layer,
        pl.QLoRALinear.from_linear(nn.Linear(128, 32).to(torch.bfloat16)).base_layer,
        pl.QLoRALinear(128, 32).base_layer,
    ):
        assert (q.scheme, q.blocksize, q.double_quant, q.compute_dtype) == ("nf4", 64, True, torch.float32)
        assert q.int8_activations is False
    int8 = QuantizedLinear.from_linear(linear, "int8", blocksize=128, double_quant=True)
    assert (int8.blocksize, int8.double_quant) == (None, False)


def test_the_constants_are_the_documented_ones() -> None:
    """The values docs/api.md (and docs/quantization.md, for the blocks) gives these constants."""
    assert plm.METHODS == ("lora", "lora_plus", "dora", "qlora", "qdora")
    assert plm.BIAS_MODES == ("none", "all", "adapter_only")
    assert plm.ALL_LINEAR == "all-linear"
    assert plm.FLOAT_METHOD == {"qlora": "lora", "qdora": "dora"}
    assert plm.QUANTIZED_METHOD == {"lora": "qlora", "lora_plus": "qlora", "dora": "qdora"}
    assert (pio.WEIGHTS_NAME, pio.WEIGHTS_BIN_NAME, pio.CONFIG_NAME) == (
        "adapter_model.safetensors", "adapter_model.bin", "adapter_config.json")
    assert (pio.KEY_PREFIX, pio.DEFAULT_ADAPTER, pio.METADATA_KEY, pio.FORMAT_VERSION) == (
        "base_model.model.", "default", "peft_layers", 2)
    assert plq.QUANT_SCHEMES == ("nf4", "fp4", "int8")
    assert plq.BLOCKSIZES == (32, 64, 128, 256, 512, 1024, 2048, 4096)
    assert plq.DOUBLE_QUANT_BLOCKSIZE == 256
    assert LORA_INITS == ("kaiming", "gaussian", "pissa") and DEFAULT_LR_RATIO == 16.0
    assert set(COMPUTE_DTYPES) == {torch.float32, torch.bfloat16, torch.float16, torch.float64}
    assert DECODE_BLOCK_BYTES == 8 * 2**20  # quantization.md: "8 MiB in the compute dtype"
