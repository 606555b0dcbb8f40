"""The CUDA-only branches of QuantizedLinear, exercised on the CPU.

No GPU runs in CI, so ``QuantizedLinear._matmul_2d``'s ``bnb.matmul_4bit`` branch (taken only for
CUDA inputs) never ran. These tests take it with CPU tensors: either through the real routing,
with an input that says it is on CUDA (``_FakeCuda``), or by forcing ``_bnb_kernel_for`` to answer
"4bit". bitsandbytes then dispatches its ``gemm_4bit`` op to the default (pure PyTorch) kernel,
which decodes the nested absmax from ``absmax_8bit`` / ``absmax_code`` / ``absmax_offset`` as the
CUDA kernel does, so the arguments the layer builds are checked against a float64 reference.

The last three tests document faults a device audit (eighteenth session) found, each fixed
with the change their docstring names; they failed before.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

from peft_layers import QDoRALinear, QLoRALinear  # noqa: E402
from peft_layers.quant import QuantizedLinear, _bnb  # noqa: E402


class _FakeCuda(torch.Tensor):
    """A CPU tensor that answers ``is_cuda`` True, to drive the layer's device routing."""

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True


def _force_cuda_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every 4-bit layer take the branch it takes for CUDA inputs (``bnb.matmul_4bit``)."""
    original = QuantizedLinear._bnb_kernel_for
    monkeypatch.setattr(
        QuantizedLinear, "_bnb_kernel_for",
        lambda self, x: "4bit" if self.scheme != "int8" else original(self, x),
    )


def _reference(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """``x W^T + b`` in float64 with ``W = dequantize()`` (the layer's documented output)."""
    out = x.double() @ layer.dequantize(torch.float64).t()
    return out + layer.bias.double() if layer.bias is not None else out


@pytest.mark.parametrize("scheme", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_matmul_branch_gives_the_dequantized_product(monkeypatch, scheme, double_quant, bias):
    """The ``bnb.matmul_4bit`` branch (CUDA's default for 4-bit) computes ``x dq(W)^T + b``: its
    QuantState (nested absmax, 256-entry map, 0-dim offset) and its bias reach bitsandbytes'
    ``gemm_4bit`` as that op reads them, forward and backward (grad_x = G dq(W)), against a
    float64 reference. On the CPU this branch is otherwise dead code: a mutant passing
    ``bias=None`` to ``matmul_4bit`` survives the rest of the suite."""
    _force_cuda_kernel(monkeypatch)
    layer = QuantizedLinear.from_linear(nn.Linear(256, 96, bias=bias), scheme=scheme, double_quant=double_quant)
    x = torch.randn(7, 256, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "inner dimension not aligned" fallback warning
        out = layer(x)
    expected = _reference(layer, x.detach())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    grad = torch.randn_like(out)
    out.backward(grad)
    expected_grad = grad.double() @ layer.dequantize(torch.float64)
    torch.testing.assert_close(x.grad.double(), expected_grad, rtol=1e-5, atol=1e-5 * expected_grad.abs().max().item())
    with torch.no_grad():  # the no-grad call goes to gemm_4bit without the autograd function
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_cuda_routing_takes_the_4bit_kernel_only_where_it_applies(monkeypatch):
    """``_bnb_kernel_for`` on a CUDA input: "4bit" for an aligned 4-bit layer; None (decode +
    ``F.linear``) where bitsandbytes would warn and fall back (``in_features`` not a multiple of
    the block), for float64, an empty batch, int8 without ``int8_activations``, and when
    bitsandbytes' native library did not load (its CUDA kernels would raise)."""
    aligned = QuantizedLinear.from_linear(nn.Linear(128, 32), scheme="nf4", blocksize=64)
    misaligned = QuantizedLinear.from_linear(nn.Linear(96, 32), scheme="nf4", blocksize=64)
    int8 = QuantizedLinear.from_linear(nn.Linear(128, 32), scheme="int8")

    def cuda(rows: int, features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(rows, features, dtype=dtype).as_subclass(_FakeCuda)

    _bnb.load()
    monkeypatch.setattr(_bnb, "NATIVE", True)  # as where the CUDA library loaded
    assert aligned._bnb_kernel_for(cuda(3, 128)) == "4bit"
    assert aligned._bnb_kernel_for(torch.randn(3, 128)) is None  # the CPU decodes itself
    assert misaligned._bnb_kernel_for(cuda(3, 96)) is None
    assert aligned._bnb_kernel_for(cuda(3, 128, torch.float64)) is None
    assert aligned._bnb_kernel_for(cuda(0, 128)) is None
    assert int8._bnb_kernel_for(cuda(3, 128)) is None
    int8.int8_activations = True
    assert int8._bnb_kernel_for(cuda(3, 128)) == "int8"
    monkeypatch.setattr(_bnb, "NATIVE", False)
    assert aligned._bnb_kernel_for(cuda(3, 128)) is None
    assert int8._bnb_kernel_for(cuda(3, 128)) is None


@pytest.mark.parametrize("cls", [QuantizedLinear, QLoRALinear, QDoRALinear])
def test_cuda_matmul_branch_compiles_with_fullgraph(monkeypatch, cls):
    """``torch.compile(fullgraph=True)`` of a no-grad forward on the CUDA branch. It failed
    before: ``bnb, functional = cast(tuple, _bnb.load())`` in ``_matmul_2d`` made Dynamo treat
    ``functional.QuantState`` as an untraceable class ("Dynamo does not know how to trace the
    function QuantState"), a hard error with fullgraph and a graph break per quantized layer
    without; ``_bnb.loaded()`` unpacks without ``cast``.
    Checked against the eager call and the float64 reference."""
    _force_cuda_kernel(monkeypatch)
    linear = nn.Linear(128, 64)
    layer = QuantizedLinear.from_linear(linear) if cls is QuantizedLinear else cls.from_linear(linear, rank=4)
    layer.eval()
    x = torch.randn(5, 128)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    if cls is QuantizedLinear:
        torch.testing.assert_close(compiled.double(), _reference(layer, x), rtol=1e-5, atol=1e-5)


def test_vmap_over_an_int8_activations_layer():
    """``torch.func.vmap`` over the input of an ``int8_activations`` layer (docs/decisions.md says
    QuantizedLinear serves torch.func). It failed before on every device: "Batching rule not
    implemented for bitsandbytes::int8_vectorwise_quant" (on CUDA a 4-bit layer's
    ``gemm_4bit`` fell back to a per-sample loop with a performance warning instead). Now
    ``_bnb_kernel_for`` answers None under ``functorch_active()``. Checked against the per-sample
    eager calls, within the int8 activations' error (8.7e-3 relative, documented)."""
    layer = QuantizedLinear.from_linear(nn.Linear(64, 32), scheme="int8")
    layer.int8_activations = True
    x = torch.randn(3, 5, 64)
    batched = torch.func.vmap(layer)(x)
    per_sample = torch.stack([layer(sample) for sample in x])
    torch.testing.assert_close(batched, per_sample, rtol=0, atol=2e-2 * per_sample.abs().max().item())


@pytest.mark.parametrize("scheme, double_quant", [("nf4", True), ("nf4", False), ("int8", False)])
def test_constructed_layer_keeps_float32_statistics_under_another_default_dtype(scheme, double_quant):
    """The storage table (linear.py docstring) says absmax / nested_absmax / offset are float32.
    ``QuantizedLinear(...)`` built them with ``torch.zeros`` and no dtype, so under
    ``torch.set_default_dtype(torch.float64)`` (or bfloat16) they took that dtype, and the layer
    refused the float32 state_dict of a layer of the same configuration ("'absmax' is float32,
    this layer holds float64"); used unloaded on CUDA, gemm_4bit would raise "absmax must be
    float32". Now ``_allocate`` names ``dtype=torch.float32``. Checked: the loaded layer decodes
    to the source layer's weight exactly."""
    source = QuantizedLinear.from_linear(nn.Linear(64, 32), scheme=scheme, double_quant=double_quant)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        layer = QuantizedLinear(64, 32, scheme=scheme, double_quant=double_quant)
    finally:
        torch.set_default_dtype(previous)
    for name in ("absmax", "nested_absmax", "offset"):
        tensor = getattr(layer, name, None)
        if tensor is not None and tensor.is_floating_point():
            assert tensor.dtype == torch.float32, name
    layer.load_state_dict(source.state_dict())
    assert torch.equal(layer.dequantize(), source.dequantize())


def test_which_devices_decode_4bit_weights_with_the_reference_codec(monkeypatch):
    """Known answers of the routing: MPS always takes the reference codec (bitsandbytes' MPS op is
    a Hub-fetched kernel or a function compiled again per layer shape), the CPU where
    bitsandbytes' kernel misreads (a row split across blocks) or compiles (blocksize >= 2048),
    CUDA never. And the reference route gives bitsandbytes' bits: a layer forced onto it decodes
    exactly as the bitsandbytes route does."""
    from peft_layers.quant import linear as qlinear

    assert qlinear._decodes_with_reference("mps", 128, 64)
    assert qlinear._decodes_with_reference("cpu", 96, 64)
    assert qlinear._decodes_with_reference("cpu", 4096, 4096)
    assert not qlinear._decodes_with_reference("cpu", 128, 64)
    assert not qlinear._decodes_with_reference("cuda", 96, 64)
    for scheme, double_quant in (("nf4", True), ("fp4", False)):
        layer = QuantizedLinear.from_linear(nn.Linear(128, 48), scheme=scheme, double_quant=double_quant)
        through_bnb = layer.dequantize()
        with monkeypatch.context() as patch:
            patch.setattr(qlinear, "_decodes_with_reference", lambda *args: True)
            assert torch.equal(layer.dequantize(), through_bnb)
            assert torch.equal(layer.dequantize(torch.bfloat16), through_bnb.to(torch.bfloat16))
