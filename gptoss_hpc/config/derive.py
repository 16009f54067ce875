"""Values derived from the config (pure functions, no torch): used by validation, submission and training."""

from __future__ import annotations

import re

from gptoss_hpc.config.schema import ClusterConfig, LoraConfig, ModelConfig, RunConfig, TrainConfig

# The reference recipe targets layers 7, 15 and 23 of gpt-oss-20b's 24: the last layer of each third.
_REFERENCE_LAYERS, _REFERENCE_DEPTH = (7, 15, 23), 24

_TIME_RE = re.compile(
    r"^(?:(?P<d>\d+)-(?P<dh>\d{1,2})(?::(?P<dm>\d{1,2})(?::(?P<ds>\d{1,2}))?)?"
    r"|(?P<h>\d+):(?P<m>\d{1,2}):(?P<s>\d{1,2})"
    r"|(?P<mm>\d+):(?P<ss>\d{1,2})"
    r"|(?P<min>\d+))$"
)


def expert_layers(lora: LoraConfig, num_hidden_layers: int) -> list[int]:
    if lora.expert_layers is not None:
        return list(lora.expert_layers)
    scaled = {round((layer + 1) * num_hidden_layers / _REFERENCE_DEPTH) - 1 for layer in _REFERENCE_LAYERS}
    return sorted(max(0, i) for i in scaled)


def target_parameters(lora: LoraConfig, model: ModelConfig) -> list[str]:
    return [
        f"{layer}.mlp.experts.{param}"
        for layer in expert_layers(lora, model.num_hidden_layers)
        for param in lora.expert_params
    ]


def slurm_time_minutes(value: str) -> int | None:
    """Slurm's --time syntax to whole minutes (rounded up); None when it does not parse."""
    m = _TIME_RE.match(str(value).strip())
    if not m:
        return None
    g = {k: int(v) for k, v in m.groupdict().items() if v is not None}
    if "d" in g:
        seconds = g["d"] * 86400 + g["dh"] * 3600 + g.get("dm", 0) * 60 + g.get("ds", 0)
    elif "h" in g:
        seconds = g["h"] * 3600 + g["m"] * 60 + g["s"]
    elif "mm" in g:
        seconds = g["mm"] * 60 + g["ss"]
    else:
        seconds = g["min"] * 60
    return -(-seconds // 60)


def tasks_per_node(cluster: ClusterConfig) -> int:
    return cluster.tasks_per_node if cluster.tasks_per_node is not None else max(1, cluster.gpus_per_node)


def world_size(cluster: ClusterConfig) -> int:
    return cluster.nodes * tasks_per_node(cluster)


# what an unresolved train.max_length=auto plans with (the launch replaces it with the data's length)
AUTO_PLANNING_LENGTH = 2048


def max_length(train: TrainConfig) -> int:
    """train.max_length, or AUTO_PLANNING_LENGTH while it still says auto (a config the launch has not resolved)."""
    return train.max_length if train.max_length is not None else AUTO_PLANNING_LENGTH


def trl_micro_batch(train: TrainConfig) -> tuple[int, int]:
    """(per_device_train_batch_size, max_length) as TRL gets them. With packing and train.packing_bin=micro_batch a
    micro-batch is one packed bin of per_device_train_batch_size x max_length tokens: TRL's padding-free collator
    flattens a micro-batch into one row anyway, so this holds the same tokens and the same per-sequence masks as
    per_device_train_batch_size bins of max_length, with fewer padding slots (best-fit packing has more room
    to fill). Rows are already <= max_length (data.max_length_policy), so TRL's truncation at the bin size
    cuts nothing."""
    if train.packing and train.packing_bin == "micro_batch":
        return 1, train.per_device_train_batch_size * max_length(train)
    return train.per_device_train_batch_size, max_length(train)


def eval_model(cfg: RunConfig) -> str:
    """What eval and serve load as the fine-tuned model: eval.model, with "auto" = "adapter" (MXFP4 base +
    adapter, unmerged) when model.experts_dtype=mxfp4, else "merged"."""
    if cfg.eval.model != "auto":
        return cfg.eval.model
    return "adapter" if cfg.model.experts_dtype == "mxfp4" else "merged"


def mxfp4_resident(cfg: RunConfig) -> bool:
    """The experts stay the checkpoint's MXFP4 blocks in every stage (the tiny CPU model is built in bf16): training
    dequantizes them per layer, the merge streams shard by shard (no model built), and eval/serve with
    eval.model=adapter load the MXFP4 base + adapter unmerged."""
    return cfg.model.experts_dtype == "mxfp4" and not cfg.model.tiny
