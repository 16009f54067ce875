"""Evaluate a point: held-out loss/perplexity of the base and the merged (fine-tuned) model, and Harmony
generations scored for format validity and reasoning-language adherence.

    python -m gptoss_hpc.stages.eval logs/demo/20261125-081500/p000/config.yaml

Loss counts the tokens of the last assistant turn (analysis + final + <|return|>), as training with
``assistant_only_loss`` does for single-turn rows; rows are capped at ``eval.max_eval_rows``. Prompts: the
built-in German-reasoning one, one per reasoning language found in the data, then ``eval.prompts``.
Writes ``eval/eval.json`` and ``eval/generations.jsonl`` (both models' completions, parsed).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptoss_hpc.config import RunConfig
from gptoss_hpc.config.memory import EVAL_LOSS_CHUNK
from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.fileio import write_atomic
from gptoss_hpc.modeling.harmony import (
    HarmonyFormatError,
    ParsedCompletion,
    adheres,
    detect_language,
    format_validity,
    generate_completion,
    language_adherence,
    language_code,
    parse_completion,
    requested_language,
)
from gptoss_hpc.paths import PointPaths
from gptoss_hpc.stages.common import free_device_memory, run_stage, stage_cli

log = logging.getLogger(__name__)

DEFAULT_PROMPTS: list[dict[str, str]] = [
    {"system": "reasoning language: German", "user": "¿Cuál es el capital de Australia?"},
]
IGNORE = -100


class EvalError(GptossHpcError):
    """The merged model is missing or the held-out data cannot be scored."""


@dataclass
class Prompt:
    id: str
    messages: list[dict[str, Any]]
    language: str | None  # requested reasoning language (None: not scored for adherence)


# --- prompts ----------------------------------------------------------------------------------------


def _prompt_messages(spec: dict[str, str]) -> list[dict[str, Any]]:
    unknown = set(spec) - {"system", "developer", "user"}
    if unknown or "user" not in spec:
        raise EvalError(f"eval.prompts entry {spec!r}: expected keys system/developer (optional) and user (required)")
    return [{"role": role, "content": spec[role]} for role in ("system", "developer", "user") if role in spec]


def _checked_language(messages: list[dict[str, Any]], prompt_id: str) -> str | None:
    lang = requested_language(messages)
    if lang is None:
        return None
    try:
        language_code(lang)
    except HarmonyFormatError as exc:
        log.warning("prompt %s: %s; it is not scored for adherence", prompt_id, exc)
        return None
    return lang


def build_prompts(cfg: RunConfig, rows: Sequence[Sequence[dict[str, Any]]]) -> list[Prompt]:
    """Built-in prompts, then one per reasoning language in ``rows`` (the first row naming it, without
    its last assistant turn), then ``cfg.eval.prompts``."""
    from gptoss_hpc.data import template_messages

    prompts: list[Prompt] = []
    for i, spec in enumerate(DEFAULT_PROMPTS):
        messages = _prompt_messages(spec)
        prompts.append(Prompt(f"default-{i}", messages, _checked_language(messages, f"default-{i}")))
    seen: set[str] = set()
    for messages in rows:
        lang = requested_language(messages)
        if not lang or lang.lower() in seen:
            continue
        seen.add(lang.lower())
        turns = template_messages(list(messages))
        last_assistant = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=len(turns))
        prompt = [{"role": t["role"], "content": t["content"]} for t in turns[:last_assistant]]
        if prompt and prompt[-1]["role"] == "user":
            pid = f"data-{lang.lower()}"
            prompts.append(Prompt(pid, prompt, _checked_language(prompt, pid)))
    for i, spec in enumerate(cfg.eval.prompts):
        messages = _prompt_messages(dict(spec))
        prompts.append(Prompt(f"config-{i}", messages, _checked_language(messages, f"config-{i}")))
    return prompts


# --- held-out loss ----------------------------------------------------------------------------------


def assistant_labels(
    tokenizer: Any, messages: Sequence[dict[str, Any]], max_length: int
) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) with labels = the tokens of the last assistant turn, -100 elsewhere.

    The prompt is the conversation up to that turn rendered with the generation prompt, which the
    gpt-oss template renders as an exact prefix of the full conversation. None when the row has no
    assistant turn or nothing of it fits in max_length.
    """
    from gptoss_hpc.data import template_messages

    turns = template_messages(list(messages))
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None:
        return None
    full = list(tokenizer.apply_chat_template(turns[: last + 1], tokenize=True, return_dict=True)["input_ids"])
    prompt = list(
        tokenizer.apply_chat_template(turns[:last], tokenize=True, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
    )
    if full[: len(prompt)] != prompt:
        raise EvalError("the chat template does not render the prompt as a prefix of the conversation")
    full = full[:max_length]
    labels = [IGNORE] * min(len(prompt), len(full)) + full[len(prompt) :]
    if all(t == IGNORE for t in labels[1:]):
        return None
    return full, labels


# predicted tokens per fp32 loss chunk: 512 x 201,088 x 4 bytes = 0.38 GiB (+ its log-softmax); the memory plan's too
LOSS_CHUNK = EVAL_LOSS_CHUNK


def heldout_loss(model: Any, tokenizer: Any, rows: Sequence[Sequence[dict[str, Any]]], max_length: int) -> dict:
    """Token-weighted mean NLL over assistant tokens of ``rows``, and its perplexity."""
    import torch

    device = next(model.parameters()).device
    total, tokens, used = 0.0, 0, 0
    model.eval()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: its layers stay injected
    with torch.inference_mode():
        for messages in rows:
            item = assistant_labels(tokenizer, messages, max_length)
            if item is None:
                continue
            ids, labels = item
            x = torch.tensor([ids], device=device)
            # Logits only where a label is predicted (position i predicts token i + 1), and the fp32 loss in chunks:
            # the whole row's fp32 logits and log-softmax were ~3.8 GiB for a 2,048-token row (vocab 201,088).
            # The decoder's last hidden states once (no KV cache), then lm_head chunk by chunk: a long row's
            # predicted logits at once ([tokens, vocab] bf16) would be 0.37 GiB per 1,000 tokens.
            keep = torch.tensor([i for i, t in enumerate(labels[1:]) if t != IGNORE], device=device)
            y = torch.tensor([t for t in labels[1:] if t != IGNORE], device=device)
            hidden = base.model(input_ids=x, use_cache=False).last_hidden_state[0]
            for lo in range(0, len(keep), LOSS_CHUNK):
                chunk = base.lm_head(hidden[keep[lo : lo + LOSS_CHUNK]]).float()
                total += float(torch.nn.functional.cross_entropy(chunk, y[lo : lo + LOSS_CHUNK], reduction="sum"))
            tokens += len(keep)
            used += 1
            del hidden
    if tokens == 0:
        return {"loss": None, "perplexity": None, "tokens": 0, "rows": 0}
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens, "rows": used}


