"""A hypothesis state machine over the model-level API, checked against a float64 reference.

The machine drives random sequences of inject_adapters (LoRA, LoRA+, DoRA), writes to the
adapter tensors, merge/unmerge, disable_adapters, adapter state dicts, save_adapter /
load_adapter, unload, merge_and_unload and a few optimizer steps, on a small float64 MLP. It
also tries illegal moves (merging twice, loading a wrong-shaped state dict or a corrupt file, ...),
which must raise the documented error and leave the model exactly as it was.

The test keeps its own "shadow" record of what it put in: the base weights, and for every
adapted layer the method, rank, alpha and the A, B (and DoRA magnitude) that the test wrote.
After every step the model's output must equal a reference computed from that record alone:
an untouched copy of the original model with each adapted weight replaced by its effective
weight (LoRA ``W0 + s B A``, DoRA ``(m / ||W0 + s B A||_row) (W0 + s B A)``, DESIGN.md's math).
Expected values are never read back from the library's layers; the one exception is the
optimizer step, whose result the test records right after the step (the optimizer is not under
test). Everything is float64, so the tolerance is 1e-10 relative to the output's scale.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import Tensor, nn

import peft_layers as pl

from reference import assert_close64

F64 = torch.float64
RTOL = 1e-10  # outputs and merged weights against the reference
UNMERGE_RTOL = 1e-12  # unmerge gives the base weight back to float64 rounding


# ---- the model -----------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, up_bias: bool) -> None:
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden, bias=up_bias)
        self.down_proj = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(torch.tanh(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int, up_bias: bool) -> None:
        super().__init__()
        self.mlp = MLP(dim, hidden, up_bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(x)


class Net(nn.Module):
    """in_proj (6 -> 8) -> two residual MLP blocks (8 -> 12 -> 8) -> head (8 -> 5, no bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.in_proj = nn.Linear(6, 8)
        self.blocks = nn.ModuleList([Block(8, 12, up_bias=False), Block(8, 12, up_bias=True)])
        self.head = nn.Linear(8, 5, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.in_proj(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build_net() -> Net:
    generator = torch.Generator().manual_seed(0)
    net = Net().to(F64)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(torch.rand(parameter.shape, generator=generator, dtype=F64) - 0.5)
    return net


ORIGINAL = build_net()
X = torch.randn((3, 4, 6), generator=torch.Generator().manual_seed(1), dtype=F64)
TARGET = torch.randn((3, 4, 5), generator=torch.Generator().manual_seed(2), dtype=F64)
LINEAR_NAMES = tuple(name for name, module in ORIGINAL.named_modules() if isinstance(module, nn.Linear))
ORIGINAL_PARAMETER_COUNT = sum(p.numel() for p in ORIGINAL.parameters())

# target suffixes (whole dotted components); each matches at least one linear layer
SUFFIXES = ("in_proj", "up_proj", "down_proj", "head", "0.mlp.up_proj", "1.mlp.down_proj", "blocks.1.mlp.up_proj")
METHODS = ("lora", "lora_plus", "dora")
METHOD_CLASS: dict[str, type[nn.Module]] = {
    "lora": pl.LoRALinear, "lora_plus": pl.LoRAPlusLinear, "dora": pl.DoRALinear,
}
SEEDS = st.integers(0, 2**32 - 1)


def matches(suffix: str) -> list[str]:
    return [name for name in LINEAR_NAMES if name == suffix or name.endswith("." + suffix)]


# ---- the shadow record and the reference ---------------------------------------------------------
@dataclass
class Shadow:
    """What the test put into one adapter layer."""

    method: str
    rank: int
    alpha: float
    use_rslora: bool
    a: Tensor
    b: Tensor
    m: Tensor | None  # DoRA magnitude
    merged: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def copy(self) -> Shadow:
        m = None if self.m is None else self.m.clone()
        return Shadow(self.method, self.rank, self.alpha, self.use_rslora, self.a.clone(), self.b.clone(), m)


def effective_weight(w0: Tensor, scaling: float, a: Tensor, b: Tensor, m: Tensor | None) -> Tensor:
    """LoRA ``W0 + s B A``; DoRA ``(m / n) W'`` with ``n = ||W'||_row`` detached (DESIGN.md)."""
    w = w0 + scaling * (b @ a)
    if m is None:
        return w
    n = w.detach().square().sum(dim=1).sqrt()
    return (m / n)[:, None] * w


def row_norm(w: Tensor) -> Tensor:
    return w.square().sum(dim=1).sqrt()


def random_factors(generator: torch.Generator, rank: int, out_features: int, in_features: int) -> tuple[Tensor, Tensor]:
    a = torch.randn((rank, in_features), generator=generator, dtype=F64) * 0.3
    b = torch.randn((out_features, rank), generator=generator, dtype=F64) * 0.3  # nonzero: the adapter matters
    return a, b


def random_magnitude(generator: torch.Generator, w0: Tensor, scaling: float, a: Tensor, b: Tensor) -> Tensor:
    """A magnitude off ``||W'||`` per row by a factor in [0.5, 1.5)."""
    return row_norm(w0 + scaling * (b @ a)) * (0.5 + torch.rand(w0.shape[0], generator=generator, dtype=F64))


@dataclass
class Snapshot:
    """Everything a refused call must leave as it was."""

    state: dict[str, Tensor]
    modules: dict[str, nn.Module]
    requires_grad: dict[str, bool]


def snapshot(model: nn.Module) -> Snapshot:
    return Snapshot(
        {key: value.detach().clone() for key, value in model.state_dict().items()},
        dict(model.named_modules()),
        {name: p.requires_grad for name, p in model.named_parameters()},
    )


def assert_unchanged(model: nn.Module, before: Snapshot) -> None:
    after = snapshot(model)
    assert after.modules.keys() == before.modules.keys()
    for name, module in before.modules.items():
        assert after.modules[name] is module, f"module {name!r} was replaced"
    assert after.requires_grad == before.requires_grad
    assert after.state.keys() == before.state.keys()
    for key, value in before.state.items():
        assert torch.equal(after.state[key], value), f"{key} changed"


# ---- the machine ---------------------------------------------------------------------------------
class ModelMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.original = copy.deepcopy(ORIGINAL)  # the reference; the library never sees it
        self.model = copy.deepcopy(ORIGINAL)
        self.base_w = {name: self.original.get_submodule(name).weight.detach().clone() for name in LINEAR_NAMES}
        # layers whose library weight is bitwise base_w: not after a merge (unmerge restores it to
        # rounding) nor after merge_and_unload (base_w takes the merged weight as the test computed it)
        self.exact_base = set(LINEAR_NAMES)
        self.shadow: dict[str, Shadow] = {}
        self.wrapped: dict[str, nn.Module] = {}  # the nn.Linear each adapter layer wraps
        self.tmp = Path(tempfile.mkdtemp(prefix="peft-stateful-"))
        self.dirs = 0
        # every save goes to this one directory, so a refused save must leave the last one intact
        self.adapter_dir = self.tmp / "adapter"
        self.checkpoint: dict[str, Shadow] | None = None  # what adapter_dir holds
        self.training = True  # the mode the test last gave the model

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers
    def new_dir(self) -> Path:
        self.dirs += 1
        return self.tmp / f"scratch{self.dirs}"  # not created: save_adapter creates it

    def layer(self, name: str, model: nn.Module | None = None) -> nn.Module:
        return (self.model if model is None else model).get_submodule(name)

    def any_merged(self) -> bool:
        return any(sh.merged for sh in self.shadow.values())

    def reference(self, adapted: bool = True) -> Tensor:
        weights = {}
        for name in LINEAR_NAMES:
            sh = self.shadow.get(name)
            if adapted and sh is not None:
                weights[f"{name}.weight"] = effective_weight(self.base_w[name], sh.scaling, sh.a, sh.b, sh.m)
            else:
                weights[f"{name}.weight"] = self.base_w[name]
        with torch.no_grad():
            return torch.func.functional_call(self.original, weights, (X,))

    def output(self, model: nn.Module | None = None) -> Tensor:
        with torch.no_grad():
            return (self.model if model is None else model)(X)

    def fresh_base(self) -> Net:
        """A plain copy of the current base model (base_w), no adapters."""
        fresh = copy.deepcopy(self.original)
        with torch.no_grad():
            for name in LINEAR_NAMES:
                fresh.get_submodule(name).weight.copy_(self.base_w[name])
        return fresh

    def write_adapter(self, name: str, sh: Shadow) -> None:
        layer = self.layer(name)
        with torch.no_grad():
            layer.lora_A.copy_(sh.a)
            layer.lora_B.copy_(sh.b)
            if sh.m is not None:
                layer.magnitude.copy_(sh.m)

    def expected_state_dict_keys(self) -> set[str]:
        keys = set()
        for name, sh in self.shadow.items():
            keys |= {f"{name}.lora_A", f"{name}.lora_B"} | ({f"{name}.magnitude"} if sh.m is not None else set())
        return keys

    def random_state_dict(self, seed: int) -> dict[str, Tensor]:
        """New values for every adapter tensor, under adapter_state_dict's keys."""
        generator = torch.Generator().manual_seed(seed)
        state = {}
        for name, sh in self.shadow.items():
            a, b = random_factors(generator, sh.rank, *self.base_w[name].shape)
            state[f"{name}.lora_A"], state[f"{name}.lora_B"] = a, b
            if sh.m is not None:
                state[f"{name}.magnitude"] = random_magnitude(generator, self.base_w[name], sh.scaling, a, b)
        return state

    def take_state_dict(self, state: dict[str, Tensor]) -> None:
        """Record in the shadow the values of ``state`` (which the test made) that were loaded."""
        for name, sh in self.shadow.items():
            sh.a = state.get(f"{name}.lora_A", sh.a).clone()
            sh.b = state.get(f"{name}.lora_B", sh.b).clone()
            if sh.m is not None:
                sh.m = state.get(f"{name}.magnitude", sh.m).clone()

    def assert_adapters_match(self, model: nn.Module, shadow: dict[str, Shadow]) -> None:
        """``model``'s adapter layers are those of ``shadow``: names, classes, ranks, merge flags."""
        for name in LINEAR_NAMES:
            module = self.layer(name, model)
            sh = shadow.get(name)
            if sh is None:
                assert type(module) is nn.Linear, f"{name}: {type(module).__name__}, expected a plain nn.Linear"
                continue
            assert type(module) is METHOD_CLASS[sh.method], f"{name}: {type(module).__name__} for {sh.method}"
            assert module.rank == sh.rank
            assert module.merged == sh.merged
            assert module.scaling == pytest.approx(sh.scaling, rel=1e-15)

    def check_refused(self, call: Callable[[nn.Module], object]) -> None:
        """``call(model)`` raises ValueError and changes nothing."""
        before = snapshot(self.model)
        with pytest.raises(ValueError):
            call(self.model)
        assert_unchanged(self.model, before)

    def check_without_adapters_refusals(self) -> None:
        """Without adapter layers, unmerge_adapters (none is merged) and save_adapter raise
        ValueError; save_adapter writes nothing."""
        directory = self.new_dir()
        self.check_refused(pl.unmerge_adapters)
        self.check_refused(lambda model: pl.save_adapter(model, directory))
        assert not directory.exists() or not any(directory.iterdir())

    def check_inject_refusals(self) -> None:
        """Bad inject_adapters arguments raise the documented error and change nothing."""
        before = snapshot(self.model)
        with pytest.raises(ValueError):  # a target that matches nothing
            pl.inject_adapters(self.model, ["in_proj", "nope_proj"], rank=1)
        with pytest.raises(TypeError):  # a match that is no linear layer
            pl.inject_adapters(self.model, ["blocks.0.mlp"], rank=1)
        fresh = [name for name in LINEAR_NAMES if name not in self.shadow]
        if fresh:  # on adapted layers, injecting twice would be refused too
            with pytest.raises(ValueError):
                pl.inject_adapters(self.model, fresh, method="lokr", rank=1)
            with pytest.raises(ValueError):  # above min(in, out) of every layer
                pl.inject_adapters(self.model, fresh, rank=9)
            with pytest.raises(TypeError):  # epsilon is DoRA's argument
                pl.inject_adapters(self.model, fresh, method="lora", rank=1, epsilon=1e-6)
        assert_unchanged(self.model, before)

    # -- invariants
    @invariant()
    def output_equals_reference(self) -> None:
        assert_close64(self.output(), self.reference(), RTOL, what="model output vs. shadow reference")

    @invariant()
    def structure_matches_shadow(self) -> None:
        self.assert_adapters_match(self.model, self.shadow)
        # injection (bias="none") freezes all but the adapter tensors; unload leaves the flags as they are
        if self.shadow:
            trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
            assert trainable == self.expected_state_dict_keys()
        adapter_count = sum(sh.a.numel() + sh.b.numel() + (0 if sh.m is None else sh.m.numel())
                            for sh in self.shadow.values())
        trainable_count = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        assert pl.trainable_parameters(self.model) == (trainable_count, ORIGINAL_PARAMETER_COUNT + adapter_count)

    @invariant()
    def training_mode_is_the_models(self) -> None:
        """Injected and merged-and-unloaded layers take the mode of the layer they replace
        (docs/model.md); load_adapter and unload keep it too."""
        for name, module in self.model.named_modules():
            assert module.training == self.training, f"{name!r}: training={module.training}"

    def set_mode(self, training: bool) -> None:
        self.model.train(training)
        self.training = training

    @initialize(training=st.booleans())
    def initial_mode(self, training: bool) -> None:
        # half the runs start in eval mode, where DoRA keeps its gain m / n between no-grad calls
        self.set_mode(training)

    # only with adapters, where the mode matters: an always-legal rule would take many of the steps
    @precondition(lambda self: self.shadow)
    @rule()
    def toggle_mode(self) -> None:
        self.set_mode(not self.training)

    # -- injecting
    @rule(
        suffixes=st.lists(st.sampled_from(SUFFIXES), min_size=1, max_size=3, unique=True),
        method=st.sampled_from(METHODS),
        rank=st.sampled_from([1, 2, 4]),
        alpha=st.sampled_from([1.0, 4.0, 16.0]),
        use_rslora=st.booleans(),
        seed=SEEDS,
    )
    def inject(self, suffixes: list[str], method: str, rank: int, alpha: float, use_rslora: bool, seed: int) -> None:
        self.check_inject_refusals()
        matched = sorted({name for suffix in suffixes for name in matches(suffix)})
        kwargs = dict(method=method, rank=rank, alpha=alpha, use_rslora=use_rslora)
        if set(matched) & set(self.shadow):  # injecting twice into a layer: refused, nothing changed
            before = snapshot(self.model)
            with pytest.raises(ValueError):
                pl.inject_adapters(self.model, suffixes, **kwargs)
            assert_unchanged(self.model, before)
            return
        wrapped = {name: self.layer(name) for name in matched}
        assert pl.inject_adapters(self.model, suffixes, **kwargs) is self.model
        for name in matched:
            layer = self.layer(name)
            assert type(layer) is METHOD_CLASS[method]
            assert layer.base_layer is wrapped[name]  # wrapped, not copied
            assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
            if method == "dora":  # m starts at ||W0|| per row
                assert_close64(layer.magnitude, row_norm(self.base_w[name]), UNMERGE_RTOL, what=f"{name} magnitude")
        # fresh layers compute their base exactly (B = 0, m = ||W0||)
        assert_close64(self.output(), self.reference(), RTOL, what="output right after inject")

        generator = torch.Generator().manual_seed(seed)
        for name in matched:
            a, b = random_factors(generator, rank, *self.base_w[name].shape)
            sh = Shadow(method, rank, alpha, use_rslora, a, b, None)
            if method == "dora":
                sh.m = random_magnitude(generator, self.base_w[name], sh.scaling, a, b)
            self.write_adapter(name, sh)
            self.shadow[name] = sh
            self.wrapped[name] = wrapped[name]

    # -- writing the adapter tensors
    @precondition(lambda self: any(not sh.merged for sh in self.shadow.values()))
    @rule(seed=SEEDS)
    def randomize_adapters(self, seed: int) -> None:
        """New values for A, B, the magnitude, or all of them (drawn per unmerged layer), written
        with copy_ under no_grad. Writing one tensor alone (the others' version counters
        unchanged) tests DoRA's cached m / n."""
        generator = torch.Generator().manual_seed(seed)
        for name, sh in self.shadow.items():
            if sh.merged:
                continue
            which = ("lora_A", "lora_B", "magnitude", "all")[int(torch.randint(4, (), generator=generator))]
            a, b = random_factors(generator, sh.rank, *self.base_w[name].shape)
            layer = self.layer(name)
            with torch.no_grad():
                if which in ("lora_A", "all"):
                    sh.a = a
                    layer.lora_A.copy_(a)
                if which in ("lora_B", "all"):
                    sh.b = b
                    layer.lora_B.copy_(b)
                if sh.m is not None and which in ("magnitude", "all"):
                    sh.m = random_magnitude(generator, self.base_w[name], sh.scaling, sh.a, sh.b)
                    layer.magnitude.copy_(sh.m)

    @precondition(lambda self: self.shadow and not any(sh.merged for sh in self.shadow.values()))
    @rule(steps=st.integers(1, 3))
    def train_steps(self, steps: int) -> None:
        layers = {name: self.layer(name) for name in self.shadow}
        parameters = [p for layer in layers.values() for p in layer.adapter_parameters()]
        # Adam moves each value by about lr a step, whatever the gradient's scale (the merged
        # weights of repeated merge_and_unload calls grow, and SGD at s = 16 then diverges)
        optimizer = torch.optim.Adam(parameters, lr=1e-3)

        # the first step's loss and gradients against autograd through the reference weights
        leaves = {name: (sh.a.clone().requires_grad_(True), sh.b.clone().requires_grad_(True),
                         None if sh.m is None else sh.m.clone().requires_grad_(True))
                  for name, sh in self.shadow.items()}
        weights = {f"{name}.weight": self.base_w[name] for name in LINEAR_NAMES}
        for name, (a, b, m) in leaves.items():
            weights[f"{name}.weight"] = effective_weight(self.base_w[name], self.shadow[name].scaling, a, b, m)
        ref_loss = (torch.func.functional_call(self.original, weights, (X,)) - TARGET).square().mean()
        ref_loss.backward()
        loss = (self.model(X) - TARGET).square().mean()
        loss.backward()
        assert loss.item() == pytest.approx(ref_loss.item(), rel=RTOL)
        for name, (a, b, m) in leaves.items():
            layer = layers[name]
            assert_close64(layer.lora_A.grad, a.grad, 1e-9, what=f"{name} grad A")
            assert_close64(layer.lora_B.grad, b.grad, 1e-9, what=f"{name} grad B")
            if m is not None:
                assert_close64(layer.magnitude.grad, m.grad, 1e-9, what=f"{name} grad m")
        optimizer.step()
        for _ in range(steps - 1):
            optimizer.zero_grad()
            (self.model(X) - TARGET).square().mean().backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # the optimizer is not under test: its result becomes the test's record
        for name, sh in self.shadow.items():
            sh.a = layers[name].lora_A.detach().clone()
            sh.b = layers[name].lora_B.detach().clone()
            if sh.m is not None:
                sh.m = layers[name].magnitude.detach().clone()

    # -- merging
    @precondition(lambda self: self.shadow)
    @rule()
    def merge_or_unmerge(self) -> None:
        """Merge when no layer is merged, else unmerge (one rule, so that both are drawn as often)."""
        if self.any_merged():
            self.unmerge()
        else:
            self.merge()

    def merge(self) -> None:
        self.check_refused(pl.unmerge_adapters)  # no layer is merged yet
        assert pl.merge_adapters(self.model) is self.model
        for name, sh in self.shadow.items():
            sh.merged = True
            self.exact_base.discard(name)
            expected = effective_weight(self.base_w[name], sh.scaling, sh.a, sh.b, sh.m)
            assert_close64(self.layer(name).base_layer.weight, expected, RTOL, what=f"{name} merged weight")

    def unmerge(self) -> None:
        self.check_refused(pl.merge_adapters)  # merging twice (or a model with some layers merged)
        assert pl.unmerge_adapters(self.model) is self.model
        for name, sh in self.shadow.items():
            sh.merged = False
            assert_close64(self.layer(name).base_layer.weight, self.base_w[name], UNMERGE_RTOL,
                           what=f"{name} unmerged weight")

    # -- disabling
    @precondition(lambda self: self.shadow)
    @rule(nested=st.booleans(), error=st.booleans())
    def disable_adapters(self, nested: bool, error: bool) -> None:
        base = self.reference(adapted=False)
        try:
            with pl.disable_adapters(self.model) as model:
                assert model is self.model
                assert_close64(self.output(), base, RTOL, what="output inside disable_adapters")
                if nested:
                    with pl.disable_adapters(self.model):
                        assert_close64(self.output(), base, RTOL, what="output inside a nested block")
                    assert_close64(self.output(), base, RTOL, what="output after the nested block")
                # inside the block no layer is merged or enabled: each of these is refused
                for call in (pl.merge_adapters, pl.unmerge_adapters, pl.merge_and_unload, pl.unload):
                    self.check_refused(call)
                if error:
                    raise KeyError("an error inside the block")
        except KeyError:
            assert error
        # the invariants check that the adapted function (merge flags too) is back, also after an error

    # -- adapter state dicts
    @precondition(lambda self: self.shadow)
    @rule()
    def state_dict_round_trip(self) -> None:
        state = pl.adapter_state_dict(self.model)
        assert set(state) == self.expected_state_dict_keys()
        for name, sh in self.shadow.items():
            assert torch.equal(state[f"{name}.lora_A"], sh.a) and torch.equal(state[f"{name}.lora_B"], sh.b)
            if sh.m is not None:
                assert torch.equal(state[f"{name}.magnitude"], sh.m)
        fresh = self.fresh_base()
        for name, sh in self.shadow.items():  # the same configuration, layer by layer
            pl.inject_adapters(fresh, [name], method=sh.method, rank=sh.rank, alpha=sh.alpha, use_rslora=sh.use_rslora)
        assert pl.load_adapter_state_dict(fresh, state) is fresh
        self.assert_adapters_match(fresh, {name: sh.copy() for name, sh in self.shadow.items()})  # unmerged
        assert_close64(self.output(fresh), self.reference(), RTOL, what="fresh model after load_adapter_state_dict")

    @precondition(lambda self: self.shadow and not any(sh.merged for sh in self.shadow.values()))
    @rule(seed=SEEDS, strict=st.booleans())
    def load_state_dict(self, seed: int, strict: bool) -> None:
        state = self.random_state_dict(seed)
        if not strict:  # a part of the adapter: only the B factors
            state = {key: value for key, value in state.items() if key.endswith(".lora_B")}
        assert pl.load_adapter_state_dict(self.model, state, strict=strict) is self.model
        self.take_state_dict(state)

    @precondition(lambda self: self.shadow)
    @rule(seed=SEEDS)
    def load_bad_state_dict_raises(self, seed: int) -> None:
        state = self.random_state_dict(seed)
        # the last key in sorted order: a loader that copied as it checked would have changed the others
        last = sorted(state)[-1]
        wrong_shape = {**state, last: torch.cat([state[last], state[last][:1]])}
        missing_key = {key: value for key, value in state.items() if key != last}
        unexpected_key = {**state, "blocks.0.mlp.nope_proj.lora_A": torch.zeros(1, 8, dtype=F64)}
        for bad in (wrong_shape, missing_key, unexpected_key):
            self.check_refused(lambda model: pl.load_adapter_state_dict(model, bad, strict=True))
        if self.any_merged():  # a state dict that fits, into merged layers
            self.check_refused(lambda model: pl.load_adapter_state_dict(model, state))

    # -- adapter files
    @precondition(lambda self: self.shadow and not any(sh.merged for sh in self.shadow.values()))
    @rule()
    def save_and_load_into_fresh(self) -> None:
        methods = {sh.method for sh in self.shadow.values()}
        rslora = {sh.use_rslora for sh in self.shadow.values()}
        if len(methods) > 1 or len(rslora) > 1:  # one file cannot describe the mix: refused, nothing written
            files = {path.name: path.read_bytes() for path in self.adapter_dir.glob("*")}
            self.check_refused(lambda model: pl.save_adapter(model, self.adapter_dir))
            assert {path.name: path.read_bytes() for path in self.adapter_dir.glob("*")} == files
            return
        assert pl.save_adapter(self.model, self.adapter_dir) == self.adapter_dir
        self.checkpoint = {name: sh.copy() for name, sh in self.shadow.items()}  # unmerged
        fresh = self.fresh_base()
        rng = torch.get_rng_state()
        assert pl.load_adapter(fresh, self.adapter_dir) is fresh  # injects from the file, then fills
        assert torch.equal(torch.get_rng_state(), rng)  # injecting draws no random numbers
        self.assert_adapters_match(fresh, self.checkpoint)
        assert_close64(self.output(fresh), self.reference(), RTOL, what="fresh model after load_adapter")

    @precondition(lambda self: self.checkpoint is not None)
    @rule(inject_first=st.booleans())
    def load_checkpoint_into_model(self, inject_first: bool) -> None:
        """load_adapter of the last saved file into the model: it injects into a model without
        adapters, fills adapters that fit (taking the file's alpha and use_rslora), and refuses
        merged layers and layers that do not fit."""
        assert self.checkpoint is not None
        saved = self.checkpoint
        if not self.shadow:
            wrapped = {name: self.layer(name) for name in saved}
            if inject_first:  # the file's layers, but another alpha and use_rslora, which the file's replace
                for name, sh in saved.items():
                    pl.inject_adapters(self.model, [name], method=sh.method, rank=sh.rank, alpha=2 * sh.alpha,
                                       use_rslora=not sh.use_rslora)
            assert pl.load_adapter(self.model, self.adapter_dir) is self.model
            for name, sh in saved.items():
                assert self.layer(name).base_layer is wrapped[name]
                self.shadow[name], self.wrapped[name] = sh.copy(), wrapped[name]
            return
        same_layers = saved.keys() == self.shadow.keys()
        same_kind = same_layers and all(saved[n].rank == sh.rank and (saved[n].m is None) == (sh.m is None)
                                        for n, sh in self.shadow.items())
        if not same_kind or self.any_merged():
            self.check_refused(lambda model: pl.load_adapter(model, self.adapter_dir))
            return
        # first another alpha and use_rslora through the layers' setters (allowed while unmerged),
        # which the file's must replace
        for name, sh in self.shadow.items():
            sh.alpha, sh.use_rslora = 2 * sh.alpha, not sh.use_rslora
            self.layer(name).alpha, self.layer(name).use_rslora = sh.alpha, sh.use_rslora
        assert_close64(self.output(), self.reference(), RTOL, what="output after setting alpha and use_rslora")
        assert pl.load_adapter(self.model, self.adapter_dir) is self.model
        for name, sh in saved.items():
            # a LoRA+ file fills LoRA layers and the other way round: the layers keep their class
            # (lr_ratio only steers the optimizer), the values are the file's (files.md)
            method = self.shadow[name].method
            self.shadow[name] = sh.copy()
            self.shadow[name].method = method

    @precondition(lambda self: self.checkpoint is not None)
    @rule()
    def load_bad_file_raises(self) -> None:
        truncated, config_rank, no_weights = self.new_dir(), self.new_dir(), self.new_dir()
        for directory in (truncated, config_rank, no_weights):
            shutil.copytree(self.adapter_dir, directory)
        data = (truncated / "adapter_model.safetensors").read_bytes()
        (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
        fields = json.loads((config_rank / "adapter_config.json").read_text())
        fields["r"] += 1  # the layers at the config's r no longer fit it
        (config_rank / "adapter_config.json").write_text(json.dumps(fields))
        (no_weights / "adapter_model.safetensors").unlink()
        # into the model (filling its adapters, or injecting when it has none) and into a fresh base
        for target in (self.model, self.fresh_base()):
            before = snapshot(target)
            with pytest.raises(ValueError):
                pl.load_adapter(target, truncated)
            with pytest.raises(ValueError):
                pl.load_adapter(target, config_rank)
            with pytest.raises(FileNotFoundError):
                pl.load_adapter(target, no_weights)
            assert_unchanged(target, before)

    # -- taking the adapters out
    @precondition(lambda self: self.shadow)
    @rule()
    def unload(self) -> None:
        assert pl.unload(self.model) is self.model
        for name in self.shadow:
            module = self.layer(name)
            assert module is self.wrapped[name]  # the very module that was wrapped
            assert type(module) is nn.Linear
            if name in self.exact_base:
                assert torch.equal(module.weight, self.base_w[name])
            else:
                assert_close64(module.weight, self.base_w[name], UNMERGE_RTOL, what=f"{name} weight after unload")
        self.shadow.clear()
        self.wrapped.clear()
        self.check_without_adapters_refusals()

    @precondition(lambda self: self.shadow)
    @rule()
    def merge_and_unload(self) -> None:
        expected = {name: effective_weight(self.base_w[name], sh.scaling, sh.a, sh.b, sh.m)
                    for name, sh in self.shadow.items()}
        assert pl.merge_and_unload(self.model) is self.model
        for name, weight in expected.items():
            module = self.layer(name)
            assert type(module) is nn.Linear
            assert_close64(module.weight, weight, RTOL, what=f"{name} weight after merge_and_unload")
            original_bias = self.original.get_submodule(name).bias
            if original_bias is None:
                assert module.bias is None
            else:
                assert torch.equal(module.bias, original_bias)
                assert not module.bias.requires_grad
            assert not module.weight.requires_grad  # frozen, as the base was (bias="none")
            # the merged weight is the new base, as the test computed it
            self.base_w[name] = weight
            self.exact_base.discard(name)
        self.shadow.clear()
        self.wrapped.clear()
        self.check_without_adapters_refusals()


TestModelStateful = ModelMachine.TestCase
TestModelStateful.settings = settings(max_examples=50, stateful_step_count=25, deadline=None)
