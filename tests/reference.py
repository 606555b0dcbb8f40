"""Float64 reference formulas for the core layers, written from DESIGN.md's math.

Independent of ``peft_layers``: plain, unfused, unoptimised autograd code on float64 copies of the
layer's tensors. Tests compare the layers (values and gradients) with these.

    LoRA:  y = x W0^T + b + s (d A^T) B^T                                  (d = dropout(x), or x)
    DoRA:  W' = W0 + s B A,  n = sg(max(||W'||_row, eps)),
           y = x W0^T + b + (m/n - 1) (d W0^T) + (m/n) s (d A^T) B^T      (d = x: y = (m/n) x W'^T + b)
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

F64 = torch.float64


def f64(t: Tensor | None, requires_grad: bool = False) -> Tensor | None:
    """A detached float64 leaf copy of ``t`` (None stays None)."""
    if t is None:
        return None
    out = t.detach().to(F64).clone()
    return out.requires_grad_(requires_grad)


def lora_ref(
    x: Tensor, w0: Tensor, b: Tensor | None, a: Tensor, bmat: Tensor, s: float, d: Tensor | None = None
) -> Tensor:
    """``x W0^T + b + s (d A^T) B^T`` with ``d`` the dropped-out input (``x`` if None)."""
    d = x if d is None else d
    y = torch.matmul(x, w0.transpose(0, 1)) + s * torch.matmul(torch.matmul(d, a.transpose(0, 1)), bmat.transpose(0, 1))
    return y if b is None else y + b


def materialised_weight(w0: Tensor, a: Tensor, bmat: Tensor, s: float) -> Tensor:
    """``W' = W0 + s B A`` as a dense (out, in) tensor, in float64."""
    return w0.to(F64) + s * (bmat.to(F64) @ a.to(F64))


def direct_row_norm(w0: Tensor, a: Tensor, bmat: Tensor, s: float, eps: float = 0.0) -> Tensor:
    """``max(||W0 + s B A||_row, eps)`` from the materialised ``W'``, in float64, no graph."""
    with torch.no_grad():
        w = materialised_weight(w0.detach(), a.detach(), bmat.detach(), s)
        # sqrt of the sum of squares, written out (not torch.linalg.norm) to stay independent
        return (w * w).sum(dim=1).sqrt().clamp_min(eps)


def dora_ref(
    x: Tensor,
    w0: Tensor,
    b: Tensor | None,
    a: Tensor,
    bmat: Tensor,
    m: Tensor,
    s: float,
    eps: float,
    d: Tensor | None = None,
) -> Tensor:
    """DoRA's output in the dropout form of DESIGN.md (``d = x`` when ``d`` is None).

    ``n`` is detached: no gradient flows through the norm.
    """
    d = x if d is None else d
    n = direct_row_norm(w0, a, bmat, s, eps)
    g = m / n
    base = torch.matmul(x, w0.transpose(0, 1))
    base_d = torch.matmul(d, w0.transpose(0, 1))
    upd = torch.matmul(torch.matmul(d, a.transpose(0, 1)), bmat.transpose(0, 1))
    y = base + (g - 1) * base_d + g * s * upd
    return y if b is None else y + b


def dora_ref_merged_form(
    x: Tensor, w0: Tensor, b: Tensor | None, a: Tensor, bmat: Tensor, m: Tensor, s: float, eps: float
) -> Tensor:
    """``(m/n) x W'^T + b``: the no-dropout form, a second formula for the same value."""
    n = direct_row_norm(w0, a, bmat, s, eps)
    w = w0 + s * bmat @ a
    y = (m / n) * (x @ w.transpose(0, 1))
    return y if b is None else y + b


def factored_error_bound(w0: Tensor, a: Tensor, b: Tensor, s: float) -> Tensor:
    """A forward-error bound on DoRA's factored ``n^2`` (dora.factored_row_norm), per row, float64.

    decisions.md: the factored n^2 carries an absolute error of about eps32 * ||W0_i||^2. Made
    precise: (number of terms summed) * eps * (the same formula on |W0|, |A|, |B|), the classic
    dot-product bound. For a well-conditioned cancelling row all three terms are ~||W0_i||^2, so
    this is O((in + r) eps32 ||W0_i||^2); a wrong coefficient or term is off by O(1) relative.
    """
    eps = torch.finfo(torch.promote_types(w0.dtype, torch.float32)).eps
    aa, ba, wa = f64(a).abs(), f64(b).abs(), f64(w0).abs()
    abs_terms = (wa.square().sum(1) + 2 * s * (ba * (aa @ wa.T).T).sum(1)
                 + s * s * ((ba @ (aa @ aa.T)) * ba).sum(1))
    return (w0.shape[1] + a.shape[0] + 2) * eps * abs_terms


@dataclass
class RefRun:
    """Output and gradients of one reference forward/backward."""

    out: Tensor
    grads: dict[str, Tensor | None]


