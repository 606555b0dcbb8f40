"""The layers in the set-ups people train with: ``torch.autocast``, ``torch.compile``,
activation checkpointing and DDP.

Under ``torch.autocast`` every layer behaves as ``nn.Linear`` does: it computes in the autocast
dtype and returns it, while the adapter parameters stay float32 and get float32 gradients. Each
autocast case is checked against a float64 reference on the same weights, with a tolerance of a
few bfloat16 roundings (relative to the tensor's scale). Compiled and checkpointed layers are
checked against the eager layer, itself checked against float64 references elsewhere; two DDP
processes against one process that sees the whole batch.
"""

from __future__ import annotations

import pytest
import torch
from reference import assert_close64, dora_ref, f64, lora_ref, randomize_adapter
from torch import nn
from torch.utils.checkpoint import checkpoint

import peft_layers as pl
from peft_layers import adapter as adapter_module
from peft_layers.quant import QuantizedLinear

AUTOCAST = torch.bfloat16
IN, OUT, TOKENS = 32, 24, 6
RTOL = 3e-2  # bfloat16 keeps 8 bits: a product of two rounded operands is off by ~1e-2
DENSE = [pl.LoRALinear, pl.LoRAPlusLinear, pl.DoRALinear]
QUANTIZED = [pl.QLoRALinear, pl.QDoRALinear]


def _layer(cls: type) -> nn.Module:
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT)
    layer = cls.from_linear(linear, rank=4, alpha=8.0) if cls in DENSE else cls.from_linear(linear, rank=4)
    randomize_adapter(layer, scale=0.3)
    return layer


def _base_weight(layer: nn.Module) -> torch.Tensor:
    base = layer.base_layer
    return f64(base.dequantize() if isinstance(base, QuantizedLinear) else base.weight)


