"""Many adapters over one base: stack_adapters, set_adapter, adapter_batch.

A stacked model is compared with a second implementation, the same model with one adapter
loaded the ordinary way (``load_adapter``), row by row; ``MultiLoRALinear`` itself with a float64
formula.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import peft_layers as pl
from peft_layers.quant import QuantizedLinear
from models import tiny_model, tokens
from reference import f64, lora_ref


def trained_adapter(tmp_path: Path, name: str, targets: list[str], seed: int, **kwargs) -> Path:
    model = pl.inject_lora(tiny_model(), targets, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    for _, layer in pl.model.iter_adapter_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_(generator=generator)
    return pl.save_adapter(model, tmp_path / name)


@pytest.fixture
def two_adapters(tmp_path: Path) -> dict[str, Path]:
    return {
        "math": trained_adapter(tmp_path, "math", ["q_proj", "v_proj"], 1, rank=4, alpha=8.0),
        "code": trained_adapter(tmp_path, "code", ["v_proj", "up_proj"], 2, rank=2, alpha=3.0, use_rslora=True),
    }


def single(directory: Path | None) -> nn.Module:
    """The second implementation: the base model with one adapter loaded the ordinary way."""
    model = tiny_model()
    return model if directory is None else pl.load_adapter(model, directory)


def test_set_adapter_equals_the_adapter_loaded_alone(two_adapters) -> None:
    x = tokens(batch=3)
    model = pl.stack_adapters(tiny_model(), two_adapters)
    with torch.no_grad():
        torch.testing.assert_close(model(x), single(None)(x), rtol=0, atol=0)  # nothing active yet
        for name, directory in two_adapters.items():
            pl.set_adapter(model, name)
            torch.testing.assert_close(model(x), single(directory)(x), rtol=1e-5, atol=1e-5)
        pl.set_adapter(model, None)
        torch.testing.assert_close(model(x), single(None)(x), rtol=0, atol=0)


def test_adapter_batch_gives_each_row_its_adapter(two_adapters) -> None:
    rows = ["math", "code", None, "math"]
    x = tokens(batch=len(rows))
    model = pl.stack_adapters(tiny_model(), two_adapters)
    pl.set_adapter(model, "code")
    with torch.no_grad():
        with pl.adapter_batch(model, rows):
            out = model(x)
        expected = torch.stack(
            [single(two_adapters[name] if name else None)(x[b : b + 1])[0] for b, name in enumerate(rows)]
        )
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        # the per-call choice is back after the block
        torch.testing.assert_close(model(x), single(two_adapters["code"])(x), rtol=1e-5, atol=1e-5)


@given(
    rows=st.lists(st.sampled_from(["a", "b", None]), min_size=1, max_size=6),
    leading=st.sampled_from([(), (3,)]),
    in_features=st.integers(1, 8),
    out_features=st.integers(1, 8),
    ranks=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    scalings=st.tuples(st.floats(-4.0, 4.0), st.floats(-4.0, 4.0)),
    seed=st.integers(0, 2**16),
)
def test_multi_lora_linear_matches_the_float64_formula(
    rows, leading, in_features, out_features, ranks, scalings, seed
) -> None:
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features)
    stack = pl.MultiLoRALinear(base)
    factors = {
        name: (torch.randn(rank, in_features), torch.randn(out_features, rank), scaling)
        for name, rank, scaling in zip("ab", ranks, scalings)
    }
    for name, (lora_A, lora_B, scaling) in factors.items():
        stack.add_adapter(name, lora_A, lora_B, scaling)
    x = torch.randn(len(rows), *leading, in_features)
    base_out = x.double() @ base.weight.double().t() + base.bias.double()

    def delta(name: str, inputs: Tensor) -> Tensor:
        lora_A, lora_B, scaling = factors[name]
        return scaling * (inputs.double() @ lora_A.double().t()) @ lora_B.double().t()

    per_row = base_out.clone()
    for b, name in enumerate(rows):
        if name is not None:
            per_row[b] += delta(name, x[b])
    # with gradients (out of place) and without (the serving path adds in place)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            stack.row_adapters = rows
            torch.testing.assert_close(stack(x).double(), per_row, rtol=1e-5, atol=1e-5)
            stack.row_adapters, stack.active_adapter = None, "b"
            torch.testing.assert_close(stack(x).double(), base_out + delta("b", x), rtol=1e-5, atol=1e-5)
            stack.active_adapter = None
            torch.testing.assert_close(stack(x).double(), base_out, rtol=1e-5, atol=1e-5)


def test_row_indices_are_built_once_per_choice_and_follow_new_adapters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each forward built its row index with ``torch.tensor(list, device=...)``, a blocking host
    copy on a GPU, per layer and adapter. It is kept while the choice, batch and device stay, and
    rebuilt when they change or an adapter is added (whose rows it had left out)."""
    torch.manual_seed(0)
    base = nn.Linear(5, 4)
    stack = pl.MultiLoRALinear(base)
    a = (torch.randn(2, 5), torch.randn(4, 2))
    b = (torch.randn(3, 5), torch.randn(4, 3))
    stack.add_adapter("a", *a, 0.5)
    x = torch.randn(3, 5)

    def expected(rows: list) -> Tensor:
        out = x.double() @ base.weight.double().t() + base.bias.double()
        for row, name in enumerate(rows):
            if name is not None:
                lora_A, lora_B, scaling = {"a": (*a, 0.5), "b": (*b, 2.0)}[name]
                out[row] += scaling * (x[row].double() @ lora_A.double().t()) @ lora_B.double().t()
        return out

    built = []
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *args, **kwargs: built.append(1) or real_tensor(*args, **kwargs))
    with torch.no_grad():
        stack.row_adapters = ["a", "b", "a"]  # "b" is not in the stack yet: base only there
        for _ in range(3):
            torch.testing.assert_close(stack(x).double(), expected(["a", None, "a"]), rtol=1e-5, atol=1e-5)
        assert len(built) == 1
        stack.add_adapter("b", *b, 2.0)
        torch.testing.assert_close(stack(x).double(), expected(["a", "b", "a"]), rtol=1e-5, atol=1e-5)
        assert len(built) == 3
        stack.row_adapters = [None, "a", "a"]
        torch.testing.assert_close(stack(x).double(), expected([None, "a", "a"]), rtol=1e-5, atol=1e-5)
        assert len(built) == 4


