#!/usr/bin/env python3
"""A/B one layer's step between the working tree and another git revision, in one process.

    python benchmarks/ab.py [--rev HEAD] [--layer lora] [--kind train] [--size 1024] [--rounds 150]

The revision's ``src/peft_layers`` is exported (``git archive``) into a temporary directory as a
package named ``peft_layers_rev`` (the package imports itself only relatively, so the copy is
self-contained) and both versions are built over the same seeded weight, next to a frozen
``nn.Linear`` (or a bare ``QuantizedLinear`` for the quantized layers). The three steps run
interleaved round by round (``harness.paired_rounds``); the script prints the median of the
per-round ratios with the 95% interval of ``report.median_ci``. Changes of 1% show up where
separate benchmark runs, whose spread on a shared machine is about 2%, cannot resolve them.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import torch

from harness import ALPHA, KINDS, RANK, Case, configure_torch, make_linear, paired_rounds, perturb_adapter_
from report import median_ci

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"lora": "LoRALinear", "dora": "DoRALinear", "qlora": "QLoRALinear", "qdora": "QDoRALinear"}


def export_revision(rev: str, into: Path) -> None:
    """``src/peft_layers`` at ``rev`` as the package ``into/peft_layers_rev``."""
    run = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/peft_layers"], capture_output=True)
    if run.returncode != 0:
        raise SystemExit(f"--rev: git cannot export src/peft_layers at {rev!r}: {run.stderr.decode().strip()}")
    archive = run.stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.10.12 warn without a filter
            tar.extractall(into, filter="data")
        else:
            tar.extractall(into)
    (into / "src" / "peft_layers").rename(into / "peft_layers_rev")


def build(package: object, layer: str, size: int) -> torch.nn.Module:
    linear = make_linear(size, size)
    cls = getattr(package, LAYERS[layer])
    module = cls.from_linear(linear, rank=RANK, alpha=ALPHA)
    perturb_adapter_(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default="HEAD", help="git revision to compare against (default HEAD)")
    parser.add_argument("--layer", choices=sorted(LAYERS), default="lora")
    parser.add_argument("--kind", choices=KINDS, default="train")
    parser.add_argument("--size", type=int, default=1024, help="in = out features (tokens: 512)")
    parser.add_argument("--rounds", type=int, default=150)
    args = parser.parse_args(argv)
    for name in ("size", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected an integer >= 1, got {getattr(args, name)}")
    configure_torch()
    import peft_layers

    with tempfile.TemporaryDirectory() as tmp:
        export_revision(args.rev, Path(tmp))
        sys.path.insert(0, tmp)
        rev_package = importlib.import_module("peft_layers_rev")
        quantized = args.layer.startswith("q")
        if quantized:
            baseline = peft_layers.quant.QuantizedLinear.from_linear(make_linear(args.size, args.size), "nf4")
        else:
            baseline = make_linear(args.size, args.size)
        cases = {
            "baseline": Case("baseline", baseline, 512),
            "rev": Case("rev", build(rev_package, args.layer, args.size), 512),
            "tree": Case("tree", build(peft_layers, args.layer, args.size), 512),
        }
        one_round, times = paired_rounds({name: case.operation(args.kind) for name, case in cases.items()})
        for _ in range(args.rounds):
            one_round()

    def ratio(num: str, den: str) -> str:
        per_round = [n / d for n, d in zip(times[num], times[den])]
        low, high = median_ci(per_round) or (float("nan"), float("nan"))
        return f"{statistics.median(per_round):.3f} [{low:.3f}, {high:.3f}]"

    base_name = "QuantizedLinear" if quantized else "nn.Linear"
    print(f"{args.layer} {args.kind} (512, {args.size}, {args.size}), {args.rounds} rounds")
    print(f"  {args.rev} / {base_name}: {ratio('rev', 'baseline')}")
    print(f"  working tree / {base_name}: {ratio('tree', 'baseline')}")
    print(f"  working tree / {args.rev}: {ratio('tree', 'rev')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