def _reference(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Float64 output and ``(output * g).sum()`` gradients, ``g`` = ones."""
    x64 = f64(x, True)
    params = {name: f64(getattr(layer, name), True) for name in layer.adapter_parameter_names}
    if "magnitude" in params:
        y = dora_ref(x64, _base_weight(layer), f64(layer.bias), params["lora_A"], params["lora_B"],
                     params["magnitude"], layer.scaling, layer.epsilon)
    else:
        y = lora_ref(x64, _base_weight(layer), f64(layer.bias), params["lora_A"], params["lora_B"], layer.scaling)
    y.sum().backward()
    grads = {name: p.grad for name, p in params.items()}
    grads["x"] = x64.grad
    return y.detach(), grads


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_the_autocast_lookup_reads_the_device_type_of_its_tensor(device: str) -> None:
    # the layers ask per device type, as torch.autocast is set per device type; CPU and CUDA
    # tensors answer without building a torch.device
    tensor = torch.empty(2, device=device)
    assert adapter_module._device_type(tensor) == tensor.device.type
    with torch.autocast("cpu", dtype=AUTOCAST):
        assert adapter_module.autocast_enabled(tensor) == (device == "cpu")
        assert adapter_module.autocast_dtype(tensor, torch.float32) == (AUTOCAST if device == "cpu" else None)
    assert not adapter_module.autocast_enabled(tensor)


@pytest.mark.parametrize("cls", DENSE + QUANTIZED)
@pytest.mark.parametrize("backward_inside", [False, True])
def test_train_step_computes_in_the_autocast_dtype(cls: type, backward_inside: bool) -> None:
    layer = _layer(cls).train()
    x = torch.randn(TOKENS, IN, requires_grad=True)
    expected, expected_grads = _reference(layer, x)
    with torch.autocast("cpu", dtype=AUTOCAST):
        y = layer(x)
        if backward_inside:
            y.float().sum().backward()
    if not backward_inside:
        y.float().sum().backward()
    assert y.dtype == AUTOCAST
    assert_close64(y, expected, RTOL, what="output")
    assert x.grad.dtype == torch.float32
    assert_close64(x.grad, expected_grads.pop("x"), RTOL, what="input gradient")
    for name, grad in expected_grads.items():
        parameter = getattr(layer, name)
        assert parameter.dtype == parameter.grad.dtype == torch.float32, name
        assert_close64(parameter.grad, grad, RTOL, what=f"{name} gradient")


@pytest.mark.parametrize("cls", DENSE + QUANTIZED)
def test_no_grad_forward_computes_in_the_autocast_dtype_and_leaves_no_trace(cls: type) -> None:
    layer = _layer(cls).eval()
    x = torch.randn(2, TOKENS, IN)
    expected, _ = _reference(layer, x)
    with torch.no_grad():
        for _ in range(2):  # the second call reads DoRA's cached gain
            with torch.autocast("cpu", dtype=AUTOCAST):
                y = layer(x)
            assert y.dtype == AUTOCAST
            assert_close64(y, expected, RTOL, what="autocast output")
        # nothing kept from the autocast calls (DoRA's gain is cached per dtype) lowers float32
        assert_close64(layer(x), expected, 1e-5, what="float32 output after autocast calls")


@pytest.mark.parametrize("cls", [pl.LoRALinear, pl.DoRALinear, pl.QLoRALinear])
def test_merged_and_disabled_layers_follow_autocast_like_their_base(cls: type) -> None:
    layer = _layer(cls).eval()
    x = torch.randn(TOKENS, IN)
    expected, _ = _reference(layer, x)
    with torch.no_grad():
        with layer.disable_adapter(), torch.autocast("cpu", dtype=AUTOCAST):
            base_out = layer(x)
        assert base_out.dtype == AUTOCAST
        assert_close64(base_out, f64(x) @ _base_weight(layer).T + f64(layer.bias), RTOL, what="disabled")
        if cls is not pl.QLoRALinear:  # a quantized merge requantizes: not the adapter's output
            layer.merge()
            with torch.autocast("cpu", dtype=AUTOCAST):
                merged = layer(x)
            assert merged.dtype == AUTOCAST
            assert_close64(merged, expected, RTOL, what="merged")


def test_quantized_linear_follows_autocast_and_its_backward_runs_outside() -> None:
    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(nn.Linear(IN, OUT), "nf4")
    x = torch.randn(TOKENS, IN, requires_grad=True)
    w = f64(layer.dequantize())
    with torch.autocast("cpu", dtype=AUTOCAST):
        y = layer(x)
        z = layer.matmul(x)
    assert y.dtype == z.dtype == AUTOCAST
    assert_close64(y, f64(x) @ w.T + f64(layer.bias), RTOL, what="forward")
    assert_close64(z, f64(x) @ w.T, RTOL, what="matmul")
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert_close64(x.grad, torch.ones(TOKENS, OUT, dtype=torch.float64) @ w, RTOL, what="input gradient")


@pytest.mark.parametrize("cls", [pl.DoRALinear, pl.QDoRALinear])
def test_dora_norm_and_initialisation_keep_float32_under_autocast(cls: type) -> None:
    layer = _layer(cls)
    outside = layer.weight_norm()
    with torch.autocast("cpu", dtype=AUTOCAST):
        inside = layer.weight_norm()
        layer.reset_adapter_parameters()
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, outside, rtol=1e-6, atol=0)
    torch.testing.assert_close(layer.magnitude, layer.weight_norm(), rtol=1e-6, atol=0)


class _FixedDropout(nn.Module):
    """``nn.Dropout(p)`` with a stored mask, so that the reference sees the same one."""

    def __init__(self, mask: torch.Tensor, p: float) -> None:
        super().__init__()
        self.p, self.mask = p, mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(x.dtype) / (1 - self.p)


@pytest.mark.parametrize("cls", DENSE + QUANTIZED)
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_float16_training_keeps_adapter_gradients_finite_under_loss_scaling(cls: type, dropout: float) -> None:
    """Over a float16 base, the adapter's gradients sum over tokens and pass float16's 65504
    under ``GradScaler``'s 2**16 long before the input gradient does: they are computed in the
    adapters' float32 (as Hugging Face PEFT's float32 adapter branch computes them), finite and
    within float16 rounding of float64. They were inf/NaN (computed in float16, then cast)."""
    torch.manual_seed(0)
    tokens, scale = 64, 2.0**16
    linear = nn.Linear(IN, OUT).half()
    kwargs = {"rank": 4, "alpha": 8.0, "dropout": dropout}
    if cls in QUANTIZED:
        kwargs["compute_dtype"] = torch.float16
    layer = cls.from_linear(linear, **kwargs).train()
    randomize_adapter(layer, scale=0.3)
    x = (torch.randn(tokens, IN) * 1e3).half()
    mask = (torch.rand(tokens, IN) > dropout).float()
    if dropout:
        layer.lora_dropout = _FixedDropout(mask, dropout)
    assert layer.lora_A.dtype == torch.float32
    (layer(x).float().mean() * scale).backward()  # GradScaler's scaled loss: output gradients of 2**16 / numel

    x64, d64 = f64(x), f64(x) * f64(mask) / (1 - dropout)
    params = {name: f64(getattr(layer, name), True) for name in layer.adapter_parameter_names}
    if "magnitude" in params:
        y = dora_ref(x64, _base_weight(layer), f64(layer.bias), params["lora_A"], params["lora_B"],
                     params["magnitude"], layer.scaling, layer.epsilon, d64)
    else:
        y = lora_ref(x64, _base_weight(layer), f64(layer.bias), params["lora_A"], params["lora_B"], layer.scaling, d64)
    (y.mean() * scale).backward()
    for name, parameter in params.items():
        got = getattr(layer, name).grad
        assert got.dtype == torch.float32 and bool(torch.isfinite(got).all()), name
        assert_close64(got, parameter.grad, 1e-2, what=f"{name} gradient")
    assert params["lora_A"].grad.abs().max() > 65504  # the case float16 cannot hold


def test_float64_layer_ignores_autocast_like_nn_linear() -> None:
    layer = pl.DoRALinear(IN, OUT, rank=4, dtype=torch.float64)
    randomize_adapter(layer)
    x = torch.randn(TOKENS, IN, dtype=torch.float64)
    with torch.no_grad():
        plain = layer(x)
        with torch.autocast("cpu", dtype=AUTOCAST):
            inside = layer(x)
    assert inside.dtype == torch.float64
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)


def _compiled(layer: nn.Module) -> nn.Module:
    # dynamo traces the fused autograd functions (aot_eager: no C++ compiler needed)
    return torch.compile(layer, backend="aot_eager")


def _checkpointed(layer: nn.Module):
    return lambda x: checkpoint(layer, x, use_reentrant=False)


@pytest.mark.parametrize("wrap", [_compiled, _checkpointed], ids=["compile", "checkpoint"])
@pytest.mark.parametrize("cls", [pl.LoRALinear, pl.DoRALinear, pl.QLoRALinear])
def test_compiled_and_checkpointed_layers_train_like_eager(cls: type, wrap) -> None:
    layer = _layer(cls).train()
    x = torch.randn(TOKENS, IN)
    grads = []
    outputs = []
    for run in (wrap(layer), layer):
        for p in layer.adapter_parameters():
            p.grad = None
        xi = x.clone().requires_grad_(True)
        y = run(xi)
        y.square().sum().backward()
        outputs.append(y.detach())
        grads.append([xi.grad] + [p.grad.clone() for p in layer.adapter_parameters()])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-6, atol=1e-6)
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [pl.LoRALinear, pl.DoRALinear, pl.QLoRALinear, pl.QDoRALinear])
def test_full_graph_compile_and_export_match_eager(cls: type) -> None:
    """The cache keys and the fused functions trace without a graph break (``fullgraph=True``) and
    export; both compute what the eager layer computes, gradients included."""
    torch._dynamo.reset()  # other tests' compiles count against the recompile limit
    layer = _layer(cls).train()
    x = torch.randn(TOKENS, IN)
    results = []
    for run in (torch.compile(layer, backend="eager", fullgraph=True), layer):
        for p in layer.adapter_parameters():
            p.grad = None
        xi = x.clone().requires_grad_(True)
        run(xi).square().sum().backward()
        with torch.no_grad():
            results.append([run(x), xi.grad] + [p.grad.clone() for p in layer.adapter_parameters()])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if cls in (pl.LoRALinear, pl.DoRALinear):
        # an exported training graph differentiates what the fused functions traced into it (the
        # quantized layers export for inference only, docs/layers.md)
        exported = torch.export.export(layer, (x.clone().requires_grad_(True),)).module()
        xe = x.clone().requires_grad_(True)
        exported(xe).square().sum().backward()
        torch.testing.assert_close(xe.grad, results[1][1], rtol=1e-5, atol=1e-5)
    layer.eval()
    with torch.no_grad():
        expected = layer(x)
        exported = torch.export.export(layer, (x,))
        torch.testing.assert_close(exported.module()(x), expected, rtol=1e-5, atol=1e-6)
    # inside activation checkpointing too, with no graph break
    torch._dynamo.reset()
    layer.train()
    checkpointed = torch.compile(
        lambda inputs: torch.utils.checkpoint.checkpoint(layer, inputs, use_reentrant=False),
        backend="eager", fullgraph=True,
    )
    torch.testing.assert_close(checkpointed(x), layer(x), rtol=1e-5, atol=1e-6)


_DDP_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
import peft_layers as pl

def model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    return pl.inject_adapters(net, ["0", "2"], method=sys.argv[2], rank=2)

def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 16, generator=g) for _ in range(3)]

def train(net, step_inputs):
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    for x in step_inputs:
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad()

def adapter_state(net):
    state = {k: v for k, v in net.state_dict().items() if "lora" in k or "magnitude" in k}
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}  # FSDP2: DTensors

def worker(rank):
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=rank, world_size=2)
    net = model()
    if sys.argv[3] == "fsdp2":
        # each layer and the root sharded; the default reshard_after_forward frees the gathered
        # weights after forward and gathers them into fresh storage for backward
        from torch.distributed.fsdp import fully_shard
        for index in (0, 2):
            fully_shard(net[index])
        wrapped = fully_shard(net)
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(net)
    train(wrapped, [x[rank * 4:(rank + 1) * 4] for x in batches()])  # each rank gets half the batch
    torch.save(adapter_state(net), f"{sys.argv[1]}.{rank}.pt")
    if sys.argv[3] == "fsdp2":
        # docs/model.md's recipe: the adapter tools refuse shards; gather on every rank, save an
        # unsharded twin on one
        try:
            pl.save_adapter(net, sys.argv[1] + ".refused")
        except ValueError as error:
            assert "sharded (DTensors of FSDP2's fully_shard)" in str(error), error
        else:
            raise AssertionError("save_adapter of a sharded model did not raise")
        # so do the tools that put plain layers in (they would hold shards outside fully_shard),
        # and the merges that need whole tensors (DoRA's norms, requantizing); LoRA's merge runs
        refusing = [(pl.merge_and_unload, "sharded (DTensors of FSDP2's fully_shard"),
                    (pl.unload, "is a unit of FSDP2's fully_shard() of its own")]
        if sys.argv[2] != "lora":
            refusing.append((pl.merge_adapters, "sharded (DTensors of FSDP2's fully_shard"))
        for tool, message in refusing:
            try:
                tool(net)
            except ValueError as error:
                assert message in str(error), error
            else:
                raise AssertionError(f"{tool.__name__} of a sharded model did not raise")
        assert all(isinstance(net[index], pl.LoRALinear) and not net[index].merged for index in (0, 2))
        if sys.argv[2] == "lora":
            x = batches()[0]
            with torch.no_grad():
                before = wrapped(x)
                pl.merge_adapters(net)  # W0 += s B A, shard by shard
                torch.testing.assert_close(wrapped(x), before, rtol=1e-5, atol=1e-6)
                pl.unmerge_adapters(net)
                torch.testing.assert_close(wrapped(x), before, rtol=1e-5, atol=1e-6)
            # sharded from the root only, the bases stay managed by it: unload works
            root_only = model()
            fully_shard(root_only)
            pl.unload(root_only)
            torch.manual_seed(0)
            plain = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
            with torch.no_grad():
                torch.testing.assert_close(root_only(x), plain(x), rtol=1e-5, atol=1e-6)
        state = {k: v.full_tensor() for k, v in pl.adapter_state_dict(net).items()}
        if rank == 0:
            twin = model()
            pl.load_adapter_state_dict(twin, state)
            pl.save_adapter(twin, sys.argv[1] + ".saved")
    elif rank == 0:
        pl.save_adapter(wrapped.module, sys.argv[1] + ".saved")  # DDP: the module inside
    del wrapped  # DDP's reducer holds the process group: release it before the group is destroyed
    dist.barrier()  # both ranks leave together: gloo aborts a rank whose peer tore down first
    dist.destroy_process_group()
    # Skip interpreter finalization: gloo's threads can abort the process there (SIGABRT,
    # "terminate called without an active exception", seen once in CI) after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

if __name__ == "__main__":
    mp.spawn(worker, nprocs=2)
    single = model()
    train(single, batches())  # the mean loss over the whole batch: what DDP's averaging computes
    expected = adapter_state(single)
    for rank in range(2):
        replica = torch.load(f"{sys.argv[1]}.{rank}.pt")
        assert replica.keys() == expected.keys(), (rank, sorted(replica), sorted(expected))
        for key, value in replica.items():
            torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    loaded = pl.load_adapter(base, sys.argv[1] + ".saved")
    x = batches()[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), single(x), rtol=1e-5, atol=1e-6)
    print("ok", len(expected))
"""


