"""A hypothesis state machine over the serving layer ``MultiLoRALinear`` and its model-level API.

The machine serves a small float32 model, ``Twin`` (one input, two linear layers ``left``
(12 -> 7, bias) and ``right`` (12 -> 5, no bias) side by side, outputs concatenated, plus an
``nn.Identity`` called ``tag`` that is no linear layer). It starts with both layers stacked (one
adapter on ``left`` alone, one on ``right`` alone, one on both, and one stacked on ``right`` that
``add_adapter`` then puts on ``left``) and drives random sequences of:

- ``stack_adapters(model, {name: state_dict})`` with one or two adapters that update ``left``,
  ``right`` or both (scaling 1, factors in float32, float64 or bfloat16), with fresh names and
  with names already taken (refused);
- ``stack.add_adapter(name, A, B, scaling)`` on a stack, with a name the layer has (refused), a
  name only the other layer has (the adapter then updates both) or a new one;
- writes to the adapters' public attributes: ``stack.lora_A[name]`` / ``stack.lora_B[name]``
  (``copy_`` under no_grad) and ``stack.scaling[name]``;
- ``set_adapter(model, name | None)``, a few switches in a row, each checked; forwards with that
  choice (the shapes, dtypes and modes below, and a single vector); mixed-batch forwards under
  ``adapter_batch(model, names)`` (each row its adapter or None; ``k`` times as many rows as names,
  as beam search gives; leading dims ``()``, ``(3,)``, ``(2, 2)``, ``(0,)``; float32, bfloat16 and
  float64 inputs, contiguous or not; no_grad (the in-place serving path) or grad mode (the
  out-of-place one); nested blocks; an error raised inside a block);
- ``unload(model)``, the only way the API removes adapters (it drops all of them; there is no
  per-adapter removal), after which the very ``nn.Linear`` objects are back, computing the plain
  model's bits, and the tools that need stacks refuse; then new adapters are stacked (old names
  may come back), so that every other rule always has stacks to work on;
- illegal moves, each from the documented list (docs/serving.md, "Errors"): bad names, taken
  names, shapes that do not fit, non-floating factors, non-finite or non-real scalings, unknown
  modules or a module that is no linear layer, unknown names in ``set_adapter`` /
  ``adapter_batch``, a row count that is no multiple of the names, an input of the wrong width or
  type, and ``set_adapter`` / ``adapter_batch`` / ``unload`` on a model without stacks (every
  case of a refusal rule at each of its calls: they are cheap, and each state is a new test).
  Each must raise the documented exception type with a message that starts with the offending
  argument (``name:``, ``lora_A:``, ``scaling:``, ``adapters['x'], module 'right':``,
  ``names[2]:``, ``input:`` ...), and leave everything as it was: every ``state_dict`` tensor
  bitwise (dtype and ``torch.equal``), the module objects, each stack's adapter names, scalings,
  active adapter and per-row choice, and the ``requires_grad`` flags.

The test keeps its own record, in float64: the base weights and biases (copied at the start; the
base must never change), and per layer the adapters it put there, name -> (A, B, s, the dtype
the factors were handed in), in the order added, plus each stack's active adapter. Expected
values are never read back from the library.

After every forward, every row of the output is compared, element by element, with the float64
formula of docs/serving.md for that row's adapter at that layer: ``x W^T + b + s (x A^T) B^T``,
or ``x W^T + b`` for a row with no adapter or one that does not update the layer.

Tolerance, derived rather than tuned. The layer computes in float32 (its base's dtype). A dot
product of length n rounded in IEEE arithmetic, in any summation order and with or without FMA,
is off by at most gamma_n * sum_i |x_i| |w_i|, gamma_n = n u / (1 - n u), u = 2^-24. Along the
adapter path: x A^T (n = in), t B^T (n = rank), the scaling applied in the GEMM (alpha, itself
rounded to float32: 2 roundings), the add into the base output (1); in addition a float64 input
and float64 factors are rounded to float32 on the way in (3). The base path: n = in + 1 (bias),
plus the same input rounding and final add. So per output element
``|y - ref| <= gamma_(in + r_max + 8) * (|x| |W|^T + |b| + |s| (|x| |A|^T) |B|^T)`` (the
absolute-value formula computed in float64, first-order terms, with one spare rounding for the
second-order ones): about 1.4e-6 of the magnitude of the terms, below the ~1e-5 of the row's
scale the other float32 tests use, and rigorous. A bfloat16 input is exact in float32; the
output is rounded to bfloat16 at the end (relative error at most u_bf16 = 2^-8), so its bound
adds 2^-8 (|ref| + the float32 bound). A wrong scaling, a row given another row's adapter or the
base, or a missing or doubled update is off by O(1) relative and fails by orders of magnitude.

Invariants, after every step: each layer is a ``MultiLoRALinear`` exactly when the record has
adapters for it, over the original ``nn.Linear`` object, with the record's adapter names (in
order), scalings, stored factors (bitwise, in their dtype, frozen) and active adapter, and no
per-row choice left over; the base weights are bitwise the original ones; the output for the
current ``set_adapter`` choice equals the reference; and, after each step that changed the state,
the model's ``state_dict`` loaded into a fresh model whose stacks the test builds from its record
(``MultiLoRALinear(linear)`` and ``add_adapter`` of zeros; the scalings and the active choice are
not state) gives the same state bitwise and the same outputs bitwise, for the active choice and
for a batch of every adapter and None (whose rows are also checked against the reference).

The API has no way to remove one adapter or to overwrite one other than writing its public
tensors; a stack created by ``stack_adapters`` in an ``eval()`` model is in training mode, which
changes nothing here (the layer has no dropout) and is not checked.

Deterministic: the settings below inherit ``derandomize=True`` from the "ci" profile of
conftest.py (as the other state machines do), and every tensor comes from a torch.Generator
seeded by a drawn integer.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from torch import Tensor, nn

import peft_layers as pl

from reference import OneTorchThread, f64

F64 = torch.float64
IN = 12
OUT = {"left": 7, "right": 5}
LAYERS = tuple(OUT)
MAX_RANK = 4

U32 = 2.0**-24  # float32 unit roundoff
U_BF16 = 2.0**-8  # bfloat16 unit roundoff (8 significand bits)
ROUNDINGS = IN + MAX_RANK + 8  # see the module docstring
GAMMA = ROUNDINGS * U32 / (1 - ROUNDINGS * U32)

NAMES = ("math", "code", "chat", "sql", "law", "bio")  # the pool: drawing one already there is a collision
UNKNOWN = ("nope", "Math", "default")
SEEDS = st.integers(0, 2**32 - 1)
FACTOR_DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
INPUT_DTYPES = st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float64])
LEADING = st.sampled_from([(), (3,), (2, 2), (0,)])
SCALINGS = st.sampled_from([1.0, 0.5, -2.0, 1 / 3, -0.75, 4.0, 0.0])


# ---- the model -----------------------------------------------------------------------------------
class Twin(nn.Module):
    """Two linear layers side by side; a plain ``nn.Linear`` gets its input in its own dtype (as a
    stack does for itself), so that bfloat16 and float64 inputs run before every layer is stacked."""

    def __init__(self) -> None:
        super().__init__()
        self.tag = nn.Identity()
        self.left = nn.Linear(IN, OUT["left"])
        self.right = nn.Linear(IN, OUT["right"], bias=False)

    @staticmethod
    def run(layer: nn.Module, x: Tensor) -> Tensor:
        if isinstance(layer, nn.Linear):
            return layer(x.to(layer.weight.dtype)).to(x.dtype)
        return layer(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.tag(x)
        return torch.cat([self.run(self.left, x), self.run(self.right, x)], dim=-1)


def build_twin(seed: int) -> Twin:
    generator = torch.Generator().manual_seed(seed)
    model = Twin()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.rand(parameter.shape, generator=generator) - 0.5)
    return model.eval()


X = torch.randn((3, 2, IN), generator=torch.Generator().manual_seed(1))  # the invariants' input


# ---- the record ----------------------------------------------------------------------------------
@dataclass
class Adapter:
    """One adapter at one layer, as the test put it there."""

    a: Tensor  # float64, the exact value of the stored factor
    b: Tensor
    s: float
    dtype: torch.dtype  # of the factors handed to the library (stored as they are)


def random_factors(generator: torch.Generator, rank: int, out_features: int, dtype: torch.dtype,
                   in_features: int = IN) -> tuple[Tensor, Tensor]:
    """``A (rank, in)``, ``B (out, rank)`` in ``dtype``, nonzero (the adapter matters)."""
    a = torch.randn((rank, in_features), generator=generator, dtype=F64) * 0.5
    b = torch.randn((out_features, rank), generator=generator, dtype=F64) * 0.5
    return a.to(dtype), b.to(dtype)


def layer_reference(x: Tensor, w: Tensor, bias: Tensor | None, adapters: dict[str, Adapter],
                    rows: list[str | None]) -> tuple[Tensor, Tensor]:
    """``(ref, abs_ref)`` for one layer: row ``i`` of ``x`` (float64, ``(N, *, in)``) with adapter
    ``rows[i]`` (None, or a name the layer does not have: the base); ``abs_ref`` is the same
    formula on absolute values (the scale of the rounding error, module docstring)."""
    ref = x @ w.T
    abs_ref = x.abs() @ w.abs().T
    if bias is not None:
        ref, abs_ref = ref + bias, abs_ref + bias.abs()
    for name in dict.fromkeys(rows):
        if name is None or name not in adapters:
            continue
        ad = adapters[name]
        index = torch.tensor([i for i, row in enumerate(rows) if row == name], dtype=torch.long)
        xs = x.index_select(0, index)
        ref.index_add_(0, index, ad.s * (xs @ ad.a.T) @ ad.b.T)
        abs_ref.index_add_(0, index, abs(ad.s) * (xs.abs() @ ad.a.abs().T) @ ad.b.abs().T)
    return ref, abs_ref


def assert_rows_close(got: Tensor, ref: Tensor, abs_ref: Tensor, rows: list[str | None], what: str) -> None:
    """Every element of ``got`` within its derived bound of the float64 ``ref``; a failure names
    the first row off, its adapter and by how much."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    tol = GAMMA * abs_ref
    if got.dtype == torch.bfloat16:
        tol = tol + U_BF16 * (ref.abs() + tol)
    error = (got.detach().to(F64) - ref).abs()
    bad = ~(error <= tol)  # NaN is bad too
    if bool(bad.any()):
        row = int(bad.reshape(bad.shape[0], -1).any(1).nonzero()[0])
        excess = float((error[row] / tol[row].clamp_min(1e-300)).max())
        raise AssertionError(
            f"{what}: row {row} (adapter {rows[row]!r}) is off the float64 formula by up to {excess:.3g} "
            f"times its bound; got {got[row].detach().to(F64).flatten()[:6].tolist()}, expected "
            f"{ref[row].flatten()[:6].tolist()}"
        )


