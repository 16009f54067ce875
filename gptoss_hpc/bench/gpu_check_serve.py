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
from collections.abc import Callable
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


def _run_json(cmd: list[str], env: dict[str, str], log: Path, timeout_s: float) -> tuple[int, str]:
    with log.open("w", encoding="utf-8") as out:
        try:
            rc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, log.read_text(errors="replace")


def serve_load(model: Path, env: dict[str, str], work: Path, budget_s: float, name: str) -> list[dict[str, Any]]:
    """``model`` (a merged folder or a checkpoint, or an adapter folder on an MXFP4 base): greedy equality under
    continuous batching (gptoss_hpc.serving.batch_check), then ``python -m gptoss_hpc.bench serve`` at 1, 8, 32
    and 64 clients. Two rows, each with its command."""
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    t0 = started = time.time()
    check = [sys.executable, "-m", "gptoss_hpc.serving.batch_check", str(model), "--prompts", "8"]
    rc, text = _run_json(check, env, work / f"{name}.batch_check.log", budget_s / 3)
    row: dict[str, Any] = {"name": f"serve {name}: batched greedy == generate", "stage": "serve"}
    row.update(command=" ".join(check[1:]), wall_s=round(time.time() - started, 1))
    start = text.find('{"batched"')
    row["result"] = "pass" if rc == 0 else f"FAIL (rc {rc})"
    if start >= 0:
        row["batch_check"] = json.JSONDecoder().raw_decode(text[start:])[0]  # log lines may follow it
    elif rc != 0:
        row["log_tail"] = text[-3000:]
    rows.append(row)
    out = work / f"{name}.bench.json"
    bench = [sys.executable, "-m", "gptoss_hpc.bench", "serve", "--model", str(model), "--out", str(out)]
    bench += ["--clients", "1,8,32,64", "--max-tokens", "256", "--compare", "0"]
    started = time.time()
    rc, text = _run_json(bench, env, work / f"{name}.bench.log", max(60.0, budget_s - (started - t0)))
    row = {"name": f"serve {name}: load bench", "stage": "serve", "command": " ".join(bench[1:])}
    row.update(result="pass" if rc == 0 else f"FAIL (rc {rc})", wall_s=round(time.time() - started, 1))
    if out.is_file():
        row["levels"] = json.loads(out.read_text())["levels"]
    if rc != 0:
        row["log_tail"] = text[-3000:]
    rows.append(row)
    return rows


def phase_serve(c: Any, span: str, checkpoint: Callable[[Any], Path]) -> None:
    """Continuous-batching serve: batched greedy == generate, then the load bench (1/8/32/64 clients). No span:
    the synthetic 20b checkpoint as the merged model; ``serve:DIR``: DIR (e.g. pipeline120b's point/adapter, the
    adapter on the MXFP4 base)."""
    model, name = (Path(span), Path(span).name) if span else (checkpoint(c), "20b")
    for row in serve_load(model, c.env(), c.work / "logs" / f"serve_{name}", c.hard_left(), name):
        c.rows.append({"phase": "serve", **row})