def test_a_stacked_models_trained_biases_save_under_the_plain_names(tmp_path: Path) -> None:
    """A stack beside a trained adapter with ``bias="all"``: the stack base's bias was saved as
    ``0.base_layer.bias``, which reads as a base bias without an adapter, so the file did not load
    back. It is ``0.bias``, as the plain model names it."""
    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

    model = net()
    pl.stack_adapters(model, {"a": {"0.lora_A": torch.randn(1, 8), "0.lora_B": torch.randn(8, 1)}})
    pl.inject_adapters(model, ["2"], rank=2, bias="all")
    with torch.no_grad():
        model[0].base_layer.bias.add_(1.0)
        model[2].lora_B.normal_()
    pl.save_adapter(model, tmp_path)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {
        "base_model.model.0.bias", "base_model.model.2.base_layer.bias",
        "base_model.model.2.lora_A.weight", "base_model.model.2.lora_B.weight",
    }
    loaded = pl.load_adapter(net(), tmp_path)
    assert torch.equal(loaded[0].bias, model[0].base_layer.bias)
    x = torch.randn(3, 8)
    with torch.no_grad():
        pl.set_adapter(model, None)  # the stack serves the base: the plain model's layer 0
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_add_adapter_rejects_bad_input() -> None:
    stack = pl.MultiLoRALinear(nn.Linear(5, 4))
    lora_A, lora_B = torch.zeros(2, 5), torch.zeros(4, 2)
    cases = [
        (("a.b", lora_A, lora_B, 1.0), ValueError, r"name: a name must be a non-empty str without '\.', got 'a\.b'"),
        ((3, lora_A, lora_B, 1.0), ValueError, "name: a name must be a non-empty str without '.', got 3"),
        (("to", lora_A, lora_B, 1.0), ValueError, "name: the name 'to' is an attribute of nn.ParameterDict"),
        (("a", lora_A.long(), lora_B, 1.0), TypeError, "lora_A: expected a floating Tensor"),
        (("a", lora_A, [[0.0]], 1.0), TypeError, "lora_B: expected a floating Tensor"),
        (("a", lora_A, lora_B, float("inf")), ValueError, "scaling: expected a finite real number, got inf"),
        (("a", lora_A, lora_B, True), TypeError, "scaling: expected a finite real number, got bool True"),
        (("a", lora_A, lora_B, torch.tensor(1.0)), TypeError, r"scaling: expected a finite real number, got Tensor tensor\(1\.\)"),
        (("a", lora_A, torch.zeros(3, 2), 1.0), ValueError, r"adapter 'a': A \(2, 5\) and B \(3, 2\) do not fit"),
        (("a", lora_A, torch.zeros(4, 3), 1.0), ValueError, r"adapter 'a': A \(2, 5\) and B \(4, 3\) do not fit"),
    ]
    for arguments, error, match in cases:
        with pytest.raises(error, match=match):
            stack.add_adapter(*arguments)
    assert stack.adapter_names == []
    stack.add_adapter("a", lora_A, lora_B, 1.0)
    with pytest.raises(ValueError, match="this layer already has an adapter named 'a'"):
        stack.add_adapter("a", lora_A, lora_B, 1.0)


def test_gradients_reach_the_input_through_a_stack() -> None:
    torch.manual_seed(0)
    stack = pl.MultiLoRALinear(nn.Linear(5, 4))
    lora_A, lora_B = torch.randn(2, 5), torch.randn(4, 2)
    stack.add_adapter("a", lora_A, lora_B, 0.5)
    stack.row_adapters = ["a", None]
    x = torch.randn(2, 5, requires_grad=True)
    stack(x).sum().backward()
    weight = stack.base_layer.weight.detach()
    expected = torch.stack([weight + 0.5 * lora_B @ lora_A, weight]).sum(1)  # d sum(y_b) / d x_b
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)


def test_a_model_with_lora_layers_keeps_its_adapter_as_default(two_adapters, tmp_path: Path) -> None:
    x = tokens(batch=2)
    own = pl.load_adapter(tiny_model(), trained_adapter(tmp_path, "own", ["k_proj"], 5, rank=3))
    before = own(x).detach()
    pl.stack_adapters(own, {"math": two_adapters["math"]})
    assert isinstance(own.layers[0].attn.k_proj, pl.MultiLoRALinear)
    torch.testing.assert_close(own(x), before, rtol=1e-5, atol=1e-5)  # "default" stays active
    pl.set_adapter(own, "math")
    torch.testing.assert_close(own(x), single(two_adapters["math"])(x), rtol=1e-5, atol=1e-5)


def test_a_disabled_lora_layer_stays_off(two_adapters, tmp_path: Path) -> None:
    x = tokens(batch=2)
    own = pl.load_adapter(tiny_model(), trained_adapter(tmp_path, "own", ["k_proj", "q_proj"], 5, rank=3))
    own.layers[0].attn.k_proj.adapter_enabled = False  # the other layers keep theirs on
    with torch.no_grad():
        before = own(x)
        pl.stack_adapters(own, {"math": two_adapters["math"]})
        assert own.layers[0].attn.k_proj.active_adapter is None
        assert own.layers[1].attn.k_proj.active_adapter == "default"
        torch.testing.assert_close(own(x), before, rtol=1e-5, atol=1e-5)


