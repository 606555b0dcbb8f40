"""DoRALinear against the float64 reference of tests/reference.py, its factored norm, its memory."""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from reference import (
    F64,
    assert_close64,
    assert_run_close,
    direct_row_norm,
    dora_ref,
    dora_ref_merged_form,
    f64,
    factored_error_bound,
    randomize_adapter,
    run_layer,
    run_reference,
    assert_double_backward_refused,
)
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import peft_layers as pl
from peft_layers import dora as dora_module
from peft_layers.dora import base_norm_terms, factored_row_norm

LEADING = [(), (5,), (2, 3)]
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
EPS32 = torch.finfo(torch.float32).eps
DORA_GRADS = ("x", "lora_A", "lora_B", "magnitude")


def _layer(in_f=12, out_f=10, dtype=torch.float32, **kw) -> pl.DoRALinear:
    kw.setdefault("rank", 3)
    kw.setdefault("alpha", 6.0)
    layer = pl.DoRALinear(in_f, out_f, dtype=dtype, **kw)
    randomize_adapter(layer)
    return layer


def _x(leading, in_f=12, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*leading, in_f, dtype=torch.float64).to(dtype)


def _ref_no_grad(layer, x):
    return dora_ref(f64(x), f64(layer.weight), f64(layer.bias), f64(layer.lora_A), f64(layer.lora_B),
                    f64(layer.magnitude), layer.scaling, layer.epsilon)


# ---- the reference itself: its two forms agree (guards the tests against a wrong reference) ---
def test_reference_forms_agree():
    layer = _layer()
    x = f64(_x((4,)))
    args = (f64(layer.weight), f64(layer.bias), f64(layer.lora_A), f64(layer.lora_B), f64(layer.magnitude),
            layer.scaling, layer.epsilon)
    torch.testing.assert_close(dora_ref(x, *args), dora_ref_merged_form(x, *args), rtol=1e-13, atol=1e-13)


# ---- forward and gradients ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("leading", LEADING)
def test_train_forward_and_grads_match_reference(dtype, bias, leading):
    layer = _layer(dtype=dtype, bias=bias)
    x = _x(leading, dtype=dtype)
    g = torch.randn(*leading, 10, dtype=torch.float64)
    got = run_layer(layer, x, g)
    assert got.out.dtype == dtype and got.out.shape == (*leading, 10)
    assert_run_close(got, run_reference(layer, x, g), RTOL[dtype], DORA_GRADS)
    assert got.grads["weight"] is None and got.grads["bias"] is None
    assert got.grads["magnitude"].dtype == layer.magnitude.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trainable_bias_gets_reference_gradient(dtype):
    layer = _layer(dtype=dtype)
    layer.base_layer.bias.requires_grad_(True)
    x = _x((4, 3), dtype=dtype)
    g = torch.randn(4, 3, 10, dtype=torch.float64)
    assert_run_close(run_layer(layer, x, g), run_reference(layer, x, g), RTOL[dtype], DORA_GRADS + ("bias",))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("leading", LEADING)
def test_no_grad_forward_matches_reference(dtype, bias, leading):
    layer = _layer(dtype=dtype, bias=bias)
    x = _x(leading, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == dtype and y.shape == (*leading, 10)
    assert_close64(y, _ref_no_grad(layer, x), RTOL[dtype], what="no-grad output")


def test_grad_of_magnitude_only():
    """A, B frozen by the user: only m trains, and its gradient still matches."""
    layer = _layer()
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)
    x = _x((6,))
    got = run_layer(layer, x)
    assert got.grads["lora_A"] is None and got.grads["lora_B"] is None
    assert_run_close(got, run_reference(layer, x), 1e-5, ("x", "magnitude"))


# ---- dropout: the same mask in layer and reference ------------------------------------------
def _capture_dropout(layer):
    seen: list[torch.Tensor] = []
    handle = layer.lora_dropout.register_forward_hook(lambda mod, inp, out: seen.append(out.detach().clone()))
    return seen, handle


