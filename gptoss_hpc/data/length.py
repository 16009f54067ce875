"""Token lengths of training rows, rendered as the train stage renders them, and ``data.max_length_policy``.

A row's length is the token count of its prompt + completion (gptoss_hpc.data.turns.prompt_completion) through the
chat template TRL's SFTTrainer uses: with ``train.assistant_only_loss`` TRL swaps in its gpt-oss *training* template
(generation markers) when the tokenizer's own has none, so that is the template measured here
(``training_chat_template``). The launch, ``data stats`` and the train stage all count with ``measured_lengths``:
``row_length`` through one cache under ``$GPTOSS_HPC_CACHE/lengths/`` (default ~/.cache/gptoss_hpc), a file per
tokenizer + chat template keyed by a hash of each row's turns, so rows the launch measured are not tokenized again
by the job, a second launch or the other points of a sweep, and an edited row is measured anew. Large sets show a
progress bar.

Policies for rows longer than ``train.max_length``:
``refuse`` (the default): nothing is dropped; a row over the limit is an error naming ``file:row`` and its length.
``drop``: such rows are removed. ``truncate``: the conversation is cut after its last assistant turn, and that
turn's text is shortened (from the end of ``content``, then of ``thinking``: the same order as cutting the token
sequence from the right) until the row fits; a row whose prompt alone is over the limit is dropped (counted as
``dropped_prompt_too_long``). Dropped and truncated rows are counted with the tokens they lose.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from gptoss_hpc.config.schema import DataConfig, choices
from gptoss_hpc.data.turns import prompt_completion
from gptoss_hpc.errors import DataError
from gptoss_hpc.fileio import write_atomic
from gptoss_hpc.paths import cache_root

log = logging.getLogger(__name__)

LENGTH_POLICIES = choices(DataConfig, "max_length_policy")  # "refuse", "drop", "truncate"
# the source label of a row (``<file>:<row>``) while rows are loaded; removed before a Dataset is built
SOURCE_KEY = "_source"
LISTED = 10
PROGRESS_FROM = 500  # rows: a progress bar from here up


def training_chat_template(tokenizer: Any, assistant_only_loss: bool = True) -> str | None:
    """The template TRL's SFTTrainer renders rows with (None: the tokenizer's own)."""
    if not assistant_only_loss or not getattr(tokenizer, "chat_template", None):
        return None
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return None
    try:
        return get_training_chat_template(tokenizer)
    except ValueError:  # a template TRL has no training twin for: TRL then fails itself, with its message
        return None


def _ids(tokenizer: Any, messages: list[dict[str, Any]], chat_template: str | None) -> list[int]:
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, chat_template=chat_template)
    except Exception as e:  # jinja TemplateError, ValueError (no template) ...
        raise DataError(
            f"the tokenizer's chat template failed on a row ({type(e).__name__}: {e}); "
            "check that the tokenizer has the gpt-oss chat template (model.tokenizer)"
        ) from e
    ids = out["input_ids"]
    return ids[0] if ids and isinstance(ids[0], list) else ids


def row_length(tokenizer: Any, messages: Sequence[Mapping[str, Any]], chat_template: str | None = None) -> int:
    """Tokens of the row as the train stage trains it: prompt + the last assistant turn."""
    pc = prompt_completion(messages)
    return len(_ids(tokenizer, pc["prompt"] + pc["completion"], chat_template))


def _fingerprint(tokenizer: Any, template: str | None) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    h = hashlib.sha256(vocab.encode())
    h.update((template or tokenizer.chat_template or "").encode())
    return h.hexdigest()[:24]


def _row_key(messages: Sequence[Mapping[str, Any]]) -> str:
    return hashlib.sha1(json.dumps(list(messages), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def measured_lengths(
    tokenizer: Any, rows: Sequence[Mapping[str, Any]], chat_template: str | None = None, *, what: str = "rows"
) -> list[int]:
    """``row_length`` of every row (``{"messages": ...}``), through the lengths cache (see the module docstring)."""
    cache_file = cache_root() / "lengths" / f"{_fingerprint(tokenizer, chat_template)}.json"
    try:
        cache: dict[str, int] = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    except (OSError, ValueError):
        cache = {}  # a damaged cache is only a cache: measure again
    keys = [_row_key(r["messages"]) for r in rows]
    todo = [i for i, k in enumerate(keys) if k not in cache]
    if todo:
        for i in _progress(todo, f"measuring {len(todo)} {what}"):
            cache[keys[i]] = row_length(tokenizer, rows[i]["messages"], chat_template)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache_file, json.dumps(cache))
    log.info("measured %d rows (%d from the cache %s)", len(rows), len(rows) - len(todo), cache_file)
    return [cache[k] for k in keys]


def _progress(items: list[int], what: str):
    if len(items) < PROGRESS_FROM:
        return items
    from rich.progress import track

    return track(items, description=what, transient=True)


def apply_max_length(
    rows: list[dict[str, Any]],
    tokenizer: Any,
    max_length: int,
    policy: str,
    *,
    chat_template: str | None = None,
    lengths: Sequence[int] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Apply the policy; returns the kept rows and counts (over_max_length, dropped_too_long, truncated,
    dropped_prompt_too_long, tokens_dropped, tokens_truncated). ``lengths``: the rows' lengths if already known."""
    if policy not in LENGTH_POLICIES:
        raise DataError(f"data.max_length_policy={policy!r}: use {', '.join(LENGTH_POLICIES)}")
    if lengths is None:
        lengths = [row_length(tokenizer, r["messages"], chat_template) for r in rows]
    over = [i for i, n in enumerate(lengths) if n > max_length]
    counts = {
        "over_max_length": len(over),
        "dropped_too_long": 0,
        "truncated": 0,
        "dropped_prompt_too_long": 0,
        "tokens_dropped": 0,
        "tokens_truncated": 0,
    }
    if not over:
        return list(rows), counts
    if policy == "refuse":
        raise DataError(too_long_message(rows, lengths, max_length))
    kept: list[dict[str, Any]] = []
    over_set = set(over)
    for i, row in enumerate(rows):
        if i not in over_set:
            kept.append(row)
            continue
        if policy == "drop":
            counts["dropped_too_long"] += 1
            counts["tokens_dropped"] += lengths[i]
            continue
        cut = truncate_messages(tokenizer, row["messages"], max_length, chat_template)
        if cut is None:
            counts["dropped_prompt_too_long"] += 1
            counts["tokens_dropped"] += lengths[i]
            continue
        counts["truncated"] += 1
        counts["tokens_truncated"] += lengths[i] - row_length(tokenizer, cut, chat_template)
        kept.append({**row, "messages": cut})
    return kept, counts


