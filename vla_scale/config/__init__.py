"""Typed run configuration: dataclasses + YAML presets + dotted overrides."""
from vla_scale.config.loader import config_from_dict, config_to_dict, load_config, save_config, validate
from vla_scale.config.schema import (
    ActionConfig,
    Config,
    DataConfig,
    DeepSpeedConfig,
    EncoderConfig,
    ModelConfig,
    ProjectorConfig,
    RunConfig,
    SourceConfig,
    SyntheticDataConfig,
    TrainConfig,
)

__all__ = [
    "ActionConfig", "Config", "DataConfig", "DeepSpeedConfig", "EncoderConfig", "ModelConfig", "ProjectorConfig",
    "RunConfig", "SourceConfig", "SyntheticDataConfig", "TrainConfig",
    "config_from_dict", "config_to_dict", "load_config", "save_config", "validate",
]
