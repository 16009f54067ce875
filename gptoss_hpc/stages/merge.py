"""Merge a point's LoRA adapter into its base model and save a standalone model, after checking on a probe
batch that the merged model's logits equal base+adapter logits.

    python -m gptoss_hpc.stages.merge logs/demo/20261125-081500/p000/config.yaml

Reads ``adapter/`` (adapter + tokenizer, from the train stage); writes ``merged/``: sharded safetensors,
tokenizer, ``README.md`` (model card) and ``merge_check.json`` (max/mean |logit diff|, tolerances, the
adapter's own effect and, in bf16/fp16, the rounding-noise floor the tolerance is calibrated by). The
folder is written under a temporary name and renamed, so ``merged/`` is either complete or absent.
With ``model.experts_dtype=mxfp4`` (the 120b default) no model is built: the checkpoint is merged tensor by
tensor (``gptoss_hpc.stages.merge_streaming``), checked tensor by tensor against PEFT's own delta, and
``merge.format=mxfp4`` re-quantizes the experts and reports how much of the adapter survived (README).
Optional Hub push: only when HF_TOKEN is set, ``train.push_to_hub`` is true and PUSH_TO_HUB != "false"; a
push that fails (read-only token, no network) is a warning ("push failed: ..." in status): merged/ is saved.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gptoss_hpc.config import RunConfig
from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.fileio import write_atomic
from gptoss_hpc.modeling.hub import push_folder
from gptoss_hpc.modeling.merge_check import MergeError, merge_and_check
from gptoss_hpc.paths import PointPaths
from gptoss_hpc.stages.common import run_stage, stage_cli, stage_warning

log = logging.getLogger(__name__)

MAX_SHARD_SIZE = "5GB"
PROBE_ROWS = 4
PROBE_MAX_TOKENS = 256


def load_adapter_tokenizer(cfg: RunConfig, paths: PointPaths) -> Any:
    """The tokenizer saved with the adapter (the one training used); the config's one if absent."""
    if (paths.adapter / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(paths.adapter))
    from gptoss_hpc.modeling.tokenizer import load_tokenizer

    log.warning("no tokenizer in %s; using model.tokenizer=%s", paths.adapter, cfg.model.tokenizer)
    return load_tokenizer(cfg.model)


def probe_token_ids(
    cfg: RunConfig, tokenizer: Any, rows: int = PROBE_ROWS, max_tokens: int = PROBE_MAX_TOKENS
) -> list[list[int]]:
    """A few rendered chat samples (held-out rows first, then training rows), each cut to max_tokens."""
    from gptoss_hpc.data import load_datasets, template_messages

    train, heldout = load_datasets(cfg, tokenizer)
    samples: list[list[int]] = []
    for split in (heldout, train):
        if split is None:
            continue
        for row in split.select(range(min(rows - len(samples), len(split)))):
            ids = tokenizer.apply_chat_template(template_messages(row["messages"]), tokenize=True, return_dict=True)[
                "input_ids"
            ]
            samples.append(list(ids)[:max_tokens])
        if len(samples) >= rows:
            break
    if not samples:
        raise MergeError("no data rows to build the merge probe batch from (both splits are empty)")
    return samples


def model_card(cfg: RunConfig, paths: PointPaths, check: Mapping[str, Any]) -> str:
    train_metrics: Any = None
    if paths.train_metrics.is_file():
        try:
            train_metrics = json.loads(paths.train_metrics.read_text())
        except json.JSONDecodeError:
            train_metrics = None
    data = cfg.data.name or cfg.data.path or cfg.data.source
    lines = [
        "---",
        f"base_model: {cfg.model.name_or_path}",
        "library_name: transformers",
        "tags: [gpt-oss, lora, merged, gptoss_hpc]",
        "---",
        "",
        f"# {cfg.name} / {paths.root.name}: {cfg.model.name_or_path} + LoRA, merged",
        "",
        f"- Base model: `{cfg.model.name_or_path}`"
        + (f" (revision `{cfg.model.revision}`)" if cfg.model.revision else ""),
        f"- Data: `{data}` (source `{cfg.data.source}`, split `{cfg.data.split}`)",
        f"- Training: learning_rate {cfg.train.learning_rate}, epochs {cfg.train.num_train_epochs}, "
        f"max_steps {cfg.train.max_steps}, max_length {cfg.train.max_length}",
        _check_line(check),
        "",
        "## LoRA config",
        "",
        "```json",
        json.dumps(asdict(cfg.lora), indent=2),
        "```",
        "",
        "## Train metrics",
        "",
        "```json",
        json.dumps(train_metrics, indent=2) if train_metrics is not None else "(train_metrics.json not found)",
        "```",
        "",
        "Load it with `AutoModelForCausalLM.from_pretrained(<this folder>)`; prompts use the gpt-oss (Harmony) "
        "chat template saved with the tokenizer.",
        "",
    ]
    return "\n".join(lines)


def _check_line(check: Mapping[str, Any]) -> str:
    if "method" in check:  # the streaming merge's tensor check
        line = (
            f"- Merge check: {check['adapted_parameters']} adapted tensors against PEFT's merge, max mismatch "
            f"{check['max_mismatch']:.3g} of elements ({check['format']}, {check['dtype']})"
        )
        if "survival_mean" in check:
            line += (
                f"; MXFP4 re-quantization kept {check['survival_mean']:.1%} of the adapter's weight change and "
                f"{check.get('logit_survival', 0.0):.1%} of its logit effect"
            )
        return line
    return (
        f"- Merge check: max |merged - adapter logits| = {check['max_abs_diff']:.3g} "
        f"(tolerance {check['tolerance']:.3g}, {check['dtype']})"
    )


