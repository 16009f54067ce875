"""Validation and training agree: every generated row is either refused by ``python -m gptoss_hpc.data validate``
with ``file:row: reason``, or goes through the train stage's data preparation (load_data with the tokenizer ->
sft_dataset -> the train stage's template patch -> TRL SFTTrainer's own dataset preparation) and has tokens to
train on. 0 rows may be accepted by validation and rejected by training.

Real: the validate CLI, gptoss_hpc.data, TRL's SFTTrainer._prepare_dataset with the tiny BPE tokenizer (the
gpt-oss chat template and special tokens, a small vocabulary). Rows: a seeded generator (printed on failure)
covering every role order up to three turns, then random conversations with empty and whitespace fields, missing,
null and misplaced thinking, unicode, control characters, control-token strings, wrong types and lengths.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from gptoss_hpc.config import compose, save_run_config, to_run_config
from gptoss_hpc.config.schema import DataConfig
from gptoss_hpc.data.cli import main as data_cli
from gptoss_hpc.data.load import check_file, load_data
from gptoss_hpc.modeling.model import load_base_model
from gptoss_hpc.modeling.sft import build_sft_config_kwargs, sft_dataset
from gptoss_hpc.paths import PointPaths

SEED = 20261207
ROWS = 600
ROLES = ("system", "developer", "user", "assistant")
TEXTS = [
    "", " ", "\n\t  ", "Hello.", "What is 2+2?", "4", "Ünïcödé — ok ✓", "日本語の文章です。", "مرحبا بالعالم",
    "emoji 🧪🔥👩‍💻", "e\u0301\u0301 combining", "nul\x00byte", "bell\x07 esc\x1b[31m", "line\u2028sep\ufeff",
    "tab\tand\r\nCRLF", "<think>tags</think> left as text", "{{ jinja }} {% raw %}", "<| end |>", "\\u0000 literal",
    "<|", "|>", "a" * 300, "word " * 120, "🙂" * 80,
]  # fmt: skip
# What a hostile row may hold instead: nulls, wrong types, control-token strings.
BAD = [None, 7, ["a"], {"t": 1}, "<|end|>", "say <|start|>user", "<|reserved_200017|>"]


def _text(rng: random.Random, hostile: bool) -> Any:
    r = rng.random()
    if hostile and r < 0.15:
        return rng.choice(BAD)
    if r < 0.3:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(1, 40)))
    return rng.choice(TEXTS)


def _turn(rng: random.Random, role: Any, hostile: bool) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": role}
    if not (hostile and rng.random() < 0.05):
        turn["content"] = _text(rng, hostile)
    r = rng.random()
    if (role == "assistant" and r < 0.5) or (hostile and r < 0.1):
        turn["thinking"] = _text(rng, hostile)  # text, empty, whitespace; hostile: null, a wrong type, misplaced
    elif r < 0.7:
        turn["thinking"] = None
    if rng.random() < 0.05:
        turn["name"] = "extra key"
    return turn


def generate(seed: int, n: int) -> list[Any]:
    rng = random.Random(seed)
    rows: list[Any] = []
    orders = [p for k in range(1, 4) for p in itertools.product(ROLES, repeat=k)]
    for order in orders:  # every role order up to three turns
        rows.append({"messages": [_turn(rng, role, False) for role in order]})
    while len(rows) < n:
        hostile = rng.random() < 0.3
        if hostile and rng.random() < 0.05:
            rows.append(rng.choice([[], "text", 3, {"turns": []}, {"messages": "hi"}, {"messages": []}]))
            continue
        k = rng.choice([1, 2, 2, 3, 3, 4, 5, 8])
        odd = ["tool", "Assistant", None]
        roles = [rng.choice(odd) if hostile and rng.random() < 0.05 else rng.choice(ROLES) for _ in range(k)]
        if not hostile and rng.random() < 0.7:
            roles[-1] = "assistant"
        row: dict[str, Any] = {"messages": [_turn(rng, role, hostile) for role in roles]}
        if rng.random() < 0.3:
            row["reasoning_language"] = rng.choice(["French", "", "  ", None, "日本語", *(["<|end|>"] * hostile)])
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def tokenizer():
    from gptoss_hpc.modeling.tokenizer import load_tokenizer

    return load_tokenizer(to_run_config(compose(["experiment=demo", "model.tokenizer=tiny-bpe"])).model)


@pytest.mark.parametrize("multi_turn", ["last", "split"])
def test_every_generated_row_is_refused_by_validate_or_trains(tmp_path: Path, tokenizer, multi_turn: str, capsys):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from gptoss_hpc.stages.train import _drop_none_turn_keys

    rows = generate(SEED, ROWS)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=bool(i % 2)) + "\n" for i, r in enumerate(rows)))

    # validation: the CLI's own check, row by row, then the CLI itself
    result = check_file(data, DataConfig(multi_turn=multi_turn))
    refused: dict[int, str] = {}
    for line in result.problems:
        m = re.fullmatch(rf"{re.escape(str(data))}:(\d+): (.+)", line, flags=re.S)
        assert m, f"not file:row: reason: {line!r}"
        refused[int(m.group(1))] = m.group(2)
    assert result.rows_read == len(rows)
    assert data_cli(["validate", str(data), "--multi-turn", multi_turn]) == 1
    assert f"{len(refused)} bad row(s) of {len(rows)} in {data}" in capsys.readouterr().err
    accepted = [r for i, r in enumerate(rows, start=1) if i not in refused]
    assert refused and len(accepted) > 200, (len(refused), len(accepted))  # the generator covers both sides
    assert any("no turn before it" in why for why in refused.values())  # e.g. an assistant-only row

    # training: every accepted row through the train stage's data preparation
    good = tmp_path / "accepted.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in accepted))
    cfg = to_run_config(
        compose(["experiment=demo", "model.tokenizer=tiny-bpe", "data=local", f"data.path={good}",
                 "data.eval_fraction=0", f"data.multi_turn={multi_turn}", "train.max_length=100000"])
    )  # fmt: skip
    loaded = load_data(cfg, tokenizer)  # raises DataError on a row it refuses
    assert loaded.stats["rows_read"] == len(accepted) and loaded.stats["bad_rows_skipped"] == 0
    train_ds = sft_dataset(loaded.train)
    _drop_none_turn_keys(tokenizer)
    paths = PointPaths.from_config(save_run_config(cfg, tmp_path / "run" / "p000" / "config.yaml"))
    args = SFTConfig(**build_sft_config_kwargs(cfg, paths))
    model = load_base_model(cfg, paths, for_training=True)
    # the trainer as the train stage builds it (its own chat template, masks and labels), on one row; then its
    # preparation on all of them
    one = [
        {"role": "user", "content": "Hi", "thinking": None},
        {"role": "assistant", "content": "Hello", "thinking": None},
    ]
    trainer = SFTTrainer(model=model, args=args, train_dataset=sft_dataset(Dataset.from_list([{"messages": one}])),
                         processing_class=tokenizer)  # fmt: skip
    try:
        prepared = trainer._prepare_dataset(train_ds, tokenizer, args, args.packing, None, "train")
    except Exception:  # name every row that fails, not only the first
        failures = []
        for i in range(len(train_ds)):
            try:
                trainer._prepare_dataset(train_ds.select([i]), tokenizer, args, args.packing, None, "train")
            except Exception as exc:
                failures.append(f"{train_ds[i]}: {type(exc).__name__}: {exc}")
        pytest.fail(
            f"seed {SEED}: {len(failures)} row(s) validate accepts and training rejects:\n" + "\n".join(failures[:10])
        )
    assert len(prepared) == len(train_ds)
    untrained = [i for i, row in enumerate(prepared) if all(x == -100 for x in row["labels"])]
    assert not untrained, f"rows with nothing to train on: {[train_ds[i] for i in untrained[:5]]}"
