"""The demo model's training and the engine see the same sequence layout; the shipped model answers."""

import numpy as np
import torch

from livevlm_ros.engine import EngineConfig, LiveVLMEngine
from livevlm_ros.tools import train_demo_model as training


def test_training_sequences_match_what_the_engine_feeds_the_model(tiny_model_path):
    """If the layout drifted (prompt, pooling, newline, template), the trained model would be
    trained on one thing and asked another: its logits here would differ."""
    engine = LiveVLMEngine(EngineConfig(model_path=tiny_model_path, policy="full", budget_tokens=None,
                                        sample_fps=0))
    size = engine.model.frame_size[0]
    rng = np.random.default_rng(0)                          # model-sized frames: the engine's resize is a copy
    video = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(5)]
    for i, f in enumerate(video):
        engine.ingest(f, float(i))
    question = "Where did I last see the red toolbox?"
    answer = engine.ask(question, max_new_tokens=1, return_logits=True)

    model, tok = engine.model.model, engine.model.tokenizer
    q_ids = tok(engine.config.question_template.format(question=question), add_special_tokens=False)["input_ids"]
    batch = dict(pixels=torch.from_numpy(np.stack(video)), keeps=[np.ones((5, engine.model.tokens_per_frame), bool)],
                 questions=[q_ids], answers=[[tok.convert_tokens_to_ids("<|im_end|>")]])
    prefix = tok(engine.config.system_prompt, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        x, y = training.sequences(model, prefix, batch, torch.float32, augment=False)
        hidden = model.model.language_model(inputs_embeds=x, use_cache=False).last_hidden_state
        logits = model.lm_head(hidden[0, -2]).float()         # the position that predicts the first answer token
    assert x.shape[1] == answer.context_tokens + 1 + len(q_ids) + 1
    torch.testing.assert_close(logits, answer.first_logits, atol=2e-5, rtol=1e-4)
