"""train.max_length policy (drop / truncate) with a real small tokenizer and the real gpt-oss chat template.

The tokenizer is a tiny BPE trained here with the `tokenizers` library on the bundled sample; its chat
template is TRL's copy of the official gpt-oss template (trl/chat_templates/gptoss.jinja), so the row
format (thinking → analysis channel) is exercised for real.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gptoss_hpc.config.io import compose, to_run_config
from gptoss_hpc.data import load_data, sample_path, template_messages
from gptoss_hpc.data.length import row_length
from gptoss_hpc.errors import DataError

SPECIALS = ["<|start|>", "<|message|>", "<|end|>", "<|return|>", "<|channel|>", "<|call|>", "<|endoftext|>"]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    import trl
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = sample_path().read_text(encoding="utf-8").splitlines()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text, trainer=trainer)
    template = (Path(trl.__file__).parent / "chat_templates" / "gptoss.jinja").read_text(encoding="utf-8")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|return|>", pad_token="<|endoftext|>", chat_template=template
    )


def row(answer: str, thinking: str | None, user: str = "Question?") -> dict[str, Any]:
    turn: dict[str, Any] = {"role": "assistant", "content": answer}
    if thinking is not None:
        turn["thinking"] = thinking
    return {"messages": [{"role": "user", "content": user}, turn]}


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def cfg_for(path: Path, max_length: int, policy: str) -> Any:
    return to_run_config(
        compose(
            [
                "data=local",
                f"data.path={path}",
                "data.eval_fraction=0",
                f"train.max_length={max_length}",
                f"data.max_length_policy={policy}",
            ]
        )
    )


def test_loaded_rows_render_with_the_gptoss_template(tokenizer: Any) -> None:
    # Arrow gives every turn a `thinking` key (None where absent). The raw gpt-oss template fails on an
    # assistant turn with thinking=None; transformers 5 drops None keys before rendering, and
    # template_messages does the same for any caller that renders the template itself.
    turns = [
        {"role": "user", "content": "hi", "thinking": None},
        {"role": "assistant", "content": "yo", "thinking": None},
    ]
    assert template_messages(turns) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    for messages in (turns, template_messages(turns)):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert text.endswith("<|start|>assistant<|channel|>final<|message|>yo<|return|>")
        assert "<|channel|>analysis" not in text
    with_thinking = [turns[0], {"role": "assistant", "content": "yo", "thinking": "think"}]
    text = tokenizer.apply_chat_template(with_thinking, tokenize=False)
    assert "<|start|>assistant<|channel|>analysis<|message|>think<|end|>" in text


def test_drop_removes_rows_over_max_length(tmp_path: Path, tokenizer: Any) -> None:
    short, long = row("Short.", "Brief."), row("Long answer. " * 60, "Long thought. " * 60)
    limit = row_length(tokenizer, short["messages"]) + 5
    assert row_length(tokenizer, long["messages"]) > limit
    path = write(tmp_path / "train.jsonl", [short, long, short])
    loaded = load_data(cfg_for(path, limit, "drop"), tokenizer)
    assert len(loaded.train) == 2
    assert loaded.stats["over_max_length"] == 1 and loaded.stats["dropped_too_long"] == 1
    assert loaded.stats["truncated"] == 0


def test_truncate_shortens_the_last_assistant_turn_to_fit(tmp_path: Path, tokenizer: Any) -> None:
    thinking, answer = "Ich denke Schritt für Schritt. " * 30, "日本語の答えです。" * 30
    long = row(answer, thinking)
    prompt_only = row("", None)
    limit = row_length(tokenizer, prompt_only["messages"]) + 60
    too_long_prompt = row("x", "y", user="A very long question indeed. " * 40)
    path = write(tmp_path / "train.jsonl", [row("ok", "fine"), long, too_long_prompt])
    loaded = load_data(cfg_for(path, limit, "truncate"), tokenizer)
    s = loaded.stats
    assert (s["over_max_length"], s["truncated"], s["dropped_prompt_too_long"]) == (2, 1, 1)
    assert len(loaded.train) == 2
    cut = loaded.train[1]["messages"]
    assert row_length(tokenizer, cut) <= limit
    # cut from the right: the thinking is kept from its start, content (rendered after it) goes first
    assert cut[-1]["role"] == "assistant"
    assert thinking.startswith(cut[-1]["thinking"]) and len(cut[-1]["thinking"]) > 20
    assert answer.startswith(cut[-1]["content"])
    assert len(cut[-1]["thinking"]) + len(cut[-1]["content"]) < len(thinking) + len(answer)


def test_every_row_too_long_is_an_error(tmp_path: Path, tokenizer: Any) -> None:
    path = write(tmp_path / "train.jsonl", [row("Long answer. " * 50, None)])
    with pytest.raises(DataError, match=r"longer than train.max_length=8 tokens"):
        load_data(cfg_for(path, 8, "drop"), tokenizer)


def test_sample_fits_the_default_max_length(tokenizer: Any) -> None:
    loaded = load_data(to_run_config(compose(["data=sample"])), tokenizer)
    assert loaded.stats["over_max_length"] == 0
    assert loaded.stats["train_rows"] + loaded.stats["eval_rows"] == loaded.stats["rows_read"]


def test_converted_rows_render_with_trls_training_template(tmp_path: Path, tokenizer: Any) -> None:
    """What SFTTrainer(assistant_only_loss=True) does to a row: TRL's gpt-oss training template + masks."""
    from trl.chat_template_utils import get_training_chat_template

    from gptoss_hpc.data.convert import convert_think_tags

    src = write(
        tmp_path / "qa.jsonl",
        [
            {"question": "1+1は？", "answer": "<think>1と1で2。</think>2です。"},
            {"question": "首都は？", "answer": "東京です。"},  # no tags: no thinking
        ],
    )
    convert_think_tags(src, tmp_path / "out", language="Japanese")
    cfg = to_run_config(compose(["data=local", f"data.path={tmp_path / 'out' / 'qa.parquet'}", "data.eval_fraction=0"]))
    loaded = load_data(cfg, tokenizer)
    assert loaded.stats["train_rows"] == 2 and loaded.stats["over_max_length"] == 0
    template = get_training_chat_template(tokenizer)
    for r in loaded.train:
        out = tokenizer.apply_chat_template(
            r["messages"], chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
        assert masked and tokenizer.decode(masked).endswith("です。<|return|>")
