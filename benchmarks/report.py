#!/usr/bin/env python3
"""Ratios, targets and a plot from a pytest-benchmark JSON of the peft_layers benchmark suites.

    python benchmarks/report.py [benchmarks/results/latest.json] [--out-dir DIR] [--no-plot]

Prints a markdown report and writes ``report.md`` and ``report.png`` (the plot only if matplotlib
is installed and some ratio has a paired run) into ``--out-dir``, by default the JSON's directory.

How a ratio is estimated (docs/benchmarks.md says why):

- **paired** (the verdict): from ``test_paired``, where every variant of a shape ran once per
  round, interleaved. The ratio of round ``i`` is ``t_num[i] / t_den[i]``; the estimate is the
  median over rounds, with a distribution-free 95% confidence interval for that median (order
  statistics of the binomial(n, 1/2)).
- **sequential** (a cross-check): median time of ``test_<kind>[num]`` over median time of
  ``test_<kind>[den]``, two pytest-benchmark runs made one after the other. A ratio without a
  paired run (e.g. after ``-k``) takes its verdict from these, marked "(sequential)".

A target is met (PASS) when the paired median is at or below it; "(CI)" flags a verdict whose
interval still contains the target. A "within noise" target (merged forward) passes when the
paired interval reaches down to the upper end of the A/A control's interval (a second, identical
baseline timed as a variant), or to 1.01 if that is higher. Memory rows compare one train step:
peak tensor bytes (informational) and the number of allocations as large as the fp32 (out, in)
weight, which carries the memory targets; a memory target whose JSON entries lack that count
gets no verdict ("missing") and counts as neither PASS nor MISS.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"
#: "within noise" never asks for less than this relative difference
NOISE_FLOOR = 0.01
VARIANT_ORDER = (
    "linear", "linear_copy", "lora", "dora", "hf_lora", "hf_dora", "lora_merged", "dora_merged",
    "dora_uncached", "hf_dora_cached",
    "quantized", "quantized_copy", "qlora", "qdora", "bnb_4bit", "hf_qlora", "hf_qdora",
    "qdora_uncached", "hf_qdora_cached",
    "multi_lora", "hf_mixed",
)
#: above this share of CPU time taken by other processes during the paired runs, the report warns
BUSY_SHARE = 0.10

LARGE = "512x4096x4096"


@dataclass(frozen=True)
class Ratio:
    """``numerator / denominator`` for one kind of operation, with an optional target."""

    label: str
    suite: str
    kind: str  # "train", "train_noloss" or "forward" (layers, quant, serving), "svd" (compose)
    numerator: str
    denominator: str
    #: None (informational), a number, a {shape: number} dict, or "noise"
    target: Any = None
    note: str = ""

    def target_for(self, shape: str) -> float | str | None:
        if isinstance(self.target, dict):
            return self.target.get(shape)
        return self.target


LAYER_RATIOS = (
    Ratio("LoRA / nn.Linear", "layers", "train", "lora", "linear", {"512x1024x1024": 1.15, LARGE: 1.05}),
    Ratio("LoRA / nn.Linear", "layers", "forward", "lora", "linear", {"512x1024x1024": 1.15, LARGE: 1.05}),
    Ratio("DoRA / LoRA", "layers", "train", "dora", "lora", 1.15),
    Ratio("DoRA / LoRA", "layers", "forward", "dora", "lora", 1.15),
    Ratio("DoRA / HF PEFT DoRA", "layers", "train", "dora", "hf_dora", 0.75),
    Ratio("merged LoRA / nn.Linear", "layers", "forward", "lora_merged", "linear", "noise"),
    Ratio("merged DoRA / nn.Linear", "layers", "forward", "dora_merged", "linear", "noise"),
    Ratio("LoRA / HF PEFT LoRA", "layers", "train", "lora", "hf_lora"),
    Ratio("LoRA / HF PEFT LoRA", "layers", "forward", "lora", "hf_lora"),
    Ratio("DoRA / HF PEFT DoRA", "layers", "forward", "dora", "hf_dora"),
    Ratio("DoRA / HF PEFT DoRA with DoraCaching", "layers", "forward", "dora", "hf_dora_cached",
          note="both sides cache"),
    Ratio("DoRA, adapter changed each call / LoRA", "layers", "forward", "dora_uncached", "lora",
          note="gain computed every call"),
    Ratio("HF PEFT LoRA / nn.Linear", "layers", "train", "hf_lora", "linear", note="issue 2 saw 1.17 / 1.0"),
    Ratio("HF PEFT DoRA / HF PEFT LoRA", "layers", "train", "hf_dora", "hf_lora", note="issue 2 saw 1.6-1.8"),
    Ratio("HF PEFT DoRA / HF PEFT LoRA", "layers", "forward", "hf_dora", "hf_lora", note="issue 2 saw 2.3-2.6"),
    Ratio("A/A control: nn.Linear / nn.Linear", "layers", "train", "linear_copy", "linear", note="noise floor"),
    Ratio("A/A control: nn.Linear / nn.Linear", "layers", "forward", "linear_copy", "linear", note="noise floor"),
)

QUANT_RATIOS = (
    Ratio("QLoRA / QuantizedLinear", "quant", "train", "qlora", "quantized", 1.10),
    Ratio("QLoRA / HF PEFT QLoRA", "quant", "train", "qlora", "hf_qlora", 1.00),
    Ratio("QDoRA / QLoRA", "quant", "train", "qdora", "qlora", 1.20),
    Ratio("QLoRA / QuantizedLinear", "quant", "forward", "qlora", "quantized", 1.10),
    Ratio("QDoRA / QuantizedLinear", "quant", "forward", "qdora", "quantized", 1.10),
    Ratio("QDoRA / HF PEFT QDoRA", "quant", "train", "qdora", "hf_qdora"),
    Ratio("QLoRA / HF PEFT QLoRA", "quant", "forward", "qlora", "hf_qlora"),
    Ratio("QDoRA / HF PEFT QDoRA", "quant", "forward", "qdora", "hf_qdora"),
    Ratio("QDoRA / HF PEFT QDoRA with DoraCaching", "quant", "forward", "qdora", "hf_qdora_cached",
          note="both sides cache"),
    Ratio("QDoRA, adapter changed each call / QuantizedLinear", "quant", "forward", "qdora_uncached",
          "quantized", note="gain computed every call"),
    Ratio("QuantizedLinear / bnb Linear4bit", "quant", "train", "quantized", "bnb_4bit"),
    Ratio("QuantizedLinear / bnb Linear4bit", "quant", "forward", "quantized", "bnb_4bit"),
    Ratio("HF PEFT QLoRA / bnb Linear4bit", "quant", "train", "hf_qlora", "bnb_4bit", note="issue 3 saw 1.15-1.2"),
    Ratio("HF PEFT QDoRA / HF PEFT QLoRA", "quant", "train", "hf_qdora", "hf_qlora", note="issue 3 saw 1.35-1.95"),
    Ratio("A/A control: QuantizedLinear / QuantizedLinear", "quant", "train", "quantized_copy", "quantized",
          note="noise floor"),
    Ratio("A/A control: QuantizedLinear / QuantizedLinear", "quant", "forward", "quantized_copy", "quantized",
          note="noise floor"),
)


def _without_loss(ratios: tuple[Ratio, ...]) -> tuple[Ratio, ...]:
    """The train ratios that carry a target (and the A/A controls) again, for the loss-free step:
    informational, a stricter view of the same targets (see harness.Case.train_step_no_loss)."""
    return tuple(
        Ratio(r.label, r.suite, "train_noloss", r.numerator, r.denominator,
              note=r.note if r.numerator.endswith("_copy") else f"stricter view of {_target_text_plain(r)}")
        for r in ratios
        if r.kind == "train" and (r.target is not None or r.numerator.endswith("_copy"))
    )


def _target_text_plain(ratio: Ratio) -> str:
    if isinstance(ratio.target, dict):
        return "<= " + " / ".join(f"{v:.2f}" for v in ratio.target.values())
    return f"<= {ratio.target:.2f}"


#: no issue sets targets for these suites
SERVING_RATIOS = (
    Ratio("mixed batch: MultiLoRALinear / nn.Linear", "serving", "forward", "multi_lora", "linear",
          note="4 adapters, 8 rows"),
    Ratio("mixed batch: MultiLoRALinear / HF PEFT", "serving", "forward", "multi_lora", "hf_mixed",
          note="4 adapters, 8 rows"),
)
#: one token through a 64 x 64 layer: the cost of a call beyond its arithmetic
OVERHEAD_RATIOS = tuple(
    Ratio(label, "overhead", kind, numerator, denominator, note="per call, 1 token")
    for kind in ("forward", "train")
    for label, numerator, denominator in (
        ("per call: LoRA / nn.Linear", "lora", "linear"),
        ("per call: LoRA / HF PEFT LoRA", "lora", "hf_lora"),
        ("per call: DoRA / HF PEFT DoRA", "dora", "hf_dora"),
    )
)
#: shapes are (sentences, tokens, hidden) of a batch through the whole model
PRETRAINED_RATIOS = (
    Ratio("MiniLM, LoRA / HF PEFT LoRA", "pretrained", "train", "lora", "hf_lora", note="36 layers + head"),
    Ratio("MiniLM, DoRA / HF PEFT DoRA", "pretrained", "train", "dora", "hf_dora", note="36 layers + head"),
    Ratio("MiniLM, DoRA / LoRA", "pretrained", "train", "dora", "lora", note="36 layers + head"),
    Ratio("MiniLM, HF PEFT DoRA / HF PEFT LoRA", "pretrained", "train", "hf_dora", "hf_lora",
          note="36 layers + head"),
    Ratio("MiniLM in NF4, QLoRA / HF PEFT QLoRA", "pretrained-nf4", "train", "qlora", "hf_qlora",
          note="transformers' 4-bit load"),
    Ratio("MiniLM, LoRA / HF PEFT LoRA", "pretrained", "forward", "lora", "hf_lora", note="36 layers + head"),
    Ratio("MiniLM, DoRA / HF PEFT DoRA", "pretrained", "forward", "dora", "hf_dora", note="36 layers + head"),
)
#: shapes are (out, in) of the combined layer
COMPOSE_RATIOS = (
    Ratio("combine(svd) / HF PEFT add_weighted_adapter(svd)", "compose", "svd", "ours", "hf_peft",
          note="two rank-16 adapters -> rank 16"),
)

LAYER_RATIOS = LAYER_RATIOS + _without_loss(LAYER_RATIOS)
QUANT_RATIOS = QUANT_RATIOS + _without_loss(QUANT_RATIOS)

#: (label, suite, numerator, denominator, most extra (out, in)-sized allocations allowed, why)
MEMORY_RATIOS = (
    ("DoRA vs LoRA", "layers", "dora", "lora", 0, "issue 2: none beyond LoRA's"),
    ("HF PEFT DoRA vs LoRA", "layers", "hf_dora", "lora", None, ""),
    ("LoRA vs nn.Linear", "layers", "lora", "linear", None, ""),
    ("QDoRA vs QLoRA", "quant", "qdora", "qlora", 1, "issue 3: at most one"),
    ("HF PEFT QDoRA vs QLoRA", "quant", "hf_qdora", "qlora", None, ""),
    ("QLoRA vs QuantizedLinear", "quant", "qlora", "quantized", None, ""),
)


# ---- reading the JSON ----------------------------------------------------------------------------
@dataclass
class Results:
    paired: dict[tuple[str, str, str], dict[str, list[float]]]  # (suite, kind, shape) -> variant -> times
    sequential: dict[tuple[str, str, str, str], list[float]]  # (suite, kind, shape, variant) -> times
    #: (suite, shape, variant) -> step_memory(); "weight_sized" is None when the entry lacks it
    memory: dict[tuple[str, str, str], dict[str, int | None]]
    meta: dict[str, Any]

    def shapes(self) -> list[str]:
        found = {key[2] for key in self.paired} | {key[2] for key in self.sequential} | {key[1] for key in self.memory}
        return sorted(found, key=lambda s: [int(n) for n in s.split("x")])


def load(path: Path) -> Results:
    data = json.loads(path.read_text())
    paired: dict = {}
    sequential: dict = {}
    memory: dict = {}
    busy: dict = {}
    share_by_run: dict = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        suite, kind, shape = info.get("suite"), info.get("kind"), info.get("shape")
        if not (suite and kind and shape):
            continue
        if info.get("mode") == "paired":
            paired[(suite, kind, shape)] = info["times"]
            if info.get("others_cpu_share") is not None:
                share_by_run[(suite, kind, shape)] = float(info["others_cpu_share"])
        elif kind == "memory":
            if "peak_bytes" in info:
                weight_sized = info.get("weight_sized")
                memory[(suite, shape, info["variant"])] = {
                    "peak_bytes": int(info["peak_bytes"]),
                    "weight_sized": None if weight_sized is None else int(weight_sized),
                }
        else:
            stats = bench["stats"]
            sequential[(suite, kind, shape, info["variant"])] = stats.get("data") or [stats["median"]]
            if info.get("others_cpu_share") is not None:
                busy[(suite, kind, shape, info["variant"])] = float(info["others_cpu_share"])
    data["sequential_others_cpu_share"] = busy
    data["paired_share_by_run"] = share_by_run
    return Results(paired, sequential, memory, data)


# ---- statistics ----------------------------------------------------------------------------------
def median_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free interval for the median: order statistics ``(k, n - k + 1)``, ``k`` the
    largest with ``P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2``. None when n is too small."""
    n = len(values)
    ordered = sorted(values)
    tail = (1 - confidence) / 2
    cumulative = 0.0
    k = 0
    while k < n:
        p = math.comb(n, k) / 2**n
        if cumulative + p > tail:
            break
        cumulative += p
        k += 1
    if k == 0:
        return None
    return ordered[k - 1], ordered[n - k]


