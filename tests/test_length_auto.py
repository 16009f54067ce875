"""train.max_length=auto: the launch measures every row (as the train stage renders it) and the data decides the
length; rows that cannot fit are refused with file:row; drop/truncate only when asked, with counts.

Real parts: the launch's own composition (gptoss_hpc.submission.pipeline.compose_launch), the data loader, a real
BPE tokenizer with the gpt-oss training template (model.tokenizer=tiny-bpe: the 201k-token one would make the CPU
steps slow), the memory plan of gpt-oss-20b on an 80 GB card, and for the mixed-length run the real train stage
(TRL + PEFT on the tiny gpt-oss) launched through `python -m gptoss_hpc.launch`'s main.
"""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path
from typing import Any

import pytest

from gptoss_hpc.config.lengths import Measured, bucket, resolve
from gptoss_hpc.errors import ConfigError

WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud".split()  # noqa: SIM905


def _row(words: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    thinking = " ".join(rng.choice(WORDS) for _ in range(words))
    return {
        "messages": [
            {"role": "user", "content": f"Question {seed}?"},
            {"role": "assistant", "content": "Answer.", "thinking": thinking},
        ]
    }


def _write(path: Path, sizes: list[int]) -> Path:
    path.write_text("".join(json.dumps(_row(n, i)) + "\n" for i, n in enumerate(sizes)))
    return path


def _compose(*overrides: str):
    from gptoss_hpc.submission.pipeline import compose_launch

    return compose_launch(["experiment=demo", "model.tokenizer=tiny-bpe", "stages=[train]", "data=local", *overrides])


@pytest.fixture(scope="module")
def lengths_of(tmp_path_factory):
    """Token length of each row of a file, measured by the launch's own code (and cached like it)."""
    from gptoss_hpc.config import compose, to_run_config
    from gptoss_hpc.submission.lengths import measure

    def measured(path: Path) -> Measured:
        cfg = to_run_config(
            compose(
                [
                    "experiment=demo",
                    "model.tokenizer=tiny-bpe",
                    "data=local",
                    f"data.path={path}",
                    "data.eval_fraction=0",
                ]
            )
        )
        return measure(cfg)

    return measured


def test_bucket_rounds_up_to_few_shapes() -> None:
    assert [bucket(n) for n in (1, 2048, 2049, 3000, 30_112, 33_000, 131_072)] == [
        2048,
        2048,
        2560,
        3072,
        32_768,
        40_960,
        131_072,
    ]


def test_auto_follows_the_longest_row_and_records_it(tmp_path, lengths_of) -> None:
    data = _write(tmp_path / "mixed.jsonl", [60] * 20 + [900, 2500])
    m = lengths_of(data)
    longest = max(m.lengths)
    assert longest > 2048  # the 2500-word row: the old default (2048) would have dropped it silently
    launch = _compose(f"data.path={data}", "data.eval_fraction=0", "train.max_length=auto")
    point = launch.points[0]
    t = point.cfg.train
    assert t.max_length == bucket(longest) >= longest
    # demo's 2 x 2048 reference rows: one long row per micro-batch, the accumulation keeps ~8k tokens per step
    assert t.per_device_train_batch_size == max(1, 2 * 2048 // t.max_length)
    text = "\n".join(point.length_lines)
    assert f"max {longest:,}" in text and f"train.max_length=auto -> {t.max_length:,}" in text
    assert point.length_record["max"] == longest and point.length_record["rows"] == 22
    assert "over_max_length" not in point.length_record  # nothing dropped


def test_rows_over_an_explicit_length_are_refused_naming_file_row(tmp_path, lengths_of) -> None:
    data = _write(tmp_path / "some_long.jsonl", [60] * 10 + [1500, 1400])
    m = lengths_of(data)
    with pytest.raises(ConfigError) as err:
        _compose(f"data.path={data}", "data.eval_fraction=0", "train.max_length=512")
    text = str(err.value)
    assert f"{data}:11: {m.lengths[10]:,} tokens" in text and f"{data}:12: {m.lengths[11]:,} tokens" in text
    assert "2 of 12 rows are longer than train.max_length=512" in text
    assert "data.max_length_policy=drop" in text and "train.max_length=auto" in text


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_drop_and_truncate_only_when_asked_with_counts(tmp_path, lengths_of, policy) -> None:
    data = _write(tmp_path / f"{policy}.jsonl", [60] * 10 + [1500, 1400])
    m = lengths_of(data)
    launch = _compose(
        f"data.path={data}", "data.eval_fraction=0", "train.max_length=512", f"data.max_length_policy={policy}"
    )
    point = launch.points[0]
    lost = m.lengths[10] + m.lengths[11]
    assert point.length_record["over_max_length"] == 2 and point.length_record["tokens_over_max_length"] == lost
    line = next(s for s in point.length_lines if s.startswith(f"data.max_length_policy={policy}"))
    assert "2 of 12 rows are longer than 512 tokens" in line and f"{lost:,} tokens" in line


def test_a_row_no_card_setting_fits_is_refused_before_anything_runs() -> None:
    """gpt-oss-20b on an 80 GB card: the memory plan caps the length; a row beyond the model's context (131,072)
    cannot train exactly at all. Pure: config.lengths.resolve with the launch's own `fits` rule is what
    submission.lengths.decide calls."""
    from gptoss_hpc.config import compose, to_run_config
    from gptoss_hpc.config.fit import fastest_fit
    from gptoss_hpc.config.memory import arch_for

    cfg = to_run_config(compose(["cluster=coreweave_h100"]))
    arch = arch_for(cfg)
    measured = Measured(lengths=[900, 40_000, 150_000], labels=["t.jsonl:1", "t.jsonl:2", "t.jsonl:3"], train_rows=3)
    res = resolve(cfg, measured, fits=lambda c: fastest_fit(c, arch, 80) is not None, context=131_072)
    assert len(res.problems) == 1
    assert "t.jsonl:3: 150,000 tokens" in res.problems[0] and "max_position_embeddings=131,072" in res.problems[0]
    assert "t.jsonl:2" not in res.problems[0]  # 40k fits
    # asked to drop: the length is the longest that fits the card and the model, and the loss is counted
    drop = resolve(
        to_run_config(compose(["cluster=coreweave_h100", "data.max_length_policy=drop"])),
        measured,
        fits=lambda c: fastest_fit(c, arch, 80) is not None,
        context=131_072,
    )
    assert not drop.problems and drop.cfg.train.max_length <= 131_072
    assert drop.record["over_max_length"] == 1 and drop.record["tokens_over_max_length"] == 150_000


def test_lengths_are_cached_and_an_edited_row_is_measured_again(tmp_path, lengths_of, caplog) -> None:
    data = _write(tmp_path / "cached.jsonl", [50, 70, 90])
    first = lengths_of(data)
    caplog.set_level("INFO", logger="gptoss_hpc.data.length")
    assert lengths_of(data).lengths == first.lengths
    assert "measured 3 rows (3 from the cache" in caplog.text
    rows = data.read_text().splitlines()
    edited = _row(300, 99)
    edited["messages"][0]["content"] = f"A question no earlier run asked: {uuid.uuid4()}"  # the cache outlives tests
    rows[1] = json.dumps(edited)
    data.write_text("\n".join(rows) + "\n")
    caplog.clear()
    again = lengths_of(data)
    assert "measured 3 rows (2 from the cache" in caplog.text and again.lengths[1] > first.lengths[1]


def test_mixed_lengths_train_through_the_real_stage_in_token_budget_micro_batches(tmp_path) -> None:
    """A launch with no length given: short rows and one long row, packed micro-batches of max_length tokens
    (many short rows, or the long one), through the real train stage on the tiny gpt-oss."""
    from gptoss_hpc import launch

    data = _write(tmp_path / "train.jsonl", [40] * 24 + [700])
    rc = launch.main(
        [
            "experiment=demo",
            "model.tokenizer=tiny-bpe",
            "stages=[train]",
            "data=local",
            f"data.path={data}",
            "data.eval_fraction=0",
            "train.max_length=auto",
            "train.per_device_train_batch_size=1",
            "train.packing=true",
            "train.max_steps=3",
            "train.save_steps=100",
            f"run_root={tmp_path / 'logs'}",
        ]
    )
    assert rc == 0
    point = next((tmp_path / "logs" / "demo").glob("*/p000"))
    from gptoss_hpc.config.io import load_run_config

    cfg = load_run_config(point / "config.yaml")
    record = json.loads((point / "data_lengths.json").read_text())
    assert cfg.train.max_length == bucket(record["max"]) and record["rows"] == 25
    metrics = json.loads((point / "train_metrics.json").read_text())
    # one packed bin of per_device x max_length tokens per micro-batch (TRL sees 1 x that budget)
    assert metrics["batch"]["max_length"] == cfg.train.max_length
    assert metrics["batch"]["max_tokens_per_step"] == (
        cfg.train.per_device_train_batch_size * cfg.train.max_length * cfg.train.gradient_accumulation_steps
    )
    steps = [json.loads(line) for line in (point / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s][:3] == [1, 2, 3]


def test_a_launch_whose_rows_cannot_be_read_submits_nothing(tmp_path, capsys) -> None:
    """A Hub dataset that cannot be reached (this machine has no Hub; the name does not exist either): a dry run
    still prints its scripts with a note, a launch is refused before anything is written."""
    from gptoss_hpc import launch

    args = [
        "experiment=demo",
        "data=multilingual_thinking",
        "data.name=gptoss-hpc-tests/no-such-set",
        f"run_root={tmp_path}",
    ]
    assert launch.main([*args, "dry_run=true"]) == 0
    assert (
        "the rows are measured at launch (the dataset gptoss-hpc-tests/no-such-set is on the Hub)"
        in capsys.readouterr().out
    )
    assert launch.main(args) == 1
    err = capsys.readouterr().err
    assert "measures every training row before submitting anything" in err and "gptoss-hpc-tests/no-such-set" in err
    assert not any(tmp_path.iterdir())


def test_a_length_eager_attention_cannot_hold_is_refused_at_launch(tmp_path, lengths_of) -> None:
    """The tiny model on CPU trains with eager attention ([heads, L, L] scores per layer): a row past its limit is
    refused with the key and the fix (gptoss_hpc.config.attention), not trained into an out-of-memory."""
    from gptoss_hpc.config import compose, to_run_config
    from gptoss_hpc.config.attention import eager_max_length
    from gptoss_hpc.config.memory import arch_for

    limit = eager_max_length(arch_for(to_run_config(compose(["experiment=demo"]))))
    data = _write(tmp_path / "rows.jsonl", [40, 50])
    with pytest.raises(ConfigError, match=r"model\.attn_implementation=eager holds"):
        _compose(f"data.path={data}", "data.eval_fraction=0", f"train.max_length={bucket(limit + 1)}")
