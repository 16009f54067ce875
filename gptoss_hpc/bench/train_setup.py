"""The bench's model and data: the real gpt-oss architecture with random weights + the project's LoRA and speed
knobs (as the train stage applies them), and synthetic packed or padded token batches
(``python -m gptoss_hpc.bench train``, gptoss_hpc/bench/train.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gptoss_hpc.modeling.fast.loss import PREDICTED_ROWS, predicted_row_count


# ----------------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------------
def model_config_json(cfg) -> Path:
    from gptoss_hpc.resources import RESOURCES, tiny_config_path

    m = cfg.model
    if m.tiny:
        return tiny_config_path(m.tiny_config)
    name = m.name_or_path.rstrip("/").split("/")[-1].lower().replace("-", "_")
    for size in ("120b", "20b"):
        if size in name:
            return RESOURCES / f"gpt_oss_{size}_config.json"
    raise SystemExit(f"no architecture json for {m.name_or_path}: gptoss_hpc/resources/gpt_oss_*_config.json")


def build_model(cfg, device: str, vocab_size: int | None = None):
    import torch
    from transformers import AutoModelForCausalLM, GptOssConfig

    from gptoss_hpc.modeling.model import load_kwargs

    m = cfg.model
    config = GptOssConfig.from_json_file(str(model_config_json(cfg)))
    n = m.num_hidden_layers
    config.num_hidden_layers = n
    config.layer_types = list(config.layer_types[:n]) + [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(len(config.layer_types), n)
    ]
    if vocab_size is not None:
        config.vocab_size = vocab_size
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(config, key, None) is not None and getattr(config, key) >= vocab_size:
                setattr(config, key, vocab_size - 1)
    config.use_cache = False
    kwargs = load_kwargs(cfg)
    if m.experts_dtype == "mxfp4":
        from gptoss_hpc.modeling.mxfp4.model import build_random_mxfp4_model

        # random uint8 blocks/scales made on the device: no bf16 expert stack exists at any point
        model = build_random_mxfp4_model(
            config, device, kwargs["dtype"], m.attn_implementation, m.experts_implementation, seed=cfg.train.seed
        )
        model.train()
        return model
    torch.manual_seed(cfg.train.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.train()
    return model


def active_matmul_params(config) -> int:
    """Weights each token multiplies with: attention, router, top-k experts, lm_head (not the embedding)."""
    h, hd = config.hidden_size, config.head_dim
    attn = h * config.num_attention_heads * hd * 2 + h * config.num_key_value_heads * hd * 2
    expert = h * 2 * config.intermediate_size + config.intermediate_size * h
    router = h * config.num_local_experts
    per_layer = attn + router + config.num_experts_per_tok * expert
    return config.num_hidden_layers * per_layer + config.vocab_size * h


def prepare(cfg, device: str, *, vocab_size: int | None = None, lora_b_std: float = 0.02):
    """Base model -> grad checkpointing -> PEFT LoRA -> speed knobs, as the train stage does it."""
    import torch
    from peft import get_peft_model

    from gptoss_hpc.modeling.fast import apply_speed_knobs
    from gptoss_hpc.modeling.lora import build_lora_config

    model = build_model(cfg, device, vocab_size)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, build_lora_config(cfg))
    # PEFT zero-inits lora_B, which makes every lora_A gradient zero: give B values so the check means something.
    g = torch.Generator(device="cpu").manual_seed(cfg.train.seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * lora_b_std).to(p.dtype))
    knobs = apply_speed_knobs(model, cfg)
    return model, knobs


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------
def synthetic_lengths(rng, n: int, max_length: int, mode: str) -> list[int]:
    if mode == "full":
        return [max_length] * n
    lo = min(256, max_length)
    return [int(min(max(rng.lognormvariate(math.log(1024), 0.6), lo), max_length)) for _ in range(n)]


def make_sequence(rng, length: int, vocab: int) -> tuple[list[int], list[int]]:
    ids = [rng.randrange(vocab) for _ in range(length)]
    prompt = int(length * 0.3)
    return ids, [-100] * prompt + ids[prompt:]


def micro_batches(cfg, rng, vocab: int, n: int, mode: str) -> list[dict[str, Any]]:
    """n micro-batches of CPU tensors (input_ids, labels, position_ids|attention_mask) + token counts, each with
    its predicted-row count (``PREDICTED_ROWS``, the train stage's collator adds the same)."""
    return [
        {**mb, PREDICTED_ROWS: predicted_row_count(mb["labels"])} for mb in _micro_batches(cfg, rng, vocab, n, mode)
    ]


def _micro_batches(cfg, rng, vocab: int, n: int, mode: str) -> list[dict[str, Any]]:
    import torch

    from gptoss_hpc.modeling.fast import pack_greedy, pack_sequences

    t = cfg.train
    b, max_len = t.per_device_train_batch_size, t.max_length
    out = []
    if t.packing or t.padding_free:
        pool_lengths = synthetic_lengths(rng, n * b * max_len // 256 + 8, max_len, mode)
        bins = pack_greedy(pool_lengths, max_len)
        bins.sort(key=lambda idx: -sum(pool_lengths[i] for i in idx))
        for k in range(n):
            rows = bins[k * b : (k + 1) * b]
            seqs, labs = [], []
            for row in rows:
                for i in row:
                    ids, lab = make_sequence(rng, pool_lengths[i], vocab)
                    seqs.append(ids)
                    labs.append(lab)
            packed = pack_sequences(seqs, labs, row_tokens=b * max_len, pad_token_id=0)
            real = packed.pop("num_tokens")
            packed["real_tokens"] = real
            packed["padded_tokens"] = b * max_len
            out.append(packed)
        return out
    for _ in range(n):
        lengths = synthetic_lengths(rng, b, max_len, mode)
        width = max_len  # static shape: compiled flex_attention recompiles for every new width
        ids = torch.zeros((b, width), dtype=torch.long)
        labels = torch.full((b, width), -100, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for r, n_tok in enumerate(lengths):
            seq, lab = make_sequence(rng, n_tok, vocab)
            ids[r, :n_tok] = torch.tensor(seq)
            labels[r, :n_tok] = torch.tensor(lab)
            mask[r, :n_tok] = 1
        out.append(
            {
                "input_ids": ids,
                "labels": labels,
                "attention_mask": mask,
                "real_tokens": sum(lengths),
                "padded_tokens": b * width,
            }
        )
    return out


def is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def sync_device(device: str) -> None:
    import torch

    if is_cuda(device):
        torch.cuda.synchronize()


def to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    """The batch's tensors on ``device``, and its predicted-row count (``micro_batches``), which the chunked loss
    uses to select its rows without a sync."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items() if hasattr(v, "to")}
    if PREDICTED_ROWS in batch:
        out[PREDICTED_ROWS] = batch[PREDICTED_ROWS]
    return out


def loss_of(model, knobs, batch: dict[str, Any], num_items):
    from gptoss_hpc.modeling.fast import causal_lm_loss

    if knobs.loss_chunk_tokens > 0:
        return causal_lm_loss(model, batch, chunk_tokens=knobs.loss_chunk_tokens, num_items_in_batch=num_items)
    inputs = {k: v for k, v in batch.items() if k != PREDICTED_ROWS}
    return model(**inputs, use_cache=False, num_items_in_batch=num_items).loss


def aux_loss_coef(cfg, config) -> float:
    """The MoE load-balancing loss weight the train stage trains with: TRL's ``router_aux_loss_coef`` (settable as
    train.extra.router_aux_loss_coef), whose default is the architecture's (gpt-oss: 0.9)."""
    coef = (cfg.train.extra or {}).get("router_aux_loss_coef")
    return float(getattr(config, "router_aux_loss_coef", 0.0) if coef is None else coef)


def train_loss_of(model, knobs, batch: dict[str, Any], num_items, aux_coef: float, grad_accum: int):
    """The train stage's loss (gptoss_hpc.modeling.trainer): with the chunked loss, CE + the load-balancing loss
    averaged over the accumulation steps, as TRL adds it; otherwise ``loss_of``."""
    if not aux_coef or knobs.loss_chunk_tokens <= 0:
        return loss_of(model, knobs, batch, num_items)
    from gptoss_hpc.modeling.trainer import chunked_training_loss

    loss, aux = chunked_training_loss(model, batch, knobs.loss_chunk_tokens, num_items, with_aux=True)
    return loss + aux_coef * aux / grad_accum


def preset_name(cfg) -> str:
    lo = cfg.lora
    if lo.target_modules == "all-linear":
        return "all_linear"
    if lo.target_modules:
        return "attention" if lo.expert_layers == [] else "custom"
    return "experts"