# ---- snapshots of everything a refused call must leave alone -------------------------------------
@dataclass
class Snapshot:
    state: dict[str, Tensor]
    modules: dict[str, nn.Module]
    requires_grad: dict[str, bool]
    stacks: dict[str, tuple[list[str], dict[str, float], str | None, list | None]]


def snapshot(model: nn.Module, clone: bool = True) -> Snapshot:
    stacks = {
        name: (list(m.adapter_names), dict(m.scaling), m.active_adapter,
               None if m.row_adapters is None else list(m.row_adapters))
        for name, m in model.named_modules() if isinstance(m, pl.MultiLoRALinear)
    }
    return Snapshot(
        {key: value.detach().clone() if clone else value for key, value in model.state_dict().items()},
        dict(model.named_modules()),
        {name: p.requires_grad for name, p in model.named_parameters()},
        stacks,
    )


def assert_unchanged(model: nn.Module, before: Snapshot, what: str) -> None:
    after = snapshot(model, clone=False)
    assert after.modules.keys() == before.modules.keys(), f"{what}: the modules changed"
    for name, module in before.modules.items():
        assert after.modules[name] is module, f"{what}: module {name!r} was replaced"
    assert after.stacks == before.stacks, f"{what}: adapters, scalings or choices changed"
    assert after.requires_grad == before.requires_grad, f"{what}: requires_grad changed"
    assert after.state.keys() == before.state.keys(), f"{what}: state_dict keys changed"
    for key, value in before.state.items():
        assert after.state[key].dtype == value.dtype and torch.equal(after.state[key], value), f"{what}: {key} changed"


