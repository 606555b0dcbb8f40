"""pytest set-up for the benchmark suites (``pytest benchmarks --benchmark-only``).

The suites live in ``bench_*.py`` files so that the unit-test run (``pytest tests``, and plain
``pytest``, whose ``testpaths`` is ``tests``) never collects them; this conftest is loaded only when
pytest is pointed at ``benchmarks/``, and collects those files here. Every run uses two intra-op
threads (the target machine has two cores) and records the library versions in the JSON's
``machine_info``, which ``report.py`` prints.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import pytest

from harness import THREADS, configure_torch, load_average

configure_torch()

_LOAD_AT_START = pytest.StashKey[object]()


def pytest_configure(config: pytest.Config) -> None:
    # peft/bitsandbytes import torch.jit.script_method, deprecated in torch 2.13: not ours to fix
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    # a file named on the command line is collected by pytest itself; collecting it here too
    # would run it twice
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_LOAD_AT_START] = load_average()


def _version(module: str) -> str:
    try:
        imported = __import__(module)
    except Exception as error:  # bitsandbytes can fail on import for reasons of its own
        return f"unavailable ({type(error).__name__})"
    return str(getattr(imported, "__version__", "unknown"))


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    import torch

    machine_info["libraries"] = {
        "torch": torch.__version__,
        "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes"),
        "peft_layers": _version("peft_layers"),
    }
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["platform"] = platform.platform()
    # other processes on a small machine slow the adapters' many small kernels more than one big
    # GEMM (a busy core stalls every parallel region): the report prints these next to the ratios
    machine_info["load_average_start"] = config.stash.get(_LOAD_AT_START, None)
    machine_info["load_average_end"] = load_average()
    machine_info["rounds_scale"] = os.environ.get("PEFT_LAYERS_BENCH_ROUNDS_SCALE", "1")


def pytest_report_header(config: pytest.Config) -> str:
    return f"peft_layers benchmarks: torch threads = {THREADS}; ratios by benchmarks/report.py"
