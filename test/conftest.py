"""Shared fixtures: a tiny random LLaVA-OneVision saved to disk and loaded through from_pretrained."""

import numpy as np
import pytest

from livevlm_ros.tools.make_tiny_model import build


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    return str(build(tmp_path_factory.mktemp("models") / "tiny", seed=0))


@pytest.fixture
def frames():
    """Deterministic random RGB frames (uint8, 48x64)."""
    rng = np.random.default_rng(1234)
    return lambda n: [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(n)]
