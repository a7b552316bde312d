"""The LiveVLM algorithm: what memory keeps and what an answer reads. Plain torch, any device.

    streaming_memory.py  StreamingMemory: the tiers (prefix, long-term, short-term) and their rules
    compression.py       what long-term memory keeps: Vision Sink Bucketing (VSB) and the baselines
    pages.py             pages of pre-RoPE keys and how a question scores them
    retrieval.py         what an answer reads: Position-agnostic KV Retrieval (PaR) and the baselines
    region.py            what a question may read: a time window, a place
    poses.py             where a frame was taken
    kv_buffer.py         one tier's tensors
    persistence.py       memory to a file and back
    stamps.py            when a frame was taken
"""
