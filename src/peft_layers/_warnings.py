"""Warnings that point at the caller's line.

``warnings.warn(..., stacklevel=n)`` counts frames, so a fixed ``n`` is right for one call path
only: the same check reached through ``inject_adapters``, through a layer's constructor or
through ``nn.Module.__call__`` would name a line inside this package or inside torch. ``warn``
walks out of those instead and names the first frame of the user's code, the line to change.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings

#: packages whose frames stand between the user's call and the warning: this one, torch
#: (``nn.Module.__call__``, autograd), and the model libraries a layer's forward runs inside
_LIBRARY_PACKAGES = ("peft_layers", "torch", "transformers", "accelerate")
_LIBRARY_FILES = (os.path.abspath(contextlib.__file__),)  # a context manager's __exit__


def _package_directory(name: str) -> str | None:
    module = sys.modules.get(name)  # a package that was never imported has no frames to skip
    path = getattr(module, "__file__", None)
    return os.path.dirname(os.path.abspath(path)) + os.sep if path else None


@functools.lru_cache(maxsize=1024)  # frames repeat: one answer per file (and package set)
def _is_library_file(filename: str, directories: tuple[str, ...]) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(directories) or path in _LIBRARY_FILES


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the first frame outside the library.

    The frames skipped are those of ``peft_layers``, ``torch`` (a layer's forward runs under
    ``nn.Module.__call__``), ``transformers`` and ``accelerate`` (a model's forward calls the
    layer), and ``contextlib``. A call with no such frame above it (all library) names the
    outermost frame.
    """
    directories = tuple(d for d in map(_package_directory, _LIBRARY_PACKAGES) if d is not None)
    frame = sys._getframe(1)  # the library function that warns
    level = 2  # warnings.warn's stacklevel of that function's caller
    while frame.f_back is not None and _is_library_file(frame.f_code.co_filename, directories):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
