"""Speed, memory and scale of the engine on one GPU, every policy side by side, in one run.

    python3 benchmarks/gpu_bench.py --out results/         # on the GPU machine (~8 min)
    python3 benchmarks/gpu_bench.py --tiny --out /tmp/b    # smoke test of the script on a CPU

Random-weight LLaVA-OneVision at its real 7B shapes (SigLIP-so400m 384 px + Qwen2-7B), bf16:
the shapes, not the weights, decide speed and memory. Prints a table of ratios last and writes
results.json (+ PNG plots if matplotlib is there).

Two kinds of stream:
  real       frames go through the vision tower and the language-model prefill (ingest speed,
             VSB overhead, 256-frame answers);
  simulated  memory is filled with random KV through the same StreamingMemory code path that a real
             clip takes (commit_clip: short-term, eviction, VSB selection, offload) but without the
             model forward, to reach 1 h and longer streams inside the time limit. Answer latency
             on them is real: the question runs through the model against that memory.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from livevlm_ros.engine import EngineConfig, LiveVLMEngine  # noqa: E402
from livevlm_ros.engine.models.llava_onevision import LlavaOnevisionAdapter  # noqa: E402
from livevlm_ros.tools.make_tiny_model import build_tokenizer  # noqa: E402

SHAPES = {
    "7b": dict(vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                           image_size=384, patch_size=14),
               text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064)),
    "0.5b": dict(vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                             image_size=384, patch_size=14),
                 text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                           num_key_value_heads=2, vocab_size=151936)),
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=56, patch_size=8),
                 text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=600)),
}
QUESTION = "Where did I last see the red toolbox, and was the door on the left open?"


def log(*a):
    print(*a, flush=True)


def run_header(device: str, **extra) -> dict:
    """What every results file starts with: when, on what, with which versions, by which command."""
    import transformers

    return dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), device=device,
                gpu=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                transformers=transformers.__version__, command=" ".join(sys.argv), **extra)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_adapter(shape: str, device: str, dtype: torch.dtype) -> LlavaOnevisionAdapter:
    model, tok = build_model(shape, device, dtype)
    return LlavaOnevisionAdapter(model, tok, [0.5] * 3, [0.5] * 3)


def build_model(shape: str, device: str, dtype: torch.dtype, tiled: bool = False):
    """(a random-weight LLaVA-OneVision at `shape`, built on `device`, its tokenizer). tiled: every
    parameter filled from one random block instead of its own initialisation (building 7B on a CPU
    otherwise took minutes); the buffers (RoPE's frequencies, position ids) are built as usual, so
    the model runs: for timing and memory, where the weights' values do not matter."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.initialization import no_init_weights

    s = SHAPES[shape]
    tok = build_tokenizer()
    cfg = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", **s["vision"]),
        text_config=dict(model_type="qwen2", max_position_embeddings=1 << 20, rope_theta=1e6, **s["text"]),
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full")
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device), (no_init_weights() if tiled else contextlib.nullcontext()):
        model = LlavaOnevisionForConditionalGeneration(cfg)
    torch.set_default_dtype(old)
    if tiled:
        block = torch.randn(1 << 22, dtype=dtype) * 0.02
        with torch.no_grad():
            for t in model.parameters():
                flat = t.view(-1)
                for i in range(0, flat.numel(), block.numel()):
                    flat[i:i + block.numel()] = block[:flat.numel() - i]
    model.config.text_config._attn_implementation = "sdpa"
    model.config.vision_config._attn_implementation = "sdpa"
    return model.eval(), tok