@dataclass
class Measured:
    paired: float | None
    ci: tuple[float, float] | None
    rounds: int
    sequential: float | None


def measure(results: Results, ratio: Ratio, shape: str) -> Measured | None:
    paired = ci = None
    rounds = 0
    times = results.paired.get((ratio.suite, ratio.kind, shape), {})
    if ratio.numerator in times and ratio.denominator in times:
        per_round = [n / d for n, d in zip(times[ratio.numerator], times[ratio.denominator]) if d > 0]
        if per_round:
            paired = statistics.median(per_round)
            ci = median_ci(per_round)
            rounds = len(per_round)
    sequential = None
    num = results.sequential.get((ratio.suite, ratio.kind, shape, ratio.numerator))
    den = results.sequential.get((ratio.suite, ratio.kind, shape, ratio.denominator))
    if num and den:
        sequential = statistics.median(num) / statistics.median(den)
    if paired is None and sequential is None:
        return None
    return Measured(paired, ci, rounds, sequential)


def noise_bound(results: Results, ratio: Ratio, shape: str) -> float:
    """The highest ratio still "within noise" for ``ratio``: the upper end of the A/A control's
    interval (same suite, step and shape), but at least 1 + NOISE_FLOOR."""
    control = next(
        (r for r in LAYER_RATIOS + QUANT_RATIOS
         if r.suite == ratio.suite and r.kind == ratio.kind and r.numerator.endswith("_copy")),
        None,
    )
    measured = measure(results, control, shape) if control else None
    high = measured.ci[1] if measured and measured.ci else 0.0
    return max(1.0 + NOISE_FLOOR, high)


