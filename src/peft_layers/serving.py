r"""Many LoRA adapters over one base model, chosen per call or per batch row (serving).

``stack_adapters(model, {"math": ..., "code": ...})`` puts a :class:`MultiLoRALinear` at every
layer an adapter updates. Each holds the frozen base layer once and every adapter's ``(A, B)``;
for batch row ``b`` using adapter ``k``

.. math::
    y_b = \mathrm{base}(x_b) + s_k\,(x_b A_k^\top) B_k^\top,

and ``y_b = base(x_b)`` for a row with no adapter (or an adapter that does not touch this layer).
``set_adapter(model, name)`` chooses one adapter for every row; ``with adapter_batch(model,
names)`` chooses one per row for the calls inside the block. The adapters are frozen (inference);
LoRA only, since a DoRA magnitude would need its own norm per adapter and row.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from numbers import Real
from typing import cast

import torch
from torch import Tensor, nn

from .adapter import (
    autocast_enabled,
    autocast_off,
    base_features,
    check_linear_input,
    global_forward_hooks,
    has_hooks,
    is_conv1d,
)
from .compose import lora_factors, _refuse_non_finite_factors
from .dora import DoRALinear
from .io._save import _bias_mode
from .lora import LoRALinear, _scaled_mm, is_bitsandbytes_module
from .model import iter_adapter_layers, iter_modules_to_save, unwrapped
from .model._inject import weight_read_directly
from .model._methods import _check_model
from .model._tree import _module_names, _set_module
from .quant import QuantizedLinear

__all__ = ["MultiLoRALinear", "adapter_batch", "set_adapter", "stack_adapters"]

#: adapter_batch()'s per-row choices of the running thread (or asyncio task): id(stack) -> names.
#: Context-local, so that requests served at once from a thread pool do not see each other's.
_ROW_CHOICE: ContextVar[dict[int, list] | None] = ContextVar("peft_layers_row_choice", default=None)

#: the adapter name an existing LoRA layer's own adapter gets when its model is stacked
DEFAULT_ADAPTER = "default"


class MultiLoRALinear(nn.Module):
    r"""A base layer with several LoRA adapters; each batch row uses one of them, or none. The
    adapters do not train; the base keeps its ``requires_grad`` (:func:`stack_adapters` leaves
    the model's flags as they are).

    .. math::
        y_b = \mathrm{base}(x_b) + s_k\,(x_b A_k^\top) B_k^\top \quad\text{(row } b \text{ with adapter } k)

    Attributes:
        base_layer: the layer (``nn.Linear``, ``QuantizedLinear``, a bitsandbytes layer,
            a transformers ``Conv1D`` or a LoRA layer); any other module raises ``TypeError``.
        lora_A, lora_B: ``nn.ParameterDict`` of name -> ``(r, in)`` / ``(out, r)``, not trainable.
        scaling: name -> ``s`` (``alpha / r``, rsLoRA ``alpha / sqrt(r)``).
        active_adapter: the adapter of every row when no per-row choice is set; None = base only.
        row_adapters: the per-row choice set by :func:`adapter_batch`, or None.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not (isinstance(base_layer, (nn.Linear, QuantizedLinear, LoRALinear)) or is_conv1d(base_layer)):
            raise TypeError(
                "base_layer: expected an nn.Linear, a QuantizedLinear, a bitsandbytes "
                "Linear4bit/Linear8bitLt, a transformers Conv1D or a LoRA layer, got "
                f"{type(base_layer).__module__}.{type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.in_features, self.out_features = base_features(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.row_adapters: list[str | None] | None = None

    @property
    def row_adapters(self) -> list[str | None] | None:
        """The per-row adapter names: the running context's :func:`adapter_batch` choice for this
        stack, else the one assigned here (None: :attr:`active_adapter` for every row)."""
        choice = _ROW_CHOICE.get()
        if choice is not None and id(self) in choice:
            return choice[id(self)]
        return self.__dict__.get("_row_adapters")

    @row_adapters.setter
    def row_adapters(self, rows: list[str | None] | None) -> None:
        self.__dict__["_row_adapters"] = rows

    @property
    def weight(self) -> Tensor:
        """The base layer's weight (models such as T5 read ``layer.weight.dtype``)."""
        return cast(Tensor, self.base_layer.weight)

    @property
    def bias(self) -> Tensor | None:
        """The base layer's bias."""
        return cast("Tensor | None", self.base_layer.bias)

    @property
    def adapter_names(self) -> list[str]:
        """The names of the adapters this layer holds, in the order they were added."""
        return list(self.lora_A.keys())

    def check_adapter(self, name: str, lora_A: Tensor, lora_B: Tensor, where: str) -> None:
        """Raise ``ValueError`` unless ``(lora_A, lora_B)`` fits this layer under a new ``name``:
        ``A`` (rank, in_features) and ``B`` (out_features, rank) with rank >= 1."""
        if name in self.lora_A:
            raise ValueError(f"{where}: this layer already has an adapter named {name!r}")
        rank = lora_A.shape[0] if lora_A.dim() == 2 else -1
        if (
            rank < 1
            or tuple(lora_A.shape) != (rank, self.in_features)
            or tuple(lora_B.shape) != (self.out_features, rank)
        ):
            raise ValueError(
                f"{where}: A {tuple(lora_A.shape)} and B {tuple(lora_B.shape)} do not fit the layer: "
                f"expected A (rank, {self.in_features}) and B ({self.out_features}, rank) with rank >= 1"
            )

    def add_adapter(self, name: str, lora_A: Tensor, lora_B: Tensor, scaling: float) -> None:
        """Add a frozen copy of ``(lora_A, lora_B)`` under ``name``: a non-empty str without
        ``'.'``, floating tensors that fit the layer (:meth:`check_adapter`) and a finite
        ``scaling``; anything else raises ``TypeError``/``ValueError``."""
        _check_name(name, "name")
        for argument, tensor in (("lora_A", lora_A), ("lora_B", lora_B)):
            if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
                raise TypeError(f"{argument}: expected a floating Tensor, got {tensor!r:.80}")
        if isinstance(scaling, bool) or not isinstance(scaling, Real):
            raise TypeError(f"scaling: expected a finite real number, got {type(scaling).__name__} {scaling!r}")
        if not math.isfinite(scaling):
            raise ValueError(f"scaling: expected a finite real number, got {scaling!r}")
        self.check_adapter(name, lora_A, lora_B, f"adapter {name!r}")
        device = next(itertools.chain(self.base_layer.parameters(), self.base_layer.buffers()), lora_A).device
        self.lora_A[name] = nn.Parameter(lora_A.detach().to(device, copy=True), requires_grad=False)
        self.lora_B[name] = nn.Parameter(lora_B.detach().to(device, copy=True), requires_grad=False)
        self.scaling[name] = float(scaling)
        self.__dict__.pop("_row_index_cache", None)  # its rows of this name were left out

    def _delta(self, x: Tensor, name: str) -> Tensor:
        """``s (x A^T) B^T`` for ``x`` of shape ``(*, in_features)``, ``s`` applied inside the
        second GEMM, before its result is rounded to a 16-bit dtype (either factor alone can
        overflow float16 where their product does not)."""
        lora_A, lora_B = self.lora_A[name].to(x.dtype), self.lora_B[name].to(x.dtype)
        t = (x @ lora_A.t()).reshape(-1, lora_A.shape[0])
        # out of place (not addmm_ into it): autocast casts addmm's operands, not addmm_'s
        delta = _scaled_mm(t, lora_B.t(), self.scaling[name], shape_of=t.new_empty(()))
        return delta.reshape(*x.shape[:-1], lora_B.shape[0])

    def _add_delta_(self, out: Tensor, x: Tensor, name: str) -> None:
        """``out += s (x A^T) B^T`` in place, in ``out``'s dtype, the scaling inside the GEMM."""
        lora_A, lora_B = self.lora_A[name].to(out.dtype), self.lora_B[name].to(out.dtype)
        x2d = x.reshape(-1, self.in_features).to(out.dtype)
        # in out's dtype even under autocast, which would make x A^T its own dtype, and whose
        # casts the in-place addmm_ does not get
        with autocast_off(x):
            out.view(-1, self.out_features).addmm_(x2d @ lora_A.t(), lora_B.t(), alpha=self.scaling[name])

    def forward(self, x: Tensor) -> Tensor:
        """``(*, in_features) -> (*, out_features)``; with a per-row choice, ``x`` is
        ``(batch, *, in_features)`` with one entry of ``row_adapters`` per batch row."""
        check_linear_input(x, self.in_features)
        # as the adapter layers do: compute in the base's dtype, return the input's (autocast
        # decides both inside the base layer)
        input_dtype = x.dtype
        compute_dtype = None if autocast_enabled(x) else self._compute_dtype()
        if compute_dtype is not None and x.dtype != compute_dtype and x.is_floating_point():
            x = x.to(compute_dtype)
        out = self._forward(x)
        return out if compute_dtype is None or out.dtype == input_dtype else out.to(input_dtype)

    def _compute_dtype(self) -> torch.dtype | None:
        """The dtype the base computes in; None for a bitsandbytes layer, which casts for itself."""
        base = self.base_layer
        if is_bitsandbytes_module(base):
            return None
        dtype = getattr(base, "compute_dtype", None)  # an adapter layer or a QuantizedLinear
        return dtype if isinstance(dtype, torch.dtype) else cast(Tensor, base.weight).dtype

    def _forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        # serving (nothing needs a gradient): add into the base output instead of copying it,
        # unless hooks may hold that output: the base layer's own, or global module forward hooks
        # (nn.modules.module.register_module_forward_hook, e.g. activation-capture tools)
        hooked = has_hooks(self.base_layer) or global_forward_hooks()
        in_place = not out.requires_grad and out.is_contiguous() and not hooked
        rows = self.row_adapters
        if rows is None:
            name = self.active_adapter
            if name is None or name not in self.lora_A:  # None, or an adapter that skips this layer
                return out
            if in_place:
                self._add_delta_(out, x, name)
                return out
            return out + self._delta(x, name).to(out.dtype)
        if x.dim() < 2 or x.shape[0] % len(rows):
            raise ValueError(
                f"input: adapter_batch() chose adapters for {len(rows)} rows, got an input of shape "
                f"{tuple(x.shape)} (rows are the first dimension; k times as many rows repeat each "
                "choice k times)"
            )
        for name, index in self._row_indices(rows, x.shape[0], x.device).items():
            delta = self._delta(x.index_select(0, index), name).to(out.dtype)
            out = out.index_add_(0, index, delta) if in_place else out.index_add(0, index, delta)
        return out

    def _row_indices(self, rows: list[str | None], batch: int, device: torch.device) -> dict[str, Tensor]:
        """Adapter name -> the batch rows that use it, on ``device``; kept for the next call with
        the same choice (every step of a generation), since building the index on a GPU is a
        blocking copy from the host, per layer and adapter."""
        key = (tuple(rows), batch, device)
        cached = self.__dict__.get("_row_index_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        # generate(num_beams=k) and num_return_sequences=k repeat each row k times in place
        repeated = [row for row in rows for _ in range(batch // len(rows))]
        indices = {
            name: torch.tensor([b for b, row in enumerate(repeated) if row == name], device=device)
            for name in dict.fromkeys(repeated)
            if name is not None and name in self.lora_A
        }
        self.__dict__["_row_index_cache"] = (key, indices)
        return indices

    def extra_repr(self) -> str:
        ranks = {name: a.shape[0] for name, a in self.lora_A.items()}
        return f"adapters (rank)={ranks}, active={self.active_adapter!r}"


def _check_name(name: object, argument: str) -> None:
    # the adapters live in nn.ParameterDicts: a key cannot hold '.', and it becomes an attribute,
    # so a key such as "keys", "to" or "training" would shadow (or fail to replace) the dict's own
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"{argument}: a name must be a non-empty str without '.', got {name!r}")
    if hasattr(_EMPTY_PARAMETER_DICT, name):
        raise ValueError(
            f"{argument}: the name {name!r} is an attribute of nn.ParameterDict, which holds the "
            "adapters; choose another name"
        )


_EMPTY_PARAMETER_DICT = nn.ParameterDict()


def _check_names(adapters: object, taken: set[str]) -> list[str]:
    if not isinstance(adapters, Mapping):
        raise TypeError(
            f"adapters: expected a mapping of name -> adapter directory or state dict, got {type(adapters).__name__}"
        )
    if not adapters:
        raise ValueError("adapters: expected at least one adapter, got an empty mapping")
    for name in adapters:
        _check_name(name, "adapters")
        if name in taken:
            raise ValueError(f"adapters: the name {name!r} is taken; the model already has {sorted(taken)}")
    return list(adapters)


def _stackable(module: nn.Module) -> bool:
    """A layer whose weight an adapter can update: a linear layer, quantized or not."""
    return isinstance(module, (nn.Linear, QuantizedLinear, MultiLoRALinear, LoRALinear)) or is_conv1d(module)


def _holder_path(modules: Mapping[str, nn.Module], path: str) -> str | None:
    """The path of the adapter layer or stack (of ``modules``, by path) that ``path`` lies inside
    (its ``base_layer`` or deeper), or None."""
    if not path:
        return None
    parts = path.split(".")
    for end in range(len(parts)):  # from the root down
        prefix = ".".join(parts[:end])
        if isinstance(modules.get(prefix), (LoRALinear, MultiLoRALinear)):
            return prefix
    return None


def stack_adapters(
    model: nn.Module, adapters: Mapping[str, str | os.PathLike[str] | Mapping[str, Tensor]]
) -> nn.Module:
    """Put several LoRA adapters on one model for serving, each under its name.

    Args:
        model: a plain model (the adapters' module paths say where they go), a model with LoRA
            layers (each becomes a :class:`MultiLoRALinear` keeping its own adapter under the name
            ``"default"``, which stays active, or inactive where the layer's adapter was
            disabled), or a model stacked before (more adapters are added).
        adapters: name -> an adapter directory (ours or Hugging Face PEFT's; scalings from its
            config) or a state dict keyed ``"<module>.lora_A"``/``"<module>.lora_B"`` (scaling 1,
            as :func:`peft_layers.compose.combine_adapters` returns it).

    Every layer an adapter updates becomes a :class:`MultiLoRALinear`; layers no adapter names
    stay as they are. Nothing is trained or unfrozen. Rows use no adapter until
    :func:`set_adapter` or :func:`adapter_batch` choose one (except ``"default"``, see above).

    Raises ``TypeError``/``ValueError`` naming the adapter and module: a name that is empty,
    holds a ``'.'``, is taken or is an attribute of ``nn.ParameterDict`` (``"keys"``, ``"to"``); a
    DoRA adapter or layer; a merged LoRA layer, or one inside a disable block; a module path the
    model does not have, one that is not a linear layer, or one inside an adapter layer or stack
    (its ``base_layer``: name the layer itself); factors whose shapes do not fit; an
    adapter with no modules. On any error the model is unchanged. A ``torch.compile``'d or
    data-parallel model is stacked inside its wrapper (:func:`~peft_layers.model.unwrapped`),
    where the adapters' module paths are.
    """
    wrapper, model = model, unwrapped(model)
    taken = {n for m in model.modules() if isinstance(m, MultiLoRALinear) for n in m.adapter_names}
    names = _check_names(adapters, taken)
    file_base_weights: dict[str, dict[str, Tensor]] = {name: {} for name in names}
    factors = {
        name: lora_factors(adapters[name], f"adapters[{name!r}]", base_weights=file_base_weights[name])
        for name in names
    }
    # as combine_adapters and load_adapter refuse them (a file's are refused on reading already)
    for name, by_path in factors.items():
        for path, (lora_A, lora_B, _) in by_path.items():
            _refuse_non_finite_factors(lora_A, lora_B, f"adapters[{name!r}]: module {path!r}")

    # the model's own LoRA layers become stacks too, keeping their adapter as "default"
    own_layers = list(iter_adapter_layers(model))
    for path, layer in own_layers:
        if isinstance(layer, DoRALinear):
            raise TypeError(f"model: {path!r} is a {type(layer).__name__}; only LoRA adapters can be stacked")
        if layer.init == "pissa":
            raise ValueError(
                f"model: {path!r} was initialised with PiSSA, so its base holds the residual W0 - s B0 A0, "
                "not the model's weight; other adapters cannot be stacked over it"
            )
        if layer.merged:
            raise ValueError(f"model: {path!r} is merged; unmerge_adapters(model) before stacking")
        if layer.disable_blocks:  # the block's exit would restore (and re-merge) the replaced layer
            raise ValueError(
                f"model: {path!r} is inside a disable_adapter() / disable_adapters() block, whose exit "
                "restores it (a merged one merges again, into the base the stack would share); stack "
                "after the block"
            )
    if own_layers and _bias_mode(model, own_layers) != "none":
        raise ValueError(
            "model: its biases train with its own adapter (bias='adapter_only' or 'all'); a trained "
            "bias replaces the base's and would apply to every row of the stack. Stack the saved "
            "adapters on the plain model instead, or, if the biases were not trained, freeze them "
            "(requires_grad_(False)) first"
        )
    saved = [path for path, _ in iter_modules_to_save(model)]
    if saved:
        raise ValueError(
            f"model: {saved} are modules to save (ModuleToSave), trained in full with the model's own "
            "adapter; they would apply to every row of the stack. Stack the saved adapters on the "
            "plain model instead (unload() first)"
        )
    if own_layers and DEFAULT_ADAPTER in names:
        raise ValueError(f"adapters: the name {DEFAULT_ADAPTER!r} is taken by the model's own LoRA adapter")

    # plan every layer before touching the model: module id -> the stack it will be
    modules = dict(model.named_modules(remove_duplicate=False))
    plan: dict[int, MultiLoRALinear] = {}
    replaced: dict[int, nn.Module] = {}  # id -> a module a new stack replaces

    def stack_at(path: str, where: str) -> MultiLoRALinear:
        if path == "" and not isinstance(model, MultiLoRALinear):  # a stack itself takes more
            if isinstance(model, LoRALinear):
                # what stack_adapters does for a model's own LoRA layers (active if it was enabled)
                active = f" stack.active_adapter = {DEFAULT_ADAPTER!r};" if model.adapter_enabled else ""
                advice = (
                    f"stack = MultiLoRALinear(model.base_layer); stack.add_adapter({DEFAULT_ADAPTER!r}, "
                    f"model.lora_A, model.lora_B, model.scaling);{active} then stack.add_adapter(name, "
                    "lora_A, lora_B, scaling)"
                )
            else:
                advice = "stack = MultiLoRALinear(model), then stack.add_adapter(name, lora_A, lora_B, scaling)"
            raise ValueError(
                f"{where}: the adapter is for the model itself, a linear layer, which cannot be "
                f"replaced in place; stack over it yourself: {advice}"
            )
        module = modules.get(path)
        if module is None:
            # where adapters can go: not the layers inside adapter layers and stacks
            linears = [n for n, m in modules.items() if _stackable(m) and _holder_path(modules, n) is None][:20]
            raise ValueError(f"{where}: the model has no module {path!r}; its linear layers include {linears}")
        holder = _holder_path(modules, path)
        if holder is not None:
            at = f"the layer at {holder!r}" if holder else "the model itself"
            raise ValueError(
                f"{where}: {path!r} lies inside {at}, which already has an adapter "
                f"({type(modules[holder]).__name__}); a stack there would nest inside it. Name "
                f"{holder!r} to add the adapter beside the others, or unload(model) first"
            )
        if id(module) in plan:
            return plan[id(module)]
        if not _stackable(module):
            raise TypeError(f"{where}: {path!r} is a {type(module).__name__}, not a linear layer")
        reason = weight_read_directly(modules, path)
        if reason is not None:
            raise TypeError(f"{where}: {path!r} is {reason}")
        if isinstance(module, MultiLoRALinear):
            plan[id(module)] = module
        else:
            base = module.base_layer if isinstance(module, LoRALinear) else module
            plan[id(module)] = MultiLoRALinear(base)
            replaced[id(module)] = module
        return plan[id(module)]

    pending: list[tuple[MultiLoRALinear, str, Tensor, Tensor, float]] = []
    enabled: list[MultiLoRALinear] = []  # stacks whose own adapter was on: it stays on
    for path, layer in own_layers:
        stack = stack_at(path, "model")
        pending.append((stack, DEFAULT_ADAPTER, layer.lora_A, layer.lora_B, layer.scaling))
        if layer.adapter_enabled:
            enabled.append(stack)
    for name in names:
        first_path: dict[int, str] = {}  # a shared module is reachable under several paths
        for path, (lora_A, lora_B, scaling) in factors[name].items():
            where = f"adapters[{name!r}], module {path!r}"
            stack = stack_at(path, where)
            if id(stack) in first_path:
                raise ValueError(
                    f"{where}: is the same module as {first_path[id(stack)]!r} (shared), and the adapter "
                    "updates it twice"
                )
            first_path[id(stack)] = path
            stack.check_adapter(name, lora_A, lora_B, where)
            if path in file_base_weights[name]:
                _check_same_base_weight(file_base_weights[name][path], stack.base_layer, where)
            pending.append((stack, name, lora_A, lora_B, scaling))

    for stack, name, lora_A, lora_B, scaling in pending:
        stack.add_adapter(name, lora_A, lora_B, scaling)
    for stack in enabled:
        stack.active_adapter = DEFAULT_ADAPTER
    all_names = _module_names(model)
    for module_id in replaced:
        for name in all_names[module_id]:
            _set_module(model, name, plan[module_id])
    return wrapper


def _check_same_base_weight(file_weight: Tensor, base: nn.Module, where: str) -> None:
    """The stack shares the model's base: a file's own base weight (Hugging Face PEFT saves those
    of targeted embedding layers) must be the model's, or the adapter would compute another model."""
    weight = cast(Tensor, base.weight)
    same = (
        isinstance(base, nn.Linear)
        and not is_bitsandbytes_module(base)
        and tuple(weight.shape) == tuple(file_weight.shape)
        and torch.equal(file_weight.to(weight.device, weight.dtype), weight.detach())
    )
    if not same:
        raise ValueError(
            f"{where}: the file also holds this layer's base weight (Hugging Face PEFT saves it for "
            "targeted embedding layers), and it is not the model's; stacked adapters share the model's "
            "base, so load_adapter() this adapter alone (it copies the base weight in)"
        )


def _stacks(model: nn.Module, caller: str) -> list[MultiLoRALinear]:
    _check_model(model)
    stacks = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    if not stacks:
        raise ValueError(f"{caller}: the model has no stacked adapters; stack_adapters() first")
    return stacks


def _check_adapter_name(name: object, stacks: list[MultiLoRALinear], argument: str) -> None:
    known = sorted({n for stack in stacks for n in stack.adapter_names})
    if name is not None and name not in known:
        raise ValueError(f"{argument}: unknown adapter {name!r}; the model has {known} (or None for the base)")


def set_adapter(model: nn.Module, name: str | None) -> nn.Module:
    """Make every row of every later call use adapter ``name`` (None: the base model alone).

    Raises ``TypeError`` for a ``model`` that is not an ``nn.Module``, ``ValueError`` for a name
    no stacked layer has, or a model with no stacked adapters.
    """
    stacks = _stacks(model, "set_adapter()")
    _check_adapter_name(name, stacks, "name")
    for stack in stacks:
        stack.active_adapter = name
    return model


@contextmanager
def adapter_batch(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row ``b`` of every input batch uses adapter ``names[b]`` (None: base).

    The inputs' first dimension must have ``len(names)`` rows, or ``k * len(names)``: then each
    name covers ``k`` consecutive rows, as ``generate(num_beams=k)`` or
    ``num_return_sequences=k`` repeat every prompt ``k`` times in place. The previous choice comes
    back when the block ends, also on error. The choice belongs to the running thread (or asyncio
    task, a ``contextvars`` context): requests served at once from a thread pool each see their
    own. :func:`set_adapter` is the model's, for every thread. Raises ``TypeError`` for a ``model`` that is not an
    ``nn.Module``, ``ValueError`` for an unknown name.
    """
    stacks = _stacks(model, "adapter_batch()")
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) or not names:
        raise TypeError(f"names: expected a non-empty sequence of adapter names or None, one per row, got {names!r}")
    for i, name in enumerate(names):
        _check_adapter_name(name, stacks, f"names[{i}]")
    rows = list(names)
    token = _ROW_CHOICE.set({**(_ROW_CHOICE.get() or {}), **{id(stack): rows for stack in stacks}})
    try:
        yield model
    finally:
        _ROW_CHOICE.reset(token)