def flops_per_frame(adapter, context_tokens: int) -> dict:
    """Matmul FLOPs of one frame: vision tower + projector + LM prefill of its tokens."""
    c = adapter.model.config
    v, t = c.vision_config, c.text_config
    patches = (v.image_size // v.patch_size) ** 2
    vis = v.num_hidden_layers * (2 * patches * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
                                 + 4 * patches * patches * v.hidden_size)
    proj = 2 * patches * (v.hidden_size * t.hidden_size + t.hidden_size * t.hidden_size)
    n = adapter.tokens_per_frame
    kv = t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    per_tok = t.num_hidden_layers * 2 * (2 * t.hidden_size ** 2 + 2 * t.hidden_size * kv + 3 * t.hidden_size * t.intermediate_size)
    attn = t.num_hidden_layers * 4 * n * (context_tokens + n / 2) * t.hidden_size
    return {"vision": vis, "projector": proj, "lm": n * per_tok + attn, "total": vis + proj + n * per_tok + attn}


def lm_weight_bytes(adapter) -> int:
    return sum(p.numel() * p.element_size() for p in adapter.model.model.language_model.parameters()) + \
        adapter.model.lm_head.weight.numel() * adapter.model.lm_head.weight.element_size()


def make_engine(adapter, policy: str, budget: int | None, **kw) -> LiveVLMEngine:
    cfg = EngineConfig(policy=policy, budget_tokens=budget, sample_fps=0, device=str(adapter.kv.device),
                       dtype="bfloat16", max_new_tokens=16, **kw)
    return LiveVLMEngine(cfg, adapter=adapter)


def random_frames(n: int, h=480, w=640, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return [np.roll(base, 7 * i, axis=1) for i in range(n)]


def simulate_fill(engine: LiveVLMEngine, frames: int, clip_frames: int = 8):
    """Push `frames` frames of random KV through StreamingMemory.commit_clip (no model forward)."""
    mem, kv = engine.memory, engine.model.kv
    T = engine.model.tokens_per_frame
    if mem.page_summaries is not None or not engine.config.bounded:
        mem.long.reserve(frames * T)
    g = torch.Generator(device=kv.device).manual_seed(1)
    done = 0
    while done < frames:
        f = min(clip_frames, frames - done)
        n = f * T
        keys = torch.randn(kv.layers, kv.kv_heads, n, kv.head_dim, device=kv.device, dtype=kv.dtype, generator=g)
        values = torch.randn(kv.layers, kv.kv_heads, n, kv.head_dim, device=kv.device, dtype=kv.dtype, generator=g)
        scores = torch.rand(kv.layers, n, device=kv.device, generator=g) if engine.compression.needs_scores else None
        mem.commit_clip(keys, values, scores, [float(done + i) for i in range(f)])
        done += f
    sync()


def time_answer(engine, repeats=3, max_new_tokens=16, evidence=0):
    """(ttft, full answer latency, decode tokens/s), medians; the answer is forced to full length."""
    stops = engine.model.stop_token_ids
    engine.model.stop_token_ids = ()           # random weights: never stop early, time the full answer
    try:
        for _ in range(2):                      # warm-up; the second records the question's graph
            engine.ask(QUESTION, max_new_tokens=2, evidence=evidence)
        ttft, total, tps = [], [], []
        for _ in range(repeats):
            sync()
            a = engine.ask(QUESTION, max_new_tokens=max_new_tokens, evidence=evidence)
            sync()
            ttft.append(a.ttft_s)
            total.append(a.latency_s)
            tps.append((a.tokens_generated - 1) / max(a.latency_s - a.ttft_s, 1e-9))
        return float(np.median(ttft)), float(np.median(total)), float(np.median(tps)), a
    finally:
        engine.model.stop_token_ids = stops


def device_time_per_call(fn, calls: int) -> float:
    """Seconds of GPU kernel time per call of fn (torch.profiler), for kernel time vs launch gaps."""
    if not torch.cuda.is_available():
        return float("nan")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    return sum(e.device_time for e in kernels) * 1e-6 / calls       # device_time is in microseconds


def bench_decode_paths(adapter, results, frames, budget, tokens=32):
    """Issue 13: the decode step launched kernel by kernel (eager) vs replayed from a CUDA graph,
    on the same LiveVLM memory; the self-check that both give the same tokens; and per path the
    GPU's kernel time against the wall time (what is left is launch gaps)."""
    engine = make_engine(adapter, "livevlm", budget, launch="eager")
    simulate_fill(engine, frames)
    questions = [QUESTION, "Is the door open?", "What did the robot see in the kitchen?"]
    rows, answers = {}, {}
    # static: the fixed-shape step run kernel by kernel; graph: the same step replayed from a CUDA graph
    # (--tiny on a CPU: static only)
    modes = ("eager", "static", "graph") if torch.cuda.is_available() else ("eager", "static")
    fixed = modes[-1]
    # timings first, for both paths: once the profiler has run, kernel launches stay slower for the
    # rest of the process (seen on the H200: +10-20 ms on a 50 ms question prefill)
    for mode in modes:
        engine.reconfigure(launch=mode)
        ttft, total, tps, a = time_answer(engine, repeats=5, max_new_tokens=tokens)
        alloc, peak = gpu_mem()
        # as the node asks by default (evidence_frames: 3): the question also measures evidence
        ttft_evidence = time_answer(engine, repeats=5, max_new_tokens=2, evidence=3)[0]
        rows[mode] = dict(ttft_ms=ttft * 1e3, ttft_evidence_ms=ttft_evidence * 1e3, answer_ms=total * 1e3, decode_tps=tps,
                          decode_ms_per_token=(total - ttft) / (tokens - 1) * 1e3, gpu_allocated=alloc,
                          captures=engine.decode_step.captures if engine.decode_step else 0,
                          question_captures=engine.question_step.recorded.captures if engine.question_step else 0,
                          question_replays=engine.question_step.recorded.replays if engine.question_step else 0,
                          question_capture_error=engine.question_step.recorded.capture_error if engine.question_step else None)
    for mode in modes:
        engine.reconfigure(launch=mode)
        stops, engine.model.stop_token_ids = engine.model.stop_token_ids, ()
        try:
            answers[mode] = [engine.ask(q, max_new_tokens=tokens).token_ids for q in questions]
            answers[mode].append(engine.ask(QUESTION, max_new_tokens=tokens, window=(frames / 4, frames / 2)).token_ids)
            prefill = device_time_per_call(lambda: engine.ask(QUESTION, max_new_tokens=1), 1)
            whole = device_time_per_call(lambda: engine.ask(QUESTION, max_new_tokens=tokens), 1)
        finally:
            engine.model.stop_token_ids = stops
        rows[mode].update(kernel_ms_per_token=(whole - prefill) / (tokens - 1) * 1e3, prefill_kernel_ms=prefill * 1e3)
        log("decode", mode, json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in rows[mode].items()}))
    def first_diff(a, b):
        return [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), None) for p, q in zip(answers[a], answers[b])]
    # the captured replay must give exactly the tokens of the same step run kernel by kernel; against the
    # eager path (other attention shapes: a slice, not a masked fixed buffer) bf16 rounding may differ
    results["decode_paths"] = dict(frames=frames, tokens=tokens, rows=rows, answers=answers,
                                   same_tokens=answers[fixed] == answers["static"],
                                   first_differing_token_vs_eager=first_diff("eager", fixed))
    log(f"decode self-check: {fixed} == static tokens: {answers[fixed] == answers['static']}; first token differing "
        f"from the eager path, per answer: {first_diff('eager', fixed)}")
    free(engine)