@pytest.mark.parametrize(
    ("method", "wrapper"),
    [("lora", "ddp"), ("dora", "ddp"), ("lora", "fsdp2"), ("dora", "fsdp2"), ("qlora", "fsdp2")],
)
def test_two_processes_train_like_one_process_on_the_whole_batch(method: str, wrapper: str, tmp_path) -> None:
    import subprocess
    import sys

    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "rendezvous"), method, wrapper],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[:1] == ["ok"] and int(run.stdout.split()[1]) >= 4


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace:DeprecationWarning")
@pytest.mark.parametrize("cls", DENSE + QUANTIZED)
def test_jit_trace_with_gradients_records_the_plain_ops(cls: type) -> None:
    """``torch.jit.trace`` with gradients on (its default) cannot record the fused functions'
    custom backward (it failed with an internal ``unordered_map::at``): the layers compute with
    plain ops while it records. The traced module's output and gradients are the float64 ones."""
    layer = _layer(cls)
    x = torch.randn(TOKENS, IN)
    traced = torch.jit.trace(layer, (x,))  # check_trace=True: traces twice and compares
    expected, expected_grads = _reference(layer, x)
    x_in = x.clone().requires_grad_(True)
    out = traced(x_in)
    assert_close64(out, expected, 1e-5, what=f"{cls.__name__} traced output")
    out.sum().backward()
    assert_close64(x_in.grad, expected_grads["x"], 1e-5, what=f"{cls.__name__} traced dx")
    for name in layer.adapter_parameter_names:
        assert_close64(getattr(layer, name).grad, expected_grads[name], 1e-5, what=f"{cls.__name__} traced d{name}")