def test_stacking_again_adds_adapters_and_state_dicts_work(two_adapters) -> None:
    x = tokens(batch=2)
    model = pl.stack_adapters(tiny_model(), {"math": two_adapters["math"]})
    plain = pl.adapter_state_dict(single(two_adapters["code"]))  # taken at scaling 1
    pl.stack_adapters(model, {"code_unscaled": plain})
    pl.set_adapter(model, "code_unscaled")
    reference = tiny_model()
    with torch.no_grad():
        for key in plain:
            if key.endswith(".lora_A"):
                path = key[: -len(".lora_A")]
                reference.get_submodule(path).weight += plain[f"{path}.lora_B"] @ plain[key]
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_the_bases_are_the_models_own_float_or_quantized(tmp_path: Path) -> None:
    """A QLoRA file goes on the layers the model has: plain LoRA over a float base, or over the
    quantized bases of a model that ``load_adapter`` quantized."""
    x = tokens(batch=2)
    files = {}
    for name, seed in (("a", 6), ("b", 7)):
        model = pl.inject_adapters(tiny_model(), ["q_proj", "v_proj"], method="qlora", rank=2)
        generator = torch.Generator().manual_seed(seed)
        for _, layer in pl.model.iter_adapter_layers(model):
            with torch.no_grad():
                layer.lora_B.normal_(generator=generator)
        files[name] = pl.save_adapter(model, tmp_path / name)
    with torch.no_grad():
        over_float = pl.stack_adapters(tiny_model(), {"a": files["a"]})
        pl.set_adapter(over_float, "a")
        float_lora = pl.load_adapter(tiny_model(), files["a"], method="lora")
        torch.testing.assert_close(over_float(x), float_lora(x), rtol=1e-5, atol=1e-5)

        quantized = pl.load_adapter(tiny_model(), files["a"])  # QLoRA layers over NF4 bases
        pl.stack_adapters(quantized, {"b": files["b"]})
        stack = quantized.layers[0].attn.q_proj
        assert isinstance(stack, pl.MultiLoRALinear) and isinstance(stack.base_layer, QuantizedLinear)
        torch.testing.assert_close(quantized(x), pl.load_adapter(tiny_model(), files["a"])(x), rtol=1e-5, atol=1e-5)
        pl.set_adapter(quantized, "b")
        torch.testing.assert_close(quantized(x), pl.load_adapter(tiny_model(), files["b"])(x), rtol=1e-5, atol=1e-5)
        pl.set_adapter(quantized, "default")  # adapter a again, now over NF4 bases: not the float result
        assert not torch.allclose(quantized(x), over_float(x), rtol=1e-3, atol=1e-3)


def shared_model() -> nn.Module:
    model = tiny_model()
    model.layers[1].attn.v_proj = model.layers[0].attn.v_proj
    return model


def test_a_shared_module_gets_one_stack(two_adapters, tmp_path: Path) -> None:
    x = tokens(batch=2)
    trained = pl.inject_lora(shared_model(), ["v_proj"], rank=2)
    with torch.no_grad():
        trained.layers[0].attn.v_proj.lora_B.normal_()
    with pytest.warns(UserWarning, match="adapts only the first name"):  # in Hugging Face PEFT
        directory = pl.save_adapter(trained, tmp_path / "shared")  # the shared layer is saved once
    model = pl.stack_adapters(shared_model(), {"s": directory})
    assert model.layers[1].attn.v_proj is model.layers[0].attn.v_proj
    assert isinstance(model.layers[0].attn.v_proj, pl.MultiLoRALinear)
    pl.set_adapter(model, "s")
    with torch.no_grad():
        with pytest.warns(UserWarning, match="adapts only the first name"):
            single_model = pl.load_adapter(shared_model(), directory)
        torch.testing.assert_close(model(x), single_model(x), rtol=1e-5, atol=1e-5)
    # an adapter trained without the sharing updates the one module twice: refused
    with pytest.raises(ValueError, match=r"module 'layers.1.attn.v_proj': is the same module as 'layers.0.attn.v_proj'"):
        pl.stack_adapters(shared_model(), {"math": two_adapters["math"]})


def test_unload_gives_back_the_original_layers(tmp_path: Path) -> None:
    x = tokens(batch=2)
    model = shared_model()
    originals = dict(model.named_modules(remove_duplicate=False))
    with torch.no_grad():
        expected = model(x)
    own = trained_adapter(tmp_path, "own", ["k_proj"], 5, rank=3)
    pl.load_adapter(model, own)  # a LoRA layer is stacked too: its base comes back
    shared = pl.inject_lora(shared_model(), ["v_proj"], rank=2)
    with torch.no_grad():
        shared.layers[0].attn.v_proj.lora_B.normal_()
    with pytest.warns(UserWarning, match="adapts only the first name"):
        directory = pl.save_adapter(shared, tmp_path / "shared")
    pl.stack_adapters(model, {"s": directory})
    pl.set_adapter(model, "s")
    assert model.layers[1].attn.v_proj is model.layers[0].attn.v_proj  # one stack, two names
    pl.unload(model)
    assert not any(isinstance(m, (pl.MultiLoRALinear, pl.LoRALinear)) for m in model.modules())
    for name, module in model.named_modules(remove_duplicate=False):
        assert module is originals[name], name
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_tools_for_trained_adapters_name_the_stacks(two_adapters, tmp_path: Path) -> None:
    model = pl.stack_adapters(tiny_model(), {"math": two_adapters["math"]})
    for call, caller in [
        (pl.merge_and_unload, r"merge_and_unload\(\)"),
        (pl.merge_adapters, r"merge_adapters\(\)"),
        (lambda m: pl.save_adapter(m, tmp_path / "out"), r"save_adapter\(\)"),
        (pl.adapter_state_dict, r"adapter_state_dict\(\)"),  # gave {}: the stacked adapters are not its
        (lambda m: pl.load_adapter_state_dict(m, {}), r"load_adapter_state_dict\(\)"),
    ]:
        with pytest.raises(ValueError, match=caller + r": the model's adapters are stacked for serving.*unload\(model\)"):
            call(model)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"'layers.0.attn.q_proj.base_layer' already has an adapter \(MultiLoRALinear\)"):
        pl.inject_lora(model, lambda name, module: isinstance(module, nn.Linear))
    with pytest.raises(ValueError, match=r"^targets: 'layers.0.attn.q_proj' holds adapters stacked for serving"):
        pl.inject_lora(model, "q_proj")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^load_adapter\(\): the model's adapters are stacked for serving.*stack_adapters\(model, \{name: .*unload\(model\)"):
        pl.load_adapter(model, two_adapters["code"])
    after = snapshot(model)
    assert after[0] == before[0] and all(torch.equal(v, before[1][k]) for k, v in after[1].items())


def snapshot(model: nn.Module) -> tuple[list[str], dict[str, Tensor]]:
    return [type(m).__name__ for m in model.modules()], copy.deepcopy(model.state_dict())


