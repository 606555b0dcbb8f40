"""Model surgery: inject_adapters / inject_lora, merge, unload, counts, adapter state dicts."""

from __future__ import annotations

import copy
import functools
import pickle
import re
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import peft_layers as pl
from peft_layers.model import iter_adapter_layers, method_of, pattern_key

from models import bnb_linear4bit, tiny_model, tokens

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = (*ATTN, "up_proj", "down_proj")


def adapter_names(model: nn.Module) -> list[str]:
    return [name for name, _ in iter_adapter_layers(model)]


def randomize_adapters(model: nn.Module, seed: int = 3) -> None:
    """Give B (and magnitudes) non-zero values so the adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in iter_adapter_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)
            if hasattr(layer, "magnitude"):
                layer.magnitude.mul_(1 + 0.1 * torch.rand(layer.magnitude.shape, generator=generator))


# ---- target forms --------------------------------------------------------------------------------
def test_suffix_matches_whole_components_only() -> None:
    model = tiny_model()
    model.layers[0].attn.xq_proj = nn.Linear(32, 32)  # "q_proj" must not match "xq_proj"
    pl.inject_lora(model, "q_proj")
    assert adapter_names(model) == ["layers.0.attn.q_proj", "layers.1.attn.q_proj"]


def test_dotted_suffix_and_list() -> None:
    model = pl.inject_lora(tiny_model(), ["attn.q_proj", "mlp.up_proj"])
    assert adapter_names(model) == [
        "layers.0.attn.q_proj", "layers.0.mlp.up_proj", "layers.1.attn.q_proj", "layers.1.mlp.up_proj",
    ]


def test_regex_is_a_full_match() -> None:
    model = pl.inject_lora(tiny_model(), re.compile(r"layers\.1\.attn\.[qv]_proj"))
    assert adapter_names(model) == ["layers.1.attn.q_proj", "layers.1.attn.v_proj"]
    with pytest.raises(ValueError, match="matches no module"):
        pl.inject_lora(tiny_model(), re.compile(r"q_proj"))  # a search would match; fullmatch does not


def test_callable_target_and_exclude() -> None:
    model = pl.inject_lora(
        tiny_model(),
        lambda name, module: isinstance(module, nn.Linear) and ".mlp." in name,
        exclude=re.compile(r"layers\.0\..*"),
    )
    assert adapter_names(model) == ["layers.1.mlp.up_proj", "layers.1.mlp.down_proj"]
    model = pl.inject_lora(tiny_model(), list(ATTN), exclude=["k_proj", "layers.1.attn.q_proj"])
    assert adapter_names(model) == [
        "layers.0.attn.q_proj", "layers.0.attn.v_proj", "layers.0.attn.o_proj",
        "layers.1.attn.v_proj", "layers.1.attn.o_proj",
    ]


def test_targets_that_are_callable_but_no_predicate_name_the_argument() -> None:
    """A module is callable, so it was taken for a predicate and failed inside torch ("forward()
    takes 2 positional arguments but 3 were given"); a one-argument lambda failed the same way;
    ``bytes`` iterated as ints ("got 113 (int)"). Each now names the argument and what it takes,
    before anything changes; a predicate with defaults or ``*args`` still works."""
    model = tiny_model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    q_proj = model.layers[0].attn.q_proj
    allowed = r"expected a name suffix, a list of them, a compiled regex or a callable \(name, module\) -> bool"
    cases = [
        (dict(targets=q_proj), rf"^targets: {allowed}, got a module \(Linear\); pass its name$"),
        (dict(targets="q_proj", exclude=q_proj), rf"^exclude: {allowed}, got a module \(Linear\); pass its name$"),
        (dict(targets=lambda name: True), r"^targets: a callable must take two arguments \(name, module\) and return a bool; .*<lambda> takes \(name\)$"),
        (dict(targets="q_proj", exclude=lambda: True), r"^exclude: a callable must take two arguments .* takes \(\)$"),
        (dict(targets=b"q_proj"), rf"^targets: {allowed}, got b'q_proj' \(bytes\); decode it to str$"),
    ]
    for arguments, message in cases:
        with pytest.raises(TypeError, match=message):
            pl.inject_lora(model, **arguments)
    assert adapter_names(model) == []
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    assert model.state_dict().keys() == before.keys()

    def with_defaults(name, module, extra=None) -> bool:
        return name.endswith("q_proj")

    assert adapter_names(pl.inject_lora(tiny_model(), with_defaults)) == ["layers.0.attn.q_proj", "layers.1.attn.q_proj"]
    assert adapter_names(pl.inject_lora(tiny_model(), lambda *args: args[0].endswith("v_proj"))) == [
        "layers.0.attn.v_proj", "layers.1.attn.v_proj",
    ]


def test_rank_and_alpha_patterns_follow_hugging_face_matching() -> None:
    model = pl.inject_lora(
        tiny_model(), list(ATTN), rank=4, alpha=8.0,
        rank_pattern={r"layers\.1\.attn\.q_proj": 2, "k_proj": 6},
        alpha_pattern={"v_proj": 3.0},
    )
    layers = dict(iter_adapter_layers(model))
    assert layers["layers.1.attn.q_proj"].rank == 2
    assert layers["layers.0.attn.q_proj"].rank == 4
    assert layers["layers.0.attn.k_proj"].rank == 6 and layers["layers.1.attn.k_proj"].rank == 6
    assert layers["layers.0.attn.v_proj"].alpha == 3.0 and layers["layers.0.attn.v_proj"].rank == 4
    assert layers["layers.0.attn.o_proj"].alpha == 8.0
    assert layers["layers.1.attn.q_proj"].lora_A.shape == (2, 32)
    # the same rule as peft.utils.other.get_pattern_key
    peft_other = pytest.importorskip("peft.utils.other")
    patterns = {r"layers\.1\.attn\.q_proj": 2, "k_proj": 6, "proj": 1}
    for name in adapter_names(tiny_model()) + ["layers.0.attn.q_proj", "layers.0.attn.k_proj", "x.kk_proj"]:
        ours = pattern_key(patterns, name)
        theirs = peft_other.get_pattern_key(list(patterns), name)
        assert (ours if ours is not None else name) == theirs


@pytest.mark.parametrize("method", ["lora", "lora_plus", "dora"])
def test_trainable_counts_follow_the_formula(method: str) -> None:
    model = tiny_model()
    frozen_total = sum(p.numel() for p in model.parameters())
    pl.inject_adapters(model, list(ALL_LINEAR), method=method, rank=4)
    per_layer = []
    for _, layer in iter_adapter_layers(model):
        count = layer.rank * (layer.in_features + layer.out_features)
        if method == "dora":
            count += layer.out_features
        per_layer.append(count)
    trainable, total = pl.trainable_parameters(model)
    assert len(per_layer) == 12
    assert trainable == sum(per_layer)
    assert total == frozen_total + trainable
    assert all(method_of(layer) == method for _, layer in iter_adapter_layers(model))


def test_counts_equal_hugging_face_peft() -> None:
    peft = pytest.importorskip("peft")
    ours = pl.inject_lora(tiny_model(), list(ATTN), rank=4, alpha=8.0)
    theirs = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(ATTN)))
    assert pl.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()


def test_print_trainable_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    model = pl.inject_lora(tiny_model(), "q_proj", rank=2)
    trainable, total = pl.trainable_parameters(model)
    pl.print_trainable_parameters(model)
    expected = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    assert capsys.readouterr().out.strip() == expected
    assert trainable == 2 * 2 * (32 + 32)


# ---- freezing and bias modes -----------------------------------------------------------------
@pytest.mark.parametrize("bias", ["none", "all", "adapter_only"])
def test_training_changes_only_adapters_and_chosen_biases(bias: str) -> None:
    model = pl.inject_adapters(tiny_model(), list(ALL_LINEAR), method="dora", bias=bias, rank=4)
    adapter_keys = {f"{name}.{p}" for name, layer in iter_adapter_layers(model) for p in layer.adapter_parameter_names}
    adapter_bias_keys = {f"{name}.base_layer.bias" for name, _ in iter_adapter_layers(model)}
    all_bias_keys = {name for name, _ in model.named_parameters() if name.endswith("bias")}
    expected_trainable = adapter_keys | {"none": set(), "all": all_bias_keys, "adapter_only": adapter_bias_keys}[bias]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected_trainable

    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tokens()
    losses = []
    for _ in range(8):
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # AdamW moves every trainable tensor that got a gradient
    assert changed == expected_trainable


# ---- merge, unload ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_and_unload_gives_the_same_outputs(method: str) -> None:
    model = pl.inject_adapters(tiny_model(), list(ALL_LINEAR), method=method, rank=4)
    randomize_adapters(model)
    batch = tokens()
    with torch.no_grad():
        adapted = model(batch)
        pl.merge_adapters(model)
        merged = model(batch)
        pl.unmerge_adapters(model)
        unmerged = model(batch)
        pl.merge_and_unload(model)
        plain = model(batch)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unmerged, adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, adapted, rtol=1e-5, atol=1e-5)
    assert not list(iter_adapter_layers(model))
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(ALL_LINEAR))
    assert not any(p.requires_grad for p in model.parameters() if p.dim() == 2 and p.shape != (50, 32))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_merge_and_unload_keeps_each_layers_training_mode(mode: str) -> None:
    # a new nn.Linear starts in training mode; the layers it replaces may not be (found by the
    # stateful test's helper: an eval() model came back with its merged layers in training)
    model = pl.inject_adapters(tiny_model(), ["q_proj", "up_proj"], method="dora", rank=2)
    model.train(mode == "train")
    model.layers[0].mlp.up_proj.train()  # one layer in another mode than the model
    modes = {name: m.training for name, m in model.named_modules()}
    pl.merge_and_unload(model)
    assert {name: m.training for name, m in model.named_modules()} == {
        name: training for name, training in modes.items() if not name.endswith(("base_layer", "lora_dropout"))
    }


def test_merge_and_unload_dtype() -> None:
    model = pl.inject_lora(tiny_model(), "q_proj", rank=2)
    pl.merge_and_unload(model, dtype=torch.float64)
    assert model.layers[0].attn.q_proj.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="dtype"):
        pl.merge_and_unload(pl.inject_lora(tiny_model(), "q_proj"), dtype=torch.int8)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_and_unload_puts_back_each_base_module_with_its_hooks(method: str) -> None:
    """A float base comes back as the very module (as Hugging Face PEFT's in-place merge), so the
    hooks registered on it before injection run after the merge; its weight is a new tensor of
    W0 + delta, and another module tied to the old one keeps W0."""
    model = tiny_model()
    q_proj = model.layers[0].attn.q_proj
    tied = nn.Linear(32, 32, bias=False)
    tied.weight = q_proj.weight  # shares W0 with the target
    w0 = q_proj.weight.detach().clone()
    seen: list[str] = []
    q_proj.register_forward_pre_hook(lambda module, args: seen.append("pre"))
    q_proj.register_forward_hook(lambda module, args, out: seen.append("post"))
    pl.inject_adapters(model, ["q_proj", "v_proj"], method=method, rank=4)
    randomize_adapters(model)
    layer = model.layers[0].attn.q_proj
    batch = tokens()
    with torch.no_grad():
        adapted = model(batch)
        merged = w0.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
        if method == "dora":
            merged *= (layer.magnitude.double() / merged.norm(dim=1))[:, None]
    seen.clear()
    pl.merge_and_unload(model)
    assert model.layers[0].attn.q_proj is q_proj and type(q_proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(batch), adapted, rtol=1e-5, atol=1e-5)
    assert seen == ["pre", "post"]  # the hooks ran, once each, in the merged model
    torch.testing.assert_close(q_proj.weight.double(), merged, rtol=1e-5, atol=1e-6)
    assert not q_proj.weight.requires_grad
    assert q_proj.weight is not tied.weight and torch.equal(tied.weight, w0)


def test_merge_and_unload_that_fails_leaves_every_base_as_it_was(monkeypatch) -> None:
    """The bases are given their merged weights only after every layer is built: a build that
    fails (here the second) leaves the first base's weight, the adapters and the outputs as
    they were."""
    model = pl.inject_adapters(tiny_model(), ["q_proj", "v_proj"], rank=4)
    randomize_adapters(model)
    batch = tokens()
    with torch.no_grad():
        before = model(batch)
    weights = {name: layer.base_layer.weight for name, layer in iter_adapter_layers(model)}
    values = {name: w.detach().clone() for name, w in weights.items()}
    calls = []
    original = pl.LoRALinear.to_linear

    def failing_second(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 2:
            raise RuntimeError("out of memory (injected)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pl.LoRALinear, "to_linear", failing_second)
    with pytest.raises(RuntimeError, match="injected"):
        pl.merge_and_unload(model)
    assert len(calls) == 2
    assert {name: layer.base_layer.weight for name, layer in iter_adapter_layers(model)} == weights
    assert all(torch.equal(weights[name], values[name]) for name in weights)
    with torch.no_grad():
        assert torch.equal(model(batch), before)


def test_merge_and_unload_gives_a_base_with_a_forward_of_its_own_a_plain_linear() -> None:
    """A subclass whose forward is not ``x W^T + b`` cannot take the merged weight and keep its
    meaning: it becomes a plain nn.Linear, with the warning to_linear() gives."""

    class Doubled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    model = nn.Sequential(Doubled(4, 4))
    pl.inject_adapters(model, ["0"], rank=2)
    with pytest.warns(UserWarning, match="a forward of its own"):
        pl.merge_and_unload(model)
    assert type(model[0]) is nn.Linear


def test_unload_gives_back_the_original_layers_and_outputs() -> None:
    model = tiny_model()
    originals = {name: m for name, m in model.named_modules() if name.endswith(ALL_LINEAR)}
    batch = tokens()
    with torch.no_grad():
        expected = model(batch)
    weights = {name: m.weight.detach().clone() for name, m in originals.items()}
    pl.inject_adapters(model, list(ALL_LINEAR), method="dora", rank=4)
    randomize_adapters(model)
    with torch.no_grad():  # what the merge adds, and the largest factor it scales by
        updates = {name: layer.scaling * layer.lora_B @ layer.lora_A for name, layer in iter_adapter_layers(model)}
        gains = {name: (layer.magnitude / layer.weight_norm()).clamp_min(1)[:, None]
                 for name, layer in iter_adapter_layers(model)}
    pl.merge_adapters(model)  # unload must unmerge first
    pl.unload(model)
    with torch.no_grad():
        got = model(batch)
    for name, module in model.named_modules():
        if name in originals:
            assert module is originals[name]
            # four float32 roundings: into W0 + s B A, times m / n, back, minus s B A
            bound = 4 * 2.0**-24 * gains[name] * (weights[name].abs() + updates[name].abs())
            assert torch.all((module.weight - weights[name]).abs() <= bound), name
    # logits up to about 40: the restored weights' rounding reaches them as a few 1e-6
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_unload_is_exact_for_unmerged_layers() -> None:
    model = tiny_model()
    batch = tokens()
    with torch.no_grad():
        expected = model(batch)
    pl.inject_lora(model, list(ALL_LINEAR))
    randomize_adapters(model)
    pl.unload(model)
    with torch.no_grad():
        assert torch.equal(model(batch), expected)


def _root_layers() -> list[tuple[str, nn.Module]]:
    torch.manual_seed(0)
    return [
        ("merge_and_unload", pl.LoRALinear.from_linear(nn.Linear(4, 4), rank=2)),
        ("merge_and_unload", pl.DoRALinear.from_linear(nn.Linear(4, 4), rank=2)),
        ("unload", pl.LoRALinear.from_linear(nn.Linear(4, 4), rank=2)),
        ("unload", pl.MultiLoRALinear(nn.Linear(4, 4))),
        ("unload", pl.ModuleToSave(nn.Linear(4, 4))),
    ]


@pytest.mark.parametrize("index", range(len(_root_layers())))
def test_a_model_that_is_itself_an_adapter_layer_is_pointed_to_the_layer_tools(index: int) -> None:
    """merge_and_unload and unload replace layers in their parent, which the root has not: they
    refuse it as inject_adapters refuses a root linear layer, and change nothing."""
    tool, model = _root_layers()[index]
    children, state = dict(model.named_children()), copy.deepcopy(model.state_dict())
    hint = {"merge_and_unload": r"model\.to_linear\(\)"}.get(tool, r"model\.(base_layer|original)")
    with pytest.raises(ValueError, match=rf"^{tool}\(\): model is itself a {type(model).__name__}, which cannot "
                       rf"be replaced in place; .*{hint}"):
        getattr(pl, tool)(model)
    assert dict(model.named_children()) == children
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_merge_errors_change_nothing() -> None:
    model = pl.inject_lora(tiny_model(), list(ATTN))
    with pytest.raises(ValueError, match="no adapter layer is merged"):
        pl.unmerge_adapters(model)
    model.layers[0].attn.q_proj.merge()
    with pytest.raises(ValueError, match="layers.0.attn.q_proj"):
        pl.merge_adapters(model)
    assert [layer.merged for _, layer in iter_adapter_layers(model)].count(True) == 1
    with pytest.raises(ValueError, match="no adapter layers"):
        pl.merge_adapters(tiny_model())


# ---- shared modules and tied weights ---------------------------------------------------------------
def test_shared_module_gets_one_adapter() -> None:
    model = tiny_model()
    model.layers[1].attn.q_proj = model.layers[0].attn.q_proj  # one module, two names
    pl.inject_lora(model, "q_proj", rank=2)
    assert model.layers[1].attn.q_proj is model.layers[0].attn.q_proj
    assert adapter_names(model) == ["layers.0.attn.q_proj"]
    trainable, _ = pl.trainable_parameters(model)
    assert trainable == 2 * (32 + 32)
    assert list(pl.adapter_state_dict(model)) == ["layers.0.attn.q_proj.lora_A", "layers.0.attn.q_proj.lora_B"]
    pl.unload(model)
    assert type(model.layers[1].attn.q_proj) is nn.Linear
    assert model.layers[1].attn.q_proj is model.layers[0].attn.q_proj


def test_excluding_one_name_of_a_shared_target_is_refused() -> None:
    """One module under two names takes one adapter layer under both: an ``exclude`` naming one
    of them was silently overridden (Hugging Face PEFT leaves that name plain)."""
    model = tiny_model()
    model.layers[1].attn.q_proj = model.layers[0].attn.q_proj
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"exclude: \['layers.1.attn.q_proj'\] name the module that is also at"):
        pl.inject_lora(model, "q_proj", exclude=["layers.1.attn.q_proj"], rank=2)
    assert type(model.layers[0].attn.q_proj) is nn.Linear  # nothing changed
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    # every name of the shared module excluded: it stays plain, the other targets are adapted
    pl.inject_lora(model, ["q_proj", "k_proj"], exclude=["layers.0.attn.q_proj", "layers.1.attn.q_proj"], rank=2)
    assert isinstance(model.layers[1].attn.k_proj, pl.LoRALinear)
    assert type(model.layers[1].attn.q_proj) is nn.Linear


class _LinearWithInnerLinear(nn.Linear):
    """A linear layer holding a linear child of its own, which its forward calls."""

    def __init__(self) -> None:
        super().__init__(8, 8)
        self.inner = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.inner(x))


def test_a_target_inside_another_target_is_refused() -> None:
    """The inner adapter layer was hung on the outer one, where the base's forward never called it:
    its parameters counted as trainable and never got a gradient."""
    model = nn.Sequential(_LinearWithInnerLinear())
    with pytest.raises(ValueError, match=r"'0' and modules inside it \(\['inner'\]\) all match"):
        pl.inject_lora(model, ["0", "inner"], rank=2)
    assert type(model[0]) is _LinearWithInnerLinear and type(model[0].inner) is nn.Linear
    assert all(p.requires_grad for p in model.parameters())  # not frozen either
    with pytest.raises(ValueError, match="'0.inner' lies inside an adapter target"):
        pl.inject_lora(model, ["0"], modules_to_save=["inner"], rank=2)
    assert type(model[0]) is _LinearWithInnerLinear and type(model[0].inner) is nn.Linear


class _FusedExperts(nn.Module):
    """As transformers 5 stores a mixture of experts: one 3-D weight for all experts."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(4, 16, 8))
        self.router = nn.Linear(8, 4)
        self.conv = nn.Conv1d(8, 8, 3)  # a 3-D weight that is no expert


def test_all_linear_warns_about_fused_experts_it_leaves_out() -> None:
    """Hugging Face PEFT 0.21 adapts a fused mixture of experts (``target_parameters``); ours
    adapts the linear layers only, which left Mixtral's experts out without a word."""
    model = nn.Sequential(nn.Linear(8, 8), _FusedExperts())
    with pytest.warns(UserWarning, match=r"stacked expert weights \(3-D parameters.*in 1 module\(s\) \(\['1'\]\)"):
        pl.inject_adapters(model, "all-linear", rank=2)
    assert isinstance(model[0], pl.LoRALinear) and isinstance(model[1].router, pl.LoRALinear)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named targets, or no experts: no warning
        pl.inject_adapters(nn.Sequential(nn.Linear(8, 8), _FusedExperts()), ["0"], rank=2)
        pl.inject_adapters(nn.Sequential(nn.Linear(8, 8), nn.Conv1d(8, 8, 3)), "all-linear", rank=2)
        with_tokens = nn.Sequential(nn.Linear(8, 8))
        with_tokens.cls_token = nn.Parameter(torch.zeros(1, 1, 8))  # 3-D, as ViT's: no experts
        pl.inject_adapters(with_tokens, "all-linear", rank=2)


@pytest.mark.parametrize("split", ["rows", "columns"])
def test_merge_adapters_takes_weights_that_are_disjoint_views_of_one_storage(split: str) -> None:
    """Slices of one fused weight (a QKV projection split into layers) share a storage but no
    element: each merge writes its own slice, so nothing is tied. Column slices interleave in the
    storage without sharing an element."""
    fused = torch.randn(16, 8) if split == "rows" else torch.randn(8, 16)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    halves = (fused[:8], fused[8:]) if split == "rows" else (fused[:, :8], fused[:, 8:])
    model[0].weight, model[1].weight = (nn.Parameter(half) for half in halves)
    pl.inject_lora(model, ["0", "1"], rank=2)
    randomize_adapters(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
        pl.merge_adapters(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_merge_adapters_refuses_weights_that_overlap_in_part() -> None:
    fused = torch.randn(12, 8)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    model[0].weight = nn.Parameter(fused[:8])
    model[1].weight = nn.Parameter(fused[4:])  # rows 4..7 in both
    model[2].weight = nn.Parameter(fused[:8].clone())  # a storage of its own
    pl.inject_lora(model, ["0", "1", "2"], rank=2)
    with pytest.raises(ValueError, match=r"adapter layers \[\['0', '1'\]\] share one base weight"):
        pl.merge_adapters(model)


@pytest.mark.filterwarnings(r"ignore:inject_adapters.*share their weights")
def test_all_linear_is_read_in_any_case() -> None:
    """Hugging Face PEFT lowers ``target_modules="All-Linear"``; here it was a name suffix that
    matched nothing."""
    model = tiny_model()
    pl.inject_adapters(model, "All-Linear", rank=2)
    expected = tiny_model()
    pl.inject_adapters(expected, "all-linear", rank=2)
    assert adapter_names(model) == adapter_names(expected) and adapter_names(model)


@pytest.mark.filterwarnings(r"ignore:inject_adapters.*share their weights")
def test_modules_to_save_takes_an_empty_list_and_a_generator() -> None:
    """``[]`` saves none (as in Hugging Face PEFT; it raised), and a generator is read once
    (under "all-linear" it was read twice, and the second read found it empty)."""
    model = tiny_model()
    pl.inject_adapters(model, ["q_proj"], rank=2, modules_to_save=[])
    assert not list(pl.model.iter_modules_to_save(model))
    model = tiny_model()
    pl.inject_adapters(model, "all-linear", rank=2, modules_to_save=(name for name in ["norm"]))
    assert [name for name, _ in pl.model.iter_modules_to_save(model)] == ["norm"]


def test_merge_adapters_refuses_targets_with_tied_weights() -> None:
    """Two targets sharing one weight tensor: each merge added its update into the shared
    weight, so both merged layers computed ``W0 + delta_1 + delta_2``."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    model[2].weight = model[0].weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied-weights warning of injection
        pl.inject_lora(model, ["0", "2"], rank=2)
    randomize_adapters(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(ValueError, match=r"adapter layers \[\['0', '2'\]\] share one base weight"):
        pl.merge_adapters(model)
    assert not any(layer.merged for _, layer in iter_adapter_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(pl.merge_and_unload(model)(x), expected, rtol=1e-5, atol=1e-6)


def test_a_pattern_key_may_name_any_name_of_a_shared_module() -> None:
    """``rank_pattern={"layers.1.attn.q_proj": 4}`` on a module also named ``layers.0.attn.q_proj``
    passed the check that it matches a target, then was looked up under the first name only: the
    layer silently got the default rank and alpha."""
    model = tiny_model()
    model.layers[1].attn.q_proj = model.layers[0].attn.q_proj
    pl.inject_lora(model, "q_proj", rank=2, rank_pattern={r"layers\.1\.attn\.q_proj": 4}, alpha_pattern={r"1\.attn\.q_proj": 3.0})
    layer = model.layers[0].attn.q_proj
    assert (layer.rank, layer.alpha, tuple(layer.lora_A.shape)) == (4, 3.0, (4, 32))


def test_tied_output_head() -> None:
    """A tied head can be targeted; injecting warns (once, naming the other holder) that an in-place
    merge writes into the embedding too, which merge_and_unload avoids."""
    with pytest.warns(UserWarning, match=r"^inject_adapters\(\): \{'lm_head': \['embed.weight'\]\} share their weights") as caught:
        model = pl.inject_lora(tiny_model(), ["lm_head", "q_proj"], rank=2)
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # untied targets: no warning
        pl.inject_lora(tiny_model(), ["q_proj", "v_proj"], rank=2)
    assert model.lm_head.weight is model.embed.weight  # still tied, and frozen
    assert not model.embed.weight.requires_grad
    # PiSSA writes its residual into the embedding as well (as Hugging Face PEFT does): warned
    with pytest.warns(UserWarning, match=r"init='pissa' writes the residual W0 - s B A into the shared weight"):
        pl.inject_lora(tiny_model(), ["lm_head", "q_proj"], rank=2, init="pissa")
    randomize_adapters(model)
    batch = tokens()
    with torch.no_grad():
        adapted = model(batch)
        embedding_before = model.embed.weight.clone()
        pl.merge_and_unload(model)
        # the merged head gets its own weight: the embedding keeps W0
        assert torch.equal(model.embed.weight, embedding_before)
        torch.testing.assert_close(model(batch), adapted, rtol=1e-5, atol=1e-5)


# ---- errors ------------------------------------------------------------------------------------------
def test_target_that_matches_nothing_lists_linear_names_nearest_first() -> None:
    with pytest.raises(ValueError, match="q_prj") as info:
        pl.inject_lora(tiny_model(), "q_prj")
    message = str(info.value)
    listed = message[message.index("[") :]
    assert listed.index("q_proj") < listed.index("up_proj")
    with pytest.raises(ValueError, match="'nothing'"):
        pl.inject_lora(tiny_model(), ["q_proj", "nothing"])


def test_a_model_that_is_itself_a_linear_layer_is_pointed_to_from_linear() -> None:
    linear = nn.Linear(4, 4)
    for targets in ([""], "q"):
        with pytest.raises(ValueError, match=r"layers are \(nearest first\): \[\]; the model is itself a linear layer.*LoRALinear\.from_linear\(model\)"):
            pl.inject_lora(linear, targets)
    assert not list(linear.named_children())


def test_the_base_of_a_model_that_is_itself_an_adapter_layer_is_refused() -> None:
    layer = pl.LoRALinear.from_linear(nn.Linear(4, 4), rank=2)
    base = layer.base_layer
    with pytest.raises(ValueError, match=r"^targets: 'base_layer' already has an adapter \(LoRALinear\)"):
        pl.inject_lora(layer, ["base_layer"], rank=2)
    assert layer.base_layer is base and type(base) is nn.Linear


def test_target_that_is_not_linear() -> None:
    with pytest.raises(TypeError, match="LayerNorm"):
        pl.inject_lora(tiny_model(), "norm1")
    with pytest.raises(TypeError, match="Attention"):
        pl.inject_lora(tiny_model(), "attn")


def test_injecting_twice_is_an_error_and_changes_nothing() -> None:
    model = pl.inject_lora(tiny_model(), "q_proj")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="already has an adapter"):
        pl.inject_lora(model, ["v_proj", "q_proj"])
    assert adapter_names(model) == ["layers.0.attn.q_proj", "layers.1.attn.q_proj"]
    assert state.keys() == model.state_dict().keys()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="method"):
        pl.inject_adapters(tiny_model(), "q_proj", method="ia3")
    with pytest.raises(ValueError, match="bias"):
        pl.inject_lora(tiny_model(), "q_proj", bias="some")
    with pytest.raises(TypeError, match="targets"):
        pl.inject_lora(tiny_model(), 3)
    with pytest.raises(ValueError, match="targets"):
        pl.inject_lora(tiny_model(), [])
    with pytest.raises(TypeError, match="rank_pattern"):
        pl.inject_lora(tiny_model(), "q_proj", rank_pattern={"q_proj": 2.5})
    with pytest.raises(ValueError, match="excluded"):
        pl.inject_lora(tiny_model(), "q_proj", exclude="q_proj")
    model = tiny_model()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="rank"):  # rank 40 > min(32, 32) for attention
        pl.inject_lora(model, ["up_proj", "q_proj"], rank=40)
    assert not adapter_names(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_method_and_bias_may_be_given_by_position_as_in_the_design() -> None:
    torch.manual_seed(0)
    by_position = pl.inject_adapters(tiny_model(), "q_proj", "dora", "all", rank=2)
    torch.manual_seed(0)
    by_keyword = pl.inject_adapters(tiny_model(), "q_proj", method="dora", bias="all", rank=2)
    assert {method_of(layer) for _, layer in iter_adapter_layers(by_position)} == {"dora"}
    trainable = [name for name, p in by_position.named_parameters() if p.requires_grad]
    assert trainable == [name for name, p in by_keyword.named_parameters() if p.requires_grad]
    assert any(name.endswith(".bias") for name in trainable)  # bias="all" took effect
    for (name, a), (_, b) in zip(by_position.state_dict().items(), by_keyword.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(TypeError, match="positional"):  # the arguments beyond the design's: keywords
        pl.inject_adapters(tiny_model(), "q_proj", "lora", "none", "k_proj")


@pytest.mark.parametrize("method", ["lora", "lora_plus", "dora", "qlora", "qdora"])
def test_layers_injected_into_an_eval_model_do_not_drop_out(method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    reference = copy.deepcopy(model)
    pl.inject_adapters(model, ["0", "2"], method=method, rank=4, dropout=0.5)
    pl.inject_adapters(reference, ["0", "2"], method=method, rank=4, dropout=0.0)  # the formula
    randomize_adapters(model)
    reference.load_state_dict(model.state_dict())
    assert not any(m.training for m in model.modules())
    x = torch.randn(8, 16)
    with torch.no_grad():
        first, second = model(x), model(x)
        assert torch.equal(first, second)
        torch.testing.assert_close(first, reference(x), rtol=0, atol=0)
    peft = pytest.importorskip("peft")
    if method in ("lora", "dora"):
        # Hugging Face PEFT also creates its layers in training mode: its model is put in eval here
        theirs = peft.get_peft_model(
            copy.deepcopy(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))),
            peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.5, target_modules=["0", "2"], use_dora=method == "dora"),
        ).eval()
        with torch.no_grad():
            for index in ("0", "2"):
                ours, their = model.get_submodule(index), theirs.base_model.model.get_submodule(index)
                their.base_layer.load_state_dict(ours.base_layer.state_dict())
                their.lora_A["default"].weight.copy_(ours.lora_A)
                their.lora_B["default"].weight.copy_(ours.lora_B)
                if method == "dora":
                    their.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
            torch.testing.assert_close(theirs(x), first, rtol=1e-5, atol=1e-6)


def test_injected_layers_keep_the_training_mode_of_each_replaced_layer(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).train()
    model[1].eval()
    pl.inject_lora(model, ["0", "1"], rank=2, dropout=0.5)
    assert model[0].training and model[0].lora_dropout.training
    assert not model[1].training and not model[1].lora_dropout.training
    # load_adapter injects through the same function
    pl.save_adapter(pl.inject_lora(nn.Sequential(nn.Linear(8, 8)), "0", rank=2, dropout=0.5), tmp_path)
    loaded = pl.load_adapter(nn.Sequential(nn.Linear(8, 8)).eval(), tmp_path)
    assert not any(m.training for m in loaded.modules())


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave as it was: module objects and modes, tensor objects,
    storage, values and flags, a quantized layer's version."""
    return {
        "modules": [(name, m, m.training, getattr(m, "version", None)) for name, m in model.named_modules()],
        "tensors": [
            (name, t, t.data_ptr(), t.dtype, t.detach().clone(), t.requires_grad)
            for name, t in [*model.named_parameters(), *model.named_buffers()]
        ],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert [(n, id(m), t, v) for n, m, t, v in after["modules"]] == [(n, id(m), t, v) for n, m, t, v in before["modules"]]
    assert len(after["tensors"]) == len(before["tensors"])
    for (name, t, ptr, dtype, values, flag), (name0, t0, ptr0, dtype0, values0, flag0) in zip(after["tensors"], before["tensors"]):
        assert name == name0 and t is t0, name
        assert (ptr, dtype, flag) == (ptr0, dtype0, flag0), name
        assert torch.equal(values, values0), name


@pytest.mark.filterwarnings("ignore:init='pissa'. the base of this QLoRALinear is quantized:UserWarning")
@pytest.mark.parametrize("init", ["kaiming", "pissa"])
@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_a_failed_inject_leaves_the_model_bit_identical(method: str, init: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    if method == "qlora":  # a quantized layer that PiSSA requantizes, and a dense one
        from peft_layers.quant import QuantizedLinear

        model[0] = QuantizedLinear.from_linear(model[0])
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape("inject_adapters(): module '1': rank: expected an int in [1, min(in_features, out_features)] = [1, 8], got 16")):
        pl.inject_adapters(model, ["0", "1"], method=method, rank=16, init=init)
    assert_unchanged(model, before)
    # a bad rank_pattern value fails at its module only, also with the module's name
    with pytest.raises(ValueError, match="module '0': rank"):
        pl.inject_adapters(model, ["1", "0"], method=method, rank=4, rank_pattern={"0": 100}, init=init)
    assert_unchanged(model, before)
    with pytest.raises(TypeError, match=r"inject_adapters\(\): module '0': use_rslora: expected a bool"):
        pl.inject_adapters(model, ["0", "1"], method=method, use_rslora="yes")
    assert_unchanged(model, before)


@pytest.mark.parametrize("lazy_at", [0, 2])
def test_a_model_with_a_lazy_module_not_yet_run_is_refused_by_name(lazy_at: int) -> None:
    """Injection freezes every parameter, which torch refuses for uninitialized ones: the lazy
    module is named, whether it is the target or elsewhere, and the model stays as it was."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model[lazy_at] = nn.LazyLinear(4)
    target = str(2 - lazy_at)
    before = [(name, module) for name, module in model.named_modules()]
    with pytest.raises(ValueError, match=rf"^model: 1 module\(s\) hold uninitialized parameters \(lazy modules\): "
                       rf"'{lazy_at}' \(LazyLinear\); run a forward"):
        pl.inject_adapters(model, [target], rank=2)
    assert [(name, module) for name, module in model.named_modules()] == before
    assert all(p.requires_grad for p in model.parameters())
    model(torch.randn(3, 4))  # materialised: injection works
    pl.inject_adapters(model, [target], rank=2)
    assert isinstance(model[int(target)], pl.LoRALinear) and not model[lazy_at].weight.requires_grad


def test_the_rollback_of_a_failed_change_skips_uninitialized_parameters_and_raises_the_real_error() -> None:
    from peft_layers.model._tree import _undo_on_error

    model = nn.Sequential(nn.LazyLinear(4), nn.Linear(4, 4))
    inner = model[1]
    with pytest.raises(RuntimeError, match="^the real error$"):
        with _undo_on_error(model, [model[1]], values=True):
            model[1].weight.requires_grad_(False)
            model[1] = nn.Identity()
            raise RuntimeError("the real error")
    assert model[1] is inner and inner.weight.requires_grad and inner.bias.requires_grad


@pytest.mark.parametrize(
    ("method", "kwargs", "message"),
    [
        ("lora", {"rnk": 4}, "rnk: method 'lora' takes no argument 'rnk' (got rnk=4); its layer arguments are "
         "rank, alpha, dropout, use_rslora, init; did you mean 'rank'?"),
        ("lora", {"quant": "nf4"}, "quant: method 'lora' takes no argument 'quant' (got quant='nf4'); its layer "
         "arguments are rank, alpha, dropout, use_rslora, init; quant is an argument of method 'qlora' or 'qdora'"),
        ("lora", {"epsilon": 1e-6}, "epsilon is an argument of method 'dora' or 'qdora'"),
        ("dora", {"lr_ratio": 4.0}, "lr_ratio: method 'dora' takes no argument 'lr_ratio' (got lr_ratio=4.0); its "
         "layer arguments are rank, alpha, dropout, use_rslora, init, epsilon; lr_ratio is an argument of method 'lora_plus'"),
        ("qlora", {"epsilon": 1e-6}, "its layer arguments are rank, alpha, dropout, use_rslora, init, quant, "
         "blocksize, double_quant, compute_dtype; epsilon is an argument of method 'dora' or 'qdora'"),
        ("lora", {"device": "cpu"}, "device: method 'lora' takes no argument 'device' (got device='cpu')"),
        # Hugging Face PEFT's LoraConfig names point to ours
        ("lora", {"r": 4}, "its layer arguments are rank, alpha, dropout, use_rslora, init; Hugging Face PEFT's r is rank= here"),
        ("lora", {"use_dora": True}, "Hugging Face PEFT's use_dora is method='dora' (or 'qdora') here"),
        ("lora", {"layers_to_transform": [0]}, "Hugging Face PEFT's layers_to_transform is a regex target, e.g. "
         r"re.compile(r'.*layers\.(0|1)\..*_proj') here"),
        ("dora", {"task_type": "SEQ_CLS"}, "Hugging Face PEFT's task_type is modules_to_save=[<the head's name>] here"),
    ],
)
def test_a_layer_argument_the_method_does_not_take(method: str, kwargs: dict, message: str) -> None:
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(TypeError, match=re.escape(message)):
        pl.inject_adapters(model, "q_proj", method=method, **kwargs)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bias": "lora_only"}, "bias: expected one of ('none', 'all', 'adapter_only'), got 'lora_only'; Hugging Face "
         "PEFT's bias='lora_only' is bias='adapter_only' here"),
        ({"init": True}, "init: expected one of ('kaiming', 'gaussian', 'pissa'), got True; Hugging Face PEFT's "
         "init_lora_weights=True is init='kaiming' here"),
        ({"init": False}, "init: expected one of ('kaiming', 'gaussian', 'pissa'), got False"),
    ],
)
def test_hugging_face_peft_values_point_to_ours(kwargs: dict, message: str) -> None:
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        pl.inject_adapters(model, "q_proj", **kwargs)
    assert_unchanged(model, before)


def test_layer_arguments_are_what_the_layers_take() -> None:
    from peft_layers.lora import _layer_arguments
    from peft_layers.model import METHODS, method_class

    # each accepted argument builds a layer: the list is derived from the classes, not kept by hand
    values = {"rank": 2, "alpha": 4.0, "dropout": 0.1, "use_rslora": True, "init": "gaussian", "lr_ratio": 4.0,
              "epsilon": 1e-6, "quant": "nf4", "blocksize": 64, "double_quant": False, "compute_dtype": torch.float32}
    for method in METHODS:
        accepted = _layer_arguments(method_class(method))
        layer = method_class(method).from_linear(nn.Linear(8, 8), **{a: values[a] for a in accepted})
        assert method_of(layer) == method


def test_load_adapter_names_a_layer_argument_of_another_method(tmp_path) -> None:
    pl.save_adapter(pl.inject_lora(tiny_model(), "q_proj", rank=2), tmp_path)
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"quant: method 'lora' takes no argument 'quant'.*'qlora' or 'qdora'"):
        pl.load_adapter(model, tmp_path, quant="nf4")
    assert_unchanged(model, before)
    pl.load_adapter(model, tmp_path, method="qlora", quant="nf4")  # as the hint says
    assert all(method_of(layer) == "qlora" for _, layer in iter_adapter_layers(model))


# ---- adapter state dicts -------------------------------------------------------------------------
def test_adapter_state_dict_round_trip() -> None:
    source = pl.inject_adapters(tiny_model(), list(ATTN), method="dora", rank=4)
    randomize_adapters(source)
    state = pl.adapter_state_dict(source)
    assert set(state) == {f"layers.{i}.attn.{p}.{t}" for i in (0, 1) for p in ATTN for t in ("lora_A", "lora_B", "magnitude")}
    full = source.state_dict()
    assert all(torch.equal(full[k], v) for k, v in state.items())
    target = pl.inject_adapters(tiny_model(), list(ATTN), method="dora", rank=4)
    pl.load_adapter_state_dict(target, state)
    batch = tokens()
    with torch.no_grad():
        torch.testing.assert_close(target(batch), source(batch), rtol=0, atol=0)


def test_adapter_state_dict_keeps_the_biases_that_train(tmp_path) -> None:
    """A bias that ``bias=`` trains belongs to the adapter, as in ``save_adapter``'s file and
    Hugging Face PEFT's ``get_peft_model_state_dict``: ``adapter_state_dict`` gives it under its
    ``model.state_dict()`` key, so the round trip through ``load_adapter_state_dict`` (the
    documented way to keep a LoRA-beside-DoRA model, and the FSDP2 recipe) rebuilds the trained
    model exactly. Before, the biases were dropped (outputs off by about 6) and refused when
    added by hand. ``read_adapter(...).state_dict()`` names them as well, and combining a
    state dict with a bias names the key."""

    def build() -> nn.Module:
        model = tiny_model().double()
        pl.inject_adapters(model, "q_proj", bias="all")
        return pl.inject_adapters(model, "v_proj", method="dora", bias="all")

    torch.manual_seed(0)
    trained = build()
    with torch.no_grad():
        for parameter in trained.parameters():
            if parameter.requires_grad:  # adapters and every bias, as training moves them
                parameter.add_(0.1 * torch.randn_like(parameter))
    state = pl.adapter_state_dict(trained)
    biases = {k for k, p in trained.named_parameters() if k.endswith("bias") and p.requires_grad}
    assert biases and biases <= set(state)
    assert "layers.0.attn.q_proj.base_layer.bias" in state
    full = trained.state_dict()
    assert all(torch.equal(full[k], v) for k, v in state.items())
    fresh = build()
    pl.load_adapter_state_dict(fresh, state)
    batch = tokens()
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch), trained(batch), rtol=0, atol=0)

    lora = pl.inject_lora(tiny_model(), list(ATTN), bias="adapter_only", rank=2)
    randomize_adapters(lora)
    with torch.no_grad():
        lora.layers[0].attn.q_proj.bias.add_(1.0)
    pl.save_adapter(lora, tmp_path)
    expected = pl.adapter_state_dict(lora)
    from_file = pl.io.read_adapter(tmp_path).state_dict()
    assert from_file.keys() == expected.keys()
    assert all(torch.equal(from_file[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match=r"'layers.0.attn.q_proj.base_layer.bias' is a trained bias"):
        pl.compose.combine_adapters([expected, expected], [0.5, 0.5])


def test_a_model_without_adapters_has_no_adapter_state() -> None:
    """A fresh model trains every bias, which the bias rule read as ``bias="all"``: its
    ``adapter_state_dict`` was every bias, and ``load_adapter_state_dict`` copied biases into a
    model never injected, or blamed missing bias keys. As documented, the state is empty and
    loading raises "no adapter layers", leaving the model as it was."""
    model = tiny_model()
    assert all(parameter.requires_grad for parameter in model.parameters())
    assert pl.adapter_state_dict(model) == {}
    before = {key: value.clone() for key, value in model.state_dict().items()}
    bias = {"layers.0.attn.q_proj.bias": torch.full_like(model.layers[0].attn.q_proj.bias, 7.0)}
    for state, strict in (({}, True), ({}, False), (bias, True), (bias, False)):
        with pytest.raises(ValueError, match="model has no adapter layers; inject_adapters"):
            pl.load_adapter_state_dict(model, state, strict=strict)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_load_adapter_state_dict_mismatch_changes_nothing() -> None:
    model = pl.inject_lora(tiny_model(), list(ATTN), rank=4)
    good = {k: torch.randn_like(v) for k, v in pl.adapter_state_dict(model).items()}
    before = {k: v.clone() for k, v in pl.adapter_state_dict(model).items()}

    def unchanged() -> bool:
        return all(torch.equal(v, pl.adapter_state_dict(model)[k]) for k, v in before.items())

    missing = dict(good)
    missing.pop("layers.1.attn.o_proj.lora_B")
    with pytest.raises(ValueError, match="missing.*layers.1.attn.o_proj.lora_B"):
        pl.load_adapter_state_dict(model, missing)
    assert unchanged()
    extra = {**good, "layers.0.attn.q_proj.magnitude": torch.ones(32)}
    with pytest.raises(ValueError, match="unexpected"):
        pl.load_adapter_state_dict(model, extra)
    assert unchanged()
    wrong_shape = {**good, "layers.1.attn.v_proj.lora_A": torch.zeros(2, 32)}
    with pytest.raises(ValueError, match=r"layers.1.attn.v_proj.lora_A.*\(2, 32\)"):
        pl.load_adapter_state_dict(model, wrong_shape)
    assert unchanged()
    integer = {**good, "layers.0.attn.k_proj.lora_B": torch.zeros(32, 4, dtype=torch.int64)}
    with pytest.raises(ValueError, match="floating"):
        pl.load_adapter_state_dict(model, integer)
    assert unchanged()
    # non-strict: missing and unexpected keys are skipped, the rest loads
    pl.load_adapter_state_dict(model, {**missing, "other": torch.zeros(1)}, strict=False)
    after = pl.adapter_state_dict(model)
    assert torch.equal(after["layers.0.attn.q_proj.lora_A"], good["layers.0.attn.q_proj.lora_A"])
    assert torch.equal(after["layers.1.attn.o_proj.lora_B"], before["layers.1.attn.o_proj.lora_B"])


@pytest.mark.parametrize("kind", ["meta", "sparse"])
def test_load_adapter_state_dict_refuses_values_it_cannot_copy_before_copying_any(kind: str) -> None:
    """A meta or sparse value failed in ``copy_`` after the keys sorted before it were copied."""
    model = pl.inject_lora(tiny_model(), list(ATTN), rank=4)
    state = {k: torch.randn_like(v) for k, v in pl.adapter_state_dict(model).items()}
    before = {k: v.clone() for k, v in pl.adapter_state_dict(model).items()}
    last = sorted(state)[-1]
    state[last] = state[last].to("meta") if kind == "meta" else state[last].to_sparse()
    described = "on the meta device" if kind == "meta" else "of layout torch.sparse_coo"
    with pytest.raises(ValueError, match=rf"state_dict\['{re.escape(last)}'\]: expected a dense tensor with values, got one {described}"):
        pl.load_adapter_state_dict(model, state)
    assert all(torch.equal(v, pl.adapter_state_dict(model)[k]) for k, v in before.items())


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_a_state_dict_saved_from_a_wrapped_model_before_still_loads(prefix: str) -> None:
    """Before the tools saw through wrappers, a DDP or compiled model's adapter state dict had its
    keys under ``module.`` / ``_orig_mod.`` (training checkpoints): it loads, into a wrapped
    model or a plain one."""
    model = pl.inject_lora(tiny_model(), list(ATTN), rank=4)
    state = {prefix + k: torch.randn_like(v) for k, v in pl.adapter_state_dict(model).items()}
    for into in (model, nn.DataParallel(model)):
        pl.load_adapter_state_dict(into, state)
        assert all(torch.equal(v, state[prefix + k]) for k, v in pl.adapter_state_dict(model).items())


def test_load_adapter_state_dict_that_would_load_nothing_raises_even_if_not_strict() -> None:
    """Keys of another layout (Hugging Face PEFT's file keys) matched nothing, and ``strict=False``
    loaded nothing without a word."""
    model = pl.inject_lora(tiny_model(), list(ATTN), rank=4)
    theirs = {f"base_model.model.{k}.weight": v for k, v in pl.adapter_state_dict(model).items()}
    with pytest.raises(ValueError, match=r"none of its keys fits.*base_model.model.*read by load_adapter\(\)"):
        pl.load_adapter_state_dict(model, theirs, strict=False)
    for bad in (None, 0, "yes"):
        with pytest.raises(TypeError, match=rf"strict: expected a bool, got {re.escape(repr(bad))}"):
            pl.load_adapter_state_dict(model, {}, strict=bad)
    assert pl.load_adapter_state_dict(model, {}, strict=False) is model  # nothing given, nothing to load


def test_load_adapter_state_dict_with_keys_of_mixed_types() -> None:
    """Extra keys of mixed types (an int beside strs) broke the sort of the unexpected keys with a
    bare TypeError: ``strict=False`` ignores them and loads the rest; ``strict`` names them."""
    source = pl.inject_lora(tiny_model(), list(ATTN), rank=4)
    randomize_adapters(source)
    model = pl.inject_lora(tiny_model(), list(ATTN), rank=4)
    state = {**pl.adapter_state_dict(source), 1: torch.zeros(1), "step": torch.zeros(1)}
    pl.load_adapter_state_dict(model, state, strict=False)
    assert all(torch.equal(v, pl.adapter_state_dict(source)[k]) for k, v in pl.adapter_state_dict(model).items())
    with pytest.raises(ValueError, match=r"unexpected: \[1, 'step'\]"):
        pl.load_adapter_state_dict(model, state)


# ---- k-bit preparation -----------------------------------------------------------------------------
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100,
    )
    return transformers.LlamaForCausalLM(config).to(torch.bfloat16)


def bnb_4bit_bf16_storage() -> nn.Module:
    """A bitsandbytes Linear4bit whose packed weight (Params4bit) is stored as bfloat16."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    module = bnb.nn.Linear4bit(32, 16, compute_dtype=torch.bfloat16, quant_storage=torch.bfloat16)
    module.weight = bnb.nn.Params4bit(
        linear.weight.detach().clone(), requires_grad=False, quant_storage=torch.bfloat16
    )
    module.bias = nn.Parameter(linear.bias.detach().to(torch.bfloat16))
    return module.to("cpu")  # quantizes


@pytest.mark.parametrize("build", ["tiny_model", "llama", "bnb"])
def test_prepare_for_kbit_training_casts_as_hugging_face_peft(build: str) -> None:
    peft = pytest.importorskip("peft")
    if build == "tiny_model":
        model = tiny_model().to(torch.bfloat16)
    elif build == "llama":
        model = tiny_llama()
    else:
        model = nn.Sequential(nn.Embedding(10, 32), bnb_4bit_bf16_storage(), nn.LayerNorm(16)).to(torch.bfloat16)
    theirs = peft.prepare_model_for_kbit_training(copy.deepcopy(model), use_gradient_checkpointing=False)
    ours = pl.prepare_for_kbit_training(model)
    their_dtypes = {name: p.dtype for name, p in theirs.named_parameters()}
    assert {name: p.dtype for name, p in ours.named_parameters()} == their_dtypes
    assert torch.float32 in their_dtypes.values()
    if build == "bnb":  # the packed 4-bit storage keeps its dtype, the bias is cast
        assert ours[1].weight.dtype == torch.bfloat16 and ours[1].bias.dtype == torch.float32
    assert not any(p.requires_grad for p in ours.parameters())


def test_a_packed_4bit_weight_counts_the_values_it_encodes_whatever_its_storage_dtype() -> None:
    module = bnb_4bit_bf16_storage()  # a 16 x 32 weight, 4 codes per bfloat16 element, and a trainable bias
    assert module.weight.dtype == torch.bfloat16 and module.weight.numel() == 16 * 32 // 4
    assert pl.trainable_parameters(nn.Sequential(module)) == (16, 16 * 32 + 16)


def test_merge_and_unload_leaves_packed_4bit_storage_out_of_the_neighbours_dtype() -> None:
    # the untargeted layer's codes are stored as bfloat16 (128 elements) but are no bfloat16 values:
    # the float32 LayerNorm (32 values) outweighs its bfloat16 bias (16)
    model = nn.Sequential(bnb_4bit_bf16_storage(), bnb_4bit_bf16_storage(), nn.LayerNorm(16))
    pl.inject_adapters(model, ["0"], method="qlora", rank=2)
    assert model[0].compute_dtype == torch.bfloat16
    pl.merge_and_unload(model)
    assert type(model[0]) is nn.Linear and model[0].weight.dtype == torch.float32


def test_prepare_for_kbit_training_after_injection_leaves_the_adapters_dtype() -> None:
    """Called after inject_adapters, it casts the half-precision base and leaves the adapter
    tensors (here cast to bfloat16 by the user) and their requires_grad as they are."""
    model = pl.inject_adapters(tiny_model().to(torch.bfloat16), ["q_proj"], method="dora", rank=2)
    adapters = [p for _, layer in pl.model.iter_adapter_layers(model) for p in layer.adapter_parameters()]
    for parameter in adapters:
        parameter.data = parameter.data.to(torch.bfloat16)
    pl.prepare_for_kbit_training(model)
    assert all(p.dtype == torch.bfloat16 and p.requires_grad for p in adapters)
    inside = {id(p) for p in adapters}
    assert all(p.dtype == torch.float32 for p in model.parameters() if id(p) not in inside)


def test_prepare_for_kbit_training_enables_checkpointed_training() -> None:
    model = pl.prepare_for_kbit_training(tiny_model().to(torch.bfloat16))
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    assert model.embed(tokens()).requires_grad

    # with the blocks checkpointed, the adapters inside them get the gradients they get without
    model = pl.prepare_for_kbit_training(tiny_model())
    pl.inject_lora(model, "q_proj", rank=2)
    randomize_adapters(model)
    gradients = []
    for checkpointed in (True, False):
        model.zero_grad(set_to_none=True)
        x = model.embed(tokens())
        for block in model.layers:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=True) if checkpointed else block(x)
        x.sum().backward()
        gradients.append([layer.lora_A.grad for _, layer in iter_adapter_layers(model)])
    assert all(grad is not None and grad.abs().sum() > 0 for grad in gradients[0])
    for with_checkpoints, plain in zip(*gradients):
        torch.testing.assert_close(with_checkpoints, plain, rtol=1e-5, atol=1e-7)


def test_prepare_for_kbit_training_checkpoints_a_transformers_model_as_it_trains_plainly() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    base = transformers.LlamaForCausalLM(config).train()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    grads = []
    # plain, checkpointed (transformers' default), and non-reentrant through the kwargs
    for checkpointed, kwargs in ((False, None), (True, None), (True, {"use_reentrant": False})):
        torch.manual_seed(1)  # the same A
        model = pl.inject_lora(copy.deepcopy(base), "q_proj", rank=2)
        randomize_adapters(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # transformers 5's deprecated name warns
            pl.prepare_for_kbit_training(model, gradient_checkpointing=checkpointed, gradient_checkpointing_kwargs=kwargs)
        new_name = hasattr(type(model), "is_activation_checkpointing")  # transformers 5; the old one warns
        assert getattr(model, "is_activation_checkpointing" if new_name else "is_gradient_checkpointing") == checkpointed
        if kwargs is not None:
            assert model.model.layers[0]._gradient_checkpointing_func.keywords == kwargs
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([layer.lora_B.grad for _, layer in iter_adapter_layers(model)])
    for plain, *checkpointed in zip(*grads):
        assert plain.abs().sum() > 0
        for grad in checkpointed:
            torch.testing.assert_close(grad, plain, rtol=1e-5, atol=1e-7)


def test_prepare_for_kbit_training_refuses_checkpointing_kwargs_without_checkpointing() -> None:
    model = tiny_model().to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"gradient_checkpointing_kwargs: \{'use_reentrant': False\} given with gradient_checkpointing=False"):
        pl.prepare_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(TypeError, match=r"gradient_checkpointing_kwargs: expected a dict or None, got 'no'"):
        pl.prepare_for_kbit_training(model, True, gradient_checkpointing_kwargs="no")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_prepare_for_kbit_training_without_checkpointing_support_changes_nothing() -> None:
    model = tiny_model().to(torch.bfloat16)
    before = [(name, p.dtype, p.requires_grad) for name, p in model.named_parameters()]
    with pytest.raises(ValueError, match=r"gradient_checkpointing: TinyTransformer has no gradient_checkpointing_enable\(\) \(nor activation"):
        pl.prepare_for_kbit_training(model, gradient_checkpointing=True)
    assert [(name, p.dtype, p.requires_grad) for name, p in model.named_parameters()] == before
    assert all(not m._forward_hooks for m in model.modules())
    assert not hasattr(model.embed, "_peft_layers_grad_hook")


def test_prepare_for_kbit_training_refuses_a_model_that_says_it_cannot_checkpoint() -> None:
    """A transformers model with ``supports_gradient_checkpointing = False`` has the method but
    raises inside it, which came after the freeze, the float32 cast and the hook: the call now
    refuses first and changes nothing."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.supports_gradient_checkpointing = False  # as JetMoe, CLAP, Flava, ... declare it
    with pytest.raises(ValueError):  # what transformers itself says of such a model
        model.gradient_checkpointing_enable()
    before = [(name, p.dtype, p.requires_grad) for name, p in model.named_parameters()]
    with pytest.raises(ValueError, match=r"^gradient_checkpointing: LlamaForCausalLM does not support it"):
        pl.prepare_for_kbit_training(model, gradient_checkpointing=True)
    assert [(name, p.dtype, p.requires_grad) for name, p in model.named_parameters()] == before
    assert all(not m._forward_hooks for m in model.modules())


class _NoTokenEmbeddings(nn.Module):
    """As transformers' ResNet or PatchTST: ``get_input_embeddings()`` raises
    ``NotImplementedError``."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Linear(4, 8)
        self.time = nn.Embedding(5, 8)

    def get_input_embeddings(self) -> nn.Module:
        raise NotImplementedError("no input embeddings")

    def forward(self, x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        return self.patch(x) + self.time(steps)


def test_prepare_for_kbit_training_on_a_model_without_token_embeddings() -> None:
    """The getter's NotImplementedError ended the call after every parameter was frozen and cast;
    Hugging Face PEFT prepares such models. The embedding found by a scan is hooked instead."""
    model = _NoTokenEmbeddings().to(torch.bfloat16)
    pl.prepare_for_kbit_training(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in model.parameters())
    assert getattr(model.time, "_peft_layers_grad_hook", False)
    out = model(torch.randn(2, 4), torch.tensor([1, 3]))
    assert out.requires_grad  # the hooked embedding's output requires grad


@pytest.mark.parametrize("order", ["prepare, inject", "inject, prepare"])
def test_qlora_flow_on_a_bf16_llama_trains_in_both_orders(order: str) -> None:
    model = tiny_llama()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))

    def inject() -> None:
        pl.inject_adapters(model, LLAMA_TARGETS, method="qlora", rank=4, compute_dtype=torch.bfloat16)

    if order == "prepare, inject":
        pl.prepare_for_kbit_training(model)
        inject()
    else:
        inject()
        layers = dict(iter_adapter_layers(model))
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        adapters = {name: [(p, p.detach().clone()) for p in layer.adapter_parameters()] for name, layer in layers.items()}
        bases = {name: (layer.base_layer.version, copy.deepcopy(layer.base_layer.state_dict())) for name, layer in layers.items()}
        pl.prepare_for_kbit_training(model)
        assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable
        for name, layer in iter_adapter_layers(model):
            for (before, values), now in zip(adapters[name], layer.adapter_parameters()):
                assert now is before and now.requires_grad and torch.equal(now, values)
            version, state = bases[name]
            assert layer.base_layer.version == version
            assert all(torch.equal(t, layer.base_layer.state_dict()[k]) for k, t in state.items())
    assert len(list(iter_adapter_layers(model))) == 2 * len(LLAMA_TARGETS)
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.float32}
    model(input_ids=ids, labels=ids).loss.backward()  # B = 0: the gradient reaches B
    for _, layer in iter_adapter_layers(model):
        assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    randomize_adapters(model)
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    for _, layer in iter_adapter_layers(model):
        assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0


def test_many_layers_go_through_the_progress_bar_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    from peft_layers.model._tree import PROGRESS_MIN_LAYERS

    model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(PROGRESS_MIN_LAYERS + 3)))
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = model(x)
    pl.inject_lora(model, lambda name, module: isinstance(module, nn.Linear), rank=2)
    assert len(adapter_names(model)) == PROGRESS_MIN_LAYERS + 3
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)  # B = 0: a fresh adapter is the base
        randomize_adapters(model)
        unmerged = model(x)
        pl.merge_adapters(model)
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-6)
        pl.unmerge_adapters(model)
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-6)
        pl.merge_and_unload(model)
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-6)
    assert capsys.readouterr().err == ""  # not a terminal: tqdm stays silent


