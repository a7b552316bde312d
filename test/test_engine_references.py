"""The engine against references that share none of its code (CPU, float32).

Each reference is computed by transformers run the ordinary way (a separate model instance, its own
attention), or worked out by hand, never through the engine's attention, hook or memory code:
  - VSB scores = the attention transformers' eager forward returns for the same tokens;
  - the two-phase bucket fill keeps exactly the tokens worked out by hand;
  - page scoring groups query heads by kv head the way the model does;
  - bounded memory (VSB + PaR) equals one offline forward over what it kept (1-layer model);
  - an answer in a time window equals one offline forward over the window's frames (1-layer model);
  - an answer's evidence is the attention transformers' eager forward returns for the question;
  - a checkpoint with the real 196-token frame layout equals LlavaOnevisionForConditionalGeneration
    fed by LlavaOnevisionProcessor.
"""

import numpy as np
import pytest
import torch

from livevlm_ros.engine import EngineConfig, LiveVLMEngine
from livevlm_ros.engine.memory.compression import VisionSinkBucketing
from livevlm_ros.engine.memory.kv_buffer import Tokens
from livevlm_ros.engine.memory.pages import PageSummary, page_scores
from livevlm_ros.tools.make_tiny_model import build, build_tokenizer, new_model

QUESTION = "Is the door on the left open?"


def load_reference(path):
    """A second, independent instance of the checkpoint, on transformers' eager attention."""
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()


def video_ids(engine, n_frames, question=None):
    """Token ids transformers expects for [system prompt, video of n_frames + newline, (question)]."""
    a = engine.model
    n_video = n_frames * a.tokens_per_frame + 1          # transformers puts one newline after a video
    ids = a.tokenize(engine.config.system_prompt) + [a.model.config.video_token_index] * n_video
    if question is not None:
        ids += a.tokenize(engine.config.question_template.format(question=question))
    return torch.tensor([ids])


# ---- VSB scores -------------------------------------------------------------------------------
# kv_dtype int8 (memory/kv_quant.py): long-term keys and values are read back with the error of an
# int8 step (1/254 of a row's largest magnitude), so the 8-bit versions hold at a tolerance: about
# 5x the largest error measured here (2026-12-03, CPU: scores 9e-7, first logits 1.6e-4 of 0.46)
KV_TOLERANCE = {"bf16": dict(atol=1e-6, rtol=1e-4), "int8": dict(atol=5e-6, rtol=1e-3)}


@pytest.mark.parametrize("kv_dtype", ["bf16", "int8"])
def test_vsb_scores_equal_the_attention_transformers_returns(tiny_model_path, frames, kv_dtype):
    """After a few one-frame clips with nothing dropped, every visual token's score is the attention
    the newest frame's tokens (the observation window: one frame) pay it, mean over heads and rows;
    with int8 long-term memory, within an int8 step's effect."""
    engine = LiveVLMEngine(EngineConfig(model_path=tiny_model_path, policy="livevlm", budget_tokens=None,
                                        sample_fps=0, frames_per_clip=1, short_term_frames=2, kv_dtype=kv_dtype))
    video = frames(4)
    for i, f in enumerate(video):
        engine.ingest(f, float(i))
    T = engine.model.tokens_per_frame
    assert engine.stats()["long_term_tokens"] == 2 * T, "the test must cover long-term memory too"

    ref_model = load_reference(tiny_model_path)
    pixels = engine.model.preprocess(video)[None]          # pixels only; attention is what is checked
    with torch.inference_mode():
        out = ref_model(input_ids=video_ids(engine, 4), pixel_values_videos=pixels, output_attentions=True)
    p = engine.memory.prefix_len
    for layer, attn in enumerate(out.attentions):               # [1, heads, tokens, tokens]
        # what frame 4's tokens (the last before the newline) pay each visual token
        expected = attn[0, :, -T - 1:-1, :].mean(dim=(0, 1))[p:-1]
        m = engine.memory
        got = torch.cat([m.long.view().score[layer], m.short.view().score[layer]])
        idx = torch.cat([m.long.view().token_idx[layer], m.short.view().token_idx[layer]])
        torch.testing.assert_close(got, expected[idx].float(), **KV_TOLERANCE[kv_dtype])