#: appended to a verdict that rests on the sequential medians (the ratio has no paired run)
SEQUENTIAL_FLAG = " (sequential)"
#: appended to a paired verdict without an interval: fewer than 6 rounds (a smoke run, e.g.
#: PEFT_LAYERS_BENCH_ROUNDS_SCALE=0.2), so nothing says whether another run would flip it
NO_CI_FLAG = " (no CI)"


def verdict(target: float | str | None, measured: Measured, bound: float | None = None) -> str:
    """"PASS" or "MISS" against ``target`` ("" without a target), from the paired median, or from
    the sequential medians when there is no paired run, then flagged " (sequential)"; a paired
    verdict without an interval (too few rounds) is flagged " (no CI)"."""
    from_paired = measured.paired is not None
    value = measured.paired if from_paired else measured.sequential
    if target is None or value is None:
        return ""
    if not from_paired:
        source_flag = SEQUENTIAL_FLAG
    else:
        source_flag = "" if measured.ci else NO_CI_FLAG
    low, high = measured.ci if measured.ci else (value, value)
    if target == "noise":
        return ("PASS" if low <= (bound or 1.0 + NOISE_FLOOR) else "MISS") + source_flag
    ok = value <= target
    ci_flag = " (CI)" if measured.ci and low <= target <= high else ""
    return ("PASS" if ok else "MISS") + ci_flag + source_flag


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if 0 < abs(value) < 10 ** -(digits - 1):  # a ratio far below 1 (compose) keeps two figures
        return f"{value:.2g}"
    return f"{value:.{digits}f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _target_text(target: float | None, noise: bool = False) -> str:
    if target is None:
        return "-"
    if noise:
        return f"within noise: CI reaches <= {target:.3f}"
    return f"<= {target:.2f}"