def gpu_mem():
    if not torch.cuda.is_available():
        return 0, 0
    return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()


def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def free(*objs):
    """Drop benchmark objects; an engine also unhooks itself from the shared model."""
    for o in objs:
        if hasattr(o, "close"):
            o.close()
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
def bench_matmul_and_copy(device):
    if device == "cpu":
        return None, None
    import triton.testing as tt
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = tt.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    x = torch.randn(1 << 30, device=device, dtype=torch.bfloat16)     # 2 GiB
    y = torch.empty_like(x)
    ms_copy = tt.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    free(a, b, x, y)
    return 2 * 8192 ** 3 / ms / 1e9, 2 * 2 * (1 << 30) / ms_copy / 1e6     # TFLOP/s, GB/s (read+write)


def warm_up_ingest(engine, frames) -> int:
    """Ingest until memory is full and, where clips are replayed, their graph is recorded (memory's
    layout settles a few clips after it first fills); returns the frames ingested."""
    clip, T = engine.config.frames_per_clip, engine.model.tokens_per_frame
    i = 0
    while i < engine.config.budget_tokens // T + 2 * clip or (
            engine.ingest_step is not None and engine.ingest_step.recorded.capture and engine.ingest_step.recorded.captures == 0
            and i < engine.config.budget_tokens // T + 40 * clip):
        engine.ingest(frames[i % len(frames)], float(i))
        i += 1
    return i


def bench_ingest(adapter, results, n_frames, clip_sizes):
    """Real frames through vision tower + prefill, VSB on; steady state once memory is full."""
    T = adapter.tokens_per_frame
    out = {}
    frames = random_frames(n_frames)
    for clip in clip_sizes:
        engine = make_engine(adapter, "livevlm", 12288 if T > 100 else 34 + 2 * T + 256, frames_per_clip=clip)
        warm = warm_up_ingest(engine, frames)
        sync()
        reset_peak()
        t0 = time.perf_counter()
        n = 0
        for i in range(warm, warm + n_frames):
            engine.ingest(frames[i % len(frames)], float(i))
            n += 1
        engine.flush()
        sync()
        dt = (time.perf_counter() - t0) / n
        ctx = engine.memory.total_tokens()
        fl = flops_per_frame(adapter, ctx)
        step = engine.ingest_step and engine.ingest_step.recorded
        out[f"clip{clip}"] = dict(ms_per_frame=dt * 1e3, fps=1 / dt, memory_tokens=ctx, flops_per_frame=fl,
                                  achieved_tflops=fl["total"] / dt / 1e12, peak_bytes=gpu_mem()[1],
                                  allocated_bytes=gpu_mem()[0], launch=engine.config.launch,
                                  clip_captures=step.captures if step else 0, clip_replays=step.replays if step else 0,
                                  clip_capture_error=step.capture_error if step else None)
        log(f"ingest livevlm clip={clip}: {dt * 1e3:.1f} ms/frame ({1 / dt:.1f} fps), "
            f"{fl['total'] / dt / 1e12:.0f} TFLOP/s achieved, memory {ctx} tokens")
        free(engine)
    results["ingest"] = out


