"""bitsandbytes, imported on first use.

``AVAILABLE`` is None until the first :func:`load`, then True or False. Tests set it to False to
exercise the pure-PyTorch fallback (:mod:`peft_layers.quant.reference`).
"""

from __future__ import annotations

import logging
from types import ModuleType

AVAILABLE: bool | None = None
_MODULES: tuple[ModuleType, ModuleType] | None = None


def load() -> tuple[ModuleType, ModuleType] | None:
    """``(bitsandbytes, bitsandbytes.functional)``, or None when bitsandbytes cannot be imported."""
    global AVAILABLE, _MODULES
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
    if not AVAILABLE or _MODULES is None:
        return None
    return _MODULES