def _mask_from(d, x, p):
    mask = (d != 0).to(torch.float64)
    assert 0 < mask.mean() < 1
    assert_close64(d, f64(x).reshape(d.shape) * mask / (1 - p), 1e-6, what="captured dropout")
    return mask.reshape(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("leading", [(7,), (2, 4)])
@pytest.mark.parametrize("grad", [True, False])
def test_dropout_train_matches_reference_with_same_mask(dtype, leading, grad):
    p = 0.3
    layer = _layer(dtype=dtype, dropout=p).train()
    x = _x(leading, dtype=dtype)
    g = torch.randn(*leading, 10, dtype=torch.float64)
    seen, handle = _capture_dropout(layer)
    if grad:
        got = run_layer(layer, x, g)
    else:
        with torch.no_grad():
            out = layer(x)
    handle.remove()
    assert len(seen) == 1
    mask = _mask_from(seen[0], x, p)
    ref = run_reference(layer, x, g, dropout_mask=mask, p=p)
    if grad:
        assert_run_close(got, ref, RTOL[dtype], DORA_GRADS)
    else:
        assert_close64(out, ref.out, RTOL[dtype], what="no-grad dropout output")


class _FixedMaskDropout(nn.Module):
    """Stands in for ``nn.Dropout(p)`` with a stored mask (the other way to pin the mask)."""

    def __init__(self, mask: torch.Tensor, p: float) -> None:
        super().__init__()
        self.p = p
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(x.dtype) / (1 - self.p)


def test_dropout_with_stored_mask_matches_reference():
    p = 0.5
    layer = _layer(dropout=p).train()
    x = _x((8,))
    mask = (torch.rand(8, 12) > p).to(torch.float32)
    layer.lora_dropout = _FixedMaskDropout(mask, p)
    g = torch.randn(8, 10, dtype=torch.float64)
    got = run_layer(layer, x, g)
    assert_run_close(got, run_reference(layer, x, g, dropout_mask=mask, p=p), 1e-5, DORA_GRADS)
    # the mask matters: the dropout form differs from the no-dropout output
    assert not torch.allclose(got.out.double(), run_reference(layer, x, g).out, rtol=1e-3)


# ---- half precision ------------------------------------------------------------------------
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad", [True, False])
def test_half_input_into_fp32_layer(half, grad):
    layer = _layer()
    x = _x((4, 3), dtype=half)
    g = torch.randn(4, 3, 10, dtype=torch.float64)
    if grad:
        got = run_layer(layer, x, g)
        assert got.grads["x"].dtype == half
        assert got.grads["magnitude"].dtype == torch.float32
        assert_run_close(got, run_reference(layer, x, g), 1e-2, DORA_GRADS)
        out = got.out
    else:
        with torch.no_grad():
            out = layer(x)
        assert_close64(out, _ref_no_grad(layer, x), 1e-2, what="half no-grad output")
    assert out.dtype == half


def test_bf16_base_trains_fp32_adapters():
    base = nn.Linear(16, 12, dtype=torch.bfloat16)
    layer = pl.DoRALinear.from_linear(base, rank=4, alpha=8.0)
    assert layer.weight is base.weight
    for p in layer.adapter_parameters():
        assert p.dtype == torch.float32
    # m starts at ||W0|| per row (of the bf16 values)
    assert_close64(layer.magnitude, f64(base.weight).norm(dim=1), 1e-5, what="magnitude init")
    randomize_adapter(layer)
    x = _x((5,), in_f=16, dtype=torch.bfloat16)
    g = torch.randn(5, 12, dtype=torch.float64)
    got = run_layer(layer, x, g)
    assert got.out.dtype == torch.bfloat16
    for key in ("lora_A", "lora_B", "magnitude"):
        assert got.grads[key].dtype == torch.float32, key
    assert_run_close(got, run_reference(layer, x, g), 3e-2, DORA_GRADS)


# ---- the norm: factored == direct --------------------------------------------------------------
def _factored(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, eps: float = 0.0) -> torch.Tensor:
    """``factored_row_norm`` fed as the layer feeds it (``base_norm_terms``): ||W0||^2 and A W0^T
    in fp32 (fp64), a 16-bit W0 cast up a block of rows at a time."""
    norm_dtype = torch.promote_types(w0.dtype, torch.float32)
    cached = torch.linalg.vector_norm(w0, dim=1, dtype=norm_dtype).square()
    row_norm_sq, a_w0t = base_norm_terms(w0, a, cached)
    return factored_row_norm(row_norm_sq, a, b, a_w0t, s, eps)


@given(in_f=st.integers(1, 40), out_f=st.integers(1, 40), rank=st.integers(1, 8),
       s=st.floats(0.05, 8.0), seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_factored_norm_equals_direct_norm(in_f, out_f, rank, s, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out_f, in_f, generator=gen, dtype=F64).to(dtype)
    a = torch.randn(rank, in_f, generator=gen, dtype=F64).to(dtype)
    b = torch.randn(out_f, rank, generator=gen, dtype=F64).to(dtype)
    n = _factored(w0, a, b, s)
    assert n.dtype == dtype
    n_ref = direct_row_norm(w0, a, b, s)
    err_sq = (n.double().square() - n_ref.square()).abs()
    assert torch.all(err_sq <= factored_error_bound(w0, a, b, s))
    # rows far from cancelling (most random rows) agree to the dtype's precision
    fine = n_ref.square() > 0.1 * (f64(w0).square().sum(1) + (s * f64(b) @ f64(a)).square().sum(1))
    assert_close64(n[fine], n_ref[fine], 1e-5 if dtype == torch.float32 else 1e-12,
                   what="factored vs direct norm")


@given(in_f=st.integers(2, 64), out_f=st.integers(2, 24), rank=st.integers(1, 6), s=st.floats(0.1, 4.0),
       residual=st.sampled_from([0.0, 1e-6, 1e-3, 1e-1]), seed=st.integers(0, 2**16))
def test_factored_norm_near_cancelling_rows(in_f, out_f, rank, s, residual, seed):
    """Rows with ``s B_i A ~ -W0_i``: the factored n^2 stays within eps32 * ||W0_i||^2 (decisions.md)."""
    rank = min(rank, in_f, out_f)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, in_f, generator=gen, dtype=F64)
    b = torch.randn(out_f, rank, generator=gen, dtype=F64)
    w0 = torch.randn(out_f, in_f, generator=gen, dtype=F64)
    cancel = torch.arange(out_f) % 2 == 0
    noise = torch.randn(out_f, in_f, generator=gen, dtype=F64)
    w0[cancel] = -s * (b @ a)[cancel] + residual * noise[cancel]
    w0, a, b = w0.float(), a.float(), b.float()

    n = _factored(w0, a, b, s).double()
    n_ref = direct_row_norm(w0, a, b, s)  # exact W' of the fp32 values, in float64
    tol_sq = factored_error_bound(w0, a, b, s)
    err_sq = (n.square() - n_ref.square()).abs()
    assert torch.all(err_sq <= tol_sq), (err_sq / tol_sq).max()
    assert torch.all(torch.isfinite(n)) and torch.all(n >= 0)
    # rows that do not cancel (by construction or by chance) keep full relative precision
    fine = ~cancel & (n_ref.square() > 0.1 * (f64(w0).square().sum(1) + (s * f64(b) @ f64(a)).square().sum(1)))
    assert_close64(n[fine], n_ref[fine], 1e-5, what="non-cancelling rows")


@given(in_f=st.integers(2, 64), out_f=st.integers(2, 24), rank=st.integers(2, 6), s=st.floats(0.5, 4.0),
       spread=st.sampled_from([1e-4, 1e-2, 1e-1]), seed=st.integers(0, 2**16))
def test_factored_norm_with_nearly_dependent_rows_of_A(in_f, out_f, rank, s, spread, seed):
    """A's rows nearly parallel and an update larger than W0: the summands of the quadratic term,
    ``s^2 B_ik (B A A^T)_ik``, are far larger than ``s^2 ||B_i A||^2``. Summed in float64, n^2
    keeps only the rounding of its float32 inputs (||W0_i||^2 and A W0^T): no term in |B| |A| |A| |B|."""
    rank = min(rank, in_f)
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(1, in_f, generator=gen, dtype=F64)
    a = torch.randn(rank, 1, generator=gen, dtype=F64) * direction + spread * torch.randn(rank, in_f, generator=gen, dtype=F64)
    b = 3 * torch.randn(out_f, rank, generator=gen, dtype=F64)
    w0 = 0.1 * torch.randn(out_f, in_f, generator=gen, dtype=F64)
    w0, a, b = w0.float(), a.float(), b.float()

    n_ref = direct_row_norm(w0, a, b, s)  # exact W' of the fp32 values, in float64
    err_sq = (_factored(w0, a, b, s).double().square() - n_ref.square()).abs()
    eps = torch.finfo(torch.float32).eps
    aa, ba, wa = f64(a).abs(), f64(b).abs(), f64(w0).abs()
    inputs = wa.square().sum(1) + 2 * s * (ba * (aa @ wa.T).T).sum(1)  # what rounds in float32
    bound = (in_f + 2) * eps * inputs + 3 * eps * n_ref.square()  # and n itself, rounded to float32
    assert torch.all(err_sq <= bound), (err_sq / bound).max()


@given(in_f=st.integers(2, 48), out_f=st.integers(2, 24), rank=st.integers(1, 6), s=st.floats(0.1, 4.0),
       seed=st.integers(0, 2**16))
def test_factored_norm_bf16_inputs(in_f, out_f, rank, s, seed):
    """bf16 W0/A/B: the norm is taken in fp32 of the bf16 values, A W0^T included (rounded to
    bf16, it would carry 2^-8 of the cross term into n^2)."""
    rank = min(rank, in_f, out_f)
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out_f, in_f, generator=gen).bfloat16()
    a = torch.randn(rank, in_f, generator=gen).bfloat16()
    b = torch.randn(out_f, rank, generator=gen).bfloat16()
    n = _factored(w0, a, b, s)
    assert n.dtype == torch.float32  # fp32 norm whatever the compute dtype
    n_ref = direct_row_norm(w0, a, b, s)
    # error budget: float32 sums of the bf16 values (in + 2 roundings per entry of A W0^T), plus fp32
    cross = 2 * s * (f64(b).abs() * (f64(a).abs() @ f64(w0).abs().T).T).sum(1)
    tol_sq = (in_f + 2) * EPS32 * cross + 16 * EPS32 * (
        f64(w0).square().sum(1) + (s * f64(b) @ f64(a)).square().sum(1)
    )
    err_sq = (n.double().square() - n_ref.square()).abs()
    assert torch.all(err_sq <= tol_sq), (err_sq / tol_sq).max()