# --- generations ------------------------------------------------------------------------------------


def generation_records(
    model: Any, tokenizer: Any, prompts: Sequence[Prompt], *, tag: str, max_new_tokens: int, do_sample: bool
) -> list[dict[str, Any]]:
    """Every prompt's completion, decoded together with continuous batching (greedy output equals generate's,
    tests/test_serve_batching.py); one at a time where the model cannot be batched (a warning says why)."""
    from gptoss_hpc.serving.batching import generate_completions

    conversations = [p.messages for p in prompts]
    texts = generate_completions(model, tokenizer, conversations, max_new_tokens=max_new_tokens, do_sample=do_sample)
    if texts is None:
        texts = [
            generate_completion(model, tokenizer, c, max_new_tokens=max_new_tokens, do_sample=do_sample)
            for c in conversations
        ]
    return [score_completion(prompt, parse_completion(text), tag) for prompt, text in zip(prompts, texts, strict=True)]


def score_completion(prompt: Prompt, parsed: ParsedCompletion, tag: str) -> dict[str, Any]:
    return {
        "model": tag,
        "prompt_id": prompt.id,
        "messages": prompt.messages,
        "requested_language": prompt.language,
        "completion": parsed.text,
        "valid": parsed.valid,
        "parse_error": parsed.error,
        "analysis": parsed.analysis,
        "final": parsed.final,
        "detected_language": detect_language(parsed.analysis),
        "adherent": adheres(parsed, prompt.language) if prompt.language else None,
    }


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """format_validity and language_adherence (None when undefined) plus their counts."""
    parsed = [
        ParsedCompletion(text=r["completion"], analysis=r["analysis"] or "", final=r["final"], valid=r["valid"])
        for r in records
    ]
    languages = [r["requested_language"] for r in records]
    return {
        "format_validity": format_validity(parsed),
        "language_adherence": language_adherence(parsed, languages),
        "generations": len(records),
        "valid": sum(r["valid"] for r in records),
        "with_requested_language": sum(1 for lang in languages if lang),
        "adherent": sum(1 for r in records if r["adherent"]),
    }


# --- stage ------------------------------------------------------------------------------------------


def load_merged(cfg: RunConfig, paths: PointPaths) -> Any:
    from gptoss_hpc.modeling.model import load_inference_model

    return load_inference_model(paths.merged, cfg)


def load_base(cfg: RunConfig, paths: PointPaths) -> Any:
    import torch

    from gptoss_hpc.modeling.model import load_base_model

    base = load_base_model(cfg, paths, for_training=False, for_generation=True)
    if torch.cuda.is_available() and next(base.parameters()).device.type == "cpu":  # the tiny model is built
        base = base.to("cuda")
    return base


