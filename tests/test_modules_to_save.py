"""Modules trained in full beside the adapters (``modules_to_save``): against Hugging Face PEFT's
``ModulesToSaveWrapper`` (files both ways, training trajectories), and the model tools around them.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peft_layers as pl
from peft_layers.quant import QuantizedLinear

peft = pytest.importorskip("peft")


class Classifier(nn.Module):
    """A body with a LoRA target, then a batch norm (an integer buffer), a norm and a new head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(12, 16)
        self.norm = nn.LayerNorm(16)
        self.batch_norm = nn.BatchNorm1d(16)
        self.classifier = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(self.batch_norm(torch.tanh(self.body(x)))))


SAVED = ["norm", "batch_norm", "classifier"]


def _base() -> Classifier:
    torch.manual_seed(0)
    return Classifier()


def _train(model: nn.Module, steps: int = 8) -> list[float]:
    """AdamW on cross-entropy over one batch, in training mode (the batch norm's statistics move
    too)."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 12, generator=generator)
    labels = torch.randint(0, 3, (16,), generator=generator)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _hf_model(base: nn.Module) -> nn.Module:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["body"], modules_to_save=SAVED)
    return peft.get_peft_model(copy.deepcopy(base), config)


def _ours(base: nn.Module) -> nn.Module:
    return pl.inject_adapters(copy.deepcopy(base), ["body"], rank=4, alpha=8.0, modules_to_save=SAVED)


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def test_training_follows_hugging_face_peft_and_files_load_both_ways(tmp_path: Path) -> None:
    base = _base()
    ours, theirs = _ours(base), _hf_model(base)
    with torch.no_grad():  # the same start: their A is drawn from another RNG state
        theirs.base_model.model.body.lora_A["default"].weight.copy_(ours.body.lora_A)
    assert pl.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    ours_losses, theirs_losses = _train(ours), _train(theirs)
    assert ours_losses[-1] < 0.8 * ours_losses[0]
    torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(theirs_losses), rtol=1e-5, atol=1e-6)
    x = torch.randn(6, 12)
    expected = _outputs(theirs, x)
    torch.testing.assert_close(_outputs(ours, x), expected, rtol=1e-5, atol=1e-6)

    theirs.save_pretrained(tmp_path / "theirs")
    loaded = pl.load_adapter(_base(), tmp_path / "theirs")
    assert [name for name, _ in pl.model.iter_modules_to_save(loaded)] == SAVED
    torch.testing.assert_close(_outputs(loaded, x), expected, rtol=1e-5, atol=1e-6)

    pl.save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == SAVED
    back = peft.PeftModel.from_pretrained(_base(), tmp_path / "ours")
    torch.testing.assert_close(_outputs(back, x), expected, rtol=1e-5, atol=1e-6)
    # and into a model that already has the same adapters: the file fills them
    filled = pl.load_adapter(_ours(_base()), tmp_path / "ours")
    torch.testing.assert_close(_outputs(filled, x), expected, rtol=1e-5, atol=1e-6)


def test_a_sequence_classification_file_of_hugging_face_peft_loads(tmp_path: Path) -> None:
    """``task_type="SEQ_CLS"`` adds ``["classifier", "score"]`` to ``modules_to_save``; the model
    has one of them."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        num_labels=3,
    )
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(config).eval()
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    theirs = peft.get_peft_model(copy.deepcopy(base), lora)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    theirs.save_pretrained(tmp_path)
    ours = pl.load_adapter(copy.deepcopy(base), tmp_path)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs.eval()(ids).logits, rtol=1e-5, atol=1e-6)
    assert isinstance(ours.classifier, pl.ModuleToSave)
    assert ours.classifier.out_features == 3  # attributes read through to the trained copy


