"""Typed schemas for every config group, registered in Hydra's ConfigStore as ``base_<group>``.

Field names follow the upstream library that consumes them (PEFT ``LoraConfig``, TRL ``SFTConfig``,
Slurm/sbatch), so a TRL/PEFT user can guess ``lora.r`` or ``train.learning_rate``. Values live in
``conf/``; these dataclasses only give types and defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

STAGES = ("train", "merge", "eval", "serve", "report")
# What a launch runs unless `stages=[...]` says otherwise; `serve` (an HTTP endpoint job) is opt-in.
DEFAULT_STAGES = ("train", "merge", "eval", "report")


@dataclass
class ContainerConfig:
    # "none" | "apptainer" (wraps the command in `apptainer exec`) | "pyxis" (srun --container-image)
    kind: str = "none"
    image: str | None = None
    mounts: list[str] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)


@dataclass
class ClusterConfig:
    # "local": submitit's local executor, jobs run as processes on this machine (no Slurm).
    # "slurm": sbatch through submitit.
    backend: str = "local"
    # "gpu": one rank per GPU. "cpu": ranks on CPU with gloo (tests, the local dev cluster's fake GPUs).
    accelerator: str = "gpu"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    nodes: int = 1
    gpus_per_node: int = 1
    # None = one task (rank) per GPU, the only layout DeepSpeed's one-process-per-device model supports.
    tasks_per_node: int | None = None
    cpus_per_task: int = 8
    # Per node, sbatch --mem syntax ("0" = all of it). mem_per_gpu is the alternative some sites require.
    mem: str | None = None
    mem_per_gpu: str | None = None
    # Slurm time syntax: MM, HH:MM:SS, D-HH, D-HH:MM:SS ...
    time: str = "04:00:00"
    # Resources of the site's nodes, for checks that would otherwise leave a job PENDING forever.
    cpus_per_node: int | None = None
    gpus_per_node_max: int | None = None
    # Memory of one GPU in GiB (nominal: H100 80, H200 141): validate refuses a train stage whose estimated peak
    # (gptoss_hpc.config.memory, `python -m gptoss_hpc.plan`) does not fit. null: the local card's for a local GPU
    # cluster (nvidia-smi), else no check.
    gpu_memory_gib: float | None = None
    array_parallelism: int = 16
    # merge/eval/serve need one GPU at most (bf16 20b merge fits one H100); report needs none.
    aux_gpus: int = 1
    aux_time: str = "02:00:00"
    # Lines run before the job body: module load, source a venv, cd ...
    setup: list[str] = field(default_factory=list)
    # Plain environment for the job (NCCL_*, HF_HOME ...). Never secrets: those travel from the
    # submitting shell's environment, see gptoss_hpc.submission.secrets.
    env: dict[str, str] = field(default_factory=dict)
    container: ContainerConfig = field(default_factory=ContainerConfig)
    # Passed verbatim as `#SBATCH --<key>=<value>` (e.g. {exclusive: "", reservation: "x"}).
    sbatch_extra: dict[str, str] = field(default_factory=dict)
    # Seconds before the time limit at which Slurm sends USR2 so training checkpoints and requeues.
    signal_delay_s: int = 300
    max_requeues: int = 3
    # Shared Hugging Face cache (HF_HOME) on a filesystem the compute nodes mount. Set: the launcher
    # downloads model, tokenizer and dataset there before sbatch, and jobs run with HF_HUB_OFFLINE=1.
    hf_home: str | None = None
    # sbatch retries on transient controller errors ("Socket timed out" ...), waiting
    # sbatch_retry_delay_s, then twice that ...; a job the failed sbatch did create is adopted, not duplicated.
    sbatch_retries: int = 3
    sbatch_retry_delay_s: float = 5.0
    # The signal Slurm sends before the time limit or on preemption (sbatch --signal=<sig>@signal_delay_s):
    # "USR2" (default) or "TERM" (what preemption sends where the site has no PreemptParameters=
    # send_user_signal). Either one: every rank checkpoints at the step end, then the job requeues itself.
    preempt_signal: str = "USR2"
    # sbatch --gpus-per-task for train jobs (instead of --gpus-per-node): 1 where the site binds one GPU per
    # task, so every task sees only its own device 0. null = --gpus-per-node (every task sees the node's GPUs).
    gpus_per_task: int | None = None


@dataclass
class ModelConfig:
    name_or_path: str = "openai/gpt-oss-20b"
    revision: str | None = None
    # True: build gpt-oss from gptoss_hpc/resources/<tiny_config>.json with seeded random weights.
    tiny: bool = False
    tiny_config: str = "tiny_gpt_oss"
    # "auto" = the model's own tokenizer; "offline" = the real gpt-oss tokenizer built from the bpe-openai
    # package (no Hub); "tiny-bpe" = a small BPE with the Harmony special tokens (fast CPU tests); else a path.
    tokenizer: str = "auto"
    num_hidden_layers: int = 24
    dtype: str = "bfloat16"
    # gpt-oss ships MXFP4 experts; training needs them dequantized to bf16.
    dequantize_mxfp4: bool = True
    # "bfloat16": experts dequantized once at load (the stock path). "mxfp4": the checkpoint's uint8 blocks/scales
    # stay resident and each layer is dequantized just in time in its forward and backward (a quarter of the
    # expert memory; gptoss_hpc.modeling.fast.mxfp4_experts); the expert LoRA is applied factored either way.
    experts_dtype: str = "bfloat16"
    attn_implementation: str = "eager"
    # transformers' MoE experts kernels: "grouped_mm" | "eager" | None (transformers' default).
    experts_implementation: str | None = None
    # Speed knob (gptoss_hpc.modeling.fast, docs/BENCHMARKS.md): with experts_implementation=grouped_mm, run
    # the routing/bias/SwiGLU/combine steps around the two grouped GEMMs through torch.compile (CUDA only;
    # the same arithmetic, eager on CPU).
    fused_experts: bool = False
    # Speed knob: torch.compile each decoder layer (regional compilation, CUDA only) except layers whose
    # experts carry LoRA (PEFT's ParamWrapper is not traceable); those keep fused_experts.
    compile_layers: bool = False
    trust_remote_code: bool = False


@dataclass
class LoraConfig:
    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False
    # PEFT target_modules: a list of module names or "all-linear"; null = experts only.
    target_modules: Any = None
    # MoE experts are fused 3-D parameters, reached through PEFT's target_parameters.
    # null = layers 7/15/23 of a 24-layer model, scaled to the model's depth.
    expert_layers: list[int] | None = None
    expert_params: list[str] = field(default_factory=lambda: ["gate_up_proj", "down_proj"])


@dataclass
class DataConfig:
    # "hub" | "local" | "sample" (bundled with the package)
    source: str = "sample"
    name: str | None = None
    revision: str | None = None
    split: str = "train"
    # local JSONL / Parquet / JSON files (source=local)
    path: str | None = None
    messages_field: str = "messages"
    # Multilingual-Thinking style: a column whose value becomes the system line "reasoning language: <x>"
    reasoning_language_field: str | None = "reasoning_language"
    # held-out eval split: a fraction of the training rows or a file
    eval_fraction: float = 0.1
    eval_path: str | None = None
    # rows longer than train.max_length: "refuse" (the launch names them and stops: nothing is dropped unless
    # asked) | "drop" | "truncate" (their last answer shortened); the launch prints how many rows and tokens
    max_length_policy: str = "refuse"
    # multi-turn rows: "last" trains the last assistant turn (earlier turns are context), "split" makes one
    # row per assistant turn (README "Data")
    multi_turn: str = "last"
    skip_bad_rows: bool = False
    max_rows: int | None = None
    seed: int = 42


@dataclass
class ZeroConfig:
    stage: int = 2
    # None: on with more than one rank, off with one. With it on, DeepSpeed's ZeRO-1/2 waits for the whole device
    # (cudaDeviceSynchronize) after every micro-batch's backward, and one rank has no communication to overlap.
    overlap_comm: bool | None = None
    contiguous_gradients: bool = True
    reduce_bucket_size: Any = "auto"
    allgather_bucket_size: int = 200_000_000
    offload_optimizer: bool = False


@dataclass
class TrainConfig:
    learning_rate: float = 2e-4
    num_train_epochs: float = 10.0
    max_steps: int = -1
    per_device_train_batch_size: int = 2
    per_device_eval_batch_size: int = 2
    gradient_accumulation_steps: int = 8
    # Tokens of the longest row. null (or `auto` on the command line): the launch measures every row and takes the
    # longest, bucketed, where the card fits it (gptoss_hpc.config.lengths); each point's config.yaml holds the number.
    max_length: int | None = None
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine_with_min_lr"
    min_lr_rate: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    gradient_checkpointing: bool = True
    # With gradient_checkpointing: the checkpointed layer inputs (what grows with the row length) wait for the backward
    # in pinned host memory instead of on the GPU (transformers' gradient_checkpointing_kwargs={"offload": True}).
    gradient_checkpointing_offload: bool = False
    # Where the memory plan says the train stage does not fit cluster.gpu_memory_gib, train at the fastest setting
    # that fits (MXFP4 experts, recompute, smaller micro-batches; same tokens per step) and say so, unless the
    # command line sets one of those keys (gptoss_hpc.config.fit). train=default turns it on.
    fit_memory: bool = False
    # Speed knobs (gptoss_hpc.modeling.fast, docs/BENCHMARKS.md); the defaults are the stock path.
    # Decoder layers below the lowest layer with a LoRA (trainable) parameter run without autograd: exact,
    # since nothing below it trains (7 of 24 layers with the `experts` preset).
    no_grad_below_first_lora: bool = False
    # > 0: lm_head + cross-entropy in chunks of this many tokens, gradient computed in the forward
    # (no [tokens, vocab] fp32 logits). 0: transformers' loss over the full logits.
    loss_chunk_tokens: int = 0
    bf16: bool = True
    assistant_only_loss: bool = True
    packing: bool = False
    # What TRL's packing fills (with train.packing): `micro_batch` packs each micro-batch as one bin of
    # per_device_train_batch_size x max_length tokens (TRL gets per_device_train_batch_size=1 and that length;
    # sequences stay <= max_length through data.max_length_policy), `max_length` is TRL's own: bins of
    # max_length, per_device_train_batch_size of them flattened per micro-batch. Same tokens per step and
    # masks; the bigger bin leaves fewer padding slots (H200: 96.2% -> see docs/BENCHMARKS.md).
    packing_bin: str = "micro_batch"
    padding_free: bool = False
    # TRL's collator option. None: unset, except where the layers are compiled (model.compile_layers without
    # gradient checkpointing) and each new micro-batch length would compile them again: then
    # per_device_train_batch_size x max_length for packed rows (one shape), else min(max_length, 1024)
    # (gptoss_hpc.modeling.sft).
    pad_to_multiple_of: int | None = None
    use_liger_kernel: bool = False
    logging_steps: int = 1
    save_steps: int = 100
    save_total_limit: int = 2
    seed: int = 42
    dataloader_num_workers: int = 2
    # DeepSpeed ZeRO (rendered to JSON per run); false = plain DDP / single process.
    deepspeed: bool = True
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    # Seconds a collective waits for a peer before this rank fails (transformers' TrainingArguments.ddp_timeout,
    # set on the process group on every path): ends a job whose rank hangs alive. A rank that dies or raises
    # ends the job at once through srun --kill-on-bad-exit instead.
    ddp_timeout: int = 1800
    # Divergence (gptoss_hpc.stages.divergence): the train stage ends FAILED ("loss became NaN at step S", the
    # learning rate, the last good checkpoint) when the loss or the gradient norm is NaN/inf, checked at every
    # optimizer step, so a broken adapter is never saved, merged or evaluated. false: train on regardless.
    stop_on_divergence: bool = True
    # > 1: also stop when the logged loss stays above this many times the median of its recent logged values for
    # divergence_spike_steps logs in a row (a blow-up that has not reached inf yet). 0: off.
    divergence_spike_factor: float = 0.0
    divergence_spike_steps: int = 3
    # Hub push of the adapter/merged model when HF_TOKEN is set; PUSH_TO_HUB=false in the env also disables.
    # A failed push is a warning (status shows "push failed: <reason>"): the stage still succeeds.
    push_to_hub: bool = True
    hub_model_id: str | None = None
    # Any other trl.SFTConfig field, passed through as is (e.g. {neftune_noise_alpha: 5}); names are checked
    # against SFTConfig at launch: unknown ones, and the ones a key above sets, are refused.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    max_new_tokens: int = 256
    # extra prompts beyond the built-in ones: [{system: ..., user: ...}]
    prompts: list[dict[str, str]] = field(default_factory=list)
    max_eval_rows: int | None = 200
    do_sample: bool = False
    # Attention for eval's and serve's forward passes and generation (transformers' attn_implementation).
    # Not flex_attention: on the H200 (torch 2.11) inductor cannot lower flex_attention for generation's
    # dynamic shapes (NoValidChoicesError); eager handles gpt-oss's attention sinks and short prompts well.
    attn_implementation: str = "eager"
    # What eval and serve run as the fine-tuned model: "merged" (merged/, from the merge stage), "adapter" (the
    # base + adapter/ unmerged, PEFT; with model.experts_dtype=mxfp4 the experts stay MXFP4 so a 120b fits one
    # GPU; eval's base numbers then come from the same model under PEFT's disable_adapter()), or "auto":
    # adapter when model.experts_dtype=mxfp4, else merged.
    model: str = "auto"


@dataclass
class MergeConfig:
    # The merged model's weight format. "bf16": plain bf16 (model.dtype) safetensors, no quantization_config.
    # "mxfp4" (only with model.experts_dtype=mxfp4): the adapted experts re-quantized into the checkpoint's MXFP4
    # blocks/scales (120b: ~61 GB instead of ~234 GB); merge_check.json then says how much of the adapter's
    # weight change survived the re-quantization (a small LoRA delta is mostly rounded away: a warning says so).
    format: str = "bf16"


@dataclass
class RunConfig:
    # Names the run dir (logs/<name>/<timestamp>) and the jobs (gptoss-<name>-<stage>).
    # conf/experiment/*.yaml set it; the `experiment` group picks one of those files.
    name: str = "gptoss"
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    dry_run: bool = False
    # Each launch gets <run_root>/<name>/<timestamp>/.
    run_root: str = "logs"
    cluster: ClusterConfig = MISSING
    model: ModelConfig = MISSING
    lora: LoraConfig = MISSING
    data: DataConfig = MISSING
    train: TrainConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)


def folder_num_hidden_layers(folder: str) -> int:
    """num_hidden_layers of a local model folder's config.json (conf/model/local.yaml); 0 if unreadable, which
    validate reports with the key to set."""
    import json
    from pathlib import Path

    try:
        return int(json.loads((Path(folder) / "config.json").read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def register_configs() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("gptoss_folder_layers", folder_num_hidden_layers, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    cs.store(group="cluster", name="base_cluster", node=ClusterConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="lora", name="base_lora", node=LoraConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="train", name="base_train", node=TrainConfig)
