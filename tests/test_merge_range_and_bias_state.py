"""Edges of the eighteenth session's merge and state changes, found by a review of them: the
merge's copies of A and B under FSDP2, the merge's range check on a sharded weight (one verdict for
every rank), merge_adapters' refusal changing nothing (a quantized base too), adapter_state_dict's
bias keys equal to the file's, and complex values refused before any copy. Each failed before its
fix."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import warnings

import pytest
import torch
from torch import nn

import peft_layers as pl
from peft_layers.io import read_adapter

_FSDP_SCRIPT = r"""
import datetime, faulthandler, os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
import peft_layers as pl

def model(dtype):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)
    return pl.inject_adapters(net, ["0", "2"], method="lora", rank=2)

def report(word, rank):
    # one write(2) of a short line is atomic on a pipe: print()'s pieces from two ranks interleaved
    os.write(1, f"{word} {rank}\n".encode())

def worker(rank, path, mode, world):
    faulthandler.dump_traceback_later(90, exit=True)  # a rank left waiting in a collective ends
    dist.init_process_group("gloo", init_method="file://" + path, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    from torch.distributed.fsdp import fully_shard
    if mode == "merged-before-sharding":
        net = model(torch.float32)
        with torch.no_grad():
            for i in (0, 2):
                net[i].lora_B.normal_()
        W0 = [net[i].weight.detach().double().clone() for i in (0, 2)]
        pl.merge_adapters(net)
        for i in (0, 2):
            fully_shard(net[i])
        fully_shard(net)
        pl.unmerge_adapters(net)
        for i, w in zip((0, 2), W0):
            torch.testing.assert_close(net[i].weight.full_tensor().double(), w, rtol=0, atol=1e-6)
        report("ok", rank)
    else:  # W0 + s B A past float16's range in the rows of rank 1's shard only
        net = model(torch.float16)
        with torch.no_grad():
            net[0].lora_A.fill_(200.0)
            net[0].lora_B.zero_()
            net[0].lora_B[12:].fill_(200.0)
        for i in (0, 2):
            fully_shard(net[i])
        fully_shard(net)
        try:
            pl.merge_adapters(net)
        except ValueError:
            assert not any(net[i].merged for i in (0, 2))
            report("refused", rank)
        else:
            report("merged", rank)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)

if __name__ == "__main__":
    world = int(sys.argv[3])
    mp.spawn(worker, args=(sys.argv[1], sys.argv[2], world), nprocs=world)
"""


def _run_fsdp(tmp_path, mode: str, world: int) -> list[str]:
    script = tmp_path / "fsdp.py"
    script.write_text(_FSDP_SCRIPT)
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "rendezvous"), mode, str(world)],
        capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return sorted(line for line in run.stdout.splitlines() if line.split()[:1] in (["ok"], ["refused"], ["merged"]))


def test_a_layer_merged_before_fully_shard_unmerges_after_it(tmp_path) -> None:
    """The copies of A and B that a merge keeps are whole tensors; a layer merged before
    ``fully_shard()`` then meets DTensors in ``unmerge()`` ("got mixed torch.Tensor and DTensor"),
    where it worked before the copies existed. Unmerged, each base weight is its ``W0`` again (the
    weight before the merge, to float32 rounding)."""
    assert _run_fsdp(tmp_path, "merged-before-sharding", 1) == ["ok 0"]


def test_a_merge_out_of_range_on_one_shard_is_refused_on_every_rank(tmp_path) -> None:
    """FSDP2: ``W0 + s B A`` overflows float16 only in rank 1's rows of the first layer. Each rank
    checked its own shard, so rank 1 refused while rank 0 merged on into the next layer's
    collectives and hung. The verdict must be the same on every rank: both refuse, nothing merged."""
    assert _run_fsdp(tmp_path, "one-shard-out-of-range", 2) == ["refused 0", "refused 1"]


def test_merge_adapters_refusal_leaves_a_quantized_base_bit_for_bit() -> None:
    """``merge_adapters`` refusing a later layer's out-of-range merge must change nothing. Its
    rollback by ``unmerge()`` requantized an earlier QLoRA layer's NF4 base twice, silently (the
    requantize warning is swallowed on error): 874 of 2048 code bytes and every absmax changed,
    ``W0`` moved by a fifth of its largest value, for a delta 8% of ``W0``'s norm. The base's state
    must equal the one before the call, bit for bit."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64, dtype=torch.float16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.inject_adapters(net, ["0"], method="qlora", rank=4, quant="nf4", compute_dtype=torch.float32)
        pl.inject_adapters(net, ["1"], method="lora", rank=4)
    with torch.no_grad():
        net[0].lora_B.normal_(std=0.01)
        net[1].lora_A.fill_(300.0)
        net[1].lora_B.fill_(300.0)  # s B A = 4 * 300 * 300 * 4 / 4, past float16's 65504
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="beyond torch.float16's finite range"):
            pl.merge_adapters(net)
    assert not net[0].merged and not net[1].merged
    after = net.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []


def test_load_adapter_state_dict_refuses_a_complex_value_before_copying() -> None:
    """A complex tensor for a module to save's integer buffer passed the checks ("not floating"
    like the buffer); its cast then warned after the factors were copied, so the model was half
    loaded (an error under ``-W error``) or silently lost the imaginary part. ``_read_tensors`` was
    fixed for files; the state-dict path must refuse it too, with the model unchanged."""
    def model() -> nn.Module:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
        return pl.inject_adapters(net, ["0"], method="lora", rank=2, modules_to_save=["1"])

    state = {k: v.clone() for k, v in pl.adapter_state_dict(model()).items()}
    state["0.lora_B"].fill_(7.0)
    state["1.trained.num_batches_tracked"] = torch.tensor(3 + 1j)
    target = model()
    expected = {k: v.clone() for k, v in target.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cast's warning: without the fix the load goes through
        with pytest.raises(ValueError, match="num_batches_tracked"):
            pl.load_adapter_state_dict(target, state)
    assert all(torch.equal(v, expected[k]) for k, v in target.state_dict().items())


def test_adapter_state_dict_biases_are_the_saved_files() -> None:
    """``adapter_state_dict`` names "the biases ... as in save_adapter's file", and
    ``AdapterFile.state_dict()`` is documented to give its keys. Under ``bias="all"`` with one
    norm's bias frozen by the user, the file holds every bias (Hugging Face PEFT's "all") but
    ``adapter_state_dict`` only the trained ones, so a strict ``load_adapter_state_dict`` of the
    file's state dict raised "unexpected: ['1.bias']". A module to save's frozen ``original``
    bias, once the user unfreezes the model, is no part of the adapter either. The twin loaded from
    the file's state dict computes what the saved model computes."""
    def model() -> nn.Module:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
        pl.inject_adapters(net, ["0"], method="lora", rank=2, bias="all", modules_to_save=["4"])
        net[1].bias.requires_grad_(False)
        return net

    net = model()
    with torch.no_grad():
        net[0].lora_B.normal_()
        for i in (0, 1, 3):
            net[i].bias.add_(0.5)
    with tempfile.TemporaryDirectory() as directory:
        pl.save_adapter(net, directory)
        saved = read_adapter(directory).state_dict()
    state = pl.adapter_state_dict(net)
    assert sorted(state) == sorted(saved)
    twin = model()
    pl.load_adapter_state_dict(twin, saved)  # strict
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(twin(x), net(x), rtol=0, atol=0)
    net.requires_grad_(True)
    assert "4.original.bias" not in pl.adapter_state_dict(net)