# ---- the machine ---------------------------------------------------------------------------------
class ServingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.model = build_twin(0)
        self.linears = {name: getattr(self.model, name) for name in LAYERS}  # the very objects
        self.w = {name: f64(layer.weight) for name, layer in self.linears.items()}
        self.bias = {name: f64(layer.bias) for name, layer in self.linears.items()}
        self.w_bits = {name: (layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone())
                       for name, layer in self.linears.items()}
        self.record: dict[str, dict[str, Adapter]] = {name: {} for name in LAYERS}
        self.active: dict[str, str | None] = {}  # stacked layer -> its active adapter
        # the state changed since the last state_dict round trip (the other invariants check, after
        # every step, that nothing else changes it: stored factors, base weights, choices)
        self.changed = True

    # -- helpers
    def stacked(self) -> list[str]:
        return [name for name in LAYERS if self.record[name]]

    def known(self) -> list[str]:
        return list(dict.fromkeys(n for layer in LAYERS for n in self.record[layer]))

    def stack(self, layer: str) -> pl.MultiLoRALinear:
        module = getattr(self.model, layer)
        assert isinstance(module, pl.MultiLoRALinear), f"{layer} is a {type(module).__name__}"
        return module

    def row_names(self, layer: str, x: Tensor, rows: list[str | None] | None) -> list[str | None]:
        """The adapter of each row of ``x`` at ``layer``: ``rows`` (each name covering its share of
        the rows), or the layer's active adapter when None."""
        if rows is None:
            return [self.active.get(layer)] * (x.shape[0] if x.dim() > 1 else 1)
        k = x.shape[0] // len(rows)
        return [name for name in rows for _ in range(k)]

    def check_output(self, x: Tensor, rows: list[str | None] | None, grad: bool, what: str) -> Tensor:
        """The model's output for ``x`` against the float64 formula, layer by layer and row by row."""
        with torch.set_grad_enabled(grad):
            out = self.model(x)
        assert out.dtype == x.dtype, f"{what}: dtype {out.dtype} for a {x.dtype} input"
        assert out.shape == (*x.shape[:-1], sum(OUT.values())), f"{what}: shape {tuple(out.shape)}"
        x64 = f64(x) if x.dim() > 1 else f64(x)[None]  # one vector: one row
        got = out if x.dim() > 1 else out[None]
        first = 0
        for layer in LAYERS:
            names = self.row_names(layer, x, rows)
            ref, abs_ref = layer_reference(x64, self.w[layer], self.bias[layer], self.record[layer], names)
            assert_rows_close(got[..., first : first + OUT[layer]], ref, abs_ref, names, f"{what}, {layer}")
            first += OUT[layer]
        return out

    def check_layer_active(self, layer: str, name: str, what: str) -> None:
        """The stack at ``layer`` alone, with ``name`` as its active adapter (the no-grad, in-place
        path of a ``set_adapter`` choice), against the formula; its choice is put back after."""
        stack = self.stack(layer)
        previous = stack.active_adapter
        stack.active_adapter = name
        try:
            with torch.no_grad():
                out = stack(X)
        finally:
            stack.active_adapter = previous
        names = [name] * X.shape[0]
        ref, abs_ref = layer_reference(f64(X), self.w[layer], self.bias[layer], self.record[layer], names)
        assert_rows_close(out, ref, abs_ref, names, f"{what}: {layer} with {name!r} active")

    def check_refused(self, error: type[Exception], match: str, call: Callable[[], object], what: str,
                      before: Snapshot | None = None) -> None:
        """``call()`` raises ``error`` with a message matching ``match`` (which starts with the
        offending argument) and changes nothing (against ``before``, taken now if None)."""
        before = snapshot(self.model) if before is None else before
        try:
            with pytest.raises(error, match=match):
                call()
        except (AssertionError, pytest.fail.Exception) as failure:  # not raised, or another message
            pytest.fail(f"{what}: {failure}")
        assert_unchanged(self.model, before, what)

    def add_record(self, layer: str, name: str, a: Tensor, b: Tensor, s: float) -> None:
        if not self.record[layer]:
            self.active[layer] = None  # a new stack: no adapter active (docs/serving.md)
        self.changed = True
        self.record[layer][name] = Adapter(f64(a), f64(b), float(s), a.dtype)

    @staticmethod
    def make_input(seed: int, rows: int, leading: tuple[int, ...], dtype: torch.dtype, contiguous: bool) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        shape = (rows, *leading, IN)
        if contiguous:
            return torch.randn(shape, generator=generator).to(dtype)
        # every other column of a wider tensor: strided in the last dimension
        wide = torch.randn((*shape[:-1], 2 * IN), generator=generator).to(dtype)
        x = wide[..., ::2]
        assert not x.is_contiguous() or x.numel() == 0
        return x

    # -- invariants
    @invariant()
    def structure_matches_record(self) -> None:
        for layer in LAYERS:
            module = getattr(self.model, layer)
            adapters = self.record[layer]
            if not adapters:
                assert module is self.linears[layer], f"{layer}: {type(module).__name__}, expected the original nn.Linear"
                continue
            assert type(module) is pl.MultiLoRALinear, f"{layer}: {type(module).__name__}"
            assert module.base_layer is self.linears[layer], f"{layer}: the stack holds another base"
            assert module.adapter_names == list(adapters), f"{layer}: {module.adapter_names} != {list(adapters)}"
            assert list(module.lora_A.keys()) == list(module.lora_B.keys()) == list(adapters)
            assert module.scaling == {name: ad.s for name, ad in adapters.items()}, f"{layer}: scalings"
            assert module.active_adapter == self.active[layer], f"{layer}: active {module.active_adapter!r}"
            assert module.row_adapters is None, f"{layer}: a per-row choice outlived its block"
            for name, ad in adapters.items():
                for key, stored, expected in (("lora_A", module.lora_A[name], ad.a), ("lora_B", module.lora_B[name], ad.b)):
                    assert stored.dtype == ad.dtype, f"{layer}.{key}[{name!r}]: {stored.dtype}, handed in {ad.dtype}"
                    assert not stored.requires_grad, f"{layer}.{key}[{name!r}] requires grad"
                    assert torch.equal(stored.detach().to(F64), expected), f"{layer}.{key}[{name!r}] differs from the record"
        assert set(self.active) == set(self.stacked())

    @invariant()
    def base_is_untouched(self) -> None:
        for layer, (weight, bias) in self.w_bits.items():
            linear = self.linears[layer]
            assert torch.equal(linear.weight, weight), f"{layer}: the base weight changed"
            assert (bias is None and linear.bias is None) or torch.equal(linear.bias, bias), f"{layer}: the bias changed"
            assert linear.weight.requires_grad  # stacking changes no requires_grad flag (docs/serving.md)

    @invariant()
    def active_output_matches_reference(self) -> None:
        with torch.no_grad():
            self.check_output(X, None, grad=False, what="output for the active choice")

    @invariant()
    def state_dict_round_trip(self) -> None:
        """The state dict into a fresh model with the record's stacks: the same state and outputs,
        bitwise (after each step that changed the state)."""
        if not self.changed:
            return
        self.changed = False
        fresh = build_twin(1)  # other base weights: the state dict brings them
        for layer, adapters in self.record.items():
            if not adapters:
                continue
            stack = pl.MultiLoRALinear(getattr(fresh, layer))
            for name, ad in adapters.items():
                stack.add_adapter(name, torch.zeros(ad.a.shape, dtype=ad.dtype), torch.zeros(ad.b.shape, dtype=ad.dtype), ad.s)
            stack.active_adapter = self.active[layer]
            setattr(fresh, layer, stack)
        fresh.load_state_dict(self.model.state_dict())  # strict: the same keys
        ours, theirs = self.model.state_dict(), fresh.state_dict()
        assert ours.keys() == theirs.keys()
        for key, value in ours.items():
            assert theirs[key].dtype == value.dtype and torch.equal(theirs[key], value), f"state dict {key}"
        names = [*self.known(), None]
        with torch.no_grad():
            assert torch.equal(fresh(X), self.model(X)), "a fresh model with the state dict: other output"
            if self.stacked():
                x = X.repeat(len(names), 1, 1)  # each name covers 3 rows
                with pl.adapter_batch(self.model, names), pl.adapter_batch(fresh, names):
                    out = self.check_output(x, names, grad=False, what=f"adapter_batch({names}) x3")
                    assert torch.equal(fresh(x), out), "a fresh model with the state dict: other rows"

    # -- adding adapters
    STACK_ARGUMENTS = dict(
        names=st.lists(st.sampled_from(NAMES), min_size=1, max_size=2, unique=True),
        paths=st.sampled_from([("left",), ("right",), ("left", "right"), ("right", "left")]),
        ranks=st.tuples(st.integers(1, MAX_RANK), st.integers(1, MAX_RANK)),
        dtype=FACTOR_DTYPES,
        seed=SEEDS,
    )

    @initialize(order=st.permutations(NAMES), ranks=st.tuples(st.integers(1, MAX_RANK), st.integers(1, MAX_RANK)),
                dtype=FACTOR_DTYPES, scaling=st.sampled_from([0.5, -2.0, 1 / 3, -0.75, 4.0]), seed=SEEDS)
    def first_stacks(self, order: list[str], ranks: tuple[int, int], dtype: torch.dtype, scaling: float,
                     seed: int) -> None:
        """Start with both layers stacked: one adapter on each alone and one on both (most of the API
        needs stacks; a switch between adapters of other layers is where a stale choice shows), and
        one stacked on ``right`` that ``add_adapter`` then puts on ``left`` (checked before and after)."""
        for i, (name, paths) in enumerate(zip(order, [("left",), ("right",), ("left", "right"), ("right",)])):
            self.stack_adapters([name], paths, ranks, dtype, seed + i)
        self.add_new("left", order[3], ranks[0], scaling, dtype, seed + 4)

    @rule(**STACK_ARGUMENTS)
    def stack_adapters(self, names: list[str], paths: tuple[str, ...], ranks: tuple[int, int],
                       dtype: torch.dtype, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        adapters: dict[str, dict[str, Tensor]] = {}
        for i, name in enumerate(names):
            state = {}
            for layer, rank in zip(paths if i == 0 else paths[::-1], ranks):
                a, b = random_factors(generator, rank, OUT[layer], dtype)
                state[f"{layer}.lora_A"], state[f"{layer}.lora_B"] = a, b
            adapters[name] = state
        taken = [name for name in names if name in self.known()]
        if taken:  # a collision, also beside a fresh name: refused, nothing stacked
            self.check_refused(ValueError, rf"^adapters: the name '{taken[0]}' is taken",
                               lambda: pl.stack_adapters(self.model, adapters), "stack_adapters of a taken name")
            return
        assert pl.stack_adapters(self.model, adapters) is self.model
        for name, state in adapters.items():
            for key in state:
                if key.endswith(".lora_A"):
                    layer = key[: -len(".lora_A")]
                    self.add_record(layer, name, state[key], state[f"{layer}.lora_B"], 1.0)
        # the stacks hold frozen copies: a later write to the tensors handed in is not theirs
        with torch.no_grad():
            for state in adapters.values():
                for value in state.values():
                    value.add_(1.0)

    @rule(layer=st.sampled_from(LAYERS), pick=st.integers(-1, 7), rank=st.integers(1, MAX_RANK),
          scaling=SCALINGS, dtype=FACTOR_DTYPES, seed=SEEDS)
    def add_adapter(self, layer: str, pick: int, rank: int, scaling: float, dtype: torch.dtype, seed: int) -> None:
        """``pick`` 0-3: a name only the other layer has (then the adapter updates both), 4-7: one
        this layer has (a collision), -1: a new one."""
        if not self.record[layer]:
            layer = self.stacked()[0]
        known = self.known()
        elsewhere = [n for n in known if n not in self.record[layer]]
        here = list(self.record[layer])
        if pick < 0:
            name = next((n for n in NAMES if n not in known), f"extra{len(known)}")
        elif pick < 4 and elsewhere:
            name = elsewhere[pick % len(elsewhere)]
        else:
            name = here[pick % len(here)]
        if name in self.record[layer]:  # a duplicate: refused, the adapter there stays as it was
            stack = self.stack(layer)
            a, b = random_factors(torch.Generator().manual_seed(seed), rank, OUT[layer], dtype)
            self.check_refused(ValueError, rf"^adapter '{name}': this layer already has an adapter named '{name}'$",
                               lambda: stack.add_adapter(name, a, b, scaling), "add_adapter of a duplicate")
            return
        self.add_new(layer, name, rank, scaling, dtype, seed)

    def add_new(self, layer: str, name: str, rank: int, scaling: float, dtype: torch.dtype, seed: int) -> None:
        """``add_adapter`` of a name new to ``layer`` (perhaps on the other layer already: then the
        adapter updates both). The same mixed batch, with the name in it, just before and right
        after: its rows here must change (the layer keeps its row index between calls with the same
        choice); then the layer with it active."""
        stack = self.stack(layer)
        a, b = random_factors(torch.Generator().manual_seed(seed), rank, OUT[layer], dtype)
        known = self.known()
        names = [*dict.fromkeys([*known, name]), None]
        x = X.repeat(len(names), 1, 1)
        if name in known:
            with torch.no_grad(), pl.adapter_batch(self.model, names):
                self.check_output(x, names, grad=False, what=f"adapter_batch({names}) before add_adapter")
        assert stack.add_adapter(name, a, b, scaling) is None
        self.add_record(layer, name, a, b, scaling)
        with torch.no_grad(), pl.adapter_batch(self.model, names):
            self.check_output(x, names, grad=False, what=f"adapter_batch({names}) after {layer}.add_adapter({name!r})")
        self.check_layer_active(layer, name, "right after add_adapter")
        with torch.no_grad():  # frozen copies: our tensors are not the layer's
            a.add_(1.0)
            b.add_(1.0)

    # -- writing the adapters through their public attributes
    @rule(layer=st.sampled_from(LAYERS), pick=st.integers(0, 7),
          which=st.sampled_from(["lora_A", "lora_B", "both", "scaling"]), scaling=SCALINGS, seed=SEEDS)
    def overwrite(self, layer: str, pick: int, which: str, scaling: float, seed: int) -> None:
        if not self.record[layer]:
            layer = self.stacked()[0]
        stack = self.stack(layer)
        adapters = self.record[layer]
        name = list(adapters)[pick % len(adapters)]
        ad = adapters[name]
        generator = torch.Generator().manual_seed(seed)
        a, b = random_factors(generator, ad.a.shape[0], OUT[layer], ad.dtype)
        with torch.no_grad():
            if which in ("lora_A", "both"):
                stack.lora_A[name].copy_(a)
                ad.a = f64(a)
            if which in ("lora_B", "both"):
                stack.lora_B[name].copy_(b)
                ad.b = f64(b)
        if which == "scaling":
            stack.scaling[name] = scaling
            ad.s = scaling
        self.changed = True  # the state_dict round trip checks the rows of every adapter
        self.check_layer_active(layer, name, f"right after writing {which}")

    # -- choosing adapters
    @rule(picks=st.lists(st.integers(-1, 7), min_size=1, max_size=3))
    def set_adapter(self, picks: list[int]) -> None:
        """A few choices in a row (None for -1, else a known adapter), each checked: a switch must
        leave nothing of the previous choice, also at a layer the new adapter does not update."""
        known = self.known()
        for pick in picks:
            name = None if pick < 0 else known[pick % len(known)]
            assert pl.set_adapter(self.model, name) is self.model
            for layer in self.stacked():
                self.active[layer] = name
            with torch.no_grad():
                self.check_output(X, None, grad=False, what=f"output after set_adapter({name!r})")
        self.changed = True

    # -- forwards
    @rule(seed=SEEDS, rows=st.integers(1, 4), leading=LEADING, dtype=INPUT_DTYPES, grad=st.booleans(),
          contiguous=st.booleans(), one_dim=st.booleans())
    def forward_active(self, seed: int, rows: int, leading: tuple[int, ...], dtype: torch.dtype, grad: bool,
                       contiguous: bool, one_dim: bool) -> None:
        x = self.make_input(seed, rows, leading, dtype, contiguous)
        if one_dim:  # a single vector, no batch dimension
            x = x.reshape(-1, IN)[0] if x.numel() else torch.randn(IN, generator=torch.Generator().manual_seed(seed))
        self.check_output(x, None, grad, f"forward, active choice, {dtype}, shape {tuple(x.shape)}")

    @rule(
        picks=st.lists(st.integers(-1, 7), min_size=1, max_size=4),
        repeat=st.sampled_from([1, 1, 2, 3]),
        leading=LEADING,
        dtype=INPUT_DTYPES,
        grad=st.booleans(),
        contiguous=st.booleans(),
        nested=st.booleans(),
        error=st.booleans(),
        seed=SEEDS,
    )
    def forward_batch(self, picks: list[int], repeat: int, leading: tuple[int, ...], dtype: torch.dtype,
                      grad: bool, contiguous: bool, nested: bool, error: bool, seed: int) -> None:
        """One adapter (or None) per row under adapter_batch, ``repeat`` rows per name."""
        known = self.known()
        names: list[str | None] = [None if p < 0 else known[p % len(known)] for p in picks]
        x = self.make_input(seed, len(names) * repeat, leading, dtype, contiguous)
        what = f"adapter_batch({names}) x{repeat}, {dtype}, shape {tuple(x.shape)}, grad={grad}"
        try:
            with pl.adapter_batch(self.model, names) as model:
                assert model is self.model
                for layer in self.stacked():
                    assert self.stack(layer).row_adapters == names
                first = self.check_output(x, names, grad, what)
                # the same choice over another multiple of its rows (a beam search after the prompt
                # pass), then the first batch again: the same bits
                other = 1 if repeat > 1 else 2
                y = self.make_input(seed + 1, len(names) * other, leading, dtype, contiguous)
                self.check_output(y, names, grad, f"{what}, then x{other}")
                again = self.check_output(x, names, grad, f"{what}, again after x{other}")
                assert torch.equal(again.detach(), first.detach()), f"{what}: other bits after x{other}"
                if nested:
                    inner = names[::-1]
                    with pl.adapter_batch(self.model, inner):
                        self.check_output(x, inner, grad, f"nested {what}")
                    # the outer choice is back, and gives the same bits as before
                    again = self.check_output(x, names, grad, f"after the nested block, {what}")
                    assert torch.equal(again.detach(), first.detach()), f"{what}: other bits after a nested block"
                if error:
                    raise KeyError("inside the block")
        except KeyError:
            assert error
        # the invariants check that no per-row choice is left, also after the error

    # -- removing adapters (all of them: the API has no per-adapter removal)
    @rule(**STACK_ARGUMENTS)
    def unload_and_stack_again(self, names: list[str], paths: tuple[str, ...], ranks: tuple[int, int],
                               dtype: torch.dtype, seed: int) -> None:
        """unload: the very nn.Linear objects come back, computing the plain model's bits, and the
        tools that need stacks refuse; then new adapters (perhaps under old names) are stacked, so
        that the other rules always have stacks to work on."""
        assert pl.unload(self.model) is self.model
        for layer in LAYERS:
            assert getattr(self.model, layer) is self.linears[layer], f"{layer}: not the original nn.Linear after unload"
        assert not any(isinstance(m, pl.MultiLoRALinear) for m in self.model.modules())
        self.record = {layer: {} for layer in LAYERS}
        self.active.clear()
        self.changed = True
        self.structure_matches_record()
        with torch.no_grad():
            after = self.check_output(X, None, grad=False, what="output after unload")
            plain = build_twin(0)(X)
        assert torch.equal(after, plain), "after unload: not the plain model's bits"
        # the adapters are gone: the names used before are unknown, and a model without stacks refuses
        before = snapshot(self.model)
        self.check_refused(ValueError, r"^set_adapter\(\): the model has no stacked adapters",
                           lambda: pl.set_adapter(self.model, "math"), "set_adapter after unload", before)

        def enter() -> None:
            with pl.adapter_batch(self.model, ["math", None]):
                raise AssertionError("entered a block without stacks")
        self.check_refused(ValueError, r"^adapter_batch\(\): the model has no stacked adapters", enter,
                           "adapter_batch after unload", before)
        self.check_refused(ValueError, r"^unload\(\): model has no adapter layers", lambda: pl.unload(self.model),
                           "unload after unload", before)
        self.stack_adapters(names, paths, ranks, dtype, seed)

    # -- illegal moves (every case at every call: each is cheap, and each state is another test)
    ADD_CASES = ("empty name", "dotted name", "dict attribute", "int name", "long A", "list B", "nan scaling",
                 "inf scaling", "bool scaling", "str scaling", "tensor scaling", "wide A", "B rank", "rank 0",
                 "1-D A", "duplicate")

    @rule(layer=st.sampled_from(LAYERS), name=st.sampled_from(NAMES), rank=st.integers(1, MAX_RANK))
    def add_adapter_refused(self, layer: str, name: str, rank: int) -> None:
        if not self.record[layer]:
            layer = self.stacked()[0]
        stack = self.stack(layer)
        out = OUT[layer]
        present = list(self.record[layer])[-1]
        if name in self.record[layer]:  # a fresh name here, so that only the case is wrong
            fresh = [n for n in NAMES if n not in self.record[layer]]
            name = fresh[0] if fresh else "extra"
        a, b = torch.ones(rank, IN), torch.ones(out, rank)
        before = snapshot(self.model)  # each refusal must leave exactly this
        for case in self.ADD_CASES:
            args: tuple = (name, a, b, 0.5)
            error: type[Exception] = ValueError
            if case == "empty name":
                args, match = ("", a, b, 0.5), r"^name: a name must be a non-empty str without '\.', got ''$"
            elif case == "dotted name":
                args, match = ("a.b", a, b, 0.5), r"^name: a name must be a non-empty str without '\.', got 'a\.b'$"
            elif case == "dict attribute":
                args, match = ("keys", a, b, 0.5), r"^name: the name 'keys' is an attribute of nn.ParameterDict"
            elif case == "int name":
                args, match = (3, a, b, 0.5), r"^name: a name must be a non-empty str"
            elif case == "long A":
                args, error, match = (name, a.long(), b, 0.5), TypeError, r"^lora_A: expected a floating Tensor"
            elif case == "list B":
                args, error, match = (name, a, b.tolist(), 0.5), TypeError, r"^lora_B: expected a floating Tensor"
            elif case == "nan scaling":
                args, match = (name, a, b, float("nan")), r"^scaling: expected a finite real number, got nan$"
            elif case == "inf scaling":
                args, match = (name, a, b, float("-inf")), r"^scaling: expected a finite real number, got -inf$"
            elif case == "bool scaling":
                args, error, match = (name, a, b, True), TypeError, r"^scaling: expected a finite real number, got bool True$"
            elif case == "str scaling":
                args, error, match = (name, a, b, "0.5"), TypeError, r"^scaling: expected a finite real number, got str"
            elif case == "tensor scaling":
                args, error = (name, a, b, torch.tensor(0.5)), TypeError
                match = r"^scaling: expected a finite real number, got Tensor"
            elif case == "duplicate":  # fits, but the layer has the name: refused, the adapter there unchanged
                args = (present, torch.ones(rank, IN), torch.ones(out, rank), 0.5)
                match = rf"^adapter '{present}': this layer already has an adapter named '{present}'$"
            else:
                bad_a, bad_b = {
                    "wide A": (torch.ones(rank, IN + 1), b),
                    "B rank": (a, torch.ones(out, rank + 1)),
                    "rank 0": (torch.ones(0, IN), torch.ones(out, 0)),
                    "1-D A": (torch.ones(IN), b),
                }[case]
                args = (name, bad_a, bad_b, 0.5)
                shapes = rf"A {re.escape(str(tuple(bad_a.shape)))} and B {re.escape(str(tuple(bad_b.shape)))}"
                match = (rf"^adapter '{name}': {shapes} do not fit the layer: expected A \(rank, {IN}\) and "
                         rf"B \({out}, rank\) with rank >= 1$")
            self.check_refused(error, match, lambda: stack.add_adapter(*args), f"{layer}.add_adapter, {case}", before)

    STACK_CASES = ("taken name", "empty name", "dict attribute", "no adapters", "not a mapping", "no module",
                   "not linear", "wide A", "rank mismatch", "missing B", "unexpected key", "not a tensor",
                   "integer factors", "empty state dict")

    @rule(seed=SEEDS)
    def stack_adapters_refused(self, seed: int) -> None:
        """Each bad mapping, after a good adapter that updates both layers (and would stack or
        extend them by itself): refused as a whole, the model unchanged."""
        generator = torch.Generator().manual_seed(seed)
        free = [n for n in NAMES if n not in self.known()]
        good_name, name = (free + ["extra1", "extra2"])[:2]
        a, b = random_factors(generator, 2, OUT["left"], torch.float32)
        ra, rb = random_factors(generator, 2, OUT["right"], torch.float32)
        good = {"left.lora_A": a, "left.lora_B": b, "right.lora_A": ra, "right.lora_B": rb}
        where = rf"^adapters\['{name}'\]"
        before = snapshot(self.model)
        for case in self.STACK_CASES:
            bad: object
            error: type[Exception] = ValueError
            if case == "taken name":
                if not self.known():
                    continue
                taken = self.known()[-1]
                bad, match = {taken: good}, rf"^adapters: the name '{taken}' is taken; the model already has "
            elif case == "empty name":
                bad, match = {"": good}, r"^adapters: a name must be a non-empty str without '\.', got ''$"
            elif case == "dict attribute":
                bad, match = {"to": good}, r"^adapters: the name 'to' is an attribute of nn.ParameterDict"
            elif case == "no adapters":
                bad, match = {}, r"^adapters: expected at least one adapter, got an empty mapping$"
            elif case == "not a mapping":
                bad, error = [good], TypeError
                match = r"^adapters: expected a mapping of name -> adapter directory or state dict, got list$"
            elif case == "no module":
                bad = {name: {"nope.lora_A": a, "nope.lora_B": b}}
                match = rf"{where}, module 'nope': the model has no module 'nope'"
            elif case == "not linear":
                bad, error = {name: {"tag.lora_A": a, "tag.lora_B": b}}, TypeError
                match = rf"{where}, module 'tag': 'tag' is a Identity, not a linear layer$"
            elif case == "wide A":
                wide = torch.ones(2, IN + 1)
                bad = {name: {"left.lora_A": a, "left.lora_B": b, "right.lora_A": wide, "right.lora_B": rb}}
                match = rf"{where}, module 'right': A \(2, {IN + 1}\) and B \({OUT['right']}, 2\) do not fit the layer"
            elif case == "rank mismatch":
                bad = {name: {"left.lora_A": a, "left.lora_B": torch.ones(OUT["left"], 3)}}
                match = rf"{where}: module 'left': expected A \(rank, in\) and B \(out, rank\) with the same rank >= 1"
            elif case == "missing B":
                bad, match = {name: {"left.lora_A": a}}, rf"{where}: module 'left' has no lora_B$"
            elif case == "unexpected key":
                bad = {name: {"left.lora_A": a, "left.lora_B": b, "left.weight": a}}
                match = rf"{where}: unexpected key 'left.weight'"
            elif case == "not a tensor":
                bad, error = {name: {"left.lora_A": a.tolist(), "left.lora_B": b}}, TypeError
                match = rf"{where}\['left.lora_A'\]: expected a Tensor, got list$"
            elif case == "integer factors":
                bad = {name: {"left.lora_A": a.long(), "left.lora_B": b.long()}}
                match = rf"{where}: module 'left': A and B must be floating tensors"
            else:
                bad, match = {name: {}}, rf"{where}: holds no adapter modules"
            if isinstance(bad, dict) and bad:
                bad = {good_name: good, **bad}
            self.check_refused(error, match, lambda: pl.stack_adapters(self.model, bad), f"stack_adapters, {case}",
                               before)

    @rule(picks=st.lists(st.integers(-1, 7), min_size=2, max_size=4), bad=st.sampled_from(UNKNOWN), seed=SEEDS)
    def choose_or_forward_refused(self, picks: list[int], bad: str, seed: int) -> None:
        known = self.known()
        names: list[str | None] = [None if p < 0 else known[p % len(known)] for p in picks]
        generator = torch.Generator().manual_seed(seed)
        # the choice
        before = snapshot(self.model)
        self.check_refused(ValueError, rf"^name: unknown adapter '{bad}'; the model has {re.escape(str(sorted(known)))}",
                           lambda: pl.set_adapter(self.model, bad), "set_adapter of an unknown name", before)
        at = len(names) - 1
        with_unknown = [*names[:at], bad]
        for given, error, match, what in (
            (with_unknown, ValueError, rf"^names\[{at}\]: unknown adapter '{bad}'; the model has ", "an unknown name"),
            (known[0], TypeError, r"^names: expected a non-empty sequence of adapter names or None, one per row", "a str"),
            ([], TypeError, r"^names: expected a non-empty sequence of adapter names or None, one per row", "no names"),
        ):
            def enter() -> None:
                with pl.adapter_batch(self.model, given):
                    raise AssertionError("entered a block with bad names")
            self.check_refused(error, match, enter, f"adapter_batch of {what}", before)
        # the rows: len(names) + 1 rows (no multiple of len(names) >= 2), or one vector
        with pl.adapter_batch(self.model, names):
            inside = snapshot(self.model)
            for y in (torch.randn((len(names) + 1, 2, IN), generator=generator), torch.randn(IN, generator=generator)):
                self.check_refused(
                    ValueError,
                    rf"^input: adapter_batch\(\) chose adapters for {len(names)} rows, got an input of shape "
                    rf"{re.escape(str(tuple(y.shape)))}",
                    lambda: self.model(y), f"forward of shape {tuple(y.shape)} under adapter_batch({names})", inside)
        # the input itself, into each stack
        for layer in self.stacked():
            stack = self.stack(layer)
            for y in (torch.ones(2, IN + 1), torch.ones(3, IN - 1), torch.tensor(1.0)):
                self.check_refused(
                    ValueError, rf"^input: expected shape \(\*, in_features={IN}\), got {re.escape(str(tuple(y.shape)))}$",
                    lambda: stack(y), f"{layer} forward of shape {tuple(y.shape)}", before)
            self.check_refused(TypeError, r"^input: expected a floating-point tensor, got ndarray$",
                               lambda: stack(np.ones((2, IN), dtype=np.float32)), f"{layer} forward of a numpy array",
                               before)


class TestServingStateful(OneTorchThread, ServingMachine.TestCase):  # type: ignore[name-defined,misc]
    """The machine on one torch thread (:class:`~reference.OneTorchThread`): its tensors are at most 12 x 12 x 12."""


TestServingStateful.settings = settings(max_examples=30, stateful_step_count=25, deadline=None)