def test_merge_and_unload_refuses_a_disabled_adapter() -> None:
    """Merging would silently drop the disabled adapter; merge_adapters refuses it too."""
    model = pl.inject_lora(tiny_model(), "q_proj", rank=2)
    randomize_adapters(model)
    disabled = model.layers[1].attn.q_proj
    disabled.adapter_enabled = False
    with pytest.raises(ValueError, match=r"merge_and_unload\(\): these layers have their adapter disabled: \['layers\.1\.attn\.q_proj'\]"):
        pl.merge_and_unload(model)
    assert model.layers[1].attn.q_proj is disabled
    assert isinstance(model.layers[0].attn.q_proj, pl.LoRALinear) and not model.layers[0].attn.q_proj.merged


@pytest.mark.parametrize(
    "tool",
    [pl.merge_adapters, pl.unmerge_adapters, pl.merge_and_unload, pl.unload, pl.adapter_state_dict,
     pl.trainable_parameters, pl.print_trainable_parameters, pl.prepare_for_kbit_training,
     lambda model: pl.inject_lora(model, "q_proj"), lambda model: pl.load_adapter_state_dict(model, {}),
     lambda model: pl.disable_adapters(model).__enter__(),
     lambda model: list(pl.model.iter_adapter_layers(model)), lambda model: list(pl.model.iter_modules_to_save(model))],
)
def test_every_model_tool_names_a_model_that_is_not_a_module(tool) -> None:
    with pytest.raises(TypeError, match="^model: expected an nn.Module, got NoneType$"):
        tool(None)


