"""pl.compose: combining LoRA adapters, against float64 formulas and Hugging Face PEFT.

Every method is checked on the update it produces, ``B @ A`` for a layer of scaling 1, against
the weighted sum of the adapters' updates computed densely in float64 (``cat`` exactly, ``svd``
as the truncated SVD of that dense matrix, ``linear`` as its factor formula), and against
Hugging Face PEFT's ``add_weighted_adapter`` on the same adapters.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import peft_layers as pl
from peft_layers.compose import combine, combine_adapters

from models import tiny_model, tokens

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")


def random_pair(rank: int, in_features: int, out_features: int, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rank, in_features, generator=generator),
        torch.randn(out_features, rank, generator=generator),
    )


def dense_update(pairs: list[tuple[Tensor, Tensor]], scalings: list[float], weights: list[float]) -> Tensor:
    """sum_i w_i s_i B_i A_i in float64."""
    return sum(w * s * (b.double() @ a.double()) for (a, b), s, w in zip(pairs, scalings, weights))


def truncated_svd(update: Tensor, rank: int) -> Tensor:
    u, singular, vh = torch.linalg.svd(update, full_matrices=False)
    return (u[:, :rank] * singular[:rank]) @ vh[:rank]


def lora_layer(rank: int, alpha: float, rslora: bool = False, seed: int = 0, dims=(12, 10)) -> pl.LoRALinear:
    torch.manual_seed(seed)
    layer = pl.LoRALinear(*dims, rank=rank, alpha=alpha, use_rslora=rslora)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


weights_strategy = st.floats(-2.0, 2.0, allow_nan=False).filter(lambda w: abs(w) > 1e-3)


@given(
    ranks=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    data=st.data(),
    in_features=st.integers(1, 9),
    out_features=st.integers(1, 9),
)
def test_cat_is_the_exact_weighted_sum_at_the_summed_rank(ranks, data, in_features, out_features) -> None:
    weights = data.draw(st.lists(weights_strategy, min_size=len(ranks), max_size=len(ranks)))
    pairs = [random_pair(r, in_features, out_features, seed) for seed, r in enumerate(ranks)]
    lora_A, lora_B = combine(pairs, weights, method="cat")
    assert lora_A.shape == (sum(ranks), in_features) and lora_B.shape == (out_features, sum(ranks))
    torch.testing.assert_close(
        lora_B.double() @ lora_A.double(), dense_update(pairs, [1.0] * len(pairs), weights), rtol=1e-5, atol=1e-5
    )


@given(
    ranks=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    data=st.data(),
    dims=st.tuples(st.integers(2, 12), st.integers(2, 12)),
)
def test_svd_is_the_truncated_svd_of_the_dense_update(ranks, data, dims) -> None:
    in_features, out_features = dims
    weights = data.draw(st.lists(weights_strategy, min_size=len(ranks), max_size=len(ranks)))
    rank = data.draw(st.integers(1, min(dims)))
    pairs = [random_pair(r, in_features, out_features, 10 + seed) for seed, r in enumerate(ranks)]
    update = dense_update(pairs, [1.0] * len(pairs), weights)
    singular = torch.linalg.svdvals(update)
    lora_A, lora_B = combine(pairs, weights, method="svd", rank=rank)
    assert lora_A.shape == (rank, in_features) and lora_B.shape == (out_features, rank)
    product = lora_B.double() @ lora_A.double()
    scale = singular[0].item()
    # Eckart-Young: the error of the best rank-k approximation is the norm of the dropped values
    error = torch.linalg.matrix_norm(update - product).item()
    assert error == pytest.approx(singular[rank:].norm().item(), abs=1e-5 * scale)
    # the approximation itself is unique when the kept and dropped singular values are apart
    if rank < singular.shape[0] and singular[rank - 1] - singular[rank] > 1e-3 * scale:
        torch.testing.assert_close(product, truncated_svd(update, rank), rtol=0, atol=1e-4 * scale)
    # A's rows are orthonormal (V_k^T) where the update has singular values
    kept = int((singular[:rank] > 1e-6 * scale).sum())
    gram = lora_A[:kept].double() @ lora_A[:kept].double().t()
    torch.testing.assert_close(gram, torch.eye(kept, dtype=torch.float64), rtol=0, atol=1e-5)


def test_svd_at_or_above_the_update_rank_is_exact_and_pads_with_zeros() -> None:
    pairs = [random_pair(2, 30, 40, 1), random_pair(3, 30, 40, 2)]
    update = dense_update(pairs, [1.0, 1.0], [0.5, 1.5])
    lora_A, lora_B = combine(pairs, [0.5, 1.5], method="svd", rank=8)
    torch.testing.assert_close(lora_B.double() @ lora_A.double(), update, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(lora_A[5:]) == 0 and torch.count_nonzero(lora_B[:, 5:]) == 0
    # below the concatenated rank too: one adapter twice has the update rank 2, not 4, and
    # weights that cancel leave nothing at all
    twice = [pairs[0], pairs[0]]
    for weights, update_rank in (([1.0, 1.0], 2), ([1.0, -1.0], 0)):
        lora_A, lora_B = combine(twice, weights, method="svd", rank=4)
        update = dense_update(twice, [1.0, 1.0], weights)
        torch.testing.assert_close(lora_B.double() @ lora_A.double(), update, rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(lora_A[update_rank:]) == 0 and torch.count_nonzero(lora_B[:, update_rank:]) == 0


def test_svd_keeps_small_singular_values_that_are_not_rounding() -> None:
    """Only singular values at rounding level (against the factors' scale) are dropped: an update
    whose spectrum spans 1 to 1e-4 keeps all of it (float32 rounds at about 1e-7 of the scale)."""
    generator = torch.Generator().manual_seed(5)
    u, _ = torch.linalg.qr(torch.randn(30, 3, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(40, 3, generator=generator, dtype=torch.float64))
    singular = torch.tensor([1.0, 1e-3, 1e-4], dtype=torch.float64)
    pair = ((v * singular).t().float(), u.float())  # A (3, 40), B (30, 3): B A = U diag(S) V^T
    lora_A, lora_B = combine([pair], [1.0], method="svd", rank=3)
    kept = torch.linalg.svdvals(lora_B.double() @ lora_A.double())[:3]
    torch.testing.assert_close(kept, singular, rtol=1e-3, atol=1e-7)


def test_svd_of_nearly_cancelling_adapters_is_computed_in_float64() -> None:
    """An adapter minus a later checkpoint of itself (weights 1 and -1) leaves an update 1e-4 the
    size of either: the QR and SVD run in float64, so at the update's full rank the result is its
    float32 rounding (float32 work left an error of 1e-3 of the update in the probe)."""
    generator = torch.Generator().manual_seed(7)
    a1, b1 = torch.randn(4, 40, generator=generator), torch.randn(30, 4, generator=generator)
    a2 = a1 + 1e-4 * torch.randn(4, 40, generator=generator)
    b2 = b1 + 1e-4 * torch.randn(30, 4, generator=generator)
    pairs, weights = [(a1, b1), (a2, b2)], [1.0, -1.0]
    update = dense_update(pairs, [1.0, 1.0], weights)
    lora_A, lora_B = combine(pairs, weights, method="svd", rank=8)
    error = torch.linalg.matrix_norm(lora_B.double() @ lora_A.double() - update)
    assert error.item() < 1e-5 * torch.linalg.matrix_norm(update).item()


def test_svd_default_rank_is_the_largest_adapter_rank() -> None:
    pairs = [random_pair(2, 30, 40, 1), random_pair(6, 30, 40, 2)]
    lora_A, lora_B = combine(pairs, [1.0, 1.0], method="svd")
    assert lora_A.shape == (6, 30) and lora_B.shape == (40, 6)
    # a NumPy integer is a rank too (refused before), and gives what the int gives
    numpy = pytest.importorskip("numpy")
    by_numpy = combine(pairs, [1.0, 1.0], method="svd", rank=numpy.int64(3))
    by_int = combine(pairs, [1.0, 1.0], method="svd", rank=3)
    assert all(torch.equal(a, b) for a, b in zip(by_numpy, by_int)) and by_numpy[0].shape == (3, 30)


@given(rank=st.integers(1, 5), data=st.data())
def test_linear_mixes_the_factors_with_signed_square_roots(rank, data) -> None:
    count = data.draw(st.integers(1, 3))
    weights = data.draw(st.lists(weights_strategy, min_size=count, max_size=count))
    layers = [lora_layer(rank, alpha=data.draw(st.floats(0.5, 32.0)), seed=i) for i in range(count)]
    lora_A, lora_B = combine(layers, weights, method="linear")
    coefficients = [w * layer.scaling for w, layer in zip(weights, layers)]
    expected_A = sum(math.copysign(math.sqrt(abs(c)), c) * layer.lora_A.double() for c, layer in zip(coefficients, layers))
    expected_B = sum(math.sqrt(abs(c)) * layer.lora_B.double() for c, layer in zip(coefficients, layers))
    torch.testing.assert_close(lora_A.double(), expected_A, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lora_B.double(), expected_B, rtol=1e-6, atol=1e-6)
    if count == 1:  # one adapter: the factor mix is the weighted update itself
        torch.testing.assert_close(
            lora_B.double() @ lora_A.double(), weights[0] * layers[0].delta_weight().double(), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_layers_fold_their_scaling_in(method: str) -> None:
    layers = [lora_layer(3, alpha=8.0, seed=1), lora_layer(2, alpha=5.0, rslora=True, seed=2)]
    weights = [0.6, -1.3]
    lora_A, lora_B = combine(layers, weights, method=method, rank=5 if method == "svd" else None)
    expected = sum(w * layer.delta_weight().double() for w, layer in zip(weights, layers))
    torch.testing.assert_close(lora_B.double() @ lora_A.double(), expected, rtol=1e-5, atol=1e-5)
    assert not lora_A.requires_grad and not lora_B.requires_grad


def test_the_result_is_new_memory_in_the_promoted_dtype() -> None:
    a16, b16 = (t.to(torch.bfloat16) for t in random_pair(2, 6, 5, 3))
    a32, b32 = random_pair(2, 6, 5, 4)
    for method in ("cat", "svd", "linear"):
        lora_A, lora_B = combine([(a16, b16), (a32, b32)], [1.0, 1.0], method=method)
        assert lora_A.dtype == lora_B.dtype == torch.float32
    lora_A, lora_B = combine([(a32, b32)], [1.0], method="cat")
    assert lora_A.data_ptr() != a32.data_ptr() and lora_B.data_ptr() != b32.data_ptr()
    lora_B.add_(1.0)
    assert not torch.equal(lora_B, b32)


def test_combine_adapters_svd_default_rank_is_the_largest_of_any_module(tmp_path: Path) -> None:
    """Hugging Face PEFT's rule: one rank for the whole result, the largest rank of any adapter at
    any module. A module both adapters update at rank 2 then keeps its rank-4 sum exactly (the
    per-module largest, 2, truncated it: 3.4 off against a norm of 8.7 in the probe)."""
    sources = []
    for i, (rank, pattern) in enumerate([(4, {"v_proj": 2}), (2, None)]):
        model = pl.inject_lora(tiny_model(), ["q_proj", "v_proj"], rank=rank, alpha=float(rank), rank_pattern=pattern)
        for _, layer in pl.model.iter_adapter_layers(model):
            with torch.no_grad():
                layer.lora_B.normal_(generator=torch.Generator().manual_seed(10 + i))
        sources.append(model)
    states = [pl.adapter_state_dict(s) for s in sources]
    combined = combine_adapters(states, [1.0, 1.0], method="svd")
    assert {t.shape[0] for k, t in combined.items() if k.endswith("lora_A")} == {4}
    path = "layers.0.attn.v_proj"
    # state dicts are taken at scaling 1: the update of each is B A
    expected = sum(s.get_submodule(path).lora_B.double() @ s.get_submodule(path).lora_A.double() for s in sources)
    product = combined[f"{path}.lora_B"].double() @ combined[f"{path}.lora_A"].double()
    torch.testing.assert_close(product, expected, rtol=1e-5, atol=1e-5)


def test_combine_adapters_svd_default_rank_is_capped_at_each_modules_size() -> None:
    """The largest rank of any module (4) exceeds a small module's min(out, in) = 2: that module
    is combined at rank 2, which holds its whole update, instead of being refused."""
    sources = []
    for seed in (1, 2):
        big_A, big_B = random_pair(4, 8, 8, seed)
        small_A, small_B = random_pair(2, 6, 2, 10 + seed)
        sources.append({"big.lora_A": big_A, "big.lora_B": big_B, "small.lora_A": small_A, "small.lora_B": small_B})
    weights = [0.5, -1.5]
    combined = combine_adapters(sources, weights, method="svd")
    assert combined["big.lora_A"].shape == (4, 8) and combined["small.lora_A"].shape == (2, 6)
    pairs = [(sd["small.lora_A"], sd["small.lora_B"]) for sd in sources]
    torch.testing.assert_close(
        combined["small.lora_B"].double() @ combined["small.lora_A"].double(),
        dense_update(pairs, [1.0, 1.0], weights), rtol=1e-5, atol=1e-5,
    )


def test_combine_adapters_from_directories_and_state_dicts_drives_a_model(tmp_path: Path) -> None:
    """Two adapters with different alphas and modules, combined and loaded into layers of scaling
    1: the model computes the base plus the weighted sum of the two updates (float64 reference)."""
    x = tokens()
    sources = []
    for i, (targets, rank, alpha) in enumerate([(["q_proj", "v_proj"], 4, 8.0), (["v_proj", "up_proj"], 2, 3.0)]):
        model = pl.inject_lora(tiny_model(), targets, rank=rank, alpha=alpha)
        for _, layer in pl.model.iter_adapter_layers(model):
            with torch.no_grad():
                layer.lora_B.normal_(generator=torch.Generator().manual_seed(i))
        pl.save_adapter(model, tmp_path / f"adapter{i}")
        sources.append(model)
    weights = [0.7, -0.4]

    def expected_delta(path: str) -> Tensor:
        total = torch.zeros(())
        for source, w in zip(sources, weights):
            layer = source.get_submodule(path)
            if isinstance(layer, pl.LoRALinear):
                total = total + w * layer.delta_weight().double()
        return total

    for method in ("cat", "svd"):
        combined = combine_adapters([tmp_path / "adapter0", tmp_path / "adapter1"], weights, method=method, rank=6 if method == "svd" else None)
        paths = sorted({key.rpartition(".")[0] for key in combined})
        assert paths == sorted(
            f"layers.{b}.{m}" for b in range(2) for m in ("attn.q_proj", "attn.v_proj", "mlp.up_proj")
        )
        for path in paths:
            product = combined[f"{path}.lora_B"].double() @ combined[f"{path}.lora_A"].double()
            torch.testing.assert_close(product, expected_delta(path), rtol=1e-5, atol=1e-5)

        # drive a model with it: layers of the combined ranks and scaling 1
        ranks = {path: combined[f"{path}.lora_A"].shape[0] for path in paths}
        target = pl.inject_lora(
            tiny_model(),
            paths,
            rank_pattern={path: r for path, r in ranks.items()},
            alpha_pattern={path: float(r) for path, r in ranks.items()},
        )
        pl.load_adapter_state_dict(target, combined)
        reference = tiny_model().double()
        with torch.no_grad():
            for path in paths:
                reference.get_submodule(path).weight += expected_delta(path)
        torch.testing.assert_close(target(x).double(), reference(x), rtol=1e-4, atol=1e-4)

    # state dicts are taken at scaling 1: adapter_state_dict of a layer with alpha == rank
    plain = [pl.adapter_state_dict(s) for s in sources]
    combined = combine_adapters(plain, weights, method="cat")
    for path in ("layers.0.attn.v_proj",):
        unscaled = sum(
            w * (sd[f"{path}.lora_B"].double() @ sd[f"{path}.lora_A"].double()) for sd, w in zip(plain, weights)
        )
        torch.testing.assert_close(
            combined[f"{path}.lora_B"].double() @ combined[f"{path}.lora_A"].double(), unscaled, rtol=1e-5, atol=1e-5
        )


@needs_peft
@pytest.mark.parametrize("method", ["cat", "svd", "linear"])
def test_same_adapter_as_hugging_face_peft_add_weighted_adapter(method: str, tmp_path: Path) -> None:
    import peft

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.q = nn.Linear(16, 12)
            self.v = nn.Linear(12, 16)

        def forward(self, x: Tensor) -> Tensor:
            return self.v(torch.tanh(self.q(x)))

    rank_b = 4 if method == "linear" else 3
    model = peft.get_peft_model(
        Net(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=False),
        adapter_name="first",
    )
    model.add_adapter("second", peft.LoraConfig(r=rank_b, lora_alpha=5, target_modules=["q", "v"], use_rslora=True, init_lora_weights=False))
    model.save_pretrained(tmp_path)  # each adapter in a subfolder of its name
    weights = [0.8, -0.5]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(
            ["first", "second"], weights, "combo", combination_type=method, svd_rank=5 if method == "svd" else None
        )
    ours = combine_adapters([tmp_path / "first", tmp_path / "second"], weights, method=method, rank=5 if method == "svd" else None)
    for name in ("q", "v"):
        layer = model.base_model.model.get_submodule(name)
        theirs_A, theirs_B = layer.lora_A["combo"].weight, layer.lora_B["combo"].weight
        assert layer.scaling["combo"] == 1.0
        our_A, our_B = ours[f"{name}.lora_A"], ours[f"{name}.lora_B"]
        assert our_A.shape == theirs_A.shape and our_B.shape == theirs_B.shape
        if method == "svd":  # singular vectors are unique up to sign: compare the update
            torch.testing.assert_close(our_B @ our_A, theirs_B @ theirs_A, rtol=1e-4, atol=1e-5)
        else:
            torch.testing.assert_close(our_A, theirs_A, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(our_B, theirs_B, rtol=1e-5, atol=1e-6)


def test_dora_is_refused() -> None:
    torch.manual_seed(0)
    dora = pl.DoRALinear(6, 5, rank=2)
    with pytest.raises(TypeError, match=r"adapters\[1\].*DoRALinear.*magnitude"):
        combine([lora_layer(2, 4.0, dims=(6, 5)), dora], [1.0, 1.0])
    state = {"x.lora_A": torch.zeros(2, 6), "x.lora_B": torch.zeros(5, 2), "x.magnitude": torch.ones(5)}
    with pytest.raises(ValueError, match=r"state_dicts_or_dirs\[0\].*magnitude; only LoRA adapters can be combined"):
        combine_adapters([state], [1.0])


def test_a_dora_directory_is_refused(tmp_path: Path) -> None:
    pl.save_adapter(pl.inject_adapters(tiny_model(), ["q_proj"], method="dora", rank=2), tmp_path)
    with pytest.raises(ValueError, match=r"state_dicts_or_dirs\[0\].*DoRA adapter; only LoRA adapters can be combined or stacked"):
        combine_adapters([tmp_path], [1.0])


pair = random_pair(2, 6, 5, 0)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: combine([pair], [1.0], method="ties"), ValueError, r"method: expected one of \('cat', 'svd', 'linear'\), got 'ties'"),
        (lambda: combine([], []), ValueError, "adapters: expected at least one"),
        (lambda: combine(pair, [1.0, 1.0]), TypeError, r"adapters\[0\]: expected a pair \(A, B\).*got Tensor"),
        (lambda: combine("ab", [1.0]), TypeError, "adapters: expected a sequence"),
        (lambda: combine([pair], [1.0, 2.0]), ValueError, r"weights: expected 1 values.*got 2"),
        (lambda: combine([pair], 1.0), TypeError, "weights: expected a sequence of 1 real numbers, got float"),
        (lambda: combine([pair], [True]), TypeError, r"weights\[0\]: expected a real number, got True"),
        (lambda: combine([pair], [float("nan")]), ValueError, r"weights\[0\]: expected a finite number, got nan"),
        (lambda: combine([pair], [1.0], rank=2), ValueError, r"rank: applies to method='svd' only, got rank=2 with method='cat'"),
        (lambda: combine([pair], [1.0], method="svd", rank=0), ValueError, "rank: expected a positive int or None, got 0"),
        (lambda: combine([pair], [1.0], method="svd", rank=2.0), ValueError, "rank: expected a positive int or None, got 2.0"),
        (lambda: combine([pair], [1.0], method="svd", rank=6), ValueError, r"rank: 6 exceeds min\(out, in\) = 5"),
        (lambda: combine([(pair[0], pair[1][:, :1])], [1.0]), ValueError, r"adapters\[0\]: expected A \(rank, in\) and B \(out, rank\)"),
        (lambda: combine([(pair[0].long(), pair[1])], [1.0]), ValueError, r"adapters\[0\]: A and B must be floating"),
        (lambda: combine([pair, random_pair(2, 7, 5, 1)], [1.0, 1.0]), ValueError, r"adapters\[1\] updates a weight of shape \(out, in\) = \(5, 7\)"),
        (lambda: combine([pair, random_pair(3, 6, 5, 1)], [1.0, 1.0], method="linear"), ValueError, r"'linear' needs adapters of one rank.*'adapters\[1\]': 3"),
        (lambda: combine_adapters({"x.lora_A": pair[0]}, [1.0]), TypeError, "state_dicts_or_dirs: expected a sequence"),
        (lambda: combine_adapters([{"x.lora_A": pair[0]}], [1.0]), ValueError, r"state_dicts_or_dirs\[0\]: module 'x' has no lora_B"),
        (lambda: combine_adapters([{"x.weight": pair[0]}], [1.0]), ValueError, r"unexpected key 'x.weight'"),
        (lambda: combine_adapters([{"x.lora_A": 1.0, "x.lora_B": pair[1]}], [1.0]), TypeError, r"\['x.lora_A'\]: expected a Tensor, got float"),
        (lambda: combine_adapters([7], [1.0]), TypeError, r"state_dicts_or_dirs\[0\]: expected a state dict or an adapter directory, got int"),
        (lambda: combine_adapters([], []), ValueError, "state_dicts_or_dirs: expected at least one"),
        (
            lambda: combine_adapters(
                [{"x.lora_A": pair[0], "x.lora_B": pair[1]}, {"x.lora_A": torch.zeros(2, 9), "x.lora_B": pair[1]}], [1.0, 1.0]
            ),
            ValueError,
            r"module 'x': state_dicts_or_dirs\[1\] updates a weight of shape",
        ),
        (lambda: combine_adapters(["/nonexistent/adapter"], [1.0]), FileNotFoundError, "adapter"),
    ],
)
def test_bad_input_is_named(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("method", ["cat", "svd", "linear"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_factors_are_refused_naming_adapter_and_factor(method: str, value: float) -> None:
    """Before, "cat" and "linear" returned NaN and "svd" raised torch's LinAlgError."""
    bad_A = pair[0].clone()
    bad_A[0, 0] = value
    with pytest.raises(ValueError, match=r"^adapters: adapters\[1\] has NaN or inf in its factor A; expected finite values$"):
        combine([pair, (bad_A, pair[1])], [1.0, 1.0], method=method)
    layer = lora_layer(2, 4.0, dims=(6, 5))
    with torch.no_grad():
        layer.lora_B[1, 1] = value
    with pytest.raises(ValueError, match=r"adapters\[0\] has NaN or inf in its factor B"):
        combine([layer, pair], [1.0, 1.0], method=method)
    good = {"x.lora_A": pair[0], "x.lora_B": pair[1]}
    bad = {"x.lora_A": pair[0], "x.lora_B": layer.lora_B.detach()}
    with pytest.raises(ValueError, match=r"^module 'x': state_dicts_or_dirs\[1\] has NaN or inf in its factor B"):
        combine_adapters([good, bad], [1.0, 1.0], method=method)


def test_a_pair_of_non_tensors_names_the_element_types() -> None:
    arrays = (pair[0].numpy(), pair[1].numpy())
    with pytest.raises(TypeError, match=r"adapters\[0\]: expected a pair \(A, B\) of tensors or a LoRA layer, got a tuple of \(ndarray, ndarray\)$"):
        combine([arrays], [1.0])
    with pytest.raises(TypeError, match=r"adapters\[1\]: .*got a list of \(Tensor, list\)$"):
        combine([pair, [pair[0], pair[1].tolist()]], [1.0, 1.0])


def test_an_adapter_with_no_modules_is_refused() -> None:
    """Before, ``combine_adapters([{}], [1.0])`` returned an empty state dict."""
    with pytest.raises(ValueError, match=r"^state_dicts_or_dirs\[0\]: holds no adapter modules; .*got an empty state dict"):
        combine_adapters([{}], [1.0])
    with pytest.raises(ValueError, match=r"^state_dicts_or_dirs\[1\]: holds no adapter modules"):
        combine_adapters([{"x.lora_A": pair[0], "x.lora_B": pair[1]}, {}], [1.0, 1.0])


# ---- from a mutation audit of compose.py ------------------------------------------------------
def test_combine_adapters_names_the_adapter_that_holds_a_bad_module() -> None:
    """A module only the second adapter updates: an error there names ``state_dicts_or_dirs[1]``,
    not the first one."""
    generator = torch.Generator().manual_seed(0)
    good = {"x.lora_A": torch.randn(2, 5, generator=generator), "x.lora_B": torch.randn(4, 2, generator=generator)}
    bad_B = torch.randn(4, 2, generator=generator)
    bad_B[0, 0] = float("nan")
    bad = {**good, "y.lora_A": torch.randn(2, 5, generator=generator), "y.lora_B": bad_B}
    with pytest.raises(ValueError, match=r"^module 'y': state_dicts_or_dirs\[1\] has NaN or inf in its factor B"):
        combine_adapters([good, bad], [1.0, 1.0])


def test_combine_adapters_svd_default_rank_is_the_largest_even_when_a_later_adapter_has_it() -> None:
    """The default "svd" rank is the largest rank of *any* adapter at any module: with the
    larger-rank adapter second, the rank-2 + rank-3 sum keeps rank 3 (and is exact for the
    rank-3 update of a single module)."""
    generator = torch.Generator().manual_seed(0)
    small = {"x.lora_A": torch.randn(2, 7, generator=generator), "x.lora_B": torch.randn(6, 2, generator=generator)}
    large = {"y.lora_A": torch.randn(3, 7, generator=generator), "y.lora_B": torch.randn(6, 3, generator=generator)}
    combined = combine_adapters([small, large], [1.0, -0.5], method="svd")
    assert combined["x.lora_A"].shape == (3, 7) and combined["y.lora_A"].shape == (3, 7)
    expected = -0.5 * large["y.lora_B"].double() @ large["y.lora_A"].double()
    torch.testing.assert_close(combined["y.lora_B"].double() @ combined["y.lora_A"].double(), expected, rtol=1e-5, atol=1e-5)
