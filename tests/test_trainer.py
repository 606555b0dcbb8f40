"""transformers' Trainer over a model with our adapters, against the same Trainer over Hugging
Face PEFT's (the second implementation), and the documented recipe for 4-bit models
(docs/model.md, "With transformers' Trainer")."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import peft_layers as pl

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(1))


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config)


def train(model: nn.Module, output_dir: Path, steps: int = 3) -> None:
    args = transformers.TrainingArguments(
        str(output_dir), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", seed=0,
    )
    dataset = [{"input_ids": row, "labels": row} for row in IDS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.Trainer(model=model, args=args, train_dataset=dataset).train()


def set_adapters(model: nn.Module) -> None:
    """The same non-zero A and B in both libraries (their parameters come in the same order)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def adapter_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for n, p in model.named_parameters() if "lora_" in n or "magnitude" in n]


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_trainer_trains_our_adapters_as_it_trains_hugging_face_peft(method: str, tmp_path: Path) -> None:
    ours = pl.inject_adapters(tiny_llama(), ["q_proj", "v_proj"], method=method, rank=4, alpha=8.0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=method == "dora")
    theirs = peft.get_peft_model(tiny_llama(), config)
    frozen = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    for model in (ours, theirs):
        set_adapters(model)
    start = adapter_tensors(ours)
    train(ours, tmp_path / "ours")
    train(theirs, tmp_path / "theirs")
    for a, b, before in zip(adapter_tensors(ours), adapter_tensors(theirs), start):
        assert not torch.equal(a, before)  # trained
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(p, frozen[n]) for n, p in ours.named_parameters() if n in frozen)


def test_trainer_recipe_for_a_4bit_model(tmp_path: Path) -> None:
    """Trainer refuses a transformers 4-bit model that is not a PeftModel; the documented recipe
    marks the model for Trainer's constructor only. The adapters then train, the codes stay."""
    pytest.importorskip("bitsandbytes")
    tiny_llama().save_pretrained(tmp_path / "base")
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=quantization, device_map="cpu", dtype=torch.float32
        )
    pl.prepare_for_kbit_training(model)
    pl.inject_adapters(model, ["q_proj", "v_proj"], method="qlora", rank=4)
    set_adapters(model)
    codes = model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    start = adapter_tensors(model)
    args = transformers.TrainingArguments(str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, save_strategy="no")
    dataset = [{"input_ids": row, "labels": row} for row in IDS]
    with pytest.raises(ValueError, match="purely quantized models"):
        transformers.Trainer(model=model, args=args, train_dataset=dataset)
    # the recipe (docs/model.md)
    model._hf_peft_config_loaded = True
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    del model._hf_peft_config_loaded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert all(not torch.equal(a, b) for a, b in zip(adapter_tensors(model), start))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, codes)
    pl.save_adapter(model, tmp_path / "adapter")
    fresh = pl.load_adapter(tiny_llama(), tmp_path / "adapter", method="qlora")
    for a, b in zip(adapter_tensors(fresh), adapter_tensors(model)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_merging_a_4bit_model_warns_that_its_checkpoint_would_not_load(tmp_path: Path) -> None:
    """merge_and_unload never requantizes: in a model transformers loaded in 4 bits, the merged
    layers become float among quantized ones, under a config that still says quantized, which
    save_pretrained writes but from_pretrained cannot use; it warns and names the float route.
    The merged model itself computes what the adapter layers computed."""
    pytest.importorskip("bitsandbytes")
    tiny_llama().save_pretrained(tmp_path / "base")
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=quantization, device_map="cpu", dtype=torch.float32
        )
    model.train()  # bitsandbytes' CPU eval forward repacks 4-bit weights, which fails on these tiny shapes
    pl.inject_adapters(model, ["q_proj"], method="qlora", rank=4)
    set_adapters(model)
    with torch.no_grad():
        expected = model(IDS[:2]).logits
    with pytest.warns(UserWarning, match=r"merge_and_unload\(\): 1 merged layer\(s\) are float now, inside a model that transformers loaded quantized"):
        pl.merge_and_unload(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS[:2]).logits, expected, rtol=1e-4, atol=1e-4)
    plain = pl.inject_adapters(tiny_llama(), ["q_proj"], method="qlora", rank=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # quantized by us, no transformers quantization config: no warning
        pl.merge_and_unload(plain)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_model_merged_in_full_saves_and_loads_as_a_float_model(bits: int, tmp_path: Path) -> None:
    """Every quantized layer of a model transformers loaded in 4 or 8 bits merged back to float:
    nothing quantized is left, so the model forgets its quantization (config, quantizer, flags),
    without a warning, and ``save_pretrained`` writes a float checkpoint that ``from_pretrained``
    loads with the merged model's logits. With the quantization kept, the reload built
    bitsandbytes layers over the float weights and its forward failed."""
    pytest.importorskip("bitsandbytes")
    tiny_llama().save_pretrained(tmp_path / "base")
    quantization = (transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
                    if bits == 4 else transformers.BitsAndBytesConfig(load_in_8bit=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=quantization, device_map="cpu", dtype=torch.float32
        )
    model.train()  # bitsandbytes' CPU eval forward repacks 4-bit weights, which fails on these tiny shapes
    pl.inject_adapters(model, "all-linear", method="qlora", rank=4)
    set_adapters(model)
    with torch.no_grad():
        expected = model(IDS[:2]).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pl.merge_and_unload(model)
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, f"is_loaded_in_{bits}bit", False)
    model.save_pretrained(tmp_path / "merged")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").train()
    assert all(type(m) is nn.Linear for m in reloaded.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS[:2]).logits, expected, rtol=1e-4, atol=1e-4)


