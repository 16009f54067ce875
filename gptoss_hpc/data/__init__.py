"""Training data: loading (hub / local / bundled sample), row validation, converters, stats.

    from gptoss_hpc.data import load_datasets
    train, held_out = load_datasets(cfg, tokenizer)   # tokenizer optional: enables train.max_length policy

    python -m gptoss_hpc.data validate PATH
    python -m gptoss_hpc.data convert --format think-tags INPUT OUTDIR --language Japanese
    python -m gptoss_hpc.data stats data=sample model=tiny_gpt_oss

Cheap to import: datasets/pyarrow/pandas are imported inside the functions that use them.
"""

from __future__ import annotations

from gptoss_hpc.data.load import LoadedData, load_data, load_datasets, sample_path
from gptoss_hpc.data.rows import ROLES, template_messages

__all__ = ["ROLES", "LoadedData", "load_data", "load_datasets", "sample_path", "template_messages"]