def test_merge_and_unload_of_a_quantized_base_takes_its_neighbours_dtype() -> None:
    """A bf16-compute QLoRA layer among float32 layers (as after prepare_for_kbit_training) merges
    into a float32 nn.Linear: a bf16 one would refuse the float32 activations it is given."""
    model = pl.inject_adapters(tiny_model(), ["q_proj", "v_proj"], method="qlora", rank=2, compute_dtype=torch.bfloat16)
    randomize_adapters(model)
    x = tokens()
    layer = model.layers[0].attn.q_proj
    with torch.no_grad():
        f64 = torch.float64
        expected = layer.base_layer.dequantize(f64) + layer.scaling * layer.lora_B.to(f64) @ layer.lora_A.to(f64)
        unmerged = model(x)
        pl.merge_and_unload(model)
        merged = model.layers[0].attn.q_proj
        assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
        torch.testing.assert_close(merged.weight.to(f64), expected, rtol=1e-6, atol=1e-6)
        # it runs among the float32 layers; the unmerged layers computed in bf16, hence the tolerance
        torch.testing.assert_close(model(x), unmerged, rtol=5e-2, atol=5e-2)
    alone = pl.inject_adapters(nn.Sequential(nn.Linear(16, 8)), ["0"], method="qlora", rank=2, compute_dtype=torch.bfloat16)
    pl.merge_and_unload(alone)  # no other float parameters: the compute dtype
    assert alone[0].weight.dtype == torch.bfloat16


