"""The think-tags converter on real files (JSONL, CSV, Parquet), through the library and the CLI.

Acceptance file: normal rows, a row without tags, broken tags (unclosed, stray, nested, several), empty
answers and Japanese text. Expected counts: 10 in, 3 out (2 with thinking, 1 without tags), 4 broken,
3 empty. The outputs (Parquet and JSONL, same content) load with data.source=local.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptoss_hpc.config.io import compose, to_run_config
from gptoss_hpc.data import load_datasets
from gptoss_hpc.data.convert import convert_think_tags, split_think
from gptoss_hpc.errors import DataError

ROWS: list[dict[str, Any]] = [
    {"question": "1+1は？", "answer": "<think>1と1を足すと2になる。</think>答えは2です。"},  # 1 ok
    {"question": "日本の首都は？", "answer": "<think>\n  首都は東京。\n</think>\n\n東京です。\n"},  # 2 ok
    {"question": "富士山の高さは？", "answer": "3,776メートルです。"},  # 3 no tags: kept, no thinking
    {"question": "Broken?", "answer": "<think>考え中…答えは5"},  # 4 unclosed
    {"question": "Empty?", "answer": ""},  # 5 empty answer
    {"question": "Stray?", "answer": "答え</think>です"},  # 6 stray close
    {"question": "Nested?", "answer": "<think>a<think>b</think></think>c"},  # 7 nested
    {"question": "Only thinking?", "answer": "<think>考えるだけ</think>   "},  # 8 empty final answer
    {"question": "Twice?", "answer": "<think>a</think>x<think>b</think>y"},  # 9 several blocks
    {"question": "Whitespace?", "answer": "  \n "},  # 10 empty answer
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_split_think() -> None:
    assert split_think("<think> a </think> b ") == ("a", "b")
    assert split_think("plain") == (None, "plain")
    assert split_think("intro <think>t</think> end") == ("t", "intro\nend")
    for bad, reason in [
        ("<think>x", "unclosed"),
        ("x</think>", "stray"),
        ("<think>a<think>b</think></think>", "nested"),
        ("<think>a</think><think>b</think>", "several"),
        ("</think>a<think>", "before"),
    ]:
        with pytest.raises(ValueError, match=reason):
            split_think(bad)


def test_acceptance_file_counts_outputs_and_loading(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "ja_reasoning.jsonl", ROWS)
    out = tmp_path / "out"
    report = convert_think_tags(src, out, language="Japanese", persona="あなたは丁寧なアシスタントです。")
    assert report.counts() == {
        "rows_in": 10, "rows_out": 3, "with_thinking": 2, "without_tags": 1, "broken_tags": 4, "empty": 3,
    }  # fmt: skip
    assert report.without_tags == [f"{src}:3"]
    assert [line.split(": ")[0] for line in report.broken] == [f"{src}:{n}" for n in (4, 6, 7, 9)]
    assert "unclosed <think>" in report.broken[0] and "nested" in report.broken[2]
    assert [line.split(": ")[0] for line in report.empty] == [f"{src}:{n}" for n in (5, 8, 10)]

    parquet, jsonl = out / "ja_reasoning.parquet", out / "ja_reasoning.jsonl"
    assert sorted(report.outputs) == sorted([parquet, jsonl])
    assert sorted(p.name for p in out.iterdir()) == ["ja_reasoning.jsonl", "ja_reasoning.parquet"]
    from_jsonl, from_parquet = read_jsonl(jsonl), pq.read_table(parquet).to_pylist()
    assert from_jsonl == from_parquet
    first = from_jsonl[0]
    assert first["reasoning_language"] == "Japanese"
    assert first["messages"] == [
        {
            "role": "system",
            "content": "reasoning language: Japanese\nあなたは丁寧なアシスタントです。",
            "thinking": None,
        },
        {"role": "user", "content": "1+1は？", "thinking": None},
        {"role": "assistant", "content": "答えは2です。", "thinking": "1と1を足すと2になる。"},
    ]
    assert from_jsonl[1]["messages"][2] == {"role": "assistant", "content": "東京です。", "thinking": "首都は東京。"}
    assert from_jsonl[2]["messages"][2] == {"role": "assistant", "content": "3,776メートルです。", "thinking": None}
    assert "富士山" in jsonl.read_text(encoding="utf-8")  # UTF-8, not \\u escapes

    for path in (jsonl, parquet):
        cfg = to_run_config(compose(["data=local", f"data.path={path}", "data.eval_fraction=0"]))
        train, held = load_datasets(cfg)
        assert held is None and len(train) == 3
        assert [r["messages"] for r in train] == [r["messages"] for r in from_jsonl]
    cfg = to_run_config(compose(["data=local", f"data.path={out}"]))
    with pytest.raises(DataError, match="same name in several formats"):
        load_datasets(cfg)


def test_csv_and_parquet_inputs_with_language_column(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Was ist 2+2?", "response": "<think>Zwei plus zwei ist vier.</think>4", "lang": "German"},
        {"prompt": "Quanto fa 3+3?", "response": "<think>Tre più tre fa sei.</think>6", "lang": "Italian"},
        {"prompt": "Sin idioma", "response": "<think>x</think>y", "lang": ""},
    ]
    csv = tmp_path / "qa.csv"
    import pandas as pd

    pd.DataFrame(rows).to_csv(csv, index=False)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa2.parquet")
    for src in (csv, tmp_path / "qa2.parquet"):
        report = convert_think_tags(
            src, tmp_path / "out", question_column="prompt", answer_column="response", language_column="lang"
        )
        assert (report.rows_in, report.rows_out) == (3, 2)
        assert report.empty == [f"{src}:2: empty language in column 'lang'"]  # 0-based row index
        got = read_jsonl(tmp_path / "out" / f"{src.stem}.jsonl")
        assert [r["messages"][0]["content"] for r in got] == [
            "reasoning language: German",
            "reasoning language: Italian",
        ]
        assert got[1]["messages"][2] == {"role": "assistant", "content": "6", "thinking": "Tre più tre fa sei."}


def test_missing_column_and_no_convertible_rows_write_nothing(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "bad.jsonl", [{"q": "a", "answer": "b"}])
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"no column 'question' \(columns: q, answer\)"):
        convert_think_tags(src, out, language="English")
    assert not out.exists()

    src = write_jsonl(tmp_path / "broken.jsonl", [{"question": "a", "answer": "<think>never closed"}])
    out.mkdir()
    (out / "broken.jsonl").write_text("previous good output\n")
    with pytest.raises(DataError, match="no row could be converted"):
        convert_think_tags(src, out, language="English")
    assert (out / "broken.jsonl").read_text() == "previous good output\n"
    assert sorted(p.name for p in out.iterdir()) == ["broken.jsonl"]


def test_a_failing_write_leaves_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_jsonl(tmp_path / "ok.jsonl", ROWS[:2])
    out = tmp_path / "out"

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert_think_tags(src, out, language="Japanese")
    assert not out.exists()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gptoss_hpc.data", *args], capture_output=True, text=True, check=False)


def test_cli_convert_prints_counts(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "ja_reasoning.jsonl", ROWS)
    res = run_cli("convert", "--format", "think-tags", str(src), str(tmp_path / "out"), "--language", "Japanese")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "rows in:                10" in lines and "rows out:               3" in lines
    assert "  without <think> tags: 1 (kept as plain answers, no thinking)" in lines
    assert "broken tag structure:   4 (not converted)" in lines
    assert "empty answers:          3 (dropped)" in lines
    assert f"    {src}:4: unclosed <think> (no </think>)" in lines
    assert f"wrote {tmp_path / 'out' / 'ja_reasoning.parquet'}" in lines

    res = run_cli("convert", "--help")
    assert res.returncode == 0 and "examples:" in res.stdout and "--language-column" in res.stdout
    res = run_cli("convert", "--format", "think-tags", str(src), str(tmp_path / "o2"))
    assert res.returncode == 2 and "--language" in res.stderr


def test_cli_validate(tmp_path: Path) -> None:
    turns = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    good = write_jsonl(tmp_path / "good.jsonl", [{"messages": turns}])
    res = run_cli("validate", str(good))
    assert res.returncode == 0 and "1 rows OK" in res.stdout
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"messages": turns}, {"messages": [{"role": "bot", "content": "x"}]}, {"messages": turns[1:]}],
    )
    res = run_cli("validate", str(bad))
    assert res.returncode == 1
    assert f"{bad}:2: turn 0: role 'bot'" in res.stderr and "2 bad row(s) of 3" in res.stderr
    # an assistant turn alone passed here and crashed TRL's chat-template step in the train stage
    assert f"{bad}:3: the trained (last) assistant turn has no turn before it" in res.stderr