def test_the_model_tools_treat_the_original_and_the_copy_as_base_and_adapter() -> None:
    base = _base()
    model = _ours(base)
    head = model.classifier
    assert isinstance(head, pl.ModuleToSave) and head.original is not base.classifier
    original = head.original
    assert all(not p.requires_grad for p in original.parameters())
    assert all(p.requires_grad for p in head.trained.parameters())
    assert head.weight is head.trained.weight  # model code reading the weight sees the trained one
    _train(model, steps=3)
    x = torch.randn(5, 12)
    with torch.no_grad():
        assert not torch.equal(head.trained.weight, original.weight)
        trained_out = _outputs(model, x)
        with pl.disable_adapters(model):
            torch.testing.assert_close(model(x), _outputs(base, x), rtol=0, atol=0)
            assert head.weight is original.weight
        torch.testing.assert_close(model(x), trained_out, rtol=0, atol=0)

    state = pl.adapter_state_dict(model)
    assert {"classifier.trained.weight", "batch_norm.trained.num_batches_tracked"} <= set(state)
    fresh = _ours(base)
    pl.load_adapter_state_dict(fresh, state)
    torch.testing.assert_close(_outputs(fresh, x), trained_out, rtol=0, atol=0)

    merged = pl.merge_and_unload(copy.deepcopy(model))
    assert type(merged.classifier) is nn.Linear and merged.classifier.weight.requires_grad  # as Hugging Face PEFT keeps it
    torch.testing.assert_close(_outputs(merged, x), trained_out, rtol=1e-5, atol=1e-6)
    unloaded = pl.unload(model)
    assert unloaded.classifier is original
    torch.testing.assert_close(_outputs(unloaded, x), _outputs(base, x), rtol=0, atol=0)


def test_bias_all_leaves_the_original_frozen() -> None:
    model = pl.inject_adapters(_base(), ["body"], rank=2, bias="all", modules_to_save=["classifier"])
    assert not model.classifier.original.bias.requires_grad
    assert model.classifier.trained.bias.requires_grad and model.norm.bias.requires_grad
    groups = pl.loraplus_param_groups(model, lr=1e-3)
    grouped = {id(p) for group in groups for p in group["params"]}
    assert {id(p) for p in model.classifier.trained.parameters()} <= grouped


@pytest.mark.parametrize(
    ("targets", "saved", "error", "message"),
    [
        (["body"], ["head"], ValueError, r"modules_to_save: 'head' matches no module of Classifier; its modules are"),
        (["body"], ["body"], ValueError, r"modules_to_save: 'body' is or holds an adapter target"),
        (["classifier"], ["classifier"], ValueError, r"'classifier' is or holds an adapter target"),
    ],
)
def test_bad_modules_to_save_are_refused_and_the_model_stays(targets, saved, error, message) -> None:
    model = _base()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        pl.inject_adapters(model, targets, rank=2, modules_to_save=saved)
    assert type(model.body) is nn.Linear and type(model.classifier) is nn.Linear
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_modules_around_adapters_and_quantized_ones_are_refused() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)))
    with pytest.raises(ValueError, match=r"modules_to_save: '0' is or holds an adapter target"):
        pl.inject_adapters(model, ["0.0"], rank=2, modules_to_save=["0"])
    quantized = nn.Sequential(nn.Linear(8, 8), QuantizedLinear.from_linear(nn.Linear(8, 4)))
    with pytest.raises(TypeError, match=r"modules_to_save: '1' is or holds a quantized layer"):
        pl.inject_adapters(quantized, ["0"], rank=2, modules_to_save=["1"])
    saved = pl.inject_adapters(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), ["0"], rank=2, modules_to_save=["1"])
    with pytest.raises(ValueError, match=r"targets: '1.trained' is or lies inside a module to save"):
        pl.inject_adapters(saved, ["1.trained"], rank=2)


