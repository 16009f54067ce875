"""train.packing_bin=micro_batch: each micro-batch is one best-fit bin of per_device_train_batch_size x max_length
tokens instead of per_device_train_batch_size bins of max_length. Real parts: the bundled data through
gptoss_hpc.data, the offline gpt-oss tokenizer, TRL's SFTTrainer (its tokenization, packing and padding-free
collator) on the tiny gpt-oss, and the trainer's own dataloader."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from gptoss_hpc.config import compose, to_run_config

ROWS, MAX_LENGTH = 4, 256


def _trainer(tmp_path, packing_bin: str, rows: int = ROWS, max_length: int = MAX_LENGTH, **args_over):
    from trl import SFTConfig, SFTTrainer

    from gptoss_hpc.data import load_datasets
    from gptoss_hpc.modeling.lora import build_lora_config
    from gptoss_hpc.modeling.model import load_base_model
    from gptoss_hpc.modeling.sft import build_sft_config_kwargs, sft_dataset
    from gptoss_hpc.modeling.tokenizer import load_tokenizer
    from gptoss_hpc.modeling.trainer import trainer_class
    from gptoss_hpc.paths import PointPaths

    cfg = to_run_config(
        compose(
            [
                "experiment=demo",
                "train.deepspeed=false",
                "train.packing=true",
                f"train.packing_bin={packing_bin}",
                f"train.per_device_train_batch_size={rows}",
                f"train.max_length={max_length}",
                "data.max_length_policy=truncate",
            ]
        )
    )
    paths = PointPaths(tmp_path / packing_bin / "p000")
    tokenizer = load_tokenizer(cfg.model)
    train_ds = sft_dataset(load_datasets(cfg, tokenizer)[0])
    kwargs = build_sft_config_kwargs(cfg, paths, env={})
    args = SFTConfig(**{**kwargs, "report_to": [], "dataloader_num_workers": 0, **args_over})
    return trainer_class(SFTTrainer, cfg, 1, deepspeed=False)(
        model=load_base_model(cfg, paths, for_training=True),
        args=args,
        train_dataset=train_ds,
        processing_class=tokenizer,
        peft_config=build_lora_config(cfg),
    )


def _micro_batches(tmp_path, packing_bin: str) -> list[dict]:
    return list(_trainer(tmp_path, packing_bin).get_train_dataloader())


def _sequences(batch: dict) -> list[tuple[int, ...]]:
    """The sequences of a flattened micro-batch, cut where position_ids restart at 0 (padding has label -100)."""
    ids, pos = batch["input_ids"][0].tolist(), batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(ids)]
    return [tuple(ids[a:b]) for a, b in itertools.pairwise(starts)]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packing_bin")
    return {b: _micro_batches(tmp, b) for b in ("micro_batch", "max_length")}


def test_micro_batch_bins_hold_the_same_sequences_in_fewer_padding_slots(both):
    budget = ROWS * MAX_LENGTH
    seqs = {b: Counter(s for batch in batches for s in _sequences(batch)) for b, batches in both.items()}
    # the same rows, token for token, through TRL's tokenization either way; none cut (rows are <= max_length)
    assert seqs["micro_batch"] == seqs["max_length"]
    assert max(len(s) for s in seqs["micro_batch"]) <= MAX_LENGTH
    for b, batches in both.items():
        for batch in batches:
            assert batch["input_ids"].shape[0] == 1  # one flattened row per micro-batch (padding-free)
            assert batch["input_ids"].shape[1] <= budget, b
    real = sum(len(s) * n for s, n in seqs["micro_batch"].items())
    slots = {b: len(batches) * budget for b, batches in both.items()}
    # fewer micro-batches (so fewer padding slots when compiled layers pad each to the budget)
    assert len(both["micro_batch"]) < len(both["max_length"]), {b: len(v) for b, v in both.items()}
    assert real / slots["micro_batch"] > real / slots["max_length"]


def test_real_token_count_without_a_host_sync_per_micro_batch_equals_the_data(tmp_path):
    """The trainer keeps the non-padding token count on the device and folds it in once per optimizer step
    (gptoss_hpc.modeling.trainer.DeviceTokenCount): after 3 steps of 2 micro-batches it equals the real tokens of
    the first 6 micro-batches of the trainer's (seeded) dataloader, and every logged step carries the running
    total."""
    from transformers import TrainerCallback

    small = {"rows": 2, "max_length": 96}  # short micro-batches: the tiny model trains quickly
    trainer = _trainer(tmp_path, "micro_batch", **small, max_steps=3, gradient_accumulation_steps=2)
    batches = list(trainer.get_train_dataloader())[:6]
    real = sum(int(b["input_ids"].numel()) for b in batches)  # on CPU nothing pads the flattened row
    logged: list[int] = []

    class Logs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "num_input_tokens_seen" in logs:
                logged.append(int(logs["num_input_tokens_seen"]))

    trainer.add_callback(Logs())
    trainer.train()
    assert len(batches) == 6 and trainer.state.global_step == 3
    assert trainer.state.num_input_tokens_seen == real
    assert len(logged) >= 3 and logged[0] > 0 and logged == sorted(logged) and logged[-1] == real
    # the documents the collator counted on the CPU for MFU (gptoss_hpc.modeling.useful_work): the same tokens
    assert trainer.useful_work.tokens == real and trainer.useful_work.docs >= len(batches)
