"""Validation of a composed RunConfig: every problem is collected and raised once, as ConfigError.

Each message names the key, the value it got and the fix. Nothing here imports torch, so a 64-point sweep
validates in milliseconds before the first sbatch.
"""

from __future__ import annotations

import re
from pathlib import Path

from gptoss_hpc.config import derive
from gptoss_hpc.config.schema import STAGES, RunConfig
from gptoss_hpc.config.site import site_problems
from gptoss_hpc.errors import ConfigError

BACKENDS = ("local", "slurm")
ACCELERATORS = ("gpu", "cpu")
CONTAINERS = ("none", "apptainer", "pyxis")
PREEMPT_SIGNALS = ("USR2", "TERM")
DTYPES = ("bfloat16", "float16", "float32")
ATTN = ("eager", "flex_attention", "sdpa", "kernels-community/vllm-flash-attn3")
EXPERTS = (None, "eager", "grouped_mm", "batched_mm")
DATA_SOURCES = ("hub", "local", "sample")
LENGTH_POLICIES = ("refuse", "drop", "truncate")
MULTI_TURN_POLICIES = ("last", "split")  # gptoss_hpc.data.turns (not imported: keep validate light)
LORA_BIAS = ("none", "all", "lora_only")
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay",
)  # fmt: skip
_MEM_RE = re.compile(r"^\d+[KMGT]?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def validate(cfg: RunConfig) -> RunConfig:
    problems = [*_run(cfg), *_cluster(cfg), *_model(cfg), *_lora(cfg), *_data(cfg), *_train(cfg), *_eval(cfg)]
    if cfg.train.extra:  # imports trl: only when asked
        from gptoss_hpc.modeling.sft import extra_problems

        problems += extra_problems(cfg.train.extra)
    if not problems:  # the estimate reads the other keys: only once they are valid
        from gptoss_hpc.config.fit import memory_problems

        problems = memory_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def _one_of(key: str, value: object, allowed: tuple, where: str) -> list[str]:
    if value in allowed:
        return []
    shown = ", ".join(str(a) for a in allowed)
    return [f"{key} must be one of {shown} (got {value!r}); set it in {where}"]


def _at_least(key: str, value: float | int, low: float | int, fix: str) -> list[str]:
    return [] if value >= low else [f"{key} must be >= {low} (got {value}); {fix}"]


def _run(cfg: RunConfig) -> list[str]:
    p: list[str] = []
    if not _NAME_RE.match(cfg.name or ""):
        p.append(f"name must be letters, digits, '.', '_' or '-' (got {cfg.name!r}); it names dirs and jobs")
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        p.append(f"stages has unknown stage(s) {unknown}; choose from {list(STAGES)}, e.g. stages=[train]")
    if not cfg.stages:
        p.append("stages is empty; give at least one, e.g. stages=[train]")
    order = [s for s in STAGES if s in cfg.stages]
    for stage in ("merge", "eval"):
        if stage in cfg.stages and "train" not in cfg.stages:
            p.append(f"stages has {stage} without train; a {stage} job needs this launch's adapter")
    merged = derive.eval_model(cfg) == "merged"  # eval.model=adapter runs adapter/ unmerged: no merge needed
    if "serve" in cfg.stages and "merge" not in cfg.stages and merged:
        p.append("stages has serve without merge; serve runs the merged model: add merge (or eval.model=adapter)")
    if "eval" in cfg.stages and "merge" not in cfg.stages and merged:
        p.append(
            "stages has eval without merge; eval scores the merged model: add merge, drop eval or eval.model=adapter"
        )
    if "report" in cfg.stages and not set(order) & {"train", "merge", "eval"}:
        p.append("stages=[report] alone has nothing to report; run `python -m gptoss_hpc.report RUN_DIR`")
    return p


def _cluster(cfg: RunConfig) -> list[str]:
    c, p = cfg.cluster, []
    p += _one_of("cluster.backend", c.backend, BACKENDS, "conf/cluster/<name>.yaml")
    p += _one_of("cluster.accelerator", c.accelerator, ACCELERATORS, "conf/cluster/<name>.yaml")
    p += _at_least("cluster.nodes", c.nodes, 1, "set cluster.nodes=1 or more")
    if c.accelerator == "gpu":
        p += _at_least("cluster.gpus_per_node", c.gpus_per_node, 1, "set it in conf/cluster/<name>.yaml")
    elif c.gpus_per_node < 0:
        p.append(f"cluster.gpus_per_node must be >= 0 (got {c.gpus_per_node})")
    if c.tasks_per_node is not None:
        p += _at_least("cluster.tasks_per_node", c.tasks_per_node, 1, "or leave it null (one rank per GPU)")
        if c.accelerator == "gpu" and c.gpus_per_node >= 1 and c.tasks_per_node != c.gpus_per_node:
            p.append(
                f"cluster.tasks_per_node ({c.tasks_per_node}) must equal cluster.gpus_per_node "
                f"({c.gpus_per_node}): one rank per GPU; leave tasks_per_node null"
            )
    p += _at_least("cluster.cpus_per_task", c.cpus_per_task, 1, "set cluster.cpus_per_task")
    tasks = derive.tasks_per_node(c)
    if c.cpus_per_node is not None and c.cpus_per_task * tasks > c.cpus_per_node:
        p.append(
            f"cluster.cpus_per_task ({c.cpus_per_task}) x {tasks} tasks per node = {c.cpus_per_task * tasks} "
            f"exceeds the node's {c.cpus_per_node} CPUs (cluster.cpus_per_node); lower cluster.cpus_per_task "
            "or the job stays PENDING forever"
        )
    if c.gpus_per_node_max is not None and c.gpus_per_node > c.gpus_per_node_max:
        p.append(
            f"cluster.gpus_per_node ({c.gpus_per_node}) exceeds the node's {c.gpus_per_node_max} GPUs "
            "(cluster.gpus_per_node_max); add nodes instead"
        )
    if c.aux_gpus < 0 or (c.gpus_per_node_max is not None and c.aux_gpus > c.gpus_per_node_max):
        p.append(f"cluster.aux_gpus must be between 0 and the node's GPUs (got {c.aux_gpus})")
    for key, value in (("cluster.time", c.time), ("cluster.aux_time", c.aux_time)):
        minutes = derive.slurm_time_minutes(value)
        if minutes is None:
            p.append(f"{key} {value!r} is not Slurm time syntax; use HH:MM:SS, D-HH:MM:SS or minutes")
        elif minutes < 1:
            p.append(f"{key} must be at least one minute (got {value!r})")
    minutes = derive.slurm_time_minutes(c.time)
    if minutes is not None and c.signal_delay_s >= minutes * 60:
        p.append(
            f"cluster.signal_delay_s ({c.signal_delay_s}) is not shorter than cluster.time ({c.time}); "
            "the checkpoint signal would come before training starts"
        )
    p += _at_least("cluster.signal_delay_s", c.signal_delay_s, 0, "seconds before the time limit")
    p += _at_least("cluster.array_parallelism", c.array_parallelism, 1, "the %N cap of the job array")
    p += _at_least("cluster.max_requeues", c.max_requeues, 0, "how often a preempted job requeues")
    p += _one_of("cluster.preempt_signal", c.preempt_signal, PREEMPT_SIGNALS, "conf/cluster/<name>.yaml")
    if c.gpus_per_task is not None and c.gpus_per_task != 1:
        p.append(f"cluster.gpus_per_task must be 1 or null (got {c.gpus_per_task}): one rank per GPU")
    for key, value in (("cluster.mem", c.mem), ("cluster.mem_per_gpu", c.mem_per_gpu)):
        if value is not None and not _MEM_RE.match(str(value)):
            p.append(f"{key} {value!r} is not sbatch memory syntax; use e.g. 200G, 512000M or 0")
    if c.mem is not None and c.mem_per_gpu is not None:
        p.append("cluster.mem and cluster.mem_per_gpu are mutually exclusive in sbatch; set one to null")
    if c.backend == "slurm" and not c.partition:
        p.append("cluster.partition is required on Slurm clusters; set cluster.partition=<name> (`sinfo -s`)")
    if c.backend == "local" and c.nodes != 1:
        p.append(f"cluster.nodes must be 1 for the local backend (got {c.nodes}); use a Slurm cluster")
    if c.backend == "local" and c.accelerator == "cpu" and c.tasks_per_node not in (None, 1):
        pass  # several local CPU ranks are fine: submitit's local executor starts them
    p += _one_of("cluster.container.kind", c.container.kind, CONTAINERS, "conf/cluster/<name>.yaml")
    if c.container.kind != "none" and not c.container.image:
        p.append(f"cluster.container.image is required for container kind {c.container.kind!r}")
    if c.container.kind == "pyxis" and c.backend != "slurm":
        p.append("cluster.container.kind=pyxis needs backend=slurm (pyxis is an srun plugin)")
    for name in c.env:
        if name.upper() in ("HF_TOKEN", "WANDB_API_KEY", "HUGGING_FACE_HUB_TOKEN", "SERVE_API_KEY"):
            p.append(
                f"cluster.env.{name} is a secret and would be written into files; export it in your shell "
                "instead (jobs inherit it at submission, see README 'Secrets')"
            )
    p += _at_least("cluster.sbatch_retries", c.sbatch_retries, 0, "0 = no retry of a failed sbatch")
    if c.sbatch_retry_delay_s < 0:
        p.append(f"cluster.sbatch_retry_delay_s must be >= 0 (got {c.sbatch_retry_delay_s})")
    backoff = c.sbatch_retry_delay_s * (2 ** max(c.sbatch_retries, 0) - 1)
    if backoff >= 50:
        # A job that a failed sbatch did create waits 60 s (submitit) for its pickle, written once it is adopted.
        p.append(
            f"cluster.sbatch_retries={c.sbatch_retries} with cluster.sbatch_retry_delay_s={c.sbatch_retry_delay_s} "
            f"waits up to {backoff:g} s in all; keep it under 50 s (e.g. 3 retries x 5 s = 35 s)"
        )
    p += site_problems(cfg)  # values rendered into job scripts: no injection (gptoss_hpc.config.site)
    return p


def _model(cfg: RunConfig) -> list[str]:
    m, p = cfg.model, []
    if not m.name_or_path:
        p.append("model.name_or_path is empty; set a Hub id (openai/gpt-oss-20b) or a local path")
    p += _at_least("model.num_hidden_layers", m.num_hidden_layers, 1, "match the model's config.json")
    p += _one_of("model.dtype", m.dtype, DTYPES, "conf/model/<name>.yaml")
    p += _one_of("model.attn_implementation", m.attn_implementation, ATTN, "the model yaml")
    if m.attn_implementation == "sdpa":
        p.append("model.attn_implementation=sdpa is not supported by gpt-oss (attention sinks); use "
                 "flex_attention or eager")  # fmt: skip
    p += _one_of("model.experts_implementation", m.experts_implementation, EXPERTS, "the model yaml")
    p += _one_of("model.experts_dtype", m.experts_dtype, ("bfloat16", "mxfp4"), "the model yaml")
    if m.experts_dtype == "mxfp4" and m.tiny:
        p.append(
            "model.experts_dtype=mxfp4 needs an MXFP4 checkpoint (model.name_or_path=<folder with *_blocks/"
            "*_scales shards>); the tiny model is built in bf16/fp32: use model.experts_dtype=bfloat16"
        )
    if m.tiny:
        from gptoss_hpc.resources import tiny_config_path

        if not tiny_config_path(m.tiny_config).exists():
            p.append(f"model.tiny_config {m.tiny_config!r} is not in gptoss_hpc/resources/; use tiny_gpt_oss")
    elif m.tokenizer == "tiny-bpe":
        p.append("model.tokenizer=tiny-bpe only fits the tiny model (its vocab is sized to it)")
    if cfg.cluster.accelerator == "cpu" and m.dtype == "float16":
        p.append("model.dtype=float16 does not train on CPU; use float32 or bfloat16")
    if cfg.cluster.accelerator == "gpu" and m.tiny is False and m.dtype == "float32":
        p.append("model.dtype=float32 doubles the memory of a 20b model; use bfloat16 on GPUs")
    return p


def _lora(cfg: RunConfig) -> list[str]:
    lo, p = cfg.lora, []
    p += _at_least("lora.r", lo.r, 1, "LoRA rank, e.g. lora.r=8")
    if not lo.lora_alpha > 0:
        p.append(f"lora.lora_alpha must be > 0 (got {lo.lora_alpha}); commonly 2 x lora.r")
    if not 0.0 <= lo.lora_dropout < 1.0:
        p.append(f"lora.lora_dropout must be in [0, 1) (got {lo.lora_dropout})")
    p += _one_of("lora.bias", lo.bias, LORA_BIAS, "conf/lora/<name>.yaml")
    layers = derive.expert_layers(lo, cfg.model.num_hidden_layers)
    bad = [i for i in layers if not 0 <= i < cfg.model.num_hidden_layers]
    if bad:
        p.append(
            f"lora.expert_layers {bad} out of range for {cfg.model.name_or_path} "
            f"({cfg.model.num_hidden_layers} layers: 0..{cfg.model.num_hidden_layers - 1}); "
            "use indices below model.num_hidden_layers or null for the scaled default"
        )
    unknown = [x for x in lo.expert_params if x not in EXPERT_PARAMS]
    if unknown:
        p.append(f"lora.expert_params has {unknown}; gpt-oss experts have {list(EXPERT_PARAMS)}")
    tm = lo.target_modules
    if isinstance(tm, str) and tm != "all-linear":
        p.append(f"lora.target_modules {tm!r}: give a list of module names or 'all-linear'")
    if not tm and not layers:
        p.append("lora has no targets: set lora.target_modules or lora.expert_layers (or use lora=experts)")
    return p


def _data(cfg: RunConfig) -> list[str]:
    d, p = cfg.data, []
    p += _one_of("data.source", d.source, DATA_SOURCES, "conf/data/<name>.yaml")
    if d.source == "hub" and not d.name:
        p.append("data.name is required for data.source=hub; e.g. HuggingFaceH4/Multilingual-Thinking")
    if d.source == "local":
        if not d.path:
            p.append("data.path is required for data.source=local; data.path=/path/to/train.jsonl")
        else:
            p += _data_path("data.path", d.path)
    if d.eval_path:
        p += _data_path("data.eval_path", d.eval_path)
    if not 0.0 <= d.eval_fraction < 1.0:
        p.append(f"data.eval_fraction must be in [0, 1) (got {d.eval_fraction}); 0 = no held-out split")
    if "eval" in cfg.stages and d.eval_fraction == 0.0 and not d.eval_path:
        p.append("the eval stage needs held-out rows: set data.eval_fraction>0 or data.eval_path")
    p += _one_of("data.max_length_policy", d.max_length_policy, LENGTH_POLICIES, "the data yaml")
    p += _one_of("data.multi_turn", d.multi_turn, MULTI_TURN_POLICIES, "the data yaml")
    if d.max_rows is not None:
        p += _at_least("data.max_rows", d.max_rows, 1, "or null for all rows")
    if not d.messages_field:
        p.append("data.messages_field is empty; the column holding the chat turns (usually messages)")
    return p


def _data_path(key: str, value: str) -> list[str]:
    path = Path(value).expanduser()
    if not path.exists():
        return [f"{key} {value!r} does not exist (checked from {Path.cwd()}); give an existing file or folder"]
    if path.is_file() and not value.endswith(_DATA_SUFFIXES):
        return [f"{key} {value!r}: expected a {', '.join(_DATA_SUFFIXES)} file"]
    return []


def _train(cfg: RunConfig) -> list[str]:
    t, p = cfg.train, []
    if not t.learning_rate > 0:
        p.append(f"train.learning_rate must be > 0 (got {t.learning_rate}); the reference is 2e-4")
    elif t.learning_rate > 1.0:
        p.append(f"train.learning_rate={t.learning_rate} is > 1; did you mean {t.learning_rate:g}e-4?")
    if t.max_steps <= 0 and not t.num_train_epochs > 0:
        p.append(f"train.num_train_epochs must be > 0 (got {t.num_train_epochs}) unless train.max_steps > 0")
    if t.max_steps == 0 or t.max_steps < -1:
        p.append(f"train.max_steps must be -1 (use epochs) or >= 1 (got {t.max_steps})")
    p += _at_least("train.per_device_train_batch_size", t.per_device_train_batch_size, 1, "e.g. 2")
    p += _at_least("train.per_device_eval_batch_size", t.per_device_eval_batch_size, 1, "e.g. 2")
    p += _at_least("train.gradient_accumulation_steps", t.gradient_accumulation_steps, 1, "e.g. 8")
    if t.gradient_checkpointing_offload and not t.gradient_checkpointing:
        p.append(
            "train.gradient_checkpointing_offload=true needs train.gradient_checkpointing=true (it moves the "
            "checkpointed layer inputs to host memory; without recompute there are none)"
        )
    if t.max_length is not None:
        p += _at_least("train.max_length", t.max_length, 1, "tokens per row, e.g. 2048, or auto (follow the data)")
    if not 0.0 <= t.warmup_ratio < 1.0:
        p.append(f"train.warmup_ratio must be in [0, 1) (got {t.warmup_ratio})")
    p += _one_of("train.lr_scheduler_type", t.lr_scheduler_type, SCHEDULERS, "the train yaml")
    if not 0.0 <= t.min_lr_rate <= 1.0:
        p.append(f"train.min_lr_rate must be in [0, 1] (got {t.min_lr_rate}); a fraction of learning_rate")
    if t.weight_decay < 0:
        p.append(f"train.weight_decay must be >= 0 (got {t.weight_decay})")
    if not t.max_grad_norm > 0:
        p.append(f"train.max_grad_norm must be > 0 (got {t.max_grad_norm})")
    p += _at_least("train.logging_steps", t.logging_steps, 1, "log every N optimizer steps")
    p += _at_least("train.save_steps", t.save_steps, 1, "checkpoint every N optimizer steps")
    p += _at_least("train.save_total_limit", t.save_total_limit, 1, "keep at least the newest checkpoint")
    p += _at_least("train.dataloader_num_workers", t.dataloader_num_workers, 0, "0 = main process")
    if t.deepspeed and t.zero.stage not in (1, 2):
        p.append(
            f"train.zero.stage must be 1 or 2 (got {t.zero.stage}): stage 3 would shard the frozen base weights, "
            "but the fused expert LoRA and the MXFP4-resident experts read whole expert stacks (untested under "
            "ZeRO-3's gather hooks), and the LoRA state it would also shard is tiny. To fit a model per GPU use "
            "model.experts_dtype=mxfp4 (experts at ~1/4 of bf16), a smaller train.per_device_train_batch_size, or "
            "train.gradient_checkpointing=true; `python -m gptoss_hpc.plan` shows what fits"
        )
    if t.bf16 and cfg.model.dtype == "float16":
        p.append("train.bf16=true with model.dtype=float16: pick one precision (bfloat16 on H100/H200)")
    # train.packing / padding_free run with any attention: the train stage builds per-sequence masks from the
    # position_ids (gptoss_hpc.modeling.fast.isolate_packed_sequences), eager included (tests/test_fast_path.py).
    # Every combination of model.fused_experts, model.compile_layers, train.gradient_checkpointing, train.packing,
    # LoRA preset and 1-2 ranks runs (tests/test_knob_combinations.py on CPU, launchers/gpu_check.sh on the GPU);
    # compile_layers with checkpointing leaves the layers eager (logged). The refusals are the loss rule below.
    ranks = derive.world_size(cfg.cluster)
    if t.loss_chunk_tokens > 0 and ranks > 1 and not t.deepspeed:
        p.append(
            f"train.loss_chunk_tokens={t.loss_chunk_tokens} with {ranks} ranks needs train.deepspeed=true (the "
            "fused loss bypasses DDP's forward, which its gradient sync needs); or set train.loss_chunk_tokens=0"
        )
    p += _one_of("train.packing_bin", t.packing_bin, ("micro_batch", "max_length"), "the train yaml")
    if t.pad_to_multiple_of is not None and t.pad_to_multiple_of < 1:
        p.append(f"train.pad_to_multiple_of must be >= 1 or null (got {t.pad_to_multiple_of})")
    if t.loss_chunk_tokens < 0:
        p.append(f"train.loss_chunk_tokens must be >= 0 (got {t.loss_chunk_tokens}); 0 = TRL's full-logits loss")
    p += _at_least("train.ddp_timeout", t.ddp_timeout, 1, "seconds a collective waits for a peer, e.g. 1800")
    if t.divergence_spike_factor != 0 and not t.divergence_spike_factor > 1:
        p.append(
            f"train.divergence_spike_factor must be 0 (off) or > 1 (got {t.divergence_spike_factor}); e.g. 10 stops a "
            "run whose loss stays above 10x its recent median"
        )
    p += _at_least("train.divergence_spike_steps", t.divergence_spike_steps, 1, "logged steps in a row, e.g. 3")
    if t.hub_model_id is not None and "/" not in t.hub_model_id:
        p.append(f"train.hub_model_id {t.hub_model_id!r} must be <user-or-org>/<name>")
    return p


def _eval(cfg: RunConfig) -> list[str]:
    e, p = cfg.eval, []
    p += _at_least("eval.max_new_tokens", e.max_new_tokens, 1, "tokens generated per prompt")
    if e.max_eval_rows is not None:
        p += _at_least("eval.max_eval_rows", e.max_eval_rows, 1, "or null for the whole held-out split")
    for i, prompt in enumerate(e.prompts):
        if not prompt.get("user"):
            p.append(f"eval.prompts[{i}] has no 'user' text; each prompt is {{system: ..., user: ...}}")
    p += _one_of("eval.model", e.model, ("auto", "merged", "adapter"), "the command line (eval.model=adapter)")
    p += _one_of("merge.format", cfg.merge.format, ("bf16", "mxfp4"), "the command line (merge.format=mxfp4)")
    if cfg.merge.format == "mxfp4" and cfg.model.experts_dtype != "mxfp4":
        p.append(
            "merge.format=mxfp4 re-quantizes into the base checkpoint's MXFP4 experts: it needs "
            "model.experts_dtype=mxfp4 (the streaming merge); use merge.format=bf16"
        )
    return p