@pytest.mark.parametrize("grad_mode", ["no_grad", "grad", "torch.func.grad"])
@pytest.mark.parametrize("cls", DENSE + QUANTIZED)
def test_torch_func_vmap_over_stacked_adapters_on_one_base(cls: type, grad_mode: str) -> None:
    """``vmap`` over the adapter tensors alone (several adapters on one frozen base, as in
    ensembles or hyper-parameter sweeps): each slice is that adapter's float64 output, and under
    ``torch.func.grad`` its gradients. The base output is then unbatched while the adapter's
    product is batched: LoRA's in-place add into the base output raised there."""
    from torch.func import functional_call, grad, vmap

    layer = _layer(cls).eval()
    x = torch.randn(TOKENS, IN)
    names = layer.adapter_parameter_names
    gen = torch.Generator().manual_seed(7)
    adapters = [
        {name: getattr(layer, name).detach() + 0.1 * k * torch.randn(getattr(layer, name).shape, generator=gen)
         for name in names}
        for k in range(3)
    ]
    stacked = {name: torch.stack([adapter[name] for adapter in adapters]) for name in names}

    def output(params: dict) -> torch.Tensor:
        return functional_call(layer, params, (x,))

    if grad_mode == "torch.func.grad":
        batched = vmap(grad(lambda params: output(params).sum()))(stacked)
    else:
        with torch.set_grad_enabled(grad_mode == "grad"):
            batched = vmap(output)(stacked)
    for k, adapter in enumerate(adapters):
        with torch.no_grad():
            for name in names:
                getattr(layer, name).copy_(adapter[name])
        expected, expected_grads = _reference(layer, x)
        if grad_mode == "torch.func.grad":
            for name in names:
                assert_close64(batched[name][k], expected_grads[name], 1e-5, what=f"{cls.__name__} d{name}[{k}]")
        else:
            assert_close64(batched[k], expected, 1e-5, what=f"{cls.__name__} adapter {k}")


