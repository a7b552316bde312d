"""Every knob of the engine, in one object, with the defaults we ship.

A *policy* is a named combination of three small choices (see docs/engine-design.md):
  compression  what happens to KV that leaves short-term memory   (keep_all | sliding_window | vsb)
  retrieval    which long-term pages an answer reads              (all | topk)
  long_term    where long-term KV lives                           (gpu | cpu)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

PAGE_SCORINGS = ("quest", "softmax_mean", "softmax_max")    # see retrieval.page_scores
LAUNCH_MODES = ("auto", "eager", "static", "graph")          # see graphs.py
WEIGHTS = ("bf16", "int8", "int4")                           # see models/quantize.py
KV_DTYPES = ("bf16", "int8")                                 # see memory/kv_quant.py (fp8: not implemented)

POLICIES = {
    # name:            (compression,      retrieval, long_term)
    "livevlm":         ("vsb",            "topk",    "gpu"),   # the paper: VSB + PaR
    "full":            ("keep_all",       "all",     "gpu"),   # accuracy reference, unbounded
    "sliding_window":  ("sliding_window", "all",     "gpu"),   # StreamingLLM-style sinks + window
    "rekv":            ("keep_all",       "topk",    "cpu"),   # ReKV-style offload + retrieval
}

DEFAULT_SYSTEM_PROMPT = (
    "<|im_start|>system\nYou are the onboard vision assistant of a robot. "
    "Answer briefly and precisely about what the camera saw.<|im_end|>\n<|im_start|>user\n"
)
# The video sits between the system prefix and the question; `{question}` is filled in.
DEFAULT_QUESTION_TEMPLATE = "\n{question}<|im_end|>\n<|im_start|>assistant\n"
DEFAULT_NARRATION_PROMPT = "Describe briefly what is happening right now."


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent."""


@dataclass
class EngineConfig:
    # --- model -------------------------------------------------------------------------------
    model_path: str = ""                 # local folder with a from_pretrained checkpoint
    device: str = "cpu"                  # "cpu", "cuda", "cuda:1", ...
    dtype: str = "float32"               # "float32" | "bfloat16" | "float16"
    frame_pixels: int = 0                # pixels a frame is resized to (Qwen families); 0 = the family's default
    weights: str = "bf16"                # language-model weights: bf16 (= at `dtype`, not quantized) | int8 | int4
    kv_dtype: str = "bf16"               # long-term KV: bf16 (= at `dtype`) | int8 (per-token-and-head scales)
    gpu_memory_budget_gb: float | None = None   # if set, budget_tokens is sized from it (memory/sizing.py)

    # --- stream ------------------------------------------------------------------------------
    sample_fps: float = 1.0              # frames per second kept from the stream (0 = keep every frame)
    frames_per_clip: int = 1             # frames prefilled together (larger = higher GPU efficiency, more lag)

    # --- memory ------------------------------------------------------------------------------
    policy: str = "livevlm"              # a key of POLICIES
    budget_tokens: int | None = 12_288   # hard cap on GPU memory tokens (prefix+long+short); None = unbounded
    short_term_frames: int = 2           # most recent frames kept whole
    vision_sinks: int = 8                # per layer, kept for the whole stream (VSB and sliding window)
    bucket_tokens: int = 1               # VSB bucket capacity B; buckets = long-term budget / B
    saliency_share: float = 0.5          # VSB: share of the long-term budget filled purely by score
    observation_window: int = 0          # VSB: last r tokens of a clip whose attention scores memory; 0 = one frame
    span_tokens: int = 1                 # VSB: neighbouring tokens scored (and kept) together; 1 = per token

    # --- retrieval (PaR) ---------------------------------------------------------------------
    page_tokens: int = 16                # consecutive long-term tokens per page
    retrieval_ratio: float = 0.4         # share of long-term pages an answer reads (topk retrieval)
    page_scoring: str = "quest"          # how the question scores pages: quest | softmax_mean | softmax_max

    # --- answering ---------------------------------------------------------------------------
    max_new_tokens: int = 64
    launch: str = "auto"                 # eager | static | graph (graphs.py); auto = graph on CUDA, bounded memory
    max_question_tokens: int = 256
    narration_frames: int = 2            # recent frames a narration looks at (<= short_term_frames)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    question_template: str = DEFAULT_QUESTION_TEMPLATE
    narration_prompt: str = DEFAULT_NARRATION_PROMPT

    extra: dict = field(default_factory=dict)  # adapter-specific options, passed through

    # -------------------------------------------------------------------------------------------
    @property
    def compression(self) -> str:
        return POLICIES[self.policy][0]

    @property
    def retrieval(self) -> str:
        return POLICIES[self.policy][1]

    @property
    def long_term_tier(self) -> str:
        return POLICIES[self.policy][2]

    @property
    def bounded(self) -> bool:
        return self.compression != "keep_all" and self.budget_tokens is not None

    def validate(self) -> "EngineConfig":
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(msg)

        need(self.policy in POLICIES, f"policy must be one of {sorted(POLICIES)}, got {self.policy!r}")
        need(self.dtype in ("float32", "bfloat16", "float16"), f"unknown dtype {self.dtype!r}")
        need(self.weights in WEIGHTS, f"weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        need(self.kv_dtype in KV_DTYPES, f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}"
             + (" (fp8 is not implemented)" if self.kv_dtype == "fp8" else ""))
        need(self.kv_dtype == "bf16" or self.long_term_tier == "gpu",
             "kv_dtype int8 is for a long-term tier on the device; the rekv policy offloads it to host memory")
        if self.gpu_memory_budget_gb is not None:
            need(self.gpu_memory_budget_gb > 0, "gpu_memory_budget_gb must be positive or None")
            need(self.compression != "keep_all",
                 "gpu_memory_budget_gb sizes a bounded memory: the policy must compress (livevlm or sliding_window)")
        need(self.sample_fps >= 0, "sample_fps must be >= 0")
        need(self.frame_pixels >= 0, "frame_pixels must be >= 0 (0 = the model family's default)")
        need(self.frames_per_clip >= 1, "frames_per_clip must be >= 1")
        need(self.short_term_frames >= 1, "short_term_frames must be >= 1")
        need(self.vision_sinks >= 0, "vision_sinks must be >= 0")
        need(self.bucket_tokens >= 1, "bucket_tokens must be >= 1")
        need(0.0 <= self.saliency_share <= 1.0, "saliency_share must be in [0, 1]")
        need(self.observation_window >= 0, "observation_window must be >= 0 (0 = one frame of tokens)")
        need(self.span_tokens >= 1, "span_tokens must be >= 1")
        need(self.page_tokens >= 1, "page_tokens must be >= 1")
        need(0.0 < self.retrieval_ratio <= 1.0, "retrieval_ratio must be in (0, 1]")
        need(self.page_scoring in PAGE_SCORINGS, f"page_scoring must be one of {PAGE_SCORINGS}")
        need(self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        need(self.launch in LAUNCH_MODES, f"launch must be one of {LAUNCH_MODES}")
        need(self.launch != "graph" or self.device.startswith("cuda"), "launch 'graph' needs a CUDA device")
        need(self.max_question_tokens >= 1, "max_question_tokens must be >= 1")
        need(1 <= self.narration_frames <= self.short_term_frames,
             "narration_frames must be in [1, short_term_frames]")
        need("{question}" in self.question_template, "question_template must contain {question}")
        if self.budget_tokens is not None:
            need(self.budget_tokens > 0, "budget_tokens must be positive or None")
        return self

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes).validate()

    @classmethod
    def from_dict(cls, values: dict) -> "EngineConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(**values).validate()