def check_attention_paths(adapter, results, context=12288):
    """A clip's prefill attends with the flash kernel on CUDA (bottom-right causal, grouped kv heads,
    no mask): it must equal the folded-mask path the CPU takes, on a clip of one frame after memory."""
    import torch.nn.functional as F

    from livevlm_ros.engine.hook import attention

    kv, n = adapter.kv, adapter.tokens_per_frame
    g = torch.Generator(device=kv.device).manual_seed(0)
    q = torch.randn(1, kv.q_heads, n, kv.head_dim, device=kv.device, dtype=kv.dtype, generator=g)
    k, v = (torch.randn(1, kv.kv_heads, context + n, kv.head_dim, device=kv.device, dtype=kv.dtype, generator=g)
            for _ in range(2))
    flash = attention._flash_bottom_right(q, k, v, kv.head_dim ** -0.5)
    fused = attention._clip_prefill(q, k, v, kv.head_dim ** -0.5)          # what a clip's forward runs
    groups = kv.q_heads // kv.kv_heads
    mask = attention._folded_causal_mask(groups, n, context + n, kv.device)
    ref = F.scaled_dot_product_attention(q.reshape(1, kv.kv_heads, groups * n, -1), k, v, attn_mask=mask)
    ref = ref.reshape(1, kv.q_heads, n, -1)
    diff = None if flash is None else float((flash.float() - ref.float()).abs().max())
    fused_diff = None if fused is None else float((fused[0].transpose(1, 2).float() - ref.float()).abs().max())
    results["attention_check"] = dict(flash_used=flash is not None, max_abs_diff=diff,
                                      clip_path_used=fused is not None, clip_path_max_abs_diff=fused_diff)
    log(f"attention self-check (clip prefill): flash used {flash is not None}, max |flash - folded mask| {diff}; "
        f"the engine's clip path (clip_attention.py) used {fused is not None}, max |it - folded mask| {fused_diff}")
    # VSB's scores of that clip: the fused kernels against the matrix written out
    from livevlm_ros.engine.cuda.kernels import attention_received
    from livevlm_ros.engine.hook import received

    folded = (q.reshape(kv.kv_heads, groups * n, -1) * kv.head_dim ** -0.5).to(kv.dtype)
    keys = k[0]
    written = received._written_out(folded, keys, n, None)
    fused = received.attention_received(folded, keys, n)
    row = dict(fused_used=attention_received.available(keys),
               max_rel_diff=float((fused - written).abs().max() / written.abs().max()))
    if keys.is_cuda:
        import triton.testing as tt
        row.update(written_us=tt.do_bench(lambda: received._written_out(folded, keys, n, None)) * 1e3,
                   fused_us=tt.do_bench(lambda: received.attention_received(folded, keys, n)) * 1e3)
    results["received_check"] = row
    log("attention received (VSB scores, one layer): " + json.dumps({a: round(b, 6) if isinstance(b, float) else b
                                                                     for a, b in row.items()}))


def check_ingest_replay(adapter, results, clip: int, frames: int):
    """Issue 13 self-check: clips replayed from CUDA graphs leave exactly the memory (and answers)
    that the same fixed-shape steps run kernel by kernel leave, over a stream that fills memory."""
    T = adapter.tokens_per_frame
    video = random_frames(frames)
    engines = {}
    replayed = "graph" if torch.cuda.is_available() else "eager"      # --tiny on a CPU: the script runs
    for mode in ("static", replayed):
        engine = make_engine(adapter, "livevlm", 12288 if T > 100 else 34 + 2 * T + 256, frames_per_clip=clip,
                             launch=mode)
        for i, frame in enumerate(video):
            engine.ingest(frame, float(i))
        engine.flush()
        engines[mode] = engine
    a, b = engines["static"].memory, engines[replayed].memory
    same = all(torch.equal(getattr(x.view(), f), getattr(y.view(), f))
               for x, y in ((a.long, b.long), (a.short, b.short)) for f in ("keys", "values", "token_idx", "sink"))
    answers = {m: e.ask(QUESTION, max_new_tokens=16).token_ids for m, e in engines.items()}
    step = (engines[replayed].ingest_step or engines["static"].ingest_step).recorded
    same_answer = answers["static"] == answers[replayed]
    results.setdefault("ingest", {})[f"replay_check_clip{clip}"] = dict(
        frames=frames, launch=replayed, same_memory=same, same_answer=same_answer,
        clip_replays=step.replays, clip_captures=step.captures, clip_capture_error=step.capture_error)
    log(f"ingest self-check, clip={clip}, {frames} frames: {replayed} memory == static memory: {same}; same answer: "
        f"{same_answer}; clips replayed {step.replays}, recorded {step.captures}"
        + (f"; capture error: {step.capture_error}" if step.capture_error else ""))
    free(*engines.values())