# ---- the report ----------------------------------------------------------------------------------
def ratio_rows(results: Results) -> list[dict[str, Any]]:
    rows = []
    for ratio in LAYER_RATIOS + QUANT_RATIOS + SERVING_RATIOS + OVERHEAD_RATIOS + PRETRAINED_RATIOS + COMPOSE_RATIOS:
        for shape in results.shapes():
            measured = measure(results, ratio, shape)
            if measured is None:
                continue
            target = ratio.target_for(shape)
            bound = noise_bound(results, ratio, shape) if target == "noise" else None
            rows.append(
                {
                    "ratio": ratio, "shape": shape, "measured": measured,
                    "target": bound if bound is not None else target,
                    "noise": bound is not None,
                    "verdict": verdict(target, measured, bound),
                }
            )
    return rows


def header(results: Results) -> list[str]:
    meta = results.meta
    machine = meta.get("machine_info", {})
    libraries = machine.get("libraries", {})
    cpu = machine.get("cpu", {})
    commit = meta.get("commit_info", {})
    libs = ", ".join(f"{name} {version}" for name, version in libraries.items())
    shares = list((meta.get("paired_share_by_run") or {}).values())
    start, end = machine.get("load_average_start"), machine.get("load_average_end")
    load_line = (
        f"- load average (1 min): {start[0] if start else '?'} at start, {end[0] if end else '?'} at end"
        + (
            f"; other processes took {100 * min(shares):.0f}-{100 * max(shares):.0f}% of the CPU time "
            "during the paired runs"
            if shares else ""
        )
    )
    sequential_busy = list((meta.get("sequential_others_cpu_share") or {}).values())
    if sequential_busy:
        load_line += (
            f", {100 * min(sequential_busy):.0f}-{100 * max(sequential_busy):.0f}% during the sequential ones"
        )
    warning = []
    if shares and max(shares) > BUSY_SHARE:
        warning = [
            "",
            f"**Warning: the machine was busy with other work (other processes took up to "
            f"{100 * max(shares):.0f}% of the CPU time during the paired runs).** A busy core stalls "
            "every parallel region, which costs the adapters' many small kernels more than one "
            "large GEMM: ratios against the frozen layer read high. Rerun on a quiet machine "
            "before trusting a MISS.",
        ]
    return [
        f"- date: {meta.get('datetime', '?')}",
        f"- machine: {cpu.get('brand_raw', machine.get('processor', '?'))}, "
        f"{machine.get('cpu_count', cpu.get('count', '?'))} cores, torch threads "
        f"{machine.get('torch_threads', '?')}, {machine.get('platform', machine.get('system', ''))}",
        f"- libraries: {libs or '?'}",
        f"- commit: {commit.get('id', '?')[:12]}{' (dirty)' if commit.get('dirty') else ''}; "
        f"rounds scale {machine.get('rounds_scale', '1')}",
        load_line,
        *warning,
    ]


