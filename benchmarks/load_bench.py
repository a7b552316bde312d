"""Host memory that loading takes: an ordinary bf16 checkpoint quantized while it loads (from_pretrained,
then quantize.place) against the same checkpoint saved pre-quantized (models/prequantized.py). A
Jetson's CPU and GPU share one memory, so the host's peak is what decides whether 7B loads in 16 GB.
Each load runs in its own process; its peak resident memory (VmHWM) is reported.

    python3 benchmarks/load_bench.py --shape 1.5b --weights int4 --out results/cpu_load.json      # CPU, ~5 min

A random Qwen2 causal LM at the shape (Qwen2-1.5B: 1.5 B parameters, 3.1 GB at bf16; 7B needs more
host memory than this machine's 24 GB leaves) is saved with save_pretrained, then pre-quantized.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # hidden, layers, intermediate, heads, kv heads, vocabulary
    "0.5b": (896, 24, 4864, 14, 2, 151936),
    "1.5b": (1536, 28, 8960, 12, 2, 151936),
}


def build_model(path: str, shape: str):
    """A random Qwen2 causal LM at `shape`, bf16, with the tiny model's BPE tokenizer, saved to `path`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from livevlm_ros.tools.make_tiny_model import build_tokenizer

    hidden, layers, inter, heads, kv, vocab = SHAPES[shape]
    config = Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         tie_word_embeddings=shape == "0.5b")
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)


def child(path: str, weights: str) -> dict:
    """One load in this process: the adapter as the node would load it, on the CPU."""
    import torch

    from livevlm_ros.engine.models import load_adapter
    start = time.perf_counter()
    adapter = load_adapter(path, "cpu", "bfloat16", weights=weights)
    seconds = time.perf_counter() - start
    int4 = sum(1 for m in adapter.model.modules() if type(m).__name__ == "Int4Linear")
    after_load = peak_resident_bytes()
    # tensors read from a file may still be pages on disk (memory-mapped): read every byte once, as
    # the first answer would, and measure again
    for t in adapter.model.state_dict().values():
        for part in ((t.qdata, t.scale) if hasattr(t, "qdata") else (t,)):
            part.contiguous().view(torch.uint8).max()          # touches every byte, allocates nothing
    return dict(seconds=seconds, peak_rss_gb=after_load / 1e9, peak_rss_after_reading_gb=peak_resident_bytes() / 1e9,
                int4_linears=int4)


def peak_resident_bytes() -> int:
    """This process's peak resident memory (VmHWM: its own; ru_maxrss would carry the parent's peak
    across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1.5b", choices=sorted(SHAPES))
    ap.add_argument("--weights", default="int4", choices=("int4", "int8"))
    ap.add_argument("--out", type=Path, default=Path("results/cpu_load.json"))
    ap.add_argument("--child", nargs=2, metavar=("PATH", "WEIGHTS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    from gpu_bench import run_header
    from livevlm_ros.engine.models import prequantized

    results = run_header("cpu", shape=args.shape, weights=args.weights)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "bf16", Path(tmp) / args.weights
        _build_in_child(src, args.shape)
        results["checkpoint_gb"] = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1e9
        start = time.perf_counter()
        prequantized.save(src, dst, args.weights, dtype="bfloat16")
        results["save_seconds"] = time.perf_counter() - start
        results["prequantized_gb"] = sum(f.stat().st_size for f in dst.glob("*.safetensors")) / 1e9
        for name, path in (("ordinary", src), ("prequantized", dst)):
            out = subprocess.run([sys.executable, __file__, "--child", str(path), args.weights],
                                 capture_output=True, text=True, check=True)
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
            print(name, results[name], flush=True)
    print(json.dumps(results, indent=1))
    if str(args.out) != "-":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


def _build_in_child(path: Path, shape: str):
    """The random checkpoint, built and saved in a process of its own (its memory is gone after)."""
    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'benchmarks')!r}]; "
            f"from load_bench import build_model; build_model({str(path)!r}, {shape!r})")
    subprocess.run([sys.executable, "-c", code], check=True)


if __name__ == "__main__":
    main()
