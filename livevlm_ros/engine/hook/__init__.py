"""The one hook into model code: the cache object every attention layer calls, and our attention.

    kv_hook.py      MemoryKVHook: what transformers calls; hands each call to the forward's view
    ingest_view.py  a clip's prefill against memory (and VSB's scores)
    answer_view.py  an answer's forward over what retrieval picked (and its evidence)
    arena.py        fixed answer buffers for the captured decode step
    attention.py    the attention registered with transformers (bottom-right causal, grouped heads)
    received.py     attention received by keys (VSB's scores, evidence)
    rope.py         rotary positions applied to stored keys
"""
