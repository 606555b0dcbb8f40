"""Parity with Hugging Face PEFT (a second implementation of the same math): the same start, the
same data and the same optimizer give the same training trajectory: LoRA, rsLoRA and DoRA, and
QLoRA and QDoRA over the same bitsandbytes NF4 layers."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import peft_layers as pl
from models import bnb_linear4bit

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


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_llama_trained_under_autocast_round_trips_through_hugging_face_peft(method: str, tmp_path) -> None:
    # the whole path on a real architecture: inject into a (tiny, randomly initialised) Llama,
    # train a few bf16-autocast steps, save; Hugging Face PEFT and our loader rebuild the same model
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    base = transformers.LlamaForCausalLM(config).eval()
    model = pl.inject_adapters(copy.deepcopy(base), ["q_proj", "v_proj", "down_proj"], method=method,
                               rank=4, alpha=8.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    losses = []
    model.train()
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the adapters train
    model.eval()
    pl.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    reloaded = pl.load_adapter(copy.deepcopy(base), tmp_path).eval()
    merged = pl.merge_and_unload(copy.deepcopy(model))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert (logits - base(input_ids=ids).logits).abs().max() > 1e-2  # the adapter changed the model
        torch.testing.assert_close(theirs(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, rtol=0, atol=0)
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)


def _four_bit_model(base: nn.Sequential) -> nn.Sequential:
    """``base`` with its Linears as bitsandbytes NF4 ``Linear4bit`` (the same bits on every call)."""
    return nn.Sequential(*(bnb_linear4bit(m) if isinstance(m, nn.Linear) else m for m in base))


@pytest.mark.parametrize("method", ["qlora", "qdora"])
def test_quantized_training_trajectory_equals_hugging_face_peft(method: str, tmp_path) -> None:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    # in_features multiples of the block size: bitsandbytes 0.50's CPU decode misreads blocks that
    # span two rows (docs/quantization.md), which ours works around and theirs does not
    base = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 32))
    target = nn.Linear(64, 32)
    # ours wraps the Linear4bit layers without requantizing; theirs runs bitsandbytes' matmul_4bit
    ours = pl.inject_adapters(_four_bit_model(base), ["0", "2"], method=method, rank=4, alpha=8.0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], use_dora=method == "qdora")
    theirs = peft.get_peft_model(_four_bit_model(base), config)
    with torch.no_grad():
        for name in ("0", "2"):
            mine, other = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
            weight = other.base_layer.weight
            their_w0 = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
            torch.testing.assert_close(mine.base_layer.dequantize(), their_w0, rtol=0, atol=0)
            other.lora_A["default"].weight.copy_(mine.lora_A)
            if method == "qdora":  # same start: their magnitude is ||dq(W0)|| per row, as ours
                torch.testing.assert_close(other.lora_magnitude_vector["default"].weight, mine.magnitude)
    ours_losses = trajectory(ours, 20, target)
    theirs_losses = trajectory(theirs, 20, target)
    assert ours_losses[-1] < 0.7 * ours_losses[0]
    torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(theirs_losses), rtol=1e-4, atol=1e-7)
    # the trained adapter's files drive Hugging Face PEFT's 4-bit model to our outputs (kept in
    # train mode, without dropout: an eval-mode forward would repack bitsandbytes' weight)
    loaded = peft.PeftModel.from_pretrained(_four_bit_model(base), pl.save_adapter(ours, tmp_path / method)).train()
    x = torch.randn(16, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ours(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_dora", [False, True])
def test_hugging_face_file_over_a_four_bit_model_loads_as_qlora(use_dora: bool, tmp_path) -> None:
    """A Hugging Face file says nothing of quantization: loaded into a model whose targets are
    bitsandbytes layers, it becomes QLoRA/QDoRA there, and gives Hugging Face PEFT's outputs."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 32))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], use_dora=use_dora, init_lora_weights=False)
    theirs = peft.get_peft_model(_four_bit_model(base), config).train()  # train: no CPU repack
    theirs.save_pretrained(tmp_path)
    ours = pl.load_adapter(_four_bit_model(base), tmp_path).train()
    assert {type(layer) for _, layer in pl.model.iter_adapter_layers(ours)} == {pl.QDoRALinear if use_dora else pl.QLoRALinear}
    x = torch.randn(16, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    method = "dora" if use_dora else "lora"
    with pytest.raises(ValueError, match=rf"'0' is a quantized Linear4bit, which method '{method}' cannot wrap; load with method='qlora'"):
        pl.load_adapter(_four_bit_model(base), tmp_path, method=method)


@pytest.mark.parametrize("use_dora", [False, True])
def test_a_file_with_a_rank_above_a_layers_features_loads_both_ways(use_dora: bool, tmp_path) -> None:
    """Hugging Face PEFT builds and saves r = 8 on a 2-output head (``target_modules="all-linear"``
    on a classifier): such a file loads here too, computes what PeftModel computes, and saves
    back to a file PeftModel reads. Built directly, a layer keeps the rank bound."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 2))
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0", "2"], use_dora=use_dora)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                parameter.normal_()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = pl.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert ours[2].rank == 8 and isinstance(ours[2], pl.DoRALinear) == use_dora
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    pl.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(back(x), theirs(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"module '2': rank: expected an int in \[1, min\(in_features, out_features\)\] = \[1, 2\], got 8"):
        pl.inject_adapters(copy.deepcopy(base), ["2"], rank=8)


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_on_a_4bit_t5_with_its_float_wo_loads_and_saves_both_ways(use_dora: bool, tmp_path) -> None:
    """transformers loads T5 in 4 bits but keeps ``wo`` float (``_keep_in_fp32_modules``), and
    Hugging Face PEFT gives ``q`` a QLoRA layer and ``wo`` a float one. Its file loads here the
    same way (QLoRA on the 4-bit layers, LoRA on ``wo``), computes what PeftModel computes, and
    saves back as one file that PeftModel reads and our loader rebuilds."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=1,
                                   num_decoder_layers=1, num_heads=4, dropout_rate=0.0,
                                   decoder_start_token_id=0, pad_token_id=0)
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path / "base")
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)

    def t5() -> nn.Module:  # train mode: bitsandbytes' CPU eval forward takes another path
        return transformers.T5ForConditionalGeneration.from_pretrained(
            tmp_path / "base", quantization_config=quantization
        ).train()

    adapter = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "wo"], use_dora=use_dora,
                              init_lora_weights=False)
    theirs = peft.get_peft_model(t5(), adapter).train()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = pl.load_adapter(t5(), tmp_path / "theirs")
    quantized, plain = (pl.QDoRALinear, pl.DoRALinear) if use_dora else (pl.QLoRALinear, pl.LoRALinear)
    kinds = {name.rpartition(".")[2]: type(layer) for name, layer in pl.model.iter_adapter_layers(ours)}
    assert kinds == {"q": quantized, "wo": plain}
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))

    def logits(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits

    expected = logits(theirs)
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)
    pl.save_adapter(ours, tmp_path / "ours")
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(t5(), tmp_path / "ours").train()), expected,
                               rtol=1e-5, atol=1e-5)
    again = pl.load_adapter(t5(), tmp_path / "ours")
    assert {name: type(layer) for name, layer in pl.model.iter_adapter_layers(again)} == {
        name: type(layer) for name, layer in pl.model.iter_adapter_layers(ours)
    }
    # not bit for bit: in train mode a QDoRA layer's first no-grad call stacks A's rows with x in
    # one base call (the gain changes every step there), which rounds x's rows differently
    torch.testing.assert_close(logits(again), logits(ours), rtol=1e-6, atol=1e-6)
    # the mixed model trains as Hugging Face PEFT's does: the same losses step by step
    trained_ours = pl.load_adapter(t5(), tmp_path / "theirs")
    trained_theirs = peft.PeftModel.from_pretrained(t5(), tmp_path / "theirs", is_trainable=True).train()
    losses = []
    for model in (trained_ours, trained_theirs):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        generator, steps = torch.Generator().manual_seed(2), []
        for _ in range(4):
            batch = torch.randint(0, 64, (4, 7), generator=generator)
            loss = model(input_ids=batch, labels=batch.flip(1)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps.append(loss.item())
        losses.append(steps)
    assert losses[0][-1] < losses[0][0]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=0)
    if not use_dora:  # "all-linear" picks the same layers, quantized or float, as Hugging Face PEFT
        ours_all = pl.inject_adapters(t5(), "all-linear", method="qlora", rank=4)
        theirs_all = peft.get_peft_model(t5(), peft.LoraConfig(r=4, target_modules="all-linear"))
        kinds = {n: isinstance(l, pl.QLoRALinear) for n, l in pl.model.iter_adapter_layers(ours_all)}
        theirs_kinds = {
            n.removeprefix("base_model.model."): "bnb" in type(m).__module__
            for n, m in theirs_all.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)
        }
        assert kinds == theirs_kinds and any(kinds.values()) and not all(kinds.values())
        # the rule is the base's type, not the model's attributes: inside a module of the user's
        # (no _keep_in_fp32_modules there), or with wo named, wo still gets float LoRA; so does
        # the float lm_head, which only a transformers model at the root names as its output
        with pytest.warns(UserWarning, match=r"\{'t5.lm_head': \['t5.shared.weight'.*share their weights with the targets"):
            holder = pl.inject_adapters(nn.ModuleDict({"t5": t5()}), "all-linear", method="qlora", rank=4)
        holder_kinds = {n.removeprefix("t5."): isinstance(l, pl.QLoRALinear) for n, l in pl.model.iter_adapter_layers(holder)}
        assert holder_kinds == {**kinds, "lm_head": False}
        logits(holder["t5"])  # runs: T5 casts wo's input to wo.weight.dtype, float32 here
        named = pl.inject_adapters(t5(), ["q", "wo"], method="qlora", rank=4)
        assert {n.rpartition(".")[2]: type(l) for n, l in pl.model.iter_adapter_layers(named)} == {
            "q": pl.QLoRALinear, "wo": pl.LoRALinear,
        }
        # a 4-bit model and a float one side by side: each is judged on its own, and the float
        # one's targets are quantized (its wo, kept in float32, named, raises)
        pair = nn.ModuleDict({"in_4bit": t5(), "in_float32": transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "base")})
        pl.inject_adapters(pair, ["q", "wi"], method="qlora", rank=4)
        layers = dict(pl.model.iter_adapter_layers(pair))
        assert all(isinstance(layer, pl.QLoRALinear) for layer in layers.values())
        assert {layer.base_layer.from_bitsandbytes for name, layer in layers.items()} == {True, False}
        assert all(layer.base_layer.from_bitsandbytes == name.startswith("in_4bit.") for name, layer in layers.items())
        with pytest.raises(TypeError, match=r"'in_float32.encoder.block.0.layer.1.DenseReluDense.wo' is kept unquantized"):
            pl.inject_adapters(pair, re.compile(r".*\.wo"), method="qlora", rank=4)