# ---- the two-phase bucket fill, by hand -------------------------------------------------------
def candidates(score, attention_total=None, token_idx=None):
    score = torch.tensor([score], dtype=torch.float32)
    n = score.shape[1]
    total = score if attention_total is None else torch.tensor([attention_total], dtype=torch.float32)
    idx = torch.arange(n)[None] if token_idx is None else torch.tensor([token_idx])
    return Tokens(torch.zeros(1, 1, n, 2), torch.zeros(1, 1, n, 2), idx, score, total,
                  torch.zeros(1, n, dtype=torch.bool))


def kept(policy, cand, capacity, stream_tokens):
    keep, n_sink = policy.select(cand, capacity, 0, stream_tokens)
    return keep[0].tolist(), cand.token_idx[0][cand.sink[0]].tolist(), n_sink


def test_bucket_fill_with_one_token_per_bucket():
    # 12 candidates, tokens 0..11 of a 12-token stream; capacity 8 with 2 sinks -> 6 left:
    #   sinks   = the 2 highest accumulated attention: tokens 3 (9.0) and 10 (8.0)
    #   salient = int(0.5 * 6) = 3 highest current scores among the rest: 0 (.95), 1 (.9), 2 (.85)
    #   buckets = 6 of 2 tokens each: [0,1] [2,3] [4,5] [6,7] [8,9] [10,11]
    #   [0,1] and [2,3] already hold salient tokens -> full; the other buckets take their best:
    #   [4,5] -> 5 (.3), [6,7] -> 6 (.2), [8,9] -> 9 (.25), [10,11] -> 11 (.05) = 4 tokens, 3 places:
    #   the top 3 by score of those: 5, 9, 6
    score = [.95, .9, .85, .1, .01, .3, .2, .02, .03, .25, .5, .05]
    total = [1, 1, 1, 9, 0, 0, 0, 0, 0, 0, 8, 0]
    cand = candidates(score, total)
    keep, sinks, n_sink = kept(VisionSinkBucketing(sinks=2, bucket_tokens=1, saliency_share=0.5), cand, 8, 12)
    assert n_sink == 2 and sorted(sinks) == [3, 10]
    assert keep == [0, 1, 2, 3, 5, 6, 9, 10]


def test_bucket_fill_with_two_tokens_per_bucket_and_leftovers():
    # 14 candidates, capacity 9, 1 sink -> 8 left; saliency 0.25 -> int(2) salient; B = 2 -> 4 buckets
    # of 4 stream tokens: [0-3] [4-7] [8-11] [12-15].
    #   sink     = token 15 (accumulated 5.0)
    #   salient  = 12 (.99), 13 (.98)                      -> bucket 3 holds 2 = full
    #   coverage = 2 best of each other bucket: [0-3] -> 0 (.5), 1 (.4); [4-7] -> 4 (.3), 5 (.2);
    #              [8-11] -> only two candidates in the stream range, 8 (.1), 9 (.05) -> 6 tokens
    #   total so far 1 + 2 + 6 = 9 = capacity: nothing left over for 14 (.9), the best of the rest
    score = [.5, .4, .01, .02, .3, .2, .03, .04, .1, .05, .9]
    idx = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14]          # 10-11 were dropped earlier
    score += [.99, .98, .001]
    idx += [12, 13, 15]
    order = np.argsort(idx)
    score, idx = [score[i] for i in order], [idx[i] for i in order]
    total = [5.0 if i == 15 else 0.0 for i in idx]
    cand = candidates(score, total, idx)
    keep, sinks, n_sink = kept(VisionSinkBucketing(sinks=1, bucket_tokens=2, saliency_share=0.25), cand, 9, 16)
    assert sinks == [15]
    assert [idx[i] for i in keep] == [0, 1, 4, 5, 8, 9, 12, 13, 15]
    # a bigger capacity leaves room after the coverage phase, which goes by score: capacity 11 ->
    # 10 free, 2 salient (12, 13), 5 buckets: token t sits in bucket t * 5 // 16, so
    # b0 {0,1,2,3} b1 {4,5,6} b2 {7,8,9} b3 {12} b4 {13,14,15}; salient 12 and 13 fill half of b3 and
    # b4, and sinks are not charged to buckets. Coverage: b0 -> 0, 1; b1 -> 4, 5; b2 -> 8, 9;
    # b4 -> 14. 1 + 2 + 7 = 10 places used, one left: the best remaining score is 7 (.04)
    cand = candidates(score, total, idx)
    keep, _, _ = kept(VisionSinkBucketing(sinks=1, bucket_tokens=2, saliency_share=0.25), cand, 11, 16)
    assert [idx[i] for i in keep] == [0, 1, 4, 5, 7, 8, 9, 12, 13, 14, 15]


