"""The public surface: every name a module's ``__all__`` exports exists, carries a docstring and
is listed in docs/api.md, so the reference page and the code cannot drift apart silently."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"

PUBLIC_MODULES = (
    "peft_layers",
    "peft_layers.adapter",
    "peft_layers.lora",
    "peft_layers.dora",
    "peft_layers.qlora",
    "peft_layers.model",
    "peft_layers.modules_to_save",
    "peft_layers.optim",
    "peft_layers.compose",
    "peft_layers.serving",
    "peft_layers.io",
    "peft_layers.quant",
    "peft_layers.quant.linear",
    "peft_layers.quant.reference",
)


def _exports() -> list[tuple[str, str]]:
    pairs = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        pairs += [(module_name, name) for name in module.__all__]
    return pairs


def _code_spans(markdown: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", markdown)


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_module_declares_its_public_names(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert isinstance(getattr(module, "__all__", None), list), f"{module_name} has no __all__ list"
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{module_name}.__all__ names what the module lacks: {missing}"
    assert len(set(module.__all__)) == len(module.__all__), f"{module_name}.__all__ repeats a name"


@pytest.mark.parametrize(("module_name", "name"), _exports())
def test_every_public_name_is_in_the_api_page(module_name: str, name: str) -> None:
    word = re.compile(rf"(?<![\w]){re.escape(name)}(?![\w])")
    assert any(word.search(span) for span in _code_spans(API_PAGE.read_text())), (
        f"{module_name}.{name} is exported but docs/api.md does not list it"
    )


@pytest.mark.parametrize(("module_name", "name"), _exports())
def test_every_public_function_and_class_has_a_docstring(module_name: str, name: str) -> None:
    value = getattr(importlib.import_module(module_name), name)
    if inspect.isfunction(value) or inspect.isclass(value) or inspect.ismodule(value):
        assert inspect.getdoc(value), f"{module_name}.{name} has no docstring"


def test_the_word_match_is_strict() -> None:
    # "unload" inside "merge_and_unload" does not count as listing unload
    spans = _code_spans("`pl.merge_and_unload(model)`")
    word = re.compile(r"(?<![\w])unload(?![\w])")
    assert not any(word.search(span) for span in spans)
    assert any(word.search(span) for span in _code_spans("`pl.unload(model)`"))
