"""Shared pieces of the benchmark suites: shapes, layer variants, timed steps, memory accounting.

A *variant* is one layer built over the same frozen weight: the plain ``nn.Linear``, our adapter
layers, and Hugging Face PEFT's over an identical base. A :class:`Case` holds one variant with its
own input, output gradient and optimizer, and exposes the timed operations:

- ``train_step()`` (kind ``"train"``, the step issues 2 and 3 define): forward, loss, backward
  with the input requiring grad, then an SGD step on the adapter parameters (the adapter changes
  every step, so no cache keyed on A, B or m can hit). The loss is ``sum(y * G)`` for a fixed
  random ``G``, the cheapest loss there is: one product and a sum, whose gradient reaches the
  layer as ``G``. ``nn.Linear`` has no trainable parameter, so its step is forward, loss and
  backward to the input.
- ``train_step_no_loss()`` (kind ``"train_noloss"``, a stricter cross-check): the same step with
  the loss kernel left out, as ``y.backward(G)``. A cost common to both sides of a ratio pulls it
  towards 1; without it the adapters' extra work shows undiluted.
- ``forward()``: the no-grad forward (``torch.no_grad()``, eval mode).

Nothing here asserts a timing: these are measurements, not tests.
"""

from __future__ import annotations

import math
import os
import random
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: (tokens, in_features, out_features)
SHAPES: tuple[tuple[int, int, int], ...] = ((512, 1024, 1024), (512, 4096, 4096))
RANK = 16
#: the timed operations of a Case: the train step, the same without its loss kernel, the forward
KINDS = ("train", "train_noloss", "forward")
ALPHA = 32.0
LR = 1e-3
THREADS = 2
SEED = 0


def shape_id(shape: tuple[int, int, int]) -> str:
    return "x".join(str(n) for n in shape)


def configure_torch() -> None:
    """Two intra-op threads (the target machine has two cores), fp32, no autograd anomaly mode."""
    torch.set_num_threads(THREADS)
    torch.set_default_dtype(torch.float32)


def rounds_scale() -> float:
    """``PEFT_LAYERS_BENCH_ROUNDS_SCALE`` (default 1) multiplies every round count: 0.2 for a smoke run."""
    value = float(os.environ.get("PEFT_LAYERS_BENCH_ROUNDS_SCALE", "1"))
    if not value > 0:
        raise ValueError(f"PEFT_LAYERS_BENCH_ROUNDS_SCALE: expected a number > 0, got {value!r}")
    return value


def rounds_for(shape: tuple[int, int, int], small: int, large: int) -> int:
    """``small`` rounds for the 1024 shape, ``large`` for the 4096 one, scaled, at least 3."""
    base = small if shape[1] * shape[2] <= 1024 * 1024 else large
    return max(3, round(base * rounds_scale()))


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (None where the OS has none): how busy the machine was."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _cpu_counters() -> tuple[float, float, float] | None:
    """(all CPU time, busy CPU time, this process's CPU time) in seconds since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = [float(v) for v in stat.readline().split()[1:9]]  # user .. steal; guest is in user
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    total = sum(fields) / tick
    busy = total - (fields[3] + fields[4]) / tick  # minus idle and iowait
    times = os.times()
    return total, busy, times.user + times.system


class OthersCpuShare:
    """Context manager: the share of the machine's CPU time that other processes (and the
    hypervisor's steal) took while the block ran, in [0, 1]; None where /proc/stat is missing.
    0 means the benchmark had the machine to itself."""

    def __enter__(self) -> OthersCpuShare:
        self.share: float | None = None
        self._start = _cpu_counters()
        return self

    def __exit__(self, *exc: object) -> None:
        end = _cpu_counters()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return
        total, busy, ours = (b - a for a, b in zip(self._start, end))
        self.share = round(min(1.0, max(0.0, (busy - ours) / total)), 3)


# ---- building the variants ------------------------------------------------------------------
def make_linear(in_features: int, out_features: int, *, seed: int = SEED) -> nn.Linear:
    """A frozen ``nn.Linear`` whose values depend only on ``seed`` (every variant gets a copy)."""
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=True)
    with torch.no_grad():
        bound = 1.0 / math.sqrt(in_features)
        linear.weight.copy_(torch.rand(out_features, in_features, generator=generator) * 2 * bound - bound)
        linear.bias.copy_(torch.rand(out_features, generator=generator) * 2 * bound - bound)
    linear.requires_grad_(False)
    return linear


def perturb_adapter_(layer: nn.Module, *, seed: int = SEED + 1) -> None:
    """Give every ``lora_B`` small random values, so the adapter is not the identity at step 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 1e-3)


