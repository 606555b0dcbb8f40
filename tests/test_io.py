"""Adapter files: save_adapter / load_adapter in the Hugging Face PEFT layout, both ways.

Outputs after a load are compared with the model that was saved (same code, so bitwise equal),
with a float64 reference built from the base weights and the file's tensors, and with Hugging Face
PEFT itself (``peft`` is a test dependency). Every failure test checks that the model (every
tensor, every module object, every requires_grad flag) or the old files are unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import os
import re
import types
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import peft_layers as pl
import peft_layers.io as io
from peft_layers.dora import DoRALinear
from peft_layers.io import list_adapters, load_adapter, read_adapter, save_adapter
from peft_layers.lora import LoRALinear, LoRAPlusLinear
from peft_layers.model import adapter_state_dict, inject_adapters, iter_adapter_layers, method_of, pattern_key

from reference import F64, direct_row_norm, dora_ref, lora_ref

# peft is a test dependency; it is imported inside the tests that use it (it is slow to import)
HAS_PEFT = importlib.util.find_spec("peft") is not None
needs_peft = pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")

PATHS = ("fc", "block.fc", "block.out")
METHODS = ["lora", "lora_plus", "dora", "qlora", "qdora"]


class Net(nn.Module):
    """fc (16 -> 32) -> gelu -> block.fc (32 -> 24) -> gelu -> block.out (24 -> 16, no bias) -> norm.

    "fc" is a dotted suffix of "block.fc": name matching has to be exact.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.block = nn.Module()
        self.block.fc = nn.Linear(32, 24)
        self.block.out = nn.Linear(24, 16, bias=False)
        self.norm = nn.LayerNorm(16)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.gelu(self.fc(x))
        x = nn.functional.gelu(self.block.fc(x))
        return self.norm(self.block.out(x))


def base_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():  # a LayerNorm that is not the identity, so its bias shows in outputs
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.uniform_(-0.5, 0.5)
    return net


def inputs(seed: int = 5) -> Tensor:
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(seed))