@pytest.mark.parametrize("every_parameter", [False, True], ids=["trainable", "all"])
@pytest.mark.parametrize("cls", [pl.LoRALinear, pl.DoRALinear, pl.QLoRALinear, pl.QDoRALinear])
def test_torch_func_per_sample_gradients_match_autograd(cls: type, every_parameter: bool) -> None:
    """``vmap(grad(...))`` over ``functional_call`` (per-sample gradients, meta-learning): the
    layers take their plain-op paths under torch.func transforms, and agree with autograd; also
    when every parameter is passed, the frozen base too (PyTorch's per-sample-gradient recipe),
    whose wrapped tensors have no storage for a cache key."""
    from torch.func import functional_call, grad, vmap

    layer = _layer(cls).eval()
    x = torch.randn(TOKENS, IN)
    # every floating parameter: torch.func.grad cannot differentiate a quantized base's integer codes
    params = {
        name: p.detach() for name, p in layer.named_parameters()
        if p.requires_grad or (every_parameter and p.is_floating_point())
    }

    def loss(p: dict, row: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, p, (row[None],)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for index in range(TOKENS):
        layer.zero_grad()
        layer(x[index : index + 1]).square().sum().backward()
        for name, p in layer.named_parameters():
            if p.requires_grad:
                # float32, two summation orders (plain ops here, the fused function in autograd)
                torch.testing.assert_close(per_sample[name][index], p.grad, rtol=1e-4, atol=1e-5)


# ---- batched, forward-mode and second-order gradients (float64) -----------------------------
def _layer64(cls: type) -> nn.Module:
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT, dtype=torch.float64)
    kwargs = {"compute_dtype": torch.float64} if cls in QUANTIZED else {}
    layer = cls.from_linear(linear, rank=4, alpha=8.0, **kwargs)
    randomize_adapter(layer, scale=0.3)
    return layer