def ratio_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| ratio | step | shape | paired median [95% CI] | rounds | sequential | target | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio, measured = row["ratio"], row["measured"]
        ci = f" [{measured.ci[0]:.3f}, {measured.ci[1]:.3f}]" if measured.ci else ""
        target = _target_text(row["target"], row["noise"]) if row["target"] is not None else (ratio.note or "-")
        lines.append(
            f"| {ratio.label} | {ratio.kind} | {row['shape']} | {_fmt(measured.paired)}{ci} | "
            f"{measured.rounds} | {_fmt(measured.sequential)} | {target} | {row['verdict'] or '-'} |"
        )
    return lines


def time_table(results: Results) -> list[str]:
    lines = [
        "| suite | step | shape | variant | paired median ms | sequential median ms | sequential rounds "
        "| others' CPU share, sequential |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted(
        {(s, k, sh, v) for (s, k, sh), times in results.paired.items() for v in times}
        | set(results.sequential),
        key=lambda key: (
            key[0], key[1] != "train", [int(n) for n in key[2].split("x")],
            VARIANT_ORDER.index(key[3]) if key[3] in VARIANT_ORDER else len(VARIANT_ORDER), key[3],
        ),
    )
    busy = results.meta.get("sequential_others_cpu_share") or {}
    for suite, kind, shape, variant in keys:
        paired = results.paired.get((suite, kind, shape), {}).get(variant)
        sequential = results.sequential.get((suite, kind, shape, variant))
        lines.append(
            f"| {suite} | {kind} | {shape} | {variant} | "
            f"{_fmt(statistics.median(paired) * 1e3 if paired else None, 2)} | "
            f"{_fmt(statistics.median(sequential) * 1e3 if sequential else None, 2)} | "
            f"{len(sequential) if sequential else '-'} | {_share(busy.get((suite, kind, shape, variant)))} |"
        )
    return lines


