"""DeepSeek-V4 (Flash / Pro class) for ds4c: config, export-friendly model with explicit state, presets."""

from ds4c.models.deepseek_v4.config import ModelConfig
from ds4c.models.deepseek_v4.model import DeepseekV4Model, StateSpec, export_entry_points

__all__ = ["DeepseekV4Model", "ModelConfig", "StateSpec", "export_entry_points"]
