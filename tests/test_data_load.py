"""load_datasets on real files: the bundled sample, local JSONL/JSON/Parquet/folders, the Hub path (faked),
bad-row reporting, skip_bad_rows, the held-out split and max_rows.

The only fake is the Hugging Face Hub: `datasets.load_dataset` is pointed at a local Parquet file that has
HuggingFaceH4/Multilingual-Thinking's exact columns (no Hub access from CI).
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
from gptoss_hpc.config.schema import RunConfig
from gptoss_hpc.data import load_data, load_datasets, sample_path
from gptoss_hpc.errors import DataError, ResourceNotReachableError


def run_config(*overrides: str) -> RunConfig:
    return to_run_config(compose(list(overrides)))


def mt_row(lang: str, user: str, analysis: str, final: str) -> dict[str, Any]:
    """A row in Multilingual-Thinking's exact shape."""
    return {
        "reasoning_language": lang,
        "developer": "You are a concise assistant.",
        "user": user,
        "analysis": analysis,
        "final": final,
        "messages": [
            {"role": "system", "content": f"reasoning language: {lang}", "thinking": None},
            {"role": "user", "content": user, "thinking": None},
            {"role": "assistant", "content": final, "thinking": analysis},
        ],
    }


def chat(user: str = "2+2?", answer: str = "4", thinking: str | None = "2+2=4") -> dict[str, Any]:
    turn: dict[str, Any] = {"role": "assistant", "content": answer}
    if thinking is not None:
        turn["thinking"] = thinking
    return {"messages": [{"role": "user", "content": user}, turn]}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_sample_source_loads_the_bundled_multilingual_rows() -> None:
    lines = sample_path().read_text(encoding="utf-8").splitlines()
    assert 60 <= len(lines) <= 90
    rows = [json.loads(line) for line in lines]
    assert {r["reasoning_language"] for r in rows} == {
        "English", "German", "French", "Spanish", "Italian", "Japanese",
    }  # fmt: skip
    for r in rows:
        assert set(r) == {"reasoning_language", "developer", "user", "analysis", "final", "messages"}
        assert r["messages"] == [
            {"role": "system", "content": f"reasoning language: {r['reasoning_language']}", "thinking": None},
            {"role": "user", "content": r["user"], "thinking": None},
            {"role": "assistant", "content": r["final"], "thinking": r["analysis"]},
        ]

    train, held = load_datasets(run_config("data=sample"))
    assert train.column_names == ["messages"]
    assert held is not None and len(train) + len(held) == len(rows)
    assert len(held) == round(len(rows) * 0.1)
    first = train[0]["messages"]
    assert [t["role"] for t in first] == ["system", "user", "assistant"]
    assert first[0]["content"] == "reasoning language: English"


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "folder"])
def test_local_source_each_format(tmp_path: Path, fmt: str) -> None:
    rows = [mt_row("German", f"Frage {i}?", f"Ich denke nach {i}.", f"Antwort {i}.") for i in range(6)]
    # a plain chat row without a system turn, but with a reasoning_language column: system turn prepended
    rows.append({**chat("Bonjour ?", "Salut."), "reasoning_language": "French"})
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "train.jsonl", rows)
    elif fmt == "json":
        path = tmp_path / "train.json"
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif fmt == "parquet":
        path = tmp_path / "train.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path = tmp_path / "shards"
        path.mkdir()
        write_jsonl(path / "a.jsonl", rows[:3])
        pq.write_table(pa.Table.from_pylist(rows[3:]), path / "b.parquet")
        (path / "README.md").write_text("ignored")
    train, held = load_datasets(run_config("data=local", f"data.path={path}", "data.eval_fraction=0"))
    assert held is None
    assert len(train) == 7
    msgs = [r["messages"] for r in train]
    assert msgs[0][2] == {"role": "assistant", "content": "Antwort 0.", "thinking": "Ich denke nach 0."}
    assert msgs[-1][0] == {"role": "system", "content": "reasoning language: French", "thinking": None}
    assert [t["role"] for t in msgs[-1]] == ["system", "user", "assistant"]
    assert not list(tmp_path.glob("**/*.arrow")), "loading local files must not write a cache"


