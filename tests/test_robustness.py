"""The bad-input promises (DESIGN.md, "Bad input") where a robustness audit of the eighteenth
session found them broken: bad input gets a ValueError/TypeError naming the argument or file, the
value and what is allowed; a failed call changes nothing; a file save_adapter() writes loads back.
Each test failed before its fix.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import peft_layers as pl
from peft_layers import compose
from peft_layers.io import CONFIG_NAME, WEIGHTS_NAME
from peft_layers.quant import QuantizedLinear


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(16, 16)
        self.v = nn.Linear(16, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(self.q(x))


def _saved(tmp_path, method: str = "lora"):
    model = _Two()
    pl.inject_adapters(model, ["q", "v"], method=method, rank=4, alpha=8)
    return pl.save_adapter(model, tmp_path / "adapter")


def _rewrite_config(folder, raw: bytes) -> None:
    (folder / CONFIG_NAME).write_bytes(raw)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _types(model: nn.Module) -> list[tuple[str, str]]:
    return [(name, type(module).__name__) for name, module in model.named_modules()]


# ---- adapter_config.json -----------------------------------------------------------------------
def _assert_config_field_refused(tmp_path, field: str, value: object, match: str) -> None:
    """A saved adapter whose config holds ``value`` in ``field``: ``load_adapter`` raises a
    ValueError matching ``match`` and leaves the model's modules and state as they were."""
    folder = _saved(tmp_path)
    config = json.loads((folder / CONFIG_NAME).read_text())
    config[field] = value
    _rewrite_config(folder, json.dumps(config).encode())
    model = _Two()
    before, types = _state(model), _types(model)
    with pytest.raises(ValueError, match=match):
        pl.load_adapter(model, folder)
    assert _types(model) == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bias", [[], ["none"], {}, {"x": 1}])
def test_config_bias_of_unhashable_type_is_a_clear_error(tmp_path, bias):
    """A config ``bias`` that is a JSON list/object must give the ValueError every other bad
    ``bias`` gets ("bias must be one of ..."), naming the file; ``bias not in dict`` raises a bare
    ``TypeError: unhashable type`` instead (io/_format.py, ``_parse``)."""
    _assert_config_field_refused(tmp_path, "bias", bias, r"adapter_config\.json: bias must be one of")


