r"""Combining trained LoRA adapters into one: concatenation, truncated SVD, or linear mixing.

Adapter ``i`` contributes the update :math:`\Delta W_i = s_i B_i A_i` (``A_i`` (r_i, in),
``B_i`` (out, r_i), ``s_i`` its scaling) with weight :math:`w_i`. Every method returns factors
``(A, B)`` meant for a layer whose scaling is 1 (``alpha = rank``; with rsLoRA
``alpha = sqrt(rank)``), as Hugging Face PEFT's ``add_weighted_adapter`` sets it (it also copies
the first adapter's rsLoRA flag, which then scales its result by ``sqrt(rank)``; ours is the
weighted sum in every case):

- ``"cat"``: :math:`A = [w_1 s_1 A_1; \dots; w_k s_k A_k]`, :math:`B = [B_1 \dots B_k]`, so
  :math:`B A = \sum_i w_i \Delta W_i` exactly, at rank :math:`\sum_i r_i`.
- ``"svd"``: the best rank-``rank`` approximation of :math:`\sum_i w_i \Delta W_i` (Eckart-Young):
  :math:`B = U_k \operatorname{diag}(S_k)`, :math:`A = V_k^\top`. It is computed from the
  concatenated factors (a QR of each, then the SVD of the small core
  :math:`R_B R_A^\top`), never from a dense (out, in) matrix: :math:`O((out + in) R^2)` work for
  total rank :math:`R`, instead of a full SVD of the update.
- ``"linear"``: all ranks equal; with :math:`c_i = w_i s_i`,
  :math:`A = \sum_i \operatorname{sign}(c_i) \sqrt{|c_i|} A_i` and
  :math:`B = \sum_i \sqrt{|c_i|} B_i`. This mixes the factors, not the updates: :math:`B A` has
  cross terms :math:`B_i A_j` and equals :math:`\sum_i w_i \Delta W_i` only for one adapter. It
  is Hugging Face PEFT's ``"linear"``, kept for adapters trained from a shared start.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Literal, Union

import torch
from torch import Tensor

from ._devices import widest_float
from ._warnings import warn as _warn
from .adapter import holds_non_finite
from .dora import DoRALinear
from .io import read_adapter
from .lora import LoRALinear

__all__ = ["combine", "combine_adapters"]

METHODS = ("cat", "svd", "linear")
Method = Literal["cat", "svd", "linear"]
#: an adapter for :func:`combine`: a pair ``(A, B)`` (its scaling taken as 1) or a LoRA layer
AdapterFactors = Union[LoRALinear, tuple[Tensor, Tensor]]


def _check_method(method: object) -> Method:
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    return method  # type: ignore[return-value]


def _check_weights(weights: object, count: int) -> list[float]:
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"weights: expected a sequence of {count} real numbers, got {type(weights).__name__}")
    if len(weights) != count:
        raise ValueError(f"weights: expected {count} values (one per adapter), got {len(weights)}")
    checked = []
    for i, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(f"weights[{i}]: expected a real number, got {weight!r}")
        if not math.isfinite(weight):
            raise ValueError(f"weights[{i}]: expected a finite number, got {weight!r}")
        checked.append(float(weight))
    return checked


def _check_rank_argument(rank: object, method: str) -> int | None:
    if rank is None:
        return None
    if method != "svd":
        raise ValueError(
            f"rank: applies to method='svd' only, got rank={rank!r} with method={method!r} "
            "('cat' gives the sum of the ranks, 'linear' keeps the common rank)"
        )
    # numbers.Integral: a NumPy integer (a rank read off an array) is an int too
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"rank: expected a positive int or None, got {rank!r}")
    return int(rank)


def _factors_of(adapter: object, where: str) -> tuple[Tensor, Tensor, float]:
    """``(A, B, scaling)`` of one adapter given to :func:`combine`, checked."""
    if isinstance(adapter, DoRALinear):
        raise TypeError(
            f"{where}: a {type(adapter).__name__} cannot be combined: its magnitude rescales every "
            "row, which none of the methods defines (combine LoRA adapters)"
        )
    if isinstance(adapter, LoRALinear):
        return adapter.lora_A.detach(), adapter.lora_B.detach(), float(adapter.scaling)
    if (
        isinstance(adapter, Sequence)
        and len(adapter) == 2
        and all(isinstance(t, Tensor) for t in adapter)
    ):
        lora_A, lora_B = adapter
        _check_pair(lora_A, lora_B, where)
        return lora_A.detach(), lora_B.detach(), 1.0
    got = type(adapter).__name__
    if isinstance(adapter, Sequence) and not isinstance(adapter, (str, bytes)):
        # name what it holds: a pair of numpy arrays or lists is a pair, just not of tensors
        if len(adapter) <= 4:
            got = f"a {got} of ({', '.join(type(item).__name__ for item in adapter)})"
        else:
            got = f"a {got} of length {len(adapter)}"
    raise TypeError(f"{where}: expected a pair (A, B) of tensors or a LoRA layer, got {got}")


def _refuse_non_finite_factors(lora_A: Tensor, lora_B: Tensor, subject: str) -> None:
    """Raise ``ValueError`` "``subject`` has NaN or inf in its factor A (or B)" if one does."""
    for factor, tensor in (("A", lora_A), ("B", lora_B)):
        if holds_non_finite(tensor):
            raise ValueError(f"{subject} has NaN or inf in its factor {factor}; expected finite values")


def _check_pair(lora_A: Tensor, lora_B: Tensor, where: str) -> None:
    if not (lora_A.is_floating_point() and lora_B.is_floating_point()):
        raise ValueError(f"{where}: A and B must be floating tensors, got {lora_A.dtype} and {lora_B.dtype}")
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != lora_B.shape[1] or lora_A.shape[0] < 1:
        raise ValueError(
            f"{where}: expected A (rank, in) and B (out, rank) with the same rank >= 1, "
            f"got A {tuple(lora_A.shape)} and B {tuple(lora_B.shape)}"
        )


def _combine_checked(
    factors: list[tuple[Tensor, Tensor, float]],
    weights: list[float],
    method: str,
    rank: int | None,
    labels: list[str],
    where: str,
) -> tuple[Tensor, Tensor]:
    """The combination of already checked ``(A, B, scaling)`` triples; see the module docstring.
    ``labels`` name the adapters and ``where`` the layer in error messages."""
    out_features, in_features = factors[0][1].shape[0], factors[0][0].shape[1]
    for label, (lora_A, lora_B, _) in zip(labels, factors):
        if (lora_B.shape[0], lora_A.shape[1]) != (out_features, in_features):
            raise ValueError(
                f"{where}: {label} updates a weight of shape (out, in) = "
                f"{(lora_B.shape[0], lora_A.shape[1])}, {labels[0]} one of {(out_features, in_features)}; "
                "all must update the same weight"
            )
    for label, (lora_A, lora_B, _) in zip(labels, factors):
        # NaN or inf would come out as a NaN result ("cat", "linear") or a LinAlgError ("svd")
        _refuse_non_finite_factors(lora_A, lora_B, f"{where}: {label}")
    dtype = factors[0][0].dtype
    for lora_A, lora_B, _ in factors:
        dtype = torch.promote_types(dtype, torch.promote_types(lora_A.dtype, lora_B.dtype))
    device = factors[0][0].device

    if method == "linear":
        ranks = [lora_A.shape[0] for lora_A, _, _ in factors]
        if len(set(ranks)) != 1:
            raise ValueError(
                f"{where}: method 'linear' needs adapters of one rank, got ranks {dict(zip(labels, ranks))}"
            )
        lora_A = torch.zeros(ranks[0], in_features, dtype=dtype, device=device)
        lora_B = torch.zeros(out_features, ranks[0], dtype=dtype, device=device)
        for (a, b, scaling), weight in zip(factors, weights):
            c = weight * scaling
            lora_A.add_(a.to(device, dtype), alpha=math.copysign(math.sqrt(abs(c)), c))
            lora_B.add_(b.to(device, dtype), alpha=math.sqrt(abs(c)))
        return _refuse_overflow((lora_A, lora_B), weights, where)

    # "cat" and "svd" both start from the concatenated factors: B_cat A_cat = sum_i w_i s_i B_i A_i
    # float64 costs little on these (dim, R) matrices and keeps the SVD of near-equal singular
    # values stable
    work = dtype if method == "cat" else widest_float(device)
    lora_A = torch.cat([a.to(device, work) * (w * s) for (a, _, s), w in zip(factors, weights)])
    lora_B = torch.cat([b.to(device, work) for _, b, _ in factors], dim=1)
    _refuse_overflow((lora_A, lora_B), weights, where)  # before the SVD, which would raise a LinAlgError
    if method == "cat":
        return lora_A, lora_B

    if rank is None:
        target_rank = min(max(a.shape[0] for a, _, _ in factors), out_features, in_features)
    else:
        target_rank = rank
    if target_rank > min(out_features, in_features):
        raise ValueError(
            f"rank: {target_rank} exceeds min(out, in) = {min(out_features, in_features)} at {where}"
        )
    q_B, r_B = torch.linalg.qr(lora_B)  # (out, R'), (R', R)
    q_A, r_A = torch.linalg.qr(lora_A.t())  # (in, R''), (R'', R)
    u, singular, vh = torch.linalg.svd(r_B @ r_A.t(), full_matrices=False)
    # the update's numerical rank: singular values at rounding level, measured against the factors'
    # own scale (adapters that overlap or cancel), carry nothing and are dropped like those past
    # the concatenated rank
    scale = torch.linalg.matrix_norm(r_B, 2) * torch.linalg.matrix_norm(r_A, 2)
    tolerance = scale * max(r_B.shape[0], r_A.shape[0]) * torch.finfo(work).eps
    kept = min(target_rank, int((singular > tolerance).sum()))
    new_B = torch.zeros(out_features, target_rank, dtype=work, device=device)
    new_A = torch.zeros(target_rank, in_features, dtype=work, device=device)
    # U_k diag(S_k) and V_k^T of the update; components past the update's rank stay zero
    new_B[:, :kept] = q_B @ (u[:, :kept] * singular[:kept])
    new_A[:kept] = vh[:kept] @ q_A.t()
    return _refuse_overflow((new_A.to(dtype), new_B.to(dtype)), weights, where)


def _refuse_overflow(pair: tuple[Tensor, Tensor], weights: list[float], where: str) -> tuple[Tensor, Tensor]:
    """``pair``, or ``ValueError`` naming ``weights`` if finite weights (and scalings) took the
    combined factors past their dtype's range: the factors were checked finite before."""
    if any(holds_non_finite(tensor) for tensor in pair):
        raise ValueError(
            f"{where}: weights {weights} scale the factors past {pair[0].dtype}'s range (the combined "
            "factors hold inf); expected weights whose products with the scalings stay finite"
        )
    return pair