class _Holder(nn.Module):
    """The smallest model Hugging Face PEFT can wrap: one linear layer called ``proj``.

    ``is_loaded_in_4bit`` is what a transformers model loaded in 4 bits says of itself: over a
    bitsandbytes ``Linear4bit`` it makes Hugging Face PEFT pick its QLoRA layer
    (``peft.tuners.lora.bnb.Linear4bit``), the one its users get, not its generic LoRA layer."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj
        self.is_loaded_in_4bit = is_bitsandbytes_4bit(proj)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def is_bitsandbytes_4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` (by class name: bitsandbytes need not
    be importable for the dense suites)."""
    return type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")


class AdapterChangedEachCall(nn.Module):
    """``layer`` with its adapter changed before every call: ``A``'s version counter is bumped
    (its values kept), so a DoRA layer's no-grad forward finds no cached gain ``m / n`` and
    computes it, as the first forward after an optimizer step does."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.in_features, self.out_features = _features(layer)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            self.layer.lora_A.add_(0.0)
        return self.layer(x)


class WithDoraCaching(nn.Module):
    """Hugging Face PEFT's layer called inside ``peft.helpers.DoraCaching()``: its opt-in cache of
    the weight norm and of ``B A``, off by default, is on (and kept between calls in eval)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.in_features, self.out_features = _features(layer)

    def forward(self, x: Tensor) -> Tensor:
        from peft.helpers import DoraCaching

        with DoraCaching():
            return self.layer(x)


def hf_peft_layer(base: nn.Module, *, use_dora: bool) -> nn.Module:
    """Hugging Face PEFT's LoRA/DoRA layer over ``base`` (rank 16, alpha 32), the layer itself."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=0.0, use_dora=use_dora)
    model = get_peft_model(_Holder(base), config)
    return model.base_model.model.proj


def hf_peft_model(base: nn.Module, adapters: dict[str, tuple[Tensor, Tensor]]) -> nn.Module:
    """A Hugging Face PEFT model over ``base`` (as ``proj``) holding ``adapters`` (name -> ``(A, B)``)
    at rank 16, alpha 32, the first one active."""
    from peft import LoraConfig, get_peft_model

    config = dict(r=RANK, lora_alpha=ALPHA, target_modules=["proj"])
    names = list(adapters)
    model = get_peft_model(_Holder(base), LoraConfig(**config), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, LoraConfig(**config))
    layer = model.base_model.model.proj
    with torch.no_grad():
        for name, (lora_A, lora_B) in adapters.items():
            layer.lora_A[name].weight.copy_(lora_A)
            layer.lora_B[name].weight.copy_(lora_B)
    return model


def build_dense_variant(name: str, in_features: int, out_features: int) -> nn.Module:
    """One variant over a fresh copy of the seeded weight.

    ``linear``/``linear_copy`` (the A/A control), ``lora``, ``dora``, ``hf_lora``, ``hf_dora``,
    ``lora_merged``, ``dora_merged``; for no-grad forwards also ``dora_uncached`` (the adapter
    changed before each call: :class:`AdapterChangedEachCall`) and ``hf_dora_cached``
    (:class:`WithDoraCaching`).
    """
    import peft_layers as pl

    linear = make_linear(in_features, out_features)
    if name in ("linear", "linear_copy"):
        return linear
    if name in ("lora", "lora_merged"):
        layer: nn.Module = pl.LoRALinear.from_linear(linear, rank=RANK, alpha=ALPHA)
    elif name in ("dora", "dora_merged", "dora_uncached"):
        layer = pl.DoRALinear.from_linear(linear, rank=RANK, alpha=ALPHA)
    elif name == "hf_lora":
        layer = hf_peft_layer(linear, use_dora=False)
    elif name in ("hf_dora", "hf_dora_cached"):
        layer = hf_peft_layer(linear, use_dora=True)
    else:
        raise ValueError(f"variant: unknown dense variant {name!r}")
    perturb_adapter_(layer)
    if name.endswith("_merged"):
        layer.merge()
    return wrapped_for(name, layer)


def wrapped_for(name: str, layer: nn.Module) -> nn.Module:
    """``layer`` in the wrapper that a variant's name asks for (``*_uncached``, ``*_cached``)."""
    if name.endswith("_uncached"):
        return AdapterChangedEachCall(layer)
    if name.endswith("_cached"):
        return WithDoraCaching(layer)
    return layer


