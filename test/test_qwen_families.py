"""Qwen2.5-VL and Qwen3-VL: the engine against transformers itself.

Every reference here is transformers' own model run the ordinary way: its image processor makes
the pixel values, its `get_rope_index` the multimodal positions, its forward the logits. Tiny
random checkpoints are built, saved and loaded through `from_pretrained`. Frames are 112 x 112,
the size the adapters resize to here, so no resize happens on either side (torchvision, which the
families' video processors need, does not load on these CPU machines; the image processor lays
out a frame as one temporal pair of itself, as the engine does).
"""

import json

import numpy as np
import pytest
import torch

from livevlm_ros.engine import EngineConfig, LiveVLMEngine
from livevlm_ros.engine.hook.rope import apply_rope, rotate_into
from livevlm_ros.engine.memory.persistence import MemoryFileError
from livevlm_ros.engine.models import ModelLoadError, load_adapter
from livevlm_ros.tools.make_tiny_qwen import build

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
QUESTION = "Where did I last see the red toolbox?"
SIDE = 112
FPS = 2.0


@pytest.fixture(scope="module")
def qwen_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    return {(f, layers): str(build(f, root / f"{f}_{layers}", seed=3, layers=layers))
            for f in FAMILIES for layers in (1, 2)}


def video(n: int, seed: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(n)]


def make_engine(path: str, **options) -> LiveVLMEngine:
    base = dict(model_path=path, sample_fps=FPS, frame_pixels=SIDE * SIDE, short_term_frames=2)
    return LiveVLMEngine(EngineConfig(**{**base, **options}))


def stream(engine: LiveVLMEngine, frames: list[np.ndarray]):
    for i, f in enumerate(frames):
        engine.ingest(f, i / FPS)
    engine.flush()