def randomize(model: nn.Module, seed: int = 3) -> nn.Module:
    """Non-zero B, A redrawn, magnitudes off ||W'||: adapters that change every output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in iter_adapter_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.3)
            if isinstance(layer, DoRALinear):
                layer.magnitude.mul_(0.5 + torch.rand(layer.magnitude.shape, generator=generator))
    return model


def adapted(method: str = "lora", seed: int = 0, **kwargs) -> Net:
    kwargs.setdefault("rank", 4)
    kwargs.setdefault("alpha", 8.0)
    kwargs.setdefault("rank_pattern", {"^block\\.out": 2})
    if method in ("qlora", "qdora"):
        kwargs.setdefault("quant", "nf4")
        kwargs.setdefault("blocksize", 32)
    model = inject_adapters(base_net(seed), list(PATHS), method=method, **kwargs)
    return randomize(model).eval()


def snapshot(model: nn.Module) -> dict:
    """Everything a failed load must leave alone: tensors, module objects, grad flags, attributes."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "modules": [(name, id(m)) for name, m in model.named_modules(remove_duplicate=False)],
        "grad": [(name, p.requires_grad) for name, p in model.named_parameters()],
        "layers": [
            (name, layer.rank, layer.alpha, layer.use_rslora, layer.init, layer.merged)
            for name, layer in iter_adapter_layers(model)
        ],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["grad"] == before["grad"]
    assert after["layers"] == before["layers"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---- a float64 reference for Net with adapters ------------------------------------------------
def net_reference(base: Net, adapters: dict[str, dict], x: Tensor) -> Tensor:
    """Net's output in float64 from the plain base's weights and, per path, ``A``, ``B``, ``s``
    and (DoRA) ``m``: LoRA and DoRA written out from DESIGN.md (tests/reference.py)."""

    def layer(path: str, h: Tensor) -> Tensor:
        linear = base.get_submodule(path)
        w = linear.weight.detach().to(F64)
        b = None if linear.bias is None else linear.bias.detach().to(F64)
        if path not in adapters:
            return h @ w.t() + (0 if b is None else b)
        ad = adapters[path]
        a, bm = ad["A"].to(F64), ad["B"].to(F64)
        if "m" in ad:
            return dora_ref(h, w, b, a, bm, ad["m"].to(F64), ad["s"], 1e-8)
        return lora_ref(h, w, b, a, bm, ad["s"])

    h = x.to(F64)
    h = nn.functional.gelu(layer("fc", h))
    h = nn.functional.gelu(layer("block.fc", h))
    h = layer("block.out", h)
    norm = base.norm
    return nn.functional.layer_norm(
        h, (16,), norm.weight.detach().to(F64), norm.bias.detach().to(F64), norm.eps
    )


def adapters_of(model: nn.Module) -> dict[str, dict]:
    out = {}
    for name, layer in iter_adapter_layers(model):
        entry = {"A": layer.lora_A.detach(), "B": layer.lora_B.detach(), "s": layer.scaling}
        if isinstance(layer, DoRALinear):
            entry["m"] = layer.magnitude.detach()
        out[name] = entry
    return out


def close64(actual: Tensor, expected: Tensor, rtol: float = 2e-5) -> None:
    expected = expected.detach().to(F64)
    atol = rtol * float(expected.abs().max())
    torch.testing.assert_close(actual.detach().to(F64), expected, rtol=rtol, atol=atol)


# ---- round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_round_trip_into_a_plain_model(method: str, tmp_path: Path) -> None:
    model = adapted(method, use_rslora=method == "dora", alpha_pattern={"^fc": 3.0})
    save_adapter(model, tmp_path)
    loaded = load_adapter(base_net(), tmp_path).eval()
    x = inputs()
    assert torch.equal(loaded(x), model(x))
    assert [(n, method_of(l), l.rank, l.alpha, l.use_rslora) for n, l in iter_adapter_layers(loaded)] == [
        (n, method_of(l), l.rank, l.alpha, l.use_rslora) for n, l in iter_adapter_layers(model)
    ]
    expected, got = adapter_state_dict(model), adapter_state_dict(loaded)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    if method in ("qlora", "qdora"):
        for (_, a), (_, b) in zip(iter_adapter_layers(model), iter_adapter_layers(loaded)):
            assert io._save._quant_info(a) == io._save._quant_info(b)
            assert torch.equal(a.base_layer.dequantize(), b.base_layer.dequantize())
    else:
        close64(loaded(x), net_reference(base_net(), adapters_of(model), x))
    if method == "lora_plus":
        assert all(layer.lr_ratio == 16.0 for _, layer in iter_adapter_layers(loaded))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_round_trip_fills_existing_layers(method: str, tmp_path: Path) -> None:
    model = adapted(method, alpha=4.0)
    save_adapter(model, tmp_path)
    # same structure, other random adapters and another alpha: the file decides A, B, m and alpha
    target = inject_adapters(base_net(), list(PATHS), method=method, rank=4, alpha=32.0,
                             rank_pattern={"^block\\.out": 2})
    randomize(target, seed=9)
    load_adapter(target, tmp_path)
    x = inputs()
    assert torch.equal(target.eval()(x), model(x))
    assert all(layer.alpha == 4.0 for _, layer in iter_adapter_layers(target))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_filling_existing_layers_takes_the_files_rslora_and_epsilon(method: str, tmp_path: Path) -> None:
    """Layers built with the default scaling rule and epsilon take the file's: rsLoRA's
    ``alpha / sqrt(r)`` and DoRA's epsilon, as the layers the file was saved from had them."""
    extra = {"epsilon": 1e-3} if method == "dora" else {}
    model = adapted(method, alpha=4.0, use_rslora=True, **extra)
    save_adapter(model, tmp_path)
    target = inject_adapters(base_net(), list(PATHS), method=method, rank=4, alpha=32.0,
                             rank_pattern={"^block\\.out": 2})
    load_adapter(target, tmp_path)
    for (_, saved), (_, filled) in zip(iter_adapter_layers(model), iter_adapter_layers(target)):
        assert filled.use_rslora is True
        assert filled.scaling == saved.scaling == 4.0 / math.sqrt(saved.rank)
        if method == "dora":
            assert filled.epsilon == 1e-3
    x = inputs()
    assert torch.equal(target.eval()(x), model(x))


@needs_peft
def test_filling_dora_layers_from_a_file_without_epsilon_takes_the_default(tmp_path: Path) -> None:
    """A file records DoRA's epsilon only when it is not the default 1e-8 (Hugging Face PEFT's
    never do). Filling layers built with another epsilon kept theirs, and the outputs differed
    from the saved model's and from Hugging Face PEFT's on the same file."""
    import peft

    model = adapted("dora")
    save_adapter(model, tmp_path)
    assert our_field(tmp_path) is None
    target = inject_adapters(base_net(), list(PATHS), method="dora", rank=4, rank_pattern={"^block\\.out": 2}, epsilon=1.0)
    load_adapter(target, tmp_path)
    assert all(layer.epsilon == 1e-8 for _, layer in iter_adapter_layers(target))
    x = inputs()
    with torch.no_grad():
        assert torch.equal(target.eval()(x), model(x))
        theirs = peft.PeftModel.from_pretrained(base_net(), tmp_path).eval()
        torch.testing.assert_close(target(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_config_fields_and_patterns(tmp_path: Path) -> None:
    model = adapted("dora", alpha_pattern={"^block\\.fc": 5.0}, dropout=0.1)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True and config["use_rslora"] is False
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["lora_dropout"] == 0.1
    assert config["rank_pattern"] == {r"^block\.out": 2}
    assert config["alpha_pattern"] == {r"^block\.fc": 5.0}
    assert config["target_modules"] == sorted(PATHS)
    assert config["bias"] == "none" and config["fan_in_fan_out"] is False and config["init_lora_weights"] is True
    assert "peft_layers" not in config  # plain DoRA: a pure Hugging Face config
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "base_model.model.fc.lora_A.weight": (4, 16), "base_model.model.fc.lora_B.weight": (32, 4),
        "base_model.model.fc.lora_magnitude_vector": (32,),
        "base_model.model.block.fc.lora_A.weight": (4, 32), "base_model.model.block.fc.lora_B.weight": (24, 4),
        "base_model.model.block.fc.lora_magnitude_vector": (24,),
        "base_model.model.block.out.lora_A.weight": (2, 24), "base_model.model.block.out.lora_B.weight": (16, 2),
        "base_model.model.block.out.lora_magnitude_vector": (16,),
    }
    # the anchored keys pick exactly one module each under Hugging Face's matching rule
    for name, layer in iter_adapter_layers(model):
        key = pattern_key(config["rank_pattern"], name)
        assert (config["rank_pattern"][key] if key else config["r"]) == layer.rank
        key = pattern_key(config["alpha_pattern"], name)
        assert (config["alpha_pattern"][key] if key else config["lora_alpha"]) == layer.alpha


def test_ties_in_rank_and_alpha_go_to_the_first_layer(tmp_path: Path) -> None:
    model = adapted("lora", rank_pattern={"^fc": 2, "^block\\.out": 3}, alpha_pattern={"^fc": 1.0, "^block\\.out": 3.0})
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (2, 1.0)  # fc's: every value appears once
    assert config["rank_pattern"] == {r"^block\.fc": 4, r"^block\.out": 3}
    assert config["alpha_pattern"] == {r"^block\.fc": 8.0, r"^block\.out": 3.0}


def test_target_modules_stay_a_list_when_a_name_ends_with_a_target_without_a_dot(tmp_path: Path) -> None:
    # "xfc" ends with "fc" but not with ".fc": Hugging Face PEFT's list rule does not take it
    model = inject_adapters(nn.ModuleDict({"fc": nn.Linear(4, 4), "xfc": nn.Linear(4, 4)}), ["fc"], rank=2)
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["fc"]


@pytest.mark.parametrize(
    "quant",
    [
        {"quant": "fp4", "blocksize": 64, "double_quant": False, "compute_dtype": torch.bfloat16},
        {"quant": "int8"},
    ],
    ids=["fp4-bf16", "int8"],
)
def test_quantization_is_recorded_and_reproduced(quant: dict, tmp_path: Path) -> None:
    model = adapted("qdora", **quant)
    save_adapter(model, tmp_path)
    ours = our_field(tmp_path)
    expected = {
        "scheme": quant["quant"],
        "blocksize": quant.get("blocksize"),
        "double_quant": quant.get("double_quant", False),
        "compute_dtype": "bfloat16" if "compute_dtype" in quant else "float32",
    }
    assert ours == {"version": 1, "method": "qdora", "quant": expected}
    loaded = load_adapter(base_net(), tmp_path).eval()
    for (_, a), (_, b) in zip(iter_adapter_layers(model), iter_adapter_layers(loaded)):
        assert (a.base_layer.scheme, a.base_layer.blocksize, a.base_layer.double_quant, a.compute_dtype) == (
            b.base_layer.scheme, b.base_layer.blocksize, b.base_layer.double_quant, b.compute_dtype
        )
    x = inputs()
    assert torch.equal(loaded(x), model(x))


@needs_peft
def test_quantized_adapter_over_a_float_base_in_peft_and_ours(tmp_path: Path) -> None:
    import peft

    save_adapter(adapted("qlora"), tmp_path)
    # the adapter tensors are plain LoRA: both libraries can put them on the float base
    float_ours = load_adapter(base_net(), tmp_path, method="lora").eval()
    assert all(method_of(l) == "lora" for _, l in iter_adapter_layers(float_ours))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(base_net(), tmp_path).eval()
    # our field sits in the safetensors metadata, which Hugging Face PEFT does not read: in the
    # config its loader would warn "Unexpected keyword arguments ['peft_layers']"
    assert not [w for w in caught if "peft_layers" in str(w.message)]
    x = inputs()
    torch.testing.assert_close(theirs(x), float_ours(x), rtol=1e-5, atol=1e-5)


@settings(max_examples=8)
@given(
    ranks=st.lists(st.integers(1, 8), min_size=3, max_size=3),
    alphas=st.lists(st.sampled_from([1.0, 2.5, 8.0, 16.0]), min_size=3, max_size=3),
    rslora=st.booleans(),
    dora=st.booleans(),
)
def test_round_trip_property(ranks: list[int], alphas: list[float], rslora: bool, dora: bool, tmp_path_factory) -> None:
    folder = tmp_path_factory.mktemp("prop")
    model = base_net()
    for path, rank, alpha in zip(PATHS, ranks, alphas):
        inject_adapters(model, re.compile(re.escape(path)), method="dora" if dora else "lora", rank=rank, alpha=alpha, use_rslora=rslora)
    randomize(model).eval()
    save_adapter(model, folder)
    loaded = load_adapter(base_net(), folder).eval()
    x = inputs()
    assert torch.equal(loaded(x), model(x))
    assert [(l.rank, l.alpha, l.scaling) for _, l in iter_adapter_layers(loaded)] == [
        (l.rank, l.alpha, l.scaling) for _, l in iter_adapter_layers(model)
    ]
    close64(loaded(x), net_reference(base_net(), adapters_of(model), x))


def test_rng_is_not_advanced_by_an_injecting_load(tmp_path: Path) -> None:
    save_adapter(adapted("lora"), tmp_path)
    target = base_net()
    state = torch.get_rng_state()
    load_adapter(target, tmp_path)
    assert torch.equal(torch.get_rng_state(), state)


def test_hugging_face_is_trainable_gets_what_to_do_instead(tmp_path: Path) -> None:
    """``PeftModel.from_pretrained``'s ``is_trainable`` has no place here: the error says what
    load_adapter leaves and how to get Hugging Face PEFT's inference default; nothing changes."""
    save_adapter(adapted("lora"), tmp_path)
    target = base_net()
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(TypeError, match=r"is_trainable: .*Hugging Face PEFT's is_trainable is not needed: load_adapter "
                                        r"leaves the adapters trainable .*model\.eval\(\)\.requires_grad_\(False\)"):
        load_adapter(target, tmp_path, is_trainable=False)
    assert not list(iter_adapter_layers(target))
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_load_keeps_the_random_state_of_every_accelerator_the_model_is_on(monkeypatch) -> None:
    """The random states kept around a load's injection: the CPU's, and each accelerator type's
    on the devices the model's tensors are on (not only CUDA's: MPS and XPU draw the fresh
    factors from their own generators too). No accelerator here: fork_rng's calls are recorded."""
    from peft_layers.io import _load

    forked = []

    @contextlib.contextmanager
    def recording_fork_rng(devices=None, device_type=None):
        forked.append((device_type, list(devices)))
        yield

    monkeypatch.setattr(torch.random, "fork_rng", recording_fork_rng)
    on = [torch.device(d) for d in ("cuda:1", "cpu", "mps", "cuda:0", "meta", "cuda:1", "xpu:2")]
    model = types.SimpleNamespace(
        parameters=lambda: iter(types.SimpleNamespace(device=d) for d in on[:4]),
        buffers=lambda: iter(types.SimpleNamespace(device=d) for d in on[4:]),
    )
    with _load._random_states_kept(model):
        pass
    assert forked == [(None, []), ("cuda", [0, 1]), ("mps", [0]), ("xpu", [2])]


def test_trained_biases_round_trip(tmp_path: Path) -> None:
    for bias, saved in (("adapter_only", "lora_only"), ("all", "all")):
        folder = tmp_path / bias
        model = adapted("lora", bias=bias)
        with torch.no_grad():
            for _, p in model.named_parameters():
                if p.requires_grad and p.dim() == 1:
                    p.add_(0.25)  # "trained" biases
        save_adapter(model, folder)
        assert json.loads((folder / "adapter_config.json").read_text())["bias"] == saved
        keys = set(load_file(folder / "adapter_model.safetensors"))
        assert "base_model.model.fc.base_layer.bias" in keys
        assert ("base_model.model.norm.bias" in keys) == (bias == "all")
        loaded = load_adapter(base_net(), folder).eval()
        x = inputs()
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("case", ["bias-free targets", "one more bias trained"])
def test_every_trained_bias_is_saved(case: str, tmp_path: Path) -> None:
    """The file's bias mode saves every bias that trains: with bias="all" on targets that have no
    bias of their own, and with one bias outside the adapter layers unfrozen by hand beside
    bias="adapter_only" (Hugging Face PEFT's "all" is then the narrowest mode that keeps it)."""
    if case == "bias-free targets":
        model = randomize(inject_adapters(base_net(), ["block.out"], method="lora", rank=2, bias="all")).eval()
    else:
        model = randomize(inject_adapters(base_net(), ["fc", "block.out"], method="lora", rank=2, bias="adapter_only")).eval()
        model.norm.bias.requires_grad_(True)  # block.fc's bias stays frozen
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad and p.dim() == 1:
                p.add_(0.25)  # "trained" biases
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["bias"] == "all"
    assert "base_model.model.norm.bias" in load_file(tmp_path / "adapter_model.safetensors")
    x = inputs()
    assert torch.equal(load_adapter(base_net(), tmp_path).eval()(x), model(x))
    if importlib.util.find_spec("peft") is not None:
        import peft

        theirs = peft.PeftModel.from_pretrained(base_net(), tmp_path).eval()
        torch.testing.assert_close(theirs(x), model(x), rtol=1e-6, atol=1e-6)


# ---- the documented layout, written by hand ---------------------------------------------------------
def write_hf(folder: Path, tensors: dict[str, Tensor], config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config))


def handwritten(dora: bool, seed: int = 11) -> tuple[dict[str, Tensor], dict, dict[str, dict]]:
    """Tensors and config in Hugging Face PEFT's documented layout: r=4, alpha=8, block.out at
    rank 2 through a suffix rank_pattern key and alpha 3 through a regex alpha_pattern key."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"fc": (16, 32, 4), "block.fc": (32, 24, 4), "block.out": (24, 16, 2)}
    alphas = {"fc": 8.0, "block.fc": 8.0, "block.out": 3.0}
    tensors, expected = {}, {}
    base = base_net()
    for path, (fan_in, fan_out, r) in shapes.items():
        a = torch.randn(r, fan_in, generator=gen) * 0.3
        b = torch.randn(fan_out, r, generator=gen) * 0.3
        tensors[f"base_model.model.{path}.lora_A.weight"] = a
        tensors[f"base_model.model.{path}.lora_B.weight"] = b
        expected[path] = {"A": a, "B": b, "s": alphas[path] / r}
        if dora:
            w0 = base.get_submodule(path).weight.detach()
            m = direct_row_norm(w0, a, b, alphas[path] / r) * (0.5 + torch.rand(fan_out, generator=gen, dtype=F64))
            tensors[f"base_model.model.{path}.lora_magnitude_vector"] = m.float()
            expected[path]["m"] = m.float()
    config = {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["fc", "out"],
        "rank_pattern": {"out": 2}, "alpha_pattern": {r"block\.o.t": 3}, "use_dora": dora,
        "use_rslora": False, "lora_dropout": 0.05, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "modules_to_save": None, "task_type": None,
    }
    return tensors, config, expected


@pytest.mark.parametrize("dora", [False, True])
def test_handwritten_hf_layout_loads_with_reference_outputs(dora: bool, tmp_path: Path) -> None:
    tensors, config, expected = handwritten(dora)
    write_hf(tmp_path, tensors, config)
    model = load_adapter(base_net(), tmp_path).eval()
    assert {n: (method_of(l), l.rank, l.alpha, l.dropout) for n, l in iter_adapter_layers(model)} == {
        "fc": ("dora" if dora else "lora", 4, 8.0, 0.05),
        "block.fc": ("dora" if dora else "lora", 4, 8.0, 0.05),
        "block.out": ("dora" if dora else "lora", 2, 3.0, 0.05),
    }
    x = inputs()
    close64(model(x), net_reference(base_net(), expected, x))
    # and the same numbers through a model that already has the layers (fill, not inject)
    filled = inject_adapters(base_net(), list(PATHS), method="dora" if dora else "lora", rank=4,
                             alpha=1.0, rank_pattern={"out": 2})
    load_adapter(filled, tmp_path)
    assert torch.equal(filled.eval()(x), model(x))


def test_bin_weights_load(tmp_path: Path) -> None:
    tensors, config, expected = handwritten(dora=True)
    tmp_path.mkdir(exist_ok=True)
    torch.save(tensors, tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = load_adapter(base_net(), tmp_path).eval()
    x = inputs()
    close64(model(x), net_reference(base_net(), expected, x))


# ---- several adapters in one tree ---------------------------------------------------------------------
def test_subfolder_adapters(tmp_path: Path) -> None:
    default, math_ = adapted("lora"), adapted("dora", seed=0, rank=2)
    randomize(math_, seed=21)
    save_adapter(default, tmp_path)
    assert save_adapter(math_, tmp_path, adapter_name="math") == tmp_path / "math"
    assert (tmp_path / "math" / "adapter_config.json").is_file()
    assert list_adapters(tmp_path) == ["default", "math"]
    assert pl.io.list_adapters(tmp_path) == ["default", "math"]  # as docs/files.md calls it
    x = inputs()
    assert torch.equal(load_adapter(base_net(), tmp_path).eval()(x), default(x))
    assert torch.equal(load_adapter(base_net(), tmp_path, adapter_name="default").eval()(x), default(x))
    assert torch.equal(load_adapter(base_net(), tmp_path, adapter_name="math").eval()(x), math_(x))
    with pytest.raises(FileNotFoundError, match=r"\['default', 'math'\]"):
        load_adapter(base_net(), tmp_path, adapter_name="code")
    for bad in ("", "..", "a/b", "a\0b"):  # NUL: a bare "embedded null byte" before
        with pytest.raises(ValueError, match="^adapter_name: expected a folder name"):
            save_adapter(default, tmp_path, adapter_name=bad)
    with pytest.raises(ValueError, match="^directory: a path cannot hold a NUL"):
        save_adapter(default, str(tmp_path) + "\0x")
    with pytest.raises(TypeError, match="adapter_name"):
        load_adapter(base_net(), tmp_path, adapter_name=3)
    (tmp_path / "notes").write_text("a file")  # FileExistsError from mkdir before
    with pytest.raises(NotADirectoryError, match=r"^adapter_name: .*notes' is a file"):
        save_adapter(default, tmp_path, adapter_name="notes")
    assert (tmp_path / "notes").read_text() == "a file"


def test_shared_module_is_saved_once_and_injected_under_every_name(tmp_path: Path) -> None:
    model = base_net()
    model.alias = model.fc  # one module, two names
    inject_adapters(model, list(PATHS), rank=4, rank_pattern={"^fc": 2})
    randomize(model)
    assert model.alias is model.fc
    with pytest.warns(UserWarning, match=r"\['fc', 'alias'\] name one shared module"):
        save_adapter(model, tmp_path)
    assert not any(".alias." in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    fresh = base_net()
    fresh.alias = fresh.fc
    with pytest.warns(UserWarning, match=r"\['fc', 'alias'\] name one shared module"):
        load_adapter(fresh, tmp_path)
    assert fresh.alias is fresh.fc and isinstance(fresh.fc, LoRALinear) and fresh.fc.rank == 2
    x = inputs()
    assert torch.equal(fresh.eval()(x), model.eval()(x))
    assert torch.equal(fresh.alias(torch.ones(1, 16)), model.alias(torch.ones(1, 16)))


class EncDec(nn.Module):
    """One linear layer under two names: ``dec(relu(enc(x)))``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(16, 16)
        self.dec = self.enc

    def forward(self, x: Tensor) -> Tensor:
        return self.dec(torch.relu(self.enc(x)))


SHARED_WARNING = r"\['enc', 'dec'\] name one shared module.*Hugging Face PEFT adapts only the first name \('enc'\)"


@needs_peft
def test_shared_module_warns_that_peft_adapts_the_first_name_only(tmp_path: Path) -> None:
    import peft

    ours = randomize(inject_adapters(EncDec(), ["enc"], rank=4)).eval()
    with pytest.warns(UserWarning, match=SHARED_WARNING):
        save_adapter(ours, tmp_path / "ours")
    # the claim: Hugging Face PEFT adapts "enc" and leaves "dec" the plain base
    theirs = peft.PeftModel.from_pretrained(EncDec(), tmp_path / "ours").eval()
    x = inputs()
    with torch.no_grad():
        plain_dec = ours.enc.base_layer(torch.relu(ours.enc(x)))
        torch.testing.assert_close(theirs(x), plain_dec, rtol=1e-5, atol=1e-5)
        assert (theirs(x) - ours(x)).abs().max() > 1e-2
    with pytest.warns(UserWarning, match=SHARED_WARNING):
        load_adapter(EncDec(), tmp_path / "ours")
    # Hugging Face PEFT's own file, loaded by us (injecting, then filling)
    hf = peft.get_peft_model(EncDec(), peft.LoraConfig(r=4, target_modules=["enc"], init_lora_weights=False))
    hf.save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match=SHARED_WARNING):
        filled = load_adapter(EncDec(), tmp_path / "hf")
    with pytest.warns(UserWarning, match=SHARED_WARNING):
        load_adapter(filled, tmp_path / "hf")