@pytest.mark.parametrize("tool", [pl.unmerge_adapters, pl.unload])
def test_a_layer_that_cannot_unmerge_stops_the_tool_before_any_change(tool) -> None:
    """A merged DoRA layer that loaded other values refuses to unmerge (docs/layers.md): the
    model tools ask every layer first, so the other merged layers stay merged."""
    model = pl.inject_adapters(tiny_model(), ["q_proj"], method="dora", rank=2)
    randomize_adapters(model)
    pl.merge_adapters(model)
    state = model.state_dict()
    state["layers.1.attn.q_proj.magnitude"] = state["layers.1.attn.q_proj.magnitude"] + 0.01
    with pytest.warns(UserWarning, match="loaded other values into a merged layer"):
        model.load_state_dict(state)
    first = model.layers[0].attn.q_proj
    weight = first.weight.detach().clone()
    with pytest.raises(ValueError, match=r"unmerge\(\): this merged DoRA layer loaded a state dict"):
        tool(model)
    assert model.layers[0].attn.q_proj is first and first.merged and torch.equal(first.weight, weight)


def test_a_regex_written_as_a_string_gets_a_hint() -> None:
    """Hugging Face PEFT reads a str target as a regex; here a str is a name suffix."""
    with pytest.raises(ValueError, match=r"matches no module .*a str is a name suffix, never a regex: pass re.compile"):
        pl.inject_lora(tiny_model(), r".*\.(q|v)_proj")
    with pytest.raises(ValueError, match=r"matches no module .*'all-linear' stands for every linear layer as targets itself"):
        pl.inject_lora(tiny_model(), ["q_proj", "all-linear"])
    with pytest.raises(ValueError, match=r"matches no module") as error:
        pl.inject_lora(tiny_model(), "nope_proj")
    assert "never a regex" not in str(error.value)
    with pytest.raises(TypeError, match="'embed', an Embedding; method 'lora' wraps nn.Linear or transformers Conv1D only$"):
        pl.inject_lora(tiny_model(), "embed")