def test_bf16_layer_weight_norm_matches_direct_norm():
    base = nn.Linear(48, 20, dtype=torch.bfloat16)
    layer = pl.DoRALinear.from_linear(base, rank=4, alpha=4.0)
    randomize_adapter(layer)
    # the layer computes in bf16: its W' is W0 + s bf16(B) bf16(A)
    a, b = layer.lora_A.detach().bfloat16(), layer.lora_B.detach().bfloat16()
    n_ref = direct_row_norm(base.weight, a, b, layer.scaling)
    assert layer.weight_norm().dtype == torch.float32
    assert_close64(layer.weight_norm(), n_ref, 1e-5, what="bf16 layer norm")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["weight_norm", "train", "eval", "dropout"])
def test_half_precision_norm_of_cancelling_rows_has_float32_accuracy(dtype, path, monkeypatch):
    """A 16-bit ``W0`` enters the norm cast to float32 a block of rows at a time (blocks of 3
    rows here), ``A W0^T`` and ``||W0||^2`` alike: a row where ``W0 + s B A`` cancels to 1-10%
    of ``||W0||`` keeps the float32 bound of the factored form, in every path that computes
    ``n``. With ``A W0^T`` rounded to 16 bits, ``n^2`` carried ``eps16 ||W0||^2``: n was off by
    up to 100% at 1% and clamped to epsilon (outputs off by 1e6) below."""
    monkeypatch.setattr(dora_module, "NORM_BLOCK_ELEMENTS", 3 * 64)
    torch.manual_seed(0)
    rank, out_f = 4, 10
    a = torch.randn(rank, 64) / 8
    c = torch.randn(out_f, rank)
    layer = pl.DoRALinear.from_linear(nn.Linear(64, out_f, bias=False).to(dtype), rank=rank, alpha=rank,
                                      dropout=0.1 if path == "dropout" else 0.0)
    residual = torch.logspace(0, -2, out_f)  # ||W'_i|| / ||W0_i|| from 1 down to about 1e-2
    with torch.no_grad():
        layer.base_layer.weight.copy_((c @ a).to(dtype))
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(-(1 - residual)[:, None] * c)  # s = 1: W' = residual * C A, and rounding
        layer.magnitude.fill_(1.0)
    w0 = layer.weight.detach()
    a16, b16 = layer.lora_A.detach().to(dtype), layer.lora_B.detach().to(dtype)  # as the forward rounds them
    n_ref = direct_row_norm(w0, a16, b16, layer.scaling)
    bound_sq = factored_error_bound(w0.float(), a16.float(), b16.float(), layer.scaling)
    norms = []
    original = dora_module.factored_row_norm
    monkeypatch.setattr(dora_module, "factored_row_norm", lambda *args: norms.append(original(*args)) or norms[-1])
    x = torch.randn(5, 64).to(dtype)
    if path == "weight_norm":
        layer.weight_norm()
    elif path == "eval":
        with torch.no_grad():
            layer.eval()(x)
    else:
        layer.train()(x.requires_grad_(True)).float().sum().backward()
    assert len(norms) == 1
    err_sq = (norms[0].double().square() - n_ref.square()).abs()
    assert torch.all(err_sq <= bound_sq), (err_sq / bound_sq).max()
    assert torch.all(n_ref[-1] < 0.02 * f64(w0[-1]).norm())  # the last row does cancel


