"""Token lengths through the tokenizer's chat template, and the ``data.max_length_policy`` for long rows.

``drop``: rows whose rendered conversation is longer than ``train.max_length`` tokens are removed.
``truncate``: the conversation is cut after its last assistant turn, and that turn's text is shortened
(from the end of ``content``, then of ``thinking`` — the same order as cutting the token sequence from
the right) until the row fits; the row keeps its closing ``<|return|>`` token. A row whose prompt alone
is over the limit cannot be truncated and is dropped (counted as ``dropped_prompt_too_long``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from gptoss_hpc.data.rows import template_messages
from gptoss_hpc.errors import DataError

log = logging.getLogger(__name__)


def token_length(tokenizer: Any, messages: list[Mapping[str, Any]]) -> int:
    """Length in tokens of the conversation rendered with the tokenizer's chat template."""
    try:
        ids = tokenizer.apply_chat_template(template_messages(messages), tokenize=True)
    except Exception as e:  # jinja TemplateError, ValueError (no template) ...
        raise DataError(
            f"the tokenizer's chat template failed on a row ({type(e).__name__}: {e}); "
            "check that the tokenizer has the gpt-oss chat template (model.tokenizer)"
        ) from e
    if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    if ids and isinstance(ids[0], list):  # batched by mistake
        ids = ids[0]
    return len(ids)


def apply_max_length(
    rows: list[dict[str, Any]], tokenizer: Any, max_length: int, policy: str
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Apply the policy; returns the kept rows and counts (over_max_length, dropped, truncated, ...)."""
    if policy not in ("drop", "truncate"):
        raise DataError(f"data.max_length_policy={policy!r}: use drop or truncate")
    kept: list[dict[str, Any]] = []
    counts = {"over_max_length": 0, "dropped_too_long": 0, "truncated": 0, "dropped_prompt_too_long": 0}
    for row in rows:
        messages = row["messages"]
        if token_length(tokenizer, messages) <= max_length:
            kept.append(row)
            continue
        counts["over_max_length"] += 1
        if policy == "drop":
            counts["dropped_too_long"] += 1
            continue
        cut = truncate_messages(tokenizer, messages, max_length)
        if cut is None:
            counts["dropped_prompt_too_long"] += 1
            continue
        counts["truncated"] += 1
        kept.append({**row, "messages": cut})
    return kept, counts


def truncate_messages(
    tokenizer: Any, messages: list[Mapping[str, Any]], max_length: int
) -> list[dict[str, Any]] | None:
    """Shorten the last assistant turn until the conversation fits; None if the prompt alone is too long."""
    last = max(i for i, t in enumerate(messages) if t["role"] == "assistant")
    head = [dict(t) for t in messages[:last]]
    turn = dict(messages[last])
    thinking: str = turn.get("thinking") or ""
    content: str = turn["content"]
    total = len(thinking) + len(content)

    def with_chars(k: int) -> list[dict[str, Any]]:
        t = dict(turn)
        t["thinking"] = thinking[:k] or None
        t["content"] = content[: max(0, k - len(thinking))]
        return [*head, t]

    if token_length(tokenizer, with_chars(0)) > max_length:
        return None
    lo, hi = 0, total  # largest k that fits, by bisection on characters kept
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if token_length(tokenizer, with_chars(mid)) <= max_length:
            lo = mid
        else:
            hi = mid - 1
    return with_chars(lo)