def too_long_message(rows: Sequence[Mapping[str, Any]], lengths: Sequence[int], max_length: int) -> str:
    """``N rows are longer than train.max_length=M tokens`` with the longest as ``file:row: N tokens`` and the fixes."""
    over = sorted((i for i, n in enumerate(lengths) if n > max_length), key=lambda i: -lengths[i])
    listed = "\n".join(f"  {rows[i].get(SOURCE_KEY, f'row {i}')}: {lengths[i]} tokens" for i in over[:LISTED])
    more = f"\n  ... and {len(over) - LISTED} more" if len(over) > LISTED else ""
    return (
        f"{len(over)} row(s) are longer than train.max_length={max_length} tokens (nothing is dropped unless you "
        f"ask):\n{listed}{more}\nFix: train.max_length=auto (follow the data, where the card allows), or ask for "
        "data.max_length_policy=drop (remove them) or data.max_length_policy=truncate (shorten their last answer)"
    )


def truncate_messages(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], max_length: int, chat_template: str | None = None
) -> list[dict[str, Any]] | None:
    """Shorten the last assistant turn until the row fits; None if the prompt alone is too long."""
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

    if row_length(tokenizer, with_chars(0), chat_template) > max_length:
        return None
    lo, hi = 0, total  # largest k that fits, by bisection on characters kept
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if row_length(tokenizer, with_chars(mid), chat_template) <= max_length:
            lo = mid
        else:
            hi = mid - 1
    return with_chars(lo)
