"""Shared fixtures: one tiny random POTSA model per test session, and synthetic speech-like audio."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from potsa_training.tiny import build_tiny_potsa

pytest_plugins = ["tests.tiny_runs"]  # `corpus` and `model_yaml`: the tiny training runs' data and base checkpoints

SAMPLING_RATE = 16_000
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network; fail fast instead of retrying
torch.set_num_threads(1)  # tiny models gain nothing from a second thread, and lose a lot when it is busy


def synthetic_audio(seconds: float, seed: int = 0, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """A voiced-speech-like signal: harmonics of a wobbling pitch under a syllable-rate envelope, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sampling_rate)) / sampling_rate
    pitch = 120 + 30 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sampling_rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(3, 5) * t))
    return (0.3 * envelope * voice + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="session")
def tiny():
    """(model, processor): a random tiny model in eval mode; tests must not modify it in place."""
    torch.manual_seed(0)
    return build_tiny_potsa(seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny):
    return tiny[0]


@pytest.fixture(scope="session")
def tiny_processor(tiny):
    return tiny[1]