def paired_table(results: Results) -> list[str]:
    lines = ["| paired run | rounds | others' CPU share |", "|---|---|---|"]
    shares = results.meta.get("paired_share_by_run") or {}
    for (suite, kind, shape), times in sorted(results.paired.items()):
        rounds = min((len(t) for t in times.values()), default=0)
        lines.append(f"| {suite} {kind} {shape} | {rounds} | {_share(shares.get((suite, kind, shape)))} |")
    return lines


#: the verdict of a memory target whose (out, in)-sized allocations were not recorded
MISSING = "missing"


def memory_verdict(extra: int | None, target: int | None) -> str:
    """"PASS"/"MISS" for ``extra`` allocations against ``target``; "" without a target, MISSING
    when the count was not measured."""
    if target is None:
        return ""
    if extra is None:
        return MISSING
    return "PASS" if extra <= target else "MISS"


def memory_rows(results: Results) -> list[dict[str, Any]]:
    rows = []
    for label, suite, numerator, denominator, target, note in MEMORY_RATIOS:
        for shape in results.shapes():
            num = results.memory.get((suite, shape, numerator))
            den = results.memory.get((suite, shape, denominator))
            if num is None or den is None:
                continue
            counts = (num["weight_sized"], den["weight_sized"])
            extra = None if None in counts else counts[0] - counts[1]
            rows.append(
                {
                    "label": label, "shape": shape, "num": num, "den": den,
                    "ratio": num["peak_bytes"] / den["peak_bytes"] if den["peak_bytes"] else math.inf,
                    "extra": extra, "target": target, "note": note,
                    "verdict": memory_verdict(extra, target),
                }
            )
    return rows


def memory_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| one train step | shape | peak MiB | peak ratio | (out, in)-sized allocations | extra | target | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        num, den = row["num"], row["den"]
        target = "-" if row["target"] is None else f"<= {row['target']} ({row['note']})"
        counts = " / ".join("-" if n is None else str(n) for n in (num["weight_sized"], den["weight_sized"]))
        extra = "-" if row["extra"] is None else f"{row['extra']:+d}"
        lines.append(
            f"| {row['label']} | {row['shape']} | {num['peak_bytes'] / 2**20:.1f} / {den['peak_bytes'] / 2**20:.1f} | "
            f"{row['ratio']:.2f} | {counts} | {extra} | {target} | {row['verdict'] or '-'} |"
        )
    return lines