@pytest.mark.parametrize("path", ["train", "eval", "dropout", "merge"])
def test_bf16_gain_near_one_is_not_rounded_to_bf16(path):
    """The gain ``m / n`` reaches a bfloat16 output without being rounded to bfloat16 itself,
    whose step above 1 is 2^-7: rounded, gains in [1, 1.0039) act as 1 and the rest move by up
    to 2^-8, the same for the whole row. Measured as each row's systematic relative error (the
    least-squares slope of the error on the float64 output): its mean over rows was 1.7e-3 with
    the gain rounded (about 2^-9, as a uniform rounding error gives), 4e-4 to 6.5e-4 now."""
    torch.manual_seed(0)
    out_f, in_f = 128, 256
    layer = pl.DoRALinear.from_linear(nn.Linear(in_f, out_f).to(torch.bfloat16), rank=8, alpha=16.0,
                                      dropout=0.1 if path == "dropout" else 0.0)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.01)
        layer.magnitude.copy_(layer.weight_norm() * (1 + 0.01 * torch.rand(out_f)))  # gains in [1, 1.01)
    x = torch.randn(1024, in_f).to(torch.bfloat16)
    w0, a, b = f64(layer.weight), f64(layer.lora_A), f64(layer.lora_B)
    w_adapted = w0 + layer.scaling * b @ a
    gain = f64(layer.magnitude) / w_adapted.norm(dim=1)
    expected = (f64(x) @ w_adapted.t()) * gain + f64(layer.bias)
    if path == "dropout":
        torch.manual_seed(1)
        out = layer.train()(x)
        torch.manual_seed(1)
        d = f64(layer.lora_dropout(x))  # the same mask
        expected = (f64(x) @ w0.t() + (gain - 1) * (d @ w0.t()) + gain * layer.scaling * (d @ a.t() @ b.t())
                    + f64(layer.bias))
    elif path == "train":
        out = layer.train()(x.requires_grad_(True))
    else:
        if path == "merge":
            layer.merge()
        with torch.no_grad():
            out = layer.eval()(x)
    error = f64(out) - expected
    row_bias = (error * expected).sum(0) / expected.square().sum(0)
    assert row_bias.abs().mean() < 2**-10, row_bias.abs().mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_norm_and_magnitude_init(dtype):
    layer = pl.DoRALinear(30, 20, rank=4, dtype=dtype)
    assert layer.magnitude.shape == (20,) and layer.magnitude.dtype == dtype
    assert_close64(layer.magnitude, f64(layer.weight).norm(dim=1), RTOL[dtype], what="m = ||W0||")
    randomize_adapter(layer)
    n = layer.weight_norm()
    assert not n.requires_grad
    assert_close64(n, direct_row_norm(layer.weight, layer.lora_A, layer.lora_B, layer.scaling),
                   RTOL[dtype], what="weight_norm()")


# ---- the cached ||W0||^2 follows the base weight --------------------------------------------
def _assert_norm_follows_base(layer):
    randomize_adapter(layer)
    x = _x((3,), in_f=layer.in_features)
    with torch.no_grad():
        assert_close64(layer(x), _ref_no_grad(layer, x), 1e-5, what="output after base change")
    assert_close64(layer.weight_norm(), direct_row_norm(layer.weight, layer.lora_A, layer.lora_B, layer.scaling),
                   1e-5, what="norm after base change")


def test_norm_cache_refreshes_on_in_place_change():
    layer = _layer()
    layer.weight_norm()
    with torch.no_grad():
        layer.base_layer.weight.mul_(3.0)
    _assert_norm_follows_base(layer)


def test_norm_cache_refreshes_on_load_state_dict():
    layer = _layer()
    layer.weight_norm()
    state = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    state["weight"] = torch.randn_like(state["weight"])
    layer.base_layer.load_state_dict(state)
    _assert_norm_follows_base(layer)


def test_norm_cache_refreshes_on_replaced_parameter():
    layer = _layer()
    layer.weight_norm()
    layer.base_layer.weight = nn.Parameter(torch.randn(10, 12), requires_grad=False)
    _assert_norm_follows_base(layer)


def test_write_through_data_needs_reset_norm_cache():
    # .data writes bypass autograd's version counter, so no cheap key sees them (documented):
    # the cache stays stale until reset_norm_cache(), then follows the base again
    layer = _layer()
    stale = layer.base_row_norm_sq().clone()
    layer.base_layer.weight.data.copy_(torch.randn(10, 12))
    assert torch.equal(layer.base_row_norm_sq(), stale)
    layer.reset_norm_cache()
    _assert_norm_follows_base(layer)


# ---- a fresh layer equals its base ----------------------------------------------------------
@given(in_f=st.integers(1, 24), out_f=st.integers(1, 24), rank=st.integers(1, 24),
       init=st.sampled_from(["kaiming", "gaussian"]), bias=st.booleans(), grad=st.booleans(),
       leading=st.sampled_from([(), (1,), (4,), (2, 3)]))
