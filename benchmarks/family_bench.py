"""LLaVA-OneVision, Qwen2.5-VL and Qwen3-VL side by side on one GPU, in one run.

    python3 benchmarks/family_bench.py --out results/            # on the GPU machine (~5 min)
    python3 benchmarks/family_bench.py --tiny --out /tmp/fb       # smoke test of the script on a CPU

Random weights at each family's real shapes (the checkpoints' config.json values), bf16, the
LiveVLM policy with a 12,288-token memory and 8-frame clips. Per model: tokens and KV bytes per
frame at the default frame size, ingest per frame (frames through the vision tower and the
prefill, memory full), time to first token and decode tokens/s against a full memory, device
memory after 1,000 and after 3,600 frames (flat = bounded), and, for the Qwen families, that the
answers and memory from the replayed steps equal those of the same steps run kernel by kernel. Ratios against
LLaVA-OneVision-7B of the same run are printed last. gpu_bench.py keeps the LLaVA-only parts
(transformers baselines, capacity, kernels); this file is where families are compared.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_bench import (bench_matmul_and_copy, check_ingest_replay, free, gpu_mem, log, run_header,  # noqa: E402
                       random_frames, reset_peak, simulate_fill, sync, time_answer)
from gpu_bench import build_adapter as build_llava  # noqa: E402
from livevlm_ros.engine import EngineConfig, LiveVLMEngine  # noqa: E402
from livevlm_ros.engine.cuda.kernels.fused_layers import FusedLayers  # noqa: E402
from livevlm_ros.engine.models.qwen_vl import Qwen2_5_VLAdapter, Qwen3VLAdapter  # noqa: E402
from livevlm_ros.tools.make_tiny_qwen import build_tokenizer  # noqa: E402

QWEN25_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                     spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                     fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
QWEN3_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh")
SHAPES = {
    "qwen2.5-vl-7b": ("qwen2_5_vl", QWEN25_VISION,
                      dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                           num_key_value_heads=4, vocab_size=152064, rope_theta=1e6, mrope_section=[16, 24, 24])),
    "qwen2.5-vl-3b": ("qwen2_5_vl", QWEN25_VISION,
                      dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                           num_key_value_heads=2, vocab_size=151936, rope_theta=1e6, mrope_section=[16, 24, 24])),
    "qwen3-vl-8b": ("qwen3_vl", QWEN3_VISION,
                    dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=5e6,
                         mrope_section=[24, 20, 20])),
    "qwen3-vl-4b": ("qwen3_vl", dict(QWEN3_VISION, depth=24, hidden_size=1024, intermediate_size=4096,
                                     deepstack_visual_indexes=[5, 11, 17]),
                    dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=5e6,
                         mrope_section=[24, 20, 20])),
    "tiny-qwen2.5": ("qwen2_5_vl", dict(QWEN25_VISION, depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                        window_size=56, fullatt_block_indexes=[1]),
                     dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=600, rope_theta=1e4, mrope_section=[2, 3, 3])),
    "tiny-qwen3": ("qwen3_vl", dict(QWEN3_VISION, depth=3, hidden_size=32, intermediate_size=64, num_heads=2,
                                    num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
                   dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=600, rope_theta=1e4, mrope_section=[2, 3, 3])),
}
FULL = ["llava-ov-7b", "qwen2.5-vl-7b", "qwen3-vl-8b", "qwen2.5-vl-3b", "qwen3-vl-4b"]
TINY = ["llava-tiny", "tiny-qwen2.5", "tiny-qwen3"]


def build(name: str, device: str, dtype: torch.dtype, frame_pixels: int = 0):
    if name.startswith("llava"):
        return build_llava("7b" if name == "llava-ov-7b" else "tiny", device, dtype)
    import transformers

    family, vision, text = SHAPES[name]
    text = dict(text)
    section = text.pop("mrope_section")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta"), "mrope_section": section,
                               **({"mrope_interleaved": True} if family == "qwen3_vl" else {})}
    text.update(max_position_embeddings=128_000, tie_word_embeddings=False)
    tok = build_tokenizer()
    ids = {n: tok.convert_tokens_to_ids(f"<|{n}|>") for n in ("image_pad", "video_pad", "vision_start", "vision_end")}
    if family == "qwen2_5_vl":
        Config, Model, Adapter = (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration,
                                  Qwen2_5_VLAdapter)
    else:
        Config, Model, Adapter = (transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration,
                                  Qwen3VLAdapter)
    cfg = Config(text_config=text, vision_config=dict(vision, out_hidden_size=text["hidden_size"]),
                 image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                 vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = Model(cfg)
    torch.set_default_dtype(old)
    for c in (model.config.text_config, model.config.vision_config):
        c._attn_implementation = "sdpa"
    return Adapter(model.eval(), tok, {}, frame_pixels, sample_fps=1.0)


def make_engine(adapter, budget: int, launch: str = "auto", **kw) -> LiveVLMEngine:
    cfg = EngineConfig(policy="livevlm", budget_tokens=budget, sample_fps=0, device=str(adapter.kv.device),
                       dtype="bfloat16", max_new_tokens=32, frames_per_clip=8, launch=launch, **kw)
    return LiveVLMEngine(cfg, adapter=adapter)


def measure(name: str, adapter, budget: int, frames_n: int, long_frames: int) -> dict:
    T = adapter.tokens_per_frame
    kv = adapter.kv
    out = dict(tokens_per_frame=T, frame_size=list(adapter.frame_size), kv_bytes_per_token=kv.bytes_per_token(),
               kv_mb_per_frame=kv.bytes_per_token() * T / 1e6, layers=kv.layers, kv_heads=kv.kv_heads,
               head_dim=kv.head_dim, text_after_time=getattr(adapter, "text_after_time", None),
               lm_weight_bytes=sum(p.numel() * p.element_size() for p in adapter._lm.parameters()))
    frames = random_frames(16)
    engine = make_engine(adapter, budget)
    out["launch"] = dict(ingest=engine.ingest_step is not None, question=engine.question_step is not None,
                         decode=engine.decode_step is not None)
    # ingest: fill memory with real frames, then time more of them
    i = 0
    while engine.memory.total_tokens() < budget - 2 * T * engine.config.frames_per_clip or i < 3 * 8:
        engine.ingest(frames[i % 16], float(i))
        i += 1
    # clips replay from a graph recorded the second time their shape comes on a settled memory:
    # record it before timing (at most 10 clips more)
    step = engine.ingest_step.recorded if engine.ingest_step else None
    extra = 0
    while step is not None and step.capture and step.captures == 0 and extra < 80:
        engine.ingest(frames[i % 16], float(i))
        i, extra = i + 1, extra + 1
    engine.flush()
    sync()
    t0 = time.perf_counter()
    for j in range(i, i + frames_n):
        engine.ingest(frames[j % 16], float(j))
    engine.flush()
    sync()
    out["ingest_ms_per_frame"] = (time.perf_counter() - t0) / frames_n * 1e3
    out["memory_tokens"] = engine.memory.total_tokens()
    out["clip_replays_timed"] = step.replays if step else 0
    ttft, total, tps, _ = time_answer(engine, repeats=3, max_new_tokens=32)
    out.update(ttft_ms=ttft * 1e3, decode_tok_s=tps)
    log(f"{name}: {T} tokens/frame, KV {out['kv_mb_per_frame']:.2f} MB/frame, ingest {out['ingest_ms_per_frame']:.1f} "
        f"ms/frame, TTFT {ttft * 1e3:.1f} ms, decode {tps:.1f} tok/s, memory {out['memory_tokens']} tokens")
    # bounded: device memory after a long stream (simulated KV through the same commit path)
    n0 = engine.memory.frames_ingested
    simulate_fill(engine, 1000 - n0 if n0 < 1000 else 8)
    sync()
    reset_peak()
    out["device_bytes_after_1000_frames"] = gpu_mem()[0]
    simulate_fill(engine, long_frames - 1000)
    sync()
    out["device_bytes_after_long"] = gpu_mem()[0]
    out["long_frames"] = engine.memory.frames_ingested
    ttft_long, _, tps_long, _ = time_answer(engine, repeats=3, max_new_tokens=32)
    out.update(ttft_ms_long=ttft_long * 1e3, decode_tok_s_long=tps_long)
    log(f"{name}: device memory {out['device_bytes_after_1000_frames'] / 1e9:.2f} GB after 1,000 frames, "
        f"{out['device_bytes_after_long'] / 1e9:.2f} GB after {out['long_frames']}; TTFT {ttft_long * 1e3:.1f} ms")
    # the replayed steps against the same fixed-shape steps run kernel by kernel ('static'), same
    # memory: equal tokens. (Against 'eager', other attention shapes round bf16 differently.)
    if adapter.positions.by_token:
        q = "Is the door on the left open?"
        graph = [engine.ask(q, max_new_tokens=16).token_ids for _ in range(3)][-1]     # recorded, replayed
        step = engine.question_step and engine.question_step.recorded
        replays, error = (step.replays, step.capture_error) if step else (0, None)
        first = engine.ask(q, max_new_tokens=1, return_logits=True).first_logits
        engine.reconfigure(launch="static")
        static = engine.ask(q, max_new_tokens=16).token_ids
        # and against the ordinary path (other attention shapes, transformers' own norms and MLPs
        # instead of the fused kernels): equal within bf16 rounding, not bit for bit
        engine.reconfigure(launch="eager")
        fused, plain = adapter._fused_layers, FusedLayers.__new__(FusedLayers)
        plain._swaps = []                              # transformers' own RMSNorm, MLP and RoPE
        adapter._fused_layers = plain
        try:
            eager = engine.ask(q, max_new_tokens=1, return_logits=True).first_logits
        finally:
            adapter._fused_layers = fused
        out.update(graph_vs_eager_max_abs_logit_diff=float((first - eager).abs().max()),
                   graph_vs_eager_logit_scale=float(eager.abs().max()),
                   graph_vs_eager_same_first_token=int(first.argmax()) == int(eager.argmax()))
        log(f"{name}: first-token logits, graph vs eager: max |diff| {out['graph_vs_eager_max_abs_logit_diff']:.4f} "
            f"(logits up to {out['graph_vs_eager_logit_scale']:.2f}), same token: {out['graph_vs_eager_same_first_token']}")
        out.update(graph_equals_static=graph == static, graph_tokens=graph, static_tokens=static,
                   question_replays=replays, question_capture_error=error)
        log(f"{name}: graph replay tokens == static tokens: {graph == static} ({replays} question replays)")
    free(engine)
    if adapter.positions.by_token:
        # clips whose prefill replays (the tower eager) leave the memory the same steps run kernel by
        # kernel leave, bit for bit, over a stream that fills memory
        checks = {}
        check_ingest_replay(adapter, checks, 8, 160 if T > 100 else 48)
        out["ingest_replay_check"] = checks["ingest"]["replay_check_clip8"]
    return out


def summary(results: dict) -> str:
    rows = results["models"]
    base = rows.get("llava-ov-7b") or rows.get("llava-tiny")
    lines = ["model            tok/frame  KV MB/frame  ingest ms/frame  TTFT ms  decode tok/s  TTFT/base  decode/base"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"{name:16s} failed: {r['error'][:80]}")
            continue
        tx = r["ttft_ms"] / base["ttft_ms"] if base and "ttft_ms" in base else float("nan")
        dx = r["decode_tok_s"] / base["decode_tok_s"] if base and "decode_tok_s" in base else float("nan")
        lines.append(f"{name:16s} {r['tokens_per_frame']:9d}  {r['kv_mb_per_frame']:11.3f}  "
                     f"{r['ingest_ms_per_frame']:15.1f}  {r['ttft_ms']:7.1f}  {r['decode_tok_s']:12.1f}  "
                     f"{tx:9.2f}  {dx:11.2f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: checks the script runs")
    ap.add_argument("--models", default="", help="comma list (default: all full-size ones)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    results = run_header(device, models={})
    results["matmul_tflops"], results["copy_gbs"] = bench_matmul_and_copy(device)
    log(f"measured: bf16 matmul {results['matmul_tflops']} TFLOP/s, copy {results['copy_gbs']} GB/s")
    names = [m for m in args.models.split(",") if m] or (TINY if args.tiny else FULL)
    for name in names:
        t = time.time()
        try:
            adapter = build(name, device, dtype, frame_pixels=112 * 112 if args.tiny else 0)
            budget = 12288 if not args.tiny else 400
            results["models"][name] = measure(name, adapter, budget, 8 if args.tiny else 48,
                                              1200 if args.tiny else 3600)
        except Exception as err:      # noqa: BLE001 - keep the other models' numbers
            results["models"][name] = dict(error=f"{type(err).__name__}: {err}"[:400])
            log(f"!! {name} failed: {err}\n{traceback.format_exc()}")
        adapter = None
        free()
        log(f"-- {name} took {time.time() - t:.0f} s")
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    log(summary(results))
    (args.out / "summary.txt").write_text(summary(results) + "\n")


if __name__ == "__main__":
    main()