def verdict_summary(rows: list[dict[str, Any]], mem_rows: list[dict[str, Any]]) -> str:
    """The "Targets: ..." sentence: PASS and MISS counts, and how many verdicts rest on sequential
    medians or are missing."""
    misses = [r for r in rows if r["verdict"].startswith("MISS")] + [r for r in mem_rows if r["verdict"] == "MISS"]
    passes = [r for r in rows if r["verdict"].startswith("PASS")] + [r for r in mem_rows if r["verdict"] == "PASS"]
    sequential = [r for r in rows if r["verdict"].endswith(SEQUENTIAL_FLAG)]
    without_ci = [r for r in rows if r["verdict"].endswith(NO_CI_FLAG)]
    missing = [r for r in mem_rows if r["verdict"] == MISSING]
    summary = f"Targets: {len(passes)} PASS, {len(misses)} MISS"
    if sequential:
        summary += f" ({len(sequential)} of these from sequential medians only: no paired run)"
    if without_ci:
        summary += f" ({len(without_ci)} of these from fewer than 6 paired rounds: no interval)"
    if missing:
        summary += f", {len(missing)} not measured (no (out, in)-sized allocation count: verdict \"{MISSING}\")"
    return (
        summary + ". Ratios are candidate time / baseline time (lower is faster); the verdict uses the "
        "paired median, or, for a ratio without a paired run, the ratio of the sequential medians, "
        "marked \"(sequential)\"."
    )


def render(results: Results, rows: list[dict[str, Any]], mem_rows: list[dict[str, Any]]) -> str:
    parts = [
        "# peft_layers benchmark report",
        "",
        *header(results),
        "",
        verdict_summary(rows, mem_rows),
        "",
        "## Speed ratios",
        "",
        *ratio_table(rows),
        "",
        "## Peak memory",
        "",
        *(memory_table(mem_rows) if mem_rows else ["(no memory benchmarks in this run)"]),
        "",
        "## Times",
        "",
        *paired_table(results),
        "",
        *time_table(results),
        "",
    ]
    return "\n".join(parts)


def plot(rows: list[dict[str, Any]], path: Path) -> str | None:
    """Paired ratios with their intervals and targets, one panel per layer shape, written to
    ``path``. Returns None when written, otherwise why not: matplotlib is not installed, or no
    ratio has a paired run. The compose ratio (three orders of magnitude below 1) is left to the
    table."""
    rows = [r for r in rows if r["measured"].paired is not None and r["ratio"].suite != "compose"]
    shapes = sorted({r["shape"] for r in rows}, key=lambda s: [int(n) for n in s.split("x")])
    if not shapes:
        return "no paired ratio to plot"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    height = max(len([r for r in rows if r["shape"] == s]) for s in shapes)
    fig, axes = plt.subplots(1, len(shapes), figsize=(7 * len(shapes), 0.38 * height + 1.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        panel = [r for r in rows if r["shape"] == shape]
        labels = [f"{r['ratio'].label} ({r['ratio'].kind})" for r in panel]
        values = [r["measured"].paired for r in panel]
        low = [v - (r["measured"].ci[0] if r["measured"].ci else v) for v, r in zip(values, panel)]
        high = [(r["measured"].ci[1] if r["measured"].ci else v) - v for v, r in zip(values, panel)]
        colors = [
            "tab:red" if r["verdict"].startswith("MISS") else "tab:green" if r["verdict"] else "tab:gray"
            for r in panel
        ]
        y = list(range(len(panel)))
        ax.barh(y, values, xerr=[low, high], color=colors, alpha=0.8, capsize=2)
        for position, r in zip(y, panel):
            value = r["target"]
            if isinstance(value, (int, float)):
                ax.plot([value, value], [position - 0.4, position + 0.4], color="black", linewidth=2)
        ax.axvline(1.0, color="black", linewidth=0.6, linestyle=":")
        ax.set_yticks(y, labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("time ratio (paired median, 95% CI); black tick = target")
        ax.set_title(shape)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="?", type=Path, default=DEFAULT_JSON, help="pytest-benchmark JSON")
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="where report.md/.png go (default: the JSON's directory)"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)
    if not args.json.is_file():
        print(f"report.py: no such file {args.json}; run `python3 dev.py bench` first", file=sys.stderr)
        return 2
    results = load(args.json)
    rows = ratio_rows(results)
    mem_rows = memory_rows(results)
    text = render(results, rows, mem_rows)
    out_dir = args.out_dir or args.json.resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(text)
    print(text)
    if not args.no_plot:
        png = out_dir / "report.png"
        skipped_because = plot(rows, png)
        print(f"plot: {png}" if skipped_because is None else f"plot: skipped ({skipped_because})")
    print(f"report: {out_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
