"""A hypothesis state machine over one quantized adapter layer (QLoRA or QDoRA), against float64.

The machine builds one ``pl.QLoRALinear`` or ``pl.QDoRALinear`` with ``from_linear(nn.Linear,
quant=nf4|fp4|int8)`` and drives random sequences of train/eval switches, no-grad and grad
forwards, writes to A, B and the magnitude, optimizer steps, merge/unmerge (which requantize),
to_linear, state_dict round trips, deepcopy, disable_adapter and illegal moves.

The reference base weight is ``W0 = layer.base_layer.dequantize()`` (float64 copy), read at the
start and again after every requantization (merge, unmerge), since the test cannot predict the
new codes; A, B and m are the test's own record (written by the test, or read right after an
optimizer step: the optimizer is not under test). Everything else is computed in float64 from
DESIGN.md's math (tests/reference.py: lora_ref, dora_ref).

Tolerances. The layer computes in float32: an output or gradient is a sum of at most
in_features (128) or 15 * out_features products, and float32 rounding of such a sum stays far
below 1e-5 relative to the tensor's scale (the sqrt(n) * eps32 ~ 1e-6 typical, n * eps32 ~ 1.5e-5
worst case is never approached by random data): RTOL = 1e-5 of max|expected|.

A requantization (merge, unmerge) is checked from the codec's rounding bound, derived here:
4-bit: each block k of 64 values of the flattened target T has absmax a_k = max|T| over the
block; the value w maps to the nearest level c of w / a_k and decodes to c * a'_k, with a'_k the
stored (double-quantized) absmax, so |dq - w| <= |c| |a'_k - a_k| + a_k |c - w / a_k|
<= |a'_k - a_k| + HALF_GAP * a_k (HALF_GAP: half the widest gap between adjacent levels,
0.152 for NF4, 0.167 for FP4; |c| <= 1). a'_k is read off the decoded weight (the value at the
block's absmax decodes to the level +-1 times a'_k) and itself checked within 1% of the largest
block absmax (the double quantization's 8-bit dynamic map, top step about 1/64 of its block's
range; measured ~4e-4). int8: row absmax a_i stored in float32, codes round(127 w / a_i), so
|dq - w| <= a_i / 254. Plus a float32 slack (the library forms T in float32 from the decoded
weight): 1e-5 * max|T|. The merged output then lies within |x| @ E^T of the unmerged one
(E the elementwise bound), plus the float32 rounding above.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import Tensor, nn

import peft_layers as pl
from peft_layers.quant import reference as codec

from reference import OneTorchThread, assert_close64, dora_ref, f64, lora_ref

F64 = torch.float64
RTOL = 1e-5  # float32 rounding relative to the scale of the output (or gradient)
SLACK = 1e-5  # float32 rounding of the requantized target, relative to max|T|
MAX_FLIPS = 2  # codes that may round the other way (assert_codec_agrees)
ABSMAX_TOL = 1e-2  # double-quantized absmax against the true block absmax, relative to the largest
BLOCKSIZE = 64
SEEDS = st.integers(0, 2**32 - 1)


def half_gap(quant: str) -> float:
    levels = codec.four_bit_code(quant).to(F64).sort().values
    return float((levels[1:] - levels[:-1]).max()) / 2


HALF_GAP = {"nf4": half_gap("nf4"), "fp4": half_gap("fp4")}


def requant_bound(target: Tensor, got: Tensor, quant: str) -> Tensor:
    """The elementwise bound on |got - target| for ``got`` the decoded requantization of ``target``
    (module docstring); also checks the stored absmax against the true one."""
    slack = SLACK * float(target.abs().max())
    if quant == "int8":
        a = target.abs().amax(dim=1, keepdim=True)
        return (a / 254).expand_as(target) + slack
    flat_t, flat_g = target.reshape(-1, BLOCKSIZE), got.reshape(-1, BLOCKSIZE)
    a = flat_t.abs().amax(dim=1, keepdim=True)
    a_stored = flat_g.abs().amax(dim=1, keepdim=True)
    assert float((a_stored - a).abs().max()) <= ABSMAX_TOL * float(a.max()) + slack, "stored absmax off"
    return (HALF_GAP[quant] * a + (a_stored - a).abs()).expand_as(flat_t).reshape(target.shape) + slack


def assert_requantized(got: Tensor, target: Tensor, quant: str, what: str) -> Tensor:
    bound = requant_bound(target, got, quant)
    excess = ((got - target).abs() - bound).max()
    assert float(excess) <= 0, f"{what}: requantization error exceeds its bound by {float(excess):.3g}"
    return bound


def _nibbles(packed: Tensor) -> Tensor:
    """The 4-bit codes of a packed uint8 tensor (two per byte), as one flat tensor."""
    flat = packed.reshape(-1)
    return torch.cat([flat >> 4, flat & 15])


def assert_codec_agrees(base: pl.quant.QuantizedLinear, target: Tensor, quant: str, what: str) -> None:
    """The library's requantization of its float32 target against the reference codec's of ours.

    The two targets differ by float32 rounding (a few ulps; the library forms its own in float32),
    so a code can differ only for a value within a few ulps of a rounding midpoint. int8: all but
    MAX_FLIPS (or one in 1000) decoded values agree to SLACK. 4-bit, compared as stored: the 4-bit
    codes agree but for as many flips. A block's double-quantized absmax code is the same, or one
    step away (the nested code is sorted) where that block's absmax sits at a midpoint of the
    8-bit nested code, in at most MAX_FLIPS blocks: seen once in an explored run of 1,500
    sequences of 40 steps, where all 64 values of that block then decoded one nested step apart.
    The nested absmax and the offset agree to float32 rounding. A wrong level, block scale or
    nested statistic fails."""
    t32 = target.to(torch.float32)
    flips_allowed = max(MAX_FLIPS, target.numel() // 1000)
    if quant == "int8":
        ref = f64(codec.dequantize_int8_rowwise(*codec.quantize_int8_rowwise(t32)))
        off = (f64(base.dequantize()) - ref).abs() > SLACK * float(target.abs().max())
        flips = int(off.sum())
        assert flips <= flips_allowed, f"{what}: {flips} values differ from the codec's"
        return
    ref = codec.quantize(t32, quant, BLOCKSIZE, True)
    flips = int((_nibbles(base.weight) != _nibbles(ref.packed)).sum())
    assert flips <= flips_allowed, f"{what}: {flips} 4-bit codes differ from the codec's"
    steps = (base.absmax.int() - ref.absmax.int()).abs()
    assert int(steps.max()) <= 1 and int((steps > 0).sum()) <= MAX_FLIPS, (
        f"{what}: block absmax codes differ from the codec's by up to {int(steps.max())} steps in "
        f"{int((steps > 0).sum())} blocks"
    )
    torch.testing.assert_close(base.nested_absmax, ref.nested_absmax, rtol=SLACK, atol=0)
    torch.testing.assert_close(base.offset, ref.offset, rtol=SLACK, atol=0)


def state_of(layer: nn.Module) -> dict[str, Tensor]:
    return {key: value.detach().clone() for key, value in layer.state_dict().items()}


def assert_state_equal(layer: nn.Module, before: dict[str, Tensor]) -> None:
    after = layer.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), f"{key} changed"


def quiet(call):
    """Run ``call()`` with the library's warnings (requantization, merged-layer training) recorded."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught]