def test_a_shared_module_warning_turned_error_changes_nothing(tmp_path: Path) -> None:
    """Under ``-W error`` the shared-module warning raised after load_adapter had injected and
    filled (the model kept the adapter layers), and after save_adapter had written the files.
    Both warn before they change anything now."""
    ours = randomize(inject_adapters(EncDec(), ["enc"], rank=4)).eval()
    with pytest.warns(UserWarning, match=SHARED_WARNING):
        save_adapter(ours, tmp_path / "old")
    old = folder_bytes(tmp_path / "old")
    other = randomize(inject_adapters(EncDec(), ["enc"], rank=4), seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for directory in (tmp_path / "new" / "adapter", tmp_path / "old"):
            with pytest.raises(UserWarning, match=SHARED_WARNING):
                save_adapter(other, directory)
        for model in (EncDec(), randomize(inject_adapters(EncDec(), ["enc"], rank=4), seed=8)):  # injects, fills
            before = snapshot(model)
            with pytest.raises(UserWarning, match=SHARED_WARNING):
                load_adapter(model, tmp_path / "old")
            assert_unchanged(model, before)
    assert not (tmp_path / "new").exists()
    assert folder_bytes(tmp_path / "old") == old


@needs_peft
@pytest.mark.filterwarnings("ignore:Found missing adapter keys")  # peft: layers.1.fc, the same module as layers.0.fc
def test_no_shared_warning_where_peft_adapts_every_name(tmp_path: Path) -> None:
    import peft

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

    class Repeated(nn.Module):
        """One block applied twice: ``layers.0.fc`` and ``layers.1.fc`` are one attribute of one
        parent, which Hugging Face PEFT's replacement reaches under both names."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            block = Block()
            self.layers = nn.ModuleList([block, block])

        def forward(self, x: Tensor) -> Tensor:
            for layer in self.layers:
                x = torch.relu(layer.fc(x))
            return x

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = randomize(inject_adapters(Repeated(), ["fc"], rank=4)).eval()
        save_adapter(ours, tmp_path / "repeated")
        load_adapter(Repeated(), tmp_path / "repeated")
        save_adapter(adapted("lora"), tmp_path / "net")
        load_adapter(base_net(), tmp_path / "net")
        load_adapter(adapted("lora"), tmp_path / "net")
    theirs = peft.PeftModel.from_pretrained(Repeated(), tmp_path / "repeated").eval()
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)


@needs_peft
@pytest.mark.filterwarnings("ignore:Found missing adapter keys")
def test_a_shared_block_with_trained_biases_loads_from_peft(tmp_path: Path) -> None:
    """Hugging Face PEFT's ``bias="all"`` writes a shared layer's bias under its second name too:
    ``layers.1.fc.base_layer.bias`` (no factors there) and, for a module to save in the block,
    ``layers.1.norm.modules_to_save.bias`` and ``...original_module.bias``. Those keys were refused;
    they load, checked against the first name's biases."""
    import peft

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 8)

    class Net2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            block = Block()
            self.layers = nn.ModuleList([block, block])
            self.head = nn.Linear(8, 2)

        def forward(self, x: Tensor) -> Tensor:
            for layer in self.layers:
                x = torch.tanh(layer.fc(layer.norm(x)))
            return self.head(x)

    config = peft.LoraConfig(target_modules=["fc"], r=2, bias="all", modules_to_save=["layers.0.norm"])
    theirs = peft.get_peft_model(Net2(), config)
    with torch.no_grad():
        block = theirs.base_model.model.layers[0]
        block.fc.lora_B.default.weight.normal_()
        block.fc.base_layer.bias.add_(1.0)
        block.norm.modules_to_save.default.bias.add_(0.5)
        theirs.base_model.model.head.bias.add_(1.0)
    theirs.save_pretrained(tmp_path)
    second = {k for k in load_file(tmp_path / "adapter_model.safetensors") if ".layers.1." in k}
    assert second == {
        f"base_model.model.layers.1.{key}.bias"
        for key in ("fc.base_layer", "norm.modules_to_save", "norm.original_module")
    }
    ours = load_adapter(Net2(), tmp_path)
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs.eval()(x), rtol=1e-5, atol=1e-6)
    # a second name whose bias differs from the first's is no shared module
    saved = load_file(tmp_path / "adapter_model.safetensors")
    for key, first in (("fc.base_layer", "layers.0.fc"), ("norm.modules_to_save", "layers.0.norm")):
        edit_tensors(tmp_path, lambda t, key=key: (t.update({k: v.clone() for k, v in saved.items()}), t[f"base_model.model.layers.1.{key}.bias"].add_(1.0)))
        before = snapshot(base := Net2())
        with pytest.raises(ValueError, match=rf"'{first}' and '{first.replace('0', '1')}' name one shared module but hold different biases"):
            load_adapter(base, tmp_path)
        assert_unchanged(base, before)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing' does not exist"):
        load_adapter(base_net(), tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no adapter config here .* adapters found under .*empty': \[\]$"):
        load_adapter(base_net(), tmp_path / "empty")
    # a whole model's checkpoint (save_pretrained, Trainer's save_model) is named as such
    save_file({k: v.contiguous() for k, v in adapted().state_dict().items()}, tmp_path / "empty" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model.safetensors here is a whole model's checkpoint .*load_state_dict\(\) it"):
        load_adapter(base_net(), tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        list_adapters(tmp_path / "nothing")
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        load_adapter(base_net(), tmp_path)


# ---- Hugging Face PEFT both ways --------------------------------------------------------------------
def hf_model(config_kwargs: dict, seed: int = 0):
    import peft

    model = peft.get_peft_model(base_net(seed), peft.LoraConfig(**config_kwargs))
    generator = torch.Generator().manual_seed(17)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                if "magnitude" in name:
                    parameter.mul_(0.5 + torch.rand(parameter.shape, generator=generator))
                else:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


HF_CASES = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
}


@needs_peft
@pytest.mark.parametrize("case", list(HF_CASES))
def test_our_files_load_in_peft(case: str, tmp_path: Path) -> None:
    import peft

    method = "dora" if case == "dora" else "lora"
    model = adapted(method, use_rslora=case == "rslora", alpha_pattern={"^fc": 3.0})
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base_net(), tmp_path).eval()
    for name, layer in iter_adapter_layers(model):
        hf_layer = theirs.base_model.model.get_submodule(name)
        assert hf_layer.r["default"] == layer.rank and hf_layer.scaling["default"] == pytest.approx(layer.scaling)
    x = inputs()
    torch.testing.assert_close(theirs(x), model(x), rtol=1e-5, atol=1e-5)


@needs_peft
def test_our_regex_target_modules_adapt_only_our_modules_in_peft(tmp_path: Path) -> None:
    import peft

    # only the top "fc": a list ["fc"] would also match "block.fc" in Hugging Face's matching
    model = randomize(inject_adapters(base_net(), re.compile("fc"), rank=4)).eval()
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str)
    theirs = peft.PeftModel.from_pretrained(base_net(), tmp_path).eval()
    assert isinstance(theirs.base_model.model.block.fc, nn.Linear)
    assert hasattr(theirs.base_model.model.fc, "lora_A")
    x = inputs()
    torch.testing.assert_close(theirs(x), model(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(load_adapter(base_net(), tmp_path).eval()(x), model(x))


@needs_peft
@pytest.mark.parametrize("case", list(HF_CASES))
def test_peft_files_load_in_ours(case: str, tmp_path: Path) -> None:
    theirs = hf_model({
        "r": 4, "lora_alpha": 8, "target_modules": ["fc", "out"], "rank_pattern": {"out": 2},
        "alpha_pattern": {"^fc": 3}, **HF_CASES[case],
    })
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(base_net(), tmp_path).eval()
    assert [(n, method_of(l), l.rank, l.alpha, l.use_rslora) for n, l in iter_adapter_layers(ours)] == [
        ("fc", "dora" if case == "dora" else "lora", 4, 3.0, case == "rslora"),
        ("block.fc", "dora" if case == "dora" else "lora", 4, 8.0, case == "rslora"),
        ("block.out", "dora" if case == "dora" else "lora", 2, 8.0, case == "rslora"),
    ]
    x = inputs()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@needs_peft
def test_peft_subfolder_and_bias_files_load_in_ours(tmp_path: Path) -> None:
    import peft

    theirs = hf_model({"r": 4, "lora_alpha": 8, "target_modules": ["fc", "out"], "bias": "lora_only"})
    theirs.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["block.fc"], use_dora=True))
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_B.other" in name:
                parameter.normal_()
            if name.endswith("fc.base_layer.bias") and "block" not in name:
                parameter.add_(0.5)  # the trained bias of bias="lora_only" (block.out has none)
    theirs.save_pretrained(tmp_path, selected_adapters=["default", "other"])
    assert list_adapters(tmp_path) == ["default", "other"]
    x = inputs()
    expected_default = theirs(x)
    theirs.set_adapter("other")
    expected_other = theirs(x)
    ours = load_adapter(base_net(), tmp_path).eval()
    torch.testing.assert_close(ours(x), expected_default, rtol=1e-5, atol=1e-5)
    other = load_adapter(base_net(), tmp_path, adapter_name="other").eval()
    assert [(n, method_of(l)) for n, l in iter_adapter_layers(other)] == [("block.fc", "dora")]
    # the other adapter sees the biases trained with the default one: they live in the base
    with torch.no_grad():
        other.fc.bias.add_(0.5)
    torch.testing.assert_close(other(x), expected_other, rtol=1e-5, atol=1e-5)


def tiny_llama(tie: bool, seed: int = 1) -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    return model


