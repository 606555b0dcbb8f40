"""Workflows of a Hugging Face PEFT user on tiny randomly initialised transformers models, checked
against a second implementation (Hugging Face PEFT) or against the same run uninterrupted:
dropout in training, GPT-2's Conv1D layers with trained biases, and resuming from an adapter file
plus the optimizer's state. (Layer-level parity is in test_peft_parity.py.)"""

from __future__ import annotations

import copy

import pytest
import torch

import peft_layers as pl

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 64


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(100 + step))


def copy_factors(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Their A (random at init) and magnitude take our values: both start from the same point."""
    inner = theirs.base_model.model
    with torch.no_grad():
        for name, _ in pl.model.iter_adapter_layers(ours):
            layer, other = ours.get_submodule(name), inner.get_submodule(name)
            other.lora_A["default"].weight.copy_(layer.lora_A)
            other.lora_B["default"].weight.copy_(layer.lora_B)
            if hasattr(layer, "magnitude"):
                other.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)


def train(model: torch.nn.Module, steps: range, optimizer: torch.optim.Optimizer) -> list[float]:
    model.train()
    losses = []
    for step in steps:
        ids = batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_dropout_in_training_draws_the_masks_hugging_face_peft_draws(method: str) -> None:
    """With dropout > 0 in training, under the same seed, a Llama trains step for step as Hugging
    Face PEFT's: the mask falls on the update's input only, one draw per layer in the same order,
    and DoRA keeps their form ``(m/n - 1) d W0^T + (m/n) s d A^T B^T`` (layers.md). The parity
    tests elsewhere run without dropout, where any placement of the mask gives the same numbers."""
    base = tiny_llama()
    targets = ["q_proj", "v_proj", "up_proj"]
    torch.manual_seed(1)
    ours = pl.inject_adapters(copy.deepcopy(base), targets, method=method, rank=4, alpha=8.0, dropout=0.3)
    with torch.no_grad():  # a non-zero B: the update, and so the mask, shows from the first step
        for _, layer in pl.model.iter_adapter_layers(ours):
            layer.lora_B.normal_(0, 0.1)
            if method == "dora":
                layer.magnitude.copy_(layer.weight_norm())
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=targets, use_dora=method == "dora")
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    copy_factors(ours, theirs)
    torch.manual_seed(42)
    ours_losses = train(ours, range(5), adamw(ours))
    torch.manual_seed(42)
    theirs_losses = train(theirs, range(5), adamw(theirs))
    torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(theirs_losses), rtol=1e-5, atol=1e-6)
    ours.eval()
    theirs.eval()
    ids = batch(99)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("bias", ["all", "adapter_only"])
def test_gpt2_conv1d_with_trained_biases_trains_and_saves_as_hugging_face_peft(method: str, bias: str, tmp_path) -> None:
    """GPT-2 (transformers Conv1D, fan_in_fan_out) with "all-linear", dropout and trained biases:
    the same trainable parameters as Hugging Face PEFT's ``bias="all"``/``"lora_only"``, the same
    losses step for step, and the saved file gives their PeftModel our trained outputs (the
    biases travel in it)."""
    base = tiny_gpt2()
    torch.manual_seed(1)
    ours = pl.inject_adapters(copy.deepcopy(base), "all-linear", method=method, bias=bias, rank=4, alpha=8.0, dropout=0.1)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", fan_in_fan_out=True,
                             use_dora=method == "dora", bias={"adapter_only": "lora_only"}.get(bias, bias))
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    copy_factors(ours, theirs)
    assert pl.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    torch.manual_seed(42)
    ours_losses = train(ours, range(5), adamw(ours))
    torch.manual_seed(42)
    theirs_losses = train(theirs, range(5), adamw(theirs))
    torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(theirs_losses), rtol=1e-5, atol=1e-6)
    pl.save_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ours.eval()
    ids = batch(99)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("method", "loraplus"), [("lora_plus", True), ("dora", True), ("dora", False)])
def test_resuming_from_the_adapter_file_and_optimizer_state_continues_bit_for_bit(method: str, loraplus: bool, tmp_path) -> None:
    """Train three steps, save the adapter (``save_adapter``) and the optimizer's state and the RNG
    state (``torch.save``), load the adapter into a fresh base (``load_adapter`` injects it), build
    the optimizer anew and load its state: three more steps give bit for bit the losses and
    tensors of six uninterrupted steps. That needs the file to carry everything the layers compute
    with (dropout, DoRA's magnitude) and the reloaded model to list its parameters, and LoRA+'s
    groups, in the order the optimizer's state was saved in (the optimizer's state restores the
    groups' learning rates itself)."""
    base = tiny_llama()

    def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
        if loraplus:  # lr_ratio=None: each LoRAPlusLinear's own ratio (4, from the file once reloaded)
            return pl.create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.01)
        return adamw(model)

    def adapted() -> torch.nn.Module:
        torch.manual_seed(7)
        kwargs = {"lr_ratio": 4.0} if method == "lora_plus" else {}
        return pl.inject_adapters(copy.deepcopy(base), "all-linear", method=method, rank=4, alpha=8.0, dropout=0.1, **kwargs)

    straight = adapted()
    torch.manual_seed(123)
    straight_losses = train(straight, range(6), optimizer(straight))

    first = adapted()
    torch.manual_seed(123)
    first_optimizer = optimizer(first)
    losses = train(first, range(3), first_optimizer)
    pl.save_adapter(first, tmp_path / "adapter")
    torch.save({"optimizer": first_optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp_path / "state.pt")
    del first, first_optimizer

    resumed = pl.load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    state = torch.load(tmp_path / "state.pt")
    resumed_optimizer = optimizer(resumed)
    resumed_optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    losses += train(resumed, range(3, 6), resumed_optimizer)

    assert losses == straight_losses
    for (name, a), (other, b) in zip(pl.adapter_state_dict(straight).items(), pl.adapter_state_dict(resumed).items()):
        assert name == other
        assert torch.equal(a, b), name
