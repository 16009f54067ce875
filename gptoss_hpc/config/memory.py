"""Per-GPU memory estimate of each stage (pure arithmetic, no torch): ``validate`` refuses a config whose train
stage does not fit ``cluster.gpu_memory_gib``; ``python -m gptoss_hpc.plan`` prints the parts.

The estimate is torch's peak allocated memory (what ``bench train`` reports as peak GiB) plus what the card needs
beyond it: the CUDA context and the caching allocator's fragmentation. Its parts:

- weights by dtype: the non-expert tensors in ``model.dtype``, the experts in bf16 or as MXFP4 blocks + scales;
- LoRA parameters, gradients and AdamW state (fp32 master + moments sharded by ZeRO over the ranks);
- activations: tokens per micro-batch x the layers autograd records (from the lowest LoRA layer up) x a per-layer
  cost that depends on the experts kernel, compiled layers and attention LoRA; with gradient checkpointing, one
  hidden state per layer plus one layer recomputed;
- the loss: [tokens, vocab] logits without ``train.loss_chunk_tokens``, else a chunk (in the workspace term);
- the MXFP4 dequant buffer: one layer's gate_up stack in bf16, alive during its GEMM.

Calibration (per-layer costs, workspace): the 20b bf16 rows of docs/BENCHMARKS.md measured on an H100/H200
(``bench train``, experts preset unless named; allocated GiB): train=fast 4x2048 55.8, 2x2048 48.3, 8x2048 70.8;
stock grad ckpt 2x2048 49.0 and its ladder (42.8 chunked loss, 58.6 no recompute, 49.0 fused experts);
attention 2x2048 56.5 / 4x2048 72.3; all_linear 2x2048 53.8 / 4x2048 66.7. The 120b and MXFP4 rows reuse the
per-layer costs (same hidden size, head layout and top-k); docs/BENCHMARKS.md compares them with measurements.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from gptoss_hpc.config import derive
from gptoss_hpc.config.schema import RunConfig

GIB = 2**30
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
MXFP4_BYTES = 0.5 + 1 / 32  # two e2m1 values per byte + one e8m0 scale per 32 values

# GiB of saved activations per 1024 tokens per decoder layer recorded by autograd (see the module docstring)
ACT_FUSED_COMPILED = 0.1077  # model.fused_experts + model.compile_layers (train=fast)
ACT_FUSED = 0.1178  # fused experts, layers not compiled
ACT_STOCK = 0.2556  # transformers' grouped_mm experts (model.fused_experts=false)
ACT_ATTN_LORA = 0.0235  # + LoRA on q/k/v/o (inputs kept for the A gradients)
ACT_ATTN_LORA_DROPOUT = 0.0530  # + the same with lora_dropout > 0 (a dropped copy + mask per projection)
RECOMPUTE_FACTOR = 1.35  # with gradient checkpointing: one layer's activations while it is recomputed + backward
BOUNDARY_COPIES = 2  # hidden-state-sized tensors kept per checkpointed layer (docs/BENCHMARKS.md, long rows)
TRAIN_EXTRA_GIB = 0.6  # the train stage beyond the bench under recompute (TRL/DeepSpeed buffers): 20b@24 17.1 GiB
WORKSPACE_GIB = 1.85  # intercept of the fits: chunked-loss transient (4k tokens), cuBLAS/flex workspaces
LOGIT_BYTES = 8  # per [token, vocab] element without chunking: bf16 logits + fp32 upcast + its gradient
CONTEXT_GIB = 0.6  # CUDA context, outside torch's allocator
FRAGMENTATION = 0.05  # reserved over allocated at the peak
USABLE = 0.99  # of the card's nominal GiB (H100 80 GB: 79.2 GiB usable; H200 141: 139.8)
EVAL_LOSS_CHUNK = 512  # predicted tokens per fp32 loss chunk of eval's held-out loss (gptoss_hpc.stages.eval)
MERGE_SHARD_GIB = 5e9 / GIB  # the streaming merge's output shard buffer (gptoss_hpc.modeling.mxfp4_merge)


@dataclass(frozen=True)
class Arch:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    intermediate: int
    # layers of full (global) attention; the others attend within ``sliding_window`` tokens
    full_attention_layers: int = 0
    sliding_window: int | None = None
    max_position_embeddings: int = 131072

    @classmethod
    def from_json(cls, path: Path, layers: int | None = None) -> Arch:
        c = json.loads(Path(path).read_text())
        n = layers or c["num_hidden_layers"]
        types = (c.get("layer_types") or ["full_attention"] * c["num_hidden_layers"])[:n]
        return cls(
            vocab=c["vocab_size"],
            hidden=c["hidden_size"],
            layers=n,
            heads=c["num_attention_heads"],
            kv_heads=c["num_key_value_heads"],
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            experts=c["num_local_experts"],
            top_k=c.get("num_experts_per_tok", c.get("experts_per_token", 4)),
            intermediate=c["intermediate_size"],
            full_attention_layers=sum(1 for t in types if t == "full_attention"),
            sliding_window=c.get("sliding_window"),
            max_position_embeddings=c.get("max_position_embeddings", 131072),
        )

    def attention_params(self) -> int:
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return self.hidden * (2 * q + 2 * kv) + 2 * q + 2 * kv + self.hidden + self.heads

    def expert_weights(self) -> int:
        """Per layer, without biases: E x (H x 2I + I x H)."""
        return self.experts * 3 * self.hidden * self.intermediate

    def expert_biases(self) -> int:
        return self.experts * (2 * self.intermediate + self.hidden)

    def non_expert_params(self) -> int:
        per_layer = self.attention_params() + self.experts * (self.hidden + 1) + 2 * self.hidden
        return 2 * self.vocab * self.hidden + self.layers * per_layer + self.hidden


def arch_for(cfg: RunConfig) -> Arch | None:
    """The architecture of cfg.model: the bundled json for the tiny model and gpt-oss-20b/120b, a local folder's
    config.json, else None (no estimate)."""
    from gptoss_hpc.resources import RESOURCES, tiny_config_path

    m = cfg.model
    if m.tiny:
        path = tiny_config_path(m.tiny_config)
    elif (Path(m.name_or_path).expanduser() / "config.json").is_file():
        path = Path(m.name_or_path).expanduser() / "config.json"
    else:
        name = m.name_or_path.lower().replace("-", "_")
        size = next((s for s in ("120b", "20b") if s in name), None)
        if size is None:
            return None
        path = RESOURCES / f"gpt_oss_{size}_config.json"
    return Arch.from_json(path, layers=m.num_hidden_layers) if path.is_file() else None


@dataclass
class Estimate:
    stage: str
    parts: dict[str, float] = field(default_factory=dict)  # GiB each
    capacity_gib: float | None = None
    note: str = ""

    @property
    def allocated(self) -> float:
        return sum(self.parts.values())

    @property
    def card(self) -> float:
        """What the card must hold: the allocated peak + fragmentation + the CUDA context."""
        return self.allocated * (1 + FRAGMENTATION) + CONTEXT_GIB

    @property
    def fits(self) -> bool | None:
        return None if self.capacity_gib is None else self.card <= self.capacity_gib * USABLE


def _lora_layers(cfg: RunConfig, arch: Arch) -> tuple[list[int], list[int]]:
    """(layers with expert LoRA, layers with attention LoRA)."""
    experts = [i for i in derive.expert_layers(cfg.lora, arch.layers) if 0 <= i < arch.layers]
    attention = list(range(arch.layers)) if cfg.lora.target_modules else []
    return experts, attention


def lora_params(cfg: RunConfig, arch: Arch) -> int:
    r = cfg.lora.r
    experts, attention = _lora_layers(cfg, arch)
    per_expert_layer = 0
    if "gate_up_proj" in cfg.lora.expert_params:
        per_expert_layer += r * arch.experts * (arch.hidden + 2 * arch.intermediate)
    if "down_proj" in cfg.lora.expert_params:
        per_expert_layer += r * arch.experts * (arch.intermediate + arch.hidden)
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    per_attn_layer = r * ((arch.hidden + q) + 2 * (arch.hidden + kv) + (q + arch.hidden))
    return len(experts) * per_expert_layer + len(attention) * per_attn_layer


def weights_gib(cfg: RunConfig, arch: Arch, experts_dtype: str | None = None) -> tuple[float, float]:
    """(non-expert GiB, expert GiB) of the model as the train stage holds it."""
    b = _DTYPE_BYTES.get(cfg.model.dtype, 2)
    experts_dtype = experts_dtype or cfg.model.experts_dtype
    per_value = MXFP4_BYTES if experts_dtype == "mxfp4" else b
    experts = arch.layers * (arch.expert_weights() * per_value + arch.expert_biases() * b)
    return arch.non_expert_params() * b / GIB, experts / GIB


def _world(cfg: RunConfig) -> int:
    return max(1, derive.world_size(cfg.cluster)) if cfg.cluster.accelerator == "gpu" else 1


def train_estimate(cfg: RunConfig, arch: Arch, capacity_gib: float | None = None) -> Estimate:
    t, m = cfg.train, cfg.model
    tokens = t.per_device_train_batch_size * derive.max_length(t)
    k = tokens / 1024
    non_expert, experts = weights_gib(cfg, arch)
    expert_layers, attn_layers = _lora_layers(cfg, arch)
    lora_layers = sorted(set(expert_layers) | set(attn_layers))
    first = lora_layers[0] if lora_layers else arch.layers
    recorded = list(range(first, arch.layers))
    if not m.fused_experts:
        base = ACT_STOCK
    elif m.compile_layers and not t.gradient_checkpointing:
        base = ACT_FUSED_COMPILED
    else:
        base = ACT_FUSED
    attn_extra = ACT_ATTN_LORA_DROPOUT if cfg.lora.lora_dropout > 0 else ACT_ATTN_LORA
    per_layer = {i: base + (attn_extra if i in attn_layers else 0.0) for i in recorded}
    workspace = WORKSPACE_GIB
    dequant = arch.experts * arch.hidden * 2 * arch.intermediate * 2 / GIB if m.experts_dtype == "mxfp4" else 0.0
    offloaded = 0.0
    if t.gradient_checkpointing:
        # What stays saved between forward and backward: BOUNDARY_COPIES hidden states per checkpointed layer (on
        # the host with train.gradient_checkpointing_offload). The peak is then either one layer recomputed for its
        # backward (long rows) or the loss/dequant workspace (short rows), not both: the long-row bench rows (H100,
        # one 32k/64k/128k row) peak at weights + BOUNDARY_COPIES boundaries + one recomputed layer.
        boundary = BOUNDARY_COPIES * len(recorded) * tokens * arch.hidden * _DTYPE_BYTES.get(m.dtype, 2) / GIB
        if t.gradient_checkpointing_offload:
            boundary, offloaded = 0.0, boundary
        recomputed = RECOMPUTE_FACTOR * max(per_layer.values(), default=0.0) * k
        activations = boundary + max(recomputed - workspace - dequant, 0.0) + TRAIN_EXTRA_GIB
    else:
        activations = sum(per_layer.values()) * k
    p = lora_params(cfg, arch)
    shards = _world(cfg) if t.deepspeed else 1
    # bf16 weights + fp32 gradients; AdamW's fp32 master copy and two moments, partitioned by ZeRO-1/2
    lora = p * (2 + 4 + 12 / shards) / GIB
    loss = 0.0 if t.loss_chunk_tokens > 0 else LOGIT_BYTES * tokens * arch.vocab / GIB
    parts = {
        "weights": non_expert + experts,
        "lora+optimizer": lora,
        "activations": activations,
        "logits": loss,
        "workspace": workspace,
    }
    if dequant:
        parts["dequant buffer"] = dequant
    note = f"{offloaded:.1f} GiB of checkpointed activations in pinned host memory per rank" if offloaded else ""
    return Estimate("train", parts, capacity_gib, note=note)


def _bf16_model_gib(cfg: RunConfig, arch: Arch) -> float:
    non_expert, experts = weights_gib(cfg, arch, experts_dtype="bfloat16")
    return non_expert + experts


def merge_estimate(cfg: RunConfig, arch: Arch, capacity_gib: float | None) -> Estimate:
    """bf16 experts: the stage loads the bf16 base whole, adds B@A per weight and saves it. MXFP4-resident experts
    (model.experts_dtype=mxfp4): it streams tensor by tensor (gptoss_hpc.modeling.mxfp4_merge), so the GPU holds
    about three fp32 expert stacks at its peak (the check's base, PEFT's delta and the merged tensor read back);
    with merge.format=mxfp4 the logit check then loads the MXFP4 model (as eval.model=adapter does)."""
    stack = arch.experts * arch.hidden * 2 * arch.intermediate * 4 / GIB  # one layer's gate_up in fp32
    if derive.mxfp4_resident(cfg):
        note = f"streaming merge ({cfg.merge.format}): shard by shard, host RAM ~{MERGE_SHARD_GIB + stack:.0f} GiB"
        parts = {"expert stacks": 3 * stack, "workspace": 0.5}
        if cfg.merge.format == "mxfp4":  # the logit check loads the MXFP4 model (+ adapter), one at a time
            parts = {**_unmerged_model_parts(cfg, arch), "workspace": 0.5}
            note += "; its logit check holds one MXFP4 model"
        return Estimate("merge", parts, capacity_gib, note=note)
    layer = arch.expert_weights() * 4 / GIB  # one fp32 delta of an experts stack while it is merged
    return Estimate(
        "merge",
        {"weights": _bf16_model_gib(cfg, arch), "delta": layer, "workspace": 0.5},
        capacity_gib,
        note="loads the bf16 base whole; model.experts_dtype=mxfp4 streams it instead",
    )


def _generate_estimate(stage: str, cfg: RunConfig, arch: Arch, capacity_gib: float | None) -> Estimate:
    tokens = derive.max_length(cfg.train) + cfg.eval.max_new_tokens
    batch = max(1, cfg.train.per_device_eval_batch_size)
    kv = 2 * arch.layers * arch.kv_heads * arch.head_dim * 2 * tokens * batch / GIB
    logits = batch * arch.vocab * 4 * 2 / GIB
    if stage == "eval":  # the held-out loss: one row's forward without cache, then lm_head + fp32 loss in chunks
        row = derive.max_length(cfg.train)
        transient = row * (8 * arch.hidden + 2 * arch.top_k * 2 * arch.intermediate) * 2  # a layer's bf16 tensors
        heldout = (transient + 2 * EVAL_LOSS_CHUNK * arch.vocab * 4) / GIB
        logits = max(logits, heldout)
    parts = {"weights": _bf16_model_gib(cfg, arch), "kv cache": kv, "logits": logits, "workspace": 0.5}
    note = "bf16 merged model (eval.model=merged)"
    if derive.eval_model(cfg) == "adapter":
        parts.update(_unmerged_model_parts(cfg, arch))
        note = f"base ({cfg.model.experts_dtype} experts) + adapter unmerged (eval.model=adapter)"
    return Estimate(stage, parts, capacity_gib, note=note)


def _unmerged_model_parts(cfg: RunConfig, arch: Arch) -> dict[str, float]:
    """The base as it trains (MXFP4 or bf16 experts) + the adapter unmerged: what eval.model=adapter, serve and the
    MXFP4 merge's logit check hold."""
    non_expert, experts = weights_gib(cfg, arch)
    parts = {"weights": non_expert + experts, "adapter": lora_params(cfg, arch) * 2 / GIB}  # no optimizer state
    if cfg.model.experts_dtype == "mxfp4":  # one layer's gate_up stack, dequantized to bf16
        parts["dequant buffer"] = arch.experts * arch.hidden * 2 * arch.intermediate * 2 / GIB
    return parts


