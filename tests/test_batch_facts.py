"""Every rank checks at train start that its DeepSpeed JSON, accumulation and effective batch are the config's and
the same as its peers' (gptoss_hpc.modeling.batch_facts). Real: two processes in a gloo group, TRL's SFTConfig with
the rendered DeepSpeed JSON (HF resolves its "auto" values), our check; the ranks run on CPU in place of GPUs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from gptoss_hpc.config import compose, to_run_config
from gptoss_hpc.modeling.batch_facts import expected_facts

REPO = Path(__file__).resolve().parents[1]

_RANK = """
import json, logging, os, sys
logging.basicConfig(level=logging.INFO)
from pathlib import Path
from gptoss_hpc.config import compose, to_run_config
from gptoss_hpc.modeling.batch_facts import check_batch_facts
from gptoss_hpc.modeling.deepspeed import render_deepspeed_config
from gptoss_hpc.modeling.sft import build_sft_config_kwargs, deepspeed_json_path
from gptoss_hpc.paths import PointPaths
from trl import SFTConfig
point, overrides = Path(sys.argv[1]), sys.argv[2:]
cfg = to_run_config(compose(["experiment=demo", "cluster=local_slurm", "train.deepspeed=true", *overrides]))
paths = PointPaths(point)
paths.train.mkdir(parents=True, exist_ok=True)
kwargs = build_sft_config_kwargs(cfg, paths, env={})
deepspeed_json_path(paths).write_text(json.dumps(render_deepspeed_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))))
args = SFTConfig(**kwargs)
if os.environ.get("EDIT_DS_JSON"):  # a stale or hand-edited file where DeepSpeed reads it
    ds = json.loads(deepspeed_json_path(paths).read_text())
    ds["zero_optimization"]["stage"] = 1
    deepspeed_json_path(paths).write_text(json.dumps(ds))

# each rank ends as the train stage does: without the teardown, a rank whose gloo threads outlive the interpreter
# aborts at exit (SIGABRT, "terminate called without an active exception"), as two loaded ranks did at times
from gptoss_hpc.modeling.distributed import abort_distributed, shutdown_distributed
try:
    facts = check_batch_facts(cfg, args, deepspeed_json_path(paths))
except Exception as exc:
    print("ERROR", type(exc).__name__, exc, flush=True)
    abort_distributed()
    sys.exit(3)
print("FACTS", json.dumps(facts), flush=True)
shutdown_distributed()
"""


def _two_ranks(
    tmp_path: Path, overrides: list[list[str]], edit_rank: int | None = None
) -> list[subprocess.CompletedProcess]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SLURM_", "SUBMITIT_"))}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
        if rank == edit_rank:
            env["EDIT_DS_JSON"] = "1"
        # each rank has its own point dir: the second case gives the ranks different configs
        point = tmp_path / f"rank{rank}" / "p000"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _RANK, str(point), *overrides[rank]],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    done = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def test_two_ranks_agree_and_report_the_configured_batch(tmp_path):
    done = _two_ranks(tmp_path, [["train.gradient_accumulation_steps=3"]] * 2)
    for d in done:
        assert d.returncode == 0, d.stdout + d.stderr[-3000:]
    facts = [json.loads(d.stdout.split("FACTS ", 1)[1]) for d in done]
    assert facts[0] == facts[1]
    cfg = to_run_config(compose(["experiment=demo", "train.gradient_accumulation_steps=3"]))
    want = expected_facts(cfg, 2)
    assert {k: facts[0][k] for k in want} == want
    assert want["effective_batch"] == 2 * 3 * 2  # demo micro-batch 2, accumulation 3, 2 ranks
    # HF resolved DeepSpeed's "auto" values to the same numbers
    assert facts[0]["deepspeed_resolved"] == {
        "train_batch_size": 12,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 3,
    }
    assert "batch per optimizer step (all 2 ranks agree" in done[0].stderr  # printed once, by rank 0
    assert "batch per optimizer step" not in done[1].stderr


def test_ranks_with_different_accumulation_all_fail_naming_the_disagreement(tmp_path):
    done = _two_ranks(tmp_path, [["train.gradient_accumulation_steps=2"], ["train.gradient_accumulation_steps=4"]])
    for rank, d in enumerate(done):
        assert d.returncode == 3, d.stdout + d.stderr[-3000:]
        assert f"rank {rank}: ranks disagree on the batch/DeepSpeed settings" in d.stdout


def test_a_deepspeed_json_that_is_not_the_configs_is_refused(tmp_path):
    """The JSON on disk (what DeepSpeed reads) is compared with the config's rendering: rank 1's file is edited
    after rendering; rank 1 names the file, rank 0 sees the ranks disagree, and both fail."""
    done = _two_ranks(tmp_path, [[], []], edit_rank=1)
    assert [d.returncode for d in done] == [3, 3], [d.stdout + d.stderr[-2000:] for d in done]
    assert "differs from the one the config renders" in done[1].stdout
    assert "ranks disagree" in done[0].stdout
