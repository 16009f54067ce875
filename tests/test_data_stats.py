"""`python -m gptoss_hpc.data stats`: percentiles, share over train.max_length and a PNG histogram, with the
configured tokenizer (model.tokenizer=tiny-bpe, built locally; its cache goes to tmp_path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptoss_hpc.data.cli import main
from gptoss_hpc.data.stats import length_stats, percentile, write_histogram

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_percentiles_and_share_over() -> None:
    values = list(range(1, 101))
    assert [percentile(values, q) for q in (50, 90, 99, 100)] == [50, 90, 99, 100]
    s = length_stats([5, 1, 3, 9, 7], max_length=6)
    assert (s["p50"], s["max"], s["over_max_length"], s["share_over_max_length"]) == (5, 9, 2, 0.4)


def test_histogram_is_a_png(tmp_path: Path) -> None:
    path = write_histogram([10, 20, 20, 30, 400], 256, tmp_path / "sub" / "h.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in path.parent.iterdir()] == ["h.png"]


def test_stats_cli_on_local_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GPTOSS_HPC_CACHE", str(tmp_path / "cache"))
    rows = [
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello " * n}]}
        for n in (1, 2, 3, 200)
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    png = tmp_path / "lengths.png"
    code = main(
        [
            "stats",
            "data=local",
            f"data.path={data}",
            "model=tiny_gpt_oss",
            "model.tokenizer=tiny-bpe",
            "train.max_length=256",
            "--out",
            str(png),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "(4 rows: 3 train, 1 eval)" in out
    assert "over train.max_length=256: 1 rows (25.0%)" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("tokens per row:"))
    p50, p90, p99, mx = (int(line.split(f"{k}=")[1].split()[0]) for k in ("p50", "p90", "p99", "max"))
    assert p50 < 256 < mx and p50 <= p90 <= p99 <= mx
    assert f"histogram: {png.resolve()}" in out
    assert png.read_bytes()[:8] == PNG_MAGIC