# ---- page scoring ----------------------------------------------------------------------------
def test_page_scoring_groups_query_heads_like_the_model():
    """4 query heads share 2 kv heads as the model groups them: q heads 0,1 read kv head 0 and
    2,3 read kv head 1 (adjacent). Page 3 matches each kv head's own query group; page 5 matches
    the interleaved grouping (0,2 | 1,3) a reshape error would produce. Heads are asymmetric:
    kv head 1's logits are 4x larger, so pooling raw dot products would let it decide alone."""
    torch.manual_seed(0)
    D, pages = 32, 8
    q = torch.nn.functional.normalize(torch.randn(4, 3, D), dim=-1) * 4
    mean = torch.randn(2, pages, D) * 0.05
    direction = lambda heads: q[heads].mean(dim=(0, 1))  # noqa: E731
    mean[0, 3], mean[1, 3] = direction([0, 1]), 4 * direction([2, 3])
    mean[0, 5], mean[1, 5] = direction([0, 2]), 4 * direction([1, 3])
    summary = PageSummary(mean, mean - 0.01, mean + 0.01)
    for scoring in ("softmax_mean", "softmax_max", "quest"):
        assert int(page_scores(q, summary, scoring).argmax()) == 3, scoring
    # the same test with the grouping wrong picks the decoy: the check above can fail
    interleaved = q.view(2, 2, 3, D).transpose(0, 1).reshape(4, 3, D)
    assert int(page_scores(interleaved, summary, "softmax_mean").argmax()) == 5


def test_page_scoring_is_an_attention_every_head_votes_in():
    """A page one head loves with a huge logit must not beat a page every other head prefers."""
    D = 16
    q = torch.zeros(4, 1, D)
    q[:, 0, 0] = 1.0
    mean = torch.zeros(4, 3, D)
    mean[:, 1, 0] = 8.0                       # page 1: every kv head likes it
    mean[0, 2, 0] = 200.0                     # page 2: head 0 likes it enormously, the rest do not
    mean[1:, 2, 0] = -8.0
    summary = PageSummary(mean, mean, mean)
    assert int(page_scores(q, summary, "softmax_mean").argmax()) == 1
    raw_dot_mean = torch.einsum("hqd,hpd->p", q, mean)
    assert int(raw_dot_mean.argmax()) == 2          # what the old scoring chose


# ---- bounded memory against an offline forward ----------------------------------------------
@pytest.fixture(scope="module")
def one_layer_model(tmp_path_factory):
    return str(build(tmp_path_factory.mktemp("models") / "one_layer", seed=3, layers=1))


ANSWER_TOLERANCE = {"bf16": dict(atol=2e-5, rtol=1e-4), "int8": dict(atol=1e-3, rtol=1e-3)}