def run_reference(
    layer: torch.nn.Module,
    x: Tensor,
    grad_out: Tensor | None = None,
    dropout_mask: Tensor | None = None,
    p: float = 0.0,
) -> RefRun:
    """Run the float64 reference for ``layer`` (LoRA or DoRA, read by its attributes) on ``x``.

    ``dropout_mask`` (same shape as ``x``, 0/1) with probability ``p`` gives
    ``d = x * mask / (1 - p)``. Gradients are those of ``(y * grad_out).sum()`` for x, A, B, m and
    (when they require grad in the layer) W0 and b.
    """
    base = layer.base_layer
    x64 = f64(x, True)
    w64 = f64(base.weight, bool(base.weight.requires_grad))
    b64 = f64(base.bias, bool(base.bias is not None and base.bias.requires_grad))
    a64 = f64(layer.lora_A, True)
    bm64 = f64(layer.lora_B, True)
    d = None if dropout_mask is None else x64 * dropout_mask.to(F64) / (1.0 - p)
    if hasattr(layer, "magnitude"):
        m64 = f64(layer.magnitude, True)
        y = dora_ref(x64, w64, b64, a64, bm64, m64, layer.scaling, layer.epsilon, d)
    else:
        m64 = None
        y = lora_ref(x64, w64, b64, a64, bm64, layer.scaling, d)
    g = torch.ones_like(y) if grad_out is None else grad_out.to(F64)
    (y * g).sum().backward()
    grads = {
        "x": x64.grad,
        "lora_A": a64.grad,
        "lora_B": bm64.grad,
        "magnitude": None if m64 is None else m64.grad,
        "weight": w64.grad,
        "bias": None if b64 is None else b64.grad,
    }
    return RefRun(y.detach(), grads)


# ---- helpers shared by the test modules -------------------------------------------------
def randomize_adapter(layer: torch.nn.Module, scale: float = 0.5, seed: int | None = None) -> None:
    """Give a layer a non-trivial adapter: random ``lora_B`` (and ``magnitude`` off ``||W'||``).

    A fresh layer has ``B = 0`` and ``m = n``, which would hide most errors in a comparison.
    """
    gen = torch.Generator().manual_seed(1234 if seed is None else seed)
    with torch.no_grad():
        b = torch.randn(layer.lora_B.shape, generator=gen, dtype=torch.float64) * scale
        layer.lora_B.copy_(b.to(layer.lora_B.dtype))
        if hasattr(layer, "magnitude"):
            factor = 0.5 + torch.rand(layer.magnitude.shape, generator=gen, dtype=torch.float64)
            layer.magnitude.mul_(factor.to(layer.magnitude.dtype))


def assert_close64(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float | None = None,
                   what: str = "") -> None:
    """``actual`` (any dtype) against a float64 ``expected``, with ``atol`` relative to its scale.

    ``atol`` defaults to ``rtol * max|expected|`` so that entries that happen to be near zero are
    judged on the scale of the whole tensor (the error of a dot product is relative to its terms).
    """
    expected = expected.detach().to(torch.float64)
    actual = actual.detach().to(torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if atol is None:
        atol = rtol * max(scale, 1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def run_layer(layer: torch.nn.Module, x: Tensor, grad_out: Tensor | None = None) -> RefRun:
    """Forward ``x`` (a leaf that requires grad) through ``layer``, backward ``(y * grad_out).sum()``.

    Returns the output and the gradients under the keys of :func:`run_reference`.
    """
    for p in layer.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    g = torch.ones_like(y) if grad_out is None else grad_out.to(y.dtype)
    (y * g).sum().backward()
    base = layer.base_layer
    grads = {
        "x": x.grad,
        "lora_A": layer.lora_A.grad,
        "lora_B": layer.lora_B.grad,
        "magnitude": getattr(getattr(layer, "magnitude", None), "grad", None),
        "weight": base.weight.grad,
        "bias": None if base.bias is None else base.bias.grad,
    }
    return RefRun(y.detach(), grads)


def assert_run_close(got: RefRun, ref: RefRun, rtol: float, keys: tuple[str, ...]) -> None:
    """Output and the gradients named in ``keys`` of ``got`` against the float64 ``ref``."""
    assert_close64(got.out, ref.out, rtol, what="output")
    for key in keys:
        assert got.grads[key] is not None, f"{key}: no gradient"
        assert ref.grads[key] is not None, f"{key}: no reference gradient"
        assert_close64(got.grads[key], ref.grads[key], rtol, what=f"grad of {key}")


def assert_double_backward_refused(layer: torch.nn.Module, x: Tensor) -> None:
    """The fused training step refuses a second-order gradient (d/dA sum(dL/dB), loss = ||y||^2)
    with a ``RuntimeError`` that names the remedy; the remedy itself is tested against float64."""
    y = layer(x)
    with pytest.raises(
        RuntimeError,
        match=r"^double backward \(create_graph=True\) through a LoRA/DoRA layer's fused training step "
        r"is not supported; for second-order gradients use torch\.func .*base_layer\.weight\.requires_grad_\(True\)",
    ):
        g_b, = torch.autograd.grad(y.square().sum(), layer.lora_B, create_graph=True)
        torch.autograd.grad(g_b.sum(), layer.lora_A)


class OneTorchThread:
    """``unittest.TestCase`` mixin: each test runs on one torch thread, the previous count
    restored after it. For tests over tiny tensors (the state machines), where a second thread
    only adds synchronisation, which on a busy 2-core machine costs more than the work."""

    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def tearDown(self) -> None:
        torch.set_num_threads(self._threads)
        super().tearDown()  # type: ignore[misc]
