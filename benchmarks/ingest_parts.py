"""Ingest's kernel-bound parts at 7B shapes, each alone (issue 13's leads, measured before changing
anything): the MLP's weight products at a clip's row counts (196 rows a frame), the projector's 2x2
bilinear pooling, and the block sizes of the scoring kernels (engine/cuda/kernels/attention_received.py).

    python3 benchmarks/ingest_parts.py --out results/ingest_parts.json       # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing as tt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from livevlm_ros.engine.cuda.kernels import attention_received as kernels  # noqa: E402
from livevlm_ros.engine.hook import received  # noqa: E402


def us(fn) -> float:
    return tt.do_bench(fn, warmup=50, rep=200, return_mode="median") * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    out = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), gpu=torch.cuda.get_device_name(),
               torch=torch.__version__)
    hidden, inter = 3584, 18944
    up, down = torch.randn(inter, hidden, device=dev, dtype=dt), torch.randn(hidden, inter, device=dev, dtype=dt)
    floor = up.numel() * 2 / 3.0e12 * 1e6                      # reading one weight at 3 TB/s, us
    mlp = {}
    for m in (196, 200, 208, 224, 256, 392, 1568):
        x, y = torch.randn(m, hidden, device=dev, dtype=dt), torch.randn(m, inter, device=dev, dtype=dt)
        mlp[m] = dict(up_us=us(lambda: F.linear(x, up)), down_us=us(lambda: F.linear(y, down)))
        print("mlp rows", m, json.dumps({k: round(v, 1) for k, v in mlp[m].items()}), flush=True)
    out["mlp"] = dict(weight_read_floor_us=floor, rows=mlp)
    feats = torch.randn(8, hidden, 27, 27, device=dev, dtype=dt)             # 8 frames after the projector
    pool = dict(bf16_us=us(lambda: F.interpolate(feats, size=[14, 14], mode="bilinear")),
                float32_us=us(lambda: F.interpolate(feats.float(), size=[14, 14], mode="bilinear").to(dt)),
                channels_last_us=us(lambda: F.interpolate(feats.contiguous(memory_format=torch.channels_last),
                                                          size=[14, 14], mode="bilinear")))
    ref = F.interpolate(feats.float(), size=[14, 14], mode="bilinear")
    pool["channels_last_max_diff"] = float((F.interpolate(feats.contiguous(memory_format=torch.channels_last),
                                                          size=[14, 14], mode="bilinear").float() - ref).abs().max())
    out["pooling_8_frames"] = pool
    print("pooling", json.dumps({k: round(v, 4) for k, v in pool.items()}), flush=True)
    q = (torch.randn(4, 7 * 196, 128, device=dev) * 128 ** -0.5).to(dt)
    keys = torch.randn(4, 12288 + 196, 128, device=dev, dtype=dt)
    written = received._written_out(q, keys, 196, None)
    blocks = []
    for br, bn, kps in ((64, 64, 2048), (64, 128, 2048), (128, 64, 2048), (128, 128, 2048), (32, 64, 2048),
                        (64, 64, 1024), (64, 64, 4096)):
        kernels._BR, kernels._BN, kernels._KEYS_PER_SPLIT = br, bn, kps
        got = received.attention_received(q, keys, 196)
        blocks.append(dict(BR=br, BN=bn, keys_per_split=kps, us=us(lambda: received.attention_received(q, keys, 196)),
                           max_rel_diff=float((got - written).abs().max() / written.abs().max())))
        print("scoring", json.dumps(blocks[-1]), flush=True)
    out["scoring"] = dict(written_out_us=us(lambda: received._written_out(q, keys, 196, None)), blocks=blocks)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
