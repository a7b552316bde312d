"""The node's parameters: each declared with its default, description and range, read into one
dict, and the rules that span several values. `ros2 param describe /livevlm NAME` shows them.

Those marked RESTART shape the model or the memory: read-only, read again on configure (a
managed node: cleanup, then configure). The others take effect when set with `ros2 param set`.
"""

from __future__ import annotations

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

from livevlm_ros.engine import EngineConfig
from livevlm_ros.engine.config import LAUNCH_MODES, PAGE_SCORINGS, POLICIES

from .robot_poses import TOPIC_TYPES

_ENGINE_DEFAULTS = EngineConfig()
_BIG = 1_000_000


def _int(lo, hi=_BIG):
    return dict(integer_range=[IntegerRange(from_value=lo, to_value=hi, step=1)])


def _float(lo, hi=1e9):
    return dict(floating_point_range=[FloatingPointRange(from_value=lo, to_value=hi, step=0.0)])


# (name, default, description, descriptor extras). `restart` = read-only: it shapes the model or the
# memory and takes a restart (or cleanup + configure); the others take effect when set.
RESTART = dict(read_only=True)
NODE_PARAMETERS = [
    ("camera_topics", ["camera/image_raw"],
     "Image topics to watch (relative to the node's namespace unless they start with /); a name ending "
     "in /compressed is read as sensor_msgs/CompressedImage. Several cameras: each camera's frames are "
     "its own frames in memory, marked by camera; a sample takes every camera's frame nearest its stamp.", RESTART),
    ("camera_sync_slop_s", 0.1, "Several cameras: a camera's frame joins a sample if stamped within this of it "
     "(set it to at least the slowest camera's frame period); otherwise that camera misses the sample.",
     _float(0.0, 10.0)),
    ("camera_sync_wait_s", 0.5, "Several cameras: longest a sample waits (wall time) for the other cameras' frames "
     "of its instant before it goes to the engine without them. A camera that already sent a later frame, or "
     "none for stale_camera_s, is not waited for.", _float(0.0, 10.0)),
    ("sample_fps", _ENGINE_DEFAULTS.sample_fps, "Frames per second of camera time taken into memory.", _float(0.01, 1000)),
    ("frame_queue_size", 4, "Sampled frames waiting for the engine; when full the oldest is dropped.", _int(1, 1000)),
    ("max_pending_queries", 4, "Questions waiting for the engine; more are refused with a 'busy' error.", _int(1, 1000)),
    ("query_timeout_s", 120.0, "A question not answered by then gets a 'timed out' error.", _float(0.1)),
    ("fresh_wait_s", 1.0, "Longest a question with a not_before stamp waits for a frame that new.", _float(0.0)),
    ("evidence_frames", 3, "Frames named in an answer's evidence (when and which camera; 0 = none).", _int(0, 100)),
    ("narration_period_s", 5.0, "Seconds between narrations on ~/narration (0 = no narration).", _float(0.0)),
    ("status_period_s", 1.0, "Seconds between status reports on /diagnostics.", _float(0.05)),
    ("time_jump_tolerance_s", 1.0, "A header stamp this much older than the last sampled frame is a time jump.",
     _float(0.0)),
    ("on_time_jump", "reset", "What a time jump does: reset (clear memory, go on) | refuse (drop frames until "
     "the stamps pass the last sampled frame again)."),
    ("stale_camera_s", 5.0, "Diagnostics WARN when a camera sent no frame for this long.", _float(0.1)),
    ("max_lag_s", 5.0, "Diagnostics WARN when the engine is this far (camera time) behind the newest frame.",
     _float(0.0)),
    ("pose_source", "auto", "Where each frame's pose comes from: tf (the transform fixed_frame <- the image's "
     "frame at its stamp) | topic (pose_topic) | none | auto (tf where tf2_ros is installed, else the topic if "
     "pose_topic is set). Frames without a pose are unknown, never guessed.", RESTART),
    ("pose_topic", "", "The robot's pose topic (pose_source topic): nav_msgs/Odometry, geometry_msgs/PoseStamped "
     "or PoseWithCovarianceStamped (pose_topic_type), in fixed_frame.", RESTART),
    ("pose_topic_type", "odometry", " | ".join(TOPIC_TYPES), RESTART),
    ("fixed_frame", "map", "The frame poses are in (and places are asked in).", RESTART),
    ("max_pose_gap_s", 0.5, "A frame between two poses further apart than this, or this much newer than the "
     "newest, has no pose (interpolated between the two around its stamp, held after the newest, never "
     "extrapolated).", _float(0.0, 60.0)),
    ("pose_wait_s", 0.2, "How long (wall seconds) a frame newer than every pose waits for the pose topic (or "
     "tf) to reach its stamp: poses often arrive after their image. Only while poses are coming (one within "
     "stale_camera_s); 0 = never wait.", _float(0.0, 5.0)),
    ("memory_file", "", "safetensors file memory is loaded from at start (if it exists) and saved to on a clean "
     "shutdown and by ~/save_memory; '' = none. A file made for another model or memory setting is refused."),
    ("model_path", "", "Local folder of a from_pretrained Video LLM checkpoint: LLaVA-OneVision, Qwen2.5-VL or "
     "Qwen3-VL (the family is read from its config.json).", RESTART),
    ("frame_pixels", _ENGINE_DEFAULTS.frame_pixels, "Qwen families: pixels a frame is resized to (a square whose side "
     "is a multiple of the tokens' pixel size), which fixes tokens per frame; 0 = 196 tokens a frame "
     "(Qwen2.5-VL 392 px, Qwen3-VL 448 px). LLaVA-OneVision takes its own 384 px.", {**RESTART, **_int(0, 1 << 26)}),
    ("device", _ENGINE_DEFAULTS.device, "Torch device: cpu, cuda, cuda:1, ...", RESTART),
    ("dtype", _ENGINE_DEFAULTS.dtype, "float32 | bfloat16 | float16", RESTART),
    ("weights", _ENGINE_DEFAULTS.weights, "Language-model weights: bf16 (not quantized: at dtype) | int8 | int4 "
     "(weight-only, torchao; int4 needs a CUDA GPU). The vision tower and projector stay at dtype. A precision "
     "the device lacks is refused at start with the reason, in diagnostics and every reply.", RESTART),
    ("kv_dtype", _ENGINE_DEFAULTS.kv_dtype, "Long-term memory's keys and values: bf16 (at dtype) | int8 (8 bits "
     "with a scale per token and head: the same bytes hold about twice the tokens).", RESTART),
    ("gpu_memory_budget_gb", 0.0, "If > 0: budget_tokens is sized so that weights, memory at kv_dtype, answer "
     "buffers and working space fit in this many GB of device memory, measured at start and reported in "
     "diagnostics; refused with the arithmetic when even the smallest memory does not fit. 0 = use budget_tokens.",
     RESTART),
    ("launch", _ENGINE_DEFAULTS.launch, "How clips, questions and answer tokens launch their kernels: graph "
     "(replayed from CUDA graphs once memory is full) | static (the same fixed shapes, one by one) | eager | auto "
     "(graph on a GPU with bounded memory).", RESTART),
    ("policy", _ENGINE_DEFAULTS.policy, f"Memory policy: {' | '.join(POLICIES)}", RESTART),
    ("budget_tokens", _ENGINE_DEFAULTS.budget_tokens, "Hard cap on memory tokens on the device (-1 = unbounded).",
     RESTART),
    ("short_term_frames", _ENGINE_DEFAULTS.short_term_frames, "Most recent frames kept whole.", RESTART),
    ("vision_sinks", _ENGINE_DEFAULTS.vision_sinks, "Vision sink tokens kept per layer.", RESTART),
    ("bucket_tokens", _ENGINE_DEFAULTS.bucket_tokens, "VSB: capacity of each time bucket.", RESTART),
    ("saliency_share", _ENGINE_DEFAULTS.saliency_share, "VSB: share of the budget filled by score alone.", RESTART),
    ("observation_window", _ENGINE_DEFAULTS.observation_window,
     "VSB: last tokens of a clip whose attention scores memory (0 = one frame).", RESTART),
    ("span_tokens", _ENGINE_DEFAULTS.span_tokens, "VSB: neighbouring tokens scored and kept together.", RESTART),
    ("page_tokens", _ENGINE_DEFAULTS.page_tokens, "PaR: long-term tokens per page.", RESTART),
    ("frames_per_clip", _ENGINE_DEFAULTS.frames_per_clip, "Frames prefilled together.", RESTART),
    ("system_prompt", _ENGINE_DEFAULTS.system_prompt, "Text before the video (model's chat format).", RESTART),
    ("question_template", _ENGINE_DEFAULTS.question_template, "Text after the video; {question} is replaced.",
     RESTART),
    ("retrieval_ratio", _ENGINE_DEFAULTS.retrieval_ratio, "PaR: share of long-term pages an answer reads.",
     _float(0.001, 1.0)),
    ("page_scoring", _ENGINE_DEFAULTS.page_scoring, f"PaR: how a question scores pages: {' | '.join(PAGE_SCORINGS)}."),
    ("max_new_tokens", _ENGINE_DEFAULTS.max_new_tokens, "Longest answer, in tokens (a request may ask for fewer).",
     _int(1, 4096)),
    ("max_question_tokens", _ENGINE_DEFAULTS.max_question_tokens, "Longest question, in tokens.", _int(1, 65536)),
    ("narration_frames", _ENGINE_DEFAULTS.narration_frames, "Recent frames a narration looks at (<= short_term_frames).",
     _int(1, 1000)),
    ("narration_prompt", _ENGINE_DEFAULTS.narration_prompt, "The question a narration asks."),
]
ENGINE_FIELDS = set(EngineConfig.__dataclass_fields__)
CHOICES = {"on_time_jump": ("reset", "refuse"), "page_scoring": PAGE_SCORINGS, "launch": LAUNCH_MODES,
           "pose_source": ("auto", "tf", "topic", "none"),
           "pose_topic_type": TOPIC_TYPES}