def test_hub_source_with_multilingual_thinking_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FAKE: datasets.load_dataset reads a local Parquet with Multilingual-Thinking's columns (no Hub)."""
    import datasets

    parquet = tmp_path / "multilingual_thinking_train.parquet"
    rows = [mt_row("Japanese", f"質問{i}", f"考える{i}。", f"答え{i}") for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    calls: list[tuple[Any, ...]] = []
    real_load = datasets.load_dataset

    def fake_hub_load_dataset(name: str, split: str | None = None, revision: str | None = None, **kw: Any):
        calls.append((name, split, revision))
        return real_load("parquet", data_files=str(parquet), split="train", cache_dir=str(tmp_path / "c"))

    monkeypatch.setattr(datasets, "load_dataset", fake_hub_load_dataset)
    cfg = run_config("data=multilingual_thinking", "data.revision=abc123")
    loaded = load_data(cfg)
    assert calls == [("HuggingFaceH4/Multilingual-Thinking", "train", "abc123")]
    assert loaded.train.column_names == ["messages"]
    assert len(loaded.train) == 9 and loaded.eval is not None and len(loaded.eval) == 1
    assert loaded.stats["rows_read"] == 10
    turns = loaded.train[0]["messages"]
    assert turns[0]["content"] == "reasoning language: Japanese"
    assert turns[2]["thinking"].startswith("考える")


def test_hub_unreachable_names_dataset_and_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """FAKE: the Hub's offline error, raised the way datasets raises it without network."""
    import datasets

    def offline(*args: Any, **kwargs: Any):
        raise ConnectionError("Couldn't reach 'HuggingFaceH4/Multilingual-Thinking' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ResourceNotReachableError) as e:
        load_datasets(run_config("data=multilingual_thinking"))
    msg = str(e.value)
    assert "HuggingFaceH4/Multilingual-Thinking" in msg
    assert "HF_TOKEN" in msg and "data=local data.path=" in msg


BAD = [
    {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
    {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
    {"messages": "user: hi / assistant: hello"},
    {"messages": [{"role": "user", "content": "hi", "thinking": "hm"}, {"role": "assistant", "content": ""}]},
    {"messages": [{"role": "user", "content": "hi"}]},
    {"messages": []},
    {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
]
REASONS = [
    "role 'robot' is not one of",
    "missing content",
    "messages is not a list (got str)",
    "thinking is only allowed on assistant turns",
    "no assistant turn",
    "empty conversation",
    "content is a int",
]


def test_bad_rows_each_named_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(chat())] + [json.dumps(b) for b in BAD] + ["{not json", json.dumps(chat())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        load_datasets(run_config("data=local", f"data.path={path}"))
    msg = str(e.value)
    for lineno, reason in enumerate(REASONS, start=2):  # line 1 is good
        assert f"{path}:{lineno}: " in msg and reason in msg, (lineno, reason, msg)
    assert f"{path}:9: not valid JSON" in msg
    assert f"{path}:1:" not in msg and f"{path}:10:" not in msg
    assert "8 bad row(s) of 10" in msg and "1-based line number" in msg
    assert "data.skip_bad_rows=true" in msg
    assert not out.exists()


def test_bad_parquet_rows_use_zero_based_index(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}] * 2
    rows.append({"messages": [{"role": "user", "content": "a"}, {"role": "critic", "content": "b"}]})
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=rf"{path}:2: turn 1: role 'critic'"):
        load_datasets(run_config("data=local", f"data.path={path}"))


def test_many_bad_rows_list_first_twenty_and_total(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": []}] * 25 + [chat()])
    with pytest.raises(DataError) as e:
        load_datasets(run_config("data=local", f"data.path={path}"))
    msg = str(e.value)
    assert "25 bad row(s) of 26" in msg and "... and 5 more" in msg
    assert f"{path}:20:" in msg and f"{path}:21:" not in msg


def test_skip_bad_rows_keeps_the_good_ones(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [chat("a?"), *BAD, chat("b?"), chat("c?")])
    loaded = load_data(run_config("data=local", f"data.path={path}", "data.skip_bad_rows=true", "data.eval_fraction=0"))
    assert [r["messages"][0]["content"] for r in loaded.train] == ["a?", "b?", "c?"]
    assert loaded.stats["bad_rows_skipped"] == len(BAD)
    assert loaded.stats["rows_read"] == len(BAD) + 3


def test_eval_path_file_and_its_bad_rows(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [chat(f"t{i}") for i in range(5)])
    held = write_jsonl(tmp_path / "eval.jsonl", [chat("e0"), chat("e1")])
    tr, ev = load_datasets(run_config("data=local", f"data.path={train}", f"data.eval_path={held}"))
    assert len(tr) == 5 and ev is not None
    assert [r["messages"][0]["content"] for r in ev] == ["e0", "e1"]

    write_jsonl(held, [chat("e0"), {"messages": [{"role": "user", "content": "only"}]}])
    with pytest.raises(DataError, match=rf"{held}:2: no assistant turn"):
        load_datasets(run_config("data=local", f"data.path={train}", f"data.eval_path={held}"))


def test_eval_fraction_is_seeded_disjoint_and_capped_by_max_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [chat(f"q{i}") for i in range(40)])

    def split(*extra: str) -> tuple[list[str], list[str]]:
        tr, ev = load_datasets(run_config("data=local", f"data.path={path}", *extra))
        assert ev is not None
        return [r["messages"][0]["content"] for r in tr], [r["messages"][0]["content"] for r in ev]

    a_train, a_eval = split("data.eval_fraction=0.25", "data.seed=1")
    b_train, b_eval = split("data.eval_fraction=0.25", "data.seed=1")
    _, c_eval = split("data.eval_fraction=0.25", "data.seed=2")
    assert (a_train, a_eval) == (b_train, b_eval)
    assert len(a_eval) == 10 and not set(a_train) & set(a_eval)
    assert set(a_train) | set(a_eval) == {f"q{i}" for i in range(40)}
    assert a_eval != c_eval

    m_train, m_eval = split("data.max_rows=20", "data.eval_fraction=0.1")
    assert len(m_train) == 18 and len(m_eval) == 2
    assert set(m_train) | set(m_eval) == {f"q{i}" for i in range(20)}


def test_too_few_rows_for_a_held_out_split(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "one.jsonl", [chat()])
    with pytest.raises(DataError, match="cannot hold out"):
        load_datasets(run_config("data=local", f"data.path={path}", "data.eval_fraction=0.5"))


def test_missing_local_path_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        load_datasets(run_config("data=local", f"data.path={tmp_path / 'nope.jsonl'}"))


def test_importing_the_package_stays_light() -> None:
    code = (
        "import sys, gptoss_hpc.data; "
        "heavy = [m for m in ('datasets', 'pandas', 'pyarrow', 'torch', 'transformers') "
        "if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