def _evaluate(
    model: Any, tokenizer: Any, rows: list, prompts: list[Prompt], cfg: RunConfig, tag: str
) -> tuple[dict, list]:
    loss = heldout_loss(model, tokenizer, rows, cfg.train.max_length)
    records = generation_records(
        model, tokenizer, prompts, tag=tag, max_new_tokens=cfg.eval.max_new_tokens, do_sample=cfg.eval.do_sample
    )
    result = {**loss, **summarize(records)}
    log.info(
        "%s: loss %s, format validity %s, adherence %s",
        tag,
        loss["loss"],
        result["format_validity"],
        result["language_adherence"],
    )
    return result, records


def _evaluate_one(
    load: Callable[[], Any], tokenizer: Any, rows: list, prompts: list[Prompt], cfg: RunConfig, tag: str
) -> tuple[dict, list]:
    """Load, score and free one model: the base and the merged model are never on the device together (two
    20b models would not fit one 80 GB card). Only this frame holds the model, so it is gone on return."""
    model = load()
    try:
        return _evaluate(model, tokenizer, rows, prompts, cfg, tag)
    finally:
        del model
        free_device_memory()


def load_adapter(cfg: RunConfig, paths: PointPaths) -> Any:
    from gptoss_hpc.modeling.model import load_adapter_model

    return load_adapter_model(cfg, paths, paths.adapter)


def _evaluate_unmerged(tokenizer: Any, rows: list, prompts: list[Prompt], cfg: RunConfig, paths: PointPaths):
    """eval.model=adapter: one model resident, the base + adapter unmerged; the base numbers come from the same
    model under PEFT's disable_adapter()."""
    model = load_adapter(cfg, paths)
    try:
        with model.disable_adapter():
            base = _evaluate(model, tokenizer, rows, prompts, cfg, "base")
        return base, _evaluate(model, tokenizer, rows, prompts, cfg, "finetuned")
    finally:
        del model
        free_device_memory()


def body(cfg: RunConfig, paths: PointPaths) -> Path:
    from transformers import AutoTokenizer

    from gptoss_hpc.config.derive import eval_model
    from gptoss_hpc.data import load_datasets

    kind = eval_model(cfg)
    folder = paths.adapter if kind == "adapter" else paths.merged
    marker = "adapter_config.json" if kind == "adapter" else "config.json"
    if not (folder / marker).is_file():
        stage = "train" if kind == "adapter" else "merge"
        raise EvalError(
            f"no {kind} model at {folder} ({marker} missing; eval.model={cfg.eval.model}): did {stage} finish?"
        )
    if kind == "adapter" and not (folder / "tokenizer_config.json").is_file():
        from gptoss_hpc.modeling.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    train, heldout = load_datasets(cfg, tokenizer)
    split = "eval"
    if heldout is None:
        log.warning("no held-out split (data.eval_fraction=0 and no data.eval_path): scoring training rows")
        heldout, split = train, "train"
    cap = cfg.eval.max_eval_rows
    rows = [r["messages"] for r in heldout.select(range(min(len(heldout), cap) if cap else len(heldout)))]
    prompts = build_prompts(cfg, rows + [r["messages"] for r in train])

    if kind == "adapter":
        (base_result, base_records), (ft_result, ft_records) = _evaluate_unmerged(tokenizer, rows, prompts, cfg, paths)
    else:
        base_result, base_records = _evaluate_one(lambda: load_base(cfg, paths), tokenizer, rows, prompts, cfg, "base")
        ft_result, ft_records = _evaluate_one(
            lambda: load_merged(cfg, paths), tokenizer, rows, prompts, cfg, "finetuned"
        )

    result = {
        "model": kind,
        "split": split,
        "rows": len(rows),
        "prompts": len(prompts),
        "max_new_tokens": cfg.eval.max_new_tokens,
        "base": base_result,
        "finetuned": ft_result,
        # headline numbers (the fine-tuned model's), read by the sweep report
        "eval_loss": ft_result["loss"],
        "perplexity": ft_result["perplexity"],
        "format_validity": ft_result["format_validity"],
        "language_adherence": ft_result["language_adherence"],
    }
    paths.eval.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in base_records + ft_records)
    write_atomic(paths.eval / "generations.jsonl", lines)
    write_atomic(paths.eval / "eval.json", json.dumps(result, indent=2) + "\n")
    log.info("eval written to %s", paths.eval)
    return paths.eval / "eval.json"


def main(config_path: str | os.PathLike[str]) -> Path:
    return run_stage("eval", config_path, body)


if __name__ == "__main__":
    raise SystemExit(stage_cli("eval", main, None, "usage: python -m gptoss_hpc.stages.eval <point config.yaml>"))