@pytest.mark.parametrize("ratio, kv_dtype", [(1.0, "bf16"), (0.4, "bf16"), (1.0, "int8"), (0.4, "int8")])
def test_bounded_answer_equals_offline_forward_over_what_was_kept(one_layer_model, frames, ratio, kv_dtype):
    """With one layer a token's keys and values depend on its embedding alone, so whatever VSB kept
    and PaR read, the answer must equal transformers' forward over [prefix, the tokens read in time
    order, newline, question] at positions 0.. . A wrong token, order or position breaks it. With
    int8 long-term memory the logits hold within ANSWER_TOLERANCE and choose the same token."""
    engine = LiveVLMEngine(EngineConfig(model_path=one_layer_model, budget_tokens=34 + 2 * 16 + 48,
                                        retrieval_ratio=ratio, page_tokens=4, vision_sinks=4, sample_fps=0,
                                        kv_dtype=kv_dtype))
    video = frames(12)
    for i, f in enumerate(video):
        engine.ingest(f, float(i))
    engine.hook.record_selection = True
    answer = engine.ask(QUESTION, max_new_tokens=1, return_logits=True)
    assert answer.pages_used < answer.pages_total or ratio == 1.0
    read = torch.cat([engine.hook.last_selection[0], engine.memory.short.view().token_idx[0]])
    T = engine.model.tokens_per_frame
    assert len(read) < 12 * T and torch.equal(read, read.sort().values)

    ref = load_reference(one_layer_model)
    with torch.inference_mode():
        # per frame: its T visual tokens (5.24 returns them with the video's newline appended, as
        # pooler_output; 5.17 returns the tensor alone)
        T = engine.model.tokens_per_frame
        feats = [ref.model.get_video_features(engine.model.preprocess([f])[None]) for f in video]
        visual = torch.cat([getattr(x, "pooler_output", x).reshape(-1, x_hidden(ref))[:T] for x in feats])
        embed = ref.model.get_input_embeddings()
        a = engine.model
        prefix = embed(torch.tensor(a.tokenize(engine.config.system_prompt)))
        suffix = embed(torch.tensor(a.tokenize(engine.config.question_template.format(question=QUESTION))))
        seq = torch.cat([prefix, visual[read], ref.model.image_newline[None], suffix])[None]
        logits = ref(inputs_embeds=seq).logits[0, -1]
    torch.testing.assert_close(answer.first_logits, logits.float(), **ANSWER_TOLERANCE[kv_dtype])
    assert answer.first_logits.argmax() == logits.argmax()


def offline_logits(path, engine, frames) -> torch.Tensor:
    """The reference: transformers' own forward over [prefix, these frames' visual tokens, newline,
    question], run by a second instance of the checkpoint; the logits of its last row."""
    ref = load_reference(path)
    with torch.inference_mode():
        T, a = engine.model.tokens_per_frame, engine.model
        feats = [ref.model.get_video_features(a.preprocess([f])[None]) for f in frames]
        visual = torch.cat([getattr(x, "pooler_output", x).reshape(-1, x_hidden(ref))[:T] for x in feats])
        embed = ref.model.get_input_embeddings()
        prefix = embed(torch.tensor(a.tokenize(engine.config.system_prompt)))
        suffix = embed(torch.tensor(a.tokenize(engine.config.question_template.format(question=QUESTION))))
        seq = torch.cat([prefix, visual, ref.model.image_newline[None], suffix])[None]
        return ref(inputs_embeds=seq).logits[0, -1].float()


@pytest.mark.parametrize("window, inside", [((1.5, 3.5), [2, 3]), ((2.5, 4.5), [3, 4]), ((None, 0.0), [0])])
def test_windowed_answer_equals_offline_forward_over_the_windows_frames(one_layer_model, frames, window, inside):
    """A time window reads only the frames taken in it (the cases cover long-term memory, both
    tiers, and an open start). One layer and nothing dropped (full): the answer must equal
    transformers' forward over [prefix, those frames, newline, question]."""
    engine = LiveVLMEngine(EngineConfig(model_path=one_layer_model, policy="full", budget_tokens=None,
                                        short_term_frames=2, sample_fps=0))
    video = frames(6)
    for i, f in enumerate(video):
        engine.ingest(f, float(i))
    answer = engine.ask(QUESTION, max_new_tokens=1, return_logits=True, window=window)
    torch.testing.assert_close(answer.first_logits, offline_logits(one_layer_model, engine, [video[i] for i in inside]),
                               atol=2e-5, rtol=1e-4)


