"""QLoRALinear and QDoRALinear: LoRA and DoRA over a quantized base."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import peft_layers as pl
from peft_layers.model import iter_adapter_layers
from peft_layers.qlora import QDoRALinear, QLoRALinear
from peft_layers.quant import QuantizedLinear
from peft_layers.quant import linear as quant_linear
from peft_layers.quant import reference as ref

from models import bnb_linear4bit, bnb_linear8bit, tiny_model, tokens
from reference import assert_close64, direct_row_norm, dora_ref, f64, lora_ref, randomize_adapter

bnb = pytest.importorskip("bitsandbytes")

SCHEMES = ("nf4", "fp4", "int8")
IN, OUT, TOKENS = 128, 96, 10


def make_linear(seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT, bias=bias)


def decoded_base(layer: QLoRALinear) -> torch.Tensor:
    """``W0`` decoded from the layer's stored codes by the pure-PyTorch reference codec (tested bit
    for bit against bitsandbytes in test_quant.py), not by the layer's own decoding path."""
    base = layer.base_layer
    if base.scheme == "int8":
        return ref.dequantize_int8_rowwise(base.weight, base.absmax, base.compute_dtype)
    return ref.dequantize(base._reference_state(), torch.float32).to(base.compute_dtype)


def reference(layer: QLoRALinear, x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float64 output and gradients on the decoded base weight."""
    w0 = f64(decoded_base(layer))
    b = f64(layer.bias)
    x64, a64, b64 = f64(x, True), f64(layer.lora_A, True), f64(layer.lora_B, True)
    if isinstance(layer, QDoRALinear):
        m64 = f64(layer.magnitude, True)
        y = dora_ref(x64, w0, b, a64, b64, m64, layer.scaling, layer.epsilon)
    else:
        m64 = None
        y = lora_ref(x64, w0, b, a64, b64, layer.scaling)
    (y * grad_out.to(torch.float64)).sum().backward()
    out = {"out": y.detach(), "x": x64.grad, "lora_A": a64.grad, "lora_B": b64.grad}
    if m64 is not None:
        out["magnitude"] = m64.grad
    return out


def run(layer: QLoRALinear, x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    for p in layer.adapter_parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    (y * grad_out).sum().backward()
    out = {"out": y.detach(), "x": x.grad, "lora_A": layer.lora_A.grad, "lora_B": layer.lora_B.grad}
    if isinstance(layer, QDoRALinear):
        out["magnitude"] = layer.magnitude.grad
    return out


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("cls", [QLoRALinear, QDoRALinear])
def test_forward_and_gradients_match_float64_reference(cls: type, scheme: str) -> None:
    layer = cls.from_linear(make_linear(), quant=scheme, rank=4, alpha=8.0)
    randomize_adapter(layer, scale=0.3)
    x = torch.randn(2, TOKENS, IN)
    grad_out = torch.randn(2, TOKENS, OUT)
    expected = reference(layer, x, grad_out)
    got = run(layer, x, grad_out)
    for key, value in expected.items():
        assert_close64(got[key], value, rtol=2e-5, what=key)
    with torch.no_grad():
        no_grad = layer(x)
    assert_close64(no_grad, expected["out"], rtol=2e-5, what="no-grad output")


@pytest.mark.parametrize("training", [True, False], ids=["train mode", "eval mode"])
@pytest.mark.parametrize("cls", [QLoRALinear, QDoRALinear])
def test_a_no_grad_forward_keeps_the_int8_kernel_of_a_base_that_opted_in(cls: type, training: bool) -> None:
    # the no-grad path decodes W0 itself only where the base's own forward would; with
    # int8_activations the base rounds x to int8 as well, and the adapter layer must do the same
    # (QDoRA's eval mode caches its gain, its train mode stacks A's rows with x in one base call)
    layer = cls.from_linear(make_linear(), quant="int8", rank=4, alpha=8.0).train(training)
    randomize_adapter(layer, scale=0.3)
    layer.base_layer.int8_activations = True
    x = torch.randn(TOKENS, IN)
    with torch.no_grad():
        base_out = f64(layer.base_layer.matmul(x))  # bitsandbytes' int8 kernel, no bias
        y = layer(x)
    a, b = f64(layer.lora_A), f64(layer.lora_B)
    z = base_out + layer.scaling * (f64(x) @ a.t()) @ b.t()
    if cls is QDoRALinear:
        w = f64(decoded_base(layer)) + layer.scaling * b @ a
        z = z * (f64(layer.magnitude) / w.norm(dim=1))
    assert_close64(y, z + f64(layer.bias), rtol=2e-5, what="output")
    decoded = reference(layer, x, torch.zeros(TOKENS, OUT))["out"]
    assert (f64(y) - decoded).abs().max() > 1e-3  # the kernel's rounding is visible


@pytest.mark.parametrize("cls", [QLoRALinear, QDoRALinear])
def test_from_linear_quantizes_and_keeps_no_float_copy(cls: type) -> None:
    linear = make_linear()
    layer = cls.from_linear(linear, quant="nf4", rank=4)
    assert isinstance(layer.base_layer, QuantizedLinear)
    assert isinstance(layer, pl.LoRALinear)
    for name, tensor in layer.state_dict().items():
        assert not (tensor.is_floating_point() and tensor.numel() >= OUT * IN), name
    # a fresh layer equals its (quantized) base
    x = torch.randn(TOKENS, IN)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=1e-5, atol=1e-5)


def test_qdora_magnitude_starts_at_row_norms_of_dequantized_weight() -> None:
    layer = QDoRALinear.from_linear(make_linear(), quant="nf4", rank=4)
    expected = layer.base_layer.dequantize().to(torch.float64).norm(dim=1)
    assert_close64(layer.magnitude, expected, rtol=1e-6)
    assert not torch.allclose(expected, make_linear().weight.detach().double().norm(dim=1), rtol=1e-4)


@pytest.mark.parametrize("cls", [QLoRALinear, QDoRALinear])
def test_wraps_bnb_linear4bit_without_requantizing(cls: type) -> None:
    module = bnb_linear4bit(make_linear())
    expected = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    layer = cls.from_linear(module, rank=4)
    torch.testing.assert_close(layer.base_layer.dequantize(), expected, rtol=0, atol=0)
    randomize_adapter(layer, scale=0.3)
    x, grad_out = torch.randn(TOKENS, IN), torch.randn(TOKENS, OUT)
    expected_run = reference(layer, x, grad_out)
    got = run(layer, x, grad_out)
    for key, value in expected_run.items():
        assert_close64(got[key], value, rtol=2e-5, what=key)


def test_wraps_bnb_linear8bitlt() -> None:
    linear = make_linear()
    layer = QLoRALinear.from_linear(bnb_linear8bit(linear), rank=4)
    # row-wise int8: every value within half a step (absmax_row / 127 / 2) of the original, plus
    # the fp16 rounding bitsandbytes applies to the weight before quantizing it (2^-11 relative)
    error = (layer.base_layer.dequantize() - linear.weight.detach()).abs()
    absmax = linear.weight.detach().abs().amax(dim=1, keepdim=True)
    assert bool((error <= absmax / 127 / 2 + absmax * 2.0**-11).all())
    x = torch.randn(TOKENS, IN)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x))


def _bnb_model(kind: str) -> nn.Sequential:
    make = bnb_linear8bit if kind == "int8" else bnb_linear4bit
    return nn.Sequential(make(make_linear(1)), nn.ReLU(), nn.Linear(OUT, IN))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("method", ["qlora", "qdora"])
def test_unload_gives_back_the_bitsandbytes_module(kind: str, method: str) -> None:
    model = _bnb_model(kind).train()  # train mode: a 4-bit eval forward would repack the weight
    original = model[0]
    x = torch.randn(TOKENS, IN)
    with torch.no_grad():
        expected = model(x)
    pl.inject_adapters(model, ["0"], method=method, rank=4)
    assert model[0].base_layer.bnb_module is original
    randomize_adapter(model[0], scale=0.2)
    model.to("cpu")  # a move to where the tensors already are keeps the shared storage
    pl.unload(model)
    assert model[0] is original
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def _trained_one_step(model: nn.Module) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(TOKENS, IN)).square().sum().backward()
    optimizer.step()


@pytest.mark.parametrize("loaded_trainable", [True, False])
@pytest.mark.parametrize("bias", ["none", "all"])
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_unload_gives_back_the_bitsandbytes_module_with_the_flags_injection_set(
    kind: str, bias: str, loaded_trainable: bool
) -> None:
    """The QuantizedLinear holds the module's bias in a Parameter of its own, which injection
    freezes (or bias="all" trains): the module comes back with that flag, whatever it had before
    (transformers loads its biases trainable)."""
    model = _bnb_model(kind).train()
    original = model[0]
    original.bias.requires_grad_(loaded_trainable)
    pl.inject_adapters(model, ["0"], method="qlora", rank=4, bias=bias)
    _trained_one_step(model)
    flags = {
        name.replace("base_layer.", ""): p.requires_grad for name, p in model.named_parameters() if "lora_" not in name
    }
    trained_bias = model[0].base_layer.bias.detach().clone()
    pl.unload(model)
    assert model[0] is original
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert flags["0.bias"] is (bias == "all") and torch.equal(original.bias, trained_bias)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_and_unload_over_a_bitsandbytes_base_keeps_the_bias_that_bias_all_trained(kind: str) -> None:
    model = _bnb_model(kind).train()
    model[0].bias.requires_grad_(True)
    before = model[0].bias.detach().clone()
    pl.inject_adapters(model, ["0"], method="qlora", rank=4, bias="all")
    _trained_one_step(model)
    trained_bias = model[0].base_layer.bias.detach().clone()
    assert not torch.equal(trained_bias, before)
    pl.merge_and_unload(model)
    assert type(model[0]) is nn.Linear and model[0].bias.requires_grad
    assert torch.equal(model[0].bias.detach(), trained_bias)


@pytest.mark.parametrize("method", ["qlora", "qdora"])
def test_a_model_level_load_without_the_base_codes_leaves_the_base_as_it_is(method: str) -> None:
    # a load of other modules (strict=False) between forward and backward: the base did not
    # change, so backward runs and gives what it gives without the load, and unload still gives
    # the bitsandbytes module back
    model = _bnb_model("nf4").train()
    original = model[0]
    pl.inject_adapters(model, ["0"], method=method, rank=4)
    randomize_adapter(model[0], scale=0.2)
    base, version = model[0].base_layer, model[0].base_layer.version
    x, grad_out = torch.randn(TOKENS, IN), torch.randn(TOKENS, OUT)
    expected = run(model[0], x, grad_out)
    y = model[0](x.clone().requires_grad_(True))
    model.load_state_dict({"2.weight": torch.randn(IN, OUT)}, strict=False)
    model[0].lora_A.grad = None
    (y * grad_out).sum().backward()
    assert torch.equal(model[0].lora_A.grad, expected["lora_A"])
    assert base.version == version and base.bnb_module is original
    model.load_state_dict({"0.base_layer.bias": base.bias.detach() + 1}, strict=False)  # bias alone
    assert base.version == version and base.bnb_module is original and torch.equal(original.bias, base.bias)
    pl.unload(model)
    assert model[0] is original


def test_prepare_for_kbit_training_after_injection_keeps_the_bitsandbytes_module() -> None:
    # prepare casts the float16 bias of the layer QLoRA wraps; the module, outside the module tree,
    # gets the same cast, so it still holds the layer's tensors and unload gives it back
    model = _bnb_model("nf4").train()
    original = model[0]
    original.bias.data = original.bias.data.half()
    pl.inject_adapters(model, ["0"], method="qlora", rank=4)
    pl.prepare_for_kbit_training(model)
    base = model[0].base_layer
    assert base.bias.dtype == torch.float32 and base.bnb_module is original
    assert original.bias.dtype == torch.float32 and torch.equal(original.bias, base.bias)
    pl.unload(model)
    assert model[0] is original


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_a_merged_quantized_layer_refuses_disable_adapter_changing_nothing(scheme: str) -> None:
    # each block would unmerge and merge again, two requantizations that compound block after block
    model = nn.Sequential(make_linear(1), nn.ReLU(), nn.Linear(OUT, IN))
    pl.inject_adapters(model, ["0"], method="qlora", quant=scheme, rank=4)
    pl.inject_adapters(model, ["2"], method="lora", rank=4)
    randomize_adapter(model[0], scale=0.2)
    randomize_adapter(model[2], scale=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the merge's requantization warning
        pl.merge_adapters(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no requantization happens, so nothing warns
        with pytest.raises(ValueError, match=r"disable_adapter\(\): .*unmerge\(\) it first"):
            with model[0].disable_adapter():
                pass
        with pytest.raises(ValueError, match=r"^disable_adapters\(\): 1 layer\(s\) refuse it, \['0'\]; .*merged into its quantized"):
            with pl.disable_adapters(model):
                pass
    assert model[0].merged and model[2].merged and model[0].adapter_enabled
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # unmerged once, the layer's blocks are free: the block computes the base, the exit restores
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model[0].unmerge()
    x = torch.randn(TOKENS, IN)
    with torch.no_grad():
        before = model[0](x)
        with model[0].disable_adapter():
            torch.testing.assert_close(model[0](x), model[0].base_layer(x), rtol=0, atol=0)
        assert torch.equal(model[0](x), before)


def test_bnb_module_is_dropped_once_the_weight_is_no_longer_its_own() -> None:
    # a merge requantizes into new storage: unload gives the QuantizedLinear, not a stale module
    model = _bnb_model("nf4").train()
    pl.inject_adapters(model, ["0"], method="qlora", rank=4)
    randomize_adapter(model[0], scale=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the requantization warning
        pl.merge_adapters(model)
        pl.unload(model)  # unmerges, requantizing again
    assert isinstance(model[0], QuantizedLinear) and model[0].bnb_module is None
    # a load of the layer's codes writes them in place, into storage the module shares: the layer
    # no longer vouches for the module
    layer = QuantizedLinear.from_bnb(bnb_linear4bit(make_linear()))
    assert layer.bnb_module is not None
    layer.load_state_dict(QuantizedLinear.from_linear(make_linear(2), "nf4").state_dict())
    assert layer.bnb_module is None
    # a layer not built from bitsandbytes, and the copy of one (storage of its own, no module)
    assert QuantizedLinear.from_linear(make_linear(), "nf4").bnb_module is None
    source = QuantizedLinear.from_bnb(bnb_linear8bit(make_linear()))
    twin = copy.deepcopy(source)
    assert source.bnb_module is not None and twin.bnb_module is None
    assert twin.__dict__.get("_bnb_source") is None  # the copy holds no copy of the module either
    assert torch.equal(twin.dequantize(), source.dequantize())
    source.half()  # casts this layer's bias, not the module's: they no longer match
    assert source.bnb_module is None


def test_train_eval_train_merge_stays_right_after_a_cpu_repack() -> None:
    """bitsandbytes repacks a 4-bit weight in place on its first CPU eval forward (on CPUs with
    AVX512-BF16); our layer must read the right weight through train -> eval -> train -> merge."""
    linear = make_linear()
    module = bnb_linear4bit(linear)
    true_weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    repack = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
    if repack is not None:
        try:  # what bitsandbytes' eval forward does on such a CPU; may not run on this one
            packed, state = repack(module.weight.data, module.weight.quant_state)
            module.weight.data = packed
            module.weight.quant_state = state
            module.weight.quant_state.packing_format_for_cpu = True
        except Exception:  # noqa: BLE001 - an unsupported CPU: the plain layout is tested below
            pass
    layer = QDoRALinear.from_linear(module, rank=4)
    if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        assert layer.base_layer.bnb_module is None  # converted, not shared: unload gives ours
    # the repacked layout keeps absmax in bfloat16: the weight comes back to within its rounding
    torch.testing.assert_close(layer.base_layer.dequantize(), true_weight, rtol=2.0**-8, atol=1e-7)
    true_weight = layer.base_layer.dequantize()
    # and it must not move through the sequence below (HF PEFT's QDoRA reads a scrambled one)
    optimizer = torch.optim.SGD(layer.adapter_parameters(), lr=0.1)
    x, grad_out = torch.randn(TOKENS, IN), torch.randn(TOKENS, OUT)

    def check(stage: str) -> None:
        with torch.no_grad():
            w0, b = true_weight.double(), layer.bias.double()
            expected = dora_ref(x.double(), w0, b, layer.lora_A.double(), layer.lora_B.double(),
                                layer.magnitude.double(), layer.scaling, layer.epsilon)
            assert_close64(layer(x), expected, rtol=2e-5, what=stage)

    for stage in ("train", "eval", "train"):
        layer.train(stage == "train")
        if stage == "train":
            (layer(x) * grad_out).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        check(stage)
    merged = layer.to_linear()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [QLoRALinear, QDoRALinear])
def test_to_linear_is_the_exact_float_merge(cls: type) -> None:
    layer = cls.from_linear(make_linear(), quant="nf4", rank=4)
    randomize_adapter(layer, scale=0.3)
    x = torch.randn(TOKENS, IN)
    merged = layer.to_linear()
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)
        w0 = layer.base_layer.dequantize()
        torch.testing.assert_close(merged.weight, w0 + layer.delta_weight(), rtol=1e-5, atol=1e-6)


def test_merge_requantizes_with_a_warning_and_loses_part_of_the_update() -> None:
    layer = QLoRALinear.from_linear(make_linear(), quant="nf4", rank=4)
    w0 = layer.base_layer.dequantize()
    with torch.no_grad():  # a delta of 7% of the weight's norm
        layer.lora_B.normal_()
        layer.lora_B.mul_(0.07 * w0.norm() / layer.delta_weight().norm())
    intended = layer.delta_weight().detach()
    version = layer.base_layer.version
    with pytest.warns(UserWarning, match="requantized"):
        layer.merge()
    assert layer.base_layer.version != version
    realised = layer.base_layer.dequantize() - w0
    cosine = torch.nn.functional.cosine_similarity(realised.flatten(), intended.flatten(), dim=0)
    assert 0.3 < cosine < 0.95  # rounding keeps part of the update, not all of it (docs report it)
    x = torch.randn(TOKENS, IN)
    with torch.no_grad():
        expected = x @ layer.base_layer.dequantize().t() + layer.bias
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="requantized"):
        layer.unmerge()


def test_qdora_norm_cache_follows_requantization() -> None:
    layer = QDoRALinear.from_linear(make_linear(), quant="nf4", rank=4)
    first = layer.base_row_norm_sq().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.base_layer.requantize_(layer.base_layer.dequantize() * 2)
    torch.testing.assert_close(layer.base_row_norm_sq(), first * 4, rtol=1e-2, atol=0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_qdora_norm_cache_sees_in_place_writes_into_the_quantized_tensors(scheme: str) -> None:
    """DistributedDataParallel copies rank 0's buffers into the other ranks' in place, which the
    layer's own ``version`` does not count: the norm cache must still miss."""
    source = QDoRALinear.from_linear(make_linear(seed=1), quant=scheme, rank=4)
    target = QDoRALinear.from_linear(make_linear(seed=2), quant=scheme, rank=4)
    x = torch.randn(TOKENS, IN)
    with torch.no_grad():
        target(x)  # fills the norm cache (and the no-grad gain cache) with seed 2's base
        for name, tensor in target.state_dict().items():
            tensor.copy_(source.state_dict()[name])  # what DDP's broadcast does
    torch.testing.assert_close(target.base_row_norm_sq(), source.base_row_norm_sq(), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("blocks", [False, True], ids=["decoded whole", "decoded in row blocks"])
@pytest.mark.parametrize("rows", [1, 7, 37])
def test_qdora_no_grad_forward_gives_the_same_output_before_and_after_its_gain_is_cached(
    rows: int, blocks: bool, monkeypatch,
) -> None:
    """In eval mode, the call that computes the gain and the calls that reuse it multiply x by the
    same base alone: stacked with A's rows, the GEMM rounded x's rows differently (seen at 1 and 7
    rows); decoded whole by one and in row blocks by the other, it can too (seen at 1 and 3 rows).
    In train mode (reentrant checkpointing's no-grad pass) A still rides along with x."""
    if blocks:
        monkeypatch.setattr(quant_linear, "DECODE_BLOCK_BYTES", 7 * 256 * 4)  # 19 blocks of 7 rows
    torch.manual_seed(0)
    layer = QDoRALinear.from_linear(nn.Linear(256, 128), rank=8, quant="nf4").eval()
    assert layer.base_layer._decodes_in_blocks(torch.float32) == blocks
    randomize_adapter(layer)
    x = torch.randn(rows, 256)
    with torch.no_grad():
        for _ in range(2):
            layer.lora_B.mul_(1.0)  # a new version: the next call computes the gain again
            first, cached = layer(x), layer(x)
            assert torch.equal(first, cached)
    expected = dora_ref(f64(x), f64(layer.base_layer.dequantize()), f64(layer.bias), f64(layer.lora_A),
                        f64(layer.lora_B), f64(layer.magnitude), layer.scaling, layer.epsilon)
    assert_close64(first, expected, rtol=1e-5)
    if blocks:  # the decodes below are counted through dequantize(), which blocks do not call
        return
    # train mode: one decode for x and A together (the weight is decoded once per call)
    layer.train()
    decodes = {"n": 0}
    dequantize = layer.base_layer.dequantize

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003
        decodes["n"] += 1
        return dequantize(*args, **kwargs)

    layer.base_layer.dequantize = counting
    with torch.no_grad():
        layer.lora_B.mul_(1.0)
        assert_close64(layer(x), expected, rtol=1e-5)
    layer.eval()
    with torch.no_grad():
        layer.lora_B.mul_(1.0)
        layer(x)
    assert decodes["n"] == 1 + 1  # train: [x; A] at once; eval: one decode for x W0^T and A W0^T


@pytest.mark.parametrize("blocks", [False, True], ids=["decoded whole", "decoded in row blocks"])
def test_qdora_eval_output_does_not_depend_on_an_earlier_train_mode_no_grad_call(blocks: bool, monkeypatch) -> None:
    """A train-mode no-grad call lets A's rows ride with x ([x; A] through one base call), which
    rounds the norm otherwise than the eval path. It once filled the gain cache, so the next eval
    call (same state) reused that gain and differed in the last bits from a copy of the layer that
    never saw the train-mode call (found by test_quantized_stateful.py's explore profile: 20 of
    20 inputs differed here)."""
    if blocks:
        monkeypatch.setattr(quant_linear, "DECODE_BLOCK_BYTES", 7 * 64 * 4)  # 5 blocks of 7 rows
    torch.manual_seed(1)
    layer = QDoRALinear.from_linear(nn.Linear(64, 32, bias=False), rank=1, alpha=1.0, quant="nf4")
    assert layer.base_layer._decodes_in_blocks(torch.float32) == blocks
    randomize_adapter(layer)
    for _ in range(5):
        x = torch.randn(15, 64)
        with torch.no_grad():
            layer.lora_B.mul_(1.0)  # a new version: nothing cached for this state yet
            untouched = copy.deepcopy(layer).eval()
            layer.train()
            layer(x)
            layer.eval()
            after_train_call = layer(x)
            assert torch.equal(after_train_call, untouched(x))
    expected = dora_ref(f64(x), f64(layer.base_layer.dequantize()), None, f64(layer.lora_A),
                        f64(layer.lora_B), f64(layer.magnitude), layer.scaling, layer.epsilon)
    assert_close64(after_train_call, expected, rtol=1e-5)


class _BigTensorCounter(TorchDispatchMode):
    """Counts op outputs of at least ``size`` elements that own new storage."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.count = size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        storages = {a.untyped_storage().data_ptr() for a in inputs}
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.size and t.untyped_storage().data_ptr() not in storages:
                self.count += 1
        return out


def _count_step(layer: QLoRALinear, size: int) -> int:
    x = torch.randn(4, IN, requires_grad=True)
    layer(x)  # caches (||W0||^2) are built outside the count
    with _BigTensorCounter(size) as counter:
        (layer(x) ** 2).sum().backward()
    return counter.count


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_qdora_step_creates_no_more_big_tensors_than_qlora(scheme: str) -> None:
    linear = make_linear()
    qlora = QLoRALinear.from_linear(copy.deepcopy(linear), quant=scheme, rank=4)
    qdora = QDoRALinear.from_linear(copy.deepcopy(linear), quant=scheme, rank=4)
    randomize_adapter(qlora)
    randomize_adapter(qdora)
    lora_count = _count_step(qlora, OUT * IN)
    dora_count = _count_step(qdora, OUT * IN)
    assert lora_count >= 1  # the decoded weight itself is seen: the counter works
    assert dora_count <= lora_count


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("cls", [QLoRALinear, QDoRALinear])
def test_forward_and_gradients_with_the_base_decoded_in_row_blocks_match_float64(
    cls, scheme, dtype, rtol, monkeypatch,
) -> None:
    # a large base on the CPU is decoded a block of rows at a time (peft_layers._row_blocks):
    # here 7 rows of 128 per block, 14 blocks
    monkeypatch.setattr(quant_linear, "DECODE_BLOCK_BYTES", 7 * IN * dtype.itemsize)
    layer = cls.from_linear(make_linear(), quant=scheme, rank=4, alpha=8.0, compute_dtype=dtype)
    assert layer.base_layer._decode_rows_per_block(dtype) == 7
    randomize_adapter(layer, scale=0.3)
    x = torch.randn(2, TOKENS, IN)
    grad_out = torch.randn(2, TOKENS, OUT)
    expected = reference(layer, x, grad_out)  # on W0 decoded in the compute dtype
    got = run(layer, x, grad_out)
    for key, value in expected.items():
        assert_close64(got[key], value, rtol=rtol, what=key)
    for training in (True, False):  # the no-grad paths: the fused product, the cached DoRA gain
        layer.train(training)
        with torch.no_grad():
            assert_close64(layer(x), expected["out"], rtol=rtol, what=f"no-grad output, training={training}")


@pytest.mark.parametrize("cls", [QLoRALinear, QDoRALinear])
def test_a_train_step_over_a_base_decoded_in_row_blocks_never_holds_the_dense_weight(cls, monkeypatch) -> None:
    layer = cls.from_linear(make_linear(), quant="nf4", rank=4)
    randomize_adapter(layer)
    assert _count_step(layer, OUT * IN) >= 1  # decoded whole: the counter sees it
    monkeypatch.setattr(quant_linear, "DECODE_BLOCK_BYTES", 16 * IN * 4)
    assert _count_step(layer, OUT * IN) == 0
    assert _count_step(layer, 16 * IN) >= 1  # the blocks themselves
    if isinstance(layer, QDoRALinear):  # the cached row norms of W0 come from the blocks too
        layer.reset_norm_cache()
        with _BigTensorCounter(OUT * IN) as counter:
            norm_sq = layer.base_row_norm_sq()
        assert counter.count == 0
        expected = f64(layer.base_layer.dequantize()).norm(dim=1) ** 2
        assert_close64(norm_sq, expected, rtol=1e-6)


def test_qdora_norms_over_row_blocks_hold_no_whole_weight_with_dropout_too(monkeypatch) -> None:
    # with dropout active, the norm is computed apart from the products (_row_norm), as it is by
    # weight_norm() (merges) and by a no-grad call whose base multiplies without a decoded weight
    layer = QDoRALinear.from_linear(make_linear(), quant="nf4", rank=4, dropout=0.25)
    randomize_adapter(layer, scale=0.3)
    monkeypatch.setattr(quant_linear, "DECODE_BLOCK_BYTES", 16 * IN * 4)
    assert _count_step(layer, OUT * IN) == 0
    with _BigTensorCounter(OUT * IN) as counter:
        norm = layer.weight_norm()
    assert counter.count == 0
    expected = direct_row_norm(f64(decoded_base(layer)), f64(layer.lora_A), f64(layer.lora_B), layer.scaling)
    assert_close64(norm, expected, rtol=1e-5)


@pytest.mark.parametrize("cls", [QLoRALinear, QDoRALinear])
@pytest.mark.parametrize("input_grad", [True, False])
def test_a_train_step_decodes_the_base_once_per_pass_it_needs(cls: type, input_grad: bool, monkeypatch) -> None:
    # forward decodes W once; backward decodes it again only for the input's gradient
    layer = cls.from_linear(make_linear(), quant="nf4", rank=4)
    randomize_adapter(layer)
    layer(torch.randn(4, IN))  # caches (||W0||^2) are built outside the count
    calls = []
    original = QuantizedLinear.dequantize
    monkeypatch.setattr(QuantizedLinear, "dequantize", lambda self, *args: calls.append(1) or original(self, *args))
    x = torch.randn(4, IN, requires_grad=input_grad)
    y = layer(x)
    assert len(calls) == 1
    (y * torch.randn(4, OUT)).sum().backward()
    assert len(calls) == (2 if input_grad else 1)
    assert layer.lora_A.grad is not None and (x.grad is not None) == input_grad


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="quant"):
        QLoRALinear.from_linear(make_linear(), quant="nf3")
    with pytest.raises(ValueError, match="blocksize"):
        QLoRALinear.from_linear(make_linear(), quant="nf4", blocksize=48)
    with pytest.raises(TypeError, match="Embedding"):
        QLoRALinear.from_linear(bnb.nn.StableEmbedding(10, 8))
    with pytest.raises(TypeError, match="QLoRALinear"):
        pl.LoRALinear.from_linear(bnb_linear4bit(make_linear()))
    with pytest.raises(ValueError, match="input"):
        QLoRALinear(IN, OUT, rank=2)(torch.randn(3, IN + 1))


def test_quantization_arguments_over_a_quantized_layer_are_checked_and_compute_dtype_applies() -> None:
    """Over a layer quantized already its own scheme wins, but ``quant="bogus"``, ``blocksize=3``
    and ``double_quant="yes"`` passed unseen, and a valid ``compute_dtype`` was dropped for a
    ``QuantizedLinear`` (a bitsandbytes layer took it)."""
    def quantized() -> QuantizedLinear:
        return QuantizedLinear.from_linear(make_linear(), "nf4")

    for kwargs, error, match in [
        ({"quant": "bogus"}, ValueError, r"^quant: expected one of \('nf4', 'fp4', 'int8'\), got 'bogus'$"),
        ({"blocksize": 3}, ValueError, r"^blocksize: expected a power of two .* got 3$"),
        ({"double_quant": "yes"}, TypeError, r"^double_quant: expected a bool, got 'yes'$"),
        ({"compute_dtype": torch.int8}, ValueError, r"^compute_dtype: expected one of .* got torch.int8$"),
    ]:
        with pytest.raises(error, match=match):
            QLoRALinear.from_linear(quantized(), **kwargs)
        model = nn.Sequential(quantized())
        with pytest.raises(error, match=match.replace("^", r"^inject_adapters\(\): module '0': ")):
            pl.inject_adapters(model, ["0"], method="qlora", **kwargs)
        assert isinstance(model[0], QuantizedLinear)
    base = quantized()
    for bad in ({"rank": 0}, {"alpha": -1.0}, {"rnk": 4}):  # a failed build leaves the base's dtype
        with pytest.raises((ValueError, TypeError)):
            QLoRALinear.from_linear(base, compute_dtype=torch.bfloat16, **bad)
        assert base.compute_dtype == torch.float32
    layer = QLoRALinear.from_linear(quantized(), compute_dtype=torch.bfloat16, rank=2)
    assert layer.compute_dtype == layer.base_layer.compute_dtype == torch.bfloat16
    x = torch.randn(3, IN)
    with torch.no_grad():
        expected = F.linear(x.bfloat16(), layer.base_layer.dequantize(torch.bfloat16), layer.bias.bfloat16())
        assert torch.equal(layer.base_layer(x), expected.float())  # computed in bfloat16, returned in x's dtype


@pytest.mark.parametrize("method", ["qlora", "qdora"])
def test_inject_quantized_methods_and_merge_and_unload(method: str) -> None:
    model = pl.inject_adapters(tiny_model(), ["q_proj", "up_proj"], method=method, quant="nf4", rank=4)
    layers = dict(iter_adapter_layers(model))
    assert len(layers) == 4 and all(pl.model.method_of(layer) == method for layer in layers.values())
    randomize_adapter(layers["layers.0.attn.q_proj"], scale=0.2)
    trainable, total = pl.trainable_parameters(model)
    expected = sum(l.rank * (l.in_features + l.out_features) + (l.out_features if method == "qdora" else 0)
                   for l in layers.values())
    assert trainable == expected
    batch = tokens()
    with torch.no_grad():
        adapted = model(batch)
        pl.merge_and_unload(model, dtype=torch.float64)
        assert model.layers[0].attn.q_proj.weight.dtype == torch.float64
        model.double()
        torch.testing.assert_close(model(batch).float(), adapted, rtol=1e-4, atol=1e-4)


def test_a_quantized_base_weight_counts_its_values_not_its_packed_storage() -> None:
    model = pl.inject_adapters(nn.Sequential(nn.Linear(64, 32, bias=False)), ["0"], method="qlora", rank=4)
    base = model[0].base_layer
    assert isinstance(base, QuantizedLinear) and base.weight.numel() < 64 * 32  # packed nf4 codes
    trainable = 4 * (64 + 32)
    assert pl.trainable_parameters(model) == (trainable, 64 * 32 + trainable)


@pytest.mark.parametrize("shape", [(5, 3), (4, 3)])
def test_a_wrapped_4bit_weight_with_an_odd_count_counts_as_hugging_face_peft_counts_it(shape) -> None:
    """An odd ``out * in`` fills its last byte half: Hugging Face PEFT (and we, before injection)
    count the packed bytes twice, pad included; the wrapped weight counted ``out * in``, one less."""
    peft = pytest.importorskip("peft")

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(bnb_linear4bit(nn.Linear(*shape)))

    ours = model()
    before = pl.trainable_parameters(ours)[1]
    pl.inject_adapters(ours, ["0"], method="qlora", rank=2)
    theirs = peft.get_peft_model(model(), peft.LoraConfig(r=2, target_modules=["0"]))
    assert pl.trainable_parameters(ours) == tuple(theirs.get_nb_trainable_parameters())
    assert pl.trainable_parameters(ours)[1] == before + 2 * (shape[0] + shape[1])


# ---- the base weight changing between forward and backward --------------------------------
@pytest.mark.parametrize("change", ["merge", "requantize_"])
@pytest.mark.parametrize("cls", [QLoRALinear, QDoRALinear])
def test_base_weight_changed_between_forward_and_backward_raises(cls: type, change: str) -> None:
    # the fused functions decode W0 again in backward: without the check the input gradient would
    # silently come from the requantized weight
    layer = cls.from_linear(make_linear(), quant="nf4", rank=4)
    randomize_adapter(layer, scale=0.3)
    x = torch.randn(TOKENS, IN, requires_grad=True)
    grad_out = torch.randn(TOKENS, OUT)
    y = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # merge's requantization warning
        if change == "merge":
            layer.merge()
        else:
            layer.base_layer.requantize_(layer.base_layer.dequantize() * 1.5)
    with pytest.raises(RuntimeError, match="base weight .* changed between forward and backward"):
        (y * grad_out).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if layer.merged:
            layer.unmerge()
    # a normal step on the (requantized) base gives the float64 reference gradient
    expected = reference(layer, x, grad_out)
    got = run(layer, x, grad_out)
    for key, value in expected.items():
        assert_close64(got[key], value, rtol=2e-5, what=key)


# ---- to_linear: one dtype, the compute dtype ------------------------------------------------
TO_LINEAR_CASES = {  # each has a bias whose dtype differs from the compute dtype
    "compute_dtype=bfloat16": lambda cls: cls(IN, OUT, rank=4, compute_dtype=torch.bfloat16),
    "compute_dtype=float64": lambda cls: cls(IN, OUT, rank=4, compute_dtype=torch.float64),
    ".to(float64)": lambda cls: cls(IN, OUT, rank=4).to(torch.float64),
    "bfloat16 nn.Linear": lambda cls: cls.from_linear(make_linear().to(torch.bfloat16), rank=4),
}
TO_LINEAR_RTOL = {torch.bfloat16: 2e-2, torch.float32: 2e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("case", list(TO_LINEAR_CASES))
@pytest.mark.parametrize("cls", [QLoRALinear, QDoRALinear])
def test_to_linear_is_in_the_compute_dtype_and_equals_the_layer(cls: type, case: str) -> None:
    layer = TO_LINEAR_CASES[case](cls)
    randomize_adapter(layer, scale=0.3)
    dtype = layer.compute_dtype
    assert layer.bias.dtype != dtype
    merged = layer.to_linear()
    assert merged.weight.dtype == merged.bias.dtype == dtype
    x = torch.randn(TOKENS, IN, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        got = merged(x)
        unmerged = layer(x)
    rtol = TO_LINEAR_RTOL[dtype]
    assert_close64(got, f64(unmerged), rtol, what="to_linear against the unmerged layer")
    expected = reference(layer, x, torch.zeros(TOKENS, OUT))["out"]
    assert_close64(got, expected, rtol, what="to_linear against the float64 reference")


@pytest.mark.parametrize("cls", [QLoRALinear, QDoRALinear])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_to_linear_after_casting_the_adapters_is_the_exact_float_merge(cls, dtype) -> None:
    """``.to(bf16)`` casts the adapters but not the quantized base (float32 compute): the merge
    must form ``B A`` in float32, not in the adapters' 16-bit dtype."""
    torch.manual_seed(0)
    layer = cls.from_linear(nn.Linear(256, 256), rank=8, alpha=16.0)
    randomize_adapter(layer, scale=0.1)
    layer.to(dtype)
    assert layer.compute_dtype == torch.float32 and layer.lora_A.dtype == dtype
    x = torch.randn(4, 256)
    with torch.no_grad():
        w0 = f64(layer.base_layer.dequantize())
        args = (f64(x), w0, f64(layer.bias), f64(layer.lora_A), f64(layer.lora_B))
        expected = lora_ref(*args, layer.scaling) if cls is QLoRALinear else dora_ref(
            *args, f64(layer.magnitude), layer.scaling, layer.epsilon
        )
        assert_close64(layer.to_linear()(x), expected, 1e-5, what="to_linear")
        assert_close64(layer(x), expected, 1e-5, what="unmerged layer")


def test_a_meta_weight_cannot_be_quantized_and_the_model_stays() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64))
    original = model[0]
    with pytest.raises(ValueError, match=r"module '0': weight: a tensor on the meta device holds no values to quantize"):
        pl.inject_adapters(model, ["0"], method="qlora", rank=4)
    assert model[0] is original and original.weight.requires_grad