def test_deeply_nested_config_json_is_a_clear_error(tmp_path):
    """A corrupt config nested deeper than Python's JSON decoder recursion limit must give the
    ValueError "not a valid JSON adapter config" naming the file, not a RecursionError
    (``_read_config`` catches only UnicodeDecodeError and JSONDecodeError)."""
    folder = _saved(tmp_path)
    _rewrite_config(folder, b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        pl.load_adapter(_Two(), folder)


def test_config_with_an_over_long_integer_names_the_file(tmp_path):
    """An integer literal longer than Python's int-conversion limit (4300 digits) makes
    ``json.loads`` raise a plain ValueError that names neither the file nor the key; the load must
    name the config file as for any other invalid JSON."""
    folder = _saved(tmp_path)
    config = (folder / CONFIG_NAME).read_bytes()
    _rewrite_config(folder, config.replace(b'"r": 4', b'"r": ' + b"9" * 5000, 1))
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        pl.load_adapter(_Two(), folder)


# ---- save -> load round trip ----------------------------------------------------------------------
def test_float64_adapter_beyond_float32_range_is_refused_at_save(tmp_path):
    """save_adapter() refuses what load_adapter() would refuse ("so the file would not load
    back"), but a float64 model whose adapter holds a finite value above float32's max (1e300)
    saves, and the file is then refused even by a float64 model of the same shape, where it fits
    (``_read_tensors`` refuses float64 beyond float32 range whatever the model's dtype). The save
    refuses it now, naming the key, and writes nothing."""
    model = _Two().double()
    pl.inject_adapters(model, ["q", "v"], rank=4, alpha=8)
    with torch.no_grad():
        model.q.lora_B[0, 0] = 1e300
    with pytest.raises(ValueError, match=r"q\.lora_B.*beyond float32's range.*Nothing was written"):
        pl.save_adapter(model, tmp_path / "f64")
    assert not (tmp_path / "f64").exists()


# ---- merge -----------------------------------------------------------------------------------------
def test_merge_refuses_a_delta_that_overflows_the_base_dtype():
    """merge_adapters() refuses NaN/inf factors because W0 <- W0 + s B A could not be taken back;
    finite factors whose product overflows a float16 base (s B A = 2 * 300 * 300 = 180000 >
    65504) write inf into W0 just the same, and unmerge_adapters() cannot restore it. The merge
    must raise ValueError and leave W0 bit-for-bit as it was."""
    model = nn.Sequential(nn.Linear(8, 8)).half()
    pl.inject_adapters(model, ["0"], rank=2, alpha=2)
    with torch.no_grad():
        model[0].lora_A.fill_(300.0)
        model[0].lora_B.fill_(300.0)
    w0 = model[0].base_layer.weight.detach().clone()
    with pytest.raises(ValueError):
        pl.merge_adapters(model)
    assert torch.equal(model[0].base_layer.weight, w0)
    assert not model[0].merged


def test_merge_and_unload_refuses_a_float8_dtype_by_name():
    """``dtype`` is checked as "a floating torch.dtype", which float8 passes; the merge then fails
    deep inside torch ("Promotion for Float8 Types is not supported", a RuntimeError). It must be
    a ValueError naming ``dtype`` and the value, with the model unchanged."""
    model = _Two()
    pl.inject_adapters(model, ["q", "v"], rank=2)
    types = _types(model)
    with pytest.raises(ValueError, match=r"dtype.*float8_e4m3fn"):
        pl.merge_and_unload(model, dtype=torch.float8_e4m3fn)
    assert _types(model) == types


# ---- compose ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["cat", "svd"])
def test_combine_refuses_weights_that_overflow_the_factors(method):
    """``weights`` must be finite, but a finite weight of 1e308 overflows the float32 factors:
    "cat" silently returns A full of inf (B @ A is not finite) and "svd" fails inside
    torch.linalg (``_LinAlgError``). Either must be a ValueError naming ``weights``."""
    torch.manual_seed(0)
    pair = (torch.randn(4, 16), torch.randn(16, 4))
    with pytest.raises(ValueError, match="weights"):
        A, B = compose.combine([pair, pair], [1e308, 1e308], method=method)
        # a result is only acceptable if it is finite (it cannot be here: 2e308 * BA overflows)
        assert bool(torch.isfinite(B @ A).all())


# ---- layer attributes ------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), -1.0, 0.0])
def test_dora_epsilon_set_after_construction_is_checked(value):
    """The constructor checks ``epsilon`` (a finite number > 0), and alpha/use_rslora/init/lr_ratio
    check on assignment, but ``layer.epsilon = nan`` is accepted and every output turns NaN. The
    assignment must raise ValueError naming ``epsilon`` and keep the old value."""
    torch.manual_seed(0)
    layer = pl.DoRALinear.from_linear(nn.Linear(8, 8), rank=2)
    with pytest.raises(ValueError, match="epsilon"):
        layer.epsilon = value
    assert layer.epsilon == 1e-8
    assert bool(torch.isfinite(layer(torch.randn(3, 8))).all())


# ---- numeric types ---------------------------------------------------------------------------------
def test_quantized_blocksize_takes_a_numpy_int_like_rank_does():
    """``rank=np.int64(4)`` is taken as 4, but ``blocksize=np.int64(64)`` is refused with
    "expected ... one of (32, 64, ...), got np.int64(64)": a message that lists the value as
    allowed. A numpy integer equal to an allowed blocksize must be taken as that blocksize."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 8)
    expected = QuantizedLinear.from_linear(linear, blocksize=64)
    got = QuantizedLinear.from_linear(linear, blocksize=np.int64(64))
    x = torch.randn(2, 64)
    assert torch.equal(got(x), expected(x))


# ---- modules to save -------------------------------------------------------------------------------
def test_complex_buffer_in_file_is_refused_before_anything_is_copied(tmp_path):
    """A module to save's state is checked as "the same keys, shapes and kinds", with kind =
    floating or not; a complex tensor counts as "not floating" like the model's int64
    ``num_batches_tracked``, so the check passes and the copy happens in ``_apply``, after the
    adapter factors were copied. There torch warns "Casting complex values to real discards the
    imaginary part"; with warnings as errors (which load_adapter promises to survive) the load
    fails with a RuntimeError and lora_A/lora_B are already overwritten; without, 3+4j loads as 3.
    It must be a ValueError naming the key, with the model unchanged."""
    from safetensors.torch import load, save

    class WithNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.q = nn.Linear(8, 8)
            self.bn = nn.BatchNorm1d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.q(x))

    def with_adapters(seed: int) -> WithNorm:
        model = WithNorm()
        pl.inject_adapters(model, ["q"], rank=2, modules_to_save=["bn"])
        torch.manual_seed(seed)
        with torch.no_grad():
            model.q.lora_A.normal_()
            model.q.lora_B.normal_()
        return model

    folder = pl.save_adapter(with_adapters(1), tmp_path / "a")
    data = (folder / WEIGHTS_NAME).read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    tensors = load(data)
    key = next(k for k in tensors if k.endswith("num_batches_tracked"))
    tensors[key] = torch.tensor(3 + 4j, dtype=torch.complex64)
    (folder / WEIGHTS_NAME).write_bytes(save(tensors, metadata=header.get("__metadata__")))
    model = with_adapters(2)  # has adapter layers: the file fills them
    before = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="num_batches_tracked"):
            pl.load_adapter(model, folder)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_stack_adapters_refuses_non_finite_factors_from_a_state_dict() -> None:
    """``combine_adapters`` and ``load_adapter`` refuse NaN or inf factors, but ``stack_adapters``
    took them from a state dict, and every row served with that adapter came out NaN. It raises
    a ValueError naming the adapter, the module and the factor now, with the model unchanged."""
    model = _Two()
    state = {"q.lora_A": torch.randn(2, 16), "q.lora_B": torch.randn(16, 2)}
    state["q.lora_B"][3, 1] = float("nan")
    before, types = _state(model), _types(model)
    with pytest.raises(ValueError, match=r"adapters\['bad'\]: module 'q' has NaN or inf in its factor B"):
        pl.stack_adapters(model, {"good": {k: v.nan_to_num() for k, v in state.items()}, "bad": state})
    assert _types(model) == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern", "modules_to_save", "exclude_modules", "layers_pattern"])
@pytest.mark.parametrize("value", [0, False])
def test_config_fields_that_are_falsy_but_of_the_wrong_type_are_refused(tmp_path, field, value):
    """``config.get(field) or {}`` read a 0 or false in these fields as "none" and loaded the
    file as if the field were absent; each is a ValueError naming the file and the field now,
    with the model unchanged (``null``, ``{}``/``[]`` and ``""`` still mean none)."""
    _assert_config_field_refused(tmp_path, field, value, rf"adapter_config\.json: (peft_layers\.)?{field}")


def test_a_path_under_a_file_or_too_long_is_a_clear_error(tmp_path) -> None:
    """``save_adapter`` and ``load_adapter`` at a path under a file raised a bare
    ``FileExistsError``/"does not exist", and at a 5000-character path the OS error itself
    ("File name too long"); they name the argument now: ``NotADirectoryError`` naming the file,
    ``ValueError`` for the long path. Nothing is written and the model is unchanged."""
    model = _Two()
    pl.inject_adapters(model, ["q"], rank=2)
    before = _state(model)
    (tmp_path / "file").write_text("x")
    for call in (pl.save_adapter, pl.load_adapter):
        with pytest.raises(NotADirectoryError, match=r"^directory: '.*file/sub' lies under '.*file', which is a file$"):
            call(model, tmp_path / "file" / "sub")
        with pytest.raises(ValueError, match=r"^directory: '.*'\.\.\. cannot be a path here \(File name too long\)$"):
            call(model, tmp_path / ("a" * 5000))
    assert (tmp_path / "file").read_text() == "x"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_to_linear_and_merge_and_unload_refuse_a_delta_that_overflows_the_dtype() -> None:
    """As ``merge()`` refuses a ``W0 + s B A`` past a float16 base's range, ``to_linear()`` refuses
    it for the dtype it builds (it returned a layer full of inf), and ``merge_and_unload`` changes
    nothing then. A float32 ``to_linear`` of the same layer holds the exact float64 merge."""
    model = nn.Sequential(nn.Linear(8, 8)).half()
    pl.inject_adapters(model, ["0"], rank=2, alpha=2)
    with torch.no_grad():
        model[0].lora_A.fill_(300.0)
        model[0].lora_B.fill_(300.0)
    before, types = _state(model), _types(model)
    with pytest.raises(ValueError, match=r"^to_linear\(\): W0 \+ delta of this LoRALinear holds values .* torch.float16's"):
        model[0].to_linear()
    with pytest.raises(ValueError, match=r"to_linear\(\): W0 \+ delta"):
        pl.merge_and_unload(model)
    assert _types(model) == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    wide = model[0].to_linear(torch.float32)
    expected = model[0].base_layer.weight.double() + 300.0 * 300.0 * 2
    torch.testing.assert_close(wide.weight.double(), expected, rtol=1e-6, atol=0)


def test_inject_lora_names_a_method_argument() -> None:
    """``inject_lora(model, t, method="dora")`` raised Python's own "got multiple values for
    keyword argument 'method'"; it names the argument, the value and the way out now, with the
    model unchanged."""
    model = _Two()
    types = _types(model)
    with pytest.raises(TypeError, match=r"^method: inject_lora\(\) always injects 'lora', got method='dora'; .*inject_adapters"):
        pl.inject_lora(model, ["q"], method="dora")
    assert _types(model) == types
