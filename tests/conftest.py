"""Shared test set-up: hypothesis profiles, seeding, and small helpers for building layers."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, register_random, settings

# deterministic by default so CI never flakes on a rare example; HYPOTHESIS_PROFILE=explore
# searches fresh examples (more of them) on a developer machine
settings.register_profile(
    "ci",
    deadline=None,
    max_examples=15,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "explore",
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class _TorchGlobalRandom:
    """torch's global RNG seen as a ``random.Random``-like object, so that hypothesis seeds it
    the same way before every example (a failing example then replays to the same tensors)."""

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def getstate(self) -> torch.Tensor:
        return torch.get_rng_state()

    def setstate(self, state: torch.Tensor) -> None:
        torch.set_rng_state(state)


_TORCH_RANDOM = _TorchGlobalRandom()  # hypothesis keeps only a weak reference
register_random(_TORCH_RANDOM)


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(0)