# where the robot was for each of 6 frames: back and forth between x = 0 and x = 3 (a place then
# picks frames that are not neighbours in time, in both tiers)
WALK = [(0.0, 0.0, 0.0), (3.0, 0.0, 0.0), (1.0, 0.0, 0.0), (3.0, 0.2, 0.0), (0.0, 0.1, 0.0), (3.0, 0.0, 1.0)]


@pytest.mark.parametrize("near, radius, window, inside", [
    ((3.0, 0.0), 0.5, None, [1, 3, 5]),                 # in the plane: frame 5's height does not count
    ((3.0, 0.0, 0.0), 0.5, None, [1, 3]),               # in 3-D it does
    ((3.0, 0.0), 0.5, (2.0, 5.0), [3, 5]),              # a place and a time window: frames in both
    ((0.0, 0.0), 0.2, None, [0, 4]),                    # one frame of each tier (short-term: 4, 5)
])
def test_place_answer_equals_offline_forward_over_the_places_frames(one_layer_model, frames, near, radius, window,
                                                                    inside):
    """A question about a place reads only the frames taken within the radius. One layer and nothing
    dropped (full): the answer must equal transformers' forward over [prefix, those frames, newline,
    question], the frames picked here by hand from WALK."""
    engine = LiveVLMEngine(EngineConfig(model_path=one_layer_model, policy="full", budget_tokens=None,
                                        short_term_frames=2, sample_fps=0))
    video = frames(6)
    for i, f in enumerate(video):
        engine.ingest(f, float(i), pose=WALK[i])
    answer = engine.ask(QUESTION, max_new_tokens=1, return_logits=True, window=window, near=near, radius_m=radius,
                        evidence=6)
    assert sorted(e.time for e in answer.evidence) == [float(i) for i in inside]
    assert all(e.pose[:3] == WALK[int(e.time)] for e in answer.evidence)
    torch.testing.assert_close(answer.first_logits, offline_logits(one_layer_model, engine, [video[i] for i in inside]),
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("launch", ["eager", "static"])
def test_evidence_is_the_attention_transformers_returns(tiny_model_path, frames, launch):
    """Evidence weight of a frame = the mean attention one of its tokens draws from the question's
    own tokens (mean over heads, question tokens and layers), as a share of the sum over frames.
    Nothing dropped (full), so transformers' eager forward over the whole stream gives it. 'static':
    the question padded to a fixed length, its rows weighted (question_step.py)."""
    engine = LiveVLMEngine(EngineConfig(model_path=tiny_model_path, policy="full", budget_tokens=None,
                                        short_term_frames=2, sample_fps=0, launch=launch))
    video = frames(4)
    for i, f in enumerate(video):
        engine.ingest(f, 10.0 + i)
    answer = engine.ask(QUESTION, max_new_tokens=1, evidence=4)

    a, T = engine.model, engine.model.tokens_per_frame
    template = engine.config.question_template
    head = template[:template.index("{question}")]
    p = engine.memory.prefix_len
    first = p + 4 * T + 1                                  # the template starts after the video's newline
    rows = slice(first + len(a.tokenize(head)), first + len(a.tokenize(head + QUESTION)))
    ref_model = load_reference(tiny_model_path)
    with torch.inference_mode():
        out = ref_model(input_ids=video_ids(engine, 4, QUESTION), pixel_values_videos=a.preprocess(video)[None],
                        output_attentions=True)
    drawn = sum(attn[0, :, rows, p:p + 4 * T].mean(dim=(0, 1)) for attn in out.attentions)   # [4T]
    per_frame = drawn.view(4, T).mean(dim=1)
    expected = (per_frame / per_frame.sum()).float()
    got = {e.time: e.weight for e in answer.evidence}
    assert sorted(got) == [10.0, 11.0, 12.0, 13.0]
    assert [e.weight for e in answer.evidence] == sorted(got.values(), reverse=True)
    torch.testing.assert_close(torch.tensor([got[10.0 + i] for i in range(4)]), expected, atol=1e-6, rtol=1e-4)


def x_hidden(model) -> int:
    return model.config.text_config.hidden_size


# ---- a real checkpoint's layout through the real processor -----------------------------------
def torchvision_works() -> bool:
    """transformers' video processor needs torchvision; the only torchvision wheel these CPU
    machines can install is a CUDA build that fails to load next to the CPU torch."""
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):
        return False
    return True


