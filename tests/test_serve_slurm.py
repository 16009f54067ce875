"""The serve stage as a job on the REAL local Slurm (launchers/local_slurm.sh): the demo trains and merges a
tiny gpt-oss, the serve job binds the node's address with an API key (the submitting shell's SERVE_API_KEY,
or one it generates into a 0600 file), `gptoss-hpc status` says where the endpoint and the key are, the real
`openai` client chats with the merged model, requests without the key get 401, and the key lands in no log
and no other file.

Faked: the GPUs (gres on /dev/null-like devices; the jobs run on the CPU).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ENV_KEY = "serve-slurm-canary-key-0123456789abcdef"
FAST = [
    "experiment=demo",
    "cluster=local_slurm",
    "cluster.gpus_per_node=1",
    "model.tokenizer=tiny-bpe",
    "train.max_steps=3",
    "train.max_length=256",
    "stages=[train,merge,serve]",
]


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)


def _wait_for_endpoint(serve_status: Path, run_dir: Path, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = json.loads(serve_status.read_text())
        except (OSError, ValueError):
            status = {}
        if status.get("state") == "RUNNING" and status.get("url"):
            try:
                if httpx.get(status["url"].removesuffix("/v1") + "/health", timeout=2).status_code == 200:
                    return status
            except httpx.TransportError:
                pass
        assert status.get("state") != "FAILED", status
        if time.monotonic() > deadline:
            logs = "\n".join(p.read_text()[-1500:] for p in (run_dir / "slurm").rglob("*.err"))
            pytest.fail(f"the serve job did not come up in {timeout} s: {status}\n{logs}")
        time.sleep(2)


@pytest.mark.parametrize("key_from", ["generated", "SERVE_API_KEY"])
def test_slurm_serve_stage_with_a_key_and_status_says_where(tmp_path: Path, key_from: str) -> None:
    import openai

    env = {k: v for k, v in os.environ.items() if k not in ("SERVE_API_KEY", "GPTOSS_SERVE_HOST")}
    if key_from == "SERVE_API_KEY":
        env["SERVE_API_KEY"] = ENV_KEY
    launch = _run("-m", "gptoss_hpc.launch", *FAST, f"run_root={tmp_path / 'logs'}", env=env)
    assert launch.returncode == 0, launch.stderr[-4000:]
    (run_dir,) = (p.parent for p in (tmp_path / "logs").glob("*/*/launch.json"))
    point = run_dir / "p000"
    key_file = point / "serve" / "api_key"
    try:
        status = _wait_for_endpoint(point / "status" / "serve.json", run_dir)
        if key_from == "generated":
            assert status["api_key_source"] == "file" and status["api_key_file"] == str(key_file)
            assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
            assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
            key = key_file.read_text().strip()
            where = f"API key in {key_file} (mode 600)"
        else:
            assert status["api_key_source"] == "SERVE_API_KEY" and not key_file.exists()
            key = ENV_KEY
            where = "API key $SERVE_API_KEY of the submitting shell"
        assert status["url"].startswith("http://") and status["model"] == "demo/p000"

        shown = _run("-m", "gptoss_hpc.status", str(run_dir))
        assert shown.returncode == 0, shown.stderr
        line = next(line for line in shown.stdout.splitlines() if line.startswith("serve p000"))
        assert status["url"] in line and "model demo/p000" in line and where in line, shown.stdout
        as_json = json.loads(_run("-m", "gptoss_hpc.status", str(run_dir), "--json").stdout)
        (serve_job,) = [j for j in as_json["jobs"] if j["stage"] == "serve"]
        assert serve_job["state"] == "RUNNING" and status["url"] in serve_job["endpoint"]

        client = openai.OpenAI(base_url=status["url"], api_key=key, max_retries=0)
        (model,) = client.models.list().data
        chat = client.chat.completions.create(
            model=model.id, messages=[{"role": "user", "content": "¿Cuál es el capital de Australia?"}], max_tokens=8
        )
        assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=status["url"], api_key="not-the-key", max_retries=0).models.list()
        assert httpx.post(status["url"] + "/chat/completions", json={"messages": []}).status_code == 401
    finally:
        cancel = _run("-m", "gptoss_hpc.cancel", str(run_dir))
    assert cancel.returncode == 0, cancel.stderr
    deadline = time.monotonic() + 120
    while json.loads((point / "status" / "serve.json").read_text())["state"] == "RUNNING":
        assert time.monotonic() < deadline, "the serve job did not stop on scancel"
        time.sleep(1)
    assert json.loads((point / "status" / "serve.json").read_text())["state"] == "COMPLETED"
    holders = [str(p) for p in run_dir.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    assert holders == ([str(key_file)] if key_from == "generated" else [])
