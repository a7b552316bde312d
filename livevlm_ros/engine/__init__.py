"""The LiveVLM engine: a streaming Video LLM with bounded KV memory. Importable without ROS."""

from .config import POLICIES, ConfigError, EngineConfig
from .engine import Answer, EngineInputError, EngineResourceError, LiveVLMEngine, NoFramesError
from .models import ModelLoadError

__all__ = ["POLICIES", "Answer", "ConfigError", "EngineConfig", "EngineInputError", "EngineResourceError",
           "LiveVLMEngine", "ModelLoadError", "NoFramesError"]
