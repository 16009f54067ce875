"""Config: schemas (schema.py), composition and (de)serialisation (io.py), validation (validate.py)."""

from gptoss_hpc.config.io import compose, conf_dir, load_run_config, save_run_config, to_run_config
from gptoss_hpc.config.schema import (
    ClusterConfig,
    DataConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)
from gptoss_hpc.config.validate import validate

__all__ = [
    "ClusterConfig",
    "DataConfig",
    "EvalConfig",
    "LoraConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "compose",
    "conf_dir",
    "load_run_config",
    "save_run_config",
    "to_run_config",
    "validate",
]