def test_all_linear_gives_a_narrow_layer_the_rank_as_hugging_face_peft() -> None:
    """Under ``"all-linear"`` a layer narrower than the rank takes it (Hugging Face PEFT does);
    the two libraries then compute the same function. Named, or with PiSSA, the bound holds."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 2))
    ours = pl.inject_adapters(copy.deepcopy(base), "all-linear", rank=8, alpha=16.0)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    assert [(n, l.rank) for n, l in pl.model.iter_adapter_layers(ours)] == [("0", 8), ("2", 8)]
    with torch.no_grad():
        for name, layer in pl.model.iter_adapter_layers(ours):
            layer.lora_B.normal_()
            hf = theirs.base_model.model.get_submodule(name)
            hf.lora_A["default"].weight.copy_(layer.lora_A)
            hf.lora_B["default"].weight.copy_(layer.lora_B)
        x = torch.randn(5, 16)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"module '2': rank: expected an int in \[1, min\(in_features, out_features\)\] = \[1, 2\], got 8"):
        pl.inject_adapters(copy.deepcopy(base), "all-linear", rank=8, init="pissa")
    with pytest.raises(ValueError, match=r"module '2': rank: expected an int in \[1, min\(in_features, out_features\)\] = \[1, 2\], got 8"):
        pl.inject_adapters(copy.deepcopy(base), "all-linear", rank=2, rank_pattern={"2": 8})  # names the layer


class _Experts(nn.Module):
    """MoE-like names with two indices, ``model.layers.<i>.experts.<j>.w1``, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(
            nn.ModuleDict({"experts": nn.ModuleList(nn.ModuleDict({"w1": nn.Linear(8, 8)}) for _ in range(2))})
            for _ in range(3)
        )
        self.lm_head = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.model.layers:
            x = sum(expert["w1"](x) for expert in layer["experts"]) / 2
        return self.lm_head(x)