# ---- the timed operations ---------------------------------------------------------------------
@dataclass
class Case:
    """One variant ready to time: its layer, inputs, output gradient and optimizer."""

    name: str
    layer: nn.Module
    tokens: int
    x_train: Tensor = field(init=False)
    x_forward: Tensor = field(init=False)
    grad_out: Tensor = field(init=False)
    optimizer: torch.optim.Optimizer | None = field(init=False)

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(SEED + 2)
        in_features, out_features = _features(self.layer)
        x = torch.randn(self.tokens, in_features, generator=generator)
        self.x_train = x.clone().requires_grad_(True)
        self.x_forward = x.clone()
        self.grad_out = torch.randn(self.tokens, out_features, generator=generator) / self.tokens
        params = [p for p in self.layer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=LR) if params else None

    def train_step(self) -> None:
        """Forward + loss ``sum(y * G)`` + backward (input requires grad) + SGD step (train mode:
        set by :meth:`operation`, outside the timed call)."""
        (self.layer(self.x_train) * self.grad_out).sum().backward()
        self._finish_step()

    def train_step_no_loss(self) -> None:
        """:meth:`train_step` without the loss kernel: ``y.backward(G)``."""
        self.layer(self.x_train).backward(self.grad_out)
        self._finish_step()

    def _finish_step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.x_train.grad = None

    def forward(self) -> None:
        """No-grad forward (eval mode: set by :meth:`operation`, outside the timed call)."""
        with torch.no_grad():
            self.layer(self.x_forward)

    def operation(self, kind: str) -> Callable[[], None]:
        """The timed call for ``kind`` (see :data:`KINDS`), with the layer put in train or eval
        mode once, here: ``Module.train()`` walks every submodule, and timing that walk would
        charge layers with many submodules (Hugging Face PEFT's) for bookkeeping."""
        if kind == "train":
            self.layer.train()
            return self.train_step
        if kind == "train_noloss":
            self.layer.train()
            return self.train_step_no_loss
        if kind == "forward":
            self.layer.eval()
            return self.forward
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")


def _features(layer: nn.Module) -> tuple[int, int]:
    return int(layer.in_features), int(layer.out_features)


# ---- paired (interleaved) timing --------------------------------------------------------------
def paired_rounds(
    operations: dict[str, Callable[[], None]], *, warmup: int = 2
) -> tuple[Callable[[], None], dict[str, list[float]]]:
    """A function that runs one round of every operation, and the per-operation times it collects.

    Each round runs the operations in a new random order (seeded, so runs repeat), so every
    variant follows every other one about equally often: what an operation leaves behind (caches,
    allocator state, a library's spinning worker threads) then weighs on all variants alike. A
    fixed order, even rotated each round, keeps each variant's predecessor the same in all but
    one place per round, which once put an A/A control 7.5% apart. Each operation is timed on its
    own with ``perf_counter``; ratios are then taken round by round
    (``t_candidate[i] / t_baseline[i]``), which cancels the slow drifts (frequency, neighbours on a
    shared host) that separate runs minutes apart would see.
    ``warmup`` rounds run at once and are not recorded.
    """
    names = list(operations)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(warmup):
        for name in names:
            operations[name]()
    order = random.Random(0)

    def one_round() -> None:
        for name in order.sample(names, len(names)):
            begin = time.perf_counter()
            operations[name]()
            times[name].append(time.perf_counter() - begin)

    return one_round, times