def test_bad_input_is_named_and_leaves_the_model_unchanged(two_adapters, tmp_path: Path) -> None:
    model = pl.stack_adapters(tiny_model(), {"math": two_adapters["math"]})
    before = snapshot(model)
    bad_shape = {"layers.0.attn.q_proj.lora_A": torch.zeros(2, 9), "layers.0.attn.q_proj.lora_B": torch.zeros(32, 2)}
    dora_dir = pl.save_adapter(pl.inject_adapters(tiny_model(), ["q_proj"], method="dora", rank=2), tmp_path / "dora")
    cases = [
        ({"math": two_adapters["code"]}, ValueError, r"adapters: the name 'math' is taken"),
        ({"": two_adapters["code"]}, ValueError, r"adapters: a name must be a non-empty str without '\.', got ''"),
        ({"a.b": two_adapters["code"]}, ValueError, r"got 'a\.b'"),
        # the dict's own attributes: "keys" would have been half added, "training" broke eval()
        ({"ok": two_adapters["code"], "keys": two_adapters["code"]}, ValueError, "the name 'keys' is an attribute"),
        ({"training": two_adapters["code"]}, ValueError, "the name 'training' is an attribute"),
        ({}, ValueError, "adapters: expected at least one adapter"),
        ([two_adapters["code"]], TypeError, "adapters: expected a mapping"),
        ({"ok": two_adapters["code"], "bad": bad_shape}, ValueError, r"adapters\['bad'\], module 'layers.0.attn.q_proj': A \(2, 9\)"),
        ({"nope": {"missing.lora_A": torch.zeros(1, 2), "missing.lora_B": torch.zeros(2, 1)}}, ValueError, "the model has no module 'missing'"),
        ({"norm": {"norm.lora_A": torch.zeros(1, 32), "norm.lora_B": torch.zeros(32, 1)}}, TypeError, "'norm' is a LayerNorm, not a linear layer"),
        ({"dora": dora_dir}, ValueError, r"adapters\['dora'\].*DoRA"),
    ]
    for adapters, error, match in cases:
        with pytest.raises(error, match=match):
            pl.stack_adapters(model, adapters)
        after = snapshot(model)
        assert after[0] == before[0]
        for key, value in before[1].items():
            assert torch.equal(after[1][key], value), key
    with pytest.raises(ValueError, match=r"name: unknown adapter 'code'; the model has \['math'\]"):
        pl.set_adapter(model, "code")
    with pytest.raises(ValueError, match=r"names\[1\]: unknown adapter 'x'"):
        with pl.adapter_batch(model, ["math", "x"]):
            pass
    with pytest.raises(TypeError, match="names: expected a non-empty sequence"):
        with pl.adapter_batch(model, "math"):
            pass
    with pytest.raises(ValueError, match=r"adapter_batch\(\) chose adapters for 3 rows, got an input of shape \(2, 8, 32\)"):
        with pl.adapter_batch(model, ["math", None, None]):
            model(tokens(batch=2))
    assert all(m.row_adapters is None for m in model.modules() if isinstance(m, pl.MultiLoRALinear))
    with pytest.raises(ValueError, match="no stacked adapters; stack_adapters"):
        pl.set_adapter(tiny_model(), "math")
    dora_model = pl.inject_adapters(tiny_model(), ["q_proj"], method="dora", rank=2)
    with pytest.raises(TypeError, match="DoRALinear; only LoRA adapters can be stacked"):
        pl.stack_adapters(dora_model, {"math": two_adapters["math"]})


def test_wrong_types_and_empty_or_rank_0_adapters_are_named(two_adapters) -> None:
    """Before: AttributeError for a model or base of the wrong type and for a numpy input,
    IndexError for 0-dim factors, a rank-0 pair accepted by add_adapter (stack_adapters refuses
    it), and an empty adapter silently stacked as nothing."""
    with pytest.raises(TypeError, match=r"^model: expected an nn.Module, got NoneType$"):
        pl.set_adapter(None, "a")
    with pytest.raises(TypeError, match=r"^model: expected an nn.Module, got str$"):
        with pl.adapter_batch("m", ["a"]):
            pass
    with pytest.raises(
        TypeError,
        match=r"^base_layer: expected an nn.Linear, a QuantizedLinear, a bitsandbytes Linear4bit/Linear8bitLt, "
        r"a transformers Conv1D or a LoRA layer, got torch.nn.modules.normalization.LayerNorm$",
    ):
        pl.MultiLoRALinear(nn.LayerNorm(4))
    stack = pl.MultiLoRALinear(nn.Linear(4, 3))
    for lora_A, lora_B, shapes in [
        (torch.tensor(1.0), torch.tensor(1.0), r"A \(\) and B \(\)"),
        (torch.ones(0, 4), torch.ones(3, 0), r"A \(0, 4\) and B \(3, 0\)"),
        (torch.ones(4), torch.ones(3, 1), r"A \(4,\) and B \(3, 1\)"),
    ]:
        with pytest.raises(
            ValueError,
            match=rf"^adapter 'a': {shapes} do not fit the layer: expected A \(rank, 4\) and B \(3, rank\) with rank >= 1$",
        ):
            stack.add_adapter("a", lora_A, lora_B, 1.0)
    assert stack.adapter_names == []
    stack.add_adapter("a", torch.ones(1, 4), torch.ones(3, 1), 1.0)
    stack.active_adapter = "a"
    with pytest.raises(TypeError, match=r"^input: expected a floating-point tensor, got ndarray$"):
        stack(torch.ones(2, 4).numpy())

    model = pl.stack_adapters(tiny_model(), {"math": two_adapters["math"]})
    before = snapshot(model)
    for adapters, match in [
        ({"empty": {}}, r"^adapters\['empty'\]: holds no adapter modules; .*got an empty state dict$"),
        ({"code": two_adapters["code"], "empty": {}}, r"^adapters\['empty'\]: holds no adapter modules"),
        (
            {"zero": {"layers.0.attn.q_proj.lora_A": torch.zeros(0, 32), "layers.0.attn.q_proj.lora_B": torch.zeros(32, 0)}},
            r"adapters\['zero'\]: module 'layers.0.attn.q_proj': expected A \(rank, in\) and B \(out, rank\) with the same rank >= 1",
        ),
    ]:
        with pytest.raises(ValueError, match=match):
            pl.stack_adapters(model, adapters)
        after = snapshot(model)
        assert after[0] == before[0] and all(torch.equal(v, before[1][k]) for k, v in after[1].items())


