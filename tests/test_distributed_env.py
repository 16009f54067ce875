"""setup_distributed() derives the ranks from two-node Slurm environments, as submitit's own tests drive
JobEnvironment from SLURM_* variables: the environments below are what slurmstepd gives each task of
`sbatch --nodes=2 --ntasks-per-node=2` (checked against the real 2-node local Slurm in
tests/test_multinode_slurm.py), plus what a submitting shell may leak through sbatch's --export=ALL.

    .venv/bin/python -m pytest -q tests/test_distributed_env.py
"""

from __future__ import annotations

import logging
import os
import shutil

import pytest

from gptoss_hpc.config import compose, to_run_config
from gptoss_hpc.modeling.distributed import INHERITED_DIST_ENV, global_rank, setup_distributed

# what a shell that was itself a torchrun worker (or had `export RANK=0 WORLD_SIZE=1`) hands to sbatch
LEAKED = {
    "RANK": "0",
    "WORLD_SIZE": "1",
    "LOCAL_RANK": "0",
    "LOCAL_WORLD_SIZE": "1",
    "MASTER_ADDR": "localhost",
    "MASTER_PORT": "29500",
    "GROUP_RANK": "0",
    "TORCHELASTIC_RUN_ID": "leaked",
    "TORCHELASTIC_RESTART_COUNT": "0",
}


def _slurm_task_env(procid: int, *, job_id: str = "4242", tasks_per_node: int = 2, nodes: int = 2) -> dict[str, str]:
    return {
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_STEP_NODELIST": "node[1-2]",
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_STEP_NUM_NODES": str(nodes),
        "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS": str(nodes * tasks_per_node),
        "SLURM_STEP_NUM_TASKS": str(nodes * tasks_per_node),
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid % tasks_per_node),
        "SLURM_NODEID": str(procid // tasks_per_node),
        "SLURMD_NODENAME": f"node{procid // tasks_per_node + 1}",
    }


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch):
    """No SLURM_*/SUBMITIT_*/dist variables from the test runner's own environment; setup_distributed's
    exports are undone afterwards (later tests launch jobs that inherit this process's environment)."""
    saved = dict(os.environ)
    for k in list(os.environ):
        if k.startswith(("SLURM_", "SUBMITIT_", "TORCHELASTIC_")) or k in INHERITED_DIST_ENV:
            monkeypatch.delenv(k)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    yield monkeypatch
    monkeypatch.undo()
    os.environ.clear()
    os.environ.update(saved)


def _cfg(accelerator: str = "cpu"):
    return to_run_config(compose(["experiment=demo", "cluster=local_slurm", f"cluster.accelerator={accelerator}"]))


@pytest.mark.parametrize("executor", ["slurm", None], ids=["submitit", "plain-srun"])
@pytest.mark.parametrize("procid", [0, 1, 2, 3])
def test_two_node_slurm_task_gets_its_own_rank_despite_leaked_env(
    clean_env, tmp_path, procid: int, executor: str | None
):
    env = {**LEAKED, **_slurm_task_env(procid), "CUDA_VISIBLE_DEVICES": "0,1"}
    if executor is None:
        # plain srun expands the node list with the real `scontrol show hostnames`, which only needs a
        # parsable slurm.conf (a job always has one)
        if shutil.which("scontrol") is None:
            pytest.fail("scontrol (slurm-client) is missing; `bash launchers/local_slurm.sh start` installs it")
        conf = tmp_path / "slurm.conf"
        conf.write_text("ClusterName=stand_in\nSlurmctldHost=localhost\n")
        env["SLURM_CONF"] = str(conf)
    if executor:
        env["SUBMITIT_EXECUTOR"] = executor
    for k, v in env.items():
        clean_env.setenv(k, v)

    info = setup_distributed(_cfg())

    assert (info["rank"], info["world_size"], info["nodes"]) == (procid, 4, 2)
    assert os.environ["RANK"] == str(procid) and os.environ["WORLD_SIZE"] == "4"
    assert os.environ["LOCAL_RANK"] == str(procid % 2) and os.environ["LOCAL_WORLD_SIZE"] == "2"
    assert os.environ["MASTER_ADDR"] == "node1"  # the first node of the allocation, not the leaked localhost
    port = os.environ["MASTER_PORT"]
    assert port != "29500" and 20000 <= int(port) <= 60000
    assert not [k for k in os.environ if k.startswith("TORCHELASTIC_") or k == "GROUP_RANK"]
    assert set(info["scrubbed"]) == set(LEAKED)
    assert info["backend"] == "gloo" and info["master"] == f"node1:{port}"
    assert info["source"] == ("submitit" if executor else "srun")


