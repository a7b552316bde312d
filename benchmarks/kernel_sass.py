"""The instructions of the one-row products' loops (quantized_linear._gemv_int4_kernel, _gemv_int8_kernel), counted
from its SASS, compiled for an H100/H200 (sm_90) on a machine without a GPU: Triton's compiler and
the ptxas and nvdisasm its wheel carries. One row reads each weight byte once, and its limits are the
SM's integer pipe (64 instructions a clock: LOP3, SHF, PRMT ...) and its issue rate (128 a clock),
against the 32 int4 values a clock per SM that the copy bandwidth brings (H200: 4.24 TB/s over 132
SMs at 1.98 GHz; int8: 16). So the count per weight value says how close the kernel can come:

    pip install "triton==3.6.*"        # into any venv; the CPU build of torch brings no Triton
    python benchmarks/kernel_sass.py [--bn 256 --gps 1 --warps 4] [--int8 --bw 64]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from livevlm_ros.engine.cuda.kernels import quantized_linear as ql  # noqa: E402

INTEGER_PIPE = {"LOP3", "SHF", "PRMT", "ISETP", "IADD3", "SEL", "LEA", "IABS", "P2R", "R2P", "BMSK", "POPC", "FLO",
                "VIADD", "IMNMX", "SGXT"}
FMA_PIPE = {"FFMA", "FMUL", "FADD", "IMAD", "HFMA2", "FMNMX"}
SIGNATURE = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*bf16", z_ptr="*bf16", out_ptr="*bf16", part_ptr="*fp32",
                 count_ptr="*i32", N="i32", words="i32", sw="i32", ss="i32", s_split="i32", split="i32",
                 b_ptr="*bf16")
INT8_SIGNATURE = {k: v for k, v in SIGNATURE.items() if k != "z_ptr"}
# what the JIT sees at 7B shapes: 16-byte aligned pointers, and sizes and strides that are multiples of 16
ALIGNED = ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "out_ptr", "part_ptr", "count_ptr", "N", "words", "sw", "ss")


def sass(fn, constexprs: dict, num_warps: int) -> str:
    names = fn.arg_names
    signature = dict(SIGNATURE if "z_ptr" in names else INT8_SIGNATURE, **{k: "constexpr" for k in constexprs})
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs={(names.index(a),): [["tt.divisibility", 16]] for a in ALIGNED if a in names})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=3))
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        text = subprocess.run([str(tools / "nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", cubin], capture_output=True,
                               text=True).stdout
    registers = re.search(r"REG:(\d+)", usage)
    return text, int(registers.group(1)) if registers else None


def blocks(text: str) -> list[tuple[str, list[str]]]:
    """(label, opcodes) of each basic block."""
    out, label, ops = [], "entry", []
    for line in text.splitlines():
        m = re.match(r"\s*\.(L_x_\d+):", line)
        if m:
            out.append((label, ops))
            label, ops = m.group(1), []
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]+)", line)
        if m:
            ops.append(m.group(1))
    out.append((label, ops))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bn", type=int, default=256)
    ap.add_argument("--gps", type=int, default=1)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--int8", action="store_true", help="the int8 kernel (BN outputs, BW words a step)")
    ap.add_argument("--bw", type=int, default=64)
    ap.add_argument("--prefetch", action="store_true", help="PREFETCH: the next step's words loaded first")
    args = ap.parse_args()
    if args.int8:
        kernel, constexprs = ql._gemv_int8_kernel, dict(BN=args.bn, BW=args.bw, SPLIT=False, EVEN=True, ASM=True,
                                                      PREFETCH=args.prefetch)
        values, rate = args.bn * args.bw * 4 / (args.warps * 32), 16.2     # weight values a thread takes a step
    else:
        kernel = ql._gemv_int4_kernel
        constexprs = dict(W=args.group // 8, BN=args.bn, GPS=args.gps, SPLIT=False, EVEN=True, ASM=True,
                          PREFETCH=args.prefetch)
        values, rate = args.bn * args.gps * args.group / (args.warps * 32), 32.4
    text, registers = sass(kernel, constexprs, args.warps)
    loop = max(blocks(text), key=lambda b: len(b[1]))[1]                 # the step's block is the largest
    mix = collections.Counter(loop)
    integer = sum(v for k, v in mix.items() if k in INTEGER_PIPE)
    fma = sum(v for k, v in mix.items() if k in FMA_PIPE)
    print(f"{kernel.fn.__name__} {constexprs} warps={args.warps}: {registers} registers, "
          f"{values:.0f} weight values a thread a step")
    print(f"  loop: {len(loop)} instructions, {len(loop) / values:.2f} a value "
          f"(integer pipe {integer / values:.2f}, FMA pipe {fma / values:.2f})")
    print(f"  at the copy bandwidth's {rate} values a clock per SM: issue {rate * len(loop) / values / 128:.0%} "
          f"of its 128 a clock, integer pipe {rate * integer / values / 64:.0%} of its 64")
    print("  mix:", ", ".join(f"{k} {v}" for k, v in mix.most_common(12)))


if __name__ == "__main__":
    main()