def combine(
    adapters: Sequence[AdapterFactors],
    weights: Sequence[float],
    *,
    method: Method = "cat",
    rank: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Combine LoRA adapters of one layer into a single pair ``(A, B)``.

    With :math:`\Delta W_i = s_i B_i A_i`, the result is meant for a layer of scaling 1:
    ``"cat"`` gives :math:`B A = \sum_i w_i \Delta W_i` exactly at rank :math:`\sum_i r_i`;
    ``"svd"`` its best rank-``rank`` approximation (``rank`` defaults to the largest :math:`r_i`);
    ``"linear"`` mixes the factors of adapters of one rank (see the module docstring).

    Args:
        adapters: pairs ``(A, B)`` with ``A`` (r, in) and ``B`` (out, r), taken with scaling 1,
            or LoRA layers, whose ``scaling`` is folded in. DoRA layers are refused: their
            magnitude has no place in these methods.
        weights: one real number per adapter (negative subtracts an adapter).
        method: ``"cat"``, ``"svd"`` or ``"linear"``.
        rank: the rank of the ``"svd"`` result; above the update's own rank the extra components
            are zero. Only for ``"svd"``.

    Returns:
        ``(A, B)``: new tensors (rank, in) and (out, rank), in the promoted dtype of the inputs,
        on the device of the first adapter, not requiring grad.

    Raises:
        TypeError: an adapter is neither a pair of tensors nor a LoRA layer, or is a DoRA layer;
            a weight is not a real number.
        ValueError: no adapters, a count of weights that differs, a weight that is NaN or inf,
            shapes that disagree, factors holding NaN or inf, an unknown method, a ``rank`` that
            is not a positive int, given to another method, or larger than ``min(out, in)``.
    """
    method = _check_method(method)
    if isinstance(adapters, (str, bytes)) or not isinstance(adapters, Sequence):
        raise TypeError(f"adapters: expected a sequence of (A, B) pairs or LoRA layers, got {type(adapters).__name__}")
    if len(adapters) == 0:
        raise ValueError("adapters: expected at least one adapter, got none")
    checked_weights = _check_weights(weights, len(adapters))
    rank = _check_rank_argument(rank, method)
    factors = [_factors_of(adapter, f"adapters[{i}]") for i, adapter in enumerate(adapters)]
    with torch.no_grad():
        labels = [f"adapters[{i}]" for i in range(len(factors))]
        return _combine_checked(factors, checked_weights, method, rank, labels, "adapters")


def lora_factors(
    source: object, where: str, *, base_weights: dict[str, Tensor] | None = None
) -> dict[str, tuple[Tensor, Tensor, float]]:
    """Module path -> ``(A, B, scaling)`` of one LoRA adapter, checked: a directory (scalings
    from its config) or a state dict keyed ``"<module>.lora_A"``/``"<module>.lora_B"`` (scaling 1).
    DoRA and PiSSA adapters, and files with trained biases or modules to save, raise
    ``ValueError``, and so does an adapter with no modules (an empty state dict); ``where`` names
    the source in error messages.

    A Hugging Face file that targets an embedding layer (``lm_head``) also holds that layer's
    full base weight: it goes into ``base_weights`` (path -> weight) when the caller passes one
    to check it against a model; without one, a warning says that the factors alone are taken."""
    if isinstance(source, (str, os.PathLike)):
        adapter = read_adapter(source)
        if adapter.is_dora:
            raise ValueError(f"{where}: {str(source)!r} holds a DoRA adapter; only LoRA adapters can be combined or stacked")
        if adapter.init == "pissa":
            # its factors apply to the residual W0 - s B0 A0 that PiSSA left in the base, not to W0
            raise ValueError(
                f"{where}: {str(source)!r} holds a PiSSA adapter, which only fits the residual base "
                "that load_adapter() rebuilds; it cannot be combined or stacked over the plain base"
            )
        if adapter.bias_mode != "none":
            # a trained bias replaces the base's: it belongs to one adapter, not to a sum or a row
            raise ValueError(
                f"{where}: {str(source)!r} holds trained biases (bias={adapter.config.get('bias')!r}), "
                "which replace the base's own and cannot be combined or stacked; load_adapter() it alone"
            )
        if adapter.saved_modules:
            # a module trained in full replaces the model's: it belongs to one adapter, as a bias does
            raise ValueError(
                f"{where}: {str(source)!r} holds modules trained in full (modules_to_save: "
                f"{sorted(adapter.saved_modules)}), which replace the model's own and cannot be combined "
                "or stacked; load_adapter() it alone"
            )
        with_base = {path: m.base_weight for path, m in adapter.modules.items() if m.base_weight is not None}
        if base_weights is not None:
            base_weights.update(with_base)
        elif with_base:
            _warn(
                f"{where}: {str(source)!r} also holds the base weights of {sorted(with_base)} (Hugging Face "
                "PEFT saves them for targeted embedding layers); only the factors are combined, so the "
                "base model must already hold those weights",
            )
        if not adapter.modules:
            raise ValueError(f"{where}: {str(source)!r} holds no adapter modules; expected at least one")
        return {
            path: (module.lora_A, module.lora_B, adapter.scaling(path))
            for path, module in adapter.modules.items()
        }
    if not isinstance(source, Mapping):
        raise TypeError(f"{where}: expected a state dict or an adapter directory, got {type(source).__name__}")
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in source.items():
        path, _, name = str(key).rpartition(".")
        if name == "magnitude":
            raise ValueError(f"{where}: {key!r} is a DoRA magnitude; only LoRA adapters can be combined or stacked")
        if name not in ("lora_A", "lora_B") and ".trained." in f".{key}":
            raise ValueError(
                f"{where}: {key!r} is the state of a module trained in full (modules_to_save), which "
                "replaces the model's own and cannot be combined or stacked; leave it out, or "
                "load_adapter_state_dict() the adapter alone"
            )
        if name == "bias":
            raise ValueError(
                f"{where}: {key!r} is a trained bias (bias='adapter_only' or 'all'), which is not part of "
                "the low-rank update and cannot be combined or stacked; leave it out"
            )
        if name not in ("lora_A", "lora_B"):
            raise ValueError(
                f"{where}: unexpected key {key!r}; expected '<module>.lora_A' and '<module>.lora_B' "
                "as adapter_state_dict() gives them"
            )
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}[{key!r}]: expected a Tensor, got {type(value).__name__}")
        pairs.setdefault(path, {})[name] = value
    modules = {}
    for path, pair in pairs.items():
        if len(pair) != 2:
            missing = "lora_B" if "lora_A" in pair else "lora_A"
            raise ValueError(f"{where}: module {path!r} has no {missing}")
        _check_pair(pair["lora_A"], pair["lora_B"], f"{where}: module {path!r}")
        modules[path] = (pair["lora_A"], pair["lora_B"], 1.0)
    if not modules:
        raise ValueError(
            f"{where}: holds no adapter modules; expected '<module>.lora_A' and '<module>.lora_B' "
            "keys as adapter_state_dict() gives them, got an empty state dict"
        )
    return modules


def combine_adapters(
    state_dicts_or_dirs: Sequence[Mapping[str, Tensor] | str | os.PathLike[str]],
    weights: Sequence[float],
    *,
    method: Method = "cat",
    rank: int | None = None,
) -> dict[str, Tensor]:
    r"""Combine whole adapters, module by module, with :func:`combine`.

    Args:
        state_dicts_or_dirs: adapter state dicts with the keys of
            :func:`~peft_layers.adapter_state_dict` (``"<module>.lora_A"``, ``"<module>.lora_B"``),
            whose factors are taken with scaling 1, or directories written by
            :func:`~peft_layers.save_adapter` or Hugging Face PEFT, whose ``lora_alpha``, ``r``,
            ``use_rslora`` and patterns give each module's scaling.
        weights: one real number per adapter.
        method, rank: as for :func:`combine`; ``rank`` applies to every module. For ``"svd"``
            it defaults to the largest rank of any adapter at any module (capped at each module's
            ``min(out, in)``), as Hugging Face PEFT's ``add_weighted_adapter`` chooses it: one
            rank for the whole result, and no module truncated below what its adapters hold.

    A module that only some of the adapters update is combined from those (the others add
    nothing to it), so the result holds every module of any adapter.

    Returns:
        A state dict ``{"<module>.lora_A": A, "<module>.lora_B": B}`` for layers of scaling 1.
        To use it, inject layers of the result's ranks with ``alpha`` equal to the rank and load
        it with :func:`~peft_layers.load_adapter_state_dict` (see ``docs/compose.md``).

    Raises:
        TypeError, ValueError: as :func:`combine`, naming the module; a state dict key that is
        not an adapter factor, a factor without its pair, an adapter with no modules (an empty
        state dict), or a DoRA adapter (magnitude keys or a DoRA config). Reading a directory
        raises as :func:`~peft_layers.io.read_adapter` does.
    """
    method = _check_method(method)
    if isinstance(state_dicts_or_dirs, (str, bytes, os.PathLike, Mapping)) or not isinstance(
        state_dicts_or_dirs, Sequence
    ):
        raise TypeError(
            "state_dicts_or_dirs: expected a sequence of state dicts or adapter directories, "
            f"got {type(state_dicts_or_dirs).__name__}"
        )
    if len(state_dicts_or_dirs) == 0:
        raise ValueError("state_dicts_or_dirs: expected at least one adapter, got none")
    checked_weights = _check_weights(weights, len(state_dicts_or_dirs))
    rank = _check_rank_argument(rank, method)
    sources = [lora_factors(s, f"state_dicts_or_dirs[{i}]") for i, s in enumerate(state_dicts_or_dirs)]

    paths = list(dict.fromkeys(path for source in sources for path in source))
    largest = max((a.shape[0] for source in sources for a, _, _ in source.values()), default=0)
    combined: dict[str, Tensor] = {}
    with torch.no_grad():
        for path in paths:
            present = [i for i, source in enumerate(sources) if path in source]
            module_rank = rank
            if method == "svd" and rank is None:
                first_A, first_B, _ = sources[present[0]][path]
                module_rank = min(largest, first_B.shape[0], first_A.shape[1])
            lora_A, lora_B = _combine_checked(
                [sources[i][path] for i in present],
                [checked_weights[i] for i in present],
                method,
                module_rank,
                [f"state_dicts_or_dirs[{i}]" for i in present],
                f"module {path!r}",
            )
            prefix = f"{path}." if path else ""
            combined[prefix + "lora_A"] = lora_A
            combined[prefix + "lora_B"] = lora_B
    return combined
