"""Model surgery: inject_adapters / inject_lora, merge, unload, counts, adapter state dicts."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import peft_layers as pl
from peft_layers.model import iter_adapter_layers, method_of, pattern_key

from models import tiny_model, tokens

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


def test_merge_and_unload_dtype() -> None:
    model = pl.inject_lora(tiny_model(), "q_proj", rank=2)
    pl.merge_and_unload(model, dtype=torch.float64)
    assert model.layers[0].attn.q_proj.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="dtype"):
        pl.merge_and_unload(pl.inject_lora(tiny_model(), "q_proj"), dtype=torch.int8)


def test_unload_gives_back_the_original_layers_and_outputs() -> None:
    model = tiny_model()
    originals = {name: m for name, m in model.named_modules() if name.endswith(ALL_LINEAR)}
    batch = tokens()
    with torch.no_grad():
        expected = model(batch)
    pl.inject_adapters(model, list(ALL_LINEAR), method="dora", rank=4)
    randomize_adapters(model)
    pl.merge_adapters(model)  # unload must unmerge first
    pl.unload(model)
    with torch.no_grad():
        got = model(batch)
    for name, module in model.named_modules():
        if name in originals:
            assert module is originals[name]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


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


def test_tied_output_head() -> None:
    model = pl.inject_lora(tiny_model(), ["lm_head", "q_proj"], rank=2)
    assert model.lm_head.weight is model.embed.weight  # still tied, and frozen
    assert not model.embed.weight.requires_grad
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


# ---- k-bit preparation -----------------------------------------------------------------------------
def test_prepare_for_kbit_training_casts_norms_and_enables_checkpointed_training() -> None:
    model = tiny_model().to(torch.bfloat16)
    pl.prepare_for_kbit_training(model)
    assert all(not p.requires_grad for p in model.parameters())
    assert model.norm.weight.dtype == torch.float32 and model.layers[0].norm1.bias.dtype == torch.float32
    assert model.layers[0].attn.q_proj.weight.dtype == torch.bfloat16
    assert model.embed(tokens()).requires_grad

    # with the blocks checkpointed, the adapters inside them still get gradients
    model = pl.prepare_for_kbit_training(tiny_model())
    pl.inject_lora(model, "q_proj", rank=2)
    randomize_adapters(model)
    x = model.embed(tokens())
    for block in model.layers:
        x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=True)
    x.sum().backward()
    assert all(layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0 for _, layer in iter_adapter_layers(model))
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        pl.prepare_for_kbit_training(tiny_model(), gradient_checkpointing=True)


def test_many_layers_go_through_the_progress_bar_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    from peft_layers.model import PROGRESS_MIN_LAYERS

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
