"""The long-row data sets of the GPU check's `long` phase (gptoss_hpc.bench.long_rows): real files, read back."""

from __future__ import annotations

import json

from gptoss_hpc.bench.long_rows import main, row_lengths, write_long_rows


def test_mix_is_mostly_short_with_a_tenth_of_8k_to_32k_rows():
    lengths = row_lengths("mix", 600)
    long = [n for n in lengths if n >= 8192]
    assert len(long) == 60 and max(long) <= 32768
    assert all(256 <= n <= 4096 for n in lengths if n < 8192)


def test_128k_rows_stay_under_the_models_positions(tmp_path):
    path = tmp_path / "long.jsonl"
    lengths = write_long_rows(path, "128k", rows=2, scale=0.01)
    assert all(1200 <= n <= 1270 for n in lengths)  # 120k..127k words, scaled
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2 and [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant"]
    words = [sum(len(m["content"].split()) for m in r["messages"][1:]) for r in rows]
    assert words == lengths  # the profile beside the file is what was written
    assert json.loads(path.with_suffix(".lengths.json").read_text()) == lengths
    assert max(row_lengths("128k", 50)) <= 127_000 < 131_072


def test_cli_writes_the_set(tmp_path, capsys):
    assert main(["mix", str(tmp_path / "m.jsonl"), "--rows", "20", "--scale", "0.01"]) == 0
    assert "20 rows" in capsys.readouterr().out
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 20
