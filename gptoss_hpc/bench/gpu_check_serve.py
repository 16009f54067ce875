"""The serve step of the GPU check: start ``python -m gptoss_hpc.serve MERGED``, wait for /health, POST one /score
request, record wall time (start to answer), peak GPU memory and the answer's validity, then stop the server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from gptoss_hpc.bench.gpu_check_parts import _gpu_memory_gib


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict[str, Any] | None = None, timeout: float = 5.0) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def serve_once(
    merged: Path, env: dict[str, str], log: Path, budget_s: float, name: str = "serve: shipped defaults (merged model)"
) -> dict[str, Any]:
    """Serve ``merged`` (a merged or an adapter folder) on loopback, ask one /score, stop it: the row."""
    port = _free_port()
    cmd = [sys.executable, "-m", "gptoss_hpc.serve", str(merged), "--port", str(port)]
    row: dict[str, Any] = {
        "name": name,
        "stage": "serve",
        "command": " ".join(cmd[1:]),
    }
    peak = [0.0]
    done = threading.Event()

    def sampler() -> None:
        while not done.wait(1.0):
            peak[0] = max([peak[0], *_gpu_memory_gib()])

    started = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=sampler, daemon=True).start()
        try:
            deadline = started + max(10.0, budget_s)
            while time.time() < deadline and proc.poll() is None:
                try:
                    if _get(f"http://127.0.0.1:{port}/health").get("status") in ("ok", "ready", True):
                        break
                except (OSError, urllib.error.URLError, ValueError):
                    pass
                time.sleep(1.0)
            body = {
                "messages": [
                    {"role": "system", "content": "reasoning language: German"},
                    {"role": "user", "content": "What is the capital of Australia?"},
                ],
                "max_new_tokens": 24,
            }
            answer = _get(f"http://127.0.0.1:{port}/score", body, timeout=max(30.0, deadline - time.time()))
            row["result"] = "pass"
            row["answer_valid_harmony"] = answer.get("valid")
        except Exception as exc:  # any failure of the server is this row's result, with its log tail
            row["result"] = f"FAIL ({type(exc).__name__}: {exc})"[:200]
        finally:
            row["wall_s"] = round(time.time() - started, 1)
            done.set()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # our own server's group
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    row["peak_gpu_gib"] = round(peak[0], 1) if peak[0] else None
    if row["result"] != "pass":
        row["log_tail"] = log.read_text(errors="replace")[-3000:]
    return row