def test_files_that_do_not_fit_are_refused_and_the_model_stays(tmp_path: Path) -> None:
    pl.save_adapter(_ours(_base()), tmp_path)
    other = nn.Sequential()
    other.body, other.norm, other.batch_norm = nn.Linear(12, 16), nn.LayerNorm(16), nn.BatchNorm1d(16)
    other.classifier = nn.Linear(16, 5)  # another number of labels
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"module to save 'classifier'.*bias is \(3,\) torch.float32 in the file but \(5,\)"):
        pl.load_adapter(other, tmp_path)
    assert type(other.body) is nn.Linear and type(other.classifier) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    del other.classifier
    with pytest.raises(ValueError, match=r"module to save 'classifier'.*the model has no module of that name"):
        pl.load_adapter(other, tmp_path)
    plain_adapters = pl.inject_adapters(_base(), ["body"], rank=4, alpha=8.0)
    with pytest.raises(ValueError, match=r"module to save 'batch_norm': the model has a BatchNorm1d there, not a ModuleToSave; load into the model without adapters"):
        pl.load_adapter(plain_adapters, tmp_path)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("classifier.bias", torch.ones(3, dtype=torch.int64),
         r"module to save 'classifier': bias is \(3,\) torch.int64 in the file but \(3,\) torch.float32 in the model"),
        ("batch_norm.num_batches_tracked", torch.tensor(2.5),
         r"module to save 'batch_norm': num_batches_tracked is \(\) torch.float32 in the file but \(\) torch.int64"),
    ],
    ids=["int for float", "float for int"],
)
def test_module_to_save_state_of_the_wrong_kind_is_refused_and_the_model_stays(key, value, message, tmp_path: Path) -> None:
    pl.save_adapter(_ours(_base()), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors[f"base_model.model.{key}"] = value  # the shape of the model's tensor
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    for model in (_base(), _ours(_base())):  # the load injects, the load fills
        before = copy.deepcopy(model.state_dict())
        modules = [(name, type(module)) for name, module in model.named_modules()]
        with pytest.raises(ValueError, match=message):
            pl.load_adapter(model, tmp_path)
        assert [(name, type(module)) for name, module in model.named_modules()] == modules
        assert model.state_dict().keys() == before.keys()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _shared_head() -> Classifier:
    base = _base()
    base.tail = base.classifier  # a second name for the head
    return base


def test_a_shared_module_to_save_with_other_values_under_its_second_name_is_refused(tmp_path: Path) -> None:
    model = pl.inject_adapters(_shared_head(), ["body"], rank=2, modules_to_save=["classifier"])
    with torch.no_grad():
        model.classifier.trained.weight.add_(1.0)
    with pytest.warns(UserWarning, match="name one shared module"):
        pl.save_adapter(model, tmp_path)
    # the file names both: the module's state under each name
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["modules_to_save"] = ["classifier", "tail"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for key in ("weight", "bias"):
        tensors[f"base_model.model.tail.{key}"] = tensors[f"base_model.model.classifier.{key}"].clone()
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    x = torch.randn(4, 12)
    with pytest.warns(UserWarning, match="name one shared module"):
        loaded = pl.load_adapter(_shared_head(), tmp_path)  # the same values: one state
    torch.testing.assert_close(_outputs(loaded, x), _outputs(model, x), rtol=0, atol=0)
    tensors["base_model.model.tail.weight"] += 1.0
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    for target in (_shared_head(), model):  # the load injects, the load fills
        before = copy.deepcopy(target.state_dict())
        with pytest.raises(ValueError, match=r"module to save 'tail': it is a second name of a shared module to save, with other values"):
            pl.load_adapter(target, tmp_path)
        assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    assert type(target.classifier) is pl.ModuleToSave


def test_stacking_and_combining_refuse_modules_to_save(tmp_path: Path) -> None:
    pl.save_adapter(_ours(_base()), tmp_path)
    with pytest.raises(ValueError, match=r"holds modules trained in full \(modules_to_save: \['batch_norm', 'classifier', 'norm'\]\)"):
        pl.stack_adapters(_base(), {"a": tmp_path})
    with pytest.raises(ValueError, match=r"holds modules trained in full"):
        pl.compose.combine_adapters([tmp_path, tmp_path], [0.5, 0.5])
    plain = pl.save_adapter(pl.inject_adapters(_base(), ["body"], rank=2), tmp_path / "plain")
    with pytest.raises(ValueError, match=r"model: \['norm', 'batch_norm', 'classifier'\] are modules to save"):
        pl.stack_adapters(_ours(_base()), {"a": plain})


def test_a_hugging_face_file_with_bias_all_loads(tmp_path: Path) -> None:
    """Hugging Face PEFT's ``bias="all"`` also writes the biases inside its wrapper
    (``<m>.original_module.bias``, ``<m>.modules_to_save.bias``): they are not module state."""
    base = _base()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["body"], modules_to_save=SAVED, bias="all")
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for parameter in theirs.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    theirs.save_pretrained(tmp_path)
    ours = pl.load_adapter(_base(), tmp_path)
    x = torch.randn(6, 12)
    torch.testing.assert_close(_outputs(ours, x), _outputs(theirs, x), rtol=1e-5, atol=1e-6)


class _PreClassifier(nn.Module):
    """DistilBERT's head names: ``pre_classifier`` ends with ``classifier``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(12, 16)
        self.pre_classifier = nn.Linear(16, 16)
        self.classifier = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.pre_classifier(self.body(x))))


def test_names_that_hugging_face_would_widen_are_saved_exactly(tmp_path: Path) -> None:
    """Hugging Face PEFT takes every module whose name ends with a ``modules_to_save`` entry:
    ``classifier`` would take ``pre_classifier`` too. Saving says so, and records the exact names
    for our loader, which then loads the file back (``pre_classifier``'s trained bias included)."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"\['pre_classifier'\] are not trained in full; Hugging Face PEFT"):
        model = pl.inject_adapters(_PreClassifier(), ["body"], rank=2, bias="all", modules_to_save=["classifier"])
    # an adapter layer (from an earlier call) cannot be a module to save: nothing to advise
    other = pl.inject_adapters(_PreClassifier(), ["pre_classifier"], rank=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pl.inject_adapters(other, ["body"], rank=2, modules_to_save=["classifier"])
    with torch.no_grad():
        model.pre_classifier.bias.add_(1.0)
        model.classifier.trained.weight.add_(1.0)
    with pytest.warns(UserWarning, match=r"would also wrap \{'classifier': \['pre_classifier'\]\}"):
        pl.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    loaded = pl.load_adapter(_PreClassifier(), tmp_path)
    assert type(loaded.pre_classifier) is nn.Linear and isinstance(loaded.classifier, pl.ModuleToSave)
    x = torch.randn(4, 12)
    torch.testing.assert_close(_outputs(loaded, x), _outputs(model, x), rtol=0, atol=0)


class _NamedHead(nn.Module):
    def __init__(self, head: str) -> None:
        super().__init__()
        self.head_name = head
        self.fc = nn.Linear(8, 8)
        setattr(self, head, nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.head_name)(torch.relu(self.fc(x)))


@pytest.mark.parametrize(
    "head, method, widened",
    [
        ("out", "lora", ["fc.lora_dropout"]),
        ("layer", "lora", ["fc.base_layer"]),
        ("base_layer", "lora", ["fc.base_layer"]),
        ("default", "dora", ["fc.lora_dropout.default", "fc.lora_A.default", "fc.lora_B.default", "fc.lora_magnitude_vector.default"]),
    ],
)
def test_names_that_end_names_hugging_face_builds_inside_its_lora_layers_warn(
    head: str, method: str, widened: list[str], tmp_path: Path
) -> None:
    """Hugging Face PEFT matches ``modules_to_save`` after it injected its LoRA layers, whose
    inner modules (``fc.lora_dropout``, ``fc.base_layer``, ``fc.lora_A.default``) end with names
    such as ``out`` or ``layer``: it then fails to load the file (checked below). Saving warns,
    and our loader reads the file exactly."""
    torch.manual_seed(0)
    model = pl.inject_adapters(_NamedHead(head), ["fc"], method=method, rank=2, modules_to_save=[head])
    with torch.no_grad():
        getattr(model, head).trained.weight.add_(1.0)
    with pytest.warns(UserWarning, match=re.escape(f"would also wrap {{{head!r}: {widened}}}")):
        pl.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    loaded = pl.load_adapter(_NamedHead(head), tmp_path)
    x = torch.randn(3, 8)
    torch.testing.assert_close(_outputs(loaded, x), _outputs(model, x), rtol=0, atol=0)
    with pytest.raises((TypeError, KeyError, ValueError)):
        peft.PeftModel.from_pretrained(_NamedHead(head), str(tmp_path))


class _Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base_layer = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)


class _HeadWithBaseLayer(nn.Module):
    """A module to save ``head`` whose child is named ``base_layer``, beside the target ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8)
        self.head = _Wrapped()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x)))


def test_a_module_to_save_with_a_child_named_base_layer_loads(tmp_path: Path) -> None:
    """Its state is saved as ``head.base_layer.weight``/``.bias``, which the reader took for the
    base weight and bias of an adapter at ``head`` and refused ("module 'head' has ['base_bias',
    'base_weight'] but no lora_A/lora_B"); ``head`` has no factors, so they are the module's state,
    as Hugging Face PEFT loads them."""
    model = pl.inject_adapters(_HeadWithBaseLayer(), ["fc"], rank=2, modules_to_save=["head"])
    with torch.no_grad():
        model.fc.lora_B.normal_()
        model.head.trained.base_layer.weight.add_(1.0)
    pl.save_adapter(model, tmp_path)
    saved = pl.io.read_adapter(tmp_path).saved_modules
    assert {path: sorted(state) for path, state in saved.items()} == {"head": ["base_layer.bias", "base_layer.weight"]}
    x = torch.randn(3, 8)
    expected = _outputs(model, x)
    fill = pl.inject_adapters(_HeadWithBaseLayer(), ["fc"], rank=2, modules_to_save=["head"])
    for into in (_HeadWithBaseLayer(), fill):  # the load injects, the load fills
        loaded = pl.load_adapter(into, tmp_path)
        assert torch.equal(loaded.head.trained.base_layer.weight, model.head.trained.base_layer.weight)
        torch.testing.assert_close(_outputs(loaded, x), expected, rtol=0, atol=0)
    theirs = peft.PeftModel.from_pretrained(_HeadWithBaseLayer(), str(tmp_path))
    torch.testing.assert_close(_outputs(theirs, x), expected, rtol=1e-6, atol=1e-6)


def test_a_module_to_save_takes_the_training_mode_of_its_module() -> None:
    """Like the adapter layers, the wrapper injected into an ``eval()`` model is in eval mode (it
    said ``training=True`` while its modules were in eval)."""
    for train in (False, True):
        model = pl.inject_adapters(_base().train(train), ["body"], rank=2, modules_to_save=["classifier"])
        assert {m.training for m in model.classifier.modules()} == {train}


def test_a_shared_module_to_save_warns_where_hugging_face_wraps_one_name(tmp_path: Path) -> None:
    base = _base()
    base.tail = base.classifier  # a second name for the head, in another slot
    model = pl.inject_adapters(base, ["body"], rank=2, modules_to_save=["classifier"])
    assert model.tail is model.classifier
    with pytest.warns(UserWarning, match=r"\['classifier', 'tail'\] name one shared module"):
        pl.save_adapter(model, tmp_path)


def test_state_dicts_with_modules_to_save_are_refused_by_name() -> None:
    state = pl.adapter_state_dict(_ours(_base()))
    with pytest.raises(ValueError, match=r"'[a-z_]+.trained.[a-z_]+' is the state of a module trained in full"):
        pl.compose.combine_adapters([state, state], [0.5, 0.5])
    lora_only = {k: v for k, v in state.items() if ".trained." not in k}
    assert set(pl.compose.combine_adapters([lora_only, lora_only], [0.5, 0.5])) == {"body.lora_A", "body.lora_B"}


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.subhead = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.subhead(x)


class _Nested(nn.Module):
    """A module to save inside a module with a bias of its own, a stateless one, and one with a
    child (which Hugging Face PEFT's suffix rule would take too)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.enc = nn.Module()
        self.enc.norm = nn.LayerNorm(8)
        self.enc.bias = nn.Parameter(torch.zeros(8))
        self.drop = nn.Dropout(0.0)
        self.head = _Head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.enc.norm(self.body(x)) + self.enc.bias))


def test_round_trips_of_nested_stateless_and_shared_modules_to_save(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = pl.inject_adapters(_Nested(), ["body"], rank=2, bias="all", modules_to_save=["enc.norm", "drop", "head"])
    with torch.no_grad():
        model.enc.bias.add_(0.5)
        model.enc.norm.trained.weight.add_(0.25)
        model.head.trained.subhead.weight.add_(1.0)
    with pytest.warns(UserWarning, match=r"would also wrap \{'head': \['head.subhead'\]\}"):
        pl.save_adapter(model, tmp_path)
    x = torch.randn(3, 8)
    torch.manual_seed(0)
    for into in (_Nested(), model):  # a fresh model (injects), the same model (fills)
        loaded = pl.load_adapter(into, tmp_path)
        torch.testing.assert_close(_outputs(loaded, x), _outputs(model, x), rtol=0, atol=0)
    state = pl.io.read_adapter(tmp_path).state_dict()
    assert state.keys() == pl.adapter_state_dict(model).keys()


def test_a_config_suffix_takes_the_outermost_module_to_save(tmp_path: Path) -> None:
    # without our exact names (a Hugging Face PEFT file) "head" is matched as a suffix, which
    # "head.subhead" has too: its keys belong to the outer module "head"
    torch.manual_seed(0)
    model = pl.inject_adapters(_Nested(), ["body"], rank=2, modules_to_save=["head"])
    with torch.no_grad():
        model.head.trained.subhead.weight.add_(1.0)
    with pytest.warns(UserWarning, match=r"would also wrap \{'head': \['head.subhead'\]\}"):
        pl.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})  # our field dropped
    saved = pl.io.read_adapter(tmp_path).saved_modules
    assert {path: sorted(state) for path, state in saved.items()} == {"head": ["subhead.bias", "subhead.weight"]}
    torch.manual_seed(0)
    loaded = pl.load_adapter(_Nested(), tmp_path)
    assert isinstance(loaded.head, pl.ModuleToSave) and type(loaded.head.trained.subhead) is nn.Linear
    x = torch.randn(3, 8)
    torch.testing.assert_close(_outputs(loaded, x), _outputs(model, x), rtol=0, atol=0)


