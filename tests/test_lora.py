"""LoRALinear and LoRAPlusLinear against the float64 reference of tests/reference.py."""

from __future__ import annotations

import re

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import (
    dora_ref,
    F64,
    assert_close64,
    assert_run_close,
    direct_row_norm,
    f64,
    lora_ref,
    randomize_adapter,
    run_layer,
    run_reference,
    assert_double_backward_refused,
)
from torch import nn

import peft_layers as pl
from peft_layers.adapter import overrides_linear_forward
from peft_layers.lora import ranks_above_features_allowed

LORA_CLASSES = [pl.LoRALinear, pl.LoRAPlusLinear]
# input shapes for in_features = 12: 1-D, 2-D, 3-D
LEADING = [(), (5,), (2, 3)]
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _layer(cls, in_f=12, out_f=10, dtype=torch.float32, **kw) -> nn.Module:
    kw.setdefault("rank", 3)
    kw.setdefault("alpha", 6.0)
    layer = cls(in_f, out_f, dtype=dtype, **kw)
    randomize_adapter(layer)
    return layer


def _x(leading, in_f=12, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*leading, in_f, dtype=torch.float64).to(dtype)


# ---- forward and gradients ------------------------------------------------------------------
@pytest.mark.parametrize("cls", LORA_CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("leading", LEADING)
def test_train_forward_and_grads_match_reference(cls, dtype, bias, leading):
    layer = _layer(cls, dtype=dtype, bias=bias)
    x = _x(leading, dtype=dtype)
    g = torch.randn(*leading, 10, dtype=torch.float64)
    got = run_layer(layer, x, g)
    ref = run_reference(layer, x, g)
    assert got.out.dtype == dtype and got.out.shape == (*leading, 10)
    assert_run_close(got, ref, RTOL[dtype], ("x", "lora_A", "lora_B"))
    assert got.grads["weight"] is None
    assert got.grads["bias"] is None


@pytest.mark.parametrize("cls", LORA_CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trainable_bias_gets_reference_gradient(cls, dtype):
    layer = _layer(cls, dtype=dtype)
    layer.base_layer.bias.requires_grad_(True)
    x = _x((4, 3), dtype=dtype)
    g = torch.randn(4, 3, 10, dtype=torch.float64)
    assert_run_close(run_layer(layer, x, g), run_reference(layer, x, g), RTOL[dtype],
                     ("x", "lora_A", "lora_B", "bias"))


@pytest.mark.parametrize("cls", LORA_CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("leading", LEADING)
def test_no_grad_forward_matches_reference(cls, dtype, bias, leading):
    layer = _layer(cls, dtype=dtype, bias=bias)
    x = _x(leading, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
    expected = lora_ref(f64(x), f64(layer.weight), f64(layer.bias), f64(layer.lora_A),
                        f64(layer.lora_B), layer.scaling)
    assert y.dtype == dtype
    assert_close64(y, expected, RTOL[dtype], what="no-grad output")


def test_eval_mode_ignores_dropout():
    layer = _layer(pl.LoRALinear, dropout=0.5).eval()
    x = _x((6,))
    expected = lora_ref(f64(x), f64(layer.weight), f64(layer.bias), f64(layer.lora_A),
                        f64(layer.lora_B), layer.scaling)
    assert_close64(layer(x), expected, 1e-5, what="eval output with dropout=0.5")


# ---- dropout: the same mask in layer and reference ------------------------------------------
def _capture_dropout(layer):
    """Record what ``layer.lora_dropout`` returns (the real nn.Dropout's d) on each call."""
    seen: list[torch.Tensor] = []
    handle = layer.lora_dropout.register_forward_hook(lambda mod, inp, out: seen.append(out.detach().clone()))
    return seen, handle


def _mask_from(d: torch.Tensor, x: torch.Tensor, p: float) -> torch.Tensor:
    """The 0/1 mask behind ``d = dropout(x)``; checks ``d == x * mask / (1 - p)`` on the way."""
    mask = (d != 0).to(torch.float64)
    assert 0 < mask.mean() < 1, "the dropout mask should drop some entries and keep some"
    assert_close64(d, f64(x).reshape(d.shape) * mask / (1 - p), 1e-6, what="captured dropout")
    return mask


@pytest.mark.parametrize("cls", LORA_CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("leading", [(7,), (2, 4)])
def test_dropout_train_matches_reference_with_same_mask(cls, dtype, leading):
    p = 0.3
    layer = _layer(cls, dtype=dtype, dropout=p).train()
    x = _x(leading, dtype=dtype)
    g = torch.randn(*leading, 10, dtype=torch.float64)
    seen, handle = _capture_dropout(layer)
    got = run_layer(layer, x, g)
    handle.remove()
    assert len(seen) == 1
    mask = _mask_from(seen[0], x, p).reshape(x.shape)
    ref = run_reference(layer, x, g, dropout_mask=mask, p=p)
    assert_run_close(got, ref, RTOL[dtype], ("x", "lora_A", "lora_B"))


def test_dropout_train_no_grad_matches_reference_with_same_mask():
    p = 0.4
    layer = _layer(pl.LoRALinear, dropout=p).train()
    x = _x((9,))
    seen, handle = _capture_dropout(layer)
    with torch.no_grad():
        y = layer(x)
    handle.remove()
    mask = _mask_from(seen[0], x, p)
    ref = run_reference(layer, x, dropout_mask=mask, p=p)
    assert_close64(y, ref.out, 1e-5, what="no-grad dropout output")


@pytest.mark.parametrize("cls", [pl.LoRALinear, pl.DoRALinear])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("bias_trainable", [False, True])
def test_unfrozen_base_weight_gets_reference_gradient(cls, dropout, bias_trainable):
    # a user who unfreezes W0 gets plain autograd ops, and W0 (and b) the right gradient
    layer = _layer(cls, dropout=dropout).train()
    layer.base_layer.weight.requires_grad_(True)
    layer.base_layer.bias.requires_grad_(bias_trainable)
    x = _x((6,))
    g = torch.randn(6, 10, dtype=torch.float64)
    seen, handle = _capture_dropout(layer)
    got = run_layer(layer, x, g)
    handle.remove()
    mask = _mask_from(seen[0], x, dropout) if dropout else None
    ref = run_reference(layer, x, g, dropout_mask=mask, p=dropout)
    keys = ("x", "lora_A", "lora_B", "weight") + (("bias",) if bias_trainable else ())
    keys += ("magnitude",) if cls is pl.DoRALinear else ()
    assert_run_close(got, ref, 1e-5, keys)


# ---- half precision ------------------------------------------------------------------------
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", LORA_CLASSES)
def test_half_input_into_fp32_layer(half, cls):
    layer = _layer(cls)
    x = _x((4, 3), dtype=half)
    g = torch.randn(4, 3, 10, dtype=torch.float64)
    got = run_layer(layer, x, g)
    assert got.out.dtype == half
    assert got.grads["x"].dtype == half
    assert got.grads["lora_A"].dtype == torch.float32
    ref = run_reference(layer, x, g)  # the reference sees the same (half-rounded) input values
    assert_run_close(got, ref, 1e-2, ("x", "lora_A", "lora_B"))


@pytest.mark.parametrize("cls", LORA_CLASSES)
def test_bf16_base_trains_fp32_adapters(cls):
    base = nn.Linear(16, 12, dtype=torch.bfloat16)
    layer = cls.from_linear(base, rank=4, alpha=8.0)
    assert layer.weight is base.weight and layer.weight.dtype == torch.bfloat16
    assert layer.lora_A.dtype == torch.float32 and layer.lora_B.dtype == torch.float32
    randomize_adapter(layer)
    x = _x((5,), in_f=16, dtype=torch.bfloat16)
    g = torch.randn(5, 12, dtype=torch.float64)
    got = run_layer(layer, x, g)
    assert got.out.dtype == torch.bfloat16
    assert got.grads["lora_A"].dtype == torch.float32
    assert got.grads["lora_B"].dtype == torch.float32
    assert layer.lora_A.dtype == torch.float32 and layer.lora_B.dtype == torch.float32
    # the layer computes in bf16 (A and B rounded to bf16): ~3 significant digits
    assert_run_close(got, run_reference(layer, x, g), 3e-2, ("x", "lora_A", "lora_B"))


# ---- properties ----------------------------------------------------------------------------
shapes = st.tuples(st.integers(1, 24), st.integers(1, 24)).flatmap(
    lambda io: st.tuples(st.just(io[0]), st.just(io[1]), st.integers(1, min(io)))
)


@given(shape=shapes, init=st.sampled_from(["kaiming", "gaussian"]), bias=st.booleans(),
       leading=st.sampled_from([(), (1,), (5,), (2, 3)]), grad=st.booleans(), cls=st.sampled_from(LORA_CLASSES))
def test_fresh_layer_equals_base_exactly(shape, init, bias, leading, grad, cls):
    in_f, out_f, rank = shape
    layer = cls(in_f, out_f, rank=rank, alpha=2.0 * rank, bias=bias, init=init)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.count_nonzero(layer.lora_A) > 0
    x = torch.randn(*leading, in_f, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        assert torch.equal(layer(x), layer.base_layer(x))


def test_init_distributions():
    """kaiming: A ~ U(-1/sqrt(in), 1/sqrt(in)) (a = sqrt(5)); gaussian: std 1/r (lora.py's choice)."""
    layer = pl.LoRALinear(400, 300, rank=64, init="kaiming")
    bound = 1 / math.sqrt(400)
    assert float(layer.lora_A.detach().abs().max()) <= bound
    assert float(layer.lora_A.detach().abs().max()) > 0.95 * bound
    assert abs(float(layer.lora_A.detach().std()) - bound / math.sqrt(3)) < 0.02 * bound
    layer = pl.LoRALinear(400, 300, rank=64, init="gaussian")
    assert abs(float(layer.lora_A.detach().std()) - 1 / 64) < 0.02 / 64


@given(rank=st.integers(1, 16), alpha=st.floats(0.01, 100.0), rs=st.booleans())
def test_scaling_and_rslora(rank, alpha, rs):
    layer = pl.LoRALinear(16, 16, rank=rank, alpha=alpha, use_rslora=rs)
    expected = alpha / math.sqrt(rank) if rs else alpha / rank
    assert layer.scaling == pytest.approx(expected, rel=1e-12)
    randomize_adapter(layer)
    # the forward uses this scaling (compare with the reference given the independent value)
    x = torch.randn(3, 16)
    with torch.no_grad():
        y = layer(x)
    assert_close64(y, lora_ref(f64(x), f64(layer.weight), f64(layer.bias), f64(layer.lora_A),
                               f64(layer.lora_B), expected), 1e-5, what="rsLoRA output")


@pytest.mark.parametrize("cls", LORA_CLASSES)
def test_pissa_reset_restarts_from_the_current_weight(cls):
    """reset_adapter_parameters() on a PiSSA layer takes the top-r singular part of its current
    weight W0 + s B A: the function is kept (a second SVD of the residual alone changed it by
    0.6), and the new s B A is the truncated SVD of that weight."""
    torch.manual_seed(0)
    layer = cls.from_linear(nn.Linear(16, 12, dtype=torch.float64), rank=3, alpha=3.0, init="pissa")
    with torch.no_grad():  # a "trained" adapter
        layer.lora_A.add_(0.1 * torch.randn_like(layer.lora_A))
        layer.lora_B.add_(0.1 * torch.randn_like(layer.lora_B))
    current = f64(layer.weight) + layer.scaling * f64(layer.lora_B) @ f64(layer.lora_A)
    x = torch.randn(4, 16, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
        layer.reset_adapter_parameters()
        assert_close64(layer(x), f64(before), 1e-12, what="output after a PiSSA reset")
    u, sv, vh = torch.linalg.svd(current, full_matrices=False)
    s_ba = layer.scaling * f64(layer.lora_B) @ f64(layer.lora_A)
    assert_close64(s_ba, (u[:, :3] * sv[:3]) @ vh[:3], 1e-10, what="s B A after a PiSSA reset")
    assert_close64(f64(layer.weight) + s_ba, current, 1e-12, what="W0 + s B A after a PiSSA reset")


@given(shape=shapes, bias=st.booleans(), rs=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       cls=st.sampled_from(LORA_CLASSES + [pl.DoRALinear]))
def test_pissa_starts_at_base_with_residual_weight(shape, bias, rs, dtype, cls):
    in_f, out_f, rank = shape
    base = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    w_old = base.weight.detach().to(F64).clone()
    x = torch.randn(4, in_f, dtype=dtype)
    with torch.no_grad():
        y_base = base(x)
    layer = cls.from_linear(base, rank=rank, alpha=3.0, use_rslora=rs, init="pissa")
    s = layer.scaling
    a, b = f64(layer.lora_A), f64(layer.lora_B)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    # W0 was replaced (in place) by the residual: W0_new + s B A == W0_old
    assert layer.weight is base.weight
    assert_close64(f64(layer.weight) + s * b @ a, w_old, tol, what="W0_new + s B A")
    # s B A is the rank-r truncated SVD of W0_old, split evenly between A and B. The top-r
    # subspace is only as well defined as the gap sigma_r - sigma_{r+1}: an SVD in the layer's
    # precision may rotate it by ~eps sigma_1 / gap, so the tolerance scales with sigma_1 / gap
    u, sv, vh = torch.linalg.svd(w_old, full_matrices=False)
    gap = float(sv[rank - 1] - (sv[rank] if rank < len(sv) else 0.0))
    sigma1 = float(sv[0])
    assert_close64(s * b @ a, (u[:, :rank] * sv[:rank]) @ vh[:rank], tol,
                   atol=tol * sigma1 * max(1.0, sigma1 / max(gap, 1e-300)), what="s B A")
    # whatever the gap: the residual carries exactly the tail energy (Eckart-Young)
    tail = float(sv[rank:].square().sum())
    assert abs(float(f64(layer.weight).square().sum()) - tail) <= 10 * tol * sigma1 ** 2
    assert_close64(a @ a.T, torch.diag(sv[:rank] / s), tol, what="A A^T")
    assert_close64(b.T @ b, torch.diag(sv[:rank] / s), tol, what="B^T B")
    # the residual keeps the remaining singular values
    rest = torch.linalg.svdvals(f64(layer.weight))
    expected_rest = torch.cat([sv[rank:], torch.zeros(rank, dtype=F64)])
    assert_close64(rest, expected_rest, tol, atol=tol * float(sv[0]), what="residual singular values")
    # the layer starts equal to its base
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert_close64(layer(x), f64(y_base), tol, atol=tol * (1 + float(y_base.abs().max())),
                           what="PiSSA layer vs base")


# ---- LoRA+ ---------------------------------------------------------------------------------
def test_loraplus_param_groups():
    layer = pl.LoRAPlusLinear(8, 6, rank=2, lr_ratio=4.0)
    assert layer.lr_ratio == 4.0
    groups = layer.param_groups(1e-3, weight_decay=0.1)
    by_param = {id(p): grp for grp in groups for p in grp["params"]}
    assert set(by_param) == {id(layer.lora_A), id(layer.lora_B)}
    assert by_param[id(layer.lora_A)]["lr"] == pytest.approx(1e-3)
    assert by_param[id(layer.lora_B)]["lr"] == pytest.approx(4e-3)
    assert all(grp["weight_decay"] == 0.1 for grp in groups)
    assert all(grp["weight_decay"] == 0.0 for grp in layer.param_groups(0.5))
    # the groups drive a real optimizer: one SGD step moves B 4x as far per unit gradient as A
    opt = torch.optim.SGD(layer.param_groups(0.1))
    layer.lora_A.grad = torch.ones_like(layer.lora_A)
    layer.lora_B.grad = torch.ones_like(layer.lora_B)
    a0, b0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    opt.step()
    assert torch.allclose(a0 - layer.lora_A, torch.full_like(a0, 0.1))
    assert torch.allclose(b0 - layer.lora_B, torch.full_like(b0, 0.4))
    assert "lr_ratio=4" in repr(layer)


def test_loraplus_default_ratio_and_forward_is_lora():
    layer = pl.LoRAPlusLinear(8, 6, rank=2)
    assert layer.lr_ratio == 16.0
    assert isinstance(layer, pl.LoRALinear)
    randomize_adapter(layer)
    x = torch.randn(5, 8)
    expected = lora_ref(f64(x), f64(layer.weight), f64(layer.bias), f64(layer.lora_A), f64(layer.lora_B),
                        layer.alpha / layer.rank)
    assert_close64(layer(x), expected, 1e-5, what="LoRA+ forward")


@pytest.mark.parametrize("lr", [0, -1e-3, float("nan"), float("inf"), True, "0.1"])
def test_loraplus_bad_lr(lr):
    layer = pl.LoRAPlusLinear(8, 6, rank=2)
    with pytest.raises(ValueError, match="lr"):
        layer.param_groups(lr)


@pytest.mark.parametrize("weight_decay", [-0.1, float("nan"), float("inf"), True])
def test_loraplus_bad_weight_decay(weight_decay):
    layer = pl.LoRAPlusLinear(8, 6, rank=2)
    with pytest.raises(ValueError, match="weight_decay: expected a finite number >= 0"):
        layer.param_groups(1e-3, weight_decay=weight_decay)


# ---- bad input -----------------------------------------------------------------------------
BAD_ARGS = [
    ({"rank": 0}, "rank"),
    ({"rank": -1}, "rank"),
    ({"rank": 9}, "rank"),          # > min(in=12, out=8)
    ({"rank": 2.0}, "rank"),
    ({"rank": True}, "rank"),
    ({"alpha": 0.0}, "alpha"),
    ({"alpha": -1.0}, "alpha"),
    ({"alpha": float("nan")}, "alpha"),
    ({"dropout": 1.0}, "dropout"),
    ({"dropout": -0.1}, "dropout"),
    ({"init": "xavier"}, "init"),
]


@pytest.mark.parametrize("cls", LORA_CLASSES + [pl.DoRALinear])
@pytest.mark.parametrize("kwargs, name", BAD_ARGS)
def test_bad_constructor_arguments(cls, kwargs, name):
    value = next(iter(kwargs.values()))
    with pytest.raises(ValueError) as info:
        cls(12, 8, **kwargs)
    message = str(info.value)
    assert message.startswith(name) or f"{name}:" in message or f"{name} " in message, message
    assert repr(value) in message, message
    with pytest.raises(ValueError, match=name):
        cls.from_linear(nn.Linear(12, 8), **kwargs)


@pytest.mark.parametrize("cls", LORA_CLASSES + [pl.DoRALinear, pl.QLoRALinear, pl.QDoRALinear])
@pytest.mark.parametrize("build", ["constructor", "from_linear"])
def test_an_unknown_argument_names_what_the_layer_takes(cls, build):
    """Python's own error named a private method (``_init_adapter() got an unexpected keyword
    argument 'r'``); now the call, its arguments and ours for a LoraConfig name."""
    call = (lambda **kw: cls(16, 16, **kw)) if build == "constructor" else (lambda **kw: cls.from_linear(nn.Linear(16, 16), **kw))
    where = f"{cls.__name__}()" if build == "constructor" else f"{cls.__name__}.from_linear()"
    with pytest.raises(TypeError, match=rf"^r: {re.escape(where)} takes no argument 'r' \(got r=8\); its arguments are .*rank, alpha, dropout, use_rslora, init.*; Hugging Face PEFT's r is rank= here$"):
        call(r=8)
    with pytest.raises(TypeError, match=r"^aplha: .* takes no argument 'aplha' .*; did you mean 'alpha'\?$"):
        call(aplha=2.0)


@pytest.mark.parametrize("cls", LORA_CLASSES + [pl.DoRALinear, pl.QLoRALinear])
def test_constructor_bias_and_dtype_are_checked(cls):
    """``bias="none"`` built a bias (any truthy value did), and a complex dtype built a layer
    whose real input silently lost the imaginary part."""
    with pytest.raises(TypeError, match="^bias: expected a bool, got 'none'$"):
        cls(8, 8, rank=2, bias="none")
    with pytest.raises(TypeError, match=r"^dtype: expected None or one of \(torch.float32, .*\), got torch.complex64$"):
        cls(8, 8, rank=2, dtype=torch.complex64)
    assert cls(8, 8, rank=2, bias=False).bias is None


def test_rank_error_states_allowed_range():
    with pytest.raises(ValueError, match=r"\[1, 8\]"):
        pl.LoRALinear(12, 8, rank=9)
    # rank == min(in, out) is allowed
    assert pl.LoRALinear(12, 8, rank=8).rank == 8


@pytest.mark.parametrize("lr_ratio", [0, -2.0, float("inf")])
def test_bad_lr_ratio(lr_ratio):
    with pytest.raises(ValueError, match="lr_ratio"):
        pl.LoRAPlusLinear(8, 8, rank=2, lr_ratio=lr_ratio)
    with pytest.raises(ValueError, match="lr_ratio"):
        pl.LoRAPlusLinear.from_linear(nn.Linear(8, 8), rank=2, lr_ratio=lr_ratio)


@pytest.mark.parametrize("cls", LORA_CLASSES + [pl.DoRALinear])
@pytest.mark.parametrize("in_f, out_f, name", [(0, 4, "in_features"), (4, -1, "out_features"), (4.0, 4, "in_features")])
def test_bad_features(cls, in_f, out_f, name):
    with pytest.raises(ValueError, match=name):
        cls(in_f, out_f, rank=1)


@pytest.mark.parametrize("cls", LORA_CLASSES + [pl.DoRALinear])
@pytest.mark.parametrize("obj", [nn.Conv1d(4, 4, 1), nn.Bilinear(4, 4, 4), torch.zeros(4, 4)])
def test_from_linear_rejects_non_linear(cls, obj):
    with pytest.raises(TypeError, match="linear"):
        cls.from_linear(obj, rank=1)


@pytest.mark.parametrize("cls", LORA_CLASSES + [pl.DoRALinear])
@pytest.mark.parametrize("shape", [(3, 11), (12, 3), (13,), ()])
def test_wrong_input_last_dim(cls, shape):
    layer = cls(12, 8, rank=2)
    x = torch.randn(shape)
    with pytest.raises(ValueError, match="in_features=12") as info:
        layer(x)
    assert str(tuple(shape)) in str(info.value)
    with torch.no_grad(), pytest.raises(ValueError, match="input"):
        layer(x)


# ---- second order ---------------------------------------------------------------------------
def test_double_backward_of_the_fused_step_is_refused_with_its_remedy():
    layer = _layer(pl.LoRALinear, dtype=torch.float64)
    x = _x((3,), dtype=torch.float64)
    assert_double_backward_refused(layer, x)


@pytest.mark.parametrize("cls", [pl.LoRALinear, pl.DoRALinear])
def test_double_backward_with_a_trainable_base_is_right(cls):
    # the refusal's advice: with the base weight trainable the layer runs plain autograd ops
    layer = _layer(cls, dtype=torch.float64)
    layer.base_layer.weight.requires_grad_(True)
    x = _x((3,), dtype=torch.float64)
    y = layer(x)
    g_b, = torch.autograd.grad(y.square().sum(), layer.lora_B, create_graph=True)
    h, = torch.autograd.grad(g_b.sum(), layer.lora_A)
    a64, b64 = f64(layer.lora_A, True), f64(layer.lora_B, True)
    if cls is pl.DoRALinear:
        y_ref = dora_ref(f64(x), f64(layer.weight), f64(layer.bias), a64, b64, f64(layer.magnitude),
                         layer.scaling, layer.epsilon)
    else:
        y_ref = lora_ref(f64(x), f64(layer.weight), f64(layer.bias), a64, b64, layer.scaling)
    g_ref, = torch.autograd.grad(y_ref.square().sum(), b64, create_graph=True)
    h_ref, = torch.autograd.grad(g_ref.sum(), a64)
    assert_close64(h, h_ref, 1e-10, what="second-order gradient")


# ---- the fused training step's plumbing -----------------------------------------------------
@pytest.mark.parametrize("trans_a", [False, True])
def test_scaled_mm_ignores_its_shape_donor(trans_a):
    # the backward passes t and B as addmm's beta=0 first argument: their values must never leak in
    from peft_layers.lora import _scaled_mm

    a = torch.randn(6, 5, dtype=torch.float64)
    b = torch.randn(5 if not trans_a else 6, 4, dtype=torch.float64)
    a = a.t() if trans_a else a
    donor = torch.full((a.shape[0], 4), float("nan"), dtype=torch.float64)
    got = _scaled_mm(a, b, 2.5, shape_of=donor)
    expected = torch.einsum("ik,kj->ij", a, b) * 2.5
    assert_close64(got, expected, 1e-12, what="scaling * a @ b")


@pytest.mark.parametrize("cls", [pl.LoRALinear, pl.DoRALinear])
def test_two_dim_input_in_compute_dtype_adds_no_graph_nodes(cls):
    # reshape and cast are skipped when not needed: the output's grad_fn is the fused function
    layer = _layer(cls)
    x = torch.randn(4, 12, requires_grad=True)
    assert "Function" in type(layer(x).grad_fn).__name__
    y = layer(torch.randn(2, 4, 12, requires_grad=True))
    assert y.shape == (2, 4, 10) and "View" in type(y.grad_fn).__name__


# ---- the base weight changing between forward and backward --------------------------------
def _change_base_weight(layer, change: str) -> None:
    if change == "merge":
        layer.merge()
    else:
        with torch.no_grad():
            layer.base_layer.weight.mul_(1.5)


def _restore_base_weight(layer, change: str) -> None:
    if change == "merge":
        layer.unmerge()
    else:
        with torch.no_grad():
            layer.base_layer.weight.div_(1.5)


@pytest.mark.parametrize("cls, dropout", [(pl.LoRALinear, 0.0), (pl.LoRALinear, 0.25), (pl.DoRALinear, 0.0)])
@pytest.mark.parametrize("change", ["merge", "in-place write"])
def test_base_weight_changed_between_forward_and_backward_raises(cls, dropout, change):
    # the input gradient must not silently use the changed weight (a 0.5 relative error for
    # merge): the fused functions save a dense W0, and autograd raises, as for nn.Linear
    layer = _layer(cls, dtype=torch.float64, dropout=dropout)
    x = _x((5,), dtype=torch.float64).requires_grad_(True)
    g = torch.randn(5, 10, dtype=torch.float64)
    y = layer(x)
    assert "Function" in type(y.grad_fn).__name__  # the fused path
    _change_base_weight(layer, change)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y * g).sum().backward()
    _restore_base_weight(layer, change)
    # a normal step still gives the float64 reference gradient (eval: no dropout mask to replay)
    layer.eval()
    keys = ("x", "lora_A", "lora_B") + (("magnitude",) if cls is pl.DoRALinear else ())
    assert_run_close(run_layer(layer, x, g), run_reference(layer, x, g), RTOL[torch.float64], keys)


def test_base_weight_changed_without_input_gradient_does_not_raise():
    # without an input gradient backward never reads W0 again: the adapter's gradients are those
    # of the forward's weight, as for a frozen nn.Linear
    layer = _layer(pl.LoRALinear, dtype=torch.float64)
    x = _x((5,), dtype=torch.float64)
    g = torch.randn(5, 10, dtype=torch.float64)
    ref = run_reference(layer, x, g)
    y = layer(x)
    layer.merge()
    (y * g).sum().backward()
    for key in ("lora_A", "lora_B"):
        assert_close64(getattr(layer, key).grad, ref.grads[key], RTOL[torch.float64], what=key)


def test_float16_merge_scales_before_rounding():
    """``W0 + s B A`` over a float16 base with ``s < 1``: ``B A`` (96000) is beyond float16's
    range, ``s B A`` (6000) is not. The merge scales in float32 before the cast: a finite merged
    weight equal to the float64 merge to float16 rounding (it held inf)."""
    torch.manual_seed(0)
    layer = pl.LoRALinear.from_linear(nn.Linear(64, 32).half(), rank=16, alpha=1.0)  # s = 1/16
    with torch.no_grad():
        layer.lora_A.fill_(30.0)
        layer.lora_B.fill_(200.0)
    f64 = torch.float64
    expected = layer.weight.to(f64) + layer.scaling * layer.lora_B.to(f64) @ layer.lora_A.to(f64)
    assert_close64(layer.to_linear().weight, expected, 1e-3, what="to_linear")
    layer.merge()
    assert layer.weight.dtype == torch.float16
    assert_close64(layer.weight, expected, 1e-3, what="merged weight")


@pytest.mark.parametrize("cls", [pl.LoRALinear, pl.DoRALinear])
def test_to_linear_in_a_wider_dtype_merges_in_it(cls):
    """``to_linear(float32)`` of a bf16 layer merges in float32: the merged weight is the float64
    merge of the bf16 ``W0`` to float32 rounding, not to bf16 rounding."""
    torch.manual_seed(0)
    layer = cls.from_linear(nn.Linear(32, 16, dtype=torch.bfloat16), rank=4)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
        if cls is pl.DoRALinear:
            layer.magnitude.mul_(1.5)
    f64 = torch.float64
    w0 = layer.weight.to(f64)
    w_prime = w0 + layer.scaling * layer.lora_B.to(f64) @ layer.lora_A.to(f64)
    expected = w_prime
    if cls is pl.DoRALinear:
        expected = (layer.magnitude.to(f64) / w_prime.norm(dim=1))[:, None] * w_prime
    wide = layer.to_linear(torch.float32)
    assert wide.weight.dtype == wide.bias.dtype == torch.float32
    torch.testing.assert_close(wide.weight.to(f64), expected, rtol=1e-6, atol=1e-6)
    assert layer.to_linear().weight.dtype == torch.bfloat16  # the compute dtype by default
    with pytest.raises(ValueError, match=r"dtype: expected None or one of \(torch.float32, .*\), got torch.int8"):
        layer.to_linear(torch.int8)


# ---- hooks on the base layer run as they would without the adapter ---------------------------
def _hooked_layer(cls):
    torch.manual_seed(0)
    if cls is pl.QLoRALinear:
        layer = pl.QLoRALinear.from_linear(nn.Linear(12, 10), rank=3, alpha=6.0)
    else:
        layer = cls.from_linear(nn.Linear(12, 10), rank=3, alpha=6.0)
    randomize_adapter(layer)
    return layer


def _base_weight(layer):
    return layer.base_layer.dequantize() if isinstance(layer, pl.QLoRALinear) else layer.weight


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("replace", [True, False])
@pytest.mark.parametrize("cls", [*LORA_CLASSES, pl.QLoRALinear])
def test_hooks_on_the_base_layer_see_and_change_the_base_output(cls, replace, grad):
    """A hook on ``base_layer`` sees ``x W0^T + b`` itself (the update is not added into the tensor
    it holds), and a hook that replaces the output changes the layer's output, in training as in
    inference (HF PEFT calls its base layer too)."""
    layer = _hooked_layer(cls)
    seen = []
    factor = 2.0 if replace else 1.0

    def hook(module, args, out):
        seen.append(out)
        return 2 * out if replace else None

    layer.base_layer.register_forward_hook(hook)
    x = _x((5,)).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        y = layer(x)
    base = f64(x) @ f64(_base_weight(layer)).t() + f64(layer.bias)
    assert len(seen) == 1
    assert_close64(seen[0], base, 1e-5, what="output a base-layer hook sees")
    update = f64(x) @ f64(layer.lora_A).t() @ f64(layer.lora_B).t() * layer.scaling
    assert_close64(y, factor * base + update, 1e-5, what="output with a hook on the base")
    if grad:
        g = torch.randn(5, 10, dtype=torch.float64)
        y.backward(g.to(y.dtype))
        assert_close64(x.grad, g @ (factor * f64(_base_weight(layer)) + layer.scaling * f64(layer.lora_B) @ f64(layer.lora_A)),
                       1e-5, what="input gradient through the hook")
        assert_close64(layer.lora_B.grad, layer.scaling * g.t() @ (f64(x) @ f64(layer.lora_A).t()), 1e-5,
                       what="B gradient")


@pytest.mark.parametrize("cls", [pl.LoRALinear, pl.LoRAPlusLinear])
def test_hooked_base_path_applies_dropout_as_the_reference(cls):
    """With a hook on the base, training takes the base-calling path: its update must use the
    dropped-out input ``d`` as the fused path does."""
    p = 0.3
    layer = _layer(cls, dropout=p).train()
    seen_base = []
    layer.base_layer.register_forward_hook(lambda module, args, out: seen_base.append(out))
    x = _x((7,))
    g = torch.randn(7, 10, dtype=torch.float64)
    seen, handle = _capture_dropout(layer)
    got = run_layer(layer, x, g)
    handle.remove()
    assert len(seen) == 1 and len(seen_base) == 1  # the hooked path ran
    mask = _mask_from(seen[0], x, p).reshape(x.shape)
    ref = run_reference(layer, x, g, dropout_mask=mask, p=p)
    assert_run_close(got, ref, RTOL[torch.float32], ("x", "lora_A", "lora_B"))


class _ScaledLinear(nn.Linear):
    """An ``nn.Linear`` with a forward of its own (as scaled, clamped or low-precision linears)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("cls", LORA_CLASSES)
def test_a_linear_subclass_with_its_own_forward_is_called_in_every_mode(cls, grad):
    # the fused training step computed x W0^T + b from the weight: training and evaluation then
    # optimised and served different functions (Hugging Face PEFT calls the base layer)
    torch.manual_seed(0)
    layer = cls.from_linear(_ScaledLinear(12, 10), rank=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = _x((5,)).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        y = layer(x)
    base = 2.0 * (f64(x) @ f64(layer.weight).t() + f64(layer.bias))
    update = f64(x) @ f64(layer.lora_A).t() @ f64(layer.lora_B).t() * layer.scaling
    assert_close64(y, base + update, 1e-5, what="output over the subclass")
    if grad:
        g = torch.randn(5, 10, dtype=torch.float64)
        y.backward(g.to(y.dtype))
        expected = g @ (2.0 * f64(layer.weight) + layer.scaling * f64(layer.lora_B) @ f64(layer.lora_A))
        assert_close64(x.grad, expected, 1e-5, what="input gradient")
        assert_close64(layer.lora_A.grad, layer.scaling * (g @ f64(layer.lora_B)).t() @ f64(x), 1e-5, what="A gradient")


@pytest.mark.parametrize("cls", LORA_CLASSES)
def test_a_global_forward_hook_keeps_the_base_output_it_saw(cls):
    # the no-grad path added the update into the base output in place, under the hook's eyes
    torch.manual_seed(0)
    layer = cls.from_linear(nn.Linear(12, 10), rank=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    seen = {}
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.setdefault(id(module), out))
    x = _x((5,))
    try:
        with torch.no_grad():
            y = layer(x)
    finally:
        handle.remove()
    base = f64(x) @ f64(layer.weight).t() + f64(layer.bias)
    assert_close64(seen[id(layer.base_layer)], base, 1e-5, what="base output a global hook holds")
    assert_close64(y, base + f64(x) @ f64(layer.lora_A).t() @ f64(layer.lora_B).t() * layer.scaling, 1e-5, what="output")


@pytest.mark.parametrize("cls", [pl.LoRALinear, pl.QLoRALinear])
def test_a_global_forward_pre_hook_sees_the_base_called_without_grad(cls):
    torch.manual_seed(0)
    layer = cls.from_linear(nn.Linear(64, 10), rank=2).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    seen = []
    handle = nn.modules.module.register_module_forward_pre_hook(lambda module, args: seen.append(module))
    x = _x((5,), in_f=64)
    try:
        with torch.no_grad():
            y = layer(x)
    finally:
        handle.remove()
    assert [type(m) for m in seen] == [cls, type(layer.base_layer)]
    with torch.no_grad():
        expected = f64(layer.base_layer(x)) + f64(x) @ f64(layer.lora_A).t() @ f64(layer.lora_B).t() * layer.scaling
    assert_close64(y, expected, 1e-5, what="output")


@pytest.mark.parametrize("grad", [False, True], ids=["no grad", "training"])
@pytest.mark.parametrize("cls", [pl.LoRALinear, pl.QLoRALinear])
def test_a_forward_replaced_on_the_base_instance_runs(cls, grad):
    # accelerate's add_hook_to_module replaces module.forward on the instance; the adapter layer
    # must call the base then, not compute x W0^T + b from its weight
    torch.manual_seed(0)
    layer = cls.from_linear(nn.Linear(64, 10), rank=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    base = layer.base_layer
    original = base.forward
    base.forward = lambda x: original(x) * 2.0
    x = _x((5,), in_f=64)
    with torch.set_grad_enabled(grad):
        y = layer(x)
        doubled = f64(base(x))
    expected = doubled + f64(x) @ f64(layer.lora_A).t() @ f64(layer.lora_B).t() * layer.scaling
    assert_close64(y, expected, 1e-5, what="output")


@pytest.mark.parametrize("grad", [False, True], ids=["no grad", "training"])
@pytest.mark.parametrize("cls", [pl.LoRALinear, pl.DoRALinear])
def test_half_precision_scaling_does_not_overflow_before_the_product(cls, grad):
    # s (x A^T) = 32 * 3000 is past float16's 65504, s (x A^T) B^T = 0 is not: s must ride in the
    # GEMM, not scale x A^T on its own (inf * 0 = NaN)
    torch.manual_seed(0)
    base = nn.Linear(64, 32, bias=False).half()
    layer = cls.from_linear(base, rank=8, alpha=256.0)  # s = 32, B = 0
    with torch.no_grad():
        layer.lora_A.zero_()
        layer.lora_A[:, 0] = 1.0
    x = torch.zeros(2, 64, dtype=torch.float16)
    x[:, 0] = 3000.0
    with torch.set_grad_enabled(grad):
        y = layer(x)
    expected = f64(x) @ f64(base.weight).t()
    if cls is pl.DoRALinear:  # m = ||W0|| per row and B = 0: the gain is 1 up to the norm's rounding
        expected = expected * (f64(layer.magnitude) / f64(base.weight).norm(dim=1))
    assert torch.isfinite(y).all()
    assert_close64(y, expected, 2e-3, what="float16 output")


def test_dora_over_a_linear_subclass_with_its_own_forward_says_what_it_computes():
    with pytest.warns(UserWarning, match=r"^DoRALinear: base_layer is a test_lora._ScaledLinear, an nn.Linear with a forward of its own"):
        pl.DoRALinear.from_linear(_ScaledLinear(12, 10), rank=2)
    # a quantized base keeps the weight, not the forward; merging folds into the weight only
    with pytest.warns(UserWarning, match=r"^quant: test_lora._ScaledLinear is an nn.Linear with a forward of its own"):
        pl.QLoRALinear.from_linear(_ScaledLinear(64, 10), rank=2)
    layer = pl.LoRALinear.from_linear(_ScaledLinear(12, 10), rank=2)
    for call, run in (("to_linear", layer.to_linear), ("merge", layer.merge)):
        with pytest.warns(UserWarning, match=rf"^{call}\(\): base_layer is a test_lora._ScaledLinear"):
            run()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain nn.Linear and a subclass without its own forward
        pl.DoRALinear.from_linear(nn.Linear(12, 10), rank=2)
        pl.DoRALinear.from_linear(type("Plain", (nn.Linear,), {})(12, 10), rank=2)


def test_a_base_whose_output_is_not_a_linear_ones_is_named():
    # a router returning (scores, logits) under "all-linear": a bare tuple + Tensor TypeError before
    class Router(nn.Linear):
        def forward(self, x):
            logits = super().forward(x)
            return logits.softmax(-1), logits

    layer = pl.LoRALinear.from_linear(Router(12, 10), rank=2)
    with pytest.raises(TypeError, match=r"^LoRALinear: its base_layer, a Router, returned tuple for an input of shape \(5, 12\), not the \(5, 10\).*exclude="):
        layer(_x((5,)))
    layer.adapter_enabled = False  # the layer is its base: it returns what the base returns
    x = _x((5,))
    scores, logits = layer(x)
    torch.testing.assert_close(logits, layer.base_layer(x)[1])


def test_falcons_linear_computes_x_w_plus_b_and_takes_the_fused_path():
    # FalconLinear overrides forward with exactly x W^T + b: no warnings, the fused step, the same numbers
    falcon = pytest.importorskip("transformers.models.falcon.modeling_falcon")
    torch.manual_seed(0)
    base = falcon.FalconLinear(12, 10)
    assert not overrides_linear_forward(base) and overrides_linear_forward(_ScaledLinear(12, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = pl.DoRALinear.from_linear(base, rank=2).eval()
        with torch.no_grad():
            layer.lora_B.normal_()
            x = _x((5,))
            y = layer(x)
            layer.merge()
            torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_attributes_that_shape_the_adapter_are_checked_when_set():
    # rank was a plain attribute: changed between merge and unmerge it corrupted W0; a bad init
    # fell through to PiSSA in reset_parameters; a negative lr_ratio made B ascend its gradient
    layer = pl.LoRAPlusLinear(12, 10, rank=2)
    with pytest.raises(AttributeError, match=r"^rank: fixed at construction \(2: A is"):
        layer.rank = 4
    with pytest.raises(ValueError, match=r"^init: expected one of \('kaiming', 'gaussian', 'pissa'\), got 'Gaussian'"):
        layer.init = "Gaussian"
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match=r"^lr_ratio: expected a finite number > 0"):
            layer.lr_ratio = bad
    assert (layer.rank, layer.init, layer.lr_ratio) == (2, "kaiming", 16.0)
    layer.init, layer.lr_ratio = "gaussian", 4
    assert layer.param_groups(1e-3)[1]["lr"] == pytest.approx(4e-3)


def test_a_hook_recomputing_the_base_weight_is_followed_in_training():
    """The deprecated, hook-based ``torch.nn.utils.weight_norm`` recomputes ``weight`` in a forward
    pre-hook: the training forward must use the recomputed weight, as the no-grad one does."""
    torch.manual_seed(0)
    linear = nn.Linear(12, 10)
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(linear)
    layer = pl.LoRALinear.from_linear(linear, rank=3, alpha=6.0)  # freezes weight_g and weight_v
    randomize_adapter(layer)
    with torch.no_grad():
        layer.base_layer.weight_g.mul_(1.5)
    x = _x((5,))
    y = layer(x)
    weight = torch._weight_norm(f64(layer.base_layer.weight_v), f64(layer.base_layer.weight_g), 0)
    assert_close64(y, lora_ref(f64(x), weight, f64(layer.bias), f64(layer.lora_A), f64(layer.lora_B), layer.scaling),
                   1e-5, what="training forward over a weight-normed base")
    with torch.no_grad():
        assert_close64(layer(x), y.detach(), 1e-6, what="no-grad forward over a weight-normed base")


@pytest.mark.filterwarnings("ignore:DoRALinear. base_layer has hooks:UserWarning")  # tested in test_dora.py
@pytest.mark.parametrize("kind", ["parametrization", "hook"])
@pytest.mark.parametrize("cls", [pl.LoRALinear, pl.DoRALinear])
def test_a_computed_base_weight_refuses_writes_and_to_linear_merges(cls, kind):
    """A parametrized or hook-normed base recomputes ``weight`` on every forward, so a merge (or a
    PiSSA residual) written into it would be lost: refused; ``to_linear`` gives the merged copy."""
    def computed() -> nn.Linear:
        torch.manual_seed(0)
        linear = nn.Linear(12, 10)
        if kind == "parametrization":
            return torch.nn.utils.parametrizations.weight_norm(linear)
        with pytest.warns(FutureWarning):
            return torch.nn.utils.weight_norm(linear)

    model = nn.Sequential(cls.from_linear(computed(), rank=3))
    layer = model[0]
    randomize_adapter(layer)
    x = _x((5,))
    with torch.no_grad():
        expected = layer(x)
    message = r"base_layer.weight is computed \(a parametrization, or a hook-based weight_norm or pruning\)"
    with pytest.raises(ValueError, match=r"^merge\(\): " + message):
        layer.merge()
    with pytest.raises(ValueError, match=r"^merge_adapters\(\): '0': " + message):
        pl.merge_adapters(model)
    assert not layer.merged
    with pytest.raises(ValueError, match=message):
        cls.from_linear(computed(), rank=3, init="pissa")
    with torch.no_grad():
        torch.testing.assert_close(layer.to_linear()(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_unload_asks_every_merged_layer_before_unmerging_any():
    """A merged layer whose base weight became computed after the merge (pruning registered
    then) cannot unmerge: unload unmerged the layers before it, then raised, leaving them
    unmerged inside a model that still held its adapter layers."""
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    pl.inject_adapters(model, ["0", "2"], rank=2)
    for index in (0, 2):
        randomize_adapter(model[index])
    pl.merge_adapters(model)
    prune.identity(model[2].base_layer, "weight")
    merged = model[0].base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"^unload\(\): base_layer.weight is computed"):
        pl.unload(model)
    assert model[0].merged and model[2].merged and isinstance(model[0], pl.LoRALinear)
    assert torch.equal(model[0].base_layer.weight, merged)


@pytest.mark.parametrize("cls", [*LORA_CLASSES, pl.QLoRALinear])
def test_a_hooked_base_sees_the_input_shape_in_every_mode(cls):
    """Per-sequence activation capture: the base layer gets ``x`` as it came, (2, 3, in), whether
    the adapter is on, off or merged, and the adapted output is the reference's."""
    layer = _hooked_layer(cls)
    shapes = []
    layer.base_layer.register_forward_hook(lambda module, args, out: shapes.append((args[0].shape, out.shape)))
    x = _x((2, 3))
    y = layer(x)
    update = f64(x) @ f64(layer.lora_A).t() @ f64(layer.lora_B).t() * layer.scaling
    assert_close64(y, f64(x) @ f64(_base_weight(layer)).t() + f64(layer.bias) + update, 1e-5, what="3-D output")
    with layer.disable_adapter():
        layer(x)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a quantized merge requantizes
        layer.merge()
        layer(x)
    assert shapes == [((2, 3, 12), (2, 3, 10))] * 3


@pytest.mark.parametrize("kind", ["backward", "backward_pre"])
def test_a_backward_hook_on_the_base_runs_once_per_backward(kind):
    """A backward-only hook counts as a hook of the base: the layer calls the base module, so the
    hook runs (the fused step, which reads the weight, would skip it)."""
    linear = nn.Linear(8, 8)
    calls = []
    register = linear.register_full_backward_hook if kind == "backward" else linear.register_full_backward_pre_hook
    register(lambda module, *grads: calls.append(module))
    layer = pl.LoRALinear.from_linear(linear, rank=2)
    layer(torch.randn(3, 8, requires_grad=True)).sum().backward()
    assert calls == [linear]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("merge", ["merge", "to_linear", "merge_and_unload"])
@pytest.mark.parametrize("cls", [pl.LoRALinear, pl.DoRALinear])
def test_16_bit_merge_is_the_float64_merge_rounded_once(cls, merge, dtype):
    """fp32 adapters over a 16-bit ``W0``: the merge runs in float32 and meets the 16-bit dtype
    once, when stored, as Hugging Face PEFT's does, so the merged weight is the float64 merge
    correctly rounded: ``|merged - exact| <= u |exact|`` (``u`` = 2^-8 for bf16, 2^-11 for
    float16), up to float32 noise. Rounding ``s B A`` (and DoRA's ``W'`` before its scaling) to
    16 bits first was off by up to ``u (|exact| + |s B A|)``, and broke this bound."""
    torch.manual_seed(0)
    layer = cls.from_linear(nn.Linear(64, 32, dtype=dtype), rank=8, alpha=16.0)
    with torch.no_grad():
        layer.lora_A.normal_(0, 0.1)
        layer.lora_B.normal_(0, 0.3)  # an update as large as W0
        if cls is pl.DoRALinear:
            layer.magnitude.mul_(torch.linspace(0.5, 2.0, 32))
    w0, a, b = f64(layer.weight), f64(layer.lora_A), f64(layer.lora_B)
    exact = w0 + layer.scaling * b @ a
    plain_size = w0.abs() + layer.scaling * b.abs() @ a.abs()  # float32 noise scales with this
    if cls is pl.DoRALinear:
        gain = f64(layer.magnitude) / direct_row_norm(w0, a, b, layer.scaling, layer.epsilon)
        exact, plain_size = gain[:, None] * exact, gain[:, None] * plain_size
    if merge == "merge":
        layer.merge()
        merged = layer.weight
    elif merge == "to_linear":
        merged = layer.to_linear().weight
    else:
        merged = pl.merge_and_unload(nn.Sequential(layer))[0].weight
    assert merged.dtype == dtype
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    bound = u * exact.abs() + 64 * torch.finfo(torch.float32).eps * plain_size
    err = (f64(merged) - exact).abs()
    assert torch.all(err <= bound), float((err / bound).max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16_bit_pissa_residual_is_rounded_once(dtype):
    """PiSSA over a 16-bit ``W0`` computes the residual ``W0 - s B A`` in float32 and rounds it
    once, as Hugging Face PEFT does (rounding ``s B A`` to 16 bits first rounded twice)."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, dtype=dtype)
    w0 = f64(linear.weight)
    layer = pl.LoRALinear.from_linear(linear, rank=8, alpha=16.0, init="pissa")
    product = layer.scaling * f64(layer.lora_B) @ f64(layer.lora_A)
    residual = w0 - product
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    bound = u * residual.abs() + 64 * torch.finfo(torch.float32).eps * (w0.abs() + product.abs())
    err = (f64(layer.weight) - residual).abs()
    assert torch.all(err <= bound), float((err / bound).max())


def test_pissa_over_a_rank_above_the_layers_bound_is_refused_by_name() -> None:
    # a layer built under ranks_above_features_allowed() (loading, "all-linear") may hold such a
    # rank; PiSSA's split needs that many singular vectors and must say so, changing nothing
    linear = nn.Linear(6, 3)
    weight = linear.weight.detach().clone()
    with ranks_above_features_allowed():
        with pytest.raises(ValueError, match=r"^init='pissa': the split takes rank=5 singular vectors .* = 3$"):
            pl.LoRALinear.from_linear(linear, rank=5, init="pissa")
        layer = pl.LoRALinear.from_linear(linear, rank=5)
    layer.init = "pissa"
    with pytest.raises(ValueError, match=r"^init='pissa'"):
        layer.reset_adapter_parameters()
    assert torch.equal(layer.weight, weight) and torch.equal(linear.weight, weight)