def bench_ingest_vsb_off(adapter, results, n_frames):
    """Same stream without VSB scoring (sliding window): the cost of VSB."""
    T = adapter.tokens_per_frame
    frames = random_frames(n_frames)
    engine = make_engine(adapter, "sliding_window", 12288 if T > 100 else 34 + 2 * T + 256, frames_per_clip=1)
    warm = warm_up_ingest(engine, frames)
    sync()
    t0 = time.perf_counter()
    for i in range(warm, warm + n_frames):
        engine.ingest(frames[i % len(frames)], float(i))
    sync()
    dt = (time.perf_counter() - t0) / n_frames
    results["ingest"]["sliding_window_clip1"] = dict(ms_per_frame=dt * 1e3)
    log(f"ingest sliding_window clip=1 (no VSB scores): {dt * 1e3:.1f} ms/frame")
    free(engine)


def bench_hf_baseline(adapter, results, n_frames):
    """Plain transformers: one frame per call into a growing DynamicCache (the baseline to beat)."""
    from transformers import DynamicCache

    lm = adapter.model.model.language_model
    cfg = lm.config
    saved = cfg._attn_implementation
    cfg._attn_implementation = "sdpa"
    kw = adapter._cache_kwarg
    try:
        frames = random_frames(n_frames)
        cache = DynamicCache(config=cfg)
        times = []
        with torch.inference_mode():
            for i in range(n_frames):
                sync()
                t0 = time.perf_counter()
                emb = adapter.encode_frames(adapter.preprocess([frames[i]]))[None]
                lm(inputs_embeds=emb, use_cache=True, **{kw: cache})
                sync()
                times.append(time.perf_counter() - t0)
            # question with the full cache (text only, like the engine's suffix)
            ids = torch.tensor([adapter.tokenize(QUESTION)], device=adapter.kv.device)
            emb = lm.embed_tokens(ids)
            ttfts = []
            for _ in range(3):
                sync()
                t0 = time.perf_counter()
                out = lm(inputs_embeds=emb, use_cache=True, **{kw: cache})
                adapter.model.lm_head(out.last_hidden_state[:, -1])
                sync()
                ttfts.append(time.perf_counter() - t0)
                cache.crop(-ids.shape[1])           # drop the question again
    finally:
        cfg._attn_implementation = saved
    results["hf_baseline"] = dict(ms_per_frame_first10=float(np.median(times[:10]) * 1e3),
                                  ms_per_frame_last10=float(np.median(times[-10:]) * 1e3),
                                  frames=n_frames, ttft_s=float(np.median(ttfts)))
    log(f"HF DynamicCache baseline: {np.median(times[:10]) * 1e3:.1f} ms/frame at start, "
        f"{np.median(times[-10:]) * 1e3:.1f} ms/frame at {n_frames} frames; TTFT {np.median(ttfts) * 1e3:.1f} ms")
    free(cache)