def test_pissa_adapters_are_refused_as_they_need_their_residual_base(tmp_path: Path) -> None:
    """A PiSSA adapter applies to the residual W0 - s B0 A0 that only load_adapter rebuilds: over
    the plain base it would compute something else (0.7 off here), so stacking and combining
    refuse it, and the model is unchanged."""
    trained = pl.inject_adapters(tiny_model(), ["q_proj"], rank=2, init="pissa")
    with torch.no_grad():
        for _, layer in pl.model.iter_adapter_layers(trained):
            layer.lora_B.add_(0.05)
    directory = pl.save_adapter(trained, tmp_path / "pissa")
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"adapters\['pi'\]: .* holds a PiSSA adapter, which only fits the residual base"):
        pl.stack_adapters(model, {"pi": directory})
    assert snapshot(model)[0] == before[0]
    with pytest.raises(ValueError, match=r"state_dicts_or_dirs\[0\]: .* holds a PiSSA adapter"):
        pl.compose.combine_adapters([directory], [1.0])
    with pytest.raises(ValueError, match=r"model: 'layers.0.attn.q_proj' was initialised with PiSSA"):
        pl.stack_adapters(pl.load_adapter(tiny_model(), directory), {"math": trained_adapter(tmp_path, "m", ["v_proj"], 1)})


@pytest.mark.parametrize("bias", ["adapter_only", "all"])
def test_adapters_with_trained_biases_are_refused(bias: str, tmp_path: Path) -> None:
    """A trained bias replaces the base's: it cannot be one row's choice nor part of a sum, so
    stacking and combining refuse such a file (they dropped its biases silently, 0.06 off)."""
    trained = pl.inject_lora(tiny_model(), ["v_proj"], rank=2, bias=bias)
    with torch.no_grad():
        for _, parameter in trained.named_parameters():
            if parameter.requires_grad and parameter.dim() == 1:
                parameter.add_(0.25)
    directory = pl.save_adapter(trained, tmp_path / bias)
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"adapters\['b'\]: .* holds trained biases \(bias='(lora_only|all)'\).*load_adapter\(\) it alone"):
        pl.stack_adapters(model, {"b": directory})
    assert snapshot(model)[0] == before[0]
    with pytest.raises(ValueError, match=r"state_dicts_or_dirs\[0\]: .* holds trained biases"):
        pl.compose.combine_adapters([directory], [1.0])


def test_a_model_whose_own_biases_train_is_refused(two_adapters) -> None:
    """A model whose own adapter trained its base biases (bias="adapter_only") would apply those
    biases to every row of the stack (0.3 off for the base rows): refused, the model unchanged;
    with the biases frozen it stacks."""
    model = pl.inject_lora(tiny_model(), ["q_proj"], rank=2, bias="adapter_only")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^model: its biases train with its own adapter .*every row of the stack"):
        pl.stack_adapters(model, {"math": two_adapters["math"]})
    after = snapshot(model)
    assert after[0] == before[0] and all(torch.equal(v, before[1][k]) for k, v in after[1].items())
    for name, parameter in model.named_parameters():
        if name.endswith("bias"):
            parameter.requires_grad_(False)
    pl.stack_adapters(model, {"math": two_adapters["math"]})


def test_generate_with_beams_repeats_each_rows_adapter(two_adapters) -> None:
    """generate(num_beams=k) repeats each prompt k times in place: the name of a prompt covers its
    k rows, as one adapter loaded alone would compute them."""
    rows = ["math", None, "code"]
    x = tokens(batch=len(rows))
    beams = x.repeat_interleave(2, dim=0)  # what generate does with num_beams=2
    model = pl.stack_adapters(tiny_model(), two_adapters)
    with torch.no_grad():
        with pl.adapter_batch(model, rows):
            out = model(beams)
        expected = torch.cat(
            [single(two_adapters[name] if name else None)(beams[2 * b : 2 * b + 2]) for b, name in enumerate(rows)]
        )
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _tiny_t5() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, decoder_start_token_id=0
    )
    return transformers.T5ForConditionalGeneration(config).eval()


