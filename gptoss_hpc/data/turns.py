"""How a normalised conversation becomes what gpt-oss is trained on, as openai-harmony renders it.

The gpt-oss chat template has room for ONE instruction turn (``messages[0]`` when it is system or
developer, rendered as Harmony's developer ``# Instructions``) and trains what follows. So, per row:

- ``merge_instructions``: every system/developer turn is folded, in order, into the leading one (joined
  by a blank line); the template would otherwise drop all but ``messages[0]``. The row gets a note.
- ``control_token_problem``: text holding a Harmony control-token string (``<|end|>``, ``<|start|>`` ...)
  is refused: the HF tokenizer would encode it as the real token (Harmony encodes it as text).
- ``trim_after_last_assistant``: turns after the last assistant turn train nothing; cut with a note.
- ``split_assistant_turns`` (``data.multi_turn=split``): one conversation per assistant turn.
- ``prompt_completion``: ``{"prompt": turns before the last assistant turn, "completion": [it]}``, TRL's
  conversational prompt-completion shape: the loss covers only the last assistant turn (earlier turns are
  context, rendered without their analysis as Harmony does).

Pure Python: runs in the validator before anything is tokenized.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gptoss_hpc.config.schema import DataConfig, choices

INSTRUCTION_ROLES = ("system", "developer")
MULTI_TURN_POLICIES = choices(DataConfig, "multi_turn")  # "last", "split"
# Every gpt-oss/Harmony special token (ids 199998..201087 and Harmony's <|reserved_201088|>).
_CONTROL_NAMES = "startoftext|endoftext|return|constrain|channel|start|end|message|call|endofprompt|reserved_\\d+"
CONTROL_TOKEN_RE = re.compile(rf"<\|(?:{_CONTROL_NAMES})\|>")
Turn = dict[str, Any]


def control_token_pattern(extra: Iterable[str] = ()) -> re.Pattern[str]:
    """The Harmony control tokens, plus a tokenizer's other special-token strings (``extra``)."""
    others = sorted({t for t in extra if t and not CONTROL_TOKEN_RE.fullmatch(t)}, key=len, reverse=True)
    if not others:
        return CONTROL_TOKEN_RE
    return re.compile("|".join([CONTROL_TOKEN_RE.pattern, *map(re.escape, others)]))


def control_token_problem(
    turns: Sequence[Mapping[str, Any]], pattern: re.Pattern[str] = CONTROL_TOKEN_RE
) -> str | None:
    """The first control-token string found in any turn's text, as a reason line, or None."""
    for i, turn in enumerate(turns):
        for key in ("content", "thinking"):
            text = turn.get(key)
            match = pattern.search(text) if isinstance(text, str) else None
            if match:
                return (
                    f"turn {i} ({turn.get('role')}): {key} holds the control token {match.group(0)!r}, which the "
                    "tokenizer would encode as a real Harmony token (a fake turn boundary); remove or escape it "
                    "(e.g. write '<| end |>')"
                )
    return None


def merge_instructions(turns: Sequence[Turn]) -> tuple[list[Turn], str | None]:
    """(turns with at most one leading system/developer turn, a note when anything was merged).

    Empty instruction turns are dropped (nothing to lose). The merged turn keeps the first one's role;
    the template renders either role as the developer message's instructions.
    """
    instructions = [(i, t) for i, t in enumerate(turns) if t["role"] in INSTRUCTION_ROLES]
    if not instructions:
        return list(turns), None
    rest = [dict(t) for t in turns if t["role"] not in INSTRUCTION_ROLES]
    kept = [(i, t) for i, t in instructions if t["content"].strip()]
    if not kept:
        return rest, None
    merged = {**kept[0][1], "content": "\n\n".join(t["content"] for _, t in kept)}
    note = None
    if len(kept) > 1 or kept[0][0] != 0:
        where = ", ".join(f"turn {i} ({t['role']})" for i, t in kept)
        note = f"merged {len(kept)} system/developer turn(s) into one leading instruction turn ({where})"
    return [merged, *rest], note


def trim_after_last_assistant(turns: Sequence[Turn]) -> tuple[list[Turn], str | None]:
    """Cut the turns after the last assistant turn (nothing there is trained); a note when any were cut."""
    last = last_assistant(turns)
    if last is None or last == len(turns) - 1:
        return list(turns), None
    cut = [t["role"] for t in turns[last + 1 :]]
    return list(turns[: last + 1]), f"dropped {len(cut)} turn(s) after the last assistant turn ({', '.join(cut)})"


def last_assistant(turns: Sequence[Mapping[str, Any]]) -> int | None:
    return max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)


def split_assistant_turns(turns: Sequence[Turn]) -> list[list[Turn]]:
    """One conversation per assistant turn, each ending at it (``data.multi_turn=split``)."""
    return [list(turns[: i + 1]) for i, t in enumerate(turns) if t["role"] == "assistant"]


def prompt_completion(turns: Sequence[Mapping[str, Any]]) -> dict[str, list[Turn]]:
    """TRL's conversational prompt-completion row: loss only on the last assistant turn.

    Earlier assistant turns keep only their final answer: the template drops their ``thinking`` anyway
    (Harmony drops the analysis of finished turns), and Arrow then stores no analysis to mislead a reader.
    """
    last = last_assistant(turns)
    if last is None:
        raise ValueError("a training row needs an assistant turn")
    prompt = [{"role": t["role"], "content": t["content"]} for t in turns[:last]]
    completion = {"role": "assistant", "content": turns[last]["content"]}
    if turns[last].get("thinking"):
        completion["thinking"] = turns[last]["thinking"]
    return {"prompt": prompt, "completion": [completion]}
