"""Row validation and normalisation: every raw row becomes ``{"messages": [turn, ...]}`` or a problem line.

A turn is ``{"role": "system"|"developer"|"user"|"assistant", "content": str, "thinking": str | None}``;
only assistant turns may carry a non-empty ``thinking`` (gpt-oss renders it as the ``analysis`` channel).
Pure Python, no heavy imports: the validator runs before anything is tokenized or written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gptoss_hpc.data.turns import (
    CONTROL_TOKEN_RE,
    MULTI_TURN_POLICIES,
    control_token_problem,
    last_assistant,
    merge_instructions,
    trim_after_last_assistant,
)
from gptoss_hpc.errors import DataError

ROLES = ("system", "developer", "user", "assistant")
MAX_LISTED = 20


@dataclass
class RawRow:
    """One row as read, with where it came from: ``label`` is ``<file>:<row>``."""

    label: str
    value: Any
    # set when the row could not even be parsed (bad JSON line)
    error: str | None = None


@dataclass
class Normalised:
    rows: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # ``<file>:<row>: <what was changed>`` for rows kept with a change (merged instruction turns ...)
    notes: list[str] = field(default_factory=list)
    rows_read: int = 0
    # ``<file>:<row>`` of each kept row, in the order of ``rows``
    labels: list[str] = field(default_factory=list)


def normalise_row(
    raw: Any,
    *,
    messages_field: str = "messages",
    reasoning_language_field: str | None = None,
    control_tokens: re.Pattern[str] = CONTROL_TOKEN_RE,
    multi_turn: str = "last",
    notes: list[str] | None = None,
) -> tuple[list[dict[str, Any]] | None, str | None]:
    """(messages, None) for a good row, (None, reason) for a bad one; what was changed in a good row is
    appended to ``notes`` (gptoss_hpc.data.turns: merged instruction turns, cut trailing turns). The one row-shape
    check: ``data validate``, the launch and the train stage (gptoss_hpc.data.load) all call it."""
    if not isinstance(raw, Mapping):
        return None, f"row is a {type(raw).__name__}, expected an object with a {messages_field!r} field"
    if messages_field not in raw:
        return None, f"no {messages_field!r} field (fields: {', '.join(map(str, raw)) or 'none'})"
    messages = raw[messages_field]
    if isinstance(messages, tuple):
        messages = list(messages)
    if not isinstance(messages, list):
        return None, f"{messages_field} is not a list (got {type(messages).__name__})"
    if not messages:
        return None, "empty conversation (no turns)"
    turns: list[dict[str, Any]] = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, Mapping):
            return None, f"turn {i} is a {type(turn).__name__}, expected an object with role and content"
        role = turn.get("role")
        if role not in ROLES:
            return None, f"turn {i}: role {role!r} is not one of {', '.join(ROLES)}"
        if "content" not in turn or turn["content"] is None:
            return None, f"turn {i} ({role}): missing content"
        content = turn["content"]
        if not isinstance(content, str):
            return None, f"turn {i} ({role}): content is a {type(content).__name__}, expected a string"
        thinking = turn.get("thinking")
        if thinking is not None and not isinstance(thinking, str):
            return None, f"turn {i} ({role}): thinking is a {type(thinking).__name__}, expected a string"
        if thinking and role != "assistant":
            return None, f"turn {i} ({role}): thinking is only allowed on assistant turns"
        turns.append({"role": role, "content": content, "thinking": thinking or None})
    if not any(t["role"] == "assistant" for t in turns):
        return None, "no assistant turn (nothing to train on)"
    problem = control_token_problem(turns, control_tokens)
    if problem:
        return None, problem
    if reasoning_language_field and not any(t["role"] == "system" for t in turns):
        lang = raw.get(reasoning_language_field)
        if isinstance(lang, str) and lang.strip():
            system = {"role": "system", "content": f"reasoning language: {lang.strip()}", "thinking": None}
            turns.insert(0, system)
            if control_tokens.search(system["content"]):
                return None, f"{reasoning_language_field} holds a control-token string; remove it"
    turns, merged = merge_instructions(turns)
    turns, trimmed = trim_after_last_assistant(turns)
    if turns[0]["role"] == "assistant" and (multi_turn == "split" or last_assistant(turns) == 0):
        return None, _nothing_before(multi_turn if multi_turn in MULTI_TURN_POLICIES else "last")
    if notes is not None:
        notes.extend(n for n in (merged, trimmed) if n)
    return turns, None


def _nothing_before(multi_turn: str) -> str:
    """An assistant turn trained with nothing before it: TRL renders its prompt (an empty conversation) and fails."""
    which = "the first assistant turn" if multi_turn == "split" else "the trained (last) assistant turn"
    split = " (data.multi_turn=split trains every assistant turn)" if multi_turn == "split" else ""
    return (
        f"{which} has no turn before it{split}: gpt-oss is trained to answer a prompt, and empty system/developer "
        "turns are dropped; add the user turn it answers (or a system turn) before it"
    )


def normalise_rows(
    rows: Iterable[RawRow],
    *,
    messages_field: str = "messages",
    reasoning_language_field: str | None = None,
    control_tokens: re.Pattern[str] = CONTROL_TOKEN_RE,
    multi_turn: str = "last",
) -> Normalised:
    """Validate every row; collect all problems as ``<file>:<row>: <reason>`` and changes to kept rows as
    ``<file>:<row>: <note>`` (nothing is raised here)."""
    out = Normalised()
    for raw in rows:
        out.rows_read += 1
        if raw.error is not None:
            out.problems.append(f"{raw.label}: {raw.error}")
            continue
        notes: list[str] = []
        messages, reason = normalise_row(
            raw.value,
            messages_field=messages_field,
            reasoning_language_field=reasoning_language_field,
            control_tokens=control_tokens,
            multi_turn=multi_turn,
            notes=notes,
        )
        if reason is not None:
            out.problems.append(f"{raw.label}: {reason}")
        else:
            out.rows.append({"messages": messages})
            out.labels.append(raw.label)
            out.notes.extend(f"{raw.label}: {n}" for n in notes)
    return out


def bad_rows_error(problems: list[str], rows_read: int, *, where: str) -> DataError:
    listed = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return DataError(
        f"{len(problems)} bad row(s) of {rows_read} in {where} "
        f"(row = 1-based line number for .jsonl, 0-based row index for .parquet/.json/hub):\n"
        f"{listed}{more}\n"
        "Fix these rows, or skip them with data.skip_bad_rows=true."
    )


def template_messages(messages: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Turns as the gpt-oss chat template wants them: no ``thinking`` key unless it holds text.

    Arrow stores every turn with the same keys, so a loaded row has ``thinking: None`` on turns without
    one, and the raw gpt-oss template fails on an assistant turn whose ``thinking`` is None.
    transformers >= 5 drops None-valued keys in ``apply_chat_template`` itself; use this where the
    template is rendered some other way (older transformers, vLLM, openai-harmony).
    """
    out = []
    for turn in messages:
        t = {"role": turn["role"], "content": turn["content"]}
        if turn.get("thinking"):
            t["thinking"] = turn["thinking"]
        out.append(t)
    return out


def parse_json_line(line: str) -> tuple[Any, str | None]:
    try:
        return json.loads(line), None
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at column {e.colno})"