def estimate_stages(cfg: RunConfig, capacity_gib: float | None = None) -> list[Estimate]:
    arch = arch_for(cfg)
    if arch is None:
        return []
    return [
        train_estimate(cfg, arch, capacity_gib),
        merge_estimate(cfg, arch, capacity_gib),
        _generate_estimate("eval", cfg, arch, capacity_gib),
        _generate_estimate("serve", cfg, arch, capacity_gib),
    ]


def gpu_memory_gib(cfg: RunConfig) -> float | None:
    """cluster.gpu_memory_gib; for a local GPU cluster left at null, the local card's (nvidia-smi), else None."""
    c = cfg.cluster
    if c.gpu_memory_gib is not None:
        return float(c.gpu_memory_gib)
    if c.backend != "local" or c.accelerator != "gpu":
        return None
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            check=True,
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return min(float(x) for x in out) / 1024 if out else None


def later_stage_problems(cfg: RunConfig, arch: Arch, capacity: float) -> list[str]:
    """merge/eval/serve run on one GPU: refuse the ones that do not fit before a long training run, not after."""
    problems = []
    for stage in ("merge", "eval", "serve"):
        if stage not in cfg.stages:
            continue
        est = (
            merge_estimate(cfg, arch, capacity) if stage == "merge" else _generate_estimate(stage, cfg, arch, capacity)
        )
        if est.fits:
            continue
        fix = (
            "model.experts_dtype=mxfp4 (the merge streams shard by shard, eval/serve run the MXFP4 base + adapter "
            "unmerged: eval.model=adapter)"
            if cfg.model.experts_dtype != "mxfp4"
            else "eval.model=adapter (the MXFP4 base + adapter, unmerged)"
            if stage != "merge"
            else "a card that holds it"
        )
        problems.append(
            f"the {stage} stage needs ~{est.card:.0f} GiB on one GPU ({est.note}) but cluster.gpu_memory_gib="
            f"{capacity:g} leaves {capacity * USABLE:.1f}: use {fix}, or run stages=[train] and that stage elsewhere"
        )
    return problems
