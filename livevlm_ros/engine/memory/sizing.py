"""`gpu_memory_budget_gb`: memory sized by bytes, not tokens.

A robot's computer has a fixed number of bytes for the node; how many memory tokens fit depends on
the weights actually loaded (bf16, int8, int4), the bytes a token of KV takes at `kv_dtype`, and
what the engine allocates beside memory. The budget is split as

    budget = weights (measured: what is on the device once the model is loaded)
           + fixed working space (estimated from the shapes: below)
           + budget_tokens x bytes per memory token

and budget_tokens is the largest whole number that fits. Per memory token, every buffer that grows
with the budget is counted: the long-term tier (keys and values at kv_dtype, its scales, and the
per-layer bookkeeping: stream index int64, score and accumulated score float32, sink flag) holds
budget + one clip more (streaming_memory.py), the answer arena (hook/arena.py, at kv_dtype, and
8-bit with one layer's scratch at the model's dtype) holds what an answer reads: the configured
`retrieval_ratio` of it, plus 1/8 slack, and a clip's forward assembles one layer's
[prefix | memory | clip] keys and values at a time.
Raising `retrieval_ratio` at run time grows the arena beyond this sizing.

The working space is an estimate, not a measurement: one clip's forward (the activations of one
decoder layer at a time for its tokens, the vision tower on its frames), a question's logits, and
on CUDA what the device holds beyond what torch has allocated (CUDA_OVERHEAD_BYTES). That was
measured with 7B int4 weights (H100, 2026-12-07 08:38 UTC, precision_bench.py --placed and
memory_breakdown.py): the CUDA context 0.65 GB, kernels and cuBLAS's handles loaded later 0.17 GB
more, outside torch's allocator; and torch's cache, which held 0.27-0.55 GB beyond what was
allocated (the graph pools' working memory between replays, and blocks cut from segments in use).
With 0.6 GB for all of it, a 7.0 GB budget sized a memory the device then held 7.74 GB for.
precision_bench.py measures the resident memory that results next to the budget asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError

GB = 1e9
CUDA_OVERHEAD_BYTES = int(1.4 * GB)          # outside torch 0.82 GB + torch's cache 0.55 GB, measured (above)
BOOKKEEPING_BYTES_PER_LAYER = 8 + 4 + 4 + 1  # token_idx int64, score f32, score_sum f32, sink bool


class BudgetError(ConfigError):
    """gpu_memory_budget_gb cannot hold the model and the smallest memory; the message has the arithmetic."""


def tensor_bytes(t: torch.Tensor, seen: set | None = None) -> int:
    """Bytes a tensor holds, through tensor subclasses (a torchao weight's int data and scales),
    each storage counted once in `seen` (views of one merged tensor: the gate/up weights)."""
    seen = set() if seen is None else seen
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n), seen) for n in names if getattr(t, n, None) is not None)
    storage = t.untyped_storage()
    key = (storage.device, storage.data_ptr())
    if key in seen:
        return 0
    seen.add(key)
    return storage.nbytes()


def module_bytes(module: torch.nn.Module) -> int:
    """Parameters and buffers, each storage counted once and whole (tied weights, gate/up views of one tensor)."""
    seen: set = set()
    return sum(tensor_bytes(t, seen) for t in list(module.parameters()) + list(module.buffers()))


def kv_bytes_per_token(kv, kv_dtype: str) -> int:
    """Keys and values of one token over all layers, at kv_dtype; int8 adds a float32 scale per
    token, head and tensor (memory/kv_quant.py)."""
    elements = kv.layers * kv.kv_heads * kv.head_dim
    if kv_dtype == "int8":
        return 2 * (elements + 4 * kv.layers * kv.kv_heads)
    return 2 * elements * torch.empty((), dtype=kv.dtype).element_size()


@dataclass
class MemorySizing:
    budget_bytes: int
    weights_bytes: int
    working_bytes: int
    bytes_per_token: int          # every buffer that grows with budget_tokens, per token
    fixed_tokens: int             # tokens allocated whatever the budget (a clip's room, the answer's question)
    min_tokens: int               # the smallest budget memory can work with
    budget_tokens: int

    def arithmetic(self) -> str:
        free = self.budget_bytes - self.weights_bytes - self.working_bytes - self.fixed_tokens * self.bytes_per_token
        return (f"{self.budget_bytes / GB:.2f} GB budget - {self.weights_bytes / GB:.2f} GB weights - "
                f"{self.working_bytes / GB:.2f} GB working space - {self.fixed_tokens} fixed tokens x "
                f"{self.bytes_per_token} B = {free / GB:.3f} GB = {max(free, 0) // self.bytes_per_token} memory tokens "
                f"at {self.bytes_per_token} B each (the smallest memory needs {self.min_tokens})")

    def report(self) -> dict:
        return {"gpu_memory_budget_gb": round(self.budget_bytes / GB, 3),
                "weights_gb": round(self.weights_bytes / GB, 3),
                "working_space_gb": round(self.working_bytes / GB, 3),
                "bytes_per_memory_token": self.bytes_per_token,
                "budget_tokens_sized": self.budget_tokens,
                "memory_sizing": self.arithmetic()}


def size_memory(config, adapter, prefix_tokens: int, weights_bytes: int | None = None) -> MemorySizing:
    """budget_tokens for config.gpu_memory_budget_gb; BudgetError (with the arithmetic) if too small.
    weights_bytes: measured from the adapter unless given (benchmarks/robot_recipe.py computes it
    for models it does not load)."""
    kv = adapter.kv
    T = adapter.tokens_per_frame
    elt = torch.empty((), dtype=kv.dtype).element_size()
    dense_kv = kv_bytes_per_token(kv, "bf16")          # at the model's dtype (the short-term tier)
    long_kv = kv_bytes_per_token(kv, config.kv_dtype) + BOOKKEEPING_BYTES_PER_LAYER * kv.layers
    arena_kv = kv_bytes_per_token(kv, config.kv_dtype)
    if config.kv_dtype != "bf16":
        arena_kv += dense_kv / kv.layers                # an 8-bit arena's scratch: one layer at the model's dtype
    arena_share = 9 / 8 * config.retrieval_ratio
    # + one layer's [prefix | memory | clip] keys and values, which a clip's forward fills (ingest_view.py)
    per_token = int(long_kv + arena_share * arena_kv + dense_kv / kv.layers + 0.5)
    clip = config.frames_per_clip * T
    short = config.short_term_frames * T
    # allocated whatever the budget: the long tier's room for one clip more and the short tier's
    # (short_term + clip frames) at the dense size, the answer arena's question and answer rows
    fixed_tokens = -(-((short + clip) * (long_kv + dense_kv)
                       + 9 / 8 * (config.max_question_tokens + config.max_new_tokens + short) * arena_kv)
                     // per_token)
    fixed_tokens = int(fixed_tokens)
    weights = measured_weights_bytes(adapter) if weights_bytes is None else weights_bytes
    working = working_space_bytes(adapter, clip, config.max_question_tokens, elt)
    budget = int(config.gpu_memory_budget_gb * GB)
    min_tokens = prefix_tokens + short + config.vision_sinks + config.page_tokens
    free = budget - weights - working - fixed_tokens * per_token
    tokens = max(free, 0) // per_token
    sizing = MemorySizing(budget, weights, working, per_token, fixed_tokens, min_tokens, int(tokens))
    if tokens < min_tokens:
        raise BudgetError(f"gpu_memory_budget_gb={config.gpu_memory_budget_gb} cannot hold this model and memory: "
                          f"{sizing.arithmetic()}")
    return sizing


def measured_weights_bytes(adapter) -> int:
    """What the loaded model takes: on CUDA what torch's allocator holds on the device now (the
    model is all the engine has put there yet), else the bytes of its parameters and buffers."""
    device = adapter.kv.device
    held = module_bytes(adapter.model)
    if device.type == "cuda":
        return max(held, torch.cuda.memory_allocated(device))
    return held


def working_space_bytes(adapter, clip_tokens: int, question_tokens: int, elt: int) -> int:
    """An estimate of what a clip's or a question's forward allocates beside memory (module doc)."""
    text = adapter._lm.config
    kv = adapter.kv
    inter = getattr(text, "intermediate_size", 4 * text.hidden_size)
    per_row = (4 * text.hidden_size + 3 * inter + (kv.q_heads + 2 * kv.kv_heads) * kv.head_dim) * elt
    rows = max(clip_tokens, question_tokens)
    vision = 0
    vision_config = getattr(getattr(adapter.model, "config", None), "vision_config", None)
    if vision_config is not None:
        patches = (vision_config.image_size // vision_config.patch_size) ** 2 + 1
        frames = max(1, clip_tokens // max(adapter.tokens_per_frame, 1))
        vision = frames * patches * (4 * vision_config.hidden_size + 2 * vision_config.intermediate_size) * elt
    logits = question_tokens * text.vocab_size * 4
    total = rows * per_row + vision + logits
    if getattr(adapter, "weights", "bf16") != "bf16":
        # a clip's prefill multiplies a transient half-precision copy of each quantized weight, a band
        # of outputs at a time (cuda/kernels/quantized_linear.py), the largest weight the gate and up
        # projections merged
        from ..cuda.kernels.quantized_linear import DEQUANTIZED_ELEMENTS
        total += min(2 * inter * text.hidden_size, DEQUANTIZED_ELEMENTS + 256 * text.hidden_size) * elt
    if kv.device.type == "cuda":
        total += CUDA_OVERHEAD_BYTES
    return int(total)
