"""The CUDA speed layer: fixed-shape steps replayed from CUDA graphs, and Triton kernels.

Every piece here has a torch path it must equal, which is what runs on a CPU: the steps run the
same fixed shapes eagerly there (the CPU tests check them against the ordinary path), and each
kernel is a fast path its caller falls back from (benchmarks/kernels_interpreted.py checks them
on the CPU in Triton's interpreter; gpu_bench.py and fused_parts.py on the GPU).

    graphs.py         recording and replaying a step; the memory layout a graph depends on
    ingest_step.py    a clip's vision tower and prefill
    question_step.py  a question's prefill, padded to a bucket
    decode_step.py    one answer token
    kernels/          the Triton kernels
"""