class QuantizedLayerMachine(RuleBasedStateMachine):
    # -- set-up
    @initialize(
        qdora=st.booleans(),
        quant=st.sampled_from(["nf4", "fp4", "int8"]),
        in_features=st.sampled_from([64, 128]),
        out_features=st.integers(32, 96),
        rank=st.integers(1, 8),
        alpha=st.sampled_from([1.0, 4.0, 16.0]),
        bias=st.booleans(),
        training=st.booleans(),
        seed=SEEDS,
    )
    def build(self, qdora: bool, quant: str, in_features: int, out_features: int, rank: int, alpha: float,
              bias: bool, training: bool, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        linear = nn.Linear(in_features, out_features, bias=bias)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * in_features**-0.5)
            if bias:
                linear.bias.copy_(torch.randn(out_features, generator=generator) * 0.1)
        self.cls = pl.QDoRALinear if qdora else pl.QLoRALinear
        self.config = dict(quant=quant, rank=rank, alpha=alpha)
        self.quant, self.qdora, self.bias = quant, qdora, bias
        self.layer = self.cls.from_linear(linear, **self.config)
        assert type(self.layer) is self.cls and not self.layer.merged
        self.scaling = alpha / rank
        self.generator = generator
        self.w0 = f64(self.layer.base_layer.dequantize())  # the reference base (unmerged)
        self.b = f64(self.layer.base_layer.bias)
        if bias:
            assert torch.equal(self.layer.base_layer.bias, linear.bias)
        self.wm: Tensor | None = None  # the decoded merged base, while merged
        self.merged = False
        self.x = torch.randn((3, 5, in_features), generator=generator)
        self.grad_out = torch.randn((3, 5, out_features), generator=generator)
        # fresh: B = 0, m = ||W0||: the layer computes its base
        assert torch.equal(self.layer.lora_B, torch.zeros_like(self.layer.lora_B))
        self.a = f64(self.layer.lora_A)
        self.bm = torch.zeros(out_features, rank, dtype=F64)
        self.m = None
        if qdora:
            self.m = f64(self.layer.magnitude)
            assert_close64(self.m, self.w0.square().sum(1).sqrt(), RTOL, what="initial magnitude")
        self.set_mode(training)
        assert_close64(self.output(), self.base_reference(), RTOL, what="fresh layer vs its base")
        self.write("all")

    # -- helpers
    def set_mode(self, training: bool) -> None:
        assert self.layer.train(training) is self.layer
        self.training = training

    def output(self, layer: nn.Module | None = None, x: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            return (self.layer if layer is None else layer)(self.x if x is None else x)

    def base_reference(self, w: Tensor | None = None) -> Tensor:
        y = f64(self.x) @ (self.w0 if w is None else w).T
        return y if self.b is None else y + self.b

    def reference(self, x: Tensor, a: Tensor, bm: Tensor, m: Tensor | None) -> Tensor:
        """The unmerged layer's output from the record, in float64 (differentiable in x, a, bm, m)."""
        if m is None:
            return lora_ref(x, self.w0, self.b, a, bm, self.scaling)
        return dora_ref(x, self.w0, self.b, a, bm, m, self.scaling, self.layer.epsilon)

    def effective_weight(self) -> Tensor:
        w = self.w0 + self.scaling * (self.bm @ self.a)
        if self.m is None:
            return w
        return (self.m / w.square().sum(1).sqrt().clamp_min(self.layer.epsilon))[:, None] * w

    def expected(self) -> Tensor:
        """What the layer computes now: the merged base's linear, or the unmerged reference."""
        if self.merged:
            return self.base_reference(self.wm)
        return self.reference(f64(self.x), self.a, self.bm, self.m)

    def write(self, which: str) -> None:
        """New values for A, B, m or all of them, copied in under no_grad (one alone leaves the
        others' version counters as they were: QDoRA's cached gain must still notice)."""
        g = self.generator
        layer = self.layer
        with torch.no_grad():
            if which in ("lora_A", "all"):
                self.a = torch.randn(self.a.shape, generator=g, dtype=F64) * 0.3
                layer.lora_A.copy_(self.a)
                self.a = f64(layer.lora_A)  # as stored (float32)
            if which in ("lora_B", "all"):
                self.bm = torch.randn(self.bm.shape, generator=g, dtype=F64) * 0.3 / self.scaling**0.5
                layer.lora_B.copy_(self.bm)
                self.bm = f64(layer.lora_B)
            if self.m is not None and which in ("magnitude", "all"):
                w = self.w0 + self.scaling * (self.bm @ self.a)
                factor = 0.5 + torch.rand(self.m.shape, generator=g, dtype=F64)
                layer.magnitude.copy_(w.square().sum(1).sqrt() * factor)
                self.m = f64(layer.magnitude)

    def assert_same_output(self, other: nn.Module, what: str) -> None:
        """``other`` (a copy, or a fresh layer that loaded our state) computes our output bitwise.
        (A QDoRA layer in train mode once reused a gain cached in eval, which rounds otherwise
        than the copy's ride-along [x; A] product: found by this machine, fixed.)"""
        assert torch.equal(self.output(other), self.output()), f"{what}: output differs"

    def check_grad_step(self) -> None:
        """Forward + backward of (y * grad_out).sum(): output and gradients of x, A, B, m."""
        layer = self.layer
        for p in layer.parameters():
            p.grad = None
        x = self.x.clone().requires_grad_(True)
        y = layer(x)
        (y * self.grad_out).sum().backward()
        x64 = f64(self.x, True)
        a64, b64 = self.a.clone().requires_grad_(True), self.bm.clone().requires_grad_(True)
        m64 = None if self.m is None else self.m.clone().requires_grad_(True)
        ref = self.reference(x64, a64, b64, m64)
        (ref * self.grad_out.to(F64)).sum().backward()
        assert_close64(y, ref, RTOL, what="grad-mode output")
        assert_close64(x.grad, x64.grad, RTOL, what="grad of x")
        assert_close64(layer.lora_A.grad, a64.grad, RTOL, what="grad of A")
        assert_close64(layer.lora_B.grad, b64.grad, RTOL, what="grad of B")
        if m64 is not None:
            assert_close64(layer.magnitude.grad, m64.grad, RTOL, what="grad of m")
        assert not any(p.requires_grad for p in layer.base_layer.parameters())
        for p in layer.parameters():
            p.grad = None

    # -- invariants
    @invariant()
    def output_matches_record(self) -> None:
        assert self.layer.merged == self.merged
        assert self.layer.training == self.training and self.layer.base_layer.training == self.training
        assert_close64(self.output(), self.expected(), RTOL, what="no-grad output vs. record")

    # -- modes and forwards
    @rule()
    def toggle_mode(self) -> None:
        self.set_mode(not self.training)

    @rule()
    def forward_no_grad_twice(self) -> None:
        """Two no-grad calls give the same bits (QDoRA in eval reads its cached gain the second time)."""
        first = self.output()
        assert_close64(first, self.expected(), RTOL, what="first no-grad output")
        assert torch.equal(self.output(), first), "a second no-grad call gave other bits"

    @precondition(lambda self: not self.merged)
    @rule()
    def forward_backward(self) -> None:
        self.check_grad_step()

    @precondition(lambda self: not self.merged)
    @rule()
    def train_eval_train_merge(self) -> None:
        """Issue 3's sequence: train -> eval -> train -> merge, right at every stage (bitsandbytes
        repacks a 4-bit weight on its first CPU eval forward; our decode must not be affected)."""
        self.set_mode(True)
        self.check_grad_step()
        self.set_mode(False)
        self.output_matches_record()
        self.check_grad_step()  # grad forward in eval too
        self.set_mode(True)
        self.check_grad_step()
        assert torch.equal(f64(self.layer.base_layer.dequantize()), self.w0), "the base moved"
        self.merge()

    # -- writing the adapter
    @precondition(lambda self: not self.merged)
    @rule(which=st.sampled_from(["lora_A", "lora_B", "magnitude", "all"]))
    def write_adapter(self, which: str) -> None:
        """A write after an eval-mode no-grad call, which caches QDoRA's gain m / n: the write
        (one tensor's version counter only) must invalidate it. Then back to the test's mode."""
        training = self.training
        self.set_mode(False)
        self.output()
        self.write(which)
        assert_close64(self.output(), self.expected(), RTOL, what=f"eval output right after writing {which}")
        self.set_mode(training)

    @precondition(lambda self: not self.merged)
    @rule(steps=st.integers(1, 3))
    def optimizer_steps(self, steps: int) -> None:
        optimizer = torch.optim.Adam(self.layer.adapter_parameters(), lr=1e-2)
        target = torch.zeros(self.grad_out.shape)
        for _ in range(steps):
            optimizer.zero_grad()
            (self.layer(self.x) - target).square().mean().backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.a, self.bm = f64(self.layer.lora_A), f64(self.layer.lora_B)
        if self.m is not None:
            self.m = f64(self.layer.magnitude)
        assert_close64(self.output(), self.expected(), RTOL, what="output right after the steps")

    # -- merging
    @rule()
    def merge_or_unmerge(self) -> None:
        if self.merged:
            self.unmerge()
        else:
            self.merge()

    def merge(self) -> None:
        unmerged_ref = self.reference(f64(self.x), self.a, self.bm, self.m)
        target = self.effective_weight()
        _, messages = quiet(self.layer.merge)
        assert any("merge()" in m and "quantized" in m for m in messages), messages
        assert self.layer.merged
        self.merged = True
        self.wm = f64(self.layer.base_layer.dequantize())
        bound = assert_requantized(self.wm, target, self.quant, "merged weight")
        assert_codec_agrees(self.layer.base_layer, target, self.quant, "merged weight")
        # the merged output within the propagated quantization error of the unmerged one
        y = self.output()
        err_bound = f64(self.x).abs() @ bound.T + RTOL * float(unmerged_ref.abs().max())
        assert bool(((y.to(F64) - unmerged_ref).abs() <= err_bound).all()), "merged output off the unmerged"
        assert_close64(y, self.base_reference(self.wm), RTOL, what="merged output vs x dq^T + b")

    def unmerge(self) -> None:
        assert self.wm is not None
        if self.m is None:
            target = self.wm - self.scaling * (self.bm @ self.a)
        else:
            w = self.w0 + self.scaling * (self.bm @ self.a)
            gain = self.m / w.square().sum(1).sqrt().clamp_min(self.layer.epsilon)
            target = self.wm / gain[:, None] - self.scaling * (self.bm @ self.a)
        _, messages = quiet(self.layer.unmerge)
        assert any("unmerge()" in m and "quantized" in m for m in messages), messages
        assert not self.layer.merged
        self.merged, self.wm = False, None
        new_w0 = f64(self.layer.base_layer.dequantize())
        assert_requantized(new_w0, target, self.quant, "unmerged weight")
        self.w0 = new_w0  # requantized: the new reference base

    # -- conversions and copies
    @rule()
    def to_linear(self) -> None:
        before = state_of(self.layer)
        linear, _ = quiet(self.layer.to_linear)
        assert type(linear) is nn.Linear
        assert not any(p.requires_grad for p in linear.parameters())
        assert_close64(self.output(linear), self.expected(), RTOL, what="to_linear output")
        assert_close64(self.output(linear), self.output().to(F64), RTOL, what="to_linear vs the layer")
        assert_state_equal(self.layer, before)

    @rule()
    def state_dict_into_fresh(self) -> None:
        state = self.layer.state_dict()
        # a fresh layer of the same configuration over an all-zero base (the constructor's storage
        # shapes, no quantizing: that is the slow part of these runs)
        base = pl.quant.QuantizedLinear(self.layer.in_features, self.layer.out_features, bias=self.bias,
                                        scheme=self.quant)
        fresh = self.cls.from_linear(base, rank=self.config["rank"], alpha=self.config["alpha"])
        if self.merged:  # a state dict does not record the merge: load into a merged layer
            quiet(fresh.merge)
        _, _ = quiet(lambda: fresh.load_state_dict(state))
        fresh.train(self.training)
        assert fresh.merged == self.merged
        assert_state_equal(fresh, state_of(self.layer))
        self.assert_same_output(fresh, "fresh layer after load_state_dict")

    @rule()
    def deepcopy(self) -> None:
        clone = copy.deepcopy(self.layer)
        assert clone.merged == self.merged and clone.training == self.training
        self.assert_same_output(clone, "deepcopy")
        before = state_of(self.layer)
        with torch.no_grad():  # the copy is independent
            clone.lora_B.add_(1.0)
        assert_state_equal(self.layer, before)
        assert_close64(self.output(), self.expected(), RTOL, what="original after writing the copy")

    @rule(error=st.booleans())
    def disable_adapter(self, error: bool) -> None:
        if self.merged:  # documented: a merged quantized layer refuses the block, changing nothing
            before = state_of(self.layer)
            with pytest.raises(ValueError, match="unmerge"):
                with self.layer.disable_adapter():
                    pass
            assert_state_equal(self.layer, before)
            return
        try:
            with self.layer.disable_adapter():
                assert_close64(self.output(), self.base_reference(), RTOL, what="output inside disable_adapter")
                if error:
                    raise KeyError("inside the block")
        except KeyError:
            assert error

    # -- illegal moves
    @rule()
    def illegal_moves(self) -> None:
        before = state_of(self.layer)
        if self.merged:
            with pytest.raises(ValueError, match="merged"):
                self.layer.merge()
        else:
            with pytest.raises(ValueError, match="merged"):
                self.layer.unmerge()
        with pytest.raises(ValueError, match="in_features"):
            self.output(x=self.x[..., :-1])
        with pytest.raises(ValueError, match="in_features"):
            self.output(x=torch.cat([self.x, self.x[..., :1]], dim=-1))
        assert self.layer.merged == self.merged
        assert_state_equal(self.layer, before)


class TestQuantizedStateful(OneTorchThread, QuantizedLayerMachine.TestCase):  # type: ignore[name-defined,misc]
    """The machine on one torch thread (:class:`~reference.OneTorchThread`): its tensors are at most 96 x 128."""


TestQuantizedStateful.settings = settings(max_examples=35, stateful_step_count=18, deadline=None)
