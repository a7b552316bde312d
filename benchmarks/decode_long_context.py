"""One answer token's attention over very long contexts, against torch (the full-cache baseline
reads every frame it ever saw: 3,072 frames of 196 tokens are 602k keys).

    python3 benchmarks/decode_long_context.py --out results/decode_long.json     # on the GPU machine
    python3 benchmarks/decode_long_context.py --tree .bench/trees/before ...      # an older tree

For each context length: the kernel's output against float32 torch (max |diff|), or the error it
raised, and its time (median of triton.testing.do_bench) against the bytes it must read (keys and
values once) at the copy rate measured in the same run. 7B shapes: 28 query heads, 4 kv heads, 128.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def load_kernel(tree: Path):
    sys.path.insert(0, str(tree))
    try:
        from livevlm_ros.engine.cuda.kernels.decode_attention import decode_attention
    except ImportError:                                   # before the engine was laid out in layers
        from livevlm_ros.engine.decode_attention import decode_attention
    return decode_attention


def copy_rate_gbs() -> float:
    import triton.testing as tt
    x = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = tt.do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() / ms / 1e6                       # bytes read + written


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--lengths", default="65536,524288,524352,602112,1048576")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import triton.testing as tt

    decode_attention = load_kernel(args.tree)
    hq, hkv, D, dt = 28, 4, 128, torch.bfloat16
    rows, gbs = [], copy_rate_gbs()
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in [int(x) for x in args.lengths.split(",")]:
        q = torch.randn(1, hq, 1, D, device="cuda", dtype=dt, generator=g)
        k, v = (torch.randn(1, hkv, n, D, device="cuda", dtype=dt, generator=g) for _ in range(2))
        row = dict(keys=n, read_bytes=2 * k.numel() * k.element_size())
        try:
            out = decode_attention(q, k, v, None, D ** -0.5)
            torch.cuda.synchronize()
            logits = (q[0].float().reshape(hkv, hq // hkv, D) @ k[0].float().transpose(1, 2)) * D ** -0.5
            ref = (logits.softmax(-1) @ v[0].float()).reshape(1, 1, hq, D)
            row["max_abs_diff"] = float((out.float() - ref).abs().max())
            row["us"] = tt.do_bench(lambda: decode_attention(q, k, v, None, D ** -0.5), return_mode="median") * 1e3
            row["floor_us"] = row["read_bytes"] / (gbs * 1e3)
        except Exception as err:                            # noqa: BLE001 - the error is the finding
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    args.out.write_text(json.dumps(dict(tree=str(args.tree), copy_gbs=gbs, gpu=torch.cuda.get_device_name(),
                                        rows=rows), indent=1))


if __name__ == "__main__":
    main()