@pytest.mark.parametrize(("method", "quantized"), [("lora", "qlora"), ("lora_plus", "qlora"), ("dora", "qdora")])
def test_a_float_method_on_a_quantized_layer_names_the_quantized_one(method: str, quantized: str) -> None:
    """A float method aimed at a bitsandbytes 4-bit layer (a model transformers loaded in 4 bits)
    raises naming the method that wraps it; the model is left unchanged."""
    pytest.importorskip("bitsandbytes")
    model = nn.Sequential(bnb_linear4bit(nn.Linear(64, 64)))
    before = type(model[0])
    with pytest.raises(TypeError, match=rf"a Linear4bit; method '{method}' wraps .* only: give it '{quantized}', which wraps quantized layers$"):
        pl.inject_adapters(model, ["0"], method=method)
    assert type(model[0]) is before


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_disable_adapters_gives_the_base_model_inside_the_block(method: str) -> None:
    """The reference policy of DPO: the base model exactly, merged layers included, and the
    adapted model again after the block (also after an error inside it)."""
    base = tiny_model()
    model = pl.inject_adapters(copy.deepcopy(base), ["q_proj", "v_proj"], method=method, rank=2)
    randomize_adapters(model)
    model.layers[0].attn.q_proj.merge()  # one merged layer: unmerged inside, merged back after
    x = tokens()
    with torch.no_grad():
        adapted, expected = model(x), base(x)
        with pl.disable_adapters(model) as inside:
            assert inside is model  # (the merged layer's unmerge restores W0 to float32 rounding)
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
        assert model.layers[0].attn.q_proj.merged
        with pytest.raises(RuntimeError, match="inside"):
            with pl.disable_adapters(model):
                raise RuntimeError("inside")
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    assert all(layer.adapter_enabled for _, layer in iter_adapter_layers(model))
    with pytest.raises(ValueError, match=r"disable_adapters\(\): model has no adapter layers"):
        with pl.disable_adapters(tiny_model()):
            pass