def peft_lm_head_file(folder: Path, tie: bool) -> Tensor:
    """Hugging Face PEFT's file for LoRA on q_proj and lm_head; returns the lm_head base weight it
    holds (its save_pretrained writes it, as lm_head is an embedding layer name)."""
    import peft

    config = peft.LoraConfig(target_modules=["q_proj", "lm_head"], r=4, lora_alpha=8, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting save_embedding_layers to True", tied-weight advice
        hf = peft.get_peft_model(tiny_llama(tie), config)
        hf.save_pretrained(folder)
    weight = load_file(folder / "adapter_model.safetensors")["base_model.model.lm_head.base_layer.weight"]
    assert torch.equal(weight, hf.base_model.model.lm_head.base_layer.weight)
    return weight


@needs_peft
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_peft_lm_head_file_loads_its_base_weight_as_peft_does(tie: bool, tmp_path: Path) -> None:
    import peft

    saved = peft_lm_head_file(tmp_path, tie)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(2))

    def edited_base() -> nn.Module:
        # a base whose lm_head differs from the file's (and, tied, its embed_tokens with it)
        model = tiny_llama(tie)
        with torch.no_grad():
            model.lm_head.weight.mul_(2.0)
        return model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = peft.PeftModel.from_pretrained(tiny_llama(tie), tmp_path).eval()
        theirs_edited = peft.PeftModel.from_pretrained(edited_base(), tmp_path).eval()
    with torch.no_grad():
        logits = expected(input_ids=ids).logits
        torch.testing.assert_close(theirs_edited(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)
    for make in (lambda: tiny_llama(tie), edited_base):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tied: inject_adapters warns about in-place merges
            injected = load_adapter(make(), tmp_path)
            filled = inject_adapters(make(), ["q_proj", "lm_head"], rank=4)
        load_adapter(filled, tmp_path)
        for ours in (injected, filled):
            assert [n for n, _ in iter_adapter_layers(ours)][-1] == "lm_head"
            assert torch.equal(ours.lm_head.base_layer.weight, saved)  # the file's weight wins
            embed = ours.model.embed_tokens.weight
            assert (embed is ours.lm_head.weight) == tie  # still tied, as in Hugging Face PEFT
            assert torch.equal(embed, expected.base_model.model.model.embed_tokens.weight)
            with torch.no_grad():
                torch.testing.assert_close(ours(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)


@needs_peft
def test_stacking_and_combining_check_a_files_lm_head_base_weight(tmp_path: Path) -> None:
    """Stacked adapters share the model's base: a file whose lm_head base weight is the model's
    stacks (and computes what load_adapter computes); one whose weight differs is refused, the
    model unchanged. combine_adapters, which has no model, warns that it takes the factors only."""

    peft_lm_head_file(tmp_path, tie=False)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    stacked = pl.stack_adapters(tiny_llama(False), {"a": tmp_path})
    pl.set_adapter(stacked, "a")
    with torch.no_grad():
        expected = load_adapter(tiny_llama(False), tmp_path).eval()(input_ids=ids).logits
        torch.testing.assert_close(stacked(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    other = tiny_llama(False)
    with torch.no_grad():
        other.lm_head.weight.mul_(2.0)
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"adapters\['a'\], module 'lm_head': the file also holds this layer's base weight.*not the model's"):
        pl.stack_adapters(other, {"a": tmp_path})
    assert_unchanged(other, before)
    with pytest.warns(UserWarning, match=r"also holds the base weights of \['lm_head'\].*only the factors are combined"):
        pl.compose.combine_adapters([tmp_path], [1.0])


@needs_peft
def test_lm_head_base_weight_into_a_quantized_base_is_refused(tmp_path: Path) -> None:
    peft_lm_head_file(tmp_path, tie=False)
    plain = tiny_llama(False)
    quantized = inject_adapters(tiny_llama(False), ["q_proj", "lm_head"], method="qlora", rank=4, blocksize=32)
    for model, kwargs in ((plain, {"method": "qlora", "blocksize": 32}), (quantized, {})):
        before = snapshot(model)
        with pytest.raises(ValueError, match=r"'lm_head'.*full base weight.*the base is quantized"):
            load_adapter(model, tmp_path, **kwargs)
        assert_unchanged(model, before)


def test_base_weight_of_the_wrong_shape_is_refused(saved_lora: Path) -> None:
    def add(tensors: dict) -> None:
        tensors["base_model.model.block.fc.base_layer.weight"] = torch.zeros(24, 31)

    edit_tensors(saved_lora, add)
    assert_load_fails(saved_lora, ValueError, r"'block.fc': base_layer.weight \(24, 31\) should be \(24, 32\)")

    def fix(tensors: dict) -> None:
        tensors["base_model.model.block.fc.base_layer.weight"] = torch.full((24, 32), 0.5)

    edit_tensors(saved_lora, fix)
    for model in targets():
        load_adapter(model, saved_lora)
        assert torch.equal(model.block.fc.weight, torch.full((24, 32), 0.5))


# ---- bad files: the model stays as it was ----------------------------------------------------------
@pytest.fixture
def saved_lora(tmp_path: Path) -> Path:
    save_adapter(adapted("lora"), tmp_path / "lora")
    return tmp_path / "lora"


def edit_tensors(folder: Path, change) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, folder / "adapter_model.safetensors")


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    change(config)
    (folder / "adapter_config.json").write_text(json.dumps(config))


def our_field(folder: Path) -> dict | None:
    """Our "peft_layers" field, read with safetensors' own reader from the weights' metadata."""
    assert "peft_layers" not in json.loads((folder / "adapter_config.json").read_text())
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "pt"
    return None if "peft_layers" not in metadata else json.loads(metadata["peft_layers"])


def edit_metadata(folder: Path, change) -> None:
    """Rewrite the weights file with ``change(metadata)`` applied to its metadata."""
    path = str(folder / "adapter_model.safetensors")
    with safe_open(path, framework="pt") as handle:
        metadata = dict(handle.metadata())
    tensors = load_file(path)
    change(metadata)
    save_file(tensors, path, metadata=metadata)


def targets() -> list[nn.Module]:
    """A plain model (load injects) and one with LoRA layers (load fills)."""
    with_layers = inject_adapters(base_net(), list(PATHS), rank=4, rank_pattern={"^block\\.out": 2})
    return [base_net(), randomize(with_layers, seed=8)]


def assert_load_fails(folder: Path, error: type, match: str, **kwargs) -> None:
    for model in targets():
        before = snapshot(model)
        with pytest.raises(error, match=match):
            load_adapter(model, folder, **kwargs)
        assert_unchanged(model, before)


def test_truncated_safetensors(saved_lora: Path) -> None:
    path = saved_lora / "adapter_model.safetensors"
    data = path.read_bytes()
    for cut in (len(data) - 3, len(data) // 2, 6):
        path.write_bytes(data[:cut])
        assert_load_fails(saved_lora, ValueError, "adapter_model.safetensors.*truncated or corrupt")


def test_corrupt_header(saved_lora: Path) -> None:
    path = saved_lora / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[10:20] = b"\xff" * 10
    path.write_bytes(bytes(data))
    assert_load_fails(saved_lora, ValueError, "truncated or corrupt")


def test_truncated_bin(saved_lora: Path) -> None:
    tensors = load_file(saved_lora / "adapter_model.safetensors")
    (saved_lora / "adapter_model.safetensors").unlink()
    torch.save(tensors, saved_lora / "adapter_model.bin")
    data = (saved_lora / "adapter_model.bin").read_bytes()
    (saved_lora / "adapter_model.bin").write_bytes(data[: len(data) // 2])
    assert_load_fails(saved_lora, ValueError, "adapter_model.bin.*truncated or corrupt")


def test_corrupt_json(saved_lora: Path) -> None:
    (saved_lora / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    assert_load_fails(saved_lora, ValueError, "adapter_config.json.*not a valid JSON")
    (saved_lora / "adapter_config.json").write_text("[1, 2]")
    assert_load_fails(saved_lora, ValueError, "expected a JSON object")


def test_wrong_rank_in_config(saved_lora: Path) -> None:
    edit_config(saved_lora, lambda c: c.update(r=8))
    assert_load_fails(saved_lora, ValueError, r"'(block\.)?fc' has rank 4 but adapter_config.json gives it rank 8")


def test_rank_that_does_not_fit_the_model(saved_lora: Path) -> None:
    def to_rank_3(tensors):
        tensors["base_model.model.fc.lora_A.weight"] = tensors["base_model.model.fc.lora_A.weight"][:3]
        tensors["base_model.model.fc.lora_B.weight"] = tensors["base_model.model.fc.lora_B.weight"][:, :3].contiguous()

    edit_tensors(saved_lora, to_rank_3)
    edit_config(saved_lora, lambda c: c["rank_pattern"].update({"^fc": 3}))
    read_adapter(saved_lora)  # a consistent file ...
    model = targets()[1]  # ... that does not fit layers of rank 4
    before = snapshot(model)
    with pytest.raises(ValueError, match="'fc': the file has rank 3, the model's layer has rank 4"):
        load_adapter(model, saved_lora)
    assert_unchanged(model, before)


def test_shapes_that_do_not_fit_the_model(saved_lora: Path) -> None:
    def widen(tensors):
        tensors["base_model.model.fc.lora_A.weight"] = torch.randn(4, 20)

    edit_tensors(saved_lora, widen)
    assert_load_fails(saved_lora, ValueError, "'fc'.*do not fit|'fc': lora_A has shape")


def test_missing_key(saved_lora: Path) -> None:
    edit_tensors(saved_lora, lambda t: t.pop("base_model.model.block.fc.lora_B.weight"))
    assert_load_fails(saved_lora, ValueError, "missing key base_model.model.block.fc.lora_B.weight")


def test_missing_module_for_existing_layers(saved_lora: Path) -> None:
    edit_tensors(saved_lora, lambda t: [t.pop(k) for k in list(t) if ".block.out." in k])
    edit_config(saved_lora, lambda c: c.update(rank_pattern={}))
    model = targets()[1]
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"missing keys: the model's adapter layers \['block.out'\]"):
        load_adapter(model, saved_lora)
    assert_unchanged(model, before)


def test_extra_key(saved_lora: Path) -> None:
    edit_tensors(saved_lora, lambda t: t.update({"base_model.model.fc.lora_C.weight": torch.zeros(2)}))
    assert_load_fails(saved_lora, ValueError, "unexpected key 'base_model.model.fc.lora_C.weight'")


def test_extra_module(saved_lora: Path) -> None:
    def add_head(tensors):
        tensors["base_model.model.head.lora_A.weight"] = torch.zeros(4, 16)
        tensors["base_model.model.head.lora_B.weight"] = torch.zeros(16, 4)

    edit_tensors(saved_lora, add_head)
    edit_config(saved_lora, lambda c: c["target_modules"].append("head"))
    assert_load_fails(saved_lora, ValueError, "adapter for 'head'.*no module")


def test_non_float_and_non_finite_tensors(saved_lora: Path) -> None:
    key = "base_model.model.fc.lora_B.weight"
    original = load_file(saved_lora / "adapter_model.safetensors")[key]
    edit_tensors(saved_lora, lambda t: t.update({key: original.to(torch.int32)}))
    assert_load_fails(saved_lora, ValueError, "dtype torch.int32")
    edit_tensors(saved_lora, lambda t: t.update({key: original.clone().fill_(math.nan)}))
    assert_load_fails(saved_lora, ValueError, "NaN")
    # float8 has no isfinite (a NotImplementedError from torch before), and no layer holds it
    edit_tensors(saved_lora, lambda t: t.update({key: original.to(torch.float8_e4m3fn)}))
    assert_load_fails(saved_lora, ValueError, rf"tensor '{key}' has dtype torch.float8_e4m3fn; expected one of")
    # finite in float64, inf once copied into the float32 layer (loaded as inf before)
    edit_tensors(saved_lora, lambda t: t.update({key: original.double().fill_(1e39)}))
    assert_load_fails(saved_lora, ValueError, rf"tensor '{key}' \(float64\) holds values beyond float32's range")
    edit_tensors(saved_lora, lambda t: t.update({key: original.double()}))  # float64 in range loads
    model = base_net()
    load_adapter(model, saved_lora)
    assert torch.equal(model.fc.lora_B, original)


@pytest.mark.parametrize("kind", ["meta", "sparse"])
def test_a_bin_with_tensors_without_dense_values_is_refused(saved_lora: Path, kind: str) -> None:
    # a pickled .bin can hold them: raw torch errors before, and a meta buffer of a module to save
    # failed after the adapter tensors were copied into the model
    tensors = load_file(saved_lora / "adapter_model.safetensors")
    (saved_lora / "adapter_model.safetensors").unlink()
    key = "base_model.model.fc.lora_A.weight"
    tensors[key] = torch.empty(tensors[key].shape, device="meta") if kind == "meta" else tensors[key].to_sparse()
    torch.save(tensors, saved_lora / "adapter_model.bin")
    where = "on the meta device" if kind == "meta" else "of layout torch.sparse_coo"
    assert_load_fails(saved_lora, ValueError, rf"adapter_model.bin: tensor '{key}' is {where}.*; expected a dense tensor")


def test_a_config_that_leaves_out_a_module_the_file_holds_is_refused(saved_lora: Path) -> None:
    # Hugging Face PEFT would load no adapter there; loading one gave other outputs than theirs
    edit_config(saved_lora, lambda c: c.update(exclude_modules=["block.out"]))
    assert_load_fails(saved_lora, ValueError, r"module 'block.out' has adapter tensors, but adapter_config.json leaves it out: exclude_modules=\['block.out'\] excludes it")
    # (a name target_modules lists exactly escapes layers_to_transform: here "fc", not "block.fc")
    edit_config(saved_lora, lambda c: c.update(exclude_modules=None, layers_to_transform=[0], target_modules=["fc", "out"]))
    assert_load_fails(saved_lora, ValueError, r"module 'block.fc' has adapter tensors, .*it has no layer index, not in layers_to_transform=\[0\]")
    edit_config(saved_lora, lambda c: c.update(layers_to_transform=None, exclude_modules="nothing"))
    load_adapter(base_net(), saved_lora)  # an exclusion that leaves out nothing the file holds


def test_an_empty_layers_to_transform_selects_no_layers_by_index(saved_lora: Path) -> None:
    # as in Hugging Face PEFT, [] is no selection; read as a list of indices it would leave out block.fc
    x = inputs()
    expected = load_adapter(base_net(), saved_lora).eval()(x)
    edit_config(saved_lora, lambda c: c.update(layers_to_transform=[], target_modules=["fc", "out"]))
    assert torch.equal(load_adapter(base_net(), saved_lora).eval()(x), expected)


def test_an_exclude_modules_regex_must_match_the_whole_name(saved_lora: Path) -> None:
    x = inputs()
    expected = load_adapter(base_net(), saved_lora).eval()(x)
    edit_config(saved_lora, lambda c: c.update(exclude_modules="block"))  # only a prefix of block.fc and block.out
    assert torch.equal(load_adapter(base_net(), saved_lora).eval()(x), expected)
    edit_config(saved_lora, lambda c: c.update(exclude_modules=r"block\..*"))
    assert_load_fails(saved_lora, ValueError, r"module 'block.fc' has adapter tensors, but adapter_config.json leaves it out: exclude_modules=")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("r", 0, r"r must be an int > 0, got 0"), ("lora_dropout", 1, r"lora_dropout must be a number in \[0, 1\), got 1")],
    ids=["r", "lora_dropout"],
)
def test_config_values_at_the_edge_of_their_range_are_refused_by_name(saved_lora: Path, field: str, value, message: str) -> None:
    edit_config(saved_lora, lambda c: c.update({field: value}))
    assert_load_fails(saved_lora, ValueError, rf"adapter_config.json: {message}")


def test_a_bias_of_a_lora_factor_is_an_unexpected_key(saved_lora: Path) -> None:
    # Hugging Face PEFT's lora_bias=True writes <p>.lora_B.bias: no bias of a module named lora_B
    edit_tensors(saved_lora, lambda t: t.update({"base_model.model.fc.lora_B.bias": torch.zeros(32)}))
    assert_load_fails(saved_lora, ValueError, r"unexpected key 'base_model\.model\.fc\.lora_B\.bias'")


def test_a_bias_of_a_non_adapter_module_needs_bias_all_in_the_config(saved_lora: Path) -> None:
    edit_tensors(saved_lora, lambda t: t.update({"base_model.model.norm.bias": torch.ones(16)}))
    assert_load_fails(
        saved_lora, ValueError,
        r"holds biases of non-adapter modules \['norm'\] but adapter_config.json says bias='none'",
    )


def test_values_beyond_the_models_half_precision_range_are_refused(tmp_path: Path) -> None:
    # finite in the file's float32, inf once copied into a float16 model (and save_adapter refused it)
    source = inject_adapters(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), ["0"], rank=2, bias="adapter_only", modules_to_save=["1"])
    save_adapter(source, tmp_path)
    for key in ("base_model.model.0.base_layer.bias", "base_model.model.1.weight"):
        edit_tensors(tmp_path, lambda t: t[key].__setitem__(0, 1e5))
        for half in (nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).half(), inject_adapters(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).half(), ["0"], rank=2, bias="adapter_only", modules_to_save=["1"])):
            before = snapshot(half)
            with pytest.raises(ValueError, match=r"holds values up to 100000, beyond what the model's torch.float16 holds \(largest 65504\): they would not load as themselves"):
                load_adapter(half, tmp_path)
            assert_unchanged(half, before)
        edit_tensors(tmp_path, lambda t: t[key].__setitem__(0, 1.0))
    edit_tensors(tmp_path, lambda t: t["base_model.model.0.base_layer.bias"].__setitem__(0, 65510.0))
    half = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).half()
    load_adapter(half, tmp_path)  # in range (65510 rounds to float16's 65504): loads
    assert half[0].bias[0] == 65504 and torch.isfinite(half[1].trained.weight).all()
    # float8 e4m3fn has no inf (a cast clamps to 448) and no aminmax on the CPU: a load in range works
    eight = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    eight[1].to(torch.float8_e4m3fn)
    load_adapter(eight, tmp_path)
    assert eight[1].trained.weight.dtype == torch.float8_e4m3fn
    edit_tensors(tmp_path, lambda t: t["base_model.model.1.weight"].__setitem__(0, 1000.0))  # e4m3fn: at most 448
    eight = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    eight[1].to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"weight holds values up to 1000, beyond what the model's torch.float8_e4m3fn holds \(largest 448\)"):
        load_adapter(eight, tmp_path)
    # float64 reaches float16 through float32: 65519.999 rounds to 65520 there, then to inf
    edit_tensors(tmp_path, lambda t: t.update({"base_model.model.1.weight": t["base_model.model.1.weight"].double()}))
    edit_tensors(tmp_path, lambda t: t["base_model.model.1.weight"].__setitem__(0, 65519.999))
    with pytest.raises(ValueError, match=r"weight holds values up to 65520, beyond what the model's torch.float16"):
        load_adapter(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).half(), tmp_path)
    edit_tensors(tmp_path, lambda t: t["base_model.model.1.weight"].__setitem__(0, 1.0))
    # a DoRA model cast to float16 for inference holds its magnitudes in float16 too
    dora = inject_adapters(nn.Sequential(nn.Linear(8, 8)), ["0"], method="dora", rank=2)
    save_adapter(dora, tmp_path / "dora")
    edit_tensors(tmp_path / "dora", lambda t: t["base_model.model.0.lora_magnitude_vector"].__setitem__(0, 1e5))
    target = inject_adapters(nn.Sequential(nn.Linear(8, 8)), ["0"], method="dora", rank=2).half()
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"0.magnitude holds values up to 100000, beyond what the model's torch.float16"):
        load_adapter(target, tmp_path / "dora")
    assert_unchanged(target, before)


