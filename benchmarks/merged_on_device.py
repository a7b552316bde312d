"""merged_products on the GPU, at every weight precision: a Qwen2 attention layer at 7B shapes whose
query, key and value projections run as one product for a decoded token (QueryKeyValue, as
FusedLayers swaps them in), against the same layer's three Linears computed apart, and the gate and up
projections the same way. The CPU tests check the bf16/float32 merge inside transformers' decoder;
quantized merges exist only on CUDA, so they are checked here.

    python3 benchmarks/merged_on_device.py --out results/merged.json      # the GPU machine (~1 min)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from livevlm_ros.engine.cuda.kernels.fused_layers import own_product  # noqa: E402
from livevlm_ros.engine.cuda.kernels.merged_products import QueryKeyValue, merge  # noqa: E402
from livevlm_ros.engine.models import quantize  # noqa: E402


def linears(sizes, hidden, bias, weights):
    """Linears [hidden -> size] on CUDA in bf16, quantized to `weights` as the engine quantizes them."""
    torch.manual_seed(0)
    out = []
    for size in sizes:
        lin = torch.nn.Linear(hidden, size, bias=bias, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.normal_(0, 0.02)
            if bias:
                lin.bias.normal_(0, 0.02)
        if weights == "int8":
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
            quantize_(lin, Int8WeightOnlyConfig(set_inductor_config=False))
        elif weights == "int4":
            lin = quantize.Int4Linear(lin, quantize.int4_group(hidden))
        out.append(lin)
    return out


def check(weights: str, hidden=3584, q=3584, kv=512, inter=18944) -> dict:
    x = torch.randn(1, 1, hidden, device="cuda", dtype=torch.bfloat16)
    result = {}
    with torch.no_grad():
        attn = torch.nn.Module()
        attn.q_proj, attn.k_proj, attn.v_proj = linears((q, kv, kv), hidden, True, weights)
        apart = [own_product(m, x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        product = merge([attn.q_proj, attn.k_proj, attn.v_proj])
        for linear, forward in QueryKeyValue(attn, product, own_product).forwards():
            linear.forward = forward
        together = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
        views = [own_product(m, x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]    # each Linear alone, after
        result["qkv"] = compare(apart, together, views)
        gate, up = linears((inter, inter), hidden, False, weights)
        apart = [own_product(gate, x), own_product(up, x)]
        both = merge([gate, up])(x)
        result["gate_up"] = compare(apart, list(both.split(inter, -1)), [own_product(gate, x), own_product(up, x)])
    return result


def compare(apart, together, views) -> dict:
    """Relative max difference of the merged outputs and of each Linear after the merge (its view)."""
    def rel(a, b):
        return max(float((x.float() - y.float()).abs().max() / y.float().abs().max()) for x, y in zip(a, b))
    return dict(merged_vs_apart=rel(together, apart), views_vs_apart=rel(views, apart),
                shapes_equal=all(a.shape == b.shape for a, b in zip(apart, together)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/merged.json"))
    args = ap.parse_args()
    results = {w: check(w) for w in ("bf16", "int8", "int4")}
    for w, r in results.items():
        for name, c in r.items():
            ok = c["merged_vs_apart"] < 1e-2 and c["views_vs_apart"] < 1e-2 and c["shapes_equal"]
            print(f"{'ok  ' if ok else 'FAIL'} {w} {name}: merged vs apart {c['merged_vs_apart']:.1e}, "
                  f"each Linear after the merge vs before {c['views_vs_apart']:.1e}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
