"""The 8-bit answer arena on a GPU (issue 22; CI has none): its Triton kernels against the torch
they replace, and a graph-replayed engine across an arena regrown by an answer the graphs did not
record. Prints one line per check and exits 1 if one fails.

    PYTHONPATH=. python benchmarks/arena_on_device.py

1. cuda/kernels/quantize_rows.py stores 65,537 rows (more row blocks than a grid's second axis
   holds) exactly as memory/kv_quant.quantize_rows computes them, ties included;
2. decode_attention.py over those int8 slots equals torch over them dequantized, bf16 and fp16;
3. a tiny engine replaying question graphs (launch: graph) answers the same before and after a
   time-window answer (run kernel by kernel) regrows the arena: graphs recorded on the old arena
   must not replay (cuda/question_step.py), for a bf16 and an 8-bit arena.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from livevlm_ros.engine import EngineConfig, LiveVLMEngine  # noqa: E402
from livevlm_ros.engine.cuda.kernels import decode_attention, quantize_rows  # noqa: E402
from livevlm_ros.engine.memory import kv_quant  # noqa: E402
from livevlm_ros.tools.make_tiny_model import build  # noqa: E402

failed = []


def check(name: str, ok: bool, detail: str = ""):
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        failed.append(name)


def kernels(dtype: torch.dtype):
    name = str(dtype).split(".")[1]
    H, Hq, D, n = 4, 28, 128, 65537
    k = torch.randn(H, n, D, device="cuda")
    k[:, :, :4] *= 10                                        # outlier channels
    k, v = k.to(dtype), torch.randn(H, n, D, device="cuda").to(dtype)
    channel = kv_quant.rotated_channel_factors(kv_quant.channel_factors(k[None, :, :1000])[0])
    k8 = torch.zeros(H, n + 64, D, dtype=torch.int8, device="cuda")
    v8 = torch.zeros_like(k8)
    ks, vs = torch.zeros(H, n + 64, device="cuda"), torch.zeros(H, n + 64, device="cuda")
    quantize_rows.store(k, v, k8, v8, ks, vs, channel, 0)
    for got, x, factors, what in ((k8, k, channel, "keys"), (v8, v, None, "values")):
        ref = kv_quant.quantize_rows(x, factors)[0]
        off = (got[:, :n].int() - ref.int()).abs()
        check(f"quantize_rows.store, {n} rows of {what}, {name}", int(off.max()) == 0,
              f"({int((off > 0).sum())} of {off.numel()} values a step off)")
    ties = torch.tensor([[[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 127.0] * 16]], device="cuda")
    t8, ts = torch.zeros(1, 4, 128, dtype=torch.int8, device="cuda"), torch.zeros(1, 4, device="cuda")
    quantize_rows.store(ties, ties, t8, t8.clone(), ts, ts.clone(), torch.ones(1, 128, device="cuda"), 0,
                        at=torch.tensor([2], device="cuda"))
    check(f"quantize_rows.store, ties rounded as torch, at a slot read on the device, {name}",
          torch.equal(t8[0, 2], kv_quant.quantize_rows(ties)[0][0, 0]))
    q = torch.randn(1, Hq, 1, D, device="cuda").to(dtype)
    got = decode_attention.decode_attention(q, k8[None], v8[None], torch.tensor([n - 1], device="cuda"), D ** -0.5,
                                            (ks[None], vs[None], channel[None]))
    kd = kv_quant.dequantize_rows(k8[:, :n], ks[:, :n], torch.float32, channel)
    vd = kv_quant.dequantize_rows(v8[:, :n], vs[:, :n], torch.float32)
    ref = ((q.float().reshape(H, Hq // H, D) @ kd.transpose(1, 2) * D ** -0.5).softmax(-1) @ vd).reshape(1, 1, Hq, D)
    err = float((got.float() - ref).abs().max())
    check(f"decode_attention over {n} int8 slots, {name}", got is not None and err < 2e-2, f"({err:.2g})")


def regrown_arena(path: str, kv_dtype: str):
    rng = np.random.default_rng(1234)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(16)]
    engine = LiveVLMEngine(EngineConfig(model_path=path, device="cuda", dtype="bfloat16", sample_fps=0,
                                        launch="graph", kv_dtype=kv_dtype, budget_tokens=34 + 2 * 16 + 64,
                                        page_tokens=4, retrieval_ratio=0.5, max_new_tokens=8))
    for i, f in enumerate(frames):
        engine.ingest(f, float(i))
    question = "Where is the red toolbox?"
    before = [engine.ask(question).token_ids for _ in range(3)]        # the third replays a graph
    generation = engine.hook.arena.generation
    engine.ask("Is the door open?", max_new_tokens=2000, window=(0.0, 15.0))   # kernel by kernel; grows it
    after = [engine.ask(question).token_ids for _ in range(2)]
    grew = engine.hook.arena.generation != generation
    check(f"answers after the arena was regrown by a windowed answer, {kv_dtype} arena",
          grew and after == before[1:], f"(regrown: {grew}; {before} then {after})")


def main():
    if not torch.cuda.is_available():
        sys.exit("arena_on_device.py checks CUDA kernels: no CUDA device here")
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        kernels(dtype)
    path = str(build(Path(tempfile.mkdtemp()) / "tiny", seed=0))
    for kv_dtype in ("bf16", "int8"):
        regrown_arena(path, kv_dtype)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