@pytest.mark.parametrize("fields", [
    {"target_modules": ["w1", "lm_head"], "layers_to_transform": [0]},   # a name listed exactly escapes
    {"target_modules": ["model.layers.2.experts.0.w1", "w1"], "layers_to_transform": 1},
    {"target_modules": ["w1"], "layers_to_transform": [1, -1]},           # -1 matches no layer
    {"target_modules": ["w1"], "layers_to_transform": [1], "layers_pattern": "experts"},
    {"target_modules": ["w1"], "layers_to_transform": [0, 2], "layers_pattern": ["blocks", "layers"]},
    {"target_modules": ["w1", "lm_head"], "exclude_modules": r".*layers\.1\..*"},
    {"target_modules": ["w1"], "exclude_modules": ["experts.1.w1"]},
    {"target_modules": ["w1"], "exclude_modules": r"layers\.1\.experts\.0\.w1|model\.layers\.2\.experts\.1\.w1"},
], ids=["exact-name", "full-path", "negative", "pattern", "patterns", "exclude-regex", "exclude-list", "exclude-whole-name"])
def test_files_with_hugging_face_peft_layer_selection_load_as_it_loads_them(fields: dict, tmp_path) -> None:
    # Hugging Face PEFT's own files: the same modules adapted, the same outputs; and the same file
    # with one more module's tensors than its fields allow is refused
    torch.manual_seed(0)
    base = _Experts()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, init_lora_weights=False, **fields))
    theirs.save_pretrained(tmp_path)
    ours = pl.load_adapter(copy.deepcopy(base), tmp_path)
    adapted = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.ModuleDict)}
    assert {n for n, _ in pl.model.iter_adapter_layers(ours)} == adapted
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    left_out = sorted({f"model.layers.{i}.experts.{j}.w1" for i in range(3) for j in range(2)} - adapted)
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors[f"base_model.model.{left_out[0]}.lora_A.weight"] = torch.zeros(2, 8)
    tensors[f"base_model.model.{left_out[0]}.lora_B.weight"] = torch.zeros(8, 2)
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"module '{re.escape(left_out[0])}' has adapter tensors, but adapter_config.json leaves it out"):
        pl.load_adapter(copy.deepcopy(base), tmp_path)


