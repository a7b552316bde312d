"""The LiveVLM engine: a streaming Video LLM with bounded KV memory. Importable without ROS."""

from .config import POLICIES, ConfigError, EngineConfig
from .engine import RUNTIME_OPTIONS, Answer, AnswerCancelled, EngineResourceError, LiveVLMEngine
from .inputs import EngineInputError, NoFramesError
from .memory.persistence import MemoryFileError
from .models import ModelLoadError

__all__ = ["POLICIES", "RUNTIME_OPTIONS", "Answer", "AnswerCancelled", "ConfigError", "EngineConfig",
           "EngineInputError", "EngineResourceError", "LiveVLMEngine", "MemoryFileError", "ModelLoadError",
           "NoFramesError"]