def test_merging_quantized_layers_warns_once_per_call() -> None:
    """merge_adapters / unmerge_adapters / unload over k quantized layers give one requantize warning that
    counts them, not k; the merge itself is each layer's (the same weights as layer by layer)."""
    model = pl.inject_adapters(tiny_model(), ["q_proj", "v_proj"], method="qlora", rank=2)
    twin = copy.deepcopy(model)
    randomize_adapters(model)
    randomize_adapters(twin)
    quantized = len(adapter_names(model))
    for tool, caller in ((pl.merge_adapters, "merge_adapters()"), (pl.unmerge_adapters, "unmerge_adapters()")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tool(model)
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1, messages
        assert messages[0].startswith(f"{caller}: {quantized} adapter layer(s) have a quantized base (nf4)")
        consequence = "the merged weight is requantized" if tool is pl.merge_adapters else "the weight without the adapter is requantized"
        assert consequence in messages[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _, layer in iter_adapter_layers(twin):
                layer.merge() if tool is pl.merge_adapters else layer.unmerge()
        for (_, ours), (_, theirs) in zip(iter_adapter_layers(model), iter_adapter_layers(twin)):
            assert torch.equal(ours.base_layer.dequantize(), theirs.base_layer.dequantize())
    # unload unmerges merged layers: one warning too (it gave one per layer), the same bases
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.merge_adapters(model)
        for _, layer in iter_adapter_layers(twin):
            layer.merge()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.unload(model)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and messages[0].startswith(f"unload(): {quantized} adapter layer(s) have a quantized base")
    assert "the weight without the adapter is requantized" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _, layer in iter_adapter_layers(twin):
            layer.unmerge()
    for name in adapter_names(twin):
        assert torch.equal(model.get_submodule(name).dequantize(), twin.get_submodule(name).base_layer.dequantize())
    plain = pl.inject_lora(tiny_model(), "q_proj")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no quantized layer: no warning
        pl.merge_adapters(plain)
        pl.unmerge_adapters(plain)


def test_an_exclusion_or_a_pattern_that_matches_nothing_is_a_typo_reported() -> None:
    """``exclude="k-proj"`` excluded nothing and ``rank_pattern={"qproj": 4}`` set no rank, both
    silently; like a target that matches nothing, each raises now, naming the nearest names.
    Nothing changes."""
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^exclude: 'k-proj' matches no module of TinyTransformer; its linear layers are \(nearest first\): \['layers.0.attn.k_proj'"):
        pl.inject_lora(model, list(ATTN), exclude="k-proj")
    with pytest.raises(ValueError, match=r"^rank_pattern: key 'qproj' matches none of the targets .*\['layers.0.attn.q_proj'"):
        pl.inject_lora(model, list(ATTN), rank_pattern={"qproj": 4})
    with pytest.raises(ValueError, match=r"^alpha_pattern: key 'up_proj' matches none of the targets"):
        pl.inject_lora(model, list(ATTN), alpha_pattern={"up_proj": 4.0})  # a module, but no target
    assert not adapter_names(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # an exclusion of a module that exists but is not a target is not a typo
    assert len(adapter_names(pl.inject_lora(tiny_model(), list(ATTN), exclude="up_proj"))) == 8


def test_a_callable_exclude_is_asked_about_target_matches_only() -> None:
    """The check that an exclusion matches something called a callable on every module of the
    model (a ReLU has no ``out_features``); a callable is the caller's own test and is not checked,
    as before."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    pl.inject_adapters(model, lambda n, m: isinstance(m, nn.Linear), exclude=lambda n, m: m.out_features == 4)
    assert isinstance(model[0], pl.LoRALinear) and type(model[2]) is nn.Linear
    pl.inject_lora(tiny_model(), "q_proj", exclude=lambda name, module: "vision" in name)  # matches nothing: fine


def test_a_pattern_key_is_compiled_as_it_is_matched() -> None:
    """``(?i)q`` compiles alone, but not inside Hugging Face's ``(.*\\.)?(key)$``: it raised a bare
    ``re.error`` at matching time."""
    with pytest.raises(ValueError, match=r"^rank_pattern: key '\(\?i\)q_proj' is not a valid regex \(global flags"):
        pl.inject_lora(tiny_model(), list(ATTN), rank_pattern={"(?i)q_proj": 4})


def test_a_method_of_the_wrong_type_is_named() -> None:
    with pytest.raises(ValueError, match=r"^method: expected one of .*, got \['lora'\]$"):
        pl.inject_adapters(tiny_model(), "q_proj", method=["lora"])


def test_an_empty_exclude_excludes_nothing() -> None:
    assert adapter_names(pl.inject_lora(tiny_model(), "q_proj", exclude=[])) == adapter_names(
        pl.inject_lora(tiny_model(), "q_proj")
    )


def test_multihead_attention_out_proj_is_refused() -> None:
    """nn.MultiheadAttention reads out_proj.weight itself and never calls out_proj: an adapter
    there would change nothing (and a merge would change the output), so it is refused."""
    model = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"^targets: 'self_attn.out_proj' is the out_proj of an nn.MultiheadAttention.*exclude it"):
        pl.inject_lora(model, lambda name, module: isinstance(module, nn.Linear))
    assert type(model.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    pl.inject_lora(model, lambda name, module: isinstance(module, nn.Linear), exclude="out_proj")
    assert adapter_names(model) == ["linear1", "linear2"]


def _encoder(batch_first: bool, activation: Any = "relu") -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0,
                                       batch_first=batch_first, activation=activation)
    return nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)


def _eval_output_uses_the_adapters(model: nn.Module) -> None:
    """With B random, the eval output equals the train-mode one (dropout 0) and the merged model's,
    and differs from the base model's: the adapters are applied in eval too."""
    with torch.no_grad():
        for _, layer in pl.model.iter_adapter_layers(model):
            layer.lora_B.normal_()
    x = torch.randn(2, 5, 8)
    y_train = model.train()(x)
    with torch.no_grad():
        y_eval = model.eval()(x)
        with pl.disable_adapters(model):
            y_base = model(x)
        assert not torch.allclose(y_eval, y_base, atol=1e-3)
        torch.testing.assert_close(y_eval, y_train.detach(), rtol=1e-5, atol=1e-5)
        pl.merge_and_unload(model)
        torch.testing.assert_close(model(x), y_eval, rtol=1e-5, atol=1e-5)


def test_transformer_encoder_feed_forward_on_torchs_fast_path_is_refused() -> None:
    """In eval, an nn.TransformerEncoderLayer with batch_first=True hands linear1/linear2's weights
    to torch's fused kernel and never calls them: adapters there would silently do nothing (as
    Hugging Face PEFT's do). Refused, model untouched, unless the fast path is switched off."""
    model = _encoder(batch_first=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"^targets: 'layers.0.linear1' is the linear1 of an nn.TransformerEncoderLayer "
                                        r"that torch runs through its fast path.*set_fastpath_enabled\(False\).*exclude it"):
        pl.inject_lora(model, ["linear1", "linear2"], rank=2)
    with pytest.raises(TypeError, match=r"^targets: 'layers.0.linear1' is the linear1"):
        pl.inject_lora(model, "all-linear", rank=2)  # 'all-linear' says so too, rather than adapt nothing
    assert not any(isinstance(m, pl.LoRALinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    torch.backends.mha.set_fastpath_enabled(False)
    try:
        pl.inject_lora(model, ["linear1", "linear2"], rank=2)
        _eval_output_uses_the_adapters(model)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


@pytest.mark.parametrize("batch_first, activation", [(False, "relu"), (True, torch.nn.functional.silu)])
def test_transformer_encoder_feed_forward_off_the_fast_path_takes_adapters(batch_first, activation) -> None:
    """batch_first=False, or an activation the fused kernel lacks: torch never takes the fast path,
    so linear1/linear2 take adapters, which work in eval."""
    model = _encoder(batch_first, activation)
    pl.inject_lora(model, ["linear1", "linear2"], rank=2)
    assert adapter_names(model) == ["layers.0.linear1", "layers.0.linear2"]
    if not batch_first:
        return  # the layer wants (seq, batch, d): the helper's (batch, seq, d) is only a shape
    _eval_output_uses_the_adapters(model)


def test_quantizing_a_module_the_model_keeps_in_float32_is_refused() -> None:
    """T5 keeps ``wo`` unquantized (``_keep_in_fp32_modules``) and casts its activations to
    ``wo.weight.dtype``: a quantized ``wo`` (packed uint8) would break the forward."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
                                   decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    for method in ("qlora", "qdora"):
        with pytest.raises(TypeError, match=r"'encoder.block.0.layer.1.DenseReluDense.wo' is kept unquantized by its transformers model's _keep_in_fp32_modules \(\['wo'\]\)"):
            pl.inject_adapters(model, ["q", "wo"], method=method, rank=2)
        assert not adapter_names(model)
    pl.inject_adapters(model, ["q", "wo"], method="qlora", rank=2, exclude="wo")
    pl.inject_adapters(model, "wo", method="lora", rank=2)
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids, decoder_input_ids=ids[:, :3])  # runs: wo is a float LoRA layer


def test_loaded_quantized_is_judged_per_transformers_model() -> None:
    """Side by side in a plain module, a 4-bit model's float layers get LoRA under "qlora" and a
    float model's are quantized, whatever the names ("a" and "ab"); a module shared by both
    stays float, in either order."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    from models import bnb_linear4bit

    class Config(transformers.PretrainedConfig):
        model_type = "peft_layers_tiny"

    class Tiny(transformers.PreTrainedModel):
        config_class = Config

        def __init__(self, quantized: bool = False, other: nn.Module | None = None) -> None:
            super().__init__(Config())
            self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 64)
            if quantized:
                self.fc1 = bnb_linear4bit(self.fc1)
            if other is not None:
                self.other = other

    def methods(model: nn.Module, targets) -> dict[str, str]:  # noqa: ANN001
        return {n: method_of(l) for n, l in iter_adapter_layers(pl.inject_adapters(model, targets, method="qlora", rank=2))}

    torch.manual_seed(0)
    assert methods(nn.ModuleDict({"a": Tiny(quantized=True), "ab": Tiny()}), ["fc2"]) == {"a.fc2": "lora", "ab.fc2": "qlora"}
    assert methods(nn.ModuleDict({"ab": Tiny(quantized=True), "a": Tiny()}), ["fc2"]) == {"ab.fc2": "lora", "a.fc2": "qlora"}
    for order in ("quantized first", "float first"):
        shared = Tiny()
        pair = {"o": Tiny(quantized=True, other=shared), "f": shared}
        model = nn.ModuleDict(pair if order == "quantized first" else dict(reversed(pair.items())))
        assert set(methods(model, re.compile(r"o\.other\.fc2|f\.fc2")).values()) == {"lora"}


def test_all_linear_gives_a_linear_subclass_kept_in_float32_the_float_method() -> None:
    class Wide(nn.Linear):
        pass

    class Model(nn.Module):
        _keep_in_fp32_modules = ["wo"]

        def __init__(self) -> None:
            super().__init__()
            self.wi, self.wo = nn.Linear(64, 64), Wide(64, 64)

    model = pl.inject_adapters(Model(), "all-linear", method="qlora", rank=2)
    assert {n: type(l) for n, l in iter_adapter_layers(model)} == {"wi": pl.QLoRALinear, "wo": pl.LoRALinear}
    with pytest.raises(TypeError, match="'wo' is kept unquantized"):
        pl.inject_adapters(Model(), ["wo"], method="qlora", rank=2)


def test_all_linear_wraps_a_quantized_layer_named_in_keep_in_fp32_modules_as_it_is() -> None:
    """A _keep_in_fp32_modules entry that the loader did quantize: a quantized layer is wrapped
    as it is, whatever its name; the float layers of the model loaded quantized get LoRA."""
    pytest.importorskip("bitsandbytes")
    from models import bnb_linear4bit

    class Model(nn.Module):
        _keep_in_fp32_modules = ["wo"]

        def __init__(self) -> None:
            super().__init__()
            self.wi, self.wo = nn.Linear(64, 64), bnb_linear4bit(nn.Linear(64, 64))

    model = pl.inject_adapters(Model(), "all-linear", method="qlora", rank=2)
    assert {n: type(l) for n, l in iter_adapter_layers(model)} == {"wi": pl.LoRALinear, "wo": pl.QLoRALinear}


@pytest.mark.parametrize("method", ["qlora", "qdora"])
def test_all_linear_gives_a_layer_kept_in_float32_the_float_method(method: str, tmp_path) -> None:
    """``"all-linear"`` names no layer: as Hugging Face PEFT, it gives T5's ``wo`` (kept
    unquantized) a LoRA/DoRA layer and quantizes the others; the mix saves as one adapter."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
                                   decoder_start_token_id=0)
    torch.manual_seed(0)
    base = transformers.T5ForConditionalGeneration(config).eval()
    model = pl.inject_adapters(copy.deepcopy(base), "all-linear", method=method, rank=2, quant="fp4", blocksize=32)
    layers = dict(pl.model.iter_adapter_layers(model))
    floats = sorted(name for name, layer in layers.items() if not isinstance(layer, pl.QLoRALinear))
    assert floats == ["decoder.block.0.layer.2.DenseReluDense.wo", "encoder.block.0.layer.1.DenseReluDense.wo"]
    assert all(method_of(layers[name]) == method[1:] for name in floats)
    assert {layer.base_layer.scheme for layer in layers.values() if isinstance(layer, pl.QLoRALinear)} == {"fp4"}
    # encoder: q, k, v, o and wi, wo; decoder: those and the cross-attention q, k, v, o
    assert "lm_head" not in layers and len(layers) == 6 + 10
    # a float T5 inside a module of the user's: its own _keep_in_fp32_modules still counts
    holder = pl.inject_adapters(nn.ModuleDict({"t5": copy.deepcopy(base)}), "all-linear", method=method, rank=2)
    assert sorted(n for n, l in iter_adapter_layers(holder) if not isinstance(l, pl.QLoRALinear)) == [
        "t5." + name for name in floats
    ]
    with pytest.raises(TypeError, match=r"'t5.encoder.block.0.layer.1.DenseReluDense.wo' is kept unquantized"):
        pl.inject_adapters(nn.ModuleDict({"t5": copy.deepcopy(base)}), ["wo"], method=method, rank=2)
    shared = copy.deepcopy(base)  # one model under two names: each name counts
    with pytest.raises(TypeError, match=r"'b.encoder.block.0.layer.1.DenseReluDense.wo' is kept unquantized"):
        pl.inject_adapters(nn.ModuleDict({"a": shared, "b": shared}), re.compile(r"b\..*wo"), method=method, rank=2)
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_B)
    pl.save_adapter(model, tmp_path)
    loaded = pl.load_adapter(copy.deepcopy(base), tmp_path)
    assert {n: type(l) for n, l in pl.model.iter_adapter_layers(loaded)} == {n: type(l) for n, l in layers.items()}
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, decoder_input_ids=ids[:, :3]).logits,
                                   model(ids, decoder_input_ids=ids[:, :3]).logits, rtol=1e-6, atol=1e-6)


class _TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(32, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.q_proj(x))


@pytest.mark.parametrize("method", ["lora", "lora_plus", "dora"])
def test_meta_device_recipe_gives_a_model_equal_to_its_base(method: str) -> None:
    """Build under ``torch.device("meta")``, inject (which warns how to finish), ``to_empty()``,
    then ``reset_parameters()`` on every module, as torch.nn's recipe does (DoRA: after loading
    the base weights, whose row norms its magnitude is): the model equals its base."""
    torch.manual_seed(0)
    base = _TwoLinears()
    x = torch.randn(3, 32)
    for _ in range(4):  # dirty the allocator, so that to_empty() hands out garbage
        torch.randn(32 * 32).mul_(1e30)
    with torch.device("meta"):
        model = _TwoLinears()
    note = "after loading the base weights" if method == "dora" else "the adapter layers \\(torch.nn"
    with pytest.warns(UserWarning, match=rf"the base layer is on the meta device.*reset_parameters\(\).*{note}"):
        pl.inject_adapters(model, ["q_proj"], method=method, rank=4)
    model.to_empty(device="cpu")
    adapted = {name for name, module in model.named_modules() if isinstance(module, pl.LoRALinear)}

    def under_base_layer(key: str) -> str:  # docs/model.md's renaming
        module, _, leaf = key.rpartition(".")
        return f"{module}.base_layer.{leaf}" if module in adapted else key

    def load_base() -> None:
        result = model.load_state_dict({under_base_layer(k): v for k, v in base.state_dict().items()}, strict=False)
        assert not result.unexpected_keys
        assert {key.rpartition(".")[2] for key in result.missing_keys} <= {"lora_A", "lora_B", "magnitude"}

    if method == "dora":
        load_base()
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    load_base()
    layer = model.q_proj
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    if method == "dora":
        torch.testing.assert_close(layer.magnitude, base.q_proj.weight.norm(dim=1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "lora_plus", "dora"])
def test_meta_device_recipe_with_assign_gives_a_model_equal_to_its_base(method: str) -> None:
    """docs/model.md's simpler recipe: build on meta, ``load_state_dict(assign=True)``, inject:
    the model equals its base, DoRA's magnitude is the row norms of the loaded weight."""
    torch.manual_seed(0)
    base = _TwoLinears()
    x = torch.randn(3, 32)
    with torch.device("meta"):
        model = _TwoLinears()
    model.load_state_dict(base.state_dict(), assign=True)
    pl.inject_adapters(model, ["q_proj"], method=method, rank=4)
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    if method == "dora":
        torch.testing.assert_close(model.q_proj.magnitude, base.q_proj.weight.norm(dim=1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_merged_layer_refuses_to_reset(method: str) -> None:
    """``reset_parameters()`` is torch.nn's generic hook now: on a merged layer it would leave the
    merged update in W0 for good, so it refuses before touching anything."""
    torch.manual_seed(0)
    model = pl.inject_adapters(nn.Sequential(nn.Linear(8, 6)), ["0"], method=method, rank=2)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    w0 = layer.weight.detach().clone()
    layer.merge()
    state = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match=r"cannot re-initialise a merged layer \(the merged update would stay in W0\); unmerge\(\) first"):
        layer.reset_parameters()
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=1e-6, atol=1e-6)


def test_meta_models_refuse_pissa_and_adapter_loads(tmp_path) -> None:
    """A meta weight has no singular vectors to split, and copying a file into meta tensors keeps
    nothing: both raise, the second leaving the model as it was."""
    with torch.device("meta"):
        model = _TwoLinears()
    with pytest.raises(ValueError, match=r"module 'q_proj': init: 'pissa' splits the singular vectors of W0, which a weight on the meta device"):
        pl.inject_adapters(model, ["q_proj"], rank=2, init="pissa")
    pl.save_adapter(pl.inject_adapters(_TwoLinears(), ["q_proj"], rank=2), tmp_path)
    with pytest.raises(ValueError, match=r"'q_proj': the model's tensors there are on the meta device, which holds no values, so the file's tensors would be dropped"):
        pl.load_adapter(model, tmp_path)
    assert type(model.q_proj) is nn.Linear
    with pytest.warns(UserWarning, match="meta device"):
        pl.inject_adapters(model, ["q_proj"], rank=2)
    with pytest.raises(ValueError, match=r"'q_proj': the model's tensors there are on the meta device"):
        pl.load_adapter(model, tmp_path)
    with pytest.raises(ValueError, match=r"load_adapter_state_dict\(\): \['q_proj.lora_A', 'q_proj.lora_B'\] are on the meta device"):
        pl.load_adapter_state_dict(model, {"q_proj.lora_A": torch.zeros(2, 32), "q_proj.lora_B": torch.zeros(32, 2)})


def test_tied_weights_warnings_say_what_happens() -> None:
    """A module to save tied to the embedding warns that its copy unties them; QLoRA on a tied
    head quantizes a copy, so no warning says the embedding changes (even with PiSSA)."""
    model = tiny_model()
    with pytest.warns(UserWarning, match=r"\{'lm_head': \['embed.weight'\]\} share their weights with modules to save"):
        pl.inject_adapters(model, ["q_proj"], rank=2, modules_to_save=["lm_head"])
    assert model.embed.weight is model.lm_head.original.weight
    model = tiny_model()
    embedding = model.embed.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pl.inject_adapters(model, ["lm_head"], method="qlora", rank=2, init="pissa")
    assert torch.equal(model.embed.weight, embedding)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_unload_inside_a_disable_block_is_refused(method: str) -> None:
    """Leaving the block merges a merged layer again, into the base that unload would have
    given back: unload refuses inside the block, changing nothing, and works after it."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6))
    w0 = base[0].weight.detach().clone()
    model = pl.inject_adapters(base, ["0"], method=method, rank=2)
    with torch.no_grad():
        model[0].lora_B.normal_()
    pl.merge_adapters(model)
    for block in (lambda: pl.disable_adapters(model), lambda: model[0].disable_adapter()):
        with block():
            with pytest.raises(ValueError, match=r"unload\(\): these layers are inside a disable_adapter\(\) / disable_adapters\(\) block: \['0'\]"):
                pl.unload(model)
        assert isinstance(model[0], pl.LoRALinear) and model[0].merged
    pl.unload(model)
    torch.testing.assert_close(model[0].weight, w0, rtol=1e-6, atol=1e-6)


def test_stacking_inside_a_disable_block_is_refused() -> None:
    """The block's exit merged the replaced LoRA layer again, into the base layer the stack had
    taken over: the stack's base and, after unload, the model's weight were W0 + s B A for good."""
    torch.manual_seed(0)
    model = pl.inject_adapters(nn.Sequential(nn.Linear(8, 6)), ["0"], rank=2)
    with torch.no_grad():
        model[0].lora_B.normal_()
    pl.merge_adapters(model)
    merged = model[0].weight.detach().clone()
    other = {"0.lora_A": torch.randn(1, 8), "0.lora_B": torch.randn(6, 1)}
    with pl.disable_adapters(model):
        with pytest.raises(ValueError, match=r"model: '0' is inside a disable_adapter\(\) / disable_adapters\(\) block.*stack after the block"):
            pl.stack_adapters(model, {"other": other})
    assert isinstance(model[0], pl.LoRALinear) and model[0].merged
    torch.testing.assert_close(model[0].weight, merged, rtol=1e-6, atol=1e-6)  # unmerged and merged again


@pytest.mark.parametrize("copy_with", ["deepcopy", "pickle"])
def test_a_copy_taken_inside_a_disable_block_is_outside_it(copy_with: str) -> None:
    """A copy inside the block (DPO's frozen reference model) carried the block's counter, which
    only the live block's exit counts down: the copy refused unload() for good. It is a plain
    disabled layer now, computing the base model as the original did inside the block."""
    torch.manual_seed(0)
    model = pl.inject_adapters(nn.Sequential(nn.Linear(8, 6)), ["0"], rank=2)
    with torch.no_grad():
        model[0].lora_B.normal_()
    x = torch.randn(3, 8)
    with pl.disable_adapters(model):
        copied = copy.deepcopy(model) if copy_with == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert model[0].disable_blocks == 0 and model[0].adapter_enabled
    assert copied[0].disable_blocks == 0 and not copied[0].adapter_enabled
    with torch.no_grad():
        assert torch.equal(copied(x), model[0].base_layer(x))
        copied[0].adapter_enabled = True
        assert torch.equal(copied(x), model(x))
    pl.unload(copied)
    assert type(copied[0]) is nn.Linear


# ---- targets="all-linear", against Hugging Face PEFT's choice ----------------------------------------
def _adapted_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, pl.LoRALinear)}


def _hf_adapted_names(model: nn.Module) -> set[str]:
    peft = pytest.importorskip("peft")
    return {name.removeprefix("base_model.model.") for name, module in model.named_modules()
            if isinstance(module, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "bert-seq-cls"])
def test_all_linear_targets_the_layers_hugging_face_peft_targets(architecture: str) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    task_type, modules_to_save = None, None
    if architecture == "llama":  # its lm_head is left out
        base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=50))
    elif architecture == "gpt2":  # Conv1D layers; the tied lm_head is left out
        base = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50))
    else:  # the classifier head trains in full (Hugging Face PEFT's task_type="SEQ_CLS")
        base = transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48))
        task_type, modules_to_save = "SEQ_CLS", ["classifier"]
    ours = pl.inject_adapters(copy.deepcopy(base), "all-linear", rank=2, modules_to_save=modules_to_save)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules="all-linear", task_type=task_type))
    expected = _hf_adapted_names(theirs)
    assert _adapted_names(ours) == expected
    linears = {n for n, m in base.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    assert len(expected) == len(linears) - 1  # every linear layer but the output one
    if modules_to_save:
        assert isinstance(ours.classifier, pl.ModuleToSave)


def test_all_linear_leaves_out_modules_to_save_and_existing_adapters() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), nn.Linear(8, 4))
    pl.inject_adapters(model, "0", rank=2)
    pl.inject_adapters(model, "all-linear", rank=2, modules_to_save=["2"])
    assert _adapted_names(model) == {"0", "1.0", "1.1"}  # "0" from before, not wrapped twice
    assert isinstance(model[2], pl.ModuleToSave)


class _WithOutputLayer(nn.Module):
    """Not a transformers model, though it has their method: Hugging Face PEFT adapts its output
    layer, and so do we; a MultiheadAttention's out_proj is left out (never called)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.hidden, self.out = nn.Linear(8, 8), nn.Linear(8, 4)

    def get_output_embeddings(self) -> nn.Module:
        raise NotImplementedError  # only transformers models are asked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(self.attn(x, x, x)[0]))


def test_all_linear_asks_only_transformers_models_for_their_output_layer() -> None:
    model = pl.inject_adapters(_WithOutputLayer(), "all-linear", rank=2)
    assert _adapted_names(model) == {"hidden", "out"}
    assert model(torch.randn(3, 1, 8)).shape == (3, 1, 4)
    with pytest.raises(ValueError, match=r"targets: 'all-linear' matches no module of Sequential"):
        pl.inject_adapters(nn.Sequential(nn.ReLU()), "all-linear")


def test_a_prepared_model_saved_whole_loads_again_and_its_hook_keeps_working() -> None:
    """prepare_for_kbit_training's hook stays on the embeddings, and ``torch.save(model)`` names it
    by its module path: ``peft_layers.model._require_grad_hook``, the path of models saved before
    model.py became a package, must keep resolving."""
    import io
    import pickle

    from peft_layers.model._kbit import _require_grad_hook

    assert pickle.loads(b"cpeft_layers.model\n_require_grad_hook\n.") is _require_grad_hook
    model = pl.prepare_for_kbit_training(tiny_model())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    assert _require_grad_hook.__module__ == "peft_layers.model"  # the path new pickles record
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.embed(torch.tensor([[1, 2]])).requires_grad  # the hook runs on the frozen embedding


def test_all_linear_leaves_out_a_top_level_classifier_or_score_head() -> None:
    for head in ("classifier", "score"):
        model = nn.Module()
        model.body = nn.Linear(8, 8)
        setattr(model, head, nn.Linear(8, 2))
        pl.inject_adapters(model, "all-linear", rank=2)
        assert isinstance(model.body, pl.LoRALinear) and type(getattr(model, head)) is nn.Linear


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_all_linear_through_a_wrapper_adapts_what_it_adapts_in_the_plain_model(wrap: str) -> None:
    """torch.compile's and DataParallel's wrappers rename every module; the output layer and a
    top-level head are still the model's and are left out."""
    transformers = pytest.importorskip("transformers")

    def build() -> tuple[nn.Module, nn.Module]:
        torch.manual_seed(0)
        llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, tie_word_embeddings=False))
        classifier = nn.Module()
        classifier.body, classifier.score = nn.Linear(8, 8), nn.Linear(8, 2)
        return llama, classifier

    for plain, inner in zip(build(), build()):
        pl.inject_adapters(plain, "all-linear", rank=2)
        wrapper = torch.compile(inner, backend="eager") if wrap == "compile" else nn.DataParallel(inner)
        pl.inject_adapters(wrapper, "all-linear", rank=2)
        assert _adapted_names(inner) == _adapted_names(plain)
        assert not any(name.endswith(("lm_head", "score")) for name in _adapted_names(inner))


def test_merge_and_unload_keeps_a_dense_bf16_layer_in_bf16_among_float32_neighbours() -> None:
    """The neighbours' dtype is for a quantized base (its float layer has no dtype of its own)."""
    model = nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16), nn.Linear(8, 8), nn.Linear(8, 8))
    pl.inject_adapters(model, ["0"], rank=2)
    pl.merge_and_unload(model)
    assert model[0].weight.dtype == torch.bfloat16 and type(model[0]) is nn.Linear


def test_load_adapter_state_dict_refuses_a_merged_layer_and_changes_nothing() -> None:
    model = pl.inject_adapters(nn.Sequential(nn.Linear(8, 8)), ["0"], rank=2)
    state = {key: torch.ones_like(value) for key, value in pl.adapter_state_dict(model).items()}
    before = {key: value.clone() for key, value in pl.adapter_state_dict(model).items()}
    pl.merge_adapters(model)
    with pytest.raises(ValueError, match=r"unmerge these layers first: \['0'\]"):
        pl.load_adapter_state_dict(model, state)
    assert all(torch.equal(value, before[key]) for key, value in pl.adapter_state_dict(model).items())


def test_nested_disable_blocks_keep_a_module_to_save_disabled_until_the_outer_one_ends() -> None:
    model = pl.inject_adapters(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), ["0"], rank=2, modules_to_save=["1"])
    with torch.no_grad():
        model[1].trained.weight.add_(1.0)
    x = torch.randn(3, 4)
    with torch.no_grad(), pl.disable_adapters(model):
        expected = model(x)
        with pl.disable_adapters(model):
            pass
        assert model[1].enabled is False
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert model[1].enabled is True