def test_a_stacked_layer_passes_weight_and_bias_through(tmp_path: Path) -> None:
    """T5's feed-forward reads ``wo.weight.dtype``: a stacked ``wo`` must have the base's weight,
    and the stacked model then computes what the adapter loaded alone computes."""
    trained = pl.inject_lora(_tiny_t5(), ["wo", "q"], rank=2)
    for _, layer in pl.model.iter_adapter_layers(trained):
        with torch.no_grad():
            layer.lora_B.normal_(generator=torch.Generator().manual_seed(3))
    directory = pl.save_adapter(trained, tmp_path / "t5")
    stacked = pl.stack_adapters(_tiny_t5(), {"a": directory})
    wo = stacked.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, pl.MultiLoRALinear)
    assert wo.weight is wo.base_layer.weight and wo.bias is None
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pl.set_adapter(stacked, "a")
        expected = pl.load_adapter(_tiny_t5(), directory).eval()(ids, decoder_input_ids=ids[:, :3]).logits
        torch.testing.assert_close(stacked(ids, decoder_input_ids=ids[:, :3]).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("own_adapter", [False, True])
def test_a_stack_casts_its_input_as_the_adapter_layers_do(own_adapter: bool) -> None:
    """Over a bfloat16 base, a float32 input is computed in bfloat16 and returned in float32, as a
    ``LoRALinear`` over that base does (stacking must not change what the model accepts)."""
    torch.manual_seed(0)
    base = nn.Linear(6, 4).to(torch.bfloat16)
    if own_adapter:
        base = pl.LoRALinear.from_linear(base, rank=2)
    stack = pl.MultiLoRALinear(base)
    lora_A, lora_B = torch.randn(2, 6), torch.randn(4, 2)
    stack.add_adapter("a", lora_A, lora_B, 0.5)
    stack.active_adapter = "a"
    x = torch.randn(3, 6)
    with torch.no_grad():
        out = stack(x)
        x16 = x.to(torch.bfloat16)
        expected = base(x16).double() + 0.5 * (x16.double() @ lora_A.to(torch.bfloat16).double().t()) @ lora_B.to(
            torch.bfloat16).double().t()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


def test_a_hook_on_a_stacks_base_sees_the_base_output() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    seen = []
    base.register_forward_hook(lambda module, args, out: seen.append(out))
    stack = pl.MultiLoRALinear(base)
    stack.add_adapter("a", torch.randn(2, 6), torch.randn(4, 2), 0.5)
    stack.active_adapter = "a"
    x = torch.randn(3, 6)
    with torch.no_grad():
        out = stack(x)
    torch.testing.assert_close(seen[0].double(), x.double() @ base.weight.double().t() + base.bias.double())
    assert not torch.equal(out, seen[0])


def test_an_adapter_for_the_model_itself_is_refused_changing_nothing() -> None:
    # combine_adapters writes the keys of a model that is one linear layer as "lora_A"/"lora_B";
    # before, the stack was set as a child named "" of the layer itself: a cycle, no adapter applied
    linear = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"module '': the adapter is for the model itself.*MultiLoRALinear\(model\)"):
        pl.stack_adapters(linear, {"a": {"lora_A": torch.randn(2, 4), "lora_B": torch.randn(4, 2)}})
    assert not list(linear.named_children())
    x = torch.randn(3, 4)
    torch.testing.assert_close(linear(x), x @ linear.weight.t() + linear.bias)
    # a LoRA layer is stacked over its base, not as the base of a stack
    lora = pl.LoRALinear.from_linear(nn.Linear(4, 4), rank=2)
    with torch.no_grad():
        lora.lora_B.normal_()
    with pytest.raises(ValueError, match=r"MultiLoRALinear\(model.base_layer\); stack.add_adapter\('default', .*active_adapter = 'default'") as refusal:
        pl.stack_adapters(lora, {"a": {"lora_A": torch.randn(2, 4), "lora_B": torch.randn(4, 2)}})
    # the advice, followed, gives the layer's own output on the 'default' rows
    advice = str(refusal.value).split("yourself: ")[1].split("; then")[0]
    namespace = {"MultiLoRALinear": pl.MultiLoRALinear, "model": lora}
    exec(advice.replace("; ", "\n"), namespace)
    with torch.no_grad():
        torch.testing.assert_close(namespace["stack"](x), lora(x), rtol=1e-6, atol=1e-6)
    # a lone stack takes more adapters, as before
    stack = pl.MultiLoRALinear(linear)
    stack.add_adapter("a", torch.randn(2, 4), torch.randn(4, 2), 1.0)
    lora_A, lora_B = torch.randn(2, 4), torch.randn(4, 2)
    assert pl.stack_adapters(stack, {"b": {"lora_A": lora_A, "lora_B": lora_B}}) is stack
    assert stack.adapter_names == ["a", "b"]
    pl.set_adapter(stack, "b")
    with torch.no_grad():
        torch.testing.assert_close(stack(x), linear(x) + x @ lora_A.t() @ lora_B.t(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("own", ["stack", "lora", "root stack"])
def test_a_path_inside_a_stack_or_lora_layer_is_refused_as_inject_lora_refuses_it(own: str) -> None:
    """A stack at the base_layer of a stack or LoRA layer would nest inside it, and unload would
    not give back the model's layer: refused, naming the path, and the model stays as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 6))
    original = model[0]
    A, B = torch.randn(2, 8), torch.randn(6, 2)
    if own == "lora":
        pl.inject_lora(model, ["0"], rank=2)
    else:
        pl.stack_adapters(model, {"s": {"0.lora_A": A, "0.lora_B": B}})
    path = "0.base_layer"
    if own == "root stack":
        model, path = model[0], "base_layer"
    with pytest.raises(ValueError, match=re.escape(f"{path!r} already has an adapter")):
        pl.inject_lora(model, [path], rank=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape(f"module {path!r}: {path!r} lies inside ") + r".*already has an adapter"):
        pl.stack_adapters(model, {"t": {f"{path}.lora_A": A, f"{path}.lora_B": B}})
    after = snapshot(model)
    assert after[0] == before[0] and all(torch.equal(v, before[1][k]) for k, v in after[1].items())
    if own != "root stack":
        pl.unload(model)
        assert model[0] is original


def test_a_layer_whose_parent_reads_its_weight_directly_gets_no_stack() -> None:
    """An nn.TransformerEncoderLayer with batch_first=True reads linear1's weight on torch's fast
    path in eval, where serving runs: a stack there would serve the base model to every row.
    Refused (as inject_adapters refuses it), model unchanged; with the fast path off, each row
    gets its adapter in eval."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False).eval()
    A, B = torch.randn(2, 8), torch.randn(16, 2)
    adapter = {"layers.0.linear1.lora_A": A, "layers.0.linear1.lora_B": B}
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"^adapters\['s'\], module 'layers.0.linear1': 'layers.0.linear1' is the linear1 of an "
                                        r"nn.TransformerEncoderLayer .*set_fastpath_enabled\(False\)"):
        pl.stack_adapters(model, {"s": adapter})
    after = snapshot(model)
    assert after[0] == before[0] and all(torch.equal(v, before[1][k]) for k, v in after[1].items())

    x = torch.randn(2, 5, 8)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            base_out = model(x)
            linear1 = model.layers[0].linear1
            linear1.weight += B @ A  # the adapter merged by hand: the reference for its rows
            merged_out = model(x)
            linear1.weight -= B @ A
            pl.stack_adapters(model, {"s": adapter})
            with pl.adapter_batch(model, ["s", None]):
                served = model(x)
        torch.testing.assert_close(served[0], merged_out[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(served[1], base_out[1], rtol=1e-5, atol=1e-5)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def test_the_layers_listed_for_a_missing_path_are_where_adapters_can_go() -> None:
    model = pl.inject_lora(nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 6)), ["0"], rank=2)
    with pytest.raises(ValueError, match=re.escape("its linear layers include ['0', '1']")):
        pl.stack_adapters(model, {"t": {"2.lora_A": torch.randn(2, 6), "2.lora_B": torch.randn(6, 2)}})


def test_a_global_forward_hook_sees_the_base_output_of_a_stacks_base() -> None:
    # activation-capture tools hook every module globally: the base's output they hold must stay
    # the base's, not become the stack's output by the in-place update
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    stack = pl.MultiLoRALinear(base)
    stack.add_adapter("a", torch.randn(2, 6), torch.randn(4, 2), 0.5)
    stack.active_adapter = "a"
    seen = {}
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.setdefault(id(module), out)
    )
    x = torch.randn(3, 6)
    try:
        with torch.no_grad():
            out = stack(x)
    finally:
        handle.remove()
    torch.testing.assert_close(seen[id(base)].double(), x.double() @ base.weight.double().t() + base.bias.double())
    assert torch.equal(seen[id(stack)], out) and not torch.equal(out, seen[id(base)])