RESTART_NAMES = {name for name, _, _, *extra in NODE_PARAMETERS if extra and extra[0] is RESTART}


def declare(node, managed: bool = False) -> None:
    """Declare every parameter on `node`, at construction. The plain node makes the RESTART ones
    read-only; a managed node lets them be set while it is unconfigured (Nav2 style: set, then
    configure reads them), and refuses that in other states (see `refuse_restart_change`)."""
    for name, default, description, *extra in NODE_PARAMETERS:
        extras = dict(extra[0]) if extra else {}
        if managed and extras.get("read_only"):
            extras["read_only"] = False
            description += " Takes effect on configure (set it while unconfigured)."
        node.declare_parameter(name, default, ParameterDescriptor(description=description, **extras))


def read(node) -> dict:
    """The current values, checked together; raises ValueError with the reason."""
    values = {name: node.get_parameter(name).value for name, *_ in NODE_PARAMETERS}
    reason = invalid(values)
    if reason:
        raise ValueError(reason)
    return values


def invalid(p: dict) -> str | None:
    """The reason a set of values cannot work together, or None. (Ranges and read-only are
    enforced by rclpy from the descriptors.)"""
    for name, choices in CHOICES.items():
        if p[name] not in choices:
            return f"{name} must be one of {', '.join(choices)}, got {p[name]!r}"
    if not p["camera_topics"]:
        return "camera_topics is empty"
    if len(set(p["camera_topics"])) != len(p["camera_topics"]):
        return f"camera_topics names a topic twice: {p['camera_topics']}"
    if p["pose_source"] == "topic" and not p["pose_topic"]:
        return "pose_source is topic but pose_topic is empty"
    if p["narration_frames"] > p["short_term_frames"]:
        return f"narration_frames ({p['narration_frames']}) must be <= short_term_frames ({p['short_term_frames']})"
    return None


def engine_config(p: dict) -> EngineConfig:
    config = {k: v for k, v in p.items() if k in ENGINE_FIELDS}
    config["budget_tokens"] = None if config["budget_tokens"] < 0 else config["budget_tokens"]
    config["gpu_memory_budget_gb"] = config["gpu_memory_budget_gb"] or None     # 0 = not set
    config["sample_fps"] = 0.0                     # the node samples by header stamp itself
    config["extra"] = {"sample_fps": p["sample_fps"]}   # but a model's time axis (Qwen2.5-VL) needs the rate
    return EngineConfig.from_dict(config)


def max_question_bytes(p: dict) -> int:
    """A question longer than this is refused before it is tokenized: no tokenizer makes a token
    of more than 16 bytes of ordinary text, so it could not fit max_question_tokens anyway."""
    return 16 * p["max_question_tokens"]