def test_modules_with_extra_state_are_refused() -> None:
    class WithExtra(nn.Linear):
        def get_extra_state(self):
            return {"step": 1}

    model = nn.Sequential(nn.Linear(4, 4), WithExtra(4, 2))
    with pytest.raises(TypeError, match=r"modules_to_save: '1' is or holds a module with extra state"):
        pl.inject_adapters(model, ["0"], rank=2, modules_to_save=["1"])
    assert type(model[0]) is nn.Linear


class _Locked(nn.Linear):
    """A head holding a lock, which deepcopy cannot copy."""

    def __init__(self) -> None:
        super().__init__(4, 2)
        self.lock = threading.Lock()


def test_a_module_to_save_that_cannot_be_copied_is_named_and_the_model_stays() -> None:
    model = nn.Sequential(nn.Linear(4, 4), _Locked())
    before = [(name, module) for name, module in model.named_modules()]
    copy_error = r"module: the _Locked cannot be deep-copied \(cannot pickle '_thread.lock' object\); a module to save"
    with pytest.raises(TypeError, match=r"^inject_adapters\(\): modules_to_save: module '1': " + copy_error):
        pl.inject_adapters(model, ["0"], rank=2, modules_to_save=["1"])
    assert [(name, module) for name, module in model.named_modules()] == before
    assert all(parameter.requires_grad for parameter in model.parameters())
    with pytest.raises(TypeError, match="^" + copy_error):
        pl.ModuleToSave(_Locked())


