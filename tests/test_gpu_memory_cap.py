"""cluster.gpu_memory_gib below the GPU's memory caps each stage's CUDA allocator at it
(gptoss_hpc.stages.common.cap_gpu_memory), so a run planned for an 80 GB card never relies on an H200's 141.

Fake: torch.cuda (this machine has no GPU): a 2-GPU H200 node whose calls are recorded. What runs for real on a GPU
box is the GPU check's `fit:20b@24` / `fit:120b@80` phases (launchers/gpu_check.sh)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gptoss_hpc.config import compose, to_run_config
from gptoss_hpc.stages.common import cap_gpu_memory

H200 = 143771 * 2**20  # bytes: what nvidia-smi reports for an H200 on the device box (139.8 GiB)


@pytest.fixture
def fake_cuda(monkeypatch):
    calls: list[tuple[float, int]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=H200))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    return calls


def _cfg(*overrides: str):
    return to_run_config(compose(["cluster=local", "cluster.accelerator=gpu", *overrides]))


@pytest.mark.parametrize("rank_var", ["LOCAL_RANK", "SLURM_LOCALID", "SUBMITIT_LOCAL_LOCALID"])
def test_a_smaller_card_caps_the_allocator_of_the_ranks_own_gpu(fake_cuda, monkeypatch, rank_var):
    # at run_stage time only the launcher's own variable is set (setup_distributed sets LOCAL_RANK later)
    for var in ("LOCAL_RANK", "SLURM_LOCALID", "SUBMITIT_LOCAL_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(rank_var, "1")
    assert cap_gpu_memory(_cfg("cluster.gpu_memory_gib=80")) == 80.0
    ((fraction, device),) = fake_cuda
    assert device == 1 and fraction * H200 / 2**30 == pytest.approx(80.0)


@pytest.mark.parametrize(
    "overrides", [[], ["cluster.gpu_memory_gib=141"], ["cluster.accelerator=cpu", "cluster.gpu_memory_gib=24"]]
)
def test_no_cap_when_unset_not_smaller_or_not_a_gpu_run(fake_cuda, monkeypatch, overrides):
    assert cap_gpu_memory(_cfg(*overrides)) is None
    assert fake_cuda == []


def test_no_cap_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cap_gpu_memory(_cfg("cluster.gpu_memory_gib=24")) is None