def test_fresh_layer_equals_base(in_f, out_f, rank, init, bias, grad, leading):
    rank = min(rank, in_f, out_f)
    layer = pl.DoRALinear(in_f, out_f, rank=rank, init=init, bias=bias)
    x = torch.randn(*leading, in_f, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        y = layer(x)
        # m = n exactly (same factored computation), so the gain is exactly 1 and B = 0:
        # y is bit-for-bit x W0^T (+ b)
        expected = F.linear(x, layer.weight)
        if bias:
            expected = expected + layer.bias
        assert torch.equal(y, expected)
        assert_close64(y, f64(layer.base_layer(x)), 1e-6, what="fresh layer vs base")


# ---- zero rows and zero magnitudes --------------------------------------------------------
def _zero_row_layer(dtype=torch.float32, dropout=0.0):
    base = nn.Linear(12, 10, dtype=dtype)
    with torch.no_grad():
        base.weight[2] = 0.0
        base.weight[7] = 0.0
        base.weight[4] *= 1e-6         # a tiny but non-zero row: n ~ 1e-6, far above epsilon
    layer = pl.DoRALinear.from_linear(base, rank=3, alpha=6.0, dropout=dropout)
    randomize_adapter(layer)
    with torch.no_grad():
        layer.lora_B[2] = 0.0          # W'_2 = 0: the norm is clamped at epsilon
        layer.lora_B[4] = 0.0          # W'_4 tiny
        layer.magnitude[5] = 0.0       # m = 0 on a non-zero row
        layer.magnitude[7] = 0.0       # m = 0 on a zero W0 row with a live B row
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_zero_rows_give_finite_output_and_gradients(dtype, dropout):
    layer = _zero_row_layer(dtype, dropout).train()
    x = _x((6,), dtype=dtype)
    seen, handle = _capture_dropout(layer)
    got = run_layer(layer, x)
    handle.remove()
    for key, value in [("out", got.out)] + [(k, got.grads[k]) for k in DORA_GRADS]:
        assert torch.all(torch.isfinite(value)), key
    # rows 2 and 7 (W0 row zero) output the bias alone; so does row 5 (m = 0) without dropout
    # (with dropout it keeps x W0^T - d W0^T, DESIGN.md's form)
    for row in (2, 7) if dropout else (2, 5, 7):
        assert_close64(got.out[:, row], f64(layer.bias)[row].expand(6), 1e-6, what=f"row {row}")
    mask = _mask_from(seen[0], x, dropout) if dropout else None
    assert_run_close(got, run_reference(layer, x, dropout_mask=mask, p=dropout), RTOL[dtype], DORA_GRADS)
    with torch.no_grad():
        assert torch.all(torch.isfinite(layer.eval()(x)))


def test_all_zero_weight_layer_is_finite():
    base = nn.Linear(8, 6)
    with torch.no_grad():
        base.weight.zero_()
    layer = pl.DoRALinear.from_linear(base, rank=2)
    assert torch.all(layer.weight_norm() == layer.epsilon)
    got = run_layer(layer, torch.randn(4, 8))
    assert torch.all(torch.isfinite(got.out))
    assert torch.equal(got.out, base.bias.detach().expand(4, 6))
    for key in DORA_GRADS:
        assert torch.all(torch.isfinite(got.grads[key])), key


def test_merge_unmerge_with_zero_rows_restores_weight():
    layer = _zero_row_layer()
    w0 = layer.weight.detach().clone()
    x = _x((4,))
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert torch.all(torch.isfinite(layer.weight))
        assert_close64(layer(x), f64(y), 1e-5, what="merged output with zero rows")
        layer.unmerge()
    assert_close64(layer.weight, f64(w0), 1e-6, atol=1e-6, what="W0 after unmerge")
    assert torch.all(layer.weight[2] == 0) and torch.all(layer.weight[7] == 0)


def test_float16_merge_unmerge_restores_rows_whose_gain_underflows():
    """In a float16 weight, a gain ``m / n`` below float16's normal range (a zero row of ``W0``
    whose ``m`` starts at epsilon, once ``B`` moved: ``m / n`` about 5e-9) rounds to 0 or to a
    subnormal: the merge loses the row. Such rows are kept and restored like rows with ``m = 0``:
    ``unmerge()`` gives ``W0`` back to float16 rounding (it left NaN, or errors of 20%)."""
    torch.manual_seed(0)
    layer = pl.DoRALinear.from_linear(nn.Linear(64, 8).half(), rank=4)
    with torch.no_grad():
        layer.base_layer.weight[3] = 0
        layer.reset_adapter_parameters()  # m[3] = epsilon
        layer.lora_B.normal_(0, 1.0)
        layer.magnitude[5] = 1e-6 * layer.weight_norm()[5]  # a subnormal gain in float16
    w0 = layer.weight.detach().clone()
    # the merged weight is W' = W0 + s B A: the round trip is as exact as float16 holds W'
    w_prime = f64(w0) + layer.scaling * f64(layer.lora_B) @ f64(layer.lora_A)
    gain = layer.magnitude / layer.weight_norm()
    assert gain[3].half() == 0 and 0 < gain[5].half() < torch.finfo(torch.float16).tiny
    x = torch.randn(4, 64).half()
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        layer.unmerge()
        assert torch.isfinite(layer(x)).all()
    assert torch.isfinite(layer.weight).all()
    assert_close64(layer.weight, f64(w0), 2e-3, atol=2e-3 * float(w_prime.abs().max()),
                   what="W0 after a float16 merge and unmerge")
    assert torch.all(layer.weight[3] == 0)
    with torch.no_grad():
        assert_close64(layer(x), f64(y), 2e-3, what="output after unmerge")


# ---- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("epsilon", [0.0, -1e-8, float("nan"), float("inf")])
def test_bad_epsilon(epsilon):
    with pytest.raises(ValueError, match="epsilon") as info:
        pl.DoRALinear(8, 8, rank=2, epsilon=epsilon)
    assert repr(epsilon) in str(info.value)
    with pytest.raises(ValueError, match="epsilon"):
        pl.DoRALinear.from_linear(nn.Linear(8, 8), rank=2, epsilon=epsilon)


def test_epsilon_is_the_norm_floor():
    layer = pl.DoRALinear(8, 6, rank=2, epsilon=1e-3)
    with torch.no_grad():
        layer.base_layer.weight[0] = 1e-5
    assert float(layer.weight_norm()[0]) == pytest.approx(1e-3)
    assert float(layer.weight_norm()[1]) == pytest.approx(float(layer.weight[1].detach().norm()), rel=1e-6)
    assert "epsilon=0.001" in repr(layer)


# ---- memory: DoRA allocates no (out, in) tensor beyond LoRA -----------------------------------
class _BigTensorRecorder(TorchDispatchMode):
    """Records every new tensor (not a view, not an input's storage) with ``numel >= threshold``."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold = threshold
        self.big: list[tuple[str, tuple[int, ...]]] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        if func.is_view:
            return out
        inputs = {t.untyped_storage().data_ptr()
                  for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.numel() >= self.threshold
                    and t.untyped_storage().data_ptr() not in inputs):
                self.big.append((str(func), tuple(t.shape)))
        return out


OUT, IN, RANK, TOKENS = 256, 256, 4, 8


def _record_step(layer, step=None):
    """Big tensors created by one training step: forward, loss, backward (input requires grad)."""
    torch.manual_seed(1)
    x = torch.randn(TOKENS, IN, requires_grad=True)
    target = torch.randn(TOKENS, OUT)
    step = step or (lambda x: layer(x))
    with _BigTensorRecorder(OUT * IN) as rec:
        loss = F.mse_loss(step(x), target)
        loss.backward()
    assert rec.ops > 10  # the mode saw the step
    assert x.grad is not None
    return rec.big


def _trained(cls, dropout=0.0):
    layer = cls(IN, OUT, rank=RANK, dropout=dropout)
    randomize_adapter(layer)
    opt = torch.optim.SGD(layer.adapter_parameters(), lr=0.1)
    # one real step first, so the recorded step sees an adapter that just changed
    F.mse_loss(layer(torch.randn(TOKENS, IN)), torch.randn(TOKENS, OUT)).backward()
    opt.step()
    opt.zero_grad()
    return layer


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_dora_step_allocates_no_weight_sized_tensor_beyond_lora(dropout):
    assert OUT * IN > TOKENS * max(IN, OUT)  # sizes that cannot be confused
    lora = _record_step(_trained(pl.LoRALinear, dropout).train())
    dora_layer = _trained(pl.DoRALinear, dropout).train()
    dora = _record_step(dora_layer)
    assert len(dora) <= len(lora), f"DoRA: {dora}\nLoRA: {lora}"
    # and the no-grad forward
    with torch.no_grad(), _BigTensorRecorder(OUT * IN) as rec:
        dora_layer.eval()(torch.randn(TOKENS, IN))
    assert rec.big == []


def test_memory_recorder_catches_a_materialised_weight():
    """The check above is not vacuous: a DoRA that forms W' = W0 + s B A shows up."""
    layer = _trained(pl.DoRALinear).train()

    def naive_dora(x):
        w = layer.weight + layer.scaling * (layer.lora_B @ layer.lora_A)
        n = w.detach().norm(dim=1)
        return (layer.magnitude / n) * F.linear(x, w) + layer.bias

    lora = _record_step(_trained(pl.LoRALinear).train())
    naive = _record_step(layer, naive_dora)
    assert len(naive) > len(lora), f"naive: {naive}\nLoRA: {lora}"
    assert any(shape == (OUT, IN) for _, shape in naive)


def test_memory_recorder_ignores_views():
    """Views and in-place results share an input's storage and are not counted."""
    w = torch.randn(OUT, IN)
    with _BigTensorRecorder(OUT * IN) as rec:
        w.t()
        w.view(IN, OUT)
        w.mul_(2.0)
    assert rec.big == []
    with _BigTensorRecorder(OUT * IN) as rec:
        w.t().contiguous()
    assert len(rec.big) == 1


# ---- the backward writes its temporaries over z when the graph goes after it -------------------
def _grads_of_one_backward(layer, x, g, *, retain_graph):
    """Gradients (x, A, B, m) of ``sum(layer(x) * g)``; with ``retain_graph`` the same graph is
    run backward twice and both results are returned."""
    params = (layer.lora_A, layer.lora_B, layer.magnitude)
    x = x.clone().requires_grad_(True)
    out = layer(x)
    runs = 2 if retain_graph else 1
    return [torch.autograd.grad(out, (x, *params), g, retain_graph=retain_graph) for _ in range(runs)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_gives_the_same_bits_whether_or_not_the_graph_is_retained(dtype):
    """Without ``retain_graph`` the backward reuses ``z``'s buffer for ``G * z`` and ``G * g``;
    with it, ``z`` must survive for the second run. All three runs give the same bits."""
    torch.manual_seed(0)
    layer = _layer(in_f=24, out_f=20, dtype=dtype).train()
    x, g = torch.randn(6, 24, dtype=dtype), torch.randn(6, 20, dtype=dtype)
    (freed,) = _grads_of_one_backward(layer, x, g, retain_graph=False)
    first, second = _grads_of_one_backward(layer, x, g, retain_graph=True)
    for name, a, b, c in zip(DORA_GRADS, freed, first, second):
        assert torch.equal(a, b) and torch.equal(b, c), name
    ref = run_reference(layer, x, g.double())
    for name, got in zip(DORA_GRADS, freed):
        assert_close64(got, ref.grads[name], 1e-5 if dtype == torch.float32 else 2e-2, what=name)


def test_backward_allocates_no_output_sized_tensor_beyond_lora():
    """Measured by a recorder over the backward alone: G * z and G * g go into z's buffer."""
    tokens, size = 64, 48  # tokens * out: the size of z, G and the input gradient
    recorded = {}
    for cls in (pl.LoRALinear, pl.DoRALinear):
        layer = cls(size, size, rank=4)
        randomize_adapter(layer)
        x = torch.randn(tokens, size, requires_grad=True)
        out = layer.train()(x)
        with _BigTensorRecorder(tokens * size) as rec:
            out.backward(torch.randn(tokens, size))
        assert rec.ops > 3 and x.grad is not None
        recorded[cls.__name__] = rec.big
    assert len(recorded["DoRALinear"]) <= len(recorded["LoRALinear"]), recorded


def test_double_backward_of_the_fused_step_is_refused_with_its_remedy():
    layer = _layer(dtype=torch.float64)
    x = _x((3,), dtype=torch.float64)
    assert_double_backward_refused(layer, x)


def test_layer_built_under_inference_mode_caches_nothing_and_stays_right():
    # inference tensors have no version counter: every cache keyed on one must miss, not crash
    with torch.inference_mode():
        layer = _layer().eval()
        x = _x((5,))
        for what in ("first call", "second call"):
            assert_close64(layer(x), _ref_no_grad(layer, x), 1e-5, what=what)
        layer.base_layer.weight.mul_(0.5)
        layer.magnitude.add_(0.25)
        assert_close64(layer(x), _ref_no_grad(layer, x), 1e-5, what="after in-place edits")
        direct = (f64(layer.weight) + layer.scaling * f64(layer.lora_B) @ f64(layer.lora_A)).norm(dim=1)
        assert_close64(layer.weight_norm(), direct, 1e-5, what="weight_norm after the base changed")


# ---- the no-grad forward keeps m / n while the base, A, B and m stay as they are -------------
def test_no_grad_norm_cache_follows_every_change():
    layer = _layer()
    x = _x((5,))
    optimizer = torch.optim.SGD(layer.adapter_parameters(), lr=0.5)

    def check(what):
        with torch.no_grad():
            assert_close64(layer(x), _ref_no_grad(layer, x), 1e-5, what=what)

    check("first call")
    check("second call (cached m / n)")
    layer(x).square().sum().backward()  # a training step moves A, B and m
    optimizer.step()
    check("after an optimizer step")
    with torch.no_grad():
        layer.lora_B.mul_(-2.0)  # an in-place edit
    check("after an in-place edit of B")
    with torch.no_grad():
        layer.magnitude.mul_(0.75)
    check("after an in-place edit of m")
    layer.magnitude = nn.Parameter(layer.magnitude.detach() * 2)
    check("after replacing m")
    layer.load_state_dict({k: v * 1.5 for k, v in layer.state_dict().items()})
    check("after load_state_dict")
    layer.alpha = layer.alpha * 3  # scaling changes
    check("after a change of alpha")
    layer.epsilon = 2 * float(layer.weight_norm().max())  # every row's norm now clamps at epsilon
    check("after a change of epsilon")
    with torch.no_grad():
        layer.base_layer.weight.mul_(0.5)
    check("after a change of the base")


FUSED_OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=5e-2, fused=True),
    "sgd": lambda params: torch.optim.SGD(params, lr=5e-2, fused=True),
}