def test_every_rank_of_one_job_agrees_on_master_port(clean_env):
    ports = set()
    for procid in range(4):
        for k, v in {**LEAKED, **_slurm_task_env(procid), "SUBMITIT_EXECUTOR": "slurm"}.items():
            clean_env.setenv(k, v)
        setup_distributed(_cfg())
        ports.add(os.environ["MASTER_PORT"])
    assert len(ports) == 1


def test_per_task_gpu_binding_makes_every_rank_use_device_0(clean_env):
    # --gpus-per-task=1 with ConstrainDevices: each task sees one GPU, renumbered to 0
    for k, v in {**_slurm_task_env(3), "SUBMITIT_EXECUTOR": "slurm", "CUDA_VISIBLE_DEVICES": "0"}.items():
        clean_env.setenv(k, v)
    clean_env.setenv("SLURM_GPUS_PER_TASK", "1")
    info = setup_distributed(_cfg("gpu"))
    assert info["rank"] == 3 and info["world_size"] == 4 and info["backend"] == "nccl"
    assert os.environ["LOCAL_RANK"] == "0"  # not 1: ordinal 1 does not exist for this task
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"


def test_node_wide_gpus_keep_local_rank_as_device_index(clean_env):
    for k, v in {**_slurm_task_env(3), "SUBMITIT_EXECUTOR": "slurm", "CUDA_VISIBLE_DEVICES": "0,1"}.items():
        clean_env.setenv(k, v)
    setup_distributed(_cfg("gpu"))
    assert os.environ["LOCAL_RANK"] == "1"


def test_inherited_rank_in_a_one_task_slurm_job_is_ignored(clean_env):
    for k, v in {"RANK": "3", "WORLD_SIZE": "8", "MASTER_ADDR": "elsewhere", "SLURM_JOB_ID": "7"}.items():
        clean_env.setenv(k, v)
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "1")
    info = setup_distributed(_cfg())
    assert (info["rank"], info["world_size"], info["source"]) == (0, 1, "single process")
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"


def test_torchrun_env_outside_slurm_is_kept(clean_env):
    # torchrun by hand (not under Slurm): its RANK/WORLD_SIZE are the truth
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        clean_env.setenv(k, v)
    clean_env.setenv("MASTER_PORT", "29511")
    info = setup_distributed(_cfg())
    assert (info["rank"], info["world_size"], info["source"]) == (1, 2, "env (torchrun)")
    assert os.environ["MASTER_PORT"] == "29511"


def test_rank_zero_logs_one_line_with_world_nodes_master_backend(clean_env, caplog):
    for k, v in {**_slurm_task_env(0), "SUBMITIT_EXECUTOR": "slurm"}.items():
        clean_env.setenv(k, v)
    with caplog.at_level(logging.INFO, logger="gptoss_hpc.modeling.distributed"):
        setup_distributed(_cfg())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("distributed:")]
    port = os.environ["MASTER_PORT"]
    assert lines == [f"distributed: world size 4 on 2 node(s), master node1:{port}, backend gloo, ranks from submitit"]
    caplog.clear()
    for k, v in _slurm_task_env(1).items():
        clean_env.setenv(k, v)
    with caplog.at_level(logging.INFO, logger="gptoss_hpc.modeling.distributed"):
        setup_distributed(_cfg())
    assert not [r for r in caplog.records if r.getMessage().startswith("distributed:")]


def test_status_writer_rank_comes_from_slurm_not_an_inherited_rank(clean_env):
    # an inherited RANK=3 must not stop task 0 writing status files (nor make task 2 write them)
    for k, v in {**_slurm_task_env(0), "SUBMITIT_EXECUTOR": "slurm", "RANK": "3"}.items():
        clean_env.setenv(k, v)
    assert global_rank() == 0
    clean_env.setenv("SLURM_PROCID", "2")
    clean_env.setenv("RANK", "0")
    assert global_rank() == 2


def test_environment_is_restored_after_each_test():
    # the fixture above undoes setup_distributed's os.environ exports (a job launched later inherits them)
    assert os.environ.get("RANK") != "3" and os.environ.get("WORLD_SIZE") != "4"