# ---- memory ------------------------------------------------------------------------------------
class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes held by tensor storages created inside the ``with`` block.

    Every aten op's outputs are inspected; a storage not seen before and not shared with one of
    the op's inputs (views and in-place results share theirs) counts as an allocation of
    ``storage.nbytes()``, released when the storage is freed (a weak reference to the storage's
    Python object, which lives exactly as long as the storage). CPU has no
    ``torch.cuda.max_memory_allocated``; this counts the same thing for tensors, ignoring
    allocator slack and kernels' private scratch space.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        #: nbytes of every allocation, in order
        self.allocations: list[int] = []
        self._live: dict[int, int] = {}

    def __torch_dispatch__(self, func: Any, types: Iterable[type], args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in inputs or key in self._live:
                continue
            nbytes = storage.nbytes()
            self._live[key] = nbytes
            self.current += nbytes
            self.allocations.append(nbytes)
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key)
        return out

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)


def step_memory(step: Callable[[], None], weight_bytes: int) -> dict[str, int]:
    """Tensor memory of one call of ``step``: ``peak_bytes`` allocated beyond what existed before,
    and ``weight_sized`` = how many allocations held at least ``weight_bytes`` (an out x in weight)."""
    with PeakTensorMemory() as meter:
        step()
    return {
        "peak_bytes": meter.peak,
        "weight_sized": sum(nbytes >= weight_bytes for nbytes in meter.allocations),
        "allocations": len(meter.allocations),
    }


# ---- the timed bodies the suites share ----------------------------------------------------------
def shape_params(variants: tuple[str, ...]) -> list[Any]:
    """``pytest.param(shape, v)`` for every shape and every ``v`` (variants, or step kinds), with
    readable ids."""
    import pytest

    return [pytest.param(shape, v, id=f"{shape_id(shape)}-{v}") for shape in SHAPES for v in variants]


def _group(suite: str, label: str) -> str:
    """pytest-benchmark's group: ``label``, prefixed with the suite's name outside ``layers``."""
    return label if suite == "layers" else f"{suite} {label}"


def time_sequential(
    benchmark: Any, case: Case, *, suite: str, kind: str, shape: tuple[int, int, int],
    rounds: int, warmup_rounds: int,
) -> None:
    """One pytest-benchmark of ``case``'s ``kind`` step (one of :data:`KINDS`), with metadata."""
    benchmark.group = _group(suite, f"{kind} {shape_id(shape)}")
    benchmark.extra_info.update(suite=suite, kind=kind, shape=shape_id(shape), variant=case.name)
    with OthersCpuShare() as others:
        benchmark.pedantic(case.operation(kind), rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    benchmark.extra_info["others_cpu_share"] = others.share


def time_paired(
    benchmark: Any, cases: dict[str, Case], *, suite: str, kind: str, shape: tuple[int, int, int], rounds: int,
) -> None:
    """All ``cases``' ``kind`` steps interleaved round by round, as :func:`time_operations`."""
    operations = {name: case.operation(kind) for name, case in cases.items()}
    time_operations(benchmark, operations, suite=suite, kind=kind, shape=shape_id(shape), rounds=rounds)


def time_operations(
    benchmark: Any, operations: dict[str, Callable[[], None]], *, suite: str, kind: str, shape: str,
    rounds: int, warmup: int = 2,
) -> None:
    """``operations`` interleaved round by round (see :func:`paired_rounds`), their times in
    extra_info under ``suite``/``kind``/``shape``, where ``report.py`` reads them."""
    one_round, times = paired_rounds(operations, warmup=warmup)
    benchmark.group = _group(suite, f"paired {kind} {shape}")
    benchmark.extra_info.update(suite=suite, kind=kind, shape=shape, mode="paired", times=times)
    with OthersCpuShare() as others:
        benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=0, iterations=1)
    benchmark.extra_info["others_cpu_share"] = others.share


def measure_memory(benchmark: Any, case: Case, *, suite: str, shape: tuple[int, int, int]) -> None:
    """Peak tensor bytes and weight-sized allocations of one train step (after a first one)."""
    step = case.operation("train")
    step()  # first step outside: lazy caches and optimizer state exist before measuring
    benchmark.group = _group(suite, f"memory {shape_id(shape)}")
    benchmark.extra_info.update(suite=suite, kind="memory", shape=shape_id(shape), variant=case.name)
    weight_bytes = 4 * shape[1] * shape[2]
    memory = benchmark.pedantic(lambda: step_memory(step, weight_bytes), rounds=1, iterations=1)
    benchmark.extra_info.update(memory)