def test_a_bias_less_8bit_model_computes_in_the_dtype_it_was_loaded_in(tmp_path: Path) -> None:
    """Llama's ``Linear8bitLt`` layers name no compute dtype and have no bias to take one from:
    the QLoRA layers compute in the dtype the model was loaded in (bfloat16 here; float32 after
    ``prepare_for_kbit_training``), as a biased model's do through their bias, and as
    bitsandbytes computes in its bfloat16 inputs' dtype. Before, they fell back to float32. An
    explicit ``compute_dtype`` wins, and ``load_adapter`` rebuilds the layers the same way. The
    output matches float64 on the decoded weight, to bfloat16's precision."""
    pytest.importorskip("bitsandbytes")
    tiny_llama().save_pretrained(tmp_path / "base")

    def load() -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return transformers.LlamaForCausalLM.from_pretrained(
                tmp_path / "base", quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True),
                device_map="cpu", dtype=torch.bfloat16,
            )

    def compute_dtypes(model: nn.Module) -> set[torch.dtype]:
        return {m.compute_dtype for m in model.modules() if isinstance(m, pl.LoRALinear)}

    model = pl.inject_adapters(load(), "all-linear", method="qlora", rank=4)
    assert compute_dtypes(model) == {torch.bfloat16}
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    F64 = torch.float64
    update = layer.scaling * (x.to(F64) @ layer.lora_A.to(F64).T) @ layer.lora_B.to(F64).T
    reference = x.to(F64) @ layer.base_layer.dequantize(F64).T + update
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.to(F64), reference, rtol=2e-2, atol=2e-2)
    pl.save_adapter(model, tmp_path / "adapter")
    assert compute_dtypes(pl.load_adapter(load(), tmp_path / "adapter")) == {torch.bfloat16}

    assert compute_dtypes(pl.inject_adapters(load(), "all-linear", method="qlora", compute_dtype=torch.float16)) == {
        torch.float16
    }
    prepared = pl.inject_adapters(pl.prepare_for_kbit_training(load()), "all-linear", method="qdora", rank=4)
    assert compute_dtypes(prepared) == {torch.float32}
