"""bitsandbytes, imported on first use.

``AVAILABLE`` is None until the first :func:`load`, then True or False. Tests set it to False to
exercise the pure-PyTorch fallback (:mod:`peft_layers.quant.reference`).

``NATIVE`` says whether bitsandbytes' compiled library loaded. Where it fails to load (a CUDA
version bitsandbytes has no binary for, a missing libcudart), bitsandbytes still imports: it puts
in a stand-in library whose every call raises. Its CPU kernels then fall back to plain torch and
still work, but every CUDA kernel would raise, so :func:`load` answers None for CUDA tensors and
the reference codec serves them.
"""

from __future__ import annotations

import logging
from types import ModuleType

AVAILABLE: bool | None = None
NATIVE: bool | None = None
_MODULES: tuple[ModuleType, ModuleType] | None = None


def load(cuda: bool = False) -> tuple[ModuleType, ModuleType] | None:
    """``(bitsandbytes, bitsandbytes.functional)``, or None when bitsandbytes cannot be imported,
    or when ``cuda`` (the tensors are on a CUDA device) and its native library did not load."""
    global AVAILABLE, NATIVE, _MODULES
    if AVAILABLE is None:
        try:
            # bitsandbytes logs a warning at import on AVX512-BF16 CPUs when its optional
            # "kernels" package is missing; that kernel serves the repacked CPU layout, which we
            # never use (see linear.py), so the warning would only mislead
            quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                import bitsandbytes
                import bitsandbytes.functional
            finally:
                quiet.setLevel(level)
        # not only ImportError: a wheel whose native library fails to load raises at import time
        except Exception:  # noqa: BLE001
            AVAILABLE = False
        else:
            _MODULES = (bitsandbytes, bitsandbytes.functional)
            AVAILABLE = True
            NATIVE = native_library_loaded(bitsandbytes)
    if not AVAILABLE or _MODULES is None or (cuda and not NATIVE):
        return None
    return _MODULES


def loaded() -> tuple[ModuleType, ModuleType]:
    """:func:`load`'s pair where the caller knows bitsandbytes is there (a path it chose after
    asking :func:`load`). Unpacked without ``typing.cast``: ``torch.compile`` loses track of the
    modules through it and breaks the graph at ``functional.QuantState``."""
    modules = load()
    if modules is None:
        raise RuntimeError("bitsandbytes cannot be imported here")
    return modules


def native_library_loaded(bitsandbytes: ModuleType) -> bool:
    """Whether ``bitsandbytes.cextension.lib`` is the compiled library, not the stand-in that
    bitsandbytes >= 0.46 installs when loading it fails (versions without one: True)."""
    cextension = getattr(bitsandbytes, "cextension", None)
    stand_in = getattr(cextension, "ErrorHandlerMockBNBNativeLibrary", None)
    return not (isinstance(stand_in, type) and isinstance(getattr(cextension, "lib", None), stand_in))
