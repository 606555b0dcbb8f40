"""Adapters over transformers' Conv1D (GPT-2's linear layers, weight stored (in, out)).

The layers are compared with the float64 formulas on the transposed weight; a GPT-2 model with
Hugging Face PEFT's own adapters (which it marks ``fan_in_fan_out``) is the second implementation
for files, merges and counts.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import F64, dora_ref, f64, lora_ref
from torch import nn

import peft_layers as pl

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

LAYERS = [pl.LoRALinear, pl.LoRAPlusLinear, pl.DoRALinear]


def conv1d(fan_in: int, fan_out: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    conv = Conv1D(fan_out, fan_in)  # transformers' order: (nf = out, nx = in)
    with torch.no_grad():
        conv.bias.uniform_(-0.5, 0.5)
    return conv


def adapted(cls, conv: nn.Module, rank: int = 3) -> pl.LoRALinear:
    layer = cls.from_linear(conv, rank=rank, alpha=6.0)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.3)
        if isinstance(layer, pl.DoRALinear):
            layer.magnitude.mul_(0.5 + torch.rand(layer.magnitude.shape, generator=generator))
    return layer


def reference(layer: pl.LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The layer's formula on W0 = conv.weight^T, in float64 (x may require grad)."""
    w0 = f64(layer.base_layer.weight).t()
    a, b, bias = f64(layer.lora_A, True), f64(layer.lora_B, True), f64(layer.bias)
    if isinstance(layer, pl.DoRALinear):
        m = f64(layer.magnitude, True)
        return dora_ref(x, w0, bias, a, b, m, layer.scaling, layer.epsilon), (a, b, m)
    return lora_ref(x, w0, bias, a, b, layer.scaling), (a, b)


@settings(max_examples=20, deadline=None)
@given(
    fan_in=st.integers(2, 12), fan_out=st.integers(2, 12), rows=st.integers(1, 5),
    cls=st.sampled_from(LAYERS),
)
def test_forward_and_gradients_match_the_formula_on_the_transposed_weight(fan_in, fan_out, rows, cls):
    conv = conv1d(fan_in, fan_out)
    layer = adapted(cls, conv, rank=min(2, fan_in, fan_out))
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (fan_in, fan_out)
    assert layer.weight is conv.weight  # wrapped, not copied
    x = torch.randn(rows, fan_in)
    x_ref = f64(x, True)
    expected, ref_params = reference(layer, x_ref)
    x.requires_grad_(True)
    y = layer(x)
    torch.testing.assert_close(y.to(F64), expected, rtol=1e-5, atol=1e-5)
    weights = torch.randn(rows, fan_out)
    (y * weights).sum().backward()
    (expected * weights.to(F64)).sum().backward()
    torch.testing.assert_close(x.grad.to(F64), x_ref.grad, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(layer.adapter_parameters(), ref_params):
        torch.testing.assert_close(ours.grad.to(F64), theirs.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).to(F64), expected.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", LAYERS)
def test_merge_unmerge_and_to_linear(cls):
    conv = conv1d(7, 5)
    w0 = conv.weight.detach().clone()
    layer = adapted(cls, conv)
    x = torch.randn(4, 7)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert tuple(conv.weight.shape) == (7, 5)  # still Conv1D's layout
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(conv.weight, w0, rtol=1e-6, atol=1e-6)
        linear = layer.to_linear()
        assert type(linear) is nn.Linear and tuple(linear.weight.shape) == (5, 7)
        torch.testing.assert_close(linear(x), unmerged, rtol=1e-5, atol=1e-5)


def test_pissa_starts_at_the_base():
    conv = conv1d(8, 6)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = conv(x)
        layer = pl.LoRALinear.from_linear(conv, rank=2, init="pissa")
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert tuple(conv.weight.shape) == (8, 6)


def test_quantized_methods_refuse_a_conv1d():
    model = nn.Sequential(conv1d(8, 6))
    with pytest.raises(TypeError, match=r"'0', a Conv1D; method 'qlora' wraps nn.Linear, bitsandbytes.*only: "
                                        r"give it 'lora', or load the model in 4 or 8 bits with transformers"):
        pl.inject_adapters(model, "0", method="qlora")
    assert type(model[0]).__name__ == "Conv1D"


def test_saved_fan_in_fan_out_is_true_only_when_every_layer_is_a_conv1d(tmp_path):
    """Hugging Face PEFT reads one ``fan_in_fan_out`` for the file (and corrects it per layer
    with a warning): a model mixing Conv1D and nn.Linear targets saves False."""
    for layers, expected in (((conv1d(8, 6), conv1d(6, 4, seed=1)), True), ((conv1d(8, 6), nn.Linear(6, 4)), False)):
        model = pl.inject_adapters(nn.Sequential(*layers), ["0", "1"], rank=2)
        directory = tmp_path / str(expected)
        pl.save_adapter(model, directory)
        assert json.loads((directory / "adapter_config.json").read_text())["fan_in_fan_out"] is expected


# ---- GPT-2, against Hugging Face PEFT ------------------------------------------------------------
def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).eval()