def test_save_refuses_non_finite_tensors_it_could_not_load_back(tmp_path: Path) -> None:
    """A diverged adapter (NaN) was written, and load_adapter then refused the file."""
    model = adapted("lora")
    with torch.no_grad():
        model.block.fc.lora_A[0, 0] = math.inf
    with pytest.raises(ValueError, match=r"save_adapter\(\): \['base_model.model.block.fc.lora_A.weight'\] hold NaN or inf.*Nothing was written"):
        save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_compute_dtype_of_the_wrong_type_in_our_field_is_named(tmp_path: Path) -> None:
    save_adapter(adapted("qlora"), tmp_path)
    field = our_field(tmp_path)
    field["quant"]["compute_dtype"] = ["float32"]  # unhashable: a bare TypeError before
    edit_metadata(tmp_path, lambda m: m.update(peft_layers=json.dumps(field)))
    with pytest.raises(ValueError, match=r"peft_layers.quant.compute_dtype must be one of .*got \['float32'\]"):
        load_adapter(base_net(), tmp_path)


def test_invalid_regexes_in_the_config_are_named(saved_lora: Path) -> None:
    """A bad ``target_modules`` regex and a ``rank_pattern`` key valid alone but not inside Hugging
    Face's ``(.*\\.)?(key)$`` raised a bare ``re.error``."""
    edit_config(saved_lora, lambda c: c.update(target_modules=".*(fc|out"))
    assert_load_fails(saved_lora, ValueError, r"adapter_config.json: target_modules '\.\*\(fc\|out' is not a valid regex")
    edit_config(saved_lora, lambda c: c.update(target_modules=["fc", "out"], rank_pattern={"(?i)fc": 4}))
    assert_load_fails(saved_lora, ValueError, r"adapter_config.json: rank_pattern key '\(\?i\)fc' is not a valid regex")


def test_an_empty_directory_argument_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``save_adapter(model, os.environ.get("OUT", ""))`` wrote into the working directory."""
    monkeypatch.chdir(tmp_path)
    for call in (lambda: save_adapter(adapted("lora"), ""), lambda: load_adapter(base_net(), "")):
        with pytest.raises(ValueError, match=r"^directory: expected a path, got an empty one"):
            call()
    assert list(tmp_path.iterdir()) == []
    save_adapter(adapted("lora"), ".")  # the working directory, said so
    assert (tmp_path / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("wrap", ["compile", "data_parallel", "both"])
def test_wrapped_models_save_and_load_under_their_own_names(wrap: str, tmp_path: Path) -> None:
    """``torch.compile`` names every module ``_orig_mod.<p>`` and data parallelism ``module.<p>``:
    files saved from such a model held those names, which neither a plain model nor Hugging Face
    PEFT could load. The tools see through the wrappers, both ways, state dicts and stacks too."""
    def wrapped(model: nn.Module) -> nn.Module:
        if wrap in ("data_parallel", "both"):
            model = nn.DataParallel(model)
        return torch.compile(model, backend="eager") if wrap in ("compile", "both") else model

    plain = adapted("lora")
    x = inputs()
    expected = plain.eval()(x)
    wrapper = wrapped(plain)
    assert pl.adapter_state_dict(wrapper).keys() == pl.adapter_state_dict(plain).keys()
    save_adapter(wrapper, tmp_path / "from_wrapped")
    assert load_file(tmp_path / "from_wrapped" / "adapter_model.safetensors").keys() == {
        f"base_model.model.{p}.lora_{f}.weight" for p in PATHS for f in "AB"
    }
    assert torch.equal(load_adapter(base_net(), tmp_path / "from_wrapped").eval()(x), expected)
    into = wrapped(base_net())
    assert load_adapter(into, tmp_path / "from_wrapped") is into
    assert torch.equal(into.eval()(x), expected)
    fresh = wrapped(pl.inject_adapters(base_net(), list(PATHS), rank=4, alpha=8.0, rank_pattern={"^block\\.out": 2}))
    assert pl.load_adapter_state_dict(fresh, pl.adapter_state_dict(plain)) is fresh
    assert torch.equal(fresh.eval()(x), expected)
    stacked = pl.stack_adapters(wrapped(base_net()), {"a": tmp_path / "from_wrapped"})
    pl.set_adapter(stacked, "a")
    with torch.no_grad():
        torch.testing.assert_close(stacked(x), expected, rtol=1e-6, atol=1e-6)


def test_a_model_module_named_base_layer_is_no_nested_adapter(tmp_path: Path) -> None:
    """The check for Hugging Face PEFT's nested adapters (a key under another adapter's
    ``base_layer``) took any path through a module the model itself names ``base_layer``: our own
    file of such a model was refused."""
    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.base_layer = Inner()

        def forward(self, x: Tensor) -> Tensor:
            return self.base_layer.fc(x)

    model = randomize(inject_adapters(Outer(), ["fc"], rank=2))
    save_adapter(model, tmp_path)
    x = torch.randn(3, 8)
    assert torch.equal(load_adapter(Outer(), tmp_path)(x), model(x))


class _WithBaseLayer(nn.Module):
    """``enc.base_layer``: a plain module of the model named ``base_layer``, beside the target
    ``enc.fc``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Module()
        self.enc.base_layer = nn.Linear(8, 8)
        self.enc.fc = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.enc.fc(torch.tanh(self.enc.base_layer(x)))


@needs_peft
def test_a_trained_bias_of_a_model_module_named_base_layer_loads(tmp_path: Path) -> None:
    """With ``bias="all"``, the bias of the model's own ``enc.base_layer`` is saved as
    ``enc.base_layer.bias``, which the reader took for the base bias of an adapter at ``enc`` and
    refused ("a bias for 'enc' without the module's own tensors"). No target matches ``enc``, so
    it is that module's bias, as Hugging Face PEFT loads it."""
    import peft

    model = inject_adapters(_WithBaseLayer(), ["fc"], rank=2, bias="all")
    randomize(model)
    with torch.no_grad():
        model.enc.base_layer.bias.add_(1.0)
    save_adapter(model, tmp_path)
    assert "base_model.model.enc.base_layer.bias" in load_file(tmp_path / "adapter_model.safetensors")
    assert set(read_adapter(tmp_path).other_biases) == {"enc.base_layer"}
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
        for into in (_WithBaseLayer(), inject_adapters(_WithBaseLayer(), ["fc"], rank=2, bias="all")):
            loaded = load_adapter(into, tmp_path)  # injects, then fills
            assert torch.equal(loaded.enc.base_layer.bias, model.enc.base_layer.bias)
            assert torch.equal(loaded(x), expected)
        theirs = peft.PeftModel.from_pretrained(_WithBaseLayer(), tmp_path)
        torch.testing.assert_close(theirs(x), expected, rtol=1e-5, atol=1e-6)


def test_hugging_face_layer_kinds_we_do_not_support_are_named(saved_lora: Path) -> None:
    """Embedding, convolution and nested (nn.MultiheadAttention) adapters, and modules saved for
    ``ensure_weight_tying``, were refused with messages about key forms, shapes or targets."""
    a_key, b_key = "base_model.model.fc.lora_A.weight", "base_model.model.fc.lora_B.weight"
    original = load_file(saved_lora / "adapter_model.safetensors")
    edit_tensors(saved_lora, lambda t: t.update({"base_model.model.fc.lora_embedding_A": torch.zeros(4, 10)}))
    assert_load_fails(saved_lora, ValueError, r"lora_embedding_A' is a LoRA factor of an embedding layer .* does not support")
    edit_tensors(saved_lora, lambda t: (t.clear(), t.update(original), t.update(
        {a_key: original[a_key][:, :, None, None].contiguous(), b_key: original[b_key][:, :, None, None].contiguous()})))
    assert_load_fails(saved_lora, ValueError, r"'fc': lora_A \(4, 16, 1, 1\) .* are the factors of a convolution layer")
    nested = {k.replace("model.block.fc.", "model.block.out.base_layer.fc."): v for k, v in original.items()}
    edit_tensors(saved_lora, lambda t: (t.clear(), t.update(nested)))
    assert_load_fails(saved_lora, ValueError, r"'block.out.base_layer.fc' lies inside the base_layer of the adapter of 'block.out'.*MultiheadAttention")
    edit_tensors(saved_lora, lambda t: (t.clear(), t.update(original), t.update({"base_model.model.norm.weight": torch.ones(16)})))
    edit_config(saved_lora, lambda c: c.update(ensure_weight_tying=True))
    assert_load_fails(saved_lora, ValueError, r"unexpected key 'base_model.model.norm.weight'.*ensure_weight_tying=true .* does not support")


def test_not_a_lora_config(saved_lora: Path) -> None:
    edit_config(saved_lora, lambda c: c.update(peft_type="IA3"))
    assert_load_fails(saved_lora, ValueError, "peft_type must be 'LORA'")
    edit_config(saved_lora, lambda c: c.update(peft_type="LORA", lora_bias=True))
    assert_load_fails(saved_lora, ValueError, "lora_bias")
    edit_config(saved_lora, lambda c: c.update(lora_bias=False, fan_in_fan_out="yes"))
    assert_load_fails(saved_lora, ValueError, "fan_in_fan_out must be true or false")


def test_fan_in_fan_out_follows_each_layers_type(saved_lora: Path) -> None:
    """As in Hugging Face PEFT, a layer's type says how its base stores the weight: a config's
    fan_in_fan_out=true over nn.Linear layers changes nothing (Conv1D layers: tests/test_conv1d.py)."""
    x = inputs()
    expected = load_adapter(base_net(), saved_lora).eval()(x)
    edit_config(saved_lora, lambda c: c.update(fan_in_fan_out=True))
    assert torch.equal(load_adapter(base_net(), saved_lora).eval()(x), expected)