def test_nested_modules_to_save_are_refused_and_a_module_named_trained_is_not_one() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match=r"modules_to_save: \['1.0', '1.1'\] lie inside '1', which is saved whole"):
        pl.inject_adapters(model, re.compile("0"), rank=2, modules_to_save=["1", "1.0"])
    assert type(model[1]) is nn.Sequential and type(model[0]) is nn.Linear
    state = {"trained.lora_A": torch.randn(2, 4), "trained.lora_B": torch.randn(4, 2)}
    assert set(pl.compose.combine_adapters([state, state], [0.5, 0.5])) == set(state)


def test_a_name_hugging_face_peft_would_match_more_widely_warns_with_what_it_would_train() -> None:
    # Hugging Face PEFT matches modules_to_save as plain string suffixes: "norm" also takes
    # input_layernorm; we match whole dotted components, as for targets, and say what differs
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    base = transformers.LlamaForCausalLM(config)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["norm"]))
    wrapped = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"}
    with pytest.warns(UserWarning, match="Hugging Face PEFT matches plain string suffixes") as caught:
        ours = pl.inject_adapters(copy.deepcopy(base), ["q_proj"], rank=2, modules_to_save=["norm"])
    ours_saved = {n for n, _ in pl.model.iter_modules_to_save(ours)}
    assert ours_saved == {"model.norm"}
    listed = set(re.findall(r"'([\w.]+)'", str(caught[0].message)))
    assert listed == wrapped - ours_saved and len(listed) == 4  # two norms in each of two layers
    # naming what Hugging Face PEFT takes trains the same modules, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = pl.inject_adapters(copy.deepcopy(base), ["q_proj"], rank=2, modules_to_save=["norm", "input_layernorm", "post_attention_layernorm"])
    assert {n for n, _ in pl.model.iter_modules_to_save(same)} == wrapped
    assert pl.trainable_parameters(same) == tuple(theirs.get_nb_trainable_parameters())


