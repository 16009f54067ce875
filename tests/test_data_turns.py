"""The Harmony row policy on real files (README "Data"): control-token strings refused per file:row (or
skipped), extra system/developer turns merged with a per-row note, trailing turns cut with a note,
data.multi_turn=last|split, and the prompt-completion rows SFTTrainer gets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gptoss_hpc.config.io import compose, to_run_config
from gptoss_hpc.config.validate import validate
from gptoss_hpc.data import load_data
from gptoss_hpc.data.turns import control_token_pattern, prompt_completion
from gptoss_hpc.errors import ConfigError, DataError

CONTROL = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>", "<|constrain|>"]
CONTROL += ["<|startoftext|>", "<|endoftext|>", "<|endofprompt|>", "<|reserved_200013|>"]


def t(role: str, content: str, thinking: str | None = None) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": role, "content": content}
    if thinking is not None:
        turn["thinking"] = thinking
    return turn


def write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def cfg_for(path: Path, *overrides: str):
    return to_run_config(compose(["data=local", f"data.path={path}", "data.eval_fraction=0", *overrides]))


def good() -> dict[str, Any]:
    return {"messages": [t("user", "Hi"), t("assistant", "Hello", "Greet.")]}


@pytest.mark.parametrize("token", CONTROL)
def test_control_token_string_in_any_field_is_refused_with_file_and_row(tmp_path: Path, token: str) -> None:
    rows = [
        good(),
        {"messages": [t("user", f"fake {token} boundary"), t("assistant", "ok")]},
        {"messages": [t("system", f"x{token}"), t("user", "Hi"), t("assistant", "ok")]},
        {"messages": [t("user", "Hi"), t("assistant", "ok", f"think {token}")]},
        {"messages": [t("user", "Hi"), t("assistant", f"{token}ok")]},
    ]
    path = write(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_data(cfg_for(path))
    msg = str(err.value)
    assert "4 bad row(s) of 5" in msg and "data.skip_bad_rows=true" in msg
    assert f"{path}:2: turn 0 (user): content holds the control token {token!r}" in msg
    assert f"{path}:3: turn 0 (system): content holds the control token" in msg
    assert f"{path}:4: turn 1 (assistant): thinking holds the control token" in msg
    assert f"{path}:5: turn 1 (assistant): content holds the control token" in msg
    assert f"{path}:1:" not in msg


def test_control_token_rows_are_skipped_on_request(tmp_path: Path) -> None:
    rows = [good(), {"messages": [t("user", "a<|end|><|start|>assistant<|return|>"), t("assistant", "ok")]}, good()]
    loaded = load_data(cfg_for(write(tmp_path / "train.jsonl", rows), "data.skip_bad_rows=true"))
    assert loaded.stats["bad_rows_skipped"] == 1 and loaded.stats["train_rows"] == 2
    assert all("<|" not in turn["content"] for row in loaded.train for turn in row["messages"])


def test_text_that_only_looks_like_a_token_is_kept(tmp_path: Path) -> None:
    rows = [{"messages": [t("user", "<|not a token|> <| end |> <|END|> <|reserved_x|>"), t("assistant", "ok")]}]
    loaded = load_data(cfg_for(write(tmp_path / "train.jsonl", rows)))
    assert loaded.stats["train_rows"] == 1


def test_a_tokenizers_other_special_tokens_count_too() -> None:
    pattern = control_token_pattern(["<|end|>", "[INST]"])
    assert pattern.search("a [INST] b") and pattern.search("<|call|>") and not pattern.search("[INS T]")


def test_extra_system_and_developer_turns_are_merged_with_a_note(tmp_path: Path) -> None:
    rows = [
        {"messages": [t("system", "A"), t("developer", "B"), t("user", "Hi"), t("assistant", "ok")]},
        {"messages": [t("user", "Hi"), t("system", "late"), t("assistant", "ok")]},
        {"messages": [t("developer", "D"), t("user", "Hi"), t("assistant", "ok")]},  # nothing to merge
        {"messages": [t("system", ""), t("developer", "only"), t("user", "Hi"), t("assistant", "ok")]},
    ]
    path = write(tmp_path / "train.jsonl", rows)
    loaded = load_data(cfg_for(path))
    msgs = [r["messages"] for r in loaded.train]
    assert [(x["role"], x["content"]) for x in msgs[0][:2]] == [("system", "A\n\nB"), ("user", "Hi")]
    assert [(x["role"], x["content"]) for x in msgs[1][:2]] == [("system", "late"), ("user", "Hi")]
    assert [x["role"] for x in msgs[2]] == ["developer", "user", "assistant"]
    assert [(x["role"], x["content"]) for x in msgs[3][:1]] == [("developer", "only")]  # empty system: no text lost
    assert loaded.stats["rows_changed"] == 3
    assert loaded.notes == [
        f"{path}:1: merged 2 system/developer turn(s) into one leading instruction turn (turn 0 (system), "
        "turn 1 (developer))",
        f"{path}:2: merged 1 system/developer turn(s) into one leading instruction turn (turn 1 (system))",
        f"{path}:4: merged 1 system/developer turn(s) into one leading instruction turn (turn 1 (developer))",
    ]


def test_reasoning_language_column_joins_a_developer_turn(tmp_path: Path) -> None:
    turns = [t("developer", "Be brief."), t("user", "Hi"), t("assistant", "ok")]
    row = {"reasoning_language": "German", "messages": turns}
    loaded = load_data(cfg_for(write(tmp_path / "train.jsonl", [row])))
    assert loaded.train[0]["messages"][0]["content"] == "reasoning language: German\n\nBe brief."


def test_turns_after_the_last_assistant_turn_are_cut_with_a_note(tmp_path: Path) -> None:
    rows = [{"messages": [t("user", "Hi"), t("assistant", "ok"), t("user", "thanks")]}]
    path = write(tmp_path / "train.jsonl", rows)
    loaded = load_data(cfg_for(path))
    assert [x["role"] for x in loaded.train[0]["messages"]] == ["user", "assistant"]
    assert loaded.notes == [f"{path}:1: dropped 1 turn(s) after the last assistant turn (user)"]


def three_turns() -> dict[str, Any]:
    return {
        "messages": [
            t("system", "S"),
            t("user", "u1"),
            t("assistant", "a1", "t1"),
            t("user", "u2"),
            t("assistant", "a2", "t2"),
            t("user", "u3"),
            t("assistant", "a3", "t3"),
        ]
    }


def test_multi_turn_last_is_one_row_and_split_is_one_row_per_assistant_turn(tmp_path: Path) -> None:
    path = write(tmp_path / "train.jsonl", [three_turns(), good()])
    last = load_data(cfg_for(path))
    assert last.stats["train_rows"] == 2 and last.stats["multi_turn"] == "last"
    split = load_data(cfg_for(path, "data.multi_turn=split"))
    assert split.stats["train_rows"] == 4 and split.stats["rows_added_by_split"] == 2
    ends = [(r["messages"][-1]["content"], len(r["messages"])) for r in split.train]
    assert ends == [("a1", 3), ("a2", 5), ("a3", 7), ("Hello", 2)]
    # each split row trains its own last turn; the earlier ones are final-only context
    row = prompt_completion(split.train[1]["messages"])
    assert row["completion"] == [{"role": "assistant", "content": "a2", "thinking": "t2"}]
    assert row["prompt"][2] == {"role": "assistant", "content": "a1"}


def test_split_keeps_a_conversation_on_one_side_of_the_held_out_split(tmp_path: Path) -> None:
    rows = [three_turns() for _ in range(9)] + [good()]
    for i, r in enumerate(rows):
        r["messages"][1]["content"] = f"conversation {i}"
    path = write(tmp_path / "train.jsonl", rows)
    loaded = load_data(cfg_for(path, "data.multi_turn=split", "data.eval_fraction=0.2"))
    convs = lambda ds: {r["messages"][0 if r["messages"][0]["role"] == "user" else 1]["content"] for r in ds}  # noqa: E731
    assert convs(loaded.train).isdisjoint(convs(loaded.eval))
    assert loaded.stats["train_rows"] + loaded.stats["eval_rows"] == 9 * 3 + 1


def test_multi_turn_must_be_last_or_split() -> None:
    with pytest.raises(ConfigError, match=r"data.multi_turn"):
        validate(to_run_config(compose(["data=sample", "data.multi_turn=all"])))


def test_data_validate_cli_names_control_token_rows(tmp_path: Path) -> None:
    path = write(tmp_path / "train.jsonl", [good(), {"messages": [t("user", "x<|call|>"), t("assistant", "y")]}])
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_hpc.data", "validate", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 1
    assert f"{path}:2: turn 0 (user): content holds the control token '<|call|>'" in proc.stderr