def test_regex_target_and_exclude_are_full_matches_not_prefix_matches() -> None:
    """A compiled regex must match the whole dotted name: a prefix (re.match) is not enough."""
    with pytest.raises(ValueError, match="matches no module"):
        pl.inject_lora(tiny_model(), re.compile(r"layers\.1\.attn\.q"))  # a prefix of layers.1.attn.q_proj
    # "layers\.0" full-matches the block layers.0 (so it is no typo) but none of the targets
    model = pl.inject_lora(tiny_model(), "q_proj", exclude=re.compile(r"layers\.0"))
    assert [n for n, _ in iter_adapter_layers(model)] == ["layers.0.attn.q_proj", "layers.1.attn.q_proj"]


def test_the_first_matching_pattern_key_wins_as_in_hugging_face_peft() -> None:
    """Of two rank_pattern / alpha_pattern keys that match a name, the first wins, in either order,
    as in Hugging Face PEFT's get_pattern_key."""
    get_pattern_key = pytest.importorskip("peft.utils.other").get_pattern_key

    for patterns in ({r"layers\.0\.attn\.q_proj": 2, "q_proj": 6}, {"q_proj": 6, r"layers\.0\.attn\.q_proj": 2}):
        for name in ("layers.0.attn.q_proj", "layers.1.attn.q_proj"):
            assert pattern_key(patterns, name) == get_pattern_key(list(patterns), name)
    model = pl.inject_lora(tiny_model(), "q_proj", rank=4, rank_pattern={r"layers\.0\.attn\.q_proj": 2, "q_proj": 6},
                           alpha_pattern={r"layers\.1\.attn\.q_proj": 3.0, "q_proj": 5.0})
    layers = dict(iter_adapter_layers(model))
    assert (layers["layers.0.attn.q_proj"].rank, layers["layers.1.attn.q_proj"].rank) == (2, 6)
    assert (layers["layers.0.attn.q_proj"].alpha, layers["layers.1.attn.q_proj"].alpha) == (5.0, 3.0)


