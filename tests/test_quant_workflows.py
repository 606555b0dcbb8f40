"""Quantized workflows a QLoRA user runs, checked against a second implementation (Hugging Face
PEFT over the same bitsandbytes layers) or against the very model the state came from: int8
(``Linear8bitLt``) bases, a model of QLoRA/QDoRA layers built on the meta device and filled from
a state dict, and several QLoRA files served per row over one 4-bit base."""

from __future__ import annotations

import contextlib

import pytest
import torch
from models import bnb_linear4bit, bnb_linear8bit
from torch import nn

import peft_layers as pl
from peft_layers.quant import QuantizedLinear

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")


def _steps(model: nn.Module, steps: int = 8) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    target = torch.randn(64, 16, generator=generator) / 8
    x = torch.randn(24, 64, generator=generator)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), x @ target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _int8_model(base: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(*(bnb_linear8bit(m) if isinstance(m, nn.Linear) else m for m in base))


@pytest.mark.parametrize("method", ["qlora", "qdora"])
def test_int8_bases_train_and_load_as_hugging_face_peft(method: str, tmp_path) -> None:
    """Over the same bitsandbytes ``Linear8bitLt`` layers (transformers' ``load_in_8bit``),
    QLoRA follows Hugging Face PEFT's trajectory, and the trained file (QLoRA and QDoRA) drives
    their int8 model to our outputs. (Their QDoRA cannot train over int8 in bitsandbytes 0.50:
    its norm computation clears the module's ``SCB``, so only the file is compared there.)"""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 16))
    ours = pl.inject_adapters(_int8_model(base), ["0", "2"], method=method, rank=4, alpha=8.0)
    if method == "qlora":
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"])
        theirs = peft.get_peft_model(_int8_model(base), config)
        with torch.no_grad():
            for name in ("0", "2"):
                theirs.base_model.model.get_submodule(name).lora_A["default"].weight.copy_(ours.get_submodule(name).lora_A)
        ours_losses, theirs_losses = _steps(ours), _steps(theirs)
        assert ours_losses[-1] < 0.8 * ours_losses[0]
        torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(theirs_losses), rtol=1e-4, atol=1e-7)
    else:
        _steps(ours)
    loaded = peft.PeftModel.from_pretrained(_int8_model(base), pl.save_adapter(ours, tmp_path / "ours")).train()
    x = torch.randn(8, 64)
    with torch.no_grad():
        expected = ours(x)
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)
        # and the file Hugging Face PEFT writes back loads here, over a fresh int8 model
        loaded.save_pretrained(tmp_path / "theirs")
        back = pl.load_adapter(_int8_model(base), tmp_path / "theirs")
        assert isinstance(back.get_submodule("0"), pl.QDoRALinear if method == "qdora" else pl.QLoRALinear)
        torch.testing.assert_close(back(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [pl.QLoRALinear, pl.QDoRALinear])
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_adapter_layers_over_meta_bases_load_a_full_state_dict(cls: type, scheme: str) -> None:
    """A model of QLoRA/QDoRA layers built over meta ``QuantizedLinear`` bases (no memory), then
    ``to_empty`` and ``load_state_dict`` of a trained model's full state (codes, statistics,
    adapters), computes what that model computes, bit for bit, in forward and in the adapters'
    gradients; and so does ``load_state_dict(..., assign=True)`` straight onto the meta model."""
    torch.manual_seed(0)

    def build(device: str) -> nn.Sequential:
        if device == "meta":
            bases = [QuantizedLinear(64, 48, scheme=scheme, device="meta"), QuantizedLinear(48, 16, scheme=scheme, device="meta")]
        else:
            bases = [QuantizedLinear.from_linear(nn.Linear(64, 48), scheme=scheme),
                     QuantizedLinear.from_linear(nn.Linear(48, 16), scheme=scheme)]
        with pytest.warns(UserWarning, match="meta device") if device == "meta" else contextlib.nullcontext():
            layers = [cls.from_linear(b, rank=4, alpha=8.0) for b in bases]
        return nn.Sequential(layers[0], nn.Tanh(), layers[1])

    source = build("cpu")
    with torch.no_grad():
        for layer in (source[0], source[2]):
            layer.lora_B.normal_(0, 0.1)
            if hasattr(layer, "magnitude"):
                layer.magnitude.mul_(1.2)
    x = torch.randn(6, 64)
    expected = source(x)
    expected.pow(2).sum().backward()
    grads = [p.grad for p in source.parameters() if p.requires_grad]
    state = source.state_dict()
    for assign in (False, True):
        model = build("meta")
        if not assign:
            model.to_empty(device="cpu")
        model.load_state_dict(state, assign=assign)
        out = model(x)
        assert torch.equal(out, expected)
        out.pow(2).sum().backward()
        mine = [p.grad for p in model.parameters() if p.requires_grad]
        assert len(mine) == len(grads) and all(torch.equal(a, b) for a, b in zip(mine, grads))


def test_qlora_files_served_per_row_over_a_4bit_base_equal_hugging_face_peft(tmp_path) -> None:
    """Two QLoRA files (different ranks, targets and rsLoRA) stacked over one bitsandbytes NF4
    model: each row of an ``adapter_batch`` gets what Hugging Face PEFT gives with that adapter
    set over its own NF4 model (train mode without dropout: an eval forward would repack their
    weight on AVX512-BF16 CPUs), and a row without an adapter gets the base model."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 16))

    def four_bit() -> nn.Sequential:
        return nn.Sequential(*(bnb_linear4bit(m) if isinstance(m, nn.Linear) else m for m in base))

    files = {}
    for name, (r, targets, rslora) in {"a": (4, ["0", "2"], False), "b": (2, ["2"], True)}.items():
        model = peft.get_peft_model(four_bit(), peft.LoraConfig(r=r, lora_alpha=3 * r, target_modules=targets,
                                                                 use_rslora=rslora))
        with torch.no_grad():
            for key, p in model.named_parameters():
                if "lora_B" in key:
                    p.normal_(0, 0.3)
        model.save_pretrained(tmp_path / name)
        files[name] = tmp_path / name
    theirs = peft.PeftModel.from_pretrained(four_bit(), files["a"], adapter_name="a")
    theirs.load_adapter(files["b"], adapter_name="b")
    theirs.train()
    ours = pl.stack_adapters(four_bit(), files)
    x = torch.randn(3, 64)
    names = ["b", None, "a"]
    with torch.no_grad():
        with pl.adapter_batch(ours, names):
            out = ours(x)
        for row, name in enumerate(names):
            if name is None:
                with theirs.disable_adapter():
                    expected = theirs(x[row:row + 1])
            else:
                theirs.set_adapter(name)
                expected = theirs(x[row:row + 1])
            torch.testing.assert_close(out[row:row + 1], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[0], out[2], atol=1e-2)  # the adapters really differ


def test_inject_gives_a_bnb_layer_naming_no_dtype_the_models_dtype() -> None:
    """A bias-less ``Linear8bitLt`` names no compute dtype: ``inject_adapters`` gives it the dtype
    of most of the model's float parameters (bfloat16 here, from the embedding); a biased one keeps
    its bias's dtype, and a model with no float parameter falls back to float32. The bfloat16
    layer's output matches float64 on the decoded weight to bfloat16's precision."""
    torch.manual_seed(3)
    bias_less = bnb_linear8bit(nn.Linear(64, 32, bias=False))
    biased = bnb_linear8bit(nn.Linear(32, 16).half())
    model = nn.Sequential(nn.Embedding(10, 64).to(torch.bfloat16), bias_less, biased)
    pl.inject_adapters(model, ["1", "2"], method="qlora", rank=4)
    assert (model[1].compute_dtype, model[2].compute_dtype) == (torch.bfloat16, torch.float16)
    x = torch.randn(3, 64).to(torch.bfloat16)
    with torch.no_grad():
        out = model[1](x)
    reference = x.double() @ model[1].base_layer.dequantize(torch.float64).T
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference, rtol=2e-2, atol=2e-2)
    alone = pl.inject_adapters(nn.Sequential(bnb_linear8bit(nn.Linear(64, 32, bias=False))), ["0"], method="qlora")
    assert alone[0].compute_dtype == torch.float32
