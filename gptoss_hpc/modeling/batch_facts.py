"""The batch every rank trains with, checked at train start: the rendered DeepSpeed JSON, gradient accumulation and
effective batch are what the config says, and the same on every rank (a hash all_gather), printed once by rank 0.

A rank that trained with another accumulation or micro-batch than its peers would not fail: ZeRO would average
gradients of different batches and the run would silently be a different experiment.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from gptoss_hpc.config import derive
from gptoss_hpc.config.schema import RunConfig
from gptoss_hpc.errors import GptossHpcError

log = logging.getLogger(__name__)


def expected_facts(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """What the config says one optimizer step is, for ``world_size`` ranks (pure)."""
    t = cfg.train
    # as TRL gets them: with train.packing_bin=micro_batch one packed row of rows x max_length per micro-batch
    rows, row_tokens = derive.trl_micro_batch(t)
    effective = rows * t.gradient_accumulation_steps * world_size
    return {
        "world_size": world_size,
        "per_device_train_batch_size": rows,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "effective_batch": effective,
        # packed rows hold up to their bin's tokens each; padded rows up to max_length
        "max_tokens_per_step": effective * row_tokens,
        "packing": bool(t.packing or t.padding_free),
        "packing_bin": t.packing_bin if t.packing else None,
        "tokens_per_micro_batch": rows * row_tokens,
        "max_length": derive.max_length(t),
    }


def observed_facts(cfg: RunConfig, args: Any, ds_json: Path | None) -> tuple[dict[str, Any], list[str]]:
    """The same facts as the trainer's arguments and the DeepSpeed JSON on disk hold them, and every mismatch with
    the config. ``args`` is the SFTConfig (its world size is the process group's)."""
    from gptoss_hpc.modeling.deepspeed import render_deepspeed_config

    world = int(args.world_size)
    want = expected_facts(cfg, world)
    got = {
        **want,
        "per_device_train_batch_size": int(args.per_device_train_batch_size),
        "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
    }
    got["effective_batch"] = got["per_device_train_batch_size"] * got["gradient_accumulation_steps"] * world
    got["max_tokens_per_step"] = got["effective_batch"] * int(args.max_length or derive.max_length(cfg.train))
    problems = [
        f"{key} is {got[key]} on this rank but the config says {want[key]}"
        for key in ("per_device_train_batch_size", "gradient_accumulation_steps")
        if got[key] != want[key]
    ]
    got["deepspeed"] = None
    if ds_json is not None:
        try:
            on_disk = json.loads(ds_json.read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"the DeepSpeed JSON {ds_json} cannot be read back: {exc}")
            on_disk = None
        if on_disk is not None and on_disk != render_deepspeed_config(cfg, world):
            problems.append(f"the DeepSpeed JSON {ds_json} differs from the one the config renders (another run?)")
        got["deepspeed"] = on_disk
        # "auto" values as the HF trainer resolved them for DeepSpeed (train_batch_size = world x micro x accum)
        resolved = getattr(getattr(args, "hf_deepspeed_config", None), "config", None) or {}
        expected = {
            "train_batch_size": got["effective_batch"],
            "train_micro_batch_size_per_gpu": got["per_device_train_batch_size"],
            "gradient_accumulation_steps": got["gradient_accumulation_steps"],
        }
        for key, value in expected.items():
            if key in resolved and resolved[key] != value:
                problems.append(f"DeepSpeed resolved {key}={resolved[key]}, expected {value}")
        got["deepspeed_resolved"] = {k: resolved.get(k) for k in expected}
    return got, problems


def digest(facts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_batch_facts(cfg: RunConfig, args: Any, ds_json: Path | None) -> dict[str, Any]:
    """Check this rank's batch against the config and against every other rank; rank 0 logs it. Raises
    GptossHpcError on every rank (all of them see the gathered hashes, so none waits for the others)."""
    import torch.distributed as dist

    facts, problems = observed_facts(cfg, args, ds_json)
    rank = int(args.process_index)
    mine = digest(facts)
    hashes = [mine]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        hashes = [None] * dist.get_world_size()
        dist.all_gather_object(hashes, mine)
        if len(set(hashes)) > 1:
            problems.append(
                "ranks disagree on the batch/DeepSpeed settings (hash per rank: "
                + ", ".join(f"{i}={h}" for i, h in enumerate(hashes))
                + "); every rank must read the same config.yaml and gptoss_hpc version"
            )
    configured = derive.world_size(cfg.cluster)
    if rank == 0:
        shown = {k: v for k, v in facts.items() if k != "deepspeed"}
        log.info("batch per optimizer step (all %d ranks agree: %s): %s", len(hashes), mine, json.dumps(shown))
        if facts["world_size"] != configured:
            log.warning(
                "%d ranks run this point but the cluster config gives %d (started by hand?): effective batch %d",
                facts["world_size"],
                configured,
                facts["effective_batch"],
            )
    if problems:
        raise GptossHpcError(f"rank {rank}: " + "; ".join(problems))
    return {**{k: v for k, v in facts.items() if k != "deepspeed"}, "ranks_hash": mine}
