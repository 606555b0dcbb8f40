"""AdapterMixin behaviour shared by every adapter layer: pass-through, freezing, the merge state
machine, enable/disable, to_linear(), adapter_parameters(), extra_repr, delta_weight()."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from reference import (
    F64,
    assert_close64,
    direct_row_norm,
    dora_ref,
    f64,
    factored_error_bound,
    lora_ref,
    materialised_weight,
    randomize_adapter,
    run_layer,
    run_reference,
)
from torch import nn

import peft_layers as pl
from peft_layers.quant import QuantizedLinear

CLASSES = [pl.LoRALinear, pl.LoRAPlusLinear, pl.DoRALinear]
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}
ADAPTER_NAMES = {pl.LoRALinear: ("lora_A", "lora_B"), pl.LoRAPlusLinear: ("lora_A", "lora_B"),
                 pl.DoRALinear: ("lora_A", "lora_B", "magnitude")}


def _layer(cls, in_f=12, out_f=10, dtype=torch.float32, bias=True, **kw):
    kw.setdefault("rank", 3)
    kw.setdefault("alpha", 6.0)
    layer = cls(in_f, out_f, dtype=dtype, bias=bias, **kw)
    randomize_adapter(layer)
    return layer


def _reference_out(layer, x):
    """Float64 reference output of the (unmerged, enabled) adapter from its current tensors."""
    args = (f64(x), f64(layer.weight), f64(layer.bias), f64(layer.lora_A), f64(layer.lora_B))
    if isinstance(layer, pl.DoRALinear):
        return dora_ref(*args, f64(layer.magnitude), layer.scaling, layer.epsilon)
    return lora_ref(*args, layer.scaling)


def _row_rtol(layer, tol):
    """Relative tolerance per output row of a DoRA output (``tol`` elsewhere).

    Where ``W'_i`` nearly cancels, ``n_i`` is only known to ~``eps ||W0_i||^2 / n_i^2`` (factored
    form, decisions.md) or ``eps ||W0_i|| / n_i`` (norm of a rounded ``W'``, used by merge), and the
    output row inherits that relative error. Elsewhere these terms are ~eps.
    """
    if not isinstance(layer, pl.DoRALinear):
        return tol
    w0, a, b, s = layer.weight, layer.lora_A, layer.lora_B, layer.scaling
    n_sq = direct_row_norm(w0, a, b, s).square().clamp_min(1e-300)
    eps = torch.finfo(torch.promote_types(w0.dtype, torch.float32)).eps
    rounded = (w0.shape[1] + 2) * eps * (f64(w0).norm(dim=1) + s * f64(b).abs().sum(1) * f64(a).norm(dim=1).max())
    return tol + factored_error_bound(w0, a, b, s) / n_sq + rounded / n_sq.sqrt()


def _assert_rows_close(actual, expected, bias, rtol_rows, tol, what):
    """``|actual - expected| <= tol * scale + rtol_row * |expected - b|`` per element."""
    expected = expected.detach().double()
    scaled = expected - (0 if bias is None else f64(bias))
    allowed = tol * float(expected.abs().max()) + rtol_rows * scaled.abs()
    err = (actual.detach().double() - expected).abs()
    assert torch.all(err <= allowed), f"{what}: worst err/allowed {float((err / allowed).max()):.3g}"


def _base_out(w0, b, x):
    y = f64(x) @ f64(w0).T
    return y if b is None else y + f64(b)


# ---- pass-through and freezing --------------------------------------------------------------
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_wraps_without_copy_and_freezes(cls, bias):
    linear = nn.Linear(12, 10, bias=bias)
    assert linear.weight.requires_grad
    ptr = linear.weight.data_ptr()
    layer = cls.from_linear(linear, rank=2)
    assert layer.base_layer is linear
    assert layer.weight is linear.weight and layer.weight.data_ptr() == ptr
    assert layer.bias is linear.bias
    assert (layer.in_features, layer.out_features) == (12, 10)
    assert not linear.weight.requires_grad
    assert bias is False or not linear.bias.requires_grad
    assert layer.lora_A.shape == (2, 12) and layer.lora_B.shape == (10, 2)
    assert isinstance(layer, pl.LoRALinear) and isinstance(layer, pl.AdapterMixin)


@pytest.mark.parametrize("cls", CLASSES)
def test_constructor_builds_a_frozen_base(cls):
    layer = cls(7, 5, rank=2, bias=False, dtype=torch.float64)
    assert isinstance(layer.base_layer, nn.Linear)
    assert layer.bias is None and layer.weight.dtype == torch.float64
    assert not layer.weight.requires_grad
    assert layer.lora_A.dtype == torch.float64


@pytest.mark.parametrize("cls", CLASSES)
def test_adapter_parameters_are_exactly_the_trainable_ones(cls):
    layer = _layer(cls)
    names = ADAPTER_NAMES[cls]
    params = list(layer.adapter_parameters())
    assert [id(p) for p in params] == [id(getattr(layer, n)) for n in names]
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in params)
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == set(names)
    assert set(layer.state_dict()) == set(names) | {"base_layer.weight", "base_layer.bias"}


@pytest.mark.parametrize("cls", CLASSES)
def test_extra_repr(cls):
    layer = cls(12, 10, rank=4, alpha=8.0, use_rslora=True)
    text = repr(layer)
    for part in ("rank=4", "alpha=8", "scaling=4", "merged=False", "in_features=12", "out_features=10"):
        assert part in text, (part, text)
    layer.merge()
    assert "merged=True" in repr(layer)


@pytest.mark.parametrize("cls", CLASSES)
def test_training_step_changes_only_adapter_tensors(cls):
    layer = _layer(cls, dropout=0.1).train()
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = F.mse_loss(layer(torch.randn(2, 4, 12)), torch.randn(2, 4, 10))
        opt.zero_grad()
        loss.backward()
        assert layer.weight.grad is None and layer.bias.grad is None
        opt.step()
    assert torch.equal(layer.weight, w0) and torch.equal(layer.bias, b0)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    for name in ADAPTER_NAMES[cls]:
        assert not torch.equal(getattr(layer, name), before[name]), f"{name} did not train"


# ---- merge state machine --------------------------------------------------------------------
@pytest.mark.parametrize("cls", CLASSES)
def test_merge_twice_and_unmerge_unmerged_raise(cls):
    layer = _layer(cls)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()
    layer.merge()
    assert layer.merged
    w = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    assert torch.equal(layer.weight, w) and layer.merged  # a failed merge changes nothing
    layer.unmerge()
    assert not layer.merged
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize("cls", [*CLASSES, pl.QLoRALinear])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_merge_refuses_a_non_finite_adapter_and_changes_nothing(cls, bad):
    """A NaN or inf in the adapter would be written into ``W0``, where ``unmerge()`` cannot take it
    back out (NaN - NaN), and a quantized base refuses it halfway. Refused before any change."""
    layer = cls.from_linear(nn.Linear(64, 8), rank=2)
    randomize_adapter(layer)
    with torch.no_grad():
        layer.lora_B[1, 0] = float(bad)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"merge\(\): \['lora_B'\] of this \w+ hold NaN or inf"):
        layer.merge()
    assert not layer.merged
    assert all(torch.equal(v, before[k]) or v.isnan().any() for k, v in layer.state_dict().items())
    assert torch.equal(layer.weight if not isinstance(layer, pl.QLoRALinear) else layer.base_layer.weight,
                       before["base_layer.weight"])


def test_merge_adapters_refuses_every_layer_before_merging_any():
    """Layer 0 is fine and layer 1 holds NaN: nothing is merged (before, layer 0 stayed merged and
    requantized, and the error named an internal ``weight`` argument)."""
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    pl.inject_adapters(model, ["0", "1"], method="qlora", rank=2)
    for layer in (model[0], model[1]):
        randomize_adapter(layer)
    with torch.no_grad():
        model[1].lora_B[0, 0] = float("nan")
    codes = [layer.base_layer.weight.clone() for layer in (model[0], model[1])]
    with pytest.raises(ValueError, match=r"merge_adapters\(\): these layers' adapters hold NaN or inf: \{'1': \['lora_B'\]\}"):
        pl.merge_adapters(model)
    assert [model[0].merged, model[1].merged] == [False, False]
    assert all(torch.equal(c, layer.base_layer.weight) for c, layer in zip(codes, (model[0], model[1])))


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("attribute, value", [("alpha", 32.0), ("use_rslora", True)])
def test_the_scaling_cannot_change_while_merged(cls, attribute, value):
    """``unmerge()`` takes ``s B A`` out with the ``s`` of the moment: a new ``alpha`` set on a
    merged layer left ``(s_old - s_new) B A`` in ``W0`` for good (6.5 off, silently). Refused while
    merged; unmerged, the new scaling applies, checked against the float64 reference."""
    layer = _layer(cls)
    w0 = layer.weight.detach().clone()
    layer.merge()
    with pytest.raises(ValueError, match=rf"{attribute}: this {cls.__name__} is merged.*unmerge\(\) before"):
        setattr(layer, attribute, value)
    setattr(layer, attribute, getattr(layer, attribute))  # the same value is no change
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)
    setattr(layer, attribute, value)
    assert layer.scaling == (32.0 / 3 if attribute == "alpha" else 6.0 / 3**0.5)
    x = torch.randn(4, 12)
    with torch.no_grad():
        _assert_rows_close(layer(x), _reference_out(layer, x), layer.bias, _row_rtol(layer, 1e-5), 1e-5, "output")


@pytest.mark.parametrize("cls", CLASSES)
def test_a_layer_pickled_before_the_scaling_properties_refuses_changes_while_merged(cls):
    """Layers pickled before ``alpha``/``use_rslora`` were properties hold them in ``__dict__``
    as ``alpha``/``use_rslora``: read through, and a change while merged refused (the setters
    compared with a missing ``_alpha`` and let it through)."""
    layer = _layer(cls)
    state = layer.__dict__
    state["alpha"], state["use_rslora"] = state.pop("_alpha"), state.pop("_use_rslora")  # as unpickled
    assert layer.alpha == 6.0 and layer.use_rslora is False and layer.scaling == 2.0
    layer.merge()
    for name, value in (("alpha", 8.0), ("use_rslora", True)):
        with pytest.raises(ValueError, match=rf"^{name}: this {cls.__name__} is merged"):
            setattr(layer, name, value)
    layer.unmerge()
    layer.alpha = 3.0
    assert layer.scaling == 1.0 and "alpha" not in layer.__dict__


@pytest.mark.parametrize("cls", [pl.LoRALinear, pl.LoRAPlusLinear, pl.DoRALinear])
def test_merging_adapters_on_the_meta_device_checks_no_values(cls):
    """The NaN check of merge read the values of meta tensors (``.item()`` raised), and DoRA's
    search for rows of zero magnitude called ``nonzero()``, which the meta device cannot do."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # adapters over a meta base hold no values yet
        layer = cls.from_linear(nn.Linear(8, 6, device="meta"), rank=2)
    layer.merge()
    assert layer.merged and layer.weight.is_meta and layer.weight.shape == (6, 8)
    layer.unmerge()
    assert not layer.merged and layer.weight.is_meta and layer.weight.shape == (6, 8)


@pytest.mark.parametrize("cls", CLASSES)
def test_alpha_and_use_rslora_are_checked_when_set(cls):
    layer = _layer(cls)
    for bad in ("16", -1.0, 0, float("inf"), True):
        with pytest.raises(ValueError, match=rf"alpha: expected a finite number > 0, got {bad!r}"):
            layer.alpha = bad
    with pytest.raises(TypeError, match="use_rslora: expected a bool, got 1"):
        layer.use_rslora = 1
    assert layer.alpha == 6.0 and layer.use_rslora is False


@given(cls=st.sampled_from(CLASSES), dtype=st.sampled_from([torch.float32, torch.float64]),
       in_f=st.integers(1, 20), out_f=st.integers(1, 20), rank=st.integers(1, 20), bias=st.booleans(),
       scale=st.floats(0.01, 2.0), seed=st.integers(0, 2**16), tokens=st.integers(1, 4))
def test_merged_output_equals_unmerged_and_unmerge_restores(cls, dtype, in_f, out_f, rank, bias, scale, seed,
                                                            tokens):
    rank = min(rank, in_f, out_f)
    layer = cls(in_f, out_f, rank=rank, alpha=2.0, bias=bias, dtype=dtype)
    randomize_adapter(layer, scale=scale, seed=seed)
    w0 = layer.weight.detach().clone()
    x = torch.randn(tokens, in_f, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
        expected = _reference_out(layer, x)
        layer.merge()
        y_merged = layer(x)
        assert torch.equal(y_merged, layer.base_layer(x))  # merged forward is one base call
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    rows = _row_rtol(layer, tol)
    _assert_rows_close(y, expected, layer.bias, rows, tol, "unmerged output")
    _assert_rows_close(y_merged, expected, layer.bias, rows, tol, "merged output")
    if cls is not pl.DoRALinear:
        assert_close64(y_merged, f64(y), tol, what="merged vs unmerged")
    layer.unmerge()
    # W0 back to rounding: the error of W0 + s B A (times the DoRA gain) and back, per entry;
    # the fp32 product B A errs by up to ~rank * eps * (|B| |A|), not * |B A|
    upd = (rank + 2) * layer.scaling * f64(layer.lora_B).abs() @ f64(layer.lora_A).abs()
    gain = 1.0
    if cls is pl.DoRALinear:
        w_prime = materialised_weight(w0, layer.lora_A, layer.lora_B, layer.scaling)
        g = f64(layer.magnitude) / w_prime.norm(dim=1).clamp_min(layer.epsilon)
        gain = torch.maximum(g, 1 / g)[:, None]
    bound = 8 * EPS[dtype] * gain * (f64(w0).abs() + upd)
    err = (f64(layer.weight) - f64(w0)).abs()
    assert torch.all(err <= bound), float((err / bound).max())
    with torch.no_grad():
        _assert_rows_close(layer(x), f64(y), layer.bias, rows, tol, "output after unmerge")


@pytest.mark.parametrize("cls", CLASSES)
def test_a_merged_layer_warns_when_it_loads_other_values(cls):
    """A state dict does not record whether its layer was merged: a merged layer takes loaded
    values as merged ones. It warns when they differ from its own (an unmerged source would make
    its forward and unmerge() wrong); a merged source's values give its exact merged function."""
    merged_source = _layer(cls)
    merged_source.merge()
    target = _layer(cls)
    with torch.no_grad():
        target.lora_B.mul_(2.0)
    target.merge()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        target.load_state_dict(target.state_dict())  # its own values: nothing to warn about
    with pytest.warns(UserWarning, match=rf"^{cls.__name__}: loaded other values into a merged layer"):
        target.load_state_dict(merged_source.state_dict())
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(target(x), merged_source(x), rtol=0, atol=0)
    unmerged_source = _layer(cls)
    with pytest.warns(UserWarning, match="a state dict does not record whether its layer was merged"):
        target.load_state_dict(unmerged_source.state_dict())


@pytest.mark.parametrize("cls", CLASSES)
def test_merge_unmerge_cycles_do_not_drift(cls):
    layer = _layer(cls, dtype=torch.float64)
    w0 = layer.weight.detach().clone()
    for _ in range(5):
        layer.merge()
        layer.unmerge()
    assert_close64(layer.weight, w0, 1e-13, what="W0 after 5 cycles")


@pytest.mark.parametrize("cls", CLASSES)
def test_merged_layer_has_no_adapter_gradient(cls):
    """A merged forward is the base's alone: the adapter gets no gradient, and a training-mode
    forward with gradients on warns so (an eval-mode or no-grad forward does not)."""
    layer = _layer(cls)
    layer.merge()
    x = torch.randn(3, 12, requires_grad=True)
    with pytest.warns(UserWarning, match=rf"^{cls.__name__}: forward in training mode .* merged .* no gradient"):
        layer(x).sum().backward()
    assert all(p.grad is None for p in layer.adapter_parameters())
    assert_close64(x.grad, f64(layer.weight).sum(0).expand(3, 12), 1e-6, what="input grad of merged layer")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            layer(x)
        layer.eval()
        layer(x)
        layer.train()
        layer.requires_grad_(False)  # nothing left to train: nothing to warn about
        layer(x)


def test_bf16_base_merge_stays_bf16_and_close_and_unmerge_restores_it():
    """A bf16 base with float32 adapters (the layout the README recommends) merges and unmerges
    through its own branch: unmerge(merge(W0)) is W0 to bf16 rounding."""
    for cls in CLASSES:
        layer = cls.from_linear(nn.Linear(16, 12, dtype=torch.bfloat16), rank=4)
        randomize_adapter(layer, scale=0.1)
        w0 = layer.weight.detach().clone()
        delta = layer.delta_weight().detach()
        x = torch.randn(3, 16, dtype=torch.bfloat16)
        with torch.no_grad():
            y = layer(x)
            layer.merge()
            assert layer.weight.dtype == torch.bfloat16
            assert_close64(layer(x), f64(y), 3e-2, what=f"{cls.__name__} bf16 merged")
            layer.unmerge()
        # two bf16 roundings (into W0 + delta and back), each up to 2^-8 of the values rounded
        bound = 4 * 2.0**-8 * (f64(w0).abs() + f64(delta).abs())
        err = (f64(layer.weight) - f64(w0)).abs()
        assert torch.all(err <= bound), (cls.__name__, float((err / bound).max()))
        assert float(f64(delta).abs().max()) > 10 * float(bound.max())  # the update is far above it


# ---- delta_weight ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_delta_weight_gives_the_merged_weight(cls, dtype):
    layer = _layer(cls, dtype=dtype)
    x = torch.randn(4, 12, dtype=dtype)
    delta = layer.delta_weight()
    assert delta.shape == (10, 12)
    assert delta.requires_grad  # differentiable in the adapter tensors
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    with torch.no_grad():
        y = F.linear(x, layer.weight + delta, layer.bias)
    assert_close64(y, _reference_out(layer, x), tol, what="F.linear(x, W0 + delta)")
    if cls is pl.DoRALinear:
        w_prime = materialised_weight(layer.weight, layer.lora_A, layer.lora_B, layer.scaling)
        expected = (f64(layer.magnitude) / w_prime.norm(dim=1))[:, None] * w_prime - f64(layer.weight)
    else:
        expected = layer.scaling * f64(layer.lora_B) @ f64(layer.lora_A)
    assert_close64(delta, expected, tol, what="delta_weight")
    layer.merge()
    if cls is pl.DoRALinear:
        with pytest.raises(ValueError, match="merged"):
            layer.delta_weight()
    else:
        assert_close64(layer.delta_weight(), expected, tol, what="delta_weight of a merged LoRA")


# ---- enable / disable -----------------------------------------------------------------------
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("grad", [True, False])
def test_disable_adapter_context(cls, grad):
    layer = _layer(cls)
    x = torch.randn(2, 3, 12)
    with torch.set_grad_enabled(grad):
        y = layer(x)
        with layer.disable_adapter() as inner:
            assert inner is layer
            assert not layer.adapter_enabled
            assert torch.equal(layer(x), layer.base_layer(x))
            assert_close64(layer(x), _base_out(layer.weight, layer.bias, x), 1e-6, what="disabled")
        assert layer.adapter_enabled
        assert torch.equal(layer(x), y)


@pytest.mark.parametrize("cls", CLASSES)
def test_disable_adapter_on_a_merged_layer(cls):
    layer = _layer(cls)
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, 12)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        y_merged = layer(x)
        with layer.disable_adapter():
            assert not layer.merged and not layer.adapter_enabled
            assert_close64(layer.weight, f64(w0), 1e-6, what="W0 inside disable_adapter")
            assert_close64(layer(x), _base_out(w0, layer.bias, x), 1e-6, what="base output inside")
        assert layer.merged and layer.adapter_enabled
        assert_close64(layer(x), f64(y_merged), 1e-6, what="merged again after the block")
        assert_close64(layer(x), f64(y), 1e-5, what="merged vs unmerged")


@pytest.mark.parametrize("cls", CLASSES)
def test_disable_adapter_restores_state_after_an_exception(cls):
    layer = _layer(cls)
    layer.merge()
    with pytest.raises(RuntimeError, match="boom"), layer.disable_adapter():
        raise RuntimeError("boom")
    assert layer.merged and layer.adapter_enabled


@pytest.mark.parametrize("cls", CLASSES)
def test_adapter_enabled_flag(cls):
    layer = _layer(cls)
    x = torch.randn(4, 12, requires_grad=True)
    y = layer(x)
    layer.adapter_enabled = False
    y_off = layer(x)
    assert torch.equal(y_off, layer.base_layer(x))
    y_off.sum().backward()
    assert all(p.grad is None for p in layer.adapter_parameters())
    with pytest.raises(ValueError, match="disabled"):
        layer.merge()
    assert not layer.merged
    # nested context on a disabled layer keeps it disabled afterwards
    with layer.disable_adapter():
        pass
    assert not layer.adapter_enabled
    layer.adapter_enabled = True
    assert torch.equal(layer(x), y)
    with pytest.raises(TypeError, match="bool"):
        layer.adapter_enabled = 0
    layer.merge()
    with pytest.raises(ValueError, match="merged"):
        layer.adapter_enabled = False
    assert layer.adapter_enabled and layer.merged
    layer.adapter_enabled = True  # no-op on a merged layer


# ---- to_linear ------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("state", ["unmerged", "merged", "disabled"])
@pytest.mark.parametrize("bias", [True, False])
def test_to_linear(cls, state, bias):
    layer = _layer(cls, bias=bias)
    if state == "merged":
        layer.merge()
    elif state == "disabled":
        layer.adapter_enabled = False
    w_before = layer.weight.detach().clone()
    x = torch.randn(2, 3, 12)
    with torch.no_grad():
        y = layer(x)
    linear = layer.to_linear()
    assert type(linear) is nn.Linear
    assert (linear.in_features, linear.out_features) == (12, 10)
    assert (linear.bias is None) == (not bias)
    assert not any(p.requires_grad for p in linear.parameters())
    with torch.no_grad():
        assert_close64(linear(x), f64(y), 1e-5, what="to_linear output")
    # the layer is unchanged, and the new module owns its tensors
    assert torch.equal(layer.weight, w_before)
    assert layer.merged == (state == "merged")
    assert layer.adapter_enabled == (state != "disabled")
    assert linear.weight.data_ptr() != layer.weight.data_ptr()
    if bias:
        assert linear.bias.data_ptr() != layer.bias.data_ptr()
    with torch.no_grad():
        linear.weight.zero_()
    assert torch.equal(layer.weight, w_before)


@pytest.mark.parametrize("cls", CLASSES)
def test_to_linear_matches_reference_merge(cls):
    layer = _layer(cls, dtype=torch.float64)
    linear = layer.to_linear()
    w_prime = materialised_weight(layer.weight, layer.lora_A, layer.lora_B, layer.scaling)
    if cls is pl.DoRALinear:
        w_prime = (f64(layer.magnitude) / w_prime.norm(dim=1))[:, None] * w_prime
    assert linear.weight.dtype == F64
    assert_close64(linear.weight, w_prime, 1e-12, what="to_linear weight")
    assert torch.equal(linear.bias, layer.bias)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("leading", [(0,), (2, 0)])
def test_empty_batch(cls, leading):
    layer = _layer(cls)
    x = torch.randn(*leading, 12, requires_grad=True)
    y = layer(x)
    assert y.shape == (*leading, 10)
    y.sum().backward()
    for p in layer.adapter_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    with torch.no_grad():
        assert layer(x).shape == (*leading, 10)


# ---- input dtype ----------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [pl.LoRALinear, pl.DoRALinear, pl.QLoRALinear, pl.QDoRALinear])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("grad", [True, False])
def test_integer_input_raises_like_quantized_linear(cls, dtype, grad):
    # nn.Linear refuses integer input; cast to the compute dtype it would give a truncated output
    layer = cls.from_linear(nn.Linear(64, 4), rank=2)
    x = torch.randint(0, 2, (2, 64)).to(dtype)
    with torch.set_grad_enabled(grad), pytest.raises(TypeError) as info:
        layer(x)
    with pytest.raises(TypeError) as quantized:
        QuantizedLinear(64, 4)(x)
    assert str(info.value) == str(quantized.value) == f"input: expected a floating-point tensor, got {dtype}"


@pytest.mark.parametrize("cls", [pl.LoRALinear, pl.DoRALinear, pl.QLoRALinear, pl.QDoRALinear])
def test_a_non_tensor_input_raises_like_quantized_linear(cls):
    layer = cls.from_linear(nn.Linear(64, 4), rank=2)
    x = torch.randn(2, 64).numpy()
    with pytest.raises(TypeError) as info:
        layer(x)
    with pytest.raises(TypeError) as quantized:
        QuantizedLinear(64, 4)(x)
    assert str(info.value) == str(quantized.value) == "input: expected a floating-point tensor, got ndarray"


@pytest.mark.parametrize("cls", [pl.LoRALinear, pl.DoRALinear])
def test_merge_unmerge_and_delta_weight_use_the_rslora_scaling(cls):
    """use_rslora: s = alpha / sqrt(r) in the merge, the unmerge, delta_weight and the norm, not
    only in the forward (r = 4: alpha / r is half of it)."""
    torch.manual_seed(0)
    layer = cls(12, 10, rank=4, alpha=8.0, use_rslora=True)
    randomize_adapter(layer)
    assert layer.scaling == 4.0
    s = 8.0 / 4**0.5  # independent of the layer
    w0, a, b = f64(layer.weight), f64(layer.lora_A), f64(layer.lora_B)
    w_prime = w0 + s * b @ a
    expected_w = w_prime
    if cls is pl.DoRALinear:
        assert_close64(layer.weight_norm(), w_prime.norm(dim=1), 1e-5, what="weight_norm")
        expected_w = (f64(layer.magnitude) / w_prime.norm(dim=1))[:, None] * w_prime
    assert_close64(layer.delta_weight(), expected_w - w0, 1e-5, what="delta_weight")
    x = torch.randn(4, 12)
    layer.train()
    y = layer(x.requires_grad_(True))  # the fused training step
    assert_close64(y, f64(x) @ expected_w.t() + f64(layer.bias), 1e-5, what="training forward")
    layer.merge()
    assert_close64(layer.weight, expected_w, 1e-5, what="merged weight")
    layer.unmerge()
    assert_close64(layer.weight, w0, 1e-5, what="W0 after unmerge")


# ---- from a second mutation audit of the layers ------------------------------------------------
LORA_AND_DORA = [pl.LoRALinear, pl.DoRALinear]


@pytest.mark.parametrize("cls", LORA_AND_DORA)
@pytest.mark.parametrize("frozen", ["lora_A", "lora_B"])
def test_a_factor_frozen_alone_leaves_the_other_its_reference_gradient(cls, frozen):
    """The fused backward computes ``dA`` only when ``A`` requires grad and ``dB`` only when ``B``
    does (``need_A``/``need_B``): with one factor frozen, the other still gets the float64
    reference gradient (and the frozen one none)."""
    layer = _layer(cls)
    getattr(layer, frozen).requires_grad_(False)
    x = torch.randn(2, 3, 12, dtype=torch.float64).float()
    g = torch.randn(2, 3, 10, dtype=torch.float64)
    got = run_layer(layer, x, g)
    ref = run_reference(layer, x, g)
    trained = "lora_B" if frozen == "lora_A" else "lora_A"
    assert got.grads[frozen] is None
    assert got.grads[trained] is not None, f"{trained}: no gradient"
    assert_close64(got.grads[trained], ref.grads[trained], 1e-5, what=f"grad of {trained}")
    assert_close64(got.grads["x"], ref.grads["x"], 1e-5, what="grad of x")


@pytest.mark.parametrize("cls", LORA_AND_DORA)
@pytest.mark.parametrize("grad", [True, False])
def test_non_contiguous_input_with_several_leading_dims(cls, grad):
    """An input whose leading dims are transposed (not viewable as 2-D) gives the float64
    reference output, and gradients when trained: the forward must ``reshape`` (copy where it
    must), not ``view``."""
    layer = _layer(cls)
    x = torch.randn(3, 2, 12, dtype=torch.float64).float().transpose(0, 1)
    assert not x.is_contiguous()
    if grad:
        g = torch.randn(2, 3, 10, dtype=torch.float64)
        got, ref = run_layer(layer, x, g), run_reference(layer, x, g)
        for key in ("x", "lora_A", "lora_B"):
            assert_close64(got.grads[key], ref.grads[key], 1e-5, what=f"grad of {key}")
        out = got.out
    else:
        with torch.no_grad():
            out = layer(x)
        ref = run_reference(layer, x)
    assert out.shape == (2, 3, 10)
    assert_close64(out, ref.out, 1e-5, what="output")


@pytest.mark.parametrize("cls", LORA_AND_DORA)
@pytest.mark.parametrize("state", ["merged", "disabled"])
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_input_into_a_merged_or_disabled_fp32_layer_returns_the_input_dtype(cls, state, half):
    """A merged or disabled float32 layer computes ``base_layer(x.float())`` and hands the
    result back in ``x``'s dtype, as the unmerged layer does (the output dtype must not depend
    on the merge state)."""
    layer = _layer(cls).eval()
    x = torch.randn(4, 12, dtype=torch.float64).to(half)
    with torch.no_grad():
        unmerged = layer(x)
        if state == "merged":
            layer.merge()
            got = layer(x)
        else:
            with layer.disable_adapter():
                got = layer(x)
    assert unmerged.dtype == half
    assert got.dtype == half
    if state == "merged":
        assert_close64(got, unmerged.double(), 2e-2, what="merged output")
    else:
        expected = nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
        assert_close64(got, expected, 1e-2, what="disabled output")


@pytest.mark.parametrize("grad", [True, False])
def test_half_input_through_a_hooked_base_returns_the_input_dtype(grad):
    """With a forward hook on the base (the plain-op path that calls ``base_layer``), a float16
    input into a float32 LoRA layer gives a float16 output equal to the float64 reference, as
    without the hook."""
    layer = _layer(pl.LoRALinear)
    seen = []
    layer.base_layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    x = torch.randn(2, 3, 12, dtype=torch.float64).half()
    with torch.set_grad_enabled(grad):
        y = layer(x)
    assert seen == [torch.float32]  # the hook ran, on the compute dtype
    assert y.dtype == torch.float16
    assert_close64(y, run_reference(layer, x).out, 2e-3, what="output")


@pytest.mark.parametrize("cls", LORA_AND_DORA)
def test_a_merged_layer_loading_only_a_new_bias_stays_unmergeable_without_warning(cls):
    """The merge never touches the bias, so a merged layer that loads a state dict differing only
    in its bias neither warns nor forgets its merge (DoRA keeps the gain that unmerge() needs):
    unmerge() then restores ``W0`` and the layer computes the float64 reference with the new
    bias."""
    layer = _layer(cls)
    w0 = layer.weight.detach().clone()
    layer.merge()
    state = {k: v.clone() for k, v in layer.state_dict().items()}  # the merged layer's own values
    state["base_layer.bias"] = state["base_layer.bias"] + 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.load_state_dict(state)
    layer.unmerge()
    assert_close64(layer.weight, w0.double(), 1e-6, what="W0 after unmerge")
    x = torch.randn(5, 12, dtype=torch.float64).float()
    with torch.no_grad():
        y = layer(x)
    assert torch.equal(layer.bias, state["base_layer.bias"])
    assert_close64(y, run_reference(layer, x).out, 1e-5, what="output with the loaded bias")


@pytest.mark.parametrize("cls", LORA_AND_DORA)
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_float16_base_gives_the_input_its_reference_gradient(cls, dropout):
    """Over a float16 base the fused backward computes the adapter's gradients in float32 and
    must bring ``dT`` back to float16 before ``dx = G W0 + dT A`` (a layer inside a model always
    has an input that requires grad).
    Checked against float64 with a fixed dropout mask."""
    torch.manual_seed(0)
    layer = cls.from_linear(nn.Linear(12, 10).half(), rank=3, alpha=6.0, dropout=dropout).train()
    randomize_adapter(layer)
    x = torch.randn(2, 3, 12, dtype=torch.float64).half()
    mask = (torch.rand(6, 12) > dropout).float()  # the layer hands dropout the 2-D input
    if dropout:
        class Fixed(nn.Module):
            p = dropout

            def forward(self, t):
                return t * mask.to(t.dtype) / (1 - dropout)
        layer.lora_dropout = Fixed()
    g = torch.randn(2, 3, 10, dtype=torch.float64)
    got = run_layer(layer, x, g)
    ref = run_reference(layer, x, g, dropout_mask=mask.reshape(2, 3, 12) if dropout else None, p=dropout)
    assert got.grads["x"].dtype == torch.float16
    assert layer.lora_A.grad.dtype == torch.float32
    for key in ("x", *layer.adapter_parameter_names):
        assert_close64(got.grads[key], ref.grads[key], 1e-2, what=f"grad of {key}")


def test_disable_adapters_refuses_an_unmergeable_dora_layer_before_touching_any_other():
    """``disable_adapters(model)`` asks every layer ``_check_disable()`` before the first change:
    a merged DoRA layer that loaded a state dict (its merge gain is gone) refuses with the
    model-level message, and the merged LoRA layer before it keeps its weight bit for bit (no
    unmerge / merge round trip)."""
    lora, dora = _layer(pl.LoRALinear), _layer(pl.DoRALinear, in_f=10, out_f=10)
    model = nn.Sequential(lora, dora)
    lora.merge()
    dora.merge()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dora.load_state_dict({k: v * 1.5 for k, v in dora.state_dict().items()})
    before = lora.weight.detach().clone()
    with pytest.raises(ValueError, match=r"^disable_adapters\(\): 1 layer\(s\) refuse it"):
        with pl.disable_adapters(model):
            pass
    assert lora.merged and torch.equal(lora.weight, before)


def test_merged_is_read_only() -> None:
    """``layer.merged`` says whether ``W0`` holds the update; set by hand it would disagree with
    the weight (``merged = False`` on a merged layer added ``s B A`` a second time in forward, and
    a second ``merge()`` wrote ``W0 + 2 s B A``). Assigning it raises, naming the calls that
    change it, and the layer still computes the float64 reference afterwards."""
    torch.manual_seed(0)
    linear = nn.Linear(16, 12).double()
    layer = pl.LoRALinear.from_linear(linear, rank=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 16, dtype=torch.float64)
    reference = linear(x) + layer.scaling * (x @ layer.lora_A.detach().T) @ layer.lora_B.detach().T
    w0 = linear.weight.detach().clone()
    layer.eval().merge()
    with pytest.raises(AttributeError, match=r"merged: read-only \(got False\); merge\(\) and unmerge\(\)"):
        layer.merged = False
    assert layer.merged
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference.detach(), rtol=0, atol=1e-12)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight.detach(), w0, rtol=0, atol=1e-14)