def test_a_stack_over_a_bitsandbytes_base_serves_under_autocast() -> None:
    """The bitsandbytes layer answers in float32 under bfloat16 autocast: the in-place update is
    computed in the output's dtype (autocast would have made ``x A^T`` bfloat16)."""
    from models import bnb_linear4bit

    torch.manual_seed(0)
    base = bnb_linear4bit(nn.Linear(64, 32))
    stack = pl.MultiLoRALinear(base)
    lora_A, lora_B = torch.randn(2, 64), torch.randn(32, 2)
    stack.add_adapter("a", lora_A, lora_B, 0.5)
    stack.active_adapter = "a"
    x = torch.randn(3, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        base_out = base(x)
        out = stack(x)
    expected = base_out.double() + 0.5 * (x.double() @ lora_A.double().t()) @ lora_B.double().t()
    assert out.dtype == base_out.dtype
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def _stack_of_two() -> tuple[pl.MultiLoRALinear, dict]:
    """A stack over ``nn.Linear(5, 4)`` with adapters "a" (rank 2, s = 0.5) and "b" (rank 3,
    s = -2), and the float64 formula of its output for a per-row choice."""
    torch.manual_seed(0)
    stack = pl.MultiLoRALinear(nn.Linear(5, 4))
    factors = {"a": (torch.randn(2, 5), torch.randn(4, 2), 0.5), "b": (torch.randn(3, 5), torch.randn(4, 3), -2.0)}
    for name, (lora_A, lora_B, scaling) in factors.items():
        stack.add_adapter(name, lora_A, lora_B, scaling)

    def expected(x: Tensor, rows: list) -> Tensor:
        base = stack.base_layer
        out = x.double() @ base.weight.double().t() + base.bias.double()
        for row, name in enumerate(rows):
            if name is not None:
                lora_A, lora_B, scaling = factors[name]
                out[row] += scaling * (x[row].double() @ lora_A.double().t()) @ lora_B.double().t()
        return out

    return stack, expected


def test_a_batch_that_is_no_multiple_of_the_choice_is_refused() -> None:
    """3 or 5 rows for a choice of 2 names would leave rows without their adapter (or give them
    another row's): refused, as fewer rows than names are."""
    stack, _ = _stack_of_two()
    stack.row_adapters = ["a", "b"]
    for batch in (3, 5):
        with pytest.raises(ValueError, match=rf"chose adapters for 2 rows, got an input of shape \({batch}, 5\)"):
            stack(torch.randn(batch, 5))


def test_the_same_choice_over_another_batch_size_gets_its_rows() -> None:
    """The row index is kept per choice and batch size: the same names over k times as many rows
    (generate's beams) repeat each name k times, also right after the plain batch, and back."""
    stack, expected = _stack_of_two()
    rows = ["a", None, "b"]
    stack.row_adapters = rows
    with torch.no_grad():
        for k in (1, 2, 1, 3):
            x = torch.randn(3 * k, 5)
            repeated = [name for name in rows for _ in range(k)]
            torch.testing.assert_close(stack(x).double(), expected(x, repeated), rtol=1e-5, atol=1e-5)


def test_a_nested_adapter_batch_gives_back_the_outer_choice(two_adapters) -> None:
    rows, inner = ["math", "code"], [None, "math"]
    x = tokens(batch=2)
    model = pl.stack_adapters(tiny_model(), two_adapters)

    def expected(names: list) -> Tensor:
        return torch.cat([single(two_adapters[name] if name else None)(x[b : b + 1]) for b, name in enumerate(names)])

    with torch.no_grad(), pl.adapter_batch(model, rows):
        with pl.adapter_batch(model, inner):
            torch.testing.assert_close(model(x), expected(inner), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), expected(rows), rtol=1e-5, atol=1e-5)


def test_a_hook_on_a_stacks_base_sees_the_base_output_with_a_choice_per_row() -> None:
    stack, expected = _stack_of_two()
    seen = []
    stack.base_layer.register_forward_hook(lambda module, args, out: seen.append(out))
    stack.row_adapters = ["a", "b", None]
    x = torch.randn(3, 5)
    with torch.no_grad():
        out = stack(x)
    torch.testing.assert_close(seen[0].double(), expected(x, [None, None, None]))
    torch.testing.assert_close(out.double(), expected(x, ["a", "b", None]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True], ids=["no grad", "grad"])
@pytest.mark.parametrize("per_row", [False, True], ids=["set_adapter", "adapter_batch"])
def test_a_stack_over_a_float_base_answers_in_the_autocast_dtype(grad: bool, per_row: bool) -> None:
    """Under bfloat16 autocast a stack returns bfloat16, as nn.Linear and a LoRALinear do (the
    in-place update of the no-grad path is computed in that dtype)."""
    stack, expected = _stack_of_two()
    rows = ["a", "a", "a"]
    stack.active_adapter, stack.row_adapters = (None, rows) if per_row else ("a", None)
    x = torch.randn(3, 5)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        out = stack(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected(x, rows), rtol=3e-2, atol=3e-2)


def test_gradients_reach_the_input_through_the_active_adapter() -> None:
    stack, _ = _stack_of_two()
    stack.active_adapter = "b"
    x = torch.randn(3, 5, requires_grad=True)
    stack(x).sum().backward()
    weight = stack.base_layer.weight.detach()
    lora_A, lora_B = stack.lora_A["b"], stack.lora_B["b"]
    expected = (weight - 2.0 * lora_B @ lora_A).sum(0).expand(3, 5)  # d sum(y_b) / d x_b
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)


def test_a_models_own_rslora_layer_keeps_its_scaling_in_the_stack(two_adapters, tmp_path: Path) -> None:
    """The "default" adapter of a model's own rsLoRA layer keeps s = alpha / sqrt(r)."""
    x = tokens(batch=2)
    directory = trained_adapter(tmp_path, "own", ["k_proj"], 5, rank=4, alpha=3.0, use_rslora=True)
    own = pl.load_adapter(tiny_model(), directory)
    with torch.no_grad():
        before = own(x)
        pl.stack_adapters(own, {"math": two_adapters["math"]})
        torch.testing.assert_close(own(x), before, rtol=1e-5, atol=1e-5)