def test_a_file_saved_from_a_pretrained_model_opens_with_auto_peft_model(tmp_path) -> None:
    """The file records the base's ``name_or_path``, as Hugging Face PEFT's does, so that
    ``AutoPeftModelForCausalLM.from_pretrained(folder)`` builds the base from it and computes
    what our model computes; a model built from a config records nothing."""
    transformers = pytest.importorskip("transformers")
    import json

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    ours = pl.inject_lora(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"), ["q_proj", "v_proj"],
                          rank=2, init="gaussian")
    with torch.no_grad():
        for _, layer in pl.model.iter_adapter_layers(ours):
            layer.lora_B.normal_()
    pl.save_adapter(ours, tmp_path / "adapter")
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours.eval()(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    pl.save_adapter(pl.inject_lora(transformers.LlamaForCausalLM(config), ["q_proj"], rank=2), tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["base_model_name_or_path"] is None


def test_a_model_holding_hugging_face_peft_modules_is_refused(tmp_path) -> None:
    """A ``PeftModel``'s LoRA layers are not ``nn.Linear``: ``"all-linear"`` wrapped the parts
    inside them (``q_proj.base_layer``, ``q_proj.lora_A.default``), nesting adapters in another
    library's silently, and a named target got "a Linear; ... wraps nn.Linear only", which reads
    as a contradiction. Injecting, and loading a file into such a model, now refuse, naming the
    module and how to take the base model out; the model is unchanged."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))
    source = pl.inject_lora(copy.deepcopy(base), ["0"], rank=2)
    pl.save_adapter(source, tmp_path / "ours")
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0"]))
    before = {key: value.clone() for key, value in wrapped.state_dict().items()}
    outer = r"holds Hugging Face PEFT's modules \(the model: peft\.peft_model\.PeftModel\).*merge_and_unload\(\)"
    inner = r"holds Hugging Face PEFT's modules \(0: peft\.tuners\.lora\.layer\.Linear\)"
    for model, message in ((wrapped, outer), (wrapped.base_model.model, inner)):  # the PeftModel, or inside it
        for call in (
            lambda: pl.inject_adapters(model, "all-linear", rank=1),
            lambda: pl.inject_adapters(model, ["0"], rank=1),
            lambda: pl.inject_adapters(model, re.compile(r".*lora_[AB]\.default"), rank=1),
            lambda: pl.load_adapter(model, tmp_path / "ours"),
        ):
            with pytest.raises(ValueError, match=message):
                call()
    assert next(pl.model.iter_adapter_layers(wrapped), None) is None
    assert wrapped.state_dict().keys() == before.keys()
    assert all(torch.equal(value, before[key]) for key, value in wrapped.state_dict().items())
    # the way out the message gives works: the merged base takes our adapter
    merged = wrapped.merge_and_unload()
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = merged(x)
        pl.inject_lora(merged, ["0"], rank=2)  # B starts at zero: the same function
        torch.testing.assert_close(merged(x), expected, rtol=0, atol=0)
    assert [name for name, _ in pl.model.iter_adapter_layers(merged)] == ["0"]
