"""The chunked-loss trainer reads transformers' per-step token count (a device tensor, passed to every micro-batch
of an optimizer step) once per step: each read is a device-to-host sync, which on the H200 profile of the MXFP4 20b
train stage came once per micro-batch. Real: TRL's SFTTrainer class through gptoss_hpc.modeling.trainer."""

from __future__ import annotations

import types

import torch
from trl import SFTTrainer

from gptoss_hpc.config import compose, to_run_config
from gptoss_hpc.modeling.trainer import trainer_class


def test_the_token_count_is_read_once_per_optimizer_step():
    cls = trainer_class(SFTTrainer, to_run_config(compose(["train.loss_chunk_tokens=64"])), 1, deepspeed=False)
    trainer = types.SimpleNamespace(_items=None)
    step1 = torch.tensor(1234)
    assert cls._items_in_batch(trainer, step1) == 1234
    step1.fill_(9)  # had it been read again, the next micro-batch of the step would see 9
    assert cls._items_in_batch(trainer, step1) == 1234
    assert cls._items_in_batch(trainer, torch.tensor(77)) == 77  # the next step's tensor is read
    assert cls._items_in_batch(trainer, 5) == 5 and cls._items_in_batch(trainer, None) is None