@pytest.mark.parametrize("optimizer", sorted(FUSED_OPTIMIZERS))
@pytest.mark.parametrize("cls", [pl.DoRALinear, pl.QDoRALinear])
def test_caches_follow_fused_optimizer_steps(cls, optimizer):
    """PyTorch's fused optimizers write parameters without bumping their version counters: the
    no-grad m / n cache must still see their steps, and so must the ||W0||^2 cache when the user
    trains the base weight too (a dense base)."""
    torch.manual_seed(0)
    layer = cls.from_linear(nn.Linear(12, 10), rank=2)
    trainable_base = cls is pl.DoRALinear
    if trainable_base:
        layer.base_layer.weight.requires_grad_(True)
    step = FUSED_OPTIMIZERS[optimizer]([p for p in layer.parameters() if p.requires_grad])
    x = _x((5,))

    def reference():
        weight = layer.base_layer.dequantize() if cls is pl.QDoRALinear else layer.weight
        return dora_ref(f64(x), f64(weight), f64(layer.bias), f64(layer.lora_A), f64(layer.lora_B),
                        f64(layer.magnitude), layer.scaling, layer.epsilon)

    for index in range(3):
        y = layer(x)  # a training forward: uses ||W0||^2, cached per base version
        assert_close64(y, reference(), 1e-5, what=f"training forward before step {index}")
        y.square().sum().backward()
        step.step()
        step.zero_grad()
        with torch.no_grad():
            assert_close64(layer(x), reference(), 1e-5, what=f"no-grad forward after step {index}")
            assert_close64(layer(x), reference(), 1e-5, what=f"cached no-grad forward after step {index}")


