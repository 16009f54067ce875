"""Harmony completions: generate with a gpt-oss chat model, parse the output into analysis/final channels,
and the two format metrics eval reports (format validity, reasoning-language adherence).

Parsing goes through openai-harmony on the *text* of a completion (decoded with special tokens kept and
re-encoded with the o200k Harmony encoding), so it works with the real gpt-oss tokenizer and with the
small test BPE alike. Shared by ``gptoss_hpc.stages.eval`` and ``gptoss_hpc.serving``.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from gptoss_hpc.errors import GptossHpcError

log = logging.getLogger(__name__)

# Harmony's stop tokens for an assistant turn: <|return|> ends the answer, <|call|> a tool call.
STOP_TOKENS = ("<|return|>", "<|call|>")
_REASONING_RE = re.compile(r"reasoning language:\s*([^\n\r.,;]+)", re.IGNORECASE)

# Language names as they appear in "reasoning language: <x>" -> langdetect codes.
LANGUAGE_CODES = {
    "arabic": "ar",
    "chinese": "zh",
    "czech": "cs",
    "danish": "da",
    "dutch": "nl",
    "english": "en",
    "finnish": "fi",
    "french": "fr",
    "deutsch": "de",
    "german": "de",
    "greek": "el",
    "hebrew": "he",
    "hindi": "hi",
    "hungarian": "hu",
    "indonesian": "id",
    "italian": "it",
    "japanese": "ja",
    "korean": "ko",
    "norwegian": "no",
    "polish": "pl",
    "portuguese": "pt",
    "romanian": "ro",
    "russian": "ru",
    "spanish": "es",
    "swedish": "sv",
    "thai": "th",
    "turkish": "tr",
    "ukrainian": "uk",
    "vietnamese": "vi",
}


class HarmonyFormatError(GptossHpcError):
    """The Harmony encoding or a language name could not be used."""


@dataclass
class ParsedCompletion:
    """One assistant completion split into Harmony channels. ``valid``: parsed as Harmony and has a final
    channel. ``error``: the parser's message when it did not parse."""

    text: str
    analysis: str = ""
    final: str | None = None
    valid: bool = False
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.lru_cache(maxsize=1)
def harmony_encoding() -> Any:
    """openai-harmony's gpt-oss encoding, with the o200k vocabulary from the local bpe-openai package."""
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    from gptoss_hpc.modeling.vocab import use_offline_harmony_vocab

    use_offline_harmony_vocab()
    try:
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as exc:  # the Rust side raises plain exceptions
        raise HarmonyFormatError(f"cannot load the Harmony gpt-oss encoding: {exc}") from exc