@pytest.fixture(scope="module")
def checkpoint_196(tmp_path_factory):
    """Random weights, but the 7B checkpoints' vision geometry: 384 px, patch 14 -> 27x27 patches,
    2x2 pooling -> 196 tokens per frame; saved with save_pretrained (and the real processor where
    torchvision can load)."""
    torch.manual_seed(5)
    tok = build_tokenizer()
    model = new_model(tok, image_size=384, layers=2, vision_layers=1)
    model.config.vision_config.patch_size = 14
    model = type(model)(model.config).eval()             # rebuilt with patch 14
    out = tmp_path_factory.mktemp("models") / "layout196"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if torchvision_works():
        from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

        norm = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)
        LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessor(size={"height": 384, "width": 384}, **norm),
            video_processor=LlavaOnevisionVideoProcessor(size={"height": 384, "width": 384}, **norm),
            tokenizer=tok, num_image_tokens=27 * 27, vision_feature_select_strategy="full",   # patches, before pooling
            video_token="<video>", image_token="<image>").save_pretrained(out)
    else:
        (out / "preprocessor_config.json").write_text('{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}')
    return str(out)


def test_engine_equals_transformers_on_a_real_layout(checkpoint_196):
    """Full memory, 2-frame clips: the engine's first-token logits equal transformers' own
    LlavaOnevisionForConditionalGeneration run on pixel_values_videos. Where torchvision loads (the
    GPU machine: this file passed there with LlavaOnevisionProcessor, torchvision 0.26 and
    transformers 5.17, 2026-11-25), the real processor makes the inputs; on these CPU machines it
    cannot, and the inputs are made here by the processor's rule for 384x384 frames (no resize,
    x/255, then (x - 0.5) / 0.5; one video token per visual token plus one for the newline)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    engine = LiveVLMEngine(EngineConfig(model_path=checkpoint_196, policy="livevlm", budget_tokens=None,
                                        retrieval_ratio=1.0, sample_fps=0, frames_per_clip=2))
    assert engine.model.tokens_per_frame == 196
    rng = np.random.default_rng(7)
    video = [rng.integers(0, 256, (384, 384, 3), dtype=np.uint8) for _ in range(5)]   # no resize either way
    for i, f in enumerate(video):
        engine.ingest(f, float(i))
    answer = engine.ask(QUESTION, max_new_tokens=1, return_logits=True)

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(checkpoint_196).eval()
    if torchvision_works():
        from transformers import LlavaOnevisionProcessor

        processor = LlavaOnevisionProcessor.from_pretrained(checkpoint_196)
        text = engine.config.system_prompt + "<video>" + engine.config.question_template.format(question=QUESTION)
        inputs = dict(processor(text=text, videos=[np.stack(video)], return_tensors="pt"))
    else:
        pixels = torch.from_numpy(np.stack(video)).permute(0, 3, 1, 2).float() / 255.0
        inputs = dict(input_ids=video_ids(engine, 5, QUESTION), pixel_values_videos=((pixels - 0.5) / 0.5)[None])
    assert int((inputs["input_ids"] == model.config.video_token_index).sum()) == 5 * 196 + 1
    with torch.inference_mode():
        ref = model(**inputs).logits[0, -1].float()
    torch.testing.assert_close(answer.first_logits, ref, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("side", [27, 28])          # 27 x 27 patches (LLaVA-OneVision's 384 px), and even
def test_pooling_equals_transformers_apply_pooling(tiny_model_path, side):
    """The adapter pools through a channels-last view (a faster kernel); the numbers are those of
    transformers' own `apply_pooling`."""
    from livevlm_ros.engine.models.llava_onevision import pool_2x2

    engine = LiveVLMEngine(EngineConfig(model_path=tiny_model_path, sample_fps=0))
    model = engine.model.model
    vision = model.config.vision_config
    vision.image_size = side * vision.patch_size
    feats = torch.randn(3, side * side, model.config.text_config.hidden_size)
    with torch.inference_mode():
        torch.testing.assert_close(pool_2x2(model, feats), model.model.apply_pooling(feats), atol=1e-6, rtol=1e-6)


