"""The attention the language model runs while the engine drives it, registered with transformers.

Every forward the engine makes is "a block of n new tokens after a context": the KV hook returns
[context | new] keys, and new token i may see the whole context and new tokens up to i — a causal
mask aligned to the bottom-right corner. Registering this as an attention implementation (instead
of passing masks) means transformers builds no mask and never asks our cache for sizes, the same on
every model family and on transformers 5.17 .. 5.24.

Grouped-query attention without copying keys: the g query heads that share a kv head are folded
into one block of g*n query rows, so each kv head is read once and never repeated in memory
(repeating a 700k-token context 7x would cost 10 GB at 7B shapes). The folded rows need an explicit
mask; it is built once per forward and shared by all layers.

A key tensor may carry `livevlm_last` (long [1], on the device): the captured decode step
(decode_step.py) hands over a buffer of fixed size, of which only the slots up to it hold context;
and `livevlm_scales` (keys', values' scales, keys' channel factors): that buffer is 8-bit (arena.py).
It may carry `livevlm_on_probs`: a forward that writes out its softmax probabilities (a question)
hands them to it, so the KV hook measures evidence without computing the attention a second time.
And `livevlm_on_lse(query, lse, scale)`, called once per forward: lse is each row's log-sum-exp
where the flash kernel returned it (a clip's prefill: VSB's scores skip half their work), else None.

On CUDA one new token (an answer being decoded) takes decode_attention.py's kernel; a few rows (a
question) take two matrix products; many rows (a clip) take clip_attention.py's kernel (torch's
flash kernel where Triton is missing).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from ..cuda.kernels.clip_attention import clip_attention
from ..cuda.kernels.decode_attention import decode_attention
from ..memory import kv_quant

NAME = "livevlm_stream"


# Up to this many folded query rows (a decode step: 7 at 7B shapes; a question: 7 x 32) the fused
# kernel is the slow choice: it tiles over query rows, so 4 kv heads x 1-2 tiles keep 4-8 of 132 SMs
# busy (73-116 us a layer for one token, H200; 122 us for a 32-token question over 5k keys, H100).
# Two matrix products, split over the keys by cuBLAS, read the same keys and values with the whole
# GPU. They take ~5 kernels where the fused kernel takes one, which costs nothing where the step is
# replayed from a CUDA graph (question_step.py, decode_step.py). A clip's prefill (196+ tokens a
# frame, 1,372+ rows) takes a fused kernel.
SMALL_BLOCK_ROWS = 512
LONG_CONTEXT = 16384
_bmm_out_dtype = True          # torch.bmm(..., out_dtype=float32) on CUDA; False once it is found missing
_flash_gqa = True              # the flash kernel with fewer kv heads on CUDA; False once it is found missing


def _bmm_float32(a, b):
    """a @ b with float32 output; half-precision inputs are not copied to float32 where CUDA can."""
    global _bmm_out_dtype
    if a.dtype == torch.float32:
        return torch.bmm(a, b)
    if a.is_cuda and _bmm_out_dtype:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            _bmm_out_dtype = False
    return torch.bmm(a.float(), b.float())


def hands_probabilities(groups: int, n: int) -> bool:
    """Does a forward of n new tokens compute its softmax probabilities (and hand them to a key
    tensor's `livevlm_on_probs`)? Only the small-block path writes them out."""
    return groups * n <= SMALL_BLOCK_ROWS


def _small_block_attention(q, k, v, n: int, last, scale, on_probs=None):
    """softmax(q k^T * scale) v for a few folded query rows (groups x n new tokens) whose own keys
    are the last n; logits and softmax in float32. `last` [1] (one new token only): the last slot of
    a fixed-size buffer that holds context. `on_probs`: called with the float32 probabilities
    [b, kv_heads, groups * n, kv] (the KV hook takes an answer's evidence from them)."""
    b, h, rows, d = q.shape
    q3, kt = (q * scale).reshape(b * h, rows, d), k.reshape(b * h, -1, d).transpose(1, 2)
    logits = _bmm_float32(q3, kt).view(b, h, rows, -1)
    if last is not None:
        logits.masked_fill_(torch.arange(logits.shape[-1], device=last.device) > last, float("-inf"))
    if n > 1:          # new token i sees the context and new tokens <= i: only the last n columns are masked
        logits[..., -n:].masked_fill_(causal_tail(rows // n, n, q.device), float("-inf"))
    probs = logits.softmax(dim=-1)
    if on_probs is not None:
        on_probs(probs)
    return _probs_times_values(probs.to(v.dtype), v)


def _probs_times_values(probs, v, chunk: int = 512, split_from: int = LONG_CONTEXT):
    """probs [b, h, rows, kv] @ v [b, h, kv, d]. A plain batched product of a few rows has b*h
    output tiles (4 SMs busy at 7B shapes, however long the context); from `split_from` keys on it
    is split into chunks of `chunk` keys, one tile each, and their float32 partial sums are added
    at the end (H200, 7B shapes: full cache at 200k keys decoded 36 instead of 7.6 tokens/s; at
    LiveVLM's ~5k keys the extra kernels cost more than they gain: 126 against 136 tokens/s). One
    product per head: a head's keys are contiguous in the answer buffer, so nothing is copied."""
    b, h, rows, kv = probs.shape
    d, n = v.shape[3], kv // chunk
    if kv < split_from or n < 2:
        return torch.matmul(probs, v)
    main = n * chunk
    pp, vv = probs.reshape(b * h, rows, kv), v.reshape(b * h, kv, d)
    out = torch.stack([
        _bmm_float32(pp[j, :, :main].reshape(rows, n, chunk).transpose(0, 1), vv[j, :main].view(n, chunk, d)).sum(0)
        for j in range(b * h)])
    if main < kv:
        out += _bmm_float32(pp[:, :, main:], vv[:, main:])
    return out.view(b, h, rows, d).to(v.dtype)


def _flash_bottom_right(q, k, v, scale, with_lse: bool = False):
    """Many new tokens after a context on CUDA (a clip's prefill): the flash kernel, whose causal
    mask is aligned bottom-right when there are fewer queries than keys (flash-attention 2), with
    grouped kv heads read in place. No mask is built or read: the folded mask is n*groups x keys
    bools (154 MB for an 8-frame clip at 7B shapes), and a graph rebuilt it for every layer.
    None where the kernel is missing or refuses these inputs. `with_lse`: (output, each row's
    log-sum-exp of scale * logits, [b, Hq, n] float32)."""
    global _flash_gqa
    if not (_flash_gqa and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return None
    try:
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
        return (out[0], out[1]) if with_lse else out[0]
    except (RuntimeError, NotImplementedError):
        _flash_gqa = False
        return None


def _clip_prefill(q, k, v, scale) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Many new tokens after a context on CUDA: (output [b, n, Hq, D], each row's log-sum-exp)
    from clip_attention.py's Triton kernel, else torch's flash kernel; None where neither runs."""
    if (out := clip_attention(q, k, v, scale)) is not None:
        return out
    if (flash := _flash_bottom_right(q, k, v, scale, with_lse=True)) is not None:
        return flash[0].transpose(1, 2).contiguous(), flash[1]
    return None


def capturing() -> bool:
    """Is a CUDA graph being recorded on this thread's stream?"""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _cached_outside_graphs(maxsize: int):
    """functools.lru_cache (thread-safe), bypassed while a CUDA graph records: a graph must own the
    tensors it reads, and a cached one could be evicted and its memory reused while the graph still
    reads it."""
    def wrap(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args):
            return fn(*args) if capturing() else cached(*args)
        return call
    return wrap


@_cached_outside_graphs(maxsize=4)
def causal_tail(groups: int, n: int, device) -> torch.Tensor:
    """[groups*n, n] True where folded row (head in group, i) may not see new token j (j > i)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1).repeat(groups, 1)


@_cached_outside_graphs(maxsize=2)     # one forward's layers share it
def _folded_causal_mask(groups: int, n: int, kv_len: int, device) -> torch.Tensor:
    """[groups*n, kv_len] bool: row (j, i) - head j of the group, new token i - sees keys <= kv_len - n + i."""
    limit = kv_len - n + torch.arange(n, device=device)
    mask = torch.arange(kv_len, device=device)[None, :] <= limit[:, None]
    return mask.repeat(groups, 1)


def stream_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """query [b, Hq, n, D], key/value [b, Hkv, n_ctx + n, D] -> [b, n, Hq, D]."""
    b, hq, n, d = query.shape
    hkv = key.shape[1]
    groups = hq // hkv
    folded = query.reshape(b, hkv, groups * n, d)          # heads of a group are adjacent in Hq
    last = getattr(key, "livevlm_last", None)       # a fixed-size buffer (decode_step.py): its last used slot
    if last is not None and n > 1:
        raise ValueError("a fixed-size key buffer takes one new token at a time")
    scale = d ** -0.5 if scaling is None else scaling
    on_probs, on_lse = getattr(key, "livevlm_on_probs", None), getattr(key, "livevlm_on_lse", None)
    kv_scales = getattr(key, "livevlm_scales", None)      # an 8-bit arena (arena.py): int8 keys and values
    if (n == 1 and on_probs is None and on_lse is None
            and (out := decode_attention(query, key, value, last, scale, kv_scales)) is not None):
        return out, None
    if kv_scales is not None:             # where the kernel does not run: dequantized here, a layer at a time
        key = kv_quant.dequantize_rows(key, kv_scales[0], query.dtype, kv_scales[2])
        value = kv_quant.dequantize_rows(value, kv_scales[1], query.dtype)
    if hands_probabilities(groups, n):
        out = _small_block_attention(folded, key, value, n, last, scale, on_probs)
    elif (fused := _clip_prefill(query, key, value, scale)) is not None:
        if on_lse is not None:
            on_lse(query, fused[1], scale)
        return fused[0], None
    else:
        mask = None if n == 1 else _folded_causal_mask(groups, n, key.shape[2], query.device)
        out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    if on_lse is not None:
        on_lse(query, None, scale)
    return out.reshape(b, hq, n, d).transpose(1, 2).contiguous(), None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, stream_attention)
    return NAME


@contextlib.contextmanager
def in_use(config):
    """The model runs on our attention only inside the engine's own forwards: a model shared with
    other code (or outliving the engine) keeps its own implementation everywhere else."""
    previous = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
