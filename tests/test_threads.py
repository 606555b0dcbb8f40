"""Races between callers of one model (a thread pool serving requests), from an audit of the
eighteenth session; each test failed before its fix.


Each test forces one bad interleaving deterministically (threads that wait on events, or two
context managers exited out of order, as two threads or asyncio tasks exit theirs), rather than
hoping a stress loop hits it, and compares outputs with a float64 formula or with the same call
made alone.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

import peft_layers as pl

D = 16


def _stacked_model() -> tuple[nn.Module, dict[str, dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D))
    adapters = {}
    for k, name in enumerate(["math", "code"]):
        g = torch.Generator().manual_seed(k)
        adapters[name] = {
            f"{p}.{f}": torch.randn(*shape, generator=g)
            for p in ("0", "2") for f, shape in (("lora_A", (2, D)), ("lora_B", (D, 2)))
        }
    return pl.stack_adapters(model, adapters).eval(), adapters


def _stacked_ref64(model: nn.Module, adapters: dict, x: torch.Tensor, names: list) -> torch.Tensor:
    """Row b through both base layers plus adapter names[b] (None: base), in float64."""
    rows = []
    for b, name in enumerate(names):
        h = x[b:b + 1].double()
        for i in (0, 2):
            base = model[i].base_layer
            y = h @ base.weight.double().t() + base.bias.double()
            if name is not None:
                a, bm = adapters[name][f"{i}.lora_A"].double(), adapters[name][f"{i}.lora_B"].double()
                y = y + (h @ a.t()) @ bm.t()
            h = torch.tanh(y) if i == 0 else y
        rows.append(h)
    return torch.cat(rows)


def test_adapter_batch_choices_of_two_threads_do_not_mix() -> None:
    """Two requests served at once, each in its own adapter_batch block (the documented per-request
    API): A enters, B enters, A computes and leaves, B computes and leaves. Each must get its own
    adapters, and no choice may outlive the blocks. Before the fix the choice was one attribute
    per layer for the whole model: A computed with B's adapters, B with none, and A's choice stayed
    set after both blocks (every later call uses it; another batch size raises)."""
    model, adapters = _stacked_model()
    x = torch.randn(2, D, generator=torch.Generator().manual_seed(5))
    names = {"a": ["math", None], "b": ["code", "math"]}
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    got: dict[str, torch.Tensor] = {}

    def request_a() -> None:
        with torch.no_grad(), pl.adapter_batch(model, names["a"]):
            a_in.set()
            b_in.wait(10)
            got["a"] = model(x)
        a_out.set()

    def request_b() -> None:
        a_in.wait(10)
        with torch.no_grad(), pl.adapter_batch(model, names["b"]):
            b_in.set()
            a_out.wait(10)
            got["b"] = model(x)

    threads = [threading.Thread(target=request_a), threading.Thread(target=request_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    for key in ("a", "b"):
        torch.testing.assert_close(got[key].double(), _stacked_ref64(model, adapters, x, names[key]),
                                   rtol=1e-5, atol=1e-5, msg=f"request {key} got another request's adapters")
    with torch.no_grad():  # after both blocks: no per-row choice, the base model (no set_adapter)
        three = torch.randn(3, D)
        torch.testing.assert_close(model(three).double(), _stacked_ref64(model, adapters, three, [None] * 3),
                                   rtol=1e-5, atol=1e-5)


def _lora_model(merged: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D), nn.Linear(D, D))
    pl.inject_adapters(model, ["0", "2"], method="lora", rank=2, modules_to_save=["3"])
    for _, layer in pl.model.iter_adapter_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_()
    with torch.no_grad():
        model[3].trained.weight.add_(0.5)
    if merged:
        pl.merge_adapters(model)
    return model.eval()


def _model_ref64(model: nn.Module, x: torch.Tensor, adapted: bool) -> torch.Tensor:
    """The model in float64 from its parts: W0 (+ s B A) per layer, trained or original copy."""
    h = x.double()
    for i in (0, 2):
        layer = model[i]
        w = layer.base_layer.weight.double()
        if layer.merged:
            w = w - layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
        if adapted:
            w = w + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
        h = h @ w.t() + layer.base_layer.bias.double()
        h = torch.tanh(h) if i == 0 else h
    last = model[3].trained if adapted else model[3].original
    return h @ last.weight.double().t() + last.bias.double()


def test_disable_blocks_exited_out_of_order_restore_the_adapters() -> None:
    """Two disable_adapters() blocks that overlap and end in the order they began (two threads
    computing a DPO reference policy, or two asyncio tasks): after both, the model must be its
    adapted self again, merged layers merged and enabled. Before the fix each block restored what
    it saw on entry, so the second one, which saw the adapters disabled by the first, left them
    disabled for good (a merged layer ends merged yet disabled, a state adapter_enabled's setter refuses,
    and its next disable block fails on exit)."""
    for merged in (False, True):
        model = _lora_model(merged)
        x = torch.randn(3, D, generator=torch.Generator().manual_seed(2))
        first, second = pl.disable_adapters(model), pl.disable_adapters(model)
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        second.__exit__(None, None, None)
        layers = [layer for _, layer in pl.model.iter_adapter_layers(model)]
        assert [(l.merged, l.adapter_enabled, l.disable_blocks) for l in layers] == [(merged, True, 0)] * 2
        assert model[3].enabled
        with torch.no_grad():
            torch.testing.assert_close(model(x).double(), _model_ref64(model, x, adapted=True),
                                       rtol=1e-5, atol=1e-5)


class _PausingDoRA(pl.DoRALinear):
    """Pauses the norm cache's store at a chosen point (a thread switch forced where the
    interpreter may switch between the two attribute writes of one assignment)."""

    pause: dict | None = None

    def __setattr__(self, name: str, value: object) -> None:
        plan = type(self).pause
        if plan is None or not name.startswith("_base_row_norm"):
            return super().__setattr__(name, value)
        me = threading.get_ident()
        if me == plan["old"] and not plan["old_paused"]:
            plan["old_paused"] = True
            plan["old_ready"].set()
            plan["go_old"].wait(10)  # before its first store: the new forward stores in between
            return super().__setattr__(name, value)
        super().__setattr__(name, value)
        if me == plan["new"] and not plan["new_paused"]:
            plan["new_paused"] = True
            plan["go_old"].set()  # after its first store: the old forward stores all it has
            plan["old_thread"].join(10)


def test_dora_base_norm_cache_keeps_no_old_norm_under_a_new_key() -> None:
    """base_row_norm_sq() stored its cache as two attributes, the norm then its key. A forward
    that computed ||W0||^2 before a write to the base weight, storing while a forward after the
    write stores, can leave the old norm under the new weight's key: every later no-grad forward
    then uses the old norm (until the base changes again). Interleaved here by pausing the two
    stores; then the cached norm must be the current weight's, and the forward DoRA's formula in
    float64."""
    torch.manual_seed(0)
    layer = _PausingDoRA.from_linear(nn.Linear(D, D), rank=2).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.reset_norm_cache()
    plan = {"old_ready": threading.Event(), "go_old": threading.Event(), "old_paused": False,
            "new_paused": False, "new": threading.get_ident()}

    def old_forward() -> None:  # what a forward before the write computes: ||W0||^2 of that W0
        plan["old"] = threading.get_ident()
        layer.base_row_norm_sq()

    old = threading.Thread(target=old_forward)
    plan["old"], plan["old_thread"] = None, old
    _PausingDoRA.pause = plan
    try:
        old.start()
        assert plan["old_ready"].wait(10)
        with torch.no_grad():
            layer.base_layer.weight.mul_(2.0)  # a write to W0 (load_state_dict of the base model)
        layer.base_row_norm_sq()  # a forward after the write
        old.join(10)
    finally:
        _PausingDoRA.pause = None
    w0 = layer.base_layer.weight.double()
    torch.testing.assert_close(layer.base_row_norm_sq().double(), w0.square().sum(1), rtol=1e-5, atol=1e-6)
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(4))
    wp = w0 + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    expected = (layer.magnitude.double() / wp.norm(dim=1)) * (x.double() @ wp.t()) + layer.base_layer.bias.double()
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