def test_module_to_save_rejects_what_is_not_a_module() -> None:
    with pytest.raises(TypeError, match=r"^module: expected an nn.Module, got Tensor$"):
        pl.ModuleToSave(torch.zeros(2))
    wrapped = pl.ModuleToSave(nn.Linear(3, 2))
    assert wrapped.trained is not wrapped.original
    assert torch.equal(wrapped.trained.weight, wrapped.original.weight)


def test_the_adapter_state_dict_of_a_model_that_is_a_module_to_save_holds_its_own_keys() -> None:
    """A root module to save has no path: its keys are those of its own state dict, unprefixed,
    and load back."""
    torch.manual_seed(0)
    saved = pl.ModuleToSave(nn.Linear(3, 2))
    state = pl.adapter_state_dict(saved)
    assert list(state) == ["trained.weight", "trained.bias"]
    assert all(torch.equal(value, saved.state_dict()[key]) for key, value in state.items())
    ones = {key: torch.ones_like(value) for key, value in state.items()}
    pl.load_adapter_state_dict(saved, ones)
    assert torch.equal(saved.trained.weight, torch.ones(2, 3)) and not torch.equal(saved.original.weight, torch.ones(2, 3))


class _NetWithNestedHead(nn.Module):
    """fc, then head.classifier: a module to save named by a suffix of its path in Hugging Face PEFT."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Module()
        self.head.classifier = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.classifier(torch.tanh(self.fc(x)))


def test_a_peft_file_whose_module_to_save_is_named_by_a_suffix_loads_with_peft_outputs(tmp_path) -> None:
    """Hugging Face PEFT matches modules_to_save names as string suffixes: its file naming
    "classifier" for head.classifier loads here with the same module saved and its outputs."""
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc"], modules_to_save=["classifier"])
    theirs = peft.get_peft_model(_NetWithNestedHead(), config)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.normal_(generator=torch.Generator().manual_seed(p.numel()))
    theirs.save_pretrained(tmp_path)
    ours = pl.load_adapter(_NetWithNestedHead(), tmp_path)
    assert isinstance(ours.head.classifier, pl.ModuleToSave)
    x = torch.randn(4, 8)
    torch.testing.assert_close(ours(x), theirs.eval()(x), rtol=1e-6, atol=1e-6)


def test_filling_a_model_whose_module_to_save_the_file_lacks_is_refused(tmp_path) -> None:
    """Filling a model's modules to save needs their state in the file: a file without it is
    refused (missing keys), not loaded around the module, which would keep its old values."""
    pl.save_adapter(pl.inject_lora(_NetWithNestedHead(), ["fc"], rank=2), tmp_path)
    model = pl.inject_lora(_NetWithNestedHead(), ["fc"], rank=2, modules_to_save=["head"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="missing keys"):
        pl.load_adapter(model, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_module_to_save_built_directly_freezes_its_original() -> None:
    """The original inside a directly built ModuleToSave is frozen, not only after inject_adapters."""
    saved = pl.ModuleToSave(nn.Linear(3, 2))
    assert not any(p.requires_grad for p in saved.original.parameters())
    assert all(p.requires_grad for p in saved.trained.parameters())


def test_a_module_to_save_of_a_frozen_module_trains_its_copy() -> None:
    """``trained`` is the copy whose parameters train, also when the module given was frozen
    (a model frozen before its head is wrapped by hand)."""
    saved = pl.ModuleToSave(nn.Linear(3, 2).requires_grad_(False))
    assert all(p.requires_grad for p in saved.trained.parameters())
    assert not any(p.requires_grad for p in saved.original.parameters())
