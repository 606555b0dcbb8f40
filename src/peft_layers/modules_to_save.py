"""Modules trained in full beside the adapters: Hugging Face PEFT's ``modules_to_save``.

A classifier head that fine-tuning creates, or a norm that must adapt, has no pretrained values
worth keeping low-rank: it trains in full and is saved with the adapter. ``ModuleToSave`` keeps
the model's module as it was (``original``, frozen) and trains a copy (``trained``), so that
``unload`` and ``disable_adapters`` can give the base model back.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from ._errors import errors_restated
from .adapter import DISABLE_LOCK

# the public names (the rest is internal, underscore or not); docs/api.md lists them all
__all__ = [
    "ModuleToSave",
]


class ModuleToSave(nn.Module):
    """A module that trains in full beside the adapters and is saved with them.

    Holds ``original``, the model's module, frozen and never written, and ``trained``, a deep copy
    of it whose parameters train. ``forward`` is ``trained``'s, or ``original``'s while disabled
    (:meth:`disable_adapter`, :func:`peft_layers.disable_adapters`). Attributes that are not its
    own (``weight``, ``out_features``, ...) are read from the active module, so model code that
    reads them keeps working. Writes are not passed on: set them on ``trained`` or ``original``
    (so transformers' ``tie_weights`` fails on a module to save, as on Hugging Face PEFT's).

    In a file (Hugging Face PEFT's layout) the trained copy's state is saved under the module's own
    name (``base_model.model.<name>.weight``) and the config lists ``modules_to_save``.
    """

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
        trained = _deep_copy(module)
        super().__init__()
        self.original = module
        self.trained = trained
        self.original.requires_grad_(False)
        self.trained.requires_grad_(True)
        self.enabled = True
        self.training = module.training  # as the module it stands for (its copies share it)

    @property
    def active(self) -> nn.Module:
        """``trained``, or ``original`` while disabled."""
        return self.trained if self.enabled else self.original

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The active module's forward."""
        return self.active(*args, **kwargs)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: ``original`` computes inside the block. Blocks may nest or overlap
        (several threads): the first entry saves ``enabled`` and the last exit restores it."""
        # through __dict__: a missing attribute would be looked up on the active module (__getattr__)
        state = self.__dict__
        with DISABLE_LOCK:
            blocks = state.get("_disable_blocks", 0)
            if blocks == 0:
                state["_enabled_before"] = self.enabled
                self.enabled = False
            state["_disable_blocks"] = blocks + 1
        try:
            yield
        finally:
            with DISABLE_LOCK:
                state["_disable_blocks"] -= 1
                if state["_disable_blocks"] == 0:
                    self.enabled = state["_enabled_before"]

    def __getstate__(self) -> dict[str, Any]:
        # a copy or pickle taken inside a block is outside it: only the live block's exit counts down
        state = dict(super().__getstate__())
        state.pop("_disable_blocks", None)
        state.pop("_enabled_before", None)
        return state

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if not modules or "trained" not in modules:  # during construction or a copy
                raise
            return getattr(self.active, name)

    def extra_repr(self) -> str:
        return f"enabled={self.enabled}"


def _deep_copy(module: nn.Module) -> nn.Module:
    """``copy.deepcopy(module)``, the trained copy; an error of the copy (an attribute that cannot
    be copied, such as a lock) says which module and why it is copied."""
    def restate(error: Exception) -> str:
        return (
            f"module: the {type(module).__name__} cannot be deep-copied ({error}); a module to save "
            "trains a deep copy of it"
        )

    with errors_restated(restate, (TypeError, ValueError, RuntimeError), keep_cause=True):
        return copy.deepcopy(module)