def _function64(layer: nn.Module):
    """The layer as a float64 function of ``(x, A, B[, m])`` on its (dequantized) base weight."""
    w0, bias = _base_weight(layer), f64(layer.bias)

    def function(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
        if m is None:
            return lora_ref(x, w0, bias, a, b, layer.scaling)
        return dora_ref(x, w0, bias, a, b, m, layer.scaling, layer.epsilon)

    return function


@pytest.mark.parametrize("cls", DENSE + QUANTIZED)
def test_batched_gradients_and_vectorized_jacobians_match_float64(cls: type) -> None:
    """``autograd.grad(..., is_grads_batched=True)`` and ``jacobian(vectorize=True)`` run the
    backward on batched gradients. DoRA's backward reused its saved ``z`` as scratch whenever the
    graph was freed, and an in-place product of a plain tensor with a batched gradient cannot be
    written: DoRA and QDoRA raised a vmap error. Their values are the float64 ones now."""
    layer = _layer64(cls)
    names = layer.adapter_parameter_names
    reference = _function64(layer)
    x = torch.randn(3, IN, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    cotangents = torch.randn(4, *y.shape, dtype=torch.float64)
    got = torch.autograd.grad(y, [x, *(getattr(layer, n) for n in names)], cotangents, is_grads_batched=True)
    inputs = [f64(x, True), *(f64(getattr(layer, n), True) for n in names)]
    y64 = reference(*inputs)
    for index, target in enumerate(inputs):
        expected = torch.stack([torch.autograd.grad(y64, target, v, retain_graph=True)[0] for v in cotangents])
        torch.testing.assert_close(got[index], expected, rtol=1e-10, atol=1e-12)
    params = [f64(getattr(layer, n)) for n in names]
    x = torch.randn(3, IN, dtype=torch.float64)
    torch.testing.assert_close(
        torch.autograd.functional.jacobian(layer, x, vectorize=True),
        torch.autograd.functional.jacobian(lambda v: reference(v, *params), x),
        rtol=1e-10, atol=1e-12,
    )


@pytest.mark.parametrize("cls", DENSE + QUANTIZED)
def test_second_order_and_forward_mode_gradients_through_torch_func_match_float64(cls: type) -> None:
    """The fused step refuses ``create_graph=True`` and its message names ``torch.func``, the
    remedy that works for every layer (a quantized base's codes cannot require grad, the other
    remedy it names). Under ``torch.func``: the gradient of a gradient penalty w.r.t. ``A``
    (reverse over reverse), and the Hessian in the input (``hessian``, forward over reverse: the
    quantized product had no ``jvp`` and raised), against float64."""
    from torch.func import functional_call, grad, hessian

    layer = _layer64(cls)
    names = layer.adapter_parameter_names
    reference = _function64(layer)
    x = torch.randn(3, IN, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"use torch\.func \(grad of grad, jacrev, hessian\)"):
        g_x, = torch.autograd.grad(layer(x.requires_grad_()).square().sum(), x, create_graph=True)
        torch.autograd.grad(g_x.square().sum(), layer.lora_A)
    x = x.detach()
    params = {n: getattr(layer, n).detach() for n in names}

    def penalty(p: dict, function) -> torch.Tensor:  # ||d/dx sum(y^2)||^2
        return grad(lambda v: function(p, v).square().sum())(x).square().sum()

    ours = grad(penalty)(params, lambda p, v: functional_call(layer, p, (v,)))
    expected = grad(penalty)(params, lambda p, v: reference(v, *(p[n] for n in names)))
    for name in names:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        hessian(lambda v: functional_call(layer, params, (v,)).pow(3).sum())(x),
        hessian(lambda v: reference(v, *params.values()).pow(3).sum())(x),
        rtol=1e-10, atol=1e-12,
    )


_DDP_REFUSAL_SCRIPT = r"""
import sys, torch, torch.distributed as dist
import peft_layers as pl

dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
pl.save_adapter(pl.inject_lora(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)), ["0"]), sys.argv[1] + ".adapter")
before = {k: v.clone() for k, v in net.state_dict().items()}
wrapped = torch.nn.parallel.DistributedDataParallel(net)
refused = []
for call in (lambda: pl.inject_adapters(wrapped, ["0"]), lambda: pl.inject_adapters(torch.compile(wrapped), "all-linear"),
             lambda: pl.load_adapter(wrapped, sys.argv[1] + ".adapter")):
    try:
        call()
    except ValueError as error:
        refused.append("wrapped in DistributedDataParallel" in str(error) and "then wrap it in DDP" in str(error))
unchanged = net.state_dict().keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
del wrapped
dist.destroy_process_group()
print("refused", refused, "unchanged", unchanged)
"""


def test_adding_adapters_under_ddp_is_refused(tmp_path) -> None:
    """DDP's reducer covers the parameters present when it was built: adapters injected into a
    wrapped model never had their gradients averaged, so each rank trained its own, silently
    (seen with two ranks). Injecting, also through ``torch.compile``, and loading a file into a
    wrapped model without adapters now refuse, saying to add adapters first; nothing changes."""
    import subprocess
    import sys

    script = tmp_path / "ddp_refusal.py"
    script.write_text(_DDP_REFUSAL_SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "rendezvous")], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split("\n")[-2] == "refused [True, True, True] unchanged True", run.stdout