# ---- from a second mutation audit of model/ -------------------------------------------------------
def test_pattern_key_must_match_a_whole_dotted_tail_not_a_head() -> None:
    """A rank_pattern/alpha_pattern key matches a whole dotted tail of the name (``$``-anchored,
    as Hugging Face PEFT's ``get_pattern_key``): ``layers\\.0`` or ``q`` names no layer
    ``layers.0.attn.q_proj``, and a rank_pattern with such a key is refused as matching no
    target."""
    name = "layers.0.attn.q_proj"
    for key in (r"layers\.0", "q", "attn", r"attn\.q"):
        assert pattern_key({key: 1}, name) is None
    assert pattern_key({r"attn\.q_proj": 1}, name) == r"attn\.q_proj"
    peft_other = pytest.importorskip("peft.utils.other")
    for key in (r"layers\.0", "q", r"attn\.q_proj"):  # the second implementation agrees
        theirs = peft_other.get_pattern_key([key], name)
        assert (pattern_key({key: 1}, name) or name) == theirs
    with pytest.raises(ValueError, match=r"rank_pattern: key 'layers\\\\.0' matches none of the targets"):
        pl.inject_lora(tiny_model(), "q_proj", rank=4, rank_pattern={r"layers\.0": 2})


def test_all_linear_leaves_out_the_layers_inside_a_top_level_classifier_head() -> None:
    """"all-linear" leaves out a top-level ``classifier``/``score`` head and what lies inside it
    (documented in ``_AllLinear``): a RoBERTa-style head ``classifier.dense``/``classifier.out_proj``
    gets no adapter, while the body does."""
    model = nn.Module()
    model.body = nn.Linear(8, 8)
    model.classifier = nn.Sequential()
    model.classifier.add_module("dense", nn.Linear(8, 8))
    model.classifier.add_module("out_proj", nn.Linear(8, 2))
    pl.inject_adapters(model, "all-linear", rank=2)
    assert [name for name, _ in iter_adapter_layers(model)] == ["body"]
    assert type(model.classifier.dense) is nn.Linear and type(model.classifier.out_proj) is nn.Linear


def _wide_then_narrow() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 2))


def test_all_linear_relaxes_the_rank_bound_only_for_layers_no_pattern_or_pissa_names() -> None:
    """Under "all-linear" a layer narrower than the rank takes it (as Hugging Face PEFT), but a
    rank_pattern entry names the layer, and PiSSA needs ``rank`` singular vectors: both keep the
    bound ``rank <= min(in, out)`` and fail with the layer's error, leaving the model as it was."""
    relaxed = pl.inject_adapters(_wide_then_narrow(), "all-linear", rank=4)
    assert relaxed[1].rank == 4 and tuple(relaxed[1].lora_A.shape) == (4, 16)
    bound = re.escape("inject_adapters(): module '1': rank: expected an int in [1, min(in_features, out_features)] = [1, 2]")
    for kwargs in ({"rank_pattern": {"1": 8}}, {"init": "pissa"}):
        model = _wide_then_narrow()
        with pytest.raises(ValueError, match=bound):
            pl.inject_adapters(model, "all-linear", rank=4, **kwargs)
        assert type(model[0]) is nn.Linear and type(model[1]) is nn.Linear


def test_a_regex_exclude_that_matches_nothing_is_reported() -> None:
    """Like a str exclusion, a compiled-regex exclusion that matches no module is a typo and
    raises ValueError (only a callable is exempt, being the caller's own test)."""
    model = _wide_then_narrow()
    with pytest.raises(ValueError, match=r"^exclude: re.compile\('nothing'\) matches no module of Sequential"):
        pl.inject_adapters(model, ["0"], rank=2, exclude=re.compile("nothing"))
    assert type(model[0]) is nn.Linear


class _RootBias(nn.Module):
    """A model whose own (top-level) parameter is named ``bias``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.bias


def test_bias_all_trains_a_bias_held_by_the_model_itself() -> None:
    """``bias="all"``: every bias of the model trains, including one the root module holds,
    whose name is plain ``"bias"`` (no dot); gradients reach it."""
    model = pl.inject_lora(_RootBias(), "fc", rank=2, bias="all")
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["bias", "fc.base_layer.bias", "fc.lora_A", "fc.lora_B"]
    model(torch.randn(3, 4)).sum().backward()
    torch.testing.assert_close(model.bias.grad, torch.full((4,), 3.0))


class _KeepsWo(nn.Module):
    """A model that keeps ``wo`` unquantized (transformers' ``_keep_in_fp32_modules``)."""

    _keep_in_fp32_modules = ["wo"]

    def __init__(self) -> None:
        super().__init__()
        self.wo, self.wo_gate = nn.Linear(64, 64), nn.Linear(64, 64)


def test_keep_in_fp32_entries_match_whole_name_components_of_their_own_model_only() -> None:
    """A ``_keep_in_fp32_modules`` entry keeps the layers of its own model whose names end in it
    as whole dotted components: ``wo`` keeps ``t5.wo`` float (qlora refuses to quantize it), but
    not ``t5.wo_gate`` (another name), nor ``t5x.wo`` (a sibling module whose name merely starts
    with ``t5``): those two are quantized."""
    holder = nn.Module()
    holder.t5 = _KeepsWo()
    holder.t5x = nn.Module()
    holder.t5x.wo = nn.Linear(64, 64)
    with pytest.raises(TypeError, match=r"'t5.wo' is kept unquantized .*\(\['wo'\]\)"):
        pl.inject_adapters(holder, ["t5.wo"], method="qlora", rank=2)
    pl.inject_adapters(holder, ["t5.wo_gate", "t5x.wo"], method="qlora", rank=2)
    assert {n: type(l) for n, l in iter_adapter_layers(holder)} == {
        "t5.wo_gate": pl.QLoRALinear, "t5x.wo": pl.QLoRALinear,
    }


def test_an_encoder_layer_with_an_odd_number_of_heads_never_takes_the_fast_path_and_is_adapted() -> None:
    """torch's fast path of ``nn.TransformerEncoderLayer`` needs an even number of heads; with 3
    heads the layer calls ``linear1``/``linear2`` in eval too, so they are valid targets and their
    adapters change the eval output (checked against the same layer with the fast path off)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=6, nhead=3, dim_feedforward=8, batch_first=True).eval()
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        base_out = layer(x)
    pl.inject_lora(layer, ["linear1", "linear2"], rank=2)
    assert isinstance(layer.linear1, pl.LoRALinear) and isinstance(layer.linear2, pl.LoRALinear)
    with torch.no_grad():
        layer.linear2.lora_B.normal_()
        adapted = layer(x)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            reference = layer(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    assert not torch.allclose(adapted, base_out)
    torch.testing.assert_close(adapted, reference)


def test_linear2_of_a_fast_path_encoder_layer_is_refused_as_linear1_is() -> None:
    """The fast path of an eval ``nn.TransformerEncoderLayer`` (batch_first, 2 heads) reads
    ``linear2``'s weight directly, as ``linear1``'s: an adapter there would do nothing in eval, so
    targeting ``linear2`` alone is refused too; first the fact itself: the eval output ignores a
    change made through ``linear2``'s forward."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        before = layer(x)
        handle = layer.linear2.register_forward_hook(lambda module, args, out: out + 1.0)
        ignored = layer(x)  # the fast path never calls linear2
        handle.remove()
    torch.testing.assert_close(ignored, before)
    with pytest.raises(TypeError, match=r"^targets: 'linear2' is the linear2 of an nn.TransformerEncoderLayer"):
        pl.inject_lora(layer, ["linear2"], rank=2)
    assert type(layer.linear2) is nn.Linear


def test_alpha_pattern_takes_an_int_alpha() -> None:
    """An alpha is a float, and an int is one (Hugging Face configs write ``{"q_proj": 16}``):
    alpha_pattern takes it, and the layer's scale is alpha / rank = 3 / 2."""
    model = pl.inject_lora(tiny_model(), ["q_proj", "v_proj"], rank=2, alpha=8.0, alpha_pattern={"q_proj": 3})
    layers = dict(iter_adapter_layers(model))
    assert layers["layers.0.attn.q_proj"].alpha == 3.0 and layers["layers.0.attn.v_proj"].alpha == 8.0
    assert layers["layers.1.attn.q_proj"].scaling == pytest.approx(1.5)


def _base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.base_layer.weight.detach().clone() for name, layer in iter_adapter_layers(model)}


def _spoil_disabled(layer: nn.Module) -> None:
    layer.adapter_enabled = False  # the model does not use it, so merging it would change outputs


def _spoil_nan(layer: nn.Module) -> None:
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")


@pytest.mark.parametrize(("spoil", "message"), [
    (_spoil_disabled, r"already merged or disabled: \['layers.1.attn.v_proj'\]$"),
    (_spoil_nan, r"hold NaN or inf: \{'layers.1.attn.v_proj': \['lora_B'\]\}"),
], ids=["disabled", "nan"])
def test_merge_adapters_refuses_a_bad_last_layer_before_merging_any(spoil, message) -> None:
    """A disabled adapter, or one holding NaN, in the last layer is refused with ValueError naming
    it, and no earlier layer has merged (their base weights are bit-identical)."""
    model = pl.inject_lora(tiny_model(), ["q_proj", "v_proj"], rank=2)
    for _, layer in iter_adapter_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_()
    spoil(model.layers[1].attn.v_proj)  # the last layer: the others come first
    before = _base_weights(model)
    with pytest.raises(ValueError) as raised:
        pl.merge_adapters(model)
    assert not any(layer.merged for _, layer in iter_adapter_layers(model))
    after = _base_weights(model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert re.search(message, str(raised.value))


@pytest.mark.parametrize("bias", ["none", "all"])
def test_merge_and_unload_of_a_quantized_base_gives_a_frozen_layer_in_the_models_mode(bias: str) -> None:
    """A QLoRA layer's base is quantized, so merge_and_unload builds a new ``nn.Linear``: it
    holds W0 + delta (compared with the dequantized base plus s B A in float64), its weight is
    frozen as the base's was, its bias trains only if ``bias="all"`` trained it, and it keeps the
    eval mode of the layer it replaces."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)).eval()
    pl.inject_adapters(model, ["0"], method="qlora", rank=2, bias=bias)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = layer.base_layer.dequantize().double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    pl.merge_and_unload(model)
    merged = model[0]
    assert type(merged) is nn.Linear and not merged.training
    assert not merged.weight.requires_grad
    assert merged.bias.requires_grad == (bias == "all")
    torch.testing.assert_close(merged.weight.double(), expected, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_keeps_a_base_weight_the_caller_unfroze_trainable() -> None:
    """The base module comes back holding the merged weight; a base weight the caller unfroze
    (full fine-tuning of that layer alongside the adapter) stays trainable, a frozen one frozen."""
    torch.manual_seed(0)
    model = pl.inject_lora(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), ["0", "1"], rank=2)
    model[0].base_layer.weight.requires_grad_(True)
    bases = [model[0].base_layer, model[1].base_layer]
    pl.merge_and_unload(model)
    assert model[0] is bases[0] and model[1] is bases[1]
    assert model[0].weight.requires_grad and not model[1].weight.requires_grad


def test_merge_and_unload_with_a_dtype_casts_the_kept_bases_bias_too() -> None:
    """``merge_and_unload(dtype=torch.float64)`` on a float32 model: the base module that comes
    back holds a float64 weight and a float64 bias, and computes ``x (W0 + s B A)^T + b`` in
    float64 (checked against that product in float64)."""
    torch.manual_seed(0)
    model = pl.inject_lora(nn.Sequential(nn.Linear(8, 8)), ["0"], rank=2)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    w = layer.base_layer.weight.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    b = layer.base_layer.bias.detach().double()
    pl.merge_and_unload(model, dtype=torch.float64)
    assert model[0].weight.dtype == model[0].bias.dtype == torch.float64
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ w.T.detach() + b)


class _Identity(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


def test_merge_and_unmerge_refuse_a_computed_base_weight_before_changing_any_layer() -> None:
    """A base weight under a parametrization is computed on every forward, so a merge written into
    it would be lost: merge_adapters() and unmerge_adapters() refuse it with ValueError, and do so
    before the first layer changes (the other layer's base weight and merged flag stay as they
    were)."""
    torch.manual_seed(0)
    model = pl.inject_lora(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), ["0", "1"], rank=2)
    for layer in model:
        with torch.no_grad():
            layer.lora_B.normal_()
    # merge: the second base is computed from the start
    torch.nn.utils.parametrize.register_parametrization(model[1].base_layer, "weight", _Identity())
    before = model[0].base_layer.weight.detach().clone()
    with pytest.raises(ValueError) as raised:
        pl.merge_adapters(model)
    assert not model[0].merged and torch.equal(model[0].base_layer.weight, before)
    assert re.search(r"^merge_adapters\(\): '1': base_layer.weight is computed", str(raised.value))
    # unmerge: both merged, then the second base becomes computed
    torch.nn.utils.parametrize.remove_parametrizations(model[1].base_layer, "weight")
    pl.merge_adapters(model)
    merged = model[0].base_layer.weight.detach().clone()
    torch.nn.utils.parametrize.register_parametrization(model[1].base_layer, "weight", _Identity())
    with pytest.raises(ValueError) as raised:
        pl.unmerge_adapters(model)
    assert model[0].merged and torch.equal(model[0].base_layer.weight, merged)
    assert re.search(r"^unmerge_adapters\(\): '1': base_layer.weight is computed", str(raised.value))


def test_prepare_for_kbit_training_passes_checkpointing_kwargs_that_differ_from_the_default() -> None:
    """``gradient_checkpointing_kwargs`` reach transformers' checkpointing call: the blocks'
    checkpoint function carries exactly the given keywords. The kwargs differ from transformers'
    default (``{"use_reentrant": False}`` in transformers 5, which the existing test passes, so a
    call that dropped the kwargs looked the same)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    kwargs = {"use_reentrant": True, "preserve_rng_state": False}
    pl.prepare_for_kbit_training(model, gradient_checkpointing=True, gradient_checkpointing_kwargs=dict(kwargs))
    bound = getattr(model.model.layers[0], "_gradient_checkpointing_func", None)  # transformers' own
    if not isinstance(bound, functools.partial):
        pytest.skip("this transformers does not bind its checkpoint function with functools.partial")
    assert bound.keywords == kwargs