def bench_hf_static_compiled(adapter, results, frames, tokens=16, compile_question=True):
    """transformers' own fast path for the same job (issue 13), what a user would pick instead: the
    language model over a StaticCache that holds `frames` frames of KV (random: content does not
    change speed), its forward under torch.compile(mode="reduce-overhead", i.e. CUDA graphs), the
    question prefilled and `tokens` decoded greedily. `generate(cache_implementation="static")`
    compiles only the decode step; its question prefill is the eager row here."""
    from transformers import StaticCache

    lm, head, kv, kw = adapter._lm, adapter._lm_head, adapter.kv, adapter._cache_kwarg
    dev = kv.device
    ids = torch.tensor([adapter.tokenize(QUESTION)], device=dev)
    n, held = ids.shape[1], frames * adapter.tokens_per_frame
    cfg = lm.config
    saved, cfg._attn_implementation = cfg._attn_implementation, "sdpa"
    try:
        cache = StaticCache(config=cfg, max_cache_len=held + n + tokens)
        g = torch.Generator(device=dev).manual_seed(1)
        with torch.inference_mode():
            for layer in range(kv.layers):
                k = torch.randn(1, kv.kv_heads, held, kv.head_dim, device=dev, dtype=kv.dtype, generator=g)
                cache.update(k, torch.randn_like(k), layer)

        def forward(embeds, positions):
            out = lm(inputs_embeds=embeds, position_ids=positions, use_cache=True, **{kw: cache})
            return head(out.last_hidden_state[:, -1])

        compiled = torch.compile(forward, mode="reduce-overhead", fullgraph=True, dynamic=False)

        @torch.inference_mode()
        def answer(prefill):
            for layer in cache.layers:          # the question and answer go right after the stream again
                layer.cumulative_length.fill_(held)
            sync()
            t0 = time.perf_counter()
            token = int(prefill(lm.embed_tokens(ids), torch.arange(held, held + n, device=dev)[None]).argmax())
            ttft = time.perf_counter() - t0
            for i in range(tokens - 1):
                position = torch.tensor([[held + n + i]], device=dev)
                token = int(compiled(lm.embed_tokens(torch.tensor([[token]], device=dev)), position).argmax())
            sync()
            return ttft, time.perf_counter() - t0

        t0 = time.time()
        rows = {}
        for name, prefill in (("eager_question", forward), ("compiled_question", compiled)):
            if name == "compiled_question" and not compile_question:
                continue
            for _ in range(3):                  # compiles, then records the graphs
                answer(prefill)
            runs = [answer(prefill) for _ in range(5)]
            ttft, total = (float(np.median(x)) for x in zip(*runs))
            rows[name] = dict(ttft_ms=ttft * 1e3, answer_ms=total * 1e3, decode_tps=(tokens - 1) / (total - ttft))
            log(f"HF StaticCache + torch.compile at {frames} frames, {name}: " + json.dumps(
                {k: round(v, 2) for k, v in rows[name].items()}))
        results["hf_static_compiled"] = dict(frames=frames, tokens=tokens, compile_and_warmup_s=time.time() - t0,
                                             rows=rows)
    finally:
        cfg._attn_implementation = saved
    free(cache)


def bench_response(adapter, results, lengths, budget):
    """TTFT / answer latency / decode rate vs stream length, every policy, simulated streams."""
    T = adapter.tokens_per_frame
    rows = []
    for frames in lengths:
        for policy in ("livevlm", "sliding_window", "rekv", "full"):
            kw = {}
            if policy == "rekv":      # read as many tokens as LiveVLM's whole memory (equal context)
                kw["retrieval_ratio"] = min(1.0, budget / max(1, frames * T))
            engine = None
            need = frames * T * adapter.kv.bytes_per_token()
            if policy == "rekv" and need > 0.6 * host_memory_bytes():
                row = dict(policy=policy, frames=frames, skipped=f"needs {need / 1e9:.0f} GB of host memory")
                rows.append(row)
                log("response", json.dumps(row))
                continue
            try:
                reset_peak()
                engine = make_engine(adapter, policy, budget if policy in ("livevlm", "sliding_window") else None, **kw)
                simulate_fill(engine, frames)
                ttft, total, tps, a = time_answer(engine)
                alloc, peak = gpu_mem()
                s = engine.stats()
                row = dict(policy=policy, frames=frames, ttft_ms=ttft * 1e3, answer_ms=total * 1e3, decode_tps=tps,
                           context_tokens=a.context_tokens, device_kv_bytes=s["device_bytes"],
                           offload_kv_bytes=s["offload_bytes"], gpu_allocated=alloc, gpu_peak=peak,
                           question_replays=engine.question_step.recorded.replays if engine.question_step else 0)
            except torch.OutOfMemoryError as err:
                row = dict(policy=policy, frames=frames, oom=str(err).splitlines()[0][:120])
            except Exception as err:          # noqa: BLE001 - EngineResourceError wraps OOM
                row = dict(policy=policy, frames=frames, error=f"{type(err).__name__}: {str(err)[:160]}")
                log(traceback.format_exc())
            rows.append(row)
            log("response", json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}))
            free(engine)
    results["response"] = rows


