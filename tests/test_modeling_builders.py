"""Pure config → DeepSpeed JSON / SFTConfig kwargs / LoraConfig translations (golden), plus the tiny base.

The Hub is faked only by forcing huggingface_hub offline (it is unreachable from CI anyway)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptoss_hpc.config import compose, to_run_config
from gptoss_hpc.errors import ResourceNotReachableError
from gptoss_hpc.modeling.deepspeed import render_deepspeed_config
from gptoss_hpc.modeling.lora import build_lora_config, lora_kwargs
from gptoss_hpc.modeling.sft import build_sft_config_kwargs
from gptoss_hpc.paths import PointPaths

POINT = PointPaths(Path("/runs/demo/20261125-081500/p000"))


def cfg_of(*overrides: str):
    return to_run_config(compose(list(overrides)))


GPU = ("cluster=coreweave_h100", "cluster.partition=h100")

GOLDEN_DS_GPU = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": True},
    "fp16": {"enabled": False},
    "zero_optimization": {
        "stage": 2,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": "auto",
        "allgather_partitions": True,
        "allgather_bucket_size": 200000000,
    },
    "steps_per_print": 1000000000,
    "wall_clock_breakdown": False,
}


def test_deepspeed_json_default_gpu_config():
    ds = render_deepspeed_config(cfg_of(*GPU), world_size=8)
    assert ds == GOLDEN_DS_GPU
    assert "optimizer" not in ds and "scheduler" not in ds  # HF's optimizer: no fused_adam JIT compile
    json.dumps(ds)  # serialisable as is


def test_overlap_comm_is_off_for_one_rank_unless_set():
    """One rank has nothing to overlap, and DeepSpeed's overlap_comm waits for the whole device after every
    micro-batch's backward (5 device syncs per optimizer step on the H200 profile, docs/BENCHMARKS.md, 2026-11-30,
    f7aac5b)."""
    assert render_deepspeed_config(cfg_of(*GPU), world_size=1)["zero_optimization"]["overlap_comm"] is False
    assert render_deepspeed_config(cfg_of(*GPU), world_size=2)["zero_optimization"]["overlap_comm"] is True
    on = cfg_of(*GPU, "train.zero.overlap_comm=true")
    assert render_deepspeed_config(on, world_size=1)["zero_optimization"]["overlap_comm"] is True
    off = cfg_of(*GPU, "train.zero.overlap_comm=false")
    assert render_deepspeed_config(off, world_size=8)["zero_optimization"]["overlap_comm"] is False


def test_deepspeed_json_cpu_and_offload():
    ds = render_deepspeed_config(cfg_of("train.zero.offload_optimizer=true", "train.zero.stage=1"), world_size=1)
    assert ds["bf16"] == {"enabled": False}  # default cluster is local CPU: fp32
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}


GOLDEN_SFT_GPU = {
    "output_dir": "/runs/demo/20261125-081500/p000/train",
    "learning_rate": 2e-4,
    "num_train_epochs": 10.0,
    "max_steps": -1,
    # train.packing_bin=micro_batch: each micro-batch is one packed bin of 4 x 2048 tokens
    "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "max_length": 8192,
    "warmup_steps": 0.03,
    "lr_scheduler_type": "cosine_with_min_lr",
    "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "optim": "adamw_torch",
    "gradient_checkpointing": False,
    "gradient_checkpointing_kwargs": None,
    "bf16": True,
    "use_cpu": False,
    "assistant_only_loss": True,
    "completion_only_loss": True,
    "packing": True,
    "padding_free": False,
    "pad_to_multiple_of": 8192,
    "use_liger_kernel": False,
    "logging_steps": 1,
    "logging_nan_inf_filter": False,
    "include_num_input_tokens_seen": "non_padding",
    "save_strategy": "steps",
    "save_steps": 100,
    "save_total_limit": 2,
    "seed": 42,
    "data_seed": 42,
    "dataloader_num_workers": 2,
    "accelerator_config": {"non_blocking": True},
    "ddp_find_unused_parameters": False,
    "ddp_timeout": 1800,
    "report_to": ["tensorboard"],
    "run_name": "gptoss-p000",
    "push_to_hub": False,
    "eval_strategy": "no",
    "disable_tqdm": True,
    "deepspeed": "/runs/demo/20261125-081500/p000/train/deepspeed.json",
}


def test_sft_kwargs_default_gpu_config():
    kwargs = build_sft_config_kwargs(cfg_of(*GPU), POINT, env={"HF_TOKEN": "hf_secret"})
    assert kwargs == GOLDEN_SFT_GPU
    assert "hub_token" not in kwargs and "hf_secret" not in json.dumps(kwargs)


def test_sft_kwargs_packing_bin():
    # TRL's own packing: bins of max_length, per_device_train_batch_size of them flattened per micro-batch
    trl_bins = build_sft_config_kwargs(cfg_of(*GPU, "train.packing_bin=max_length"), POINT, env={})
    assert (trl_bins["per_device_train_batch_size"], trl_bins["max_length"]) == (4, 2048)
    # unpacked rows are rows whatever the bin says
    unpacked = build_sft_config_kwargs(cfg_of(*GPU, "train.packing=false"), POINT, env={})
    assert (unpacked["per_device_train_batch_size"], unpacked["max_length"]) == (4, 2048)
    # the compile bound is the same token budget either way: one shape
    assert trl_bins["pad_to_multiple_of"] == GOLDEN_SFT_GPU["pad_to_multiple_of"] == 4 * 2048


def test_sft_kwargs_pad_to_multiple_of_bounds_shapes_for_compiled_layers():
    # model.compile_layers (GPU presets) + no checkpointing (train=default): the layers compile, so the packed,
    # flattened micro-batch is padded to per_device_train_batch_size x max_length: one shape, no recompiles
    assert build_sft_config_kwargs(cfg_of(*GPU), POINT, env={})["pad_to_multiple_of"] == 4 * 2048
    short = cfg_of(*GPU, "train.max_length=512")
    assert build_sft_config_kwargs(short, POINT, env={})["pad_to_multiple_of"] == 4 * 512
    unpacked = cfg_of(*GPU, "train.packing=false")  # padded rows: a few lengths
    assert build_sft_config_kwargs(unpacked, POINT, env={})["pad_to_multiple_of"] == 1024
    mine = cfg_of(*GPU, "train.pad_to_multiple_of=64")
    assert build_sft_config_kwargs(mine, POINT, env={})["pad_to_multiple_of"] == 64
    # checkpointed layers are not compiled (unmeasured pair), so nothing to bound
    reference = cfg_of(*GPU, "train=reference")
    ref_kwargs = build_sft_config_kwargs(reference, POINT, env={})
    assert ref_kwargs["pad_to_multiple_of"] is None
    assert ref_kwargs["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    # MXFP4 experts compile their core (static shapes) on the GPU with checkpointing too: what train.fit_memory
    # picks for a 24 GiB card recompiled at each new packed length before this bound (~12 s each on the H200)
    fit24 = cfg_of(*GPU, "model.experts_dtype=mxfp4", "train.gradient_checkpointing=true")
    assert build_sft_config_kwargs(fit24, POINT, env={})["pad_to_multiple_of"] == 4 * 2048
    # the fused bf16 core compiles without checkpointing even when the layers do not
    fused_only = cfg_of(*GPU, "model.compile_layers=false")
    assert build_sft_config_kwargs(fused_only, POINT, env={})["pad_to_multiple_of"] == 4 * 2048
    eager = cfg_of(*GPU, "model.compile_layers=false", "model.fused_experts=false")
    assert build_sft_config_kwargs(eager, POINT, env={})["pad_to_multiple_of"] is None


def test_sft_kwargs_demo_cpu_wandb_and_sweep_name(tmp_path):
    run = tmp_path / "run"
    (run / "p001").mkdir(parents=True)
    manifest = {"points": [{"index": 1, "overrides": ["lora.r=16", "train.learning_rate=1e-4"], "dir": "p001"}]}
    (run / "launch.json").write_text(json.dumps(manifest))
    kwargs = build_sft_config_kwargs(
        cfg_of("experiment=demo", "train.lr_scheduler_type=linear"),
        PointPaths(run / "p001"),
        env={"WANDB_API_KEY": "x"},
    )
    assert kwargs["use_cpu"] is True and kwargs["bf16"] is False
    assert "deepspeed" not in kwargs  # demo: train.deepspeed=false
    assert kwargs["lr_scheduler_kwargs"] == {}
    assert kwargs["report_to"] == ["tensorboard", "wandb"]
    assert kwargs["run_name"] == "demo-p001-lora.r=16,train.learning_rate=1e-4"
    assert kwargs["gradient_checkpointing_kwargs"] is None


def test_sft_kwargs_build_a_real_sftconfig(tmp_path):
    from trl import SFTConfig

    kwargs = build_sft_config_kwargs(cfg_of("experiment=demo"), PointPaths(tmp_path / "p000"), env={})
    args = SFTConfig(**kwargs)
    assert args.lr_scheduler_type.value == "cosine_with_min_lr" and args.use_cpu and not args.bf16
    assert args.hub_token is None and args.push_to_hub is False


def test_lora_kwargs_presets():
    experts = lora_kwargs(cfg_of())
    assert experts["target_modules"] == []
    assert experts["target_parameters"] == [
        f"{i}.mlp.experts.{p}" for i in (7, 15, 23) for p in ("gate_up_proj", "down_proj")
    ]
    assert (experts["r"], experts["lora_alpha"], experts["task_type"]) == (8, 16, "CAUSAL_LM")
    attention = lora_kwargs(cfg_of("lora=attention"))
    assert attention["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert attention["target_parameters"] is None and attention["lora_dropout"] == 0.05
    all_linear = lora_kwargs(cfg_of("lora=all_linear", "model=gpt_oss_120b"))
    assert all_linear["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]  # not lm_head, not router
    # gpt-oss-120b has 36 layers: 7/15/23 of 24 scale to 11/23/35
    assert [p.split(".")[0] for p in all_linear["target_parameters"]] == ["11", "11", "23", "23", "35", "35"]


@pytest.mark.parametrize("preset", ["experts", "attention", "all_linear"])
def test_lora_applies_to_the_tiny_model(preset, tmp_path):
    from peft import get_peft_model

    from gptoss_hpc.modeling.model import load_base_model

    cfg = cfg_of("experiment=demo", "model.tokenizer=tiny-bpe", f"lora={preset}")
    model = get_peft_model(load_base_model(cfg, None, for_training=True), build_lora_config(cfg))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lm_head" in n or "router" in n or "embed" in n for n in trainable)
    has_experts = any("experts" in n for n in trainable)
    has_attn = any("q_proj" in n for n in trainable)
    assert (has_experts, has_attn) == {
        "experts": (True, False),
        "attention": (False, True),
        "all_linear": (True, True),
    }[preset]


def test_tiny_base_is_seeded_saved_once_and_reloaded(tmp_path):
    import torch

    from gptoss_hpc.modeling.model import base_dir_for, load_base_model

    cfg = cfg_of("experiment=demo", "model.tokenizer=tiny-bpe")
    paths = PointPaths(tmp_path / "p000")
    first = load_base_model(cfg, paths, for_training=True)
    assert base_dir_for(cfg, paths) == str(paths.base) and (paths.base / "model.safetensors").is_file()
    again = load_base_model(cfg, paths, for_training=False)
    rebuilt = load_base_model(cfg, None, for_training=True)  # same seed, no file: same weights
    for (name, a), b, c in zip(
        first.state_dict().items(), again.state_dict().values(), rebuilt.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b) and torch.equal(a, c), name
    assert first.config.vocab_size == len(
        __import__("gptoss_hpc.modeling.tokenizer").modeling.tokenizer.load_tokenizer(cfg.model)
    )
    assert again.config.use_cache is True and first.config.use_cache is False


def test_check_reachable_hub_model_offline(monkeypatch):
    import huggingface_hub.constants

    from gptoss_hpc.modeling.model import check_reachable

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ResourceNotReachableError) as err:
        check_reachable(cfg_of("model.name_or_path=openai/gpt-oss-nope", "model.tokenizer=offline"))
    assert "openai/gpt-oss-nope" in str(err.value) and "HF_TOKEN" in str(err.value)
    check_reachable(cfg_of("experiment=demo"))  # tiny + offline tokenizer: nothing to reach