def test_a_merged_layer_has_no_delta_weight_or_norm():
    layer = pl.DoRALinear(6, 5, rank=2)
    layer.merge()
    for call in ("delta_weight", "weight_norm"):
        with pytest.raises(ValueError, match=rf"^{call}\(\): the layer is merged, W0 is not available; unmerge\(\) first"):
            getattr(layer, call)()


def test_norm_caches_do_not_survive_a_dtype_round_trip():
    """``.to(bf16).float()`` rounds the base weight but can hand its storage back at the old
    address with the old version: the cached norms must be dropped, not matched."""
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    for trial in range(10):  # the allocator reuses the address in some trials, not all
        torch.manual_seed(trial)
        layer = pl.DoRALinear.from_linear(nn.Linear(64, 64), rank=4, alpha=8.0)
        randomize_adapter(layer, seed=trial)
        for grad in (True, False):  # fill both caches: ||W0||^2 and the no-grad m / n
            with torch.set_grad_enabled(grad):
                layer(x)
        layer.to(torch.bfloat16).float()
        fresh = pl.DoRALinear.from_linear(nn.Linear(64, 64), rank=4, alpha=8.0)
        fresh.load_state_dict(layer.state_dict())
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                torch.testing.assert_close(layer(x), fresh(x), rtol=1e-6, atol=1e-6)


def test_a_merged_layer_that_loads_other_values_refuses_to_unmerge():
    """The merge's gain m / ||W'|| is in no state dict: loading another merged layer's state
    into a merged layer would unmerge to a wrong W0; loading its own state changes nothing."""
    def merged(seed: int) -> pl.DoRALinear:
        torch.manual_seed(0)
        layer = pl.DoRALinear(16, 16, rank=2)
        randomize_adapter(layer, seed=seed)
        layer.merge()
        return layer

    source, target = merged(1), merged(2)
    w0 = merged(2)
    w0.unmerge()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same values: no warning, and the gain still holds
        target.load_state_dict(target.state_dict())
    target.unmerge()
    torch.testing.assert_close(target.weight, w0.weight, rtol=1e-6, atol=1e-6)
    target.merge()
    with pytest.warns(UserWarning, match="^DoRALinear: loaded other values into a merged layer"):
        target.load_state_dict(source.state_dict())
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)  # merged: the same function
    before = target.weight.detach().clone()
    with pytest.raises(ValueError, match=r"^unmerge\(\): this merged DoRA layer loaded a state dict"):
        target.unmerge()
    assert target.merged and torch.equal(target.weight, before)