def host_memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_capacity(adapter, results, start_frames, step, max_frames):
    """The longest stream full cache can hold AND answer on this GPU: memory reserved for the whole
    stream up front (as a full-cache system that knows its length would), simulated KV, then one
    question; grow the length by `step` until something runs out of memory."""
    T = adapter.tokens_per_frame
    kv_frame = adapter.kv.bytes_per_token() * T
    free_now = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0
    results["capacity"] = dict(kv_bytes_per_frame=kv_frame, free_bytes_with_weights_loaded=free_now,
                               full_cache_frames_estimate=free_now // kv_frame)
    held, frames = 0, start_frames
    while frames <= max_frames:
        engine = None
        try:
            engine = make_engine(adapter, "full", None)
            simulate_fill(engine, frames)
            engine.ask(QUESTION, max_new_tokens=2)
            held = frames
        except Exception as err:        # noqa: BLE001 - OutOfMemoryError or EngineResourceError
            results["capacity"]["full_cache_failed_at"] = dict(frames=frames, error=f"{type(err).__name__}")
            break
        finally:
            free(engine)
        frames += step
    results["capacity"]["full_cache_frames_measured"] = held
    log(f"capacity: full cache held and answered {held} frames, failed at {frames} "
        f"(KV {kv_frame / 1e6:.1f} MB/frame, {free_now / 1e9:.1f} GB free beside the weights)")


def bench_long_run(adapter, results, budget, frames, clip_frames=32):
    """LiveVLM over a very long simulated stream: device memory at checkpoints, then one answer."""
    engine = make_engine(adapter, "livevlm", budget)
    checkpoints = []
    done, t0 = 0, time.time()
    chunk = max(clip_frames, frames // 16)
    reset_peak()
    while done < frames:
        simulate_fill(engine, chunk, clip_frames)
        done += chunk
        alloc, peak = gpu_mem()
        checkpoints.append(dict(frames=done, device_kv_bytes=engine.stats()["device_bytes"], gpu_allocated=alloc,
                                gpu_peak=peak, memory_tokens=engine.memory.total_tokens()))
    ttft, total, tps, a = time_answer(engine)
    results["long_run"] = dict(frames=done, wall_s=time.time() - t0, checkpoints=checkpoints, ttft_ms=ttft * 1e3,
                               answer_ms=total * 1e3, span=a.span)
    log(f"long run: {done} frames in {time.time() - t0:.0f} s; device KV "
        f"{checkpoints[0]['device_kv_bytes'] / 1e6:.0f} MB after {checkpoints[0]['frames']} frames, "
        f"{checkpoints[-1]['device_kv_bytes'] / 1e6:.0f} MB after {done}; GPU allocated "
        f"{checkpoints[0]['gpu_allocated'] / 1e9:.2f} -> {checkpoints[-1]['gpu_allocated'] / 1e9:.2f} GB; TTFT {ttft * 1e3:.1f} ms")
    free(engine)


# ------------------------------------------------------------------------------------------------
def plots(results, out: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in results["response"] if "ttft_ms" in r]
    for key, ylabel, fname in (("ttft_ms", "time to first token (ms)", "latency_vs_stream.png"),
                               ("device_kv_bytes", "KV bytes on the GPU", "memory_vs_stream.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for policy in ("livevlm", "sliding_window", "rekv", "full"):
            pts = [(r["frames"], r[key]) for r in rows if r["policy"] == policy]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=policy)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("stream length (frames)")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)


def summary(results):
    r = results
    hw_tflops, hw_gbs = r.get("matmul_tflops"), r.get("copy_gbs")
    lines = ["", "==== summary (ratios measured in this run) ===="]
    ing = r.get("ingest", {})
    for k, v in ing.items():
        if "achieved_tflops" in v:
            frac = f", {v['achieved_tflops'] / hw_tflops:.1%} of the measured bf16 matmul rate" if hw_tflops else ""
            floor = v["flops_per_frame"]["total"] / (hw_tflops * 1e12) * 1e3 if hw_tflops else float("nan")
            lines.append(f"ingest {k}: {v['ms_per_frame']:.1f} ms/frame; compute floor {floor:.1f} ms{frac}")
    if "sliding_window_clip1" in ing and "clip1" in ing:
        lines.append(f"VSB overhead: {ing['clip1']['ms_per_frame'] / ing['sliding_window_clip1']['ms_per_frame']:.2f}x "
                     "the ingest time of the same stream without scoring")
    hf = r.get("hf_baseline")
    if hf and "clip1" in ing:
        lines.append(f"ingest vs plain transformers (1 frame/call, at {hf['frames']} frames): "
                     f"{hf['ms_per_frame_last10'] / ing['clip1']['ms_per_frame']:.1f}x faster per frame")
    rows = {(x["policy"], x["frames"]): x for x in r.get("response", [])}
    for frames in sorted({x["frames"] for x in r.get("response", [])}):
        lv, fu = rows.get(("livevlm", frames)), rows.get(("full", frames))
        if lv and "ttft_ms" in lv:
            s = f"{frames:>6} frames: LiveVLM TTFT {lv['ttft_ms']:.1f} ms, answer {lv['answer_ms']:.0f} ms"
            for p in ("full", "rekv", "sliding_window"):
                o = rows.get((p, frames))
                if o and "ttft_ms" in o:
                    s += f" | {p} {o['ttft_ms']:.1f} ms ({o['ttft_ms'] / lv['ttft_ms']:.1f}x)"
                elif o:
                    s += f" | {p} failed ({'OOM' if 'oom' in o or 'memory' in o.get('error', '') else 'error'})"
            lines.append(s)
        if lv and "decode_tps" in lv and frames == max(x["frames"] for x in r["response"]):
            gbs = hw_gbs or float("nan")
            lines.append(f"decode: {lv['decode_tps']:.1f} tok/s; weight-bandwidth limit {gbs * 1e9 / r['lm_weight_bytes']:.0f} "
                         f"tok/s ({r['lm_weight_bytes'] / 1e9:.1f} GB of LM weights at {gbs:.0f} GB/s)")
    hs = r.get("hf_static_compiled")
    if hs:
        lv = rows.get(("livevlm", hs["frames"]))
        for name, row in hs["rows"].items():
            ratio = f" ({row['ttft_ms'] / lv['ttft_ms']:.2f}x LiveVLM's TTFT)" if lv and "ttft_ms" in lv else ""
            lines.append(f"transformers StaticCache + torch.compile, {name}, {hs['frames']} frames: TTFT "
                         f"{row['ttft_ms']:.1f} ms, decode {row['decode_tps']:.0f} tok/s{ratio}")
    cap, lr = r.get("capacity"), r.get("long_run")
    if cap:
        lines.append(f"capacity: full cache held and answered {cap['full_cache_frames_measured']} frames on this GPU "
                     f"(KV alone would fit {cap['full_cache_frames_estimate']})")
    if lr:
        c = lr["checkpoints"]
        ratio = f" = {lr['frames'] / cap['full_cache_frames_measured']:.0f}x full cache" if cap and cap["full_cache_frames_measured"] else ""
        lines.append(f"LiveVLM long run: {lr['frames']} frames{ratio}; GPU allocated {c[0]['gpu_allocated'] / 1e9:.2f} GB "
                     f"after {c[0]['frames']} frames, {c[-1]['gpu_allocated'] / 1e9:.2f} GB after {c[-1]['frames']}; "
                     f"TTFT {lr['ttft_ms']:.1f} ms")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--shape", default="7b", choices=list(SHAPES))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: checks the script runs")
    ap.add_argument("--lengths", default="256,1024,3600,14400")
    ap.add_argument("--capacity-start", type=int, default=1024, help="first full-cache length tried")
    ap.add_argument("--long-frames", type=int, default=600_000, help="frames of the LiveVLM long run")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: "
                    "ingest,hf,response,hf_static,decode,capacity,long_run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    shape = "tiny" if args.tiny else args.shape
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    skip = set(filter(None, args.skip.split(",")))
    results = run_header(device, shape=shape)
    log(json.dumps(results))
    results["matmul_tflops"], results["copy_gbs"] = bench_matmul_and_copy(device)
    log(f"measured: bf16 matmul {results['matmul_tflops']} TFLOP/s, copy {results['copy_gbs']} GB/s")
    t0 = time.time()
    adapter = build_adapter(shape, device, dtype)
    log(f"model built in {time.time() - t0:.0f} s; tokens/frame {adapter.tokens_per_frame}; "
        f"KV {adapter.kv.bytes_per_token() * adapter.tokens_per_frame / 1e6:.2f} MB/frame")
    results["lm_weight_bytes"] = lm_weight_bytes(adapter)
    budget = 12288 if not args.tiny else 34 + 2 * adapter.tokens_per_frame + 256
    results["budget_tokens"] = budget
    lengths = [int(x) for x in args.lengths.split(",")] if not args.tiny else [16, 64]
    n = 8 if args.tiny else 48
    stamp = time.time()

    def part(name, fn, *a):
        if name in skip:
            return
        t = time.time()
        try:
            fn(*a)
        except Exception as err:       # noqa: BLE001 - keep the other parts' numbers
            results.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"[:400]
            log(f"!! {name} failed: {err}\n{traceback.format_exc()}")
        log(f"-- {name} took {time.time() - t:.0f} s")
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    part("ingest", lambda: (check_attention_paths(adapter, results), bench_ingest(adapter, results, n, [1, 8]),
                            bench_ingest_vsb_off(adapter, results, n),
                            check_ingest_replay(adapter, results, 1, 80 if not args.tiny else 40)))
    part("hf", bench_hf_baseline, adapter, results, n * 2)
    part("response", bench_response, adapter, results, lengths, budget)
    part("hf_static", bench_hf_static_compiled, adapter, results, lengths[0], 16, not args.tiny)
    part("decode", bench_decode_paths, adapter, results, lengths[-1], budget)      # last: it runs the profiler
    part("capacity", bench_capacity, adapter, results,
         *((args.capacity_start, 512, 12288) if not args.tiny else (64, 64, 256)))
    part("long_run", bench_long_run, adapter, results, budget, args.long_frames if not args.tiny else 4096)
    results["wall_s"] = time.time() - stamp
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if "response" in results:
        plots(results, args.out)
    log(summary(results))


if __name__ == "__main__":
    main()
