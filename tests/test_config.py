"""Composition and validation of every shipped YAML, and the validation messages a user sees."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from gptoss_hpc.config import (
    compose,
    conf_dir,
    derive,
    load_run_config,
    save_run_config,
    to_run_config,
    validate,
)
from gptoss_hpc.errors import ConfigError

GROUPS = ["cluster", "model", "lora", "data", "train", "experiment"]
# Site fields a generic file leaves ??? on purpose, and what a user would pass for them.
SITE_OVERRIDES = {
    ("cluster", "slurm"): ["cluster.partition=gpu"],
    ("data", "local"): [],
    ("model", "local"): ["model.name_or_path=/data/gpt-oss-20b", "model.num_hidden_layers=24"],
}


def _options() -> list[tuple[str, str]]:
    return [(g, p.stem) for g in GROUPS for p in sorted((conf_dir() / g).glob("*.yaml"))]


def test_every_group_has_options() -> None:
    found = {g for g, _ in _options()}
    assert found == set(GROUPS)


@pytest.mark.parametrize(("group", "option"), _options())
def test_every_shipped_yaml_composes_and_validates(group: str, option: str, tmp_path: Path) -> None:
    overrides = [f"{group}={option}", *SITE_OVERRIDES.get((group, option), [])]
    if (group, option) == ("data", "local"):
        data = tmp_path / "train.jsonl"
        data.write_text('{"messages": []}\n')
        overrides.append(f"data.path={data}")
    cfg = validate(to_run_config(compose(overrides)))
    assert cfg.name
    text = (conf_dir() / group / f"{option}.yaml").read_text()
    assert text.startswith("#"), f"conf/{group}/{option}.yaml must start with a comment giving its command"


def test_defaults_are_the_fast_setting_and_reference_is_the_cookbook_recipe() -> None:
    cfg = to_run_config(compose([]))
    t = cfg.train
    # train=default: packing, no recompute, 4 x 2048 x GA 2, compiled layers + fused experts (the 20b preset)
    assert (t.learning_rate, t.num_train_epochs, t.per_device_train_batch_size) == (2e-4, 10, 4)
    # max_length None = auto: the launch measures the data and decides (tests/test_length_auto.py)
    assert (t.gradient_accumulation_steps, t.max_length, t.warmup_ratio) == (2, None, 0.03)
    assert (t.packing, t.gradient_checkpointing, t.no_grad_below_first_lora, t.loss_chunk_tokens) == (
        True,
        False,
        True,
        4096,
    )
    assert (cfg.model.fused_experts, cfg.model.compile_layers) == (True, True)
    assert to_run_config(compose(["train=fast"])).train == t  # the old name of the same setting
    ref = to_run_config(compose(["train=reference"])).train
    assert (ref.learning_rate, ref.num_train_epochs, ref.per_device_train_batch_size) == (2e-4, 10, 2)
    assert (ref.gradient_accumulation_steps, ref.max_length, ref.warmup_ratio) == (8, 2048, 0.03)
    assert (ref.lr_scheduler_type, ref.min_lr_rate, ref.gradient_checkpointing, ref.bf16, ref.packing) == (
        "cosine_with_min_lr",
        0.1,
        True,
        True,
        False,
    )
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.lora_dropout) == (8, 16, 0.0)
    assert derive.target_parameters(cfg.lora, cfg.model) == [
        "7.mlp.experts.gate_up_proj", "7.mlp.experts.down_proj",
        "15.mlp.experts.gate_up_proj", "15.mlp.experts.down_proj",
        "23.mlp.experts.gate_up_proj", "23.mlp.experts.down_proj",
    ]  # fmt: skip
    assert cfg.model.name_or_path == "openai/gpt-oss-20b" and cfg.data.name == "HuggingFaceH4/Multilingual-Thinking"


def test_expert_layers_scale_with_depth() -> None:
    cfg = to_run_config(compose(["model=gpt_oss_120b"]))
    assert derive.expert_layers(cfg.lora, 36) == [11, 23, 35]
    assert derive.expert_layers(cfg.lora, 2) == [0, 1]


def test_all_problems_reported_at_once() -> None:
    cfg = to_run_config(
        compose(["cluster=coreweave_h200", "lora.r=0", "train.learning_rate=-1", "cluster.gpus_per_node=0"])
    )
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    keys = [p.split()[0] for p in err.value.problems]
    assert keys == ["cluster.gpus_per_node", "lora.r", "train.learning_rate"]


BAD = {
    "cluster.nodes=0": "cluster.nodes",
    "cluster.time=12h": "cluster.time",
    "cluster.array_parallelism=0": "cluster.array_parallelism",
    "cluster.cpus_per_task=64": "cluster.cpus_per_task",
    "cluster.mem=lots": "cluster.mem",
    "cluster.tasks_per_node=4": "cluster.tasks_per_node",
    "+cluster.env.HF_TOKEN=x": "cluster.env.HF_TOKEN",
    "lora.lora_alpha=0": "lora.lora_alpha",
    "lora.lora_dropout=1.5": "lora.lora_dropout",
    "lora.expert_layers=[30]": "lora.expert_layers",
    "lora.expert_params=[up_proj]": "lora.expert_params",
    "train.max_length=0": "train.max_length",
    "train.per_device_train_batch_size=0": "train.per_device_train_batch_size",
    "train.gradient_accumulation_steps=0": "train.gradient_accumulation_steps",
    "train.warmup_ratio=1.5": "train.warmup_ratio",
    "train.lr_scheduler_type=cosine_annealing": "train.lr_scheduler_type",
    "train.zero.stage=3": "train.zero.stage",
    "train.max_steps=0": "train.max_steps",
    "model.attn_implementation=sdpa": "model.attn_implementation=sdpa",
    "model.dtype=fp8": "model.dtype",
    "data.source=ftp": "data.source",
    "data.eval_fraction=1.0": "data.eval_fraction",
    "stages=[train,deploy]": "stages",
    "stages=[train,eval]": "stages",
    "name=a/b": "name",
    "train.loss_chunk_tokens=-1": "train.loss_chunk_tokens",
}


@pytest.mark.parametrize(("override", "key"), BAD.items())
def test_each_bad_value_names_its_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(to_run_config(compose(["cluster=coreweave_h200", override])))
    assert any(p.startswith(key) for p in err.value.problems), err.value.problems


def test_chunked_loss_with_several_ddp_ranks_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"train\.loss_chunk_tokens=4096 with 8 ranks needs train\.deepspeed"):
        validate(to_run_config(compose(["cluster=coreweave_h200", "train.deepspeed=false"])))
    validate(to_run_config(compose(["cluster=local_slurm", "experiment=demo"])))  # the README's command


def test_partition_required_on_slurm() -> None:
    with pytest.raises(ConfigError, match=r"cluster\.partition"):
        validate(to_run_config(compose(["cluster=slurm"])))


def test_local_data_path_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.path .* does not exist"):
        validate(to_run_config(compose(["data=local", f"data.path={tmp_path}/nope.jsonl"])))


def test_misspelled_key_is_hydras_error() -> None:
    with pytest.raises(ConfigCompositionException, match=r"lora\.rank"):
        compose(["lora.rank=8"])


def test_config_round_trip(tmp_path: Path) -> None:
    cfg = validate(to_run_config(compose(["experiment=demo", "lora.r=4"])))
    path = save_run_config(cfg, tmp_path / "config.yaml")
    assert load_run_config(path) == cfg