def test_a_merged_layer_moved_to_meta_is_emptied_and_loads_like_a_fresh_one():
    """``to_empty()`` after ``.to("meta")`` raised "Cannot copy out of meta tensor" on the merge's
    gain and left the layer half moved (a merged LoRA layer went through). The gain holds no
    values on meta, as the weight does not: the layer empties, refuses to unmerge, and loading
    the merged state back gives the merged function again."""
    torch.manual_seed(0)
    layer = pl.DoRALinear(16, 12, rank=2)
    randomize_adapter(layer, seed=1)
    layer.merge()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = layer(x)
    layer.to("meta").to_empty(device="cpu")
    assert all(t.device.type == "cpu" for t in layer.state_dict().values())
    with pytest.warns(UserWarning, match="loaded other values into a merged layer"):  # to_empty's garbage before
        layer.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^unmerge\(\): this merged DoRA layer .*to_empty\(\)"):
        layer.unmerge()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_zero_magnitude_row_unmerges_after_a_cast(dtype):
    """The W' row kept aside for a zero magnitude follows the layer's casts."""
    torch.manual_seed(0)
    layer = pl.DoRALinear(8, 8, rank=2)
    randomize_adapter(layer)
    with torch.no_grad():
        layer.magnitude[3] = 0.0
    w0 = layer.weight.detach().clone()
    layer.merge()
    layer.to(dtype)
    layer.unmerge()
    tolerance = 1e-6 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(layer.weight.to(torch.float32), w0, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("replaced", ["lora_B", "base"])
def test_caches_miss_for_a_new_tensor_at_a_freed_tensors_address(replaced):
    """A replacement tensor can get the address of the one just freed, at the same version (0):
    the caches must tell them apart. Two tensors over one numpy buffer make that deterministic
    (in real use the allocator does it, sometimes)."""
    torch.manual_seed(0)
    layer = pl.DoRALinear.from_linear(nn.Linear(12, 10), rank=3)
    randomize_adapter(layer)
    x = _x((5,))
    name = "lora_B" if replaced == "lora_B" else "weight"
    owner = layer if replaced == "lora_B" else layer.base_layer
    buffer = owner._parameters[name].detach().numpy().copy()

    def replace(values):
        del owner._parameters[name]  # the old parameter dies here
        buffer[...] = values
        setattr(owner, name, nn.Parameter(torch.from_numpy(buffer), requires_grad=replaced == "lora_B"))

    replace(buffer)
    first_address = owner._parameters[name].data_ptr()
    with torch.no_grad():
        layer(x)  # fills the no-grad m / n cache and the ||W0||^2 cache
    replace(buffer * -3.0 + 0.5)
    assert owner._parameters[name].data_ptr() == first_address
    assert owner._parameters[name]._version == 0
    with torch.no_grad():
        assert_close64(layer(x), _ref_no_grad(layer, x), 1e-5, what=f"no-grad forward after replacing {replaced}")
    y = layer(x)
    assert_close64(y, _ref_no_grad(layer, x), 1e-5, what=f"training forward after replacing {replaced}")


@pytest.mark.parametrize("cls", [pl.DoRALinear, pl.QDoRALinear])
def test_hooks_on_the_base_layer_are_named_as_skipped(cls):
    """An unmerged DoRA layer computes the base product from ``base_layer.weight`` (its norm needs
    ``W0``), so hooks on ``base_layer`` do not run: it says so; merged, the hooks run."""
    torch.manual_seed(0)
    layer = cls.from_linear(nn.Linear(12, 10), rank=2)
    randomize_adapter(layer)  # B != 0 and m != ||W'||: the merge has something to fold in
    seen = []
    layer.base_layer.register_forward_hook(lambda module, args, out: seen.append(out))
    x = _x((5,))
    with pytest.warns(UserWarning, match=rf"^{cls.__name__}: base_layer has hooks of its own, which an unmerged DoRA"):
        y = layer(x)
    assert seen == []
    w0 = layer.base_layer.dequantize() if cls is pl.QDoRALinear else layer.weight
    expected = dora_ref(f64(x), f64(w0), f64(layer.bias), f64(layer.lora_A), f64(layer.lora_B),
                        f64(layer.magnitude), layer.scaling, layer.epsilon)
    assert_close64(y, expected, 1e-5, what="unmerged output with a hooked base")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a quantized merge warns that it requantizes
        layer.merge()
        merged = layer(x)
    assert len(seen) == 1
    if cls is pl.DoRALinear:
        assert_close64(merged, expected, 1e-5, what="merged output")
    else:  # requantizing the merged weight rounds it to NF4 again (8% of the output here)
        relative = float((f64(merged) - expected).norm() / expected.norm())
        assert relative < 0.15, relative


@pytest.mark.parametrize("cls", [pl.DoRALinear, pl.QDoRALinear])
def test_a_layer_with_filled_caches_pickles_and_its_copy_recomputes(cls):
    """The cache keys hold weak references, which do not pickle: a pickled (or deep-copied) layer
    gets keys that match nothing, so its copy recomputes its norms from its own tensors."""
    import pickle

    torch.manual_seed(0)
    layer = cls.from_linear(nn.Linear(12, 10), rank=2)
    randomize_adapter(layer)
    x = _x((5,))
    for grad in (True, False):  # fill both caches
        with torch.set_grad_enabled(grad):
            layer(x)
    for copy_of in (lambda m: pickle.loads(pickle.dumps(m)), copy.deepcopy):
        twin = copy_of(layer)
        with torch.no_grad():
            torch.testing.assert_close(twin(x), layer(x), rtol=1e-6, atol=1e-6)
            twin.magnitude.mul_(2.0)  # y - b doubles with m
            torch.testing.assert_close(twin(x) - twin.bias, 2 * (layer(x) - layer.bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["dora", "qdora"])
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "after_a_no_grad_forward"])
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace:DeprecationWarning")
def test_jit_trace_bakes_no_cached_gain_into_the_graph(method: str, warm: bool) -> None:
    """A traced graph must compute m / n from the module's tensors: a gain cached by an earlier
    no-grad forward baked in as a constant would ignore an adapter loaded into the traced module
    (and made torch.jit.trace's own re-trace check fail)."""
    cls = pl.DoRALinear if method == "dora" else pl.QDoRALinear
    torch.manual_seed(0)
    layer = cls.from_linear(nn.Linear(16, 8), rank=4).eval()
    x = torch.randn(4, 16)
    other = {
        key: value + 0.3 * torch.randn_like(value) if key in ("lora_A", "lora_B", "magnitude") else value
        for key, value in layer.state_dict().items()
    }
    with torch.no_grad():
        if warm:
            layer(x)
        traced = torch.jit.trace(layer, (x,))  # check_trace=True: traces twice and compares
        traced.load_state_dict(other)
        layer.load_state_dict(other)
        weight = layer.base_layer.weight if method == "dora" else layer.base_layer.dequantize()
        expected = dora_ref(f64(x), f64(weight), f64(layer.bias), f64(layer.lora_A), f64(layer.lora_B),
                            f64(layer.magnitude), layer.scaling, layer.epsilon)
        assert_close64(traced(x), expected, rtol=1e-5)


@pytest.mark.parametrize(
    ("device", "has_fp64", "expected"),
    [
        ("cpu", None, torch.float64),
        ("cuda:1", None, torch.float64),
        ("mps", None, torch.float32),
        ("xpu:0", True, torch.float64),
        ("xpu:1", False, torch.float32),
    ],
)
def test_the_norm_and_compose_work_in_float64_where_the_device_has_it(monkeypatch, device, has_fp64, expected):
    """float64 where the device has it; MPS has none, nor has an Intel Arc XPU, whose
    properties say so (an XPU is faked here: its properties are the only thing read)."""
    from peft_layers import _devices

    _devices._xpu_widest_float.cache_clear()
    monkeypatch.setattr(
        torch.xpu, "get_device_properties", lambda index: types.SimpleNamespace(has_fp64=has_fp64)
    )
    assert _devices.widest_float(torch.device(device)) == expected
    _devices._xpu_widest_float.cache_clear()


def test_norm_caches_are_dropped_when_a_cast_hands_back_the_old_storage():
    """Deterministic form of test_norm_caches_do_not_survive_a_dtype_round_trip, whose allocator
    does not always give the address back (run after the rest of test_dora.py, never: the mutant
    without reset_norm_cache() in _apply passed). Here the 'cast' writes rounded values into the
    weight's own storage: same object, address and version counter, as a lucky round trip."""
    torch.manual_seed(0)
    layer = pl.DoRALinear.from_linear(nn.Linear(64, 64), rank=4, alpha=8.0)
    randomize_adapter(layer)
    x = torch.randn(3, 64)
    for grad in (True, False):  # fill ||W0||^2 and the no-grad m / n caches
        with torch.set_grad_enabled(grad):
            layer(x)
    weight = layer.base_layer.weight
    storage = weight.data  # a view with its own version counter: writes leave weight's alone
    rounded = weight.detach().to(torch.bfloat16).float()
    layer._apply(lambda t: storage.copy_(rounded) if t is weight else t)
    assert weight.data_ptr() == storage.data_ptr() and layer.base_layer.weight is weight
    expected = dora_ref(f64(x), f64(weight), f64(layer.bias), f64(layer.lora_A), f64(layer.lora_B),
                        f64(layer.magnitude), layer.scaling, layer.epsilon)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            assert_close64(layer(x), expected, 1e-5, what=f"grad={grad}")