def test_stored_keys_are_exactly_what_k_proj_made(one_layer_model, frames):
    """Pre-RoPE keys are taken from k_proj, not recovered by un-rotating rounded post-RoPE keys:
    bit-equal to the layer's own projection of its input (one layer: input = the embeddings)."""
    engine = LiveVLMEngine(EngineConfig(model_path=one_layer_model, budget_tokens=None, sample_fps=0))
    video = frames(2)
    for i, f in enumerate(video):
        engine.ingest(f, float(i))
    layer = engine.model.model.model.language_model.layers[0]
    kv = engine.model.kv
    with torch.inference_mode():                                      # frame by frame, as they came
        embeds = [engine.model.encode_frames(engine.model.preprocess([f]))[None] for f in video]
        expected = torch.cat([layer.self_attn.k_proj(layer.input_layernorm(e))[0] for e in embeds])
    stored = engine.memory.short.view().keys[0]                       # [kv_heads, tokens, D]
    assert torch.equal(stored, expected.view(-1, kv.kv_heads, kv.head_dim).transpose(0, 1))


TEMPLATE = "\nQuestion about the video: {question}"


@pytest.mark.parametrize("question", ["What is on the left?", "the video"])
def test_the_pages_read_are_those_the_questions_own_tokens_pick(one_layer_model, frames, question):
    """PaR scores pages with the question's own tokens. With one layer their pre-RoPE queries are
    the reference model's q_proj of their embeddings alone, so the pages the answer read must be the
    ones the plan picks with those queries. The rows are found here without the engine's code: the
    shortest tail of the text that decodes to the question. (Rows found by searching the text for
    the question land in the template for "the video"; tokenizing template and question apart cut
    the first token of "What is on the left?" off.) softmax_max: one strong row decides, so the pages
    picked tell rows apart."""
    from transformers import AutoTokenizer

    engine = LiveVLMEngine(EngineConfig(model_path=one_layer_model, budget_tokens=34 + 2 * 16 + 128,
                                        retrieval_ratio=0.25, page_tokens=2, vision_sinks=4, page_scoring="softmax_max",
                                        sample_fps=0,
                                        question_template=TEMPLATE))
    for i, f in enumerate(frames(16)):
        engine.ingest(f, float(i))
    engine.hook.record_selection = True
    engine.ask(question, max_new_tokens=1)
    read = engine.hook.last_selection[0]

    tok = AutoTokenizer.from_pretrained(one_layer_model)
    ids = tok(TEMPLATE.format(question=question), add_special_tokens=False)["input_ids"]
    n = next(n for n in range(1, len(ids) + 1) if tok.decode(ids[-n:]).strip() == question)
    layer = load_reference(one_layer_model).model.language_model.layers[0]
    with torch.inference_mode():
        q = layer.self_attn.q_proj(layer.input_layernorm(layer_input := engine.model.embed_tokens(torch.tensor(ids))))
    assert layer_input.shape[0] == len(ids)
    kv, mem = engine.model.kv, engine.memory

    def picked(rows: slice) -> torch.Tensor:
        heads = q[rows].view(-1, kv.q_heads, kv.head_dim).transpose(0, 1)
        return mem.long.token_idx[0, :mem.long.len][engine.selector.plan(mem).long_index(0, heads)]
    assert torch.equal(read, picked(slice(len(ids) - n, len(ids))))
    assert not torch.equal(read, picked(slice(len(ids) - n + 1, len(ids))))     # the test tells rows apart