TARGETS = ["c_attn", "c_proj", "c_fc"]
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def test_all_linear_with_a_quantized_method_on_a_float_gpt2_says_why_nothing_matches():
    """Every block layer is a Conv1D, which "qlora" cannot wrap: the error listed only the one
    layer "all-linear" leaves out (``lm_head``), with nothing about Conv1D or what to do."""
    model = gpt2()
    with pytest.raises(ValueError, match=r"quantizes nn.Linear layers only, and this model's layers are transformers Conv1D: give them 'lora'"):
        pl.inject_adapters(model, "all-linear", method="qlora", rank=2)
    assert not any(isinstance(m, pl.LoRALinear) for m in model.modules())


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def hf_gpt2(use_dora: bool):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=use_dora, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fan_in_fan_out is set to False but the target module is Conv1D"
        return peft.get_peft_model(gpt2(), config).eval()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_gpt2_files_round_trip_with_hugging_face_peft(use_dora: bool, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    theirs = hf_gpt2(use_dora)
    theirs.save_pretrained(tmp_path / "theirs")
    assert json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ours = pl.load_adapter(gpt2(), tmp_path / "theirs").eval()
    assert all(layer.fan_in_fan_out for _, layer in pl.model.iter_adapter_layers(ours))
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    pl.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", UserWarning)  # no fan_in_fan_out correction, no missing keys
        back = peft.PeftModel.from_pretrained(gpt2(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back), logits(theirs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_gpt2_merge_and_unload_keeps_conv1d_and_its_checkpoint_layout(use_dora: bool, tmp_path: Path) -> None:
    theirs = hf_gpt2(use_dora)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = pl.load_adapter(gpt2(), tmp_path / "adapter").eval()
    expected = logits(ours)
    merged = pl.merge_and_unload(ours)
    layers = [m for n, m in merged.named_modules() if n.endswith(tuple(TARGETS))]
    assert layers and all(type(m) is Conv1D and not m.weight.requires_grad for m in layers)
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(theirs.merge_and_unload()), expected, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(reloaded), expected, rtol=1e-5, atol=1e-5)
    assert type(pl.unload(pl.load_adapter(gpt2(), tmp_path / "adapter")).transformer.h[0].attn.c_attn) is Conv1D


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_gpt2_merge_and_unload_keeps_what_trains_as_hugging_face_peft(bias: str) -> None:
    # a bias that bias="all" trained, the unfrozen wpe and the head trained in full train on after
    # the merge; every frozen weight stays frozen
    peft = pytest.importorskip("peft")
    ours_bias = {"lora_only": "adapter_only"}.get(bias, bias)
    with pytest.warns(UserWarning, match="tied weights"):  # lm_head shares wte's weight
        ours = pl.inject_adapters(gpt2(), ["c_attn"], bias=ours_bias, rank=4, modules_to_save=["lm_head"])
    ours.transformer.wpe.weight.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(r=4, target_modules=["c_attn"], bias=bias, modules_to_save=["lm_head"])
        theirs = peft.get_peft_model(gpt2(), config)
    theirs.base_model.model.transformer.wpe.weight.requires_grad_(True)

    def trainable(model: nn.Module) -> set[str]:
        return {name for name, p in model.named_parameters() if p.requires_grad}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both: the head's copy unties it from the embedding
        merged_ours, merged_theirs = pl.merge_and_unload(ours), theirs.merge_and_unload()
    assert trainable(merged_ours) == trainable(merged_theirs)
    assert {"transformer.wpe.weight", "lm_head.weight"} <= trainable(merged_ours)
    assert ("transformer.h.0.attn.c_attn.bias" in trainable(merged_ours)) == (bias != "none")


def test_gpt2_training_counts_and_stacking_match_hugging_face_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    ours = pl.inject_adapters(gpt2(), ["c_attn"], method="dora", rank=4, alpha=8.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn"], use_dora=True))
    assert pl.trainable_parameters(ours) == tuple(theirs.get_nb_trainable_parameters())
    # from the same A and B, one SGD step moves both the same way
    for model in (ours, theirs):
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        generator = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        model.eval()
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    # serving: each row of a stacked GPT-2 computes what its adapter loaded alone computes
    hf_gpt2(False).save_pretrained(tmp_path / "lora")
    stacked = pl.stack_adapters(gpt2(), {"l": tmp_path / "lora"})
    with pl.adapter_batch(stacked, ["l", None]):
        rows = logits(stacked)
    torch.testing.assert_close(rows[0], logits(pl.load_adapter(gpt2(), tmp_path / "lora").eval())[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows[1], logits(gpt2())[1], rtol=1e-6, atol=1e-6)


def test_a_4bit_gpt2_merges_back_into_conv1d_layers(tmp_path: Path) -> None:
    """transformers turns GPT-2's Conv1D layers into Linear4bit (recording source_cls=Conv1D):
    merge_and_unload gives Conv1D layers back, whose state dict fits GPT-2 itself."""
    pytest.importorskip("bitsandbytes")
    gpt2().save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = transformers.GPT2LMHeadModel.from_pretrained(
            tmp_path / "base", quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True)
        ).eval()
    pl.inject_adapters(quantized, TARGETS, method="qlora", rank=4)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in pl.model.iter_adapter_layers(quantized):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)
    expected = logits(quantized)
    merged = pl.merge_and_unload(quantized)
    layers = [m for n, m in merged.named_modules() if n.endswith(tuple(TARGETS))]
    assert layers and all(type(m) is Conv1D for m in layers)
    torch.testing.assert_close(logits(merged), expected, rtol=1e-4, atol=1e-4)
    plain = gpt2()
    plain.load_state_dict(merged.state_dict())  # GPT-2's own layout: every shape fits
    torch.testing.assert_close(logits(plain), expected, rtol=1e-4, atol=1e-4)


def test_a_float_conv1d_in_a_4bit_gpt2_gets_lora_under_qlora(tmp_path: Path) -> None:
    """transformers leaves ``llm_int8_skip_modules`` float (Conv1D, for GPT-2): "all-linear"
    with "qlora" gives them float LoRA over the Conv1D, the classes Hugging Face PEFT picks."""
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    gpt2().save_pretrained(tmp_path / "base")
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["c_proj", "lm_head"])

    def quantized() -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base", quantization_config=quantization)

    ours = pl.inject_adapters(quantized(), "all-linear", method="qlora", rank=4)
    kinds = {name: type(layer) for name, layer in pl.model.iter_adapter_layers(ours)}
    assert {k.rpartition(".")[2]: v for k, v in kinds.items()} == {
        "c_attn": pl.QLoRALinear, "c_proj": pl.LoRALinear, "c_fc": pl.QLoRALinear,
    }
    assert all(type(ours.get_submodule(n).base_layer) is Conv1D for n, v in kinds.items() if v is pl.LoRALinear)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(quantized(), peft.LoraConfig(r=4, target_modules="all-linear"))
    theirs_kinds = {
        n.removeprefix("base_model.model."): "bnb" in type(m).__module__
        for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert theirs_kinds == {n: v is pl.QLoRALinear for n, v in kinds.items()}
    # their file, loaded with method="qlora" named: the float Conv1D still gets LoRA
    theirs.save_pretrained(tmp_path / "theirs")
    named = pl.load_adapter(quantized(), tmp_path / "theirs", method="qlora")
    assert {n: type(l) for n, l in pl.model.iter_adapter_layers(named)} == kinds


def test_loading_as_qlora_onto_conv1d_names_the_fix(tmp_path: Path) -> None:
    hf_gpt2(False).save_pretrained(tmp_path)
    model = gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'transformer.h.0.attn.c_attn' is a transformers Conv1D, which method 'qlora' cannot quantize; load with method='lora'"):
        pl.load_adapter(model, tmp_path, method="qlora")
    assert not list(pl.model.iter_adapter_layers(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_merge_and_unload_keeps_a_conv1d_bias():
    """GPT-2 initialises its Conv1D biases to zero, so its tests would not see a lost bias."""
    model = nn.Sequential(conv1d(8, 6))
    bias = model[0].bias.detach().clone()
    pl.inject_adapters(model, ["0"], rank=2)
    with torch.no_grad():
        model[0].lora_B.normal_()
        x = torch.randn(3, 8)
        expected = model(x)
        pl.merge_and_unload(model)
        assert type(model[0]) is Conv1D and torch.equal(model[0].bias, bias)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
