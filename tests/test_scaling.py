"""Scaling of the model-level tools with the number of modules, checked without timing (from an
audit of the eighteenth session; each test failed before its fix).

A model with n small blocks and one with 2n are put through the same tool, and the number of
Python and C function calls it makes (``sys.setprofile`` events: deterministic, unlike time) is
counted. A tool that is linear in the number of modules makes about twice as many calls for twice
the blocks; one that scans every name for every name (a quadratic loop) makes about four times as
many: with 100 and 200 blocks the quadratic loops this guards against gave 2.5 to 3.2x, the
linear code 1.99x; the bound is 2.25x. Each model is run once before counting, so that caches
(``re``'s, imports) are warm.
"""

from __future__ import annotations

import re
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import peft_layers as pl
from peft_layers.io import read_adapter
from peft_layers.model import pattern_key
from peft_layers.model._tree import _PatternKeys

NAMES = ("q", "k", "v", "o", "up", "down")
BLOCKS = 100  # 600 linear layers, and 1200
LINEAR_GROWTH_BOUND = 2.25  # calls(2n) / calls(n): 2.0 when linear (measured 1.99), towards 4 when quadratic


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for name in NAMES:
            setattr(self, name, nn.Linear(4, 4))


def _model(blocks: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.blocks = nn.ModuleList(_Block() for _ in range(blocks))
    return model


def _calls(function) -> int:
    """The number of function calls (Python and C) that ``function()`` makes."""
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    function()  # warm the caches
    sys.setprofile(profile)
    try:
        function()
    finally:
        sys.setprofile(None)
    return count


def _growth(make_call, blocks: int) -> float:
    return _calls(make_call(2 * blocks)) / _calls(make_call(blocks))


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _saved(tmp_path, blocks: int) -> str:
    """An adapter of every linear layer, the "q" ones with another rank: the file's
    ``rank_pattern`` holds one anchored key per block and its ``target_modules`` every path."""
    model = pl.inject_adapters(_model(blocks), list(NAMES), rank=2, rank_pattern={"q": 3})
    directory = tmp_path / f"adapter{blocks}"
    if not directory.exists():
        pl.save_adapter(model, directory)
    return str(directory)


def test_read_adapter_is_linear_in_the_layers(tmp_path):
    """read_adapter checks each module of the file against target_modules and rank_pattern:
    a scan of the whole list (and of every key) per module was quadratic."""
    growth = _growth(lambda n: lambda: read_adapter(_saved(tmp_path, n)), BLOCKS)
    assert growth < LINEAR_GROWTH_BOUND, growth


def test_load_adapter_is_linear_in_the_layers(tmp_path):
    """load_adapter into a fresh model: the file's per-layer ranks come back as one anchored
    rank_pattern key per layer, each of which inject_adapters checked against every target."""
    growth = _growth(lambda n: (lambda d: lambda: pl.load_adapter(_model(n), d))(_saved(tmp_path, n)), BLOCKS)
    assert growth < LINEAR_GROWTH_BOUND, growth


def test_inject_with_a_key_per_layer_is_linear(tmp_path):
    """inject_adapters with a rank_pattern key per target: each key was tried on every target
    name (validation) and every key on each target (building)."""
    def make_call(n):
        patterns = {rf"^blocks\.{i}\.q": 3 for i in range(n)}
        return lambda: pl.inject_adapters(_model(n), list(NAMES), rank=2, rank_pattern=patterns)

    growth = _growth(make_call, BLOCKS)
    assert growth < LINEAR_GROWTH_BOUND, growth


def test_save_adapter_is_linear_in_the_layers(tmp_path):
    """save_adapter decides whether target_modules can be a plain list by asking, for every
    other module, whether its name ends with any target path: a scan of all paths per name."""
    def make_call(n):
        model = pl.inject_adapters(_model(n), "q", rank=2)
        counter = iter(range(10**6))
        return lambda: pl.save_adapter(model, tmp_path / f"s{n}_{next(counter)}")

    growth = _growth(make_call, BLOCKS)
    assert growth < LINEAR_GROWTH_BOUND, growth


# ---- _PatternKeys against pattern_key (the second implementation) ------------------------------
_PATHS = st.lists(st.sampled_from(["q", "k", "blocks", "0", "1", "10", "attn", "q_proj", "x.y", "a\n"]), min_size=1, max_size=4)


@st.composite
def _keys(draw) -> str:
    """Keys as users and files write them: a name, a dotted tail, a small regex, an anchored escaped
    path (what save_adapter writes), an empty key, or a bare anchor."""
    path = ".".join(draw(_PATHS))
    kind = draw(st.sampled_from(["plain", "anchored", "regex", "empty", "caret"]))
    if kind == "anchored":
        return "^" + re.escape(path)
    if kind == "regex":
        return draw(st.sampled_from([r"q|k", r".*\.q", r"blocks\.1\d*\.q", r"\d+\.k", r"(q|v)_proj"]))
    return {"plain": path, "empty": "", "caret": "^"}[kind]


@settings(max_examples=300, deadline=None)
@given(keys=st.lists(_keys(), max_size=8, unique=True), names=st.lists(_PATHS.map(".".join), min_size=1, max_size=8))
def test_pattern_keys_answers_as_pattern_key(keys, names) -> None:
    """``_PatternKeys`` (keys compiled once, anchored keys looked up by name) gives
    ``pattern_key``'s answer for every name, the first matching key in order, and ``unmatched``
    names exactly the keys ``pattern_key`` matches to no name (an empty key always among them)."""
    patterns = {key: 1 for key in keys}
    fast = _PatternKeys(patterns)
    for name in names:
        assert fast(name) == pattern_key(patterns, name)
    expected = [key for key in keys if not any(pattern_key({key: 1}, name) for name in names)]
    assert fast.unmatched(names) == expected