def reference_inputs(engine: LiveVLMEngine, family: str, frames: list[np.ndarray]) -> dict:
    """What transformers takes for this prompt and video: the image processor's pixel values (one
    temporal pair per frame), the token ids with the video's placeholders, their modality types."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model = engine.model.model
    cfg = model.config
    proc = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2, do_resize=False,
                                    image_mean=json.loads(open(engine.config.model_path + "/preprocessor_config.json")
                                                          .read())["image_mean"],
                                    image_std=json.loads(open(engine.config.model_path + "/preprocessor_config.json")
                                                         .read())["image_std"])
    pixels = proc(images=frames, return_tensors="pt")
    grid = pixels["image_grid_thw"]
    per_frame = int(grid[0].prod()) // 4
    tok = engine.model.tokenizer
    pad = "<|video_pad|>" * per_frame
    if family == "qwen2_5_vl":
        video_text = "<|vision_start|>" + pad * len(frames) + "<|vision_end|>"
    else:
        video_text = "".join("<|vision_start|>" + pad + "<|vision_end|>" for _ in frames)
    text = engine.config.system_prompt + video_text + engine.config.question_template.format(question=QUESTION)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    inputs = dict(input_ids=ids, mm_token_type_ids=(ids == cfg.video_token_id).int() * 2,
                  pixel_values_videos=pixels["pixel_values"],
                  video_grid_thw=torch.tensor([[len(frames), int(grid[0, 1]), int(grid[0, 2])]]))
    if family == "qwen2_5_vl":
        inputs["second_per_grid_ts"] = torch.tensor([1.0 / FPS])       # one frame a temporal patch
    return inputs


def reference_logits(engine, family, frames) -> torch.Tensor:
    with torch.inference_mode():
        return engine.model.model(**reference_inputs(engine, family, frames)).logits[0, -1].float()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy,frames_per_clip", [("full", 2), ("livevlm", 3)])
def test_unbounded_memory_equals_transformers(qwen_models, family, policy, frames_per_clip):
    """Nothing dropped, every page read: the engine's first-token logits equal the model's own
    forward over the whole video (its processor's pixels, its own multimodal positions)."""
    engine = make_engine(qwen_models[family, 2], policy=policy, budget_tokens=None, retrieval_ratio=1.0,
                         frames_per_clip=frames_per_clip)
    frames = video(7)
    stream(engine, frames)
    assert engine.stats()["long_term_tokens"] > 0, "the test must exercise long-term memory"
    answer = engine.ask(QUESTION, max_new_tokens=1, return_logits=True)
    torch.testing.assert_close(answer.first_logits, reference_logits(engine, family, frames), atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_positions_are_what_make_it_equal(qwen_models, family):
    """Guard that the comparison above can fail: the same memory placed by 1-D positions (each
    token one past the other, as for LLaVA-OneVision) gives other logits."""
    from livevlm_ros.engine.hook.positions import SlotPositions

    engine = make_engine(qwen_models[family, 2], policy="full", budget_tokens=None, frames_per_clip=2)
    frames = video(4)
    stream(engine, frames)
    engine.hook.positions = SlotPositions()
    answer = engine.ask(QUESTION, max_new_tokens=1, return_logits=True)
    assert (answer.first_logits - reference_logits(engine, family, frames)).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["livevlm", "sliding_window"])
def test_bounded_memory_on_one_layer_equals_attention_over_what_it_kept(qwen_models, family, policy):
    """A 1-layer model with a bounded memory (VSB drops tokens): a token's key depends only on its
    embedding and position, so the answer must equal transformers' forward over exactly the kept
    tokens, each at the position transformers' get_rope_index gives it in a video of the frames
    memory kept (its frame's rank among them, its own row and column), the question after it.
    VSB keeps a few tokens of most frames; the sliding window drops whole frames, whose absence
    must close up (ranks, not frame numbers)."""
    engine = make_engine(qwen_models[family, 1], policy=policy, budget_tokens=150, vision_sinks=4,
                         page_tokens=4, retrieval_ratio=1.0, frames_per_clip=1)
    frames = video(10)
    stream(engine, frames)
    mem, T = engine.memory, engine.model.tokens_per_frame
    kept = torch.cat([mem.long.view().token_idx[0], mem.short.view().token_idx[0]])
    assert len(kept) < len(frames) * T, "memory must have dropped tokens"
    kept_frames = sorted({int(i) // T for i in kept})
    assert len(kept_frames) > 2
    if policy == "sliding_window":
        assert len(kept_frames) < kept_frames[-1] + 1, "whole frames must have been dropped"
    answer = engine.ask(QUESTION, max_new_tokens=1, return_logits=True)

    model, cfg = engine.model.model, engine.model.model.config
    full = reference_inputs(engine, family, [frames[f] for f in kept_frames])
    pos, _ = model.model.get_rope_index(full["input_ids"], mm_token_type_ids=full["mm_token_type_ids"],
                                        video_grid_thw=full["video_grid_thw"],
                                        second_per_grid_ts=full.get("second_per_grid_ts"))
    with torch.inference_mode():
        out = model.model.get_video_features(full["pixel_values_videos"], full["video_grid_thw"])
        visual = torch.cat(out.pooler_output)
        embeds = model.model.get_input_embeddings()(full["input_ids"])
        is_video = full["input_ids"][0] == cfg.video_token_id
        embeds[0, is_video] = visual
        deepstack = None
        if family == "qwen3_vl":
            deepstack = [torch.cat(d) if isinstance(d, (list, tuple)) else d for d in out.deepstack_features]
    # the rows of the video block: per frame, its tokens in order (Qwen3: with its two markers)
    p = mem.prefix_len
    first_video = int(is_video.nonzero()[0]) - (1 if family == "qwen3_vl" else 0)
    per_frame = T
    keep_rows = list(range(p))
    for k, f in enumerate(kept_frames):
        cells = sorted(int(i) % T for i in kept if int(i) // T == f)
        keep_rows += [first_video + k * per_frame + c for c in cells]
    video_end = first_video + len(kept_frames) * per_frame
    keep_rows += list(range(video_end, full["input_ids"].shape[1]))
    rows = torch.tensor(keep_rows)
    extra = {}
    if deepstack is not None:
        mask = is_video[rows][None]
        vis_rows = torch.cumsum(is_video.long(), 0)[rows][is_video[rows]] - 1
        extra = dict(visual_pos_masks=mask, deepstack_visual_embeds=[d[vis_rows] for d in deepstack])
    with torch.inference_mode():
        hidden = model.model.language_model(inputs_embeds=embeds[:, rows], position_ids=pos[:, :, rows],
                                            **extra).last_hidden_state
        ref = model.lm_head(hidden[0, -1]).float()
    torch.testing.assert_close(answer.first_logits, ref, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_stored_keys_rotate_to_the_models_own_keys_at_3d_positions(qwen_models, family):
    """Keys memory stores (pre-RoPE, after Qwen3's k_norm) rotated to 3-D positions equal the keys
    the model's own attention computes there; rotating back (the inverse angle) gives the stored
    key again; other positions give other keys."""
    engine = make_engine(qwen_models[family, 2], policy="full", budget_tokens=None, frames_per_clip=1)
    stream(engine, video(3))
    a = engine.model
    lm = a.model.model.language_model
    torch.manual_seed(0)
    n = 12
    x = torch.randn(1, n, lm.config.hidden_size)
    pos = torch.stack([torch.arange(n) * 3, torch.arange(n) % 4 + 5, torch.arange(n) // 4 + 5])   # [3, n]
    attn = lm.layers[0].self_attn
    captured = {}
    hook = a.key_projections()[0].register_forward_hook(lambda m, i, o: captured.setdefault("pre", o))
    from transformers import DynamicCache
    cache = DynamicCache(config=lm.config)
    with torch.inference_mode():
        lm(inputs_embeds=x, position_ids=pos[:, None], cache=cache)
    hook.remove()
    post = cache.layers[0].keys[0]                                               # [H, n, D], the model's own
    pre = captured["pre"][0].reshape(n, -1, a.kv.head_dim).transpose(0, 1)       # [H, n, D]
    cos, sin = a.rope(pos)
    out = torch.empty_like(post)
    rotate_into(out, pre.contiguous(), 0, cos, sin)
    torch.testing.assert_close(out, post, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(apply_rope(out, cos, -sin), pre, atol=1e-5, rtol=1e-5)
    cos2, sin2 = a.rope(torch.stack([pos[0], pos[2], pos[1]]))                   # rows and columns swapped
    assert (apply_rope(pre, cos2, sin2) - post).abs().max() > 1e-2
    assert attn is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_time_windows_evidence_narration_and_memory_files(qwen_models, family, tmp_path):
    """The rest of the engine on a Qwen model with a bounded memory: a time window reads only its
    frames, evidence names frames, narration runs, memory saved and loaded answers alike; a file
    of the other family is refused and memory is unchanged."""
    engine = make_engine(qwen_models[family, 2], budget_tokens=200, vision_sinks=4, page_tokens=4,
                         retrieval_ratio=0.5, frames_per_clip=2)
    frames = video(12)
    stream(engine, frames)
    assert engine.memory.total_tokens() <= 200
    whole = engine.ask(QUESTION, max_new_tokens=2, return_logits=True, evidence=3)
    assert 1 <= len(whole.evidence) <= 3
    late = engine.ask(QUESTION, max_new_tokens=1, window=(4.0, None), evidence=12)
    assert late.evidence and all(e.time >= 4.0 for e in late.evidence)
    assert late.context_tokens < whole.context_tokens
    assert engine.describe(max_new_tokens=2).tokens_generated >= 1
    path = tmp_path / "memory.safetensors"
    engine.save_memory(path)
    again = make_engine(qwen_models[family, 2], budget_tokens=200, vision_sinks=4, page_tokens=4,
                        retrieval_ratio=0.5, frames_per_clip=2)
    again.load_memory(path)
    torch.testing.assert_close(again.ask(QUESTION, max_new_tokens=1, return_logits=True).first_logits,
                               engine.ask(QUESTION, max_new_tokens=1, return_logits=True).first_logits)
    other = FAMILIES[1 - FAMILIES.index(family)]
    stranger = make_engine(qwen_models[other, 2], budget_tokens=200, vision_sinks=4, page_tokens=4,
                           retrieval_ratio=0.5, frames_per_clip=2)
    stream(stranger, video(3))
    before = stranger.stats()
    with pytest.raises(MemoryFileError):
        stranger.load_memory(path)
    assert stranger.stats() == before


def test_an_odd_frame_count_and_one_frame_clips_take_the_same_memory(qwen_models):
    """Each frame is its own temporal pair: a clip of 3 frames gives the same memory as 3 clips of
    one (clips are prefilled against memory either way, so only the tower's input may differ)."""
    path = qwen_models["qwen2_5_vl", 2]
    frames = video(3)
    a = make_engine(path, policy="full", budget_tokens=None, frames_per_clip=3)
    b = make_engine(path, policy="full", budget_tokens=None, frames_per_clip=1)
    stream(a, frames)
    stream(b, frames)
    torch.testing.assert_close(a.model.encode_frames(a.model.preprocess(frames)),
                               torch.cat([b.model.encode_frames(b.model.preprocess([f])) for f in frames]),
                               atol=1e-5, rtol=1e-5)
    assert a.memory.frames_ingested == b.memory.frames_ingested == 3


def test_the_family_comes_from_config_json_and_others_are_named(tmp_path, qwen_models):
    adapter = load_adapter(qwen_models["qwen3_vl", 1], "cpu", "float32", frame_pixels=SIDE * SIDE)
    assert adapter.model_type == "qwen3_vl" and adapter.tokens_per_frame == 4 * 4 + 2
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    with pytest.raises(ModelLoadError) as err:
        load_adapter(str(tmp_path), "cpu", "float32")
    for name in ("gemma3", "llava_onevision", "qwen2_5_vl", "qwen3_vl"):
        assert name in str(err.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fixed_shape_steps_answer_as_the_eager_path(qwen_models, family):
    """The question's prefill padded to a fixed shape, with memory's multimodal positions computed
    on the device (what a CUDA graph records and replays after later clips), and the fixed-shape
    decode step: 'static' runs them kernel by kernel; their logits, tokens and evidence equal the
    eager path's, on a memory whose held frames changed clip after clip (a sliding window)."""
    out = {}
    for launch in ("eager", "static"):
        engine = make_engine(qwen_models[family, 2], policy="sliding_window", budget_tokens=200, vision_sinks=4,
                             page_tokens=4, retrieval_ratio=0.5, frames_per_clip=2, launch=launch)
        assert (engine.decode_step is None) == (launch == "eager") == (engine.question_step is None)
        assert engine.ingest_step is None            # the vision towers' window layout is made on the host
        answers = []
        for i, f in enumerate(video(12)):
            engine.ingest(f, i / FPS)
            if i in (5, 11):
                answers.append(engine.ask(QUESTION, max_new_tokens=8, return_logits=True, evidence=3))
        out[launch] = answers
    for eager, static in zip(out["eager"], out["static"]):
        torch.testing.assert_close(static.first_logits, eager.first_logits, atol=2e-5, rtol=1e-4)
        assert static.token_ids == eager.token_ids and len(eager.token_ids) >= 2
        assert [e.time for e in static.evidence] == [e.time for e in eager.evidence]
