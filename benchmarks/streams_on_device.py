"""Split products on two CUDA streams at once (quantized_linear's split-K counters): both streams run
7B's down projection (one row, split along K) 200 times each, interleaved, then the counters must
all be back at 0 and a product on the default stream must still match the dequantized reference.
With one set of counters for the device, two streams' splits counted into each other's bands and
left counts behind that spoilt every later product of those bands (seen in linear_bench, whose
timing helper starts on its own stream). --against FILE runs the same on another quantized_linear.py.

    python3 benchmarks/streams_on_device.py [--against old_quantized_linear.py]     # the GPU machine (~20 s)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from livevlm_ros.engine.cuda.kernels import quantized_linear as ql  # noqa: E402


def weights(bits: int, N=3584, K=18944):
    torch.manual_seed(0)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    if bits == 4:
        q, s, z = ql.pack_int4(w, 128)
        return (q, s, z, 128), ql.dequantize_int4(q, s, z, 128)
    scale = w.float().abs().amax(1) / 127
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return (q, scale.to(torch.bfloat16).reshape(1, -1), None, 0), q.float() * scale.to(torch.bfloat16).float()[:, None]


def run(module, name: str) -> bool:
    ok = True
    x = torch.randn(1, 18944, device="cuda", dtype=torch.bfloat16)
    for bits in (8, 4):
        (q, s, z, group), dense = weights(bits)
        ref = x.float() @ dense.t()
        streams = [torch.cuda.Stream(), torch.cuda.Stream()]
        for st in streams:
            st.wait_stream(torch.cuda.current_stream())
        for _ in range(200):
            for st in streams:
                with torch.cuda.stream(st):
                    module.product(x, q, s, z, group, None)
        for st in streams:
            torch.cuda.current_stream().wait_stream(st)
        torch.cuda.synchronize()
        left = max(int(c.abs().max()) for c in module._COUNTS.values())
        out = module.product(x, q, s, z, group, None)
        err = float((out.float() - ref).abs().max() / ref.abs().max())
        good = left == 0 and err < 1e-2
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} {name} int{bits}: counts left {left}, then a product's error {err:.1e}",
              flush=True)
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", type=Path, help="another quantized_linear.py, run the same way")
    args = ap.parse_args()
    ok = run(ql, "this")
    if args.against:
        from linear_bench import load_against
        run(load_against(args.against), "against")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