@pytest.mark.parametrize(
    ("field", "extra_key"),
    [("arrow_config", None), ("kasa_config", "lora_diag"), ("monteclora_config", None)],
)
def test_config_fields_of_other_forwards_are_refused_by_name(saved_lora: Path, field: str, extra_key) -> None:
    """Arrow routing, KaSA and MonteCLoRA change what the adapter computes: refused, naming the
    config field (before any unexpected key a variant's tensors would otherwise be reported as)."""
    if extra_key is not None:
        edit_tensors(saved_lora, lambda t: t.update({f"base_model.model.fc.{extra_key}": torch.ones(4)}))
    edit_config(saved_lora, lambda c: c.update({field: {"some": 1}}))
    assert_load_fails(saved_lora, ValueError, f"{field}=.* is not supported by peft_layers")


def test_velora_files_load_as_the_plain_lora_they_compute(saved_lora: Path, tmp_path: Path) -> None:
    """VeLoRA (velora_config) changes only what backward keeps: its files load as plain LoRA, without
    the per-layer ``lora_velora_embed`` buffers Hugging Face PEFT saves."""
    x = inputs()
    expected = load_adapter(base_net(), saved_lora).eval()(x)

    def add_velora(tensors):
        for path in PATHS:
            tensors[f"base_model.model.{path}.lora_velora_embed"] = torch.ones(1)

    edit_tensors(saved_lora, add_velora)
    edit_config(saved_lora, lambda c: c.update(velora_config={"init_type": "batch_average", "num_groups": 64, "scale": 1.0}))
    assert torch.equal(load_adapter(base_net(), saved_lora).eval()(x), expected)
    edit_config(saved_lora, lambda c: c.update(velora_config=None))  # without the field: still refused
    assert_load_fails(saved_lora, ValueError, "unexpected key .*lora_velora_embed")


@needs_peft
def test_a_hugging_face_velora_adapter_loads_with_its_outputs(tmp_path: Path) -> None:
    from peft.tuners.lora.config import VeloraConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = hf_model({"r": 4, "lora_alpha": 8, "target_modules": ["fc", "out"], "velora_config": VeloraConfig()})
    theirs.save_pretrained(tmp_path)
    assert any("velora" in key for key in load_file(tmp_path / "adapter_model.safetensors"))
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(load_adapter(base_net(), tmp_path).eval()(x), theirs(x), rtol=1e-6, atol=1e-6)


def test_dora_file_is_never_loaded_as_lora(tmp_path: Path) -> None:
    save_adapter(adapted("dora"), tmp_path)
    lora_layers = targets()[1]
    before = snapshot(lora_layers)
    with pytest.raises(ValueError, match="DoRA adapter.*would drop the magnitudes"):
        load_adapter(lora_layers, tmp_path)
    assert_unchanged(lora_layers, before)
    plain = base_net()
    before = snapshot(plain)
    with pytest.raises(ValueError, match="cannot hold the DoRA adapter"):
        load_adapter(plain, tmp_path, method="lora")
    assert_unchanged(plain, before)
    # a config that hides the magnitudes (use_dora false) is caught by its keys
    edit_config(tmp_path, lambda c: c.update(use_dora=False))
    with pytest.raises(ValueError, match="unexpected key .*lora_magnitude_vector"):
        load_adapter(plain, tmp_path)
    assert_unchanged(plain, before)


def test_lora_file_is_not_loaded_into_dora_layers(saved_lora: Path) -> None:
    dora = randomize(inject_adapters(base_net(), list(PATHS), method="dora", rank=4,
                                     rank_pattern={"^block\\.out": 2}))
    before = snapshot(dora)
    with pytest.raises(ValueError, match="plain LoRA adapter.*no lora_magnitude_vector"):
        load_adapter(dora, saved_lora)
    assert_unchanged(dora, before)
    plain = base_net()
    with pytest.raises(ValueError, match="needs DoRA magnitudes"):
        load_adapter(plain, saved_lora, method="dora")
    edit_config(saved_lora, lambda c: c.update(use_dora=True))
    with pytest.raises(ValueError, match="missing key .*lora_magnitude_vector"):
        load_adapter(plain, saved_lora)


def test_merged_layers_and_inject_kwargs_are_refused(saved_lora: Path) -> None:
    model = targets()[1]
    model.fc.merge()
    before = snapshot(model)
    with pytest.raises(ValueError, match="merged"):
        load_adapter(model, saved_lora)
    assert_unchanged(model, before)
    with pytest.raises(TypeError, match="apply only when the model has no adapter layers"):
        load_adapter(model, saved_lora, dropout=0.1)
    with pytest.raises(TypeError, match="come from the adapter file"):
        load_adapter(base_net(), saved_lora, rank=2)


def test_arguments_the_file_decides_are_refused_by_name(tmp_path: Path) -> None:
    """``modules_to_save=`` was dropped without a word when the file has modules to save, and
    ``exclude=`` went on to inject_adapters and failed later with a message about the model's
    adapters. Like ``rank=``, both are refused up front, with or without adapters in the model."""
    save_adapter(adapted("lora", modules_to_save=["norm"]), tmp_path / "with_saved")
    save_adapter(adapted("lora"), tmp_path / "plain")
    for folder in ("with_saved", "plain"):
        for name, value in (("modules_to_save", ["block.fc"]), ("exclude", ["block.fc"]), ("targets", ["fc"])):
            for model in (base_net(), inject_adapters(base_net(), list(PATHS), rank=4, modules_to_save=["norm"])):
                before = snapshot(model)
                with pytest.raises(TypeError, match=rf"\['{name}'\] come from the adapter file .*got {name}=\['"):
                    load_adapter(model, tmp_path / folder, **{name: value})
                assert_unchanged(model, before)
    with pytest.raises(TypeError, match=r"\['modules_to_save'\] come from the adapter file"):
        load_adapter(base_net(), tmp_path / "missing", modules_to_save=["norm"])  # before the files are read
    loaded = load_adapter(base_net(), tmp_path / "with_saved", dropout=0.0)  # a layer argument the file leaves open
    assert [name for name, module in loaded.named_modules() if isinstance(module, pl.ModuleToSave)] == ["norm"]


def test_failure_after_injection_is_undone(saved_lora: Path, monkeypatch) -> None:
    model = base_net()
    model.norm.weight.requires_grad_(True)  # inject would freeze it: the rollback must not
    before = snapshot(model)

    def boom(plan, adapter):
        raise RuntimeError("simulated failure while copying")

    monkeypatch.setattr(io._load, "_apply", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        load_adapter(model, saved_lora)
    assert_unchanged(model, before)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_pissa_file_recreates_the_residual_and_rolls_it_back(tmp_path: Path, monkeypatch) -> None:
    model = inject_adapters(base_net(), list(PATHS), rank=4, rank_pattern={"^block\\.out": 2}, init="pissa")
    randomize(model).eval()
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    x = inputs()
    loaded = load_adapter(base_net(), tmp_path).eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    plain_lora = targets()[1]  # layers whose base is not a PiSSA residual
    with pytest.raises(ValueError, match="PiSSA"):
        load_adapter(plain_lora, tmp_path)
    monkeypatch.setattr(io._load, "_apply", lambda plan, adapter: (_ for _ in ()).throw(RuntimeError("late")))
    fresh = base_net()
    before = snapshot(fresh)
    with pytest.raises(RuntimeError, match="late"):
        load_adapter(fresh, tmp_path)
    assert_unchanged(fresh, before)  # the base weights PiSSA rewrote are back


@needs_peft
def test_pissa_file_means_the_same_in_peft(tmp_path: Path) -> None:
    import peft

    # both libraries rebuild the PiSSA residual W0 - U_r S_r V_r^T of the plain base on load
    model = randomize(inject_adapters(base_net(), list(PATHS), rank=4, init="pissa")).eval()
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base_net(), tmp_path).eval()
    x = inputs()
    torch.testing.assert_close(theirs(x), model(x), rtol=1e-5, atol=1e-5)


# ---- atomic save ---------------------------------------------------------------------------------
def test_crash_mid_save_leaves_the_old_files(tmp_path: Path, monkeypatch) -> None:
    save_adapter(adapted("lora"), tmp_path)
    old = folder_bytes(tmp_path)
    new_model = adapted("dora", seed=0)
    model_before = snapshot(new_model)
    real_replace = os.replace

    for failing_call in (1, 2):
        calls = {"n": 0}

        def replace(src, dst, _failing=failing_call, _calls=calls):
            _calls["n"] += 1
            if _calls["n"] == _failing:
                raise OSError("simulated crash")
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(OSError, match="simulated crash"):
            save_adapter(new_model, tmp_path)
        monkeypatch.setattr(os, "replace", real_replace)
        assert folder_bytes(tmp_path) == old, f"crash at rename {failing_call}"
        assert_unchanged(new_model, model_before)

    import safetensors.torch

    def broken_writer(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(new_model, tmp_path)
    monkeypatch.undo()
    assert folder_bytes(tmp_path) == old
    # a save that goes through replaces both files and leaves no temporary files behind
    save_adapter(new_model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert read_adapter(tmp_path).method == "dora"


def test_a_failed_save_removes_the_folders_it_created_only(tmp_path: Path, monkeypatch) -> None:
    """A save that failed while writing (a full disk) left the folders it had created behind,
    empty (``runs/adapter/math/``). It removes those, and only those."""
    import errno

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "old" / "keep").mkdir(parents=True)
    save_adapter(adapted("lora"), tmp_path / "old", adapter_name="math")
    old = folder_bytes(tmp_path / "old" / "math")
    monkeypatch.setattr(os, "fsync", full_disk)
    model = adapted("dora")
    for directory, adapter_name in (
        (tmp_path / "runs" / "adapter", "math"),  # three new folders
        (tmp_path / "old" / "new", None),  # one new folder in an old one
        (tmp_path / "old" / "keep", "math"),  # one new folder in an old, empty one
        (tmp_path / "old", "math"),  # an old adapter: no new folder
        (tmp_path / "old" / "keep", None),  # an old empty folder
    ):
        with pytest.raises(OSError, match="No space left"):
            save_adapter(model, directory, adapter_name=adapter_name)
    monkeypatch.undo()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "old", "old/keep", "old/math", "old/math/adapter_config.json", "old/math/adapter_model.safetensors",
    ]
    assert folder_bytes(tmp_path / "old" / "math") == old


