"""The per-micro-batch work of the GPU train stage reads nothing back from the device: each read is a host sync, and
after it the GPU idles until the host has launched the next kernels (the H200 profile in docs/BENCHMARKS.md,
2026-11-30, 39f874e: 34 syncs per optimizer step, 12 from accelerate's batch copies, 4 each from the loss's row
selection, its scale tensor and the packed-row masks). On the CPU a sync cannot be seen, so these tests make
every host read of a tensor raise (``no_host_reads``) around the code that must not read. Real: TRL's collator,
transformers' mask helper, trl's SFTConfig."""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import pytest
import torch

from gptoss_hpc.config import compose, to_run_config
from gptoss_hpc.modeling.fast.loss import (
    PREDICTED_ROWS,
    PredictedRowsCollator,
    _predicted_rows,
    chunked_causal_lm_loss,
    predicted_row_count,
)
from gptoss_hpc.modeling.fast.packing import document_ids
from gptoss_hpc.paths import PointPaths


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads():
    """Every way Python code turns a tensor into a host value raises inside (``.item()``, ``int()``, ``bool()``,
    ``.tolist()``, the data-dependent ``nonzero``)."""
    names = ("item", "__int__", "__bool__", "__float__", "__index__", "tolist", "nonzero")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def read(*_a, **_k):
            raise HostRead(f"Tensor.{name} reads the device")

        return read

    for n in names:
        setattr(torch.Tensor, n, refuse(n))
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, fn)


def _labels(rows: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 50, (rows, length), generator=g)
    labels[torch.rand((rows, length), generator=g) < 0.6] = -100  # prompts, padding, sequence starts
    return labels


def test_the_guard_catches_a_host_read():
    """The control: the old selection (count read back from the device) fails under the guard."""
    y = _labels(1, 600, 0).reshape(-1)
    with no_host_reads(), pytest.raises(HostRead):
        _predicted_rows(torch.zeros(600, 4), y)


def test_rows_selected_with_the_host_count_equal_the_device_count_and_read_nothing():
    labels = _labels(2, 700, 1)
    y = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    h = torch.randn(y.numel(), 8)
    ref_h, ref_y = _predicted_rows(h, y)
    n = predicted_row_count(labels)
    assert n == int((y != -100).sum())
    with no_host_reads():
        got_h, got_y = _predicted_rows(h, y, n)
    assert torch.equal(got_h, ref_h) and torch.equal(got_y, ref_y)
    assert got_y.shape[0] % 256 == 0 and int((got_y != -100).sum()) == n


def test_the_chunked_loss_with_the_host_count_equals_the_loss_without():
    labels = _labels(1, 900, 2)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, 900, 16, generator=g, requires_grad=True)
    weight = torch.randn(64, 16, generator=g)
    ref = chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=128, num_items_in_batch=500)
    (ref_grad,) = torch.autograd.grad(ref, hidden)
    n = predicted_row_count(labels)  # in the collator, on the CPU batch
    with no_host_reads():
        got = chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=128, num_items_in_batch=500, predicted_rows=n)
        (grad,) = torch.autograd.grad(got, hidden)
    assert torch.allclose(got, ref, rtol=0, atol=0) and torch.equal(grad, ref_grad)


def test_the_collator_counts_the_rows_on_the_cpu_and_survives_pickling():
    """The dataloader's workers pickle the collator; the count rides along as a plain int."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    trl_collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    collator = pickle.loads(pickle.dumps(PredictedRowsCollator(trl_collator)))
    features = [
        {"input_ids": [5, 6, 7, 8, 9], "completion_mask": [0, 0, 1, 1, 1]},
        {"input_ids": [3, 4, 2], "completion_mask": [0, 1, 1]},
    ]
    batch = collator(features)
    assert isinstance(batch[PREDICTED_ROWS], int)
    assert batch[PREDICTED_ROWS] == int((batch["labels"][..., 1:] != -100).sum()) > 0


def test_document_ids_equal_transformers_and_need_no_read():
    from transformers import masking_utils

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0], [0, 1, 0, 1, 2, 3, 4, 0, 0, 1]])
    with no_host_reads():
        docs = document_ids(pos)
    assert torch.equal(docs, masking_utils.find_packed_sequence_indices(pos))
    # one sequence: transformers answers None (after reading the device); here the single document 0
    single = torch.arange(12)[None]
    assert masking_utils.find_packed_sequence_indices(single) is None
    assert torch.equal(document_ids(single), torch.zeros_like(single))


@pytest.mark.parametrize(("accelerator", "non_blocking"), [("gpu", True), ("cpu", False)])
def test_gpu_batches_are_copied_without_blocking(tmp_path: Path, accelerator: str, non_blocking: bool):
    """The SFTConfig the train stage builds: pinned batches and accelerate's non_blocking on the GPU."""
    from trl import SFTConfig

    from gptoss_hpc.modeling.sft import build_sft_config_kwargs

    cfg = to_run_config(compose(["experiment=demo", f"cluster.accelerator={accelerator}"]))
    kwargs = build_sft_config_kwargs(cfg, PointPaths(tmp_path / "p000"), env={})
    assert kwargs["accelerator_config"] == {"non_blocking": non_blocking}
    # a non-blocking copy needs pinned batches: transformers' default, which only use_cpu turns off
    assert kwargs.get("dataloader_pin_memory", True)
    if accelerator == "cpu":  # (a GPU SFTConfig cannot be built on this machine: bf16 needs the GPU)
        args = SFTConfig(**kwargs)
        assert args.accelerator_config.non_blocking is False and not args.dataloader_pin_memory