def parse_completion(text: str) -> ParsedCompletion:
    """Parse the text an assistant generated after ``<|start|>assistant`` (special tokens kept).

    Never raises on bad model output: a completion that is not Harmony comes back with ``valid=False``
    and the parser's message in ``error``.
    """
    from openai_harmony import Role

    enc = harmony_encoding()
    body = text
    # A completion may repeat the header the prompt already ended with.
    if body.startswith("<|start|>assistant"):
        body = body[len("<|start|>assistant") :]
    try:
        tokens = enc.encode(body, allowed_special="all")
        messages = enc.parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)
    except Exception as exc:  # HarmonyError and the Rust parser's ValueErrors
        return ParsedCompletion(text=text, error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    analysis: list[str] = []
    final: list[str] = []
    for message in messages:
        content = "".join(getattr(c, "text", "") or "" for c in (message.content or []))
        if message.channel == "analysis":
            analysis.append(content)
        elif message.channel == "final":
            final.append(content)
    final_text = "\n".join(final) if final else None
    return ParsedCompletion(
        text=text,
        analysis="\n".join(analysis),
        final=final_text,
        valid=final_text is not None,
        error=None if final_text is not None else "no final channel",
    )


def requested_language(messages: Sequence[dict[str, Any]]) -> str | None:
    """The language named by a system/developer line ``reasoning language: <x>``, as in the data."""
    for message in messages:
        if message.get("role") in ("system", "developer"):
            match = _REASONING_RE.search(str(message.get("content") or ""))
            if match:
                return match.group(1).strip()
    return None


def language_code(language: str) -> str:
    """'German' / 'deutsch' / 'de' -> 'de' (langdetect's codes)."""
    key = language.strip().lower()
    if key in LANGUAGE_CODES:
        return LANGUAGE_CODES[key]
    if key in LANGUAGE_CODES.values() or re.fullmatch(r"[a-z]{2}(-[a-z]{2})?", key):
        return key
    raise HarmonyFormatError(
        f"unknown reasoning language {language!r}: use an English language name "
        f"({', '.join(sorted(LANGUAGE_CODES))}) or a two-letter code"
    )


def detect_language(text: str) -> str | None:
    """langdetect's code for ``text`` (seeded, so repeatable); None for empty or undetectable text."""
    from langdetect import DetectorFactory, detect
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = 0
    if not text or not text.strip():
        return None
    try:
        code = detect(text)
    except LangDetectException:
        return None
    return code


def adheres(parsed: ParsedCompletion, language: str) -> bool:
    """True when the analysis channel is detected as ``language`` (zh-cn/zh-tw count as zh)."""
    detected = detect_language(parsed.analysis)
    if detected is None:
        return False
    want = language_code(language)
    return detected == want or detected.split("-")[0] == want.split("-")[0]


def format_validity(parsed: Iterable[ParsedCompletion]) -> float | None:
    """Share of completions that parse as Harmony with a final channel (None for no completions)."""
    items = list(parsed)
    return sum(p.valid for p in items) / len(items) if items else None


def language_adherence(parsed: Iterable[ParsedCompletion], languages: Iterable[str | None]) -> float | None:
    """Share, among completions whose prompt requested a reasoning language, whose analysis channel is in
    that language. A completion without analysis counts as not adhering. None when none requested one."""
    pairs = [(p, lang) for p, lang in zip(parsed, languages, strict=True) if lang]
    return sum(adheres(p, lang) for p, lang in pairs) / len(pairs) if pairs else None


# --- generation -------------------------------------------------------------------------------------


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn: Harmony's <|return|>/<|call|> plus the tokenizer's eos."""
    ids: list[int] = []
    for token in STOP_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.append(token_id)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise HarmonyFormatError("the tokenizer has neither Harmony stop tokens nor an eos token")
    return ids


def prompt_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The turns of an inference prompt as training renders them (gptoss_hpc.data.turns): system/developer
    turns merged into one leading turn (the template would drop all but ``messages[0]``), no None keys.
    Raises HarmonyFormatError on a control-token string in the text (the tokenizer would encode it as the
    real token; Harmony as text)."""
    from gptoss_hpc.data.rows import template_messages
    from gptoss_hpc.data.turns import control_token_problem, merge_instructions

    turns = [dict(m) for m in messages]
    problem = control_token_problem(turns)
    if problem:
        raise HarmonyFormatError(problem)
    merged, _ = merge_instructions(turns)
    return template_messages(merged)


def prompt_ids(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> list[int]:
    """Token ids of the generation prompt for ``messages`` (ends with ``<|start|>assistant``): what eval and
    serve generate from, equal to openai-harmony's ``render_conversation_for_completion``."""
    enc = tokenizer.apply_chat_template(prompt_messages(messages), add_generation_prompt=True, return_dict=True)
    return list(enc["input_ids"])


def generate_completion(
    model: Any,
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
) -> str:
    """Render ``messages`` with the chat template (generation prompt on), generate, and return the new
    tokens as text with special tokens kept, cut after the first stop token."""
    import torch

    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids(tokenizer, messages)], device=device)
    attention_mask = torch.ones_like(input_ids)
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            eos_token_id=stops,
            pad_token_id=pad,
        )
    new = out[0, input_ids.shape[1] :].tolist()
    for i, token in enumerate(new):
        if token in stops:
            new = new[: i + 1]
            break
    return tokenizer.decode(new, skip_special_tokens=False)