def test_saving_a_model_on_the_meta_device_is_refused_by_name(tmp_path: Path) -> None:
    """It raised torch's ``NotImplementedError: Cannot copy out of meta tensor``."""
    with torch.device("meta"), pytest.warns(UserWarning, match="the base layer is on the meta device"):
        model = inject_adapters(Net(), list(PATHS), rank=4)
    with pytest.raises(ValueError, match=r"save_adapter\(\): model: \['base_model.model.block.fc.lora_A.weight', .* and 1 more are on the meta device.*materialise the model first"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_save_refuses_what_one_file_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no adapter layers"):
        save_adapter(base_net(), tmp_path)
    mixed = inject_adapters(base_net(), re.compile("fc"), method="dora", rank=2)
    inject_adapters(mixed, ["block.fc"], method="lora", rank=2)
    with pytest.raises(ValueError, match=r"mixes.*save pl\.adapter_state_dict\(model\).*pl\.load_adapter_state_dict\(\)"):
        save_adapter(mixed, tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_mixed_model_keeps_its_adapters_the_way_the_refusal_says(tmp_path: Path) -> None:
    """LoRA beside DoRA has no adapter file; the refusal's route (the adapter state dict in a
    safetensors file, loaded into a model injected the same way) restores the model exactly."""
    from safetensors.torch import load_file, save_file

    def mixed() -> Net:
        model = inject_adapters(base_net(), re.compile("fc"), method="dora", rank=2)
        return inject_adapters(model, ["block.fc"], method="lora", rank=2)

    torch.manual_seed(0)
    trained = mixed()
    with torch.no_grad():
        for parameter in pl.adapter_state_dict(trained).values():
            parameter.add_(torch.randn_like(parameter))
    save_file(pl.adapter_state_dict(trained), tmp_path / "adapters.safetensors")
    restored = mixed()
    pl.load_adapter_state_dict(restored, load_file(tmp_path / "adapters.safetensors"))
    x = inputs()
    assert torch.equal(restored(x), trained(x))
    assert not torch.equal(mixed()(x), trained(x))


def partly_quantized_net() -> Net:
    """``base_net()`` with ``block.fc`` a bitsandbytes NF4 layer and the others float, as
    transformers loads a model in 4 bits that keeps some layers unquantized (T5's ``wo``). Blocks
    of 32, its in_features: bitsandbytes' CPU kernel misreads blocks that span rows."""
    from models import bnb_linear4bit

    net = base_net()
    net.block.fc = bnb_linear4bit(net.block.fc, blocksize=32)
    return net


def test_quantized_and_float_layers_save_as_one_adapter(tmp_path: Path) -> None:
    model = inject_adapters(base_net(), ["fc", "block.fc"], method="qdora", rank=4, alpha=8.0, quant="fp4")
    inject_adapters(model, ["block.out"], method="dora", rank=2, alpha=8.0)
    randomize(model).eval()
    save_adapter(model, tmp_path)
    quant = {"scheme": "fp4", "blocksize": 64, "double_quant": True, "compute_dtype": "float32"}
    assert our_field(tmp_path) == {"version": 2, "method": "qdora", "quant": quant, "float_modules": ["block.out"]}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["use_dora"], config["r"], config["rank_pattern"]) == (True, 4, {"^block\\.out": 2})
    # into a float model: the quantized layers are quantized as recorded, block.out stays float
    loaded = load_adapter(base_net(), tmp_path).eval()
    assert [(n, method_of(l)) for n, l in iter_adapter_layers(loaded)] == [
        ("fc", "qdora"), ("block.fc", "qdora"), ("block.out", "dora"),
    ]
    assert [l.rank for _, l in iter_adapter_layers(loaded)] == [4, 4, 2]
    x = inputs()
    assert torch.equal(loaded(x), model(x))
    # a caller's quantization applies to the quantized layers only; a named method to all
    nf4 = load_adapter(base_net(), tmp_path, quant="nf4", blocksize=32)
    assert [(l.base_layer.scheme, l.base_layer.blocksize) for _, l in list(iter_adapter_layers(nf4))[:2]] == [
        ("nf4", 32), ("nf4", 32),
    ]
    assert method_of(dict(iter_adapter_layers(nf4))["block.out"]) == "dora"
    assert {method_of(l) for _, l in iter_adapter_layers(load_adapter(base_net(), tmp_path, method="dora"))} == {"dora"}
    # the file still refuses what it cannot hold: two quantizations, LoRA beside QDoRA
    two = inject_adapters(base_net(), re.compile("fc"), method="qlora", rank=4, quant="fp4")
    inject_adapters(two, ["block.fc"], method="qlora", rank=4, quant="nf4")
    with pytest.raises(ValueError, match=r"one quantization for all layers, but the model mixes \{.*'scheme': 'fp4'.*\} at \['fc'\], \{.*'scheme': 'nf4'.*\} at \['block.fc'\]"):
        save_adapter(two, tmp_path / "two")
    unlike = inject_adapters(base_net(), re.compile("fc"), method="qdora", rank=4)
    inject_adapters(unlike, ["block.fc"], method="qlora", rank=4)
    with pytest.raises(ValueError, match=r"one method \(QLoRA may sit beside LoRA, QDoRA beside DoRA\) for all layers, but the model mixes 'qdora' at \['fc'\], 'qlora' at \['block.fc'\]"):
        save_adapter(unlike, tmp_path / "unlike")


def test_a_plain_file_over_a_partly_quantized_model(tmp_path: Path) -> None:
    """A Hugging Face file says nothing of quantization: over a model loaded in 4 bits with some
    layers kept float, its quantized layers get QLoRA and the float ones LoRA, as Hugging Face
    PEFT's per-layer dispatch does."""
    pytest.importorskip("bitsandbytes")
    save_adapter(adapted("lora"), tmp_path)
    assert our_field(tmp_path) is None
    loaded = load_adapter(partly_quantized_net(), tmp_path)
    assert [(n, method_of(l)) for n, l in iter_adapter_layers(loaded)] == [
        ("fc", "lora"), ("block.fc", "qlora"), ("block.out", "lora"),
    ]
    # the same layers built by hand and filled from the file (no injection in the load)
    by_hand = inject_adapters(partly_quantized_net(), ["block.fc"], method="qlora", rank=4, alpha=8.0)
    inject_adapters(by_hand, re.compile("fc"), method="lora", rank=4, alpha=8.0)
    inject_adapters(by_hand, ["block.out"], method="lora", rank=2, alpha=8.0)
    load_adapter(by_hand, tmp_path)
    x = inputs()
    assert torch.equal(loaded(x), by_hand(x))
    # the LoRA layers are injected first; the QLoRA layer, which takes no dtype, fails after
    # them, and the load undoes them
    model = partly_quantized_net()
    before = snapshot(model)
    with pytest.raises(TypeError, match="method 'qlora' takes no argument 'dtype'"):
        load_adapter(model, tmp_path, dtype=torch.float64)
    assert_unchanged(model, before)
    # saved again, the file is ours with the float layers listed, and loads back the same way
    save_adapter(loaded, tmp_path / "again")
    assert our_field(tmp_path / "again")["float_modules"] == ["fc", "block.out"]
    again = load_adapter(partly_quantized_net(), tmp_path / "again")
    assert torch.equal(again(x), loaded(x))
    if HAS_PEFT:  # Hugging Face PEFT puts the same file on the same model (bitsandbytes' train-mode path)
        import peft

        theirs = peft.PeftModel.from_pretrained(partly_quantized_net(), tmp_path / "again").train()
        torch.testing.assert_close(theirs(x), loaded.train()(x), rtol=1e-6, atol=1e-6)


def test_a_quantized_method_gives_the_float_layers_of_a_quantized_model_the_float_method(tmp_path: Path) -> None:
    """A model that holds quantized layers was loaded so (4/8 bits): its float layers were left
    float on purpose, and "qlora"/"qdora" gives them "lora"/"dora", as Hugging Face PEFT picks a
    layer class by the base. In a float model, the same call quantizes every target."""
    pytest.importorskip("bitsandbytes")
    model = inject_adapters(partly_quantized_net(), list(PATHS), method="qdora", rank=4, alpha=8.0, compute_dtype=torch.float32)
    assert [(n, method_of(l)) for n, l in iter_adapter_layers(model)] == [
        ("fc", "dora"), ("block.fc", "qdora"), ("block.out", "dora"),
    ]
    randomize(model)
    save_adapter(model, tmp_path)
    assert our_field(tmp_path)["float_modules"] == ["fc", "block.out"]
    loaded = load_adapter(partly_quantized_net(), tmp_path)
    x = inputs()
    assert torch.equal(loaded(x), model(x))
    assert {method_of(l) for _, l in iter_adapter_layers(inject_adapters(base_net(), list(PATHS), method="qdora", rank=4))} == {"qdora"}
    # a Hugging Face file with method="qlora" named: the same per-layer choice
    save_adapter(adapted("lora"), tmp_path / "plain")
    named = load_adapter(partly_quantized_net(), tmp_path / "plain", method="qlora")
    assert [method_of(l) for _, l in iter_adapter_layers(named)] == ["lora", "qlora", "lora"]
    # "all-linear" with a float method would adapt the float layers alone: refused, unless the
    # quantized ones are excluded
    with pytest.raises(ValueError, match=r"'all-linear' with method 'dora' would adapt the float layers only: Net has 1 quantized linear layer\(s\) \(\['block.fc'\]\), which method 'dora' cannot wrap; use method='qdora'"):
        inject_adapters(partly_quantized_net(), "all-linear", method="dora", rank=2)
    excluded = inject_adapters(partly_quantized_net(), "all-linear", method="dora", rank=2, exclude=["block.fc"])
    assert [n for n, _ in iter_adapter_layers(excluded)] == ["fc", "block.out"]


def test_loaded_quantized_is_the_same_in_one_call_or_several_and_ends_with_a_full_merge(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    one = inject_adapters(partly_quantized_net(), list(PATHS), method="qlora", rank=2)
    several = inject_adapters(partly_quantized_net(), ["block.fc"], method="qlora", rank=2)
    assert pl.model.loaded_quantized(several)  # the QLoRA layer's base came from bitsandbytes
    inject_adapters(several, re.compile("fc"), method="qlora", rank=2)
    inject_adapters(several, ["block.out"], method="qlora", rank=2)
    assert [(n, method_of(l)) for n, l in iter_adapter_layers(several)] == [
        (n, method_of(l)) for n, l in iter_adapter_layers(one)
    ] == [("fc", "lora"), ("block.fc", "qlora"), ("block.out", "lora")]
    save_adapter(several, tmp_path)
    assert our_field(tmp_path)["float_modules"] == ["fc", "block.out"]
    # merged back to float everywhere, the model is a float model (whatever its config says)
    merged = pl.merge_and_unload(one)
    merged.config = types.SimpleNamespace(quantization_config={"load_in_4bit": True})
    assert not pl.model.loaded_quantized(merged)
    with pytest.raises(TypeError, match="model: expected an nn.Module, got dict"):
        pl.model.loaded_quantized({"fc": merged.fc})
    assert {method_of(l) for _, l in iter_adapter_layers(inject_adapters(merged, list(PATHS), method="qlora", rank=2))} == {"qlora"}


def test_layers_quantized_here_do_not_make_a_model_loaded_quantized(tmp_path: Path) -> None:
    """Only bitsandbytes layers (and QuantizedLinear layers made from them) mark a model loaded
    quantized. A QuantizedLinear of ours, by hand or as unload() gives a QLoRA layer's base
    back, leaves a quantized method quantizing every target, and our QLoRA file loads as recorded."""
    model = base_net()
    model.fc = pl.quant.QuantizedLinear.from_linear(model.fc, scheme="nf4", blocksize=32)
    inject_adapters(model, ["block.fc", "block.out"], method="qlora", rank=2, quant="fp4", blocksize=32)
    layers = dict(iter_adapter_layers(model))
    assert [(method_of(layers[n]), layers[n].base_layer.scheme) for n in ("block.fc", "block.out")] == [
        ("qlora", "fp4"), ("qlora", "fp4"),
    ]
    again = pl.unload(inject_adapters(base_net(), re.compile("fc"), method="qlora", rank=2))
    assert isinstance(again.fc, pl.quant.QuantizedLinear)
    with pytest.raises(ValueError, match=r"use method='qlora', which wraps them, gives the float layers of a model loaded in 4 or 8 bits the float method, as Hugging Face PEFT does, and quantizes the others; or exclude them"):
        inject_adapters(copy.deepcopy(again), "all-linear", method="lora", rank=2)
    assert method_of(dict(iter_adapter_layers(inject_adapters(again, ["block.out"], method="qlora", rank=2)))["block.out"]) == "qlora"
    # our QLoRA file, over a float model with a QuantizedLinear of ours elsewhere: as recorded
    save_adapter(inject_adapters(base_net(), ["fc"], method="qlora", rank=2, quant="fp4", blocksize=32), tmp_path)
    hand = base_net()
    hand.block.out = pl.quant.QuantizedLinear.from_linear(hand.block.out, scheme="nf4", blocksize=32)
    loaded = [l for _, l in iter_adapter_layers(load_adapter(hand, tmp_path))]
    assert [(method_of(l), l.base_layer.scheme) for l in loaded] == [("qlora", "fp4"), ("qlora", "fp4")]


def test_the_files_own_quantized_method_named_again_keeps_its_float_modules_float(tmp_path: Path) -> None:
    model = inject_adapters(base_net(), ["fc"], method="qdora", rank=4, blocksize=32)
    inject_adapters(model, ["block.out"], method="dora", rank=2)
    save_adapter(randomize(model).eval(), tmp_path)
    for method in (None, "qdora"):
        kwargs = {} if method is None else {"method": method}
        loaded = load_adapter(base_net(), tmp_path, **kwargs).eval()
        assert [method_of(l) for _, l in iter_adapter_layers(loaded)] == ["qdora", "qdora", "dora"]
        assert torch.equal(loaded(inputs()), model(inputs()))
    # another method named applies to every target
    assert {method_of(l) for _, l in iter_adapter_layers(load_adapter(base_net(), tmp_path, method="dora"))} == {"dora"}


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ({"float_modules": ["block.nope"]}, r"float_modules names \['block.nope'\], which have no adapter in the file"),
        ({"float_modules": "block.out"}, "float_modules must be a list of distinct module names"),
        ({"float_modules": ["fc", "fc"]}, "float_modules must be a list of distinct module names"),
        # a reader of version 1 would ignore the list and quantize those layers
        ({"float_modules": ["fc"], "version": 1}, "float_modules needs peft_layers.version 2, got 1"),
        ({"float_modules": ["fc"], "version": None}, "float_modules needs peft_layers.version 2, got None"),  # no version
        ({"version": "2"}, r"peft_layers.version must be an integer >= 1, got '2'"),
    ],
)
def test_float_modules_field_is_checked(field: dict, message: str, tmp_path: Path) -> None:
    save_adapter(adapted("qlora"), tmp_path)
    def change(metadata: dict) -> None:  # a None in field drops the key
        ours = {**json.loads(metadata["peft_layers"]), "version": 2, **field}
        metadata["peft_layers"] = json.dumps({k: v for k, v in ours.items() if v is not None})

    edit_metadata(tmp_path, change)
    with pytest.raises(ValueError, match=message):
        read_adapter(tmp_path)
    save_adapter(adapted("lora_plus"), tmp_path / "plus")
    edit_metadata(tmp_path / "plus", lambda m: m.update(peft_layers=json.dumps({**json.loads(m["peft_layers"]), "float_modules": ["fc"]})))
    with pytest.raises(ValueError, match="float_modules is set, but method 'lora_plus' is not quantized"):
        read_adapter(tmp_path / "plus")


