"""Convert question/answer sets whose answers embed ``<think>…</think>`` into gpt-oss ``messages`` rows.

    python -m gptoss_hpc.data convert --format think-tags qa.jsonl data/ja --language Japanese

Each input row becomes::

    {"reasoning_language": <lang>,
     "messages": [{"role": "system", "content": "reasoning language: <lang>[\\n<persona>]"},
                  {"role": "user", "content": <question>},
                  {"role": "assistant", "thinking": <text inside the tags, stripped>,
                   "content": <the rest of the answer, stripped>}]}

Row outcomes (``rows_in = rows_out + broken + empty``):

* one ``<think>…</think>`` block → converted, with thinking;
* no tags at all → converted as a plain answer with **no thinking** (``without_tags``): gpt-oss then
  learns to answer with an empty analysis channel for such prompts, so keep them rare;
* broken tag structure (unclosed ``<think>``, stray ``</think>``, nested or several blocks, ``</think>``
  before ``<think>``) → not converted, reported with its row;
* empty answer, empty final answer after ``</think>``, empty question or empty language → dropped, reported.

Both ``OUTDIR/<stem>.parquet`` and ``OUTDIR/<stem>.jsonl`` are written atomically (temp file + rename),
only when the run succeeds.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptoss_hpc.data.readers import read_rows
from gptoss_hpc.errors import DataError

log = logging.getLogger(__name__)

INPUT_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
OPEN, CLOSE = "<think>", "</think>"


@dataclass
class ConvertReport:
    rows_in: int = 0
    rows_out: int = 0
    with_thinking: int = 0
    # rows converted as plain answers (no <think> tags): labels
    without_tags: list[str] = field(default_factory=list)
    # "<file>:<row>: <reason>" for broken tag structure (not converted)
    broken: list[str] = field(default_factory=list)
    # "<file>:<row>: <reason>" for empty answers / questions / languages (dropped)
    empty: list[str] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "with_thinking": self.with_thinking,
            "without_tags": len(self.without_tags),
            "broken_tags": len(self.broken),
            "empty": len(self.empty),
        }


def split_think(answer: str) -> tuple[str | None, str]:
    """(thinking, content) of an answer; thinking is None when there are no tags.

    Raises ValueError naming the structural problem for unclosed, stray, nested or repeated tags.
    """
    opens, closes = answer.count(OPEN), answer.count(CLOSE)
    if opens == 0 and closes == 0:
        return None, answer.strip()
    if opens == 1 and closes == 0:
        raise ValueError("unclosed <think> (no </think>)")
    if opens == 0:
        raise ValueError("stray </think> without <think>")
    if opens > 1 or closes > 1:
        second_open = answer.find(OPEN, answer.find(OPEN) + len(OPEN))
        nested = second_open != -1 and second_open < answer.find(CLOSE)
        kind = "nested <think> blocks" if nested else "several <think> blocks"
        raise ValueError(f"{kind} ({opens} <think>, {closes} </think>); expected exactly one")
    start, end = answer.find(OPEN), answer.find(CLOSE)
    if end < start:
        raise ValueError("</think> comes before <think>")
    thinking = answer[start + len(OPEN) : end].strip()
    before, after = answer[:start].strip(), answer[end + len(CLOSE) :].strip()
    content = "\n".join(part for part in (before, after) if part)
    return thinking, content


def convert_think_tags(
    input_path: str | Path,
    outdir: str | Path,
    *,
    question_column: str = "question",
    answer_column: str = "answer",
    language: str | None = None,
    language_column: str | None = None,
    persona: str | None = None,
) -> ConvertReport:
    """Convert INPUT into OUTDIR/<stem>.parquet and OUTDIR/<stem>.jsonl; returns the counts."""
    if (language is None) == (language_column is None):
        raise DataError("give exactly one of --language <name> or --language-column <column>")
    input_path = Path(input_path)
    report = ConvertReport()
    rows: list[dict[str, Any]] = []
    for raw in read_rows(input_path, INPUT_SUFFIXES):
        report.rows_in += 1
        if raw.error is not None:
            report.broken.append(f"{raw.label}: {raw.error}")
            continue
        value = raw.value
        if not isinstance(value, dict):
            report.broken.append(f"{raw.label}: row is a {type(value).__name__}, expected an object")
            continue
        missing = [c for c in (question_column, answer_column, language_column) if c and c not in value]
        if missing:
            raise DataError(
                f"{raw.label}: no column {', '.join(map(repr, missing))} "
                f"(columns: {', '.join(map(str, value))}); pass --question-column / --answer-column / "
                "--language-column"
            )
        question, answer = _text(value[question_column]), _text(value[answer_column])
        lang = language if language is not None else _text(value[language_column]).strip()
        if not answer.strip():
            report.empty.append(f"{raw.label}: empty answer")
            continue
        if not question.strip():
            report.empty.append(f"{raw.label}: empty question")
            continue
        if not lang:
            report.empty.append(f"{raw.label}: empty language in column {language_column!r}")
            continue
        try:
            thinking, content = split_think(answer)
        except ValueError as e:
            report.broken.append(f"{raw.label}: {e}")
            continue
        if not content:
            report.empty.append(f"{raw.label}: empty final answer after </think>")
            continue
        if thinking is None:
            report.without_tags.append(raw.label)
        else:
            report.with_thinking += 1
        rows.append(_row(lang, question.strip(), thinking or None, content, persona))
    report.rows_out = len(rows)
    if not rows:
        raise DataError(f"{input_path}: no row could be converted ({report.counts()}); nothing written")
    outdir = Path(outdir)
    report.outputs = write_outputs(rows, outdir, input_path.stem)
    log.info("converted %s: %s", input_path, report.counts())
    return report


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _row(lang: str, question: str, thinking: str | None, content: str, persona: str | None) -> dict[str, Any]:
    system = f"reasoning language: {lang}" + (f"\n{persona}" if persona else "")
    return {
        "reasoning_language": lang,
        "messages": [
            {"role": "system", "content": system, "thinking": None},
            {"role": "user", "content": question, "thinking": None},
            {"role": "assistant", "content": content, "thinking": thinking},
        ],
    }


def write_outputs(rows: list[dict[str, Any]], outdir: Path, stem: str) -> list[Path]:
    """Write <stem>.parquet and <stem>.jsonl: both go to temp files first, then both are renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    created = not outdir.exists()
    outdir.mkdir(parents=True, exist_ok=True)
    targets = {
        outdir / f"{stem}.parquet": lambda p: pq.write_table(pa.Table.from_pylist(rows), p),
        outdir / f"{stem}.jsonl": lambda p: p.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        ),
    }
    temps: dict[Path, Path] = {}
    try:
        for target, write in targets.items():
            temps[target] = _temp_write(target, write)
        for target, tmp in temps.items():
            os.replace(tmp, target)
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        if created and not any(outdir.iterdir()):
            outdir.rmdir()
        raise
    return list(targets)


def _temp_write(target: Path, write: Callable[[Path], Any]) -> Path:
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp
