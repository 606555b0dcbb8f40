"""The developer tools around the library: ``benchmarks/report.py``'s verdicts, ``dev.py``'s
help and exit codes, and the argument checks of ``examples/finetune_minilm.py``.

The report is fed small fabricated pytest-benchmark JSON files; nothing here runs a benchmark,
installs a package or trains a model.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
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
example = _load_script(ROOT / "examples" / "finetune_minilm.py", "_finetune_minilm_under_test")


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


def _paired_entry(kind: str, times: dict[str, list[float]]) -> dict[str, Any]:
    info = {"suite": "layers", "kind": kind, "shape": SHAPE, "mode": "paired", "times": times}
    return {"name": f"test_paired[{kind}]", "stats": {"median": 1.0}, "extra_info": info}


def _load_results(tmp_path: Path, benchmarks: list[dict[str, Any]]):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    return report.load(path)


def _row(rows: list[dict[str, Any]], label: str, kind: str) -> dict[str, Any]:
    (row,) = [r for r in rows if r["ratio"].label == label and r["ratio"].kind == kind]
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


def _dev_in(tmp_path: Path, monkeypatch, python: Path) -> tuple[ModuleType, list]:
    """dev.py loaded with its checkout moved to ``tmp_path`` and its .venv's Python at ``python``;
    the commands it would run, and the venvs it would create, are recorded instead."""
    dev = _load_script(ROOT / "dev.py", "dev_under_test")
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.setattr(dev, "ROOT", tmp_path)
    monkeypatch.setattr(dev, "VENV", tmp_path / ".venv")
    monkeypatch.setattr(dev, "PYTHON", python)
    monkeypatch.setattr(dev, "STAMP", tmp_path / ".venv" / "stamp")
    calls: list = []
    monkeypatch.setattr(dev, "run", lambda *args: calls.append(("run", *map(str, args))))
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
