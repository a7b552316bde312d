"""What CUDA holds on the device beyond torch's allocator, step by step (issue 22: 7B int4 in 7 GB
counts the whole process, and 0.82 GB of it lies outside what torch reserves).

Each step runs one kind of work for the first time in a fresh process and records how much more the
device says is used than torch has reserved: the bare context, a cuBLAS product, a cuDNN
convolution (the vision tower's patch embedding is one), a Triton kernel, a CUDA graph's capture and
replay.

    python benchmarks/cuda_overhead.py --out DIR        (CUDA only; writes DIR/cuda_overhead.json)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def outside_torch() -> int:
    torch.cuda.synchronize()
    free_b, total = torch.cuda.mem_get_info()
    return total - free_b - torch.cuda.memory_reserved()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("cuda_overhead.py measures CUDA memory: no CUDA device here")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []

    def step(name):
        rows.append((name, outside_torch()))
        grew = rows[-1][1] - (rows[-2][1] if len(rows) > 1 else 0)
        print(f"{name:48s} outside torch {rows[-1][1] / 1e6:8.1f} MB  (+{grew / 1e6:.1f})", flush=True)

    x = torch.zeros(1, device="cuda")
    step("context (one tensor)")
    a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    a @ a
    step("cuBLAS bf16 product")
    torch.nn.functional.linear(a[:1], a, a[0])
    step("cuBLASLt bf16 product with bias")
    conv = torch.nn.Conv2d(3, 1152, 14, stride=14).cuda().bfloat16()
    conv(torch.randn(8, 3, 384, 384, device="cuda", dtype=torch.bfloat16))
    step("cuDNN convolution (SigLIP's patch embedding)")
    torch.nn.functional.scaled_dot_product_attention(*[torch.randn(1, 16, 729, 72, device="cuda",
                                                                   dtype=torch.bfloat16)] * 3)
    step("SDPA (flash)")
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from livevlm_ros.engine.cuda.kernels.decode_attention import decode_attention
        q = torch.randn(1, 28, 1, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 4, 4096, 128, device="cuda", dtype=torch.bfloat16)
        decode_attention(q, k, k, None, 0.1)
        step("Triton kernels (decode attention)")
    except Exception as e:          # noqa: BLE001 - a missing Triton is a row, not a failure
        print("Triton:", e)
    g = torch.cuda.CUDAGraph()
    static = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            static @ a
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        for _ in range(100):
            static = static @ a
    g.replay()
    step("a CUDA graph of 100 products, captured and replayed")
    del x
    (args.out / "cuda_overhead.json").write_text(json.dumps(
        dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    main()
