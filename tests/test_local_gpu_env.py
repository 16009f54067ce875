"""cluster=local on a GPU machine: the environment each local job sees (issue 19).

submitit's LocalExecutor hides every GPU (CUDA_VISIBLE_DEVICES="") unless it is given gpus_per_node. Real parts:
submitit's LocalExecutor with our local_parameters, real local processes, our setup_distributed. Fake: the GPUs
(this machine has none), so the jobs only read their environment; the device ids they are given name GPUs that
do not exist here, exactly as they would name real ones on a GPU box.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import submitit

from gptoss_hpc.config import compose, save_run_config, to_run_config, validate
from gptoss_hpc.submission.sbatch import local_parameters

# Run in each task: the ranks our train stage derives, and the GPUs the task can see.
_PROBE = """
import json, os, sys
from gptoss_hpc.config import load_run_config
from gptoss_hpc.modeling.distributed import setup_distributed
info = setup_distributed(load_run_config(sys.argv[1]))
keys = ("CUDA_VISIBLE_DEVICES", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
print(json.dumps({**{k: os.environ.get(k) for k in keys}, "source": info["source"]}))
"""


def _cfg(*overrides: str):
    return validate(to_run_config(compose(["cluster=local", *overrides])))


def test_local_parameters_pass_the_gpus_only_for_gpu_clusters():
    gpu = _cfg("cluster.accelerator=gpu", "cluster.gpus_per_node=2")
    assert local_parameters(gpu, "train") == {"timeout_min": 60, "tasks_per_node": 2, "signal_delay_s": 30,
                                              "gpus_per_node": 2}  # fmt: skip
    for stage in ("merge", "eval", "serve"):
        assert local_parameters(gpu, stage)["gpus_per_node"] == 1  # cluster.aux_gpus
        assert local_parameters(gpu, stage)["tasks_per_node"] == 1
    assert "gpus_per_node" not in local_parameters(gpu, "report")
    cpu = _cfg()  # the shipped cluster=local: CPU ranks, no GPU asked for
    assert all("gpus_per_node" not in local_parameters(cpu, s) for s in ("train", "merge", "eval", "report"))


def _probe(tmp_path: Path, cfg, stage: str) -> list[dict]:
    config = save_run_config(cfg, tmp_path / stage / "config.yaml")
    executor = submitit.LocalExecutor(folder=tmp_path / stage / "slurm")
    executor.update_parameters(**local_parameters(cfg, stage))
    job = executor.submit(submitit.helpers.CommandFunction([sys.executable, "-c", _PROBE, str(config)]))
    return [json.loads(out.strip().splitlines()[-1]) for out in job.results()]


@pytest.mark.parametrize("gpus", [1, 2])
def test_a_local_gpu_train_job_gets_one_rank_per_gpu_and_sees_the_gpus(tmp_path, gpus):
    cfg = _cfg("cluster.accelerator=gpu", f"cluster.gpus_per_node={gpus}")
    ranks = _probe(tmp_path, cfg, "train")
    visible = ",".join(str(i) for i in range(gpus))
    assert [r["CUDA_VISIBLE_DEVICES"] for r in ranks] == [visible] * gpus  # as srun --gpus-per-node does
    assert sorted(int(r["RANK"]) for r in ranks) == list(range(gpus))
    assert sorted(int(r["LOCAL_RANK"]) for r in ranks) == list(range(gpus))  # each rank picks cuda:LOCAL_RANK
    assert {r["WORLD_SIZE"] for r in ranks} == {str(gpus)}
    assert len({(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in ranks}) == 1
    if gpus > 1:
        assert {r["source"] for r in ranks} == {"submitit"}


def test_a_local_gpu_merge_job_sees_one_gpu_and_the_report_none(tmp_path):
    cfg = _cfg("cluster.accelerator=gpu", "cluster.gpus_per_node=2")
    assert [r["CUDA_VISIBLE_DEVICES"] for r in _probe(tmp_path, cfg, "merge")] == ["0"]
    assert [r["CUDA_VISIBLE_DEVICES"] for r in _probe(tmp_path, cfg, "report")] == [""]
