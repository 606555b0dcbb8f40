"""Warnings that point at the caller's line.

``warnings.warn(..., stacklevel=n)`` counts frames, so a fixed ``n`` is right for one call path
only: the same check reached through ``inject_adapters``, through a layer's constructor or
through ``nn.Module.__call__`` would name a line inside this package or inside torch. ``warn``
walks out of those instead and names the first frame of the user's code, the line to change.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch

_LIBRARY_DIRECTORIES = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,  # peft_layers, quant/ included
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,  # nn.Module.__call__, autograd
)
_LIBRARY_FILES = (os.path.abspath(contextlib.__file__),)  # a context manager's __exit__


def _is_library_frame(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_LIBRARY_DIRECTORIES) or path in _LIBRARY_FILES


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the first frame outside the library.

    The frames skipped are those of ``peft_layers``, of ``torch`` (a layer's forward runs under
    ``nn.Module.__call__``) and of ``contextlib``. A call with no such frame above it (all
    library) names the outermost frame.
    """
    frame = sys._getframe(1)  # the library function that warns
    level = 2  # warnings.warn's stacklevel of that function's caller
    while frame.f_back is not None and _is_library_frame(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