@pytest.mark.parametrize("cls", [QLoRALinear, QDoRALinear])
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_pissa_over_a_float_linear_splits_before_quantizing(cls, quant):
    """QPiSSA: the residual ``W0 - s B A`` (top-r singular part in ``s B A``) is quantized once, so
    the fresh layer is ``Q(R) + s B A``, as far from ``W0`` as ``R``'s quantization error. For a
    weight whose spectrum decays, as pretrained ones do, that is well below ``W0``'s own error
    (plain QLoRA), while splitting the decoded weight and requantizing ended further from ``W0``
    than plain QLoRA. The caller's layer is not changed."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 64)
    left, _ = torch.linalg.qr(torch.randn(64, 64))
    right, _ = torch.linalg.qr(torch.randn(256, 64))
    with torch.no_grad():
        linear.weight.copy_(left @ torch.diag(torch.arange(1, 65.0) ** -0.8) @ right.t())
    original = linear.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one quantization, no requantization to warn about
        layer = cls.from_linear(linear, quant=quant, rank=8, alpha=8.0, init="pissa")
    assert torch.equal(linear.weight, original)
    w0 = f64(original)
    u, singular, vh = torch.linalg.svd(w0, full_matrices=False)
    top = u[:, :8] @ torch.diag(singular[:8]) @ vh[:8]
    update = layer.scaling * f64(layer.lora_B) @ f64(layer.lora_A)
    assert_close64(update, top, 1e-4, what="s B A: the top-8 singular part of W0")
    residual = w0 - top
    quantized_residual = QuantizedLinear.from_linear(_float_linear(residual), scheme=quant).dequantize().double()
    effective = f64(layer.base_layer.dequantize()) + update
    error, residual_error = (effective - w0).norm(), (quantized_residual - residual).norm()
    plain_error = (QuantizedLinear.from_linear(linear, scheme=quant).dequantize().double() - w0).norm()
    assert abs(error / residual_error - 1) < 0.02, (error, residual_error)
    with pytest.warns(UserWarning, match="requantized"):
        requantized = cls.from_linear(QuantizedLinear.from_linear(linear, scheme=quant), rank=8, alpha=8.0, init="pissa")
    requantized_error = (f64(requantized.base_layer.dequantize()) + requantized.scaling * f64(
        requantized.lora_B) @ f64(requantized.lora_A) - w0).norm()
    assert error < 0.7 * plain_error < 0.7 * requantized_error, (error, plain_error, requantized_error)
    if cls is QDoRALinear:
        assert_close64(layer.magnitude, effective.norm(dim=1), 1e-5, what="m = ||Q(R) + s B A|| per row")
    x = torch.randn(5, 256)
    with torch.no_grad():
        assert_close64(layer(x), f64(x) @ effective.t() + f64(linear.bias), 1e-5, what="fresh layer's output")


def _float_linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


def test_pissa_over_a_quantized_base_warns_that_it_requantizes():
    base = QuantizedLinear.from_linear(nn.Linear(64, 32))
    with pytest.warns(UserWarning, match=r"^init='pissa': the base of this QLoRALinear is quantized \(nf4\), so the PiSSA residual"):
        QLoRALinear.from_linear(base, rank=4, init="pissa")


def test_qpissa_with_rslora_starts_at_the_base_up_to_quantization() -> None:
    """QPiSSA splits the float weight with the layer's own scaling: with rsLoRA, s = alpha /
    sqrt(r), and a split with alpha / r would leave the layer far from its base."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = torch.randn(5, 64)
    errors = {}
    for rslora in (False, True):
        layer = QLoRALinear.from_linear(copy.deepcopy(linear), rank=16, alpha=8.0, init="pissa", use_rslora=rslora, quant="nf4")
        with torch.no_grad():
            errors[rslora] = float((layer(x) - linear(x)).abs().max())
    plain = QLoRALinear.from_linear(copy.deepcopy(linear), rank=16, alpha=8.0, quant="nf4")
    with torch.no_grad():
        plain_error = float((plain(x) - linear(x)).abs().max())
    assert errors[True] < plain_error and errors[False] < plain_error, (errors, plain_error)


def test_qdora_norm_cache_follows_a_change_of_the_base_compute_dtype():
    """QDoRA caches ``||dq(Q)||^2`` per row; ``dq`` depends on the base's ``compute_dtype`` (a
    bfloat16 decode rounds every weight), so a change of it (``quantized_base(layer,
    compute_dtype=...)``, or setting the attribute) must refresh the cache. Against float64
    norms of the bfloat16 decode."""
    torch.manual_seed(0)
    layer = pl.QDoRALinear.from_linear(nn.Linear(64, 32), quant="nf4", rank=4)
    layer.base_row_norm_sq()  # cached for float32
    layer.base_layer.compute_dtype = torch.bfloat16
    expected = layer.base_layer.dequantize(torch.bfloat16).double().square().sum(dim=1)
    torch.testing.assert_close(layer.base_row_norm_sq().double(), expected, rtol=1e-6, atol=0)