def test_a_float16_batch_scales_each_adapter_before_rounding():
    """``s (x A^T) B^T`` with ``s = 1/8`` over a float16 base: the unscaled product (about 1e5)
    passes float16's 65504, the scaled one does not. Under ``adapter_batch`` the scaling rides
    in the GEMM (as under ``set_adapter``): finite rows equal to the float64 formula to float16
    rounding (they were inf)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).half()
    pl.inject_adapters(model, ["0"], method="lora", rank=16, alpha=2.0)  # s = 1/8
    layer = model[0]
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(16, 64))
        layer.lora_B.normal_(0, 2.0)
    x = (torch.randn(4, 64) * 400).half()
    f64 = torch.float64
    with torch.no_grad():
        product = (x.to(f64) @ layer.lora_A.to(f64).t()) @ layer.lora_B.to(f64).t()
        expected = x.to(f64) @ layer.weight.to(f64).t() + layer.bias.to(f64) + layer.scaling * product
    assert product.abs().max() > 65504 > expected.abs().max()
    pl.stack_adapters(model, {"other": pl.adapter_state_dict(model)})  # the layer's own stays as "default"
    with torch.no_grad(), pl.adapter_batch(model, ["default", None, "default", "default"]):
        out = model(x)
    rows = [0, 2, 3]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[rows].to(f64), expected[rows], rtol=2e-3, atol=2e-3 * float(expected.abs().max()))


# ---- from a mutation audit of serving.py -------------------------------------------------------
def _formula(x: Tensor, base: nn.Linear, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """base(x) + s (x A^T) B^T in float64 (reference.lora_ref over ``base``'s tensors)."""
    return lora_ref(f64(x), f64(base.weight), f64(base.bias), f64(lora_A), f64(lora_B), scaling)


def test_add_adapter_keeps_a_copy_not_the_callers_tensors() -> None:
    """``add_adapter`` adds a *frozen copy*: writing to the caller's A or B afterwards (e.g. the
    training model the factors came from, which keeps training) must not change what the stack
    serves. Checked against the float64 formula with the values at the time of the call."""
    torch.manual_seed(0)
    base = nn.Linear(5, 4)
    lora_A, lora_B = torch.randn(2, 5), torch.randn(4, 2)
    kept_A, kept_B = lora_A.clone(), lora_B.clone()
    stack = pl.MultiLoRALinear(base)
    stack.add_adapter("a", lora_A, lora_B, 0.5)
    stack.active_adapter = "a"
    with torch.no_grad():
        lora_A.add_(1.0)
        lora_B.add_(1.0)
        x = torch.randn(3, 5)
        torch.testing.assert_close(stack(x).double(), _formula(x, base, kept_A, kept_B, 0.5), rtol=1e-6, atol=1e-6)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4))


def _trained_lora(model: nn.Module, targets: list[str]) -> nn.Module:
    pl.inject_lora(model, targets, rank=2, alpha=4.0)
    with torch.no_grad():
        for _, layer in pl.model.iter_adapter_layers(model):
            layer.lora_B.normal_(generator=torch.Generator().manual_seed(1))
    return model.requires_grad_(False)


def test_a_model_with_a_merged_lora_layer_is_refused_and_stays() -> None:
    """A merged layer's base already holds ``W0 + s B A``; stacked with its adapter kept as
    "default", every row would get the update twice (and the others it on top). It must be
    refused, changing nothing."""
    model = pl.merge_adapters(_trained_lora(_net(), ["0"]))
    x = torch.randn(3, 6)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(ValueError, match=r"model: '0' is merged; unmerge_adapters\(model\) before stacking"):
        pl.stack_adapters(model, {"a": {"2.lora_A": torch.randn(1, 6), "2.lora_B": torch.randn(4, 1)}})
    assert not any(isinstance(m, pl.MultiLoRALinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_the_name_default_is_refused_when_the_model_has_its_own_lora_layers() -> None:
    """"default" names the model's own adapter in the stack; a new adapter under that name on
    another layer would be switched on together with it by ``set_adapter(model, "default")``.
    It must be refused naming the clash."""
    model = _trained_lora(_net(), ["0"])
    with pytest.raises(ValueError, match=r"adapters: the name 'default' is taken by the model's own LoRA adapter"):
        pl.stack_adapters(model, {"default": {"2.lora_A": torch.randn(1, 6), "2.lora_B": torch.randn(4, 1)}})
    assert isinstance(model[0], pl.LoRALinear) and isinstance(model[2], nn.Linear)


def test_adapter_batch_takes_the_names_as_they_were_when_the_block_began() -> None:
    """``adapter_batch`` keeps its own list: the caller reusing (mutating) its list inside the
    block must not change which row gets which adapter."""
    torch.manual_seed(0)
    base = nn.Linear(5, 4)
    lora_A, lora_B = torch.randn(2, 5), torch.randn(4, 2)
    model = nn.Sequential(base)
    pl.stack_adapters(model, {"a": {"0.lora_A": lora_A, "0.lora_B": lora_B}})
    x = torch.randn(2, 5)
    names = ["a", None]
    with torch.no_grad(), pl.adapter_batch(model, names):
        names[0], names[1] = None, "a"
        out = model(x).double()
    expected = torch.stack([_formula(x[0], base, lora_A, lora_B, 1.0), _formula(x[1], base, lora_A, 0 * lora_B, 1.0)])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_a_stacked_layer_refuses_integer_input_as_the_adapter_layers_do() -> None:
    """An integer input reached the base ``nn.Linear`` and came back as torch's "mat1 and mat2
    must have the same dtype"; like every adapter layer and ``QuantizedLinear`` (one shared
    check), the stack names the input and what it takes."""
    stack = pl.MultiLoRALinear(nn.Linear(5, 4))
    stack.add_adapter("a", torch.randn(2, 5), torch.randn(4, 2), 1.0)
    stack.active_adapter = "a"
    layers = [stack, pl.LoRALinear.from_linear(nn.Linear(5, 4), rank=2), QuantizedLinear.from_linear(nn.Linear(64, 4), scheme="nf4")]
    for layer in layers:
        with pytest.raises(TypeError, match=r"^input: expected a floating-point tensor, got torch.int64$"):
            layer(torch.ones(2, layer.in_features, dtype=torch.int64))
        with pytest.raises(TypeError, match=r"^input: expected a floating-point tensor, got list$"):
            layer([[0.0] * layer.in_features])
        with pytest.raises(ValueError, match=rf"^input: expected shape \(\*, in_features={layer.in_features}\), got \(2, 3\)$"):
            layer(torch.ones(2, 3))