def test_our_field_for_methods_hf_cannot_name(tmp_path: Path) -> None:
    save_adapter(adapted("lora_plus", lr_ratio=4.0), tmp_path)
    assert our_field(tmp_path) == {"version": 1, "method": "lora_plus", "lr_ratio": 4.0}
    loaded = load_adapter(base_net(), tmp_path)
    assert all(isinstance(l, LoRAPlusLinear) and l.lr_ratio == 4.0 for _, l in iter_adapter_layers(loaded))
    save_adapter(adapted("dora", epsilon=1e-6), tmp_path / "eps")
    assert our_field(tmp_path / "eps") == {"version": 1, "method": "dora", "epsilon": 1e-6}
    loaded = load_adapter(base_net(), tmp_path / "eps")
    assert all(l.epsilon == 1e-6 for _, l in iter_adapter_layers(loaded))
    save_adapter(adapted("dora"), tmp_path / "plain")
    assert our_field(tmp_path / "plain") is None  # a LoraConfig says it all
    for version in (3, 99):  # 2 is the newest this version reads (docs/api.md: FORMAT_VERSION)
        edit_metadata(tmp_path, lambda m: m.update(peft_layers=json.dumps({"version": version, "method": "lora_plus"})))
        with pytest.raises(ValueError, match=f"adapter_model.safetensors: peft_layers.version {version} is not supported"):
            load_adapter(base_net(), tmp_path)


def test_our_field_in_the_config_is_read_too(tmp_path: Path) -> None:
    """Earlier development versions wrote the field into adapter_config.json; both places agree
    or the load is refused, and a broken field names its file."""
    model = adapted("lora_plus", lr_ratio=4.0)
    save_adapter(model, tmp_path)
    field = our_field(tmp_path)
    edit_metadata(tmp_path, lambda m: m.pop("peft_layers"))
    assert {method_of(l) for _, l in iter_adapter_layers(load_adapter(base_net(), tmp_path))} == {"lora"}
    edit_config(tmp_path, lambda c: c.update(peft_layers=field))
    loaded = load_adapter(base_net(), tmp_path)
    assert all(isinstance(l, LoRAPlusLinear) and l.lr_ratio == 4.0 for _, l in iter_adapter_layers(loaded))
    edit_metadata(tmp_path, lambda m: m.update(peft_layers=json.dumps(field)))  # both, agreeing
    assert all(l.lr_ratio == 4.0 for _, l in iter_adapter_layers(load_adapter(base_net(), tmp_path)))
    edit_metadata(tmp_path, lambda m: m.update(peft_layers=json.dumps({**field, "lr_ratio": 2.0})))
    assert_load_fails(tmp_path, ValueError, r"adapter_config.json: field 'peft_layers' .* contradicts the metadata")
    edit_metadata(tmp_path, lambda m: m.update(peft_layers="{not json"))
    assert_load_fails(tmp_path, ValueError, r"adapter_model.safetensors: metadata 'peft_layers' is not valid JSON")
    edit_config(tmp_path, lambda c: c.pop("peft_layers"))
    edit_metadata(tmp_path, lambda m: m.update(peft_layers=json.dumps({"version": 1, "method": "dora"})))
    assert_load_fails(tmp_path, ValueError, r"adapter_model.safetensors: peft_layers.method 'dora' contradicts use_dora=False of adapter_config.json")


def test_paths_that_are_not_adapter_directories_say_so(tmp_path: Path) -> None:
    folder = save_adapter(adapted("lora"), tmp_path / "adapter")
    with pytest.raises(NotADirectoryError, match=r"directory: .*adapter_model.safetensors' is a file; an adapter is a directory"):
        load_adapter(base_net(), folder / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"directory: .*someuser/some-adapter' does not exist .*Hub id"):
        load_adapter(base_net(), tmp_path / "someuser" / "some-adapter")
    (tmp_path / "afile.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"afile.txt' is a file"):
        save_adapter(adapted("lora"), tmp_path / "afile.txt")
    assert (tmp_path / "afile.txt").read_text() == "x"


def test_a_pissa_file_with_a_rank_above_a_layers_features_is_refused(tmp_path: Path) -> None:
    """Ranks above min(in, out) load (Hugging Face PEFT saves them), but not for PiSSA, whose
    residual takes as many singular vectors as the rank: a clear error, the model unchanged."""
    from peft_layers.lora import ranks_above_features_allowed

    model = nn.Sequential(nn.Linear(16, 2))
    with ranks_above_features_allowed():
        save_adapter(inject_adapters(copy.deepcopy(model), ["0"], rank=4), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["init_lora_weights"] = "pissa"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"'0': rank 4 exceeds min\(in, out\) = 2, and a PiSSA adapter's residual"):
        load_adapter(model, tmp_path)
    assert isinstance(model[0], nn.Linear) and not isinstance(model[0], LoRALinear)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_a_non_adapter_bias_of_the_wrong_shape_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    """A file's bias for a module that is no adapter (bias="all") is copied into the model's: a
    shape (1,) would broadcast into every entry without a check."""
    model = adapted("lora", bias="all")
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.norm.bias" in tensors
    tensors["base_model.model.norm.bias"] = torch.ones(1)
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    target = base_net()
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=r"bias \(1,\) for 'norm'"):
        load_adapter(target, tmp_path)
    assert all(torch.equal(value, before[key]) for key, value in target.state_dict().items())


def test_a_loaded_adapter_trains_the_files_biases_and_saves_them_again(tmp_path: Path) -> None:
    """Loading a ``bias="lora_only"`` file into a plain model trains the adapted layers' biases
    (the file's bias mode) and no other, so saving again writes the same file; loaded frozen, the
    trained bias would silently drop out of the second save."""
    from safetensors.torch import load_file

    model = inject_adapters(base_net(), re.compile("fc"), bias="adapter_only", rank=2)  # not block.fc
    with torch.no_grad():
        model.fc.bias.add_(1.0)
        model.fc.lora_B.normal_()
    save_adapter(model, tmp_path / "first")
    loaded = load_adapter(base_net(), tmp_path / "first")
    assert loaded.fc.bias.requires_grad and not loaded.block.fc.bias.requires_grad
    save_adapter(loaded, tmp_path / "second")
    first, second = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("first", "second"))
    assert any(key.endswith("fc.base_layer.bias") or key.endswith("fc.bias") for key in first)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# ---- from a mutation audit of io/ and model/_state.py ----------------------------------------
@needs_peft
def test_a_config_without_r_and_lora_alpha_takes_hugging_face_peft_defaults(tmp_path: Path) -> None:
    """A hand-written config may leave out ``r`` and ``lora_alpha``; Hugging Face PEFT's
    ``LoraConfig`` then means r=8, lora_alpha=8 (read from peft itself, the known value), so the
    scaling is 1."""
    import peft

    defaults = peft.LoraConfig()
    model = adapted("lora", rank=defaults.r, alpha=float(defaults.lora_alpha), rank_pattern={})
    save_adapter(model, tmp_path)
    edit_config(tmp_path, lambda c: (c.pop("r"), c.pop("lora_alpha")))
    adapter = read_adapter(tmp_path)
    assert {p: (m.rank, m.alpha) for p, m in adapter.modules.items()} == dict.fromkeys(
        PATHS, (defaults.r, float(defaults.lora_alpha))
    )
    loaded = load_adapter(base_net(), tmp_path).eval()
    theirs = peft.PeftModel.from_pretrained(base_net(), tmp_path).eval()
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "target_modules",
    [["fc", "block.fc"], r"fc|block\.fc|block\.o"],
    ids=["list-leaves-out-block.out", "regex-matches-only-a-prefix-of-block.out"],
)
def test_a_module_that_target_modules_does_not_match_is_refused(saved_lora: Path, target_modules) -> None:
    """The file holds factors for ``block.out``, but its config's target_modules does not match
    it: as a list that leaves it out, or as a regex that matches only a prefix ("block.o";
    Hugging Face PEFT full-matches a string). Hugging Face PEFT would put no adapter there, so the
    file contradicts itself and must be refused, leaving the model as it was."""
    edit_config(saved_lora, lambda c: c.update(target_modules=target_modules))
    with pytest.raises(ValueError, match=r"module 'block.out' is not matched by target_modules"):
        read_adapter(saved_lora)
    for model in targets():
        before = snapshot(model)
        with pytest.raises(ValueError, match="not matched by target_modules"):
            load_adapter(model, saved_lora)
        assert_unchanged(model, before)


@needs_peft
def test_null_boolean_config_fields_mean_false_as_in_hugging_face_peft(tmp_path: Path) -> None:
    """``use_dora``, ``use_rslora`` and ``fan_in_fan_out`` written as JSON null: Hugging Face
    PEFT treats None as false (plain LoRA, alpha / r); ours must load the file the same way, with
    outputs equal to peft's and to the saved model's."""
    import peft

    model = adapted("lora")
    save_adapter(model, tmp_path)
    edit_config(tmp_path, lambda c: c.update(use_dora=None, use_rslora=None, fan_in_fan_out=None))
    loaded = load_adapter(base_net(), tmp_path).eval()
    assert all(not layer.use_rslora for _, layer in iter_adapter_layers(loaded))
    theirs = peft.PeftModel.from_pretrained(base_net(), tmp_path).eval()
    x = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        torch.testing.assert_close(loaded(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_read_adapter_refuses_a_magnitude_of_the_wrong_length(tmp_path: Path) -> None:
    """``read_adapter`` (public, also used by stack_adapters/combine) promises a magnitude of
    shape (out,). A DoRA file whose ``block.fc`` magnitude has 23 entries for 24 outputs must be
    refused by the file check itself, naming the key, not only later by a model's layer."""
    save_adapter(adapted("dora"), tmp_path)
    key = "base_model.model.block.fc.lora_magnitude_vector"
    edit_tensors(tmp_path, lambda t: t.update({key: t[key][:23].clone()}))
    with pytest.raises(ValueError, match=r"'block.fc': lora_magnitude_vector \(23,\) should be \(24,\)"):
        read_adapter(tmp_path)


@pytest.mark.parametrize("init", ["olora", "loftq", "corda", "pissa_niter_4"])
def test_inits_that_rewrite_the_base_in_other_ways_are_refused(saved_lora: Path, init: str) -> None:
    """Hugging Face PEFT's OLoRA (QR of W0), LoftQ, CorDA and fast-SVD PiSSA subtract something
    other than the exact PiSSA residual from the base; only True/False/gaussian/eva/orthogonal
    (base untouched) and "pissa" are reproduced. A file with another init must be refused by
    name, the model unchanged: loading it as PiSSA or as plain LoRA gives other outputs."""
    edit_config(saved_lora, lambda c: c.update(init_lora_weights=init))
    for model in targets():
        before = snapshot(model)
        with pytest.raises(ValueError, match=rf"init_lora_weights='{init}' changes the base weights"):
            load_adapter(model, saved_lora)
        assert_unchanged(model, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_adapters_are_saved_in_their_own_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    """Hugging Face PEFT's save_pretrained writes each adapter tensor in the dtype it has (a
    bf16 model gives a bf16 file, half the bytes of float32). Ours must too, bit for bit."""
    model = adapted("dora").to(dtype)
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    expected = {}
    for name, layer in iter_adapter_layers(model):
        expected[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A
        expected[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B
        expected[f"base_model.model.{name}.lora_magnitude_vector"] = layer.magnitude
    assert tensors.keys() == expected.keys()
    for key, value in expected.items():
        assert tensors[key].dtype == dtype, key
        assert torch.equal(tensors[key], value.detach()), key


def test_a_float32_file_fills_bfloat16_layers_in_their_own_dtype(tmp_path: Path) -> None:
    """Filling existing layers copies the file's values into the model's tensors (as
    load_state_dict does): a float32 file into layers cast to bf16 leaves every adapter tensor
    bf16 and the same Parameter over the same storage (an optimizer built before the load still
    holds it), with the file's values rounded to bf16. (An injecting load makes float32 adapters,
    as Hugging Face PEFT's autocast_adapter_dtype does; that is not checked here.)"""
    source = adapted("lora")
    save_adapter(source, tmp_path)
    file = read_adapter(tmp_path)
    filled = inject_adapters(base_net(), list(PATHS), rank=4, rank_pattern={"^block\\.out": 2}).to(torch.bfloat16)
    held = {name: (layer.lora_A, layer.lora_A.data_ptr()) for name, layer in iter_adapter_layers(filled)}
    load_adapter(filled, tmp_path)
    for name, layer in iter_adapter_layers(filled):
        for kind in ("lora_A", "lora_B"):
            tensor = getattr(layer, kind)
            assert tensor.dtype == torch.bfloat16, (name, kind)
            assert torch.equal(tensor, getattr(file.modules[name], kind).to(torch.bfloat16)), (name, kind)
        assert layer.lora_A is held[name][0] and layer.lora_A.data_ptr() == held[name][1], name


def test_adapter_state_dict_is_detached_like_state_dict() -> None:
    """``adapter_state_dict`` promises detached tensors, as ``model.state_dict()`` gives: no
    tensor requires grad or is a Parameter (so in-place edits and torch.save work on it, and it
    keeps no autograd tie to the model), yet each holds the model's values (compared with
    ``model.state_dict()``, the reference)."""
    model = inject_adapters(base_net(), list(PATHS), method="dora", rank=4, modules_to_save=["norm"])
    state = adapter_state_dict(model)
    full = model.state_dict()
    assert any(key.endswith("magnitude") for key in state) and any(".trained." in key for key in state)
    for key, tensor in state.items():
        assert not tensor.requires_grad and not isinstance(tensor, nn.Parameter), key
        assert torch.equal(tensor, full[key]), key
    key = next(k for k in state if k.endswith("lora_B"))
    state[key].add_(1.0)  # a detached view: an in-place edit is allowed