def _to_device(model: Any) -> Any:
    import torch

    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model = model.to("cuda")
    return model


def body(cfg: RunConfig, paths: PointPaths) -> Path:
    from peft import PeftModel

    from gptoss_hpc.config.derive import mxfp4_resident
    from gptoss_hpc.modeling.model import load_base_model

    if not (paths.adapter / "adapter_config.json").is_file():
        raise MergeError(f"no LoRA adapter at {paths.adapter} (adapter_config.json missing): did train finish?")
    tokenizer = load_adapter_tokenizer(cfg, paths)
    if mxfp4_resident(cfg):  # shard by shard
        return _finish(cfg, paths, _streaming(cfg, paths, tokenizer))
    samples = probe_token_ids(cfg, tokenizer)
    base = _to_device(load_base_model(cfg, paths, for_training=False))
    if getattr(base, "hf_quantizer", None) is not None and not cfg.model.dequantize_mxfp4:
        raise MergeError("cannot merge LoRA into quantized (MXFP4) experts: set model.dequantize_mxfp4=true")
    dtype_name = str(next(base.parameters()).dtype).removeprefix("torch.")
    peft_model = PeftModel.from_pretrained(base, str(paths.adapter))
    merged, check = merge_and_check(peft_model, samples, dtype_name)
    if hasattr(merged.config, "quantization_config"):  # dequantized weights must not be reloaded as MXFP4
        del merged.config.quantization_config

    tmp = paths.merged.with_name(paths.merged.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    merged.save_pretrained(str(tmp), max_shard_size=MAX_SHARD_SIZE)
    if not any(tmp.glob("*.safetensors")):
        raise MergeError(f"save_pretrained wrote no .safetensors files into {tmp}")
    tokenizer.save_pretrained(str(tmp))
    write_atomic(tmp / "merge_check.json", json.dumps(check, indent=2) + "\n")
    write_atomic(tmp / "README.md", model_card(cfg, paths, check))
    return _finish(cfg, paths, tmp)


def _streaming(cfg: RunConfig, paths: PointPaths, tokenizer: Any) -> Path:
    """model.experts_dtype=mxfp4: merge shard by shard (gptoss_hpc.stages.merge_streaming), then the same files
    as the in-memory merge beside the weights. Returns the complete temp folder."""
    from gptoss_hpc.stages.merge_streaming import merge_streaming

    tmp = paths.merged.with_name(paths.merged.name + ".tmp")
    try:
        return _streaming_checked(cfg, paths, tokenizer, tmp, merge_streaming(cfg, paths, tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp.with_name(tmp.name + ".tmp"), ignore_errors=True)  # the merge's own temp folder
        raise


def _streaming_checked(cfg: RunConfig, paths: PointPaths, tokenizer: Any, tmp: Path, check: dict[str, Any]) -> Path:
    from gptoss_hpc.modeling.mxfp4.merge_check import LOW_SURVIVAL
    from gptoss_hpc.stages.merge_streaming import logit_survival

    if not check["passed"]:
        bad = [r["tensor"] for r in check["tensors"] if not r["passed"]]
        raise MergeError(
            f"the merged tensors differ from PEFT's merge of the adapter in {len(bad)} of "
            f"{check['adapted_parameters']} adapted tensors (first: {bad[:3]}; max mismatch "
            f"{check['max_mismatch']:.3g} of elements, allowed {check['tolerance']}); the merged model was not saved",
            check,
        )
    if not check["conclusive"]:
        stage_warning(
            "the adapter changes too few merged weights at this precision for the merge check to tell a correct "
            "merge from a lost adapter (merge_check.json: adapter_visible per tensor)"
        )
    if cfg.merge.format == "mxfp4":
        check.update(logit_survival(cfg, paths, tmp, probe_token_ids(cfg, tokenizer)))
        log.info("merge.format=mxfp4 keeps %.1f%% of the adapter's logit effect", 100 * check["logit_survival"])
    if check.get("survival_mean") is not None and min(check["survival_mean"], check["logit_survival"]) < LOW_SURVIVAL:
        stage_warning(
            f"merge.format=mxfp4 kept only {check['survival_mean']:.1%} of the adapter's weight change (min "
            f"{check['survival_min']:.1%} per tensor) and {check['logit_survival']:.1%} of its effect on the logits: "
            "re-quantizing W + delta to MXFP4 rounds most of the LoRA delta back to the base weights. Serve the "
            "adapter unmerged (eval.model=adapter) or merge.format=bf16"
        )
    tokenizer.save_pretrained(str(tmp))
    write_atomic(tmp / "merge_check.json", json.dumps(check, indent=2) + "\n")
    write_atomic(tmp / "README.md", model_card(cfg, paths, check))
    return tmp


def _finish(cfg: RunConfig, paths: PointPaths, tmp: Path) -> Path:
    """Rename the complete temp folder to merged/ and push it (when asked)."""
    shutil.rmtree(paths.merged, ignore_errors=True)
    os.replace(tmp, paths.merged)
    log.info("merged model saved to %s", paths.merged)

    try:
        push_folder(cfg, paths, paths.merged, what="merged model", suffix="-merged")
    except GptossHpcError as exc:  # merged/ is complete on disk: a failed upload must not fail the stage
        stage_warning(f"push failed: {exc}")
    return paths.merged


def main(config_path: str | os.PathLike[str]) -> Path:
    return run_stage("merge", config_path, body)


if __name__ == "__main__":
    raise SystemExit(stage_cli("merge", main, None, "usage: python -m gptoss_hpc.stages.merge <point config.yaml>"))
