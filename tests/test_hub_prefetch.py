"""Hub pre-fetch at launch into cluster.hf_home; jobs run offline against it; a gated repo stops the launch.

Real: huggingface_hub's client (snapshot_download, from_pretrained, AutoTokenizer), datasets, the local
Slurm (launchers/local_slurm.sh), TRL/PEFT training and the merge of a tiny gpt-oss.
Faked: the Hub itself, as a FAKE Hub on 127.0.0.1 (tests/fakehub.py) that the real client reaches through
HF_ENDPOINT. It is shut down as soon as the launcher returns, so the jobs have no Hub at all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakehub import FakeHub, serve

from gptoss_hpc.config.io import compose, to_run_config
from gptoss_hpc.submission.manifest import Manifest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "gptoss_hpc" / "data" / "sample" / "multilingual_reasoning.jsonl"
TOKEN = "hf_fake_gated_token_0123456789"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fake/tiny-gpt-oss (a saved tiny gpt-oss + its small BPE tokenizer), fake/gated (same files, gated),
    and the dataset fake/chat (the bundled sample as train.jsonl)."""
    from gptoss_hpc.modeling.model import build_tiny_model
    from gptoss_hpc.modeling.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("fakehub")
    cfg = to_run_config(compose(["experiment=demo", "model.tokenizer=tiny-bpe"]))
    model_dir = root / "models" / "fake" / "tiny-gpt-oss"
    build_tiny_model(cfg).save_pretrained(model_dir)
    load_tokenizer(cfg.model).save_pretrained(model_dir)
    shutil.copytree(model_dir, root / "models" / "fake" / "gated")
    data_dir = root / "datasets" / "fake" / "chat"
    data_dir.mkdir(parents=True)
    shutil.copy(SAMPLE, data_dir / "train.jsonl")
    return root


def _launch(args: list[str], tmp_path: Path, hub: FakeHub, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HOME", "HF_HUB_OFFLINE")}
    return subprocess.run(
        [sys.executable, "-m", "gptoss_hpc.launch", *args, f"run_root={tmp_path / 'logs'}"],
        capture_output=True, text=True, timeout=300,
        env={**base, "HF_ENDPOINT": hub.url, "HF_TOKEN_PATH": str(tmp_path / "no-token"), "WANDB_MODE": "offline",
             "PUSH_TO_HUB": "false", "HF_HUB_DISABLE_TELEMETRY": "1", **env},
    )  # fmt: skip


FROM_HUB = [
    "experiment=demo", "model.tiny=false", "model.tokenizer=auto", "data.source=hub", "data.name=fake/chat",
    "train.max_steps=2", "train.max_length=256",
]  # fmt: skip


def test_gated_repo_fails_the_launch_before_sbatch_with_the_fix(hub_root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "sbatch-called"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "sbatch").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (fake_bin / "sbatch").chmod(0o755)
    hf_home = tmp_path / "hf"
    args = [*FROM_HUB, "model.name_or_path=fake/gated", "cluster=local_slurm", f"cluster.hf_home={hf_home}"]
    with serve(FakeHub(hub_root, gated={"fake/gated": TOKEN})) as hub:
        result = _launch(args, tmp_path, hub, PATH=f"{fake_bin}:{os.environ['PATH']}")
        assert result.returncode == 1, result.stderr
        assert "fake/gated" in result.stderr and "gated repo" in result.stderr
        assert "HF_TOKEN_PATH" in result.stderr  # the fix names both ways to give a token
        assert not marker.exists() and not (tmp_path / "logs").exists()
        # The same launch with the token in a file (no HF_TOKEN in any environment) gets past the prefetch.
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        result = _launch(args, tmp_path, hub, PATH=f"{fake_bin}:{os.environ['PATH']}", HF_TOKEN_PATH=str(token_file))
    assert marker.exists(), result.stderr  # reached sbatch (the fake one, which refuses)
    assert any((hf_home / "hub" / "models--fake--gated" / "snapshots").glob("*/model.safetensors"))


def test_unreachable_hub_fails_the_launch_before_sbatch(tmp_path: Path) -> None:
    dead = FakeHub(tmp_path)
    with serve(dead):
        pass  # the port is closed again: connections are refused
    result = _launch([*FROM_HUB, "model.name_or_path=fake/tiny-gpt-oss", f"cluster.hf_home={tmp_path / 'hf'}"],
                     tmp_path, dead)  # fmt: skip
    assert result.returncode == 1
    assert "fake/tiny-gpt-oss" in result.stderr and "prefetch into cluster.hf_home" in result.stderr
    assert not (tmp_path / "logs").exists()


def _sacct(job_ids: list[str]) -> dict[str, str]:
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(job_ids), "--format=JobID,State"],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return dict(line.split("|")[0:2] for line in out.splitlines() if line)


@pytest.mark.slurm
@pytest.mark.slow
def test_jobs_train_and_merge_offline_from_the_prefetched_cache(hub_root: Path, tmp_path: Path) -> None:
    hf_home = tmp_path / "hf"
    args = [*FROM_HUB, "model.name_or_path=fake/tiny-gpt-oss", "cluster=local_slurm", "cluster.gpus_per_node=1",
            "stages=[train,merge]", f"cluster.hf_home={hf_home}"]  # fmt: skip
    with serve(FakeHub(hub_root)) as hub:
        result = _launch(args, tmp_path, hub)
        prefetch_requests = list(hub.requests)
    # The Hub is gone now; the jobs still have HF_ENDPOINT pointing at its closed port.
    assert result.returncode == 0, result.stderr[-3000:]
    assert any("/datasets/fake/chat/resolve/" in r for r in prefetch_requests)
    assert any("/fake/tiny-gpt-oss/resolve/" in r and "model.safetensors" in r for r in prefetch_requests)
    (run_dir,) = (tmp_path / "logs").glob("demo/*")
    manifest = Manifest.load(run_dir)
    script = next((run_dir / "slurm" / "train").rglob("*_submission.sh")).read_text()
    assert "export HF_HUB_OFFLINE=1" in script and f"export HF_HOME={hf_home}" in script
    ids = [j.job_id for j in manifest.jobs]
    deadline = time.time() + 600
    states: dict[str, str] = {}
    while time.time() < deadline:
        states = _sacct(ids)
        if len(states) == len(ids) and all(s.split()[0] in TERMINAL for s in states.values()):
            break
        time.sleep(3)
    else:
        subprocess.run(["scancel", *ids], check=False)
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in (run_dir / "slurm").rglob("*_log.*"))
    assert all(s == "COMPLETED" for s in states.values()), f"{states}\n{logs}"
    assert (run_dir / "p000" / "merged" / "config.json").is_file()
