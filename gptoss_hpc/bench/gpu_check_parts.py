"""Pieces of the GPU check (gptoss_hpc.bench.gpu_check): synthetic chat rows, running a command under a budget while
sampling GPU memory per stage, reading what a launch recorded, and the one table."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptoss_hpc.monitor.records import metric_rows, steady_rate

_WORDS = tuple(
    " ".join(
        [
            "the of and to in is was for on that with as by at from this are be it an or which have has not but",
            "model train data time first new two after more other into over also most its only some these many",
            "system number three state group between during under while where since before because through each",
            "water light field energy river city music language history answer reason result method value simple",
        ]
    ).split()
)


def write_chat_rows(path: Path, rows: int, median_tokens: int, max_tokens: int, seed: int = 0) -> Path:
    """JSONL chat rows whose lengths are log-normal (median ``median_tokens``, clipped to [median/4, max_tokens]),
    30 % prompt and 70 % answer, like the bench's synthetic batches (one common word ~ one token)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(rows):
            n = int(min(max_tokens, max(median_tokens / 4, rng.lognormvariate(math.log(median_tokens), 0.5))))
            prompt, answer = max(4, int(0.3 * n)), max(4, int(0.7 * n))
            messages = [
                {"role": "system", "content": "reasoning language: English"},
                {"role": "user", "content": " ".join(rng.choice(_WORDS) for _ in range(prompt))},
                {"role": "assistant", "content": " ".join(rng.choice(_WORDS) for _ in range(answer))},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def result_of(rc: int | None) -> str:
    """A row's result from a command's exit status (None: ended by the time limit)."""
    return "pass" if rc == 0 else ("timeout" if rc is None else f"FAIL (exit {rc})")


def synth_checkpoint(c: Any, size: str, layers: int | None, phase: str) -> tuple[Path, dict[str, Any] | None]:
    """The synthetic checkpoint of ``size`` (20b, 120b; --cpu writes the tiny one) under ``c.work``, with ``layers``
    of its layers (None: all), through ``python -m gptoss_hpc.synth_checkpoint``: (folder, its row), or (folder,
    None) when an earlier command with the same --work wrote it (the tool writes through a temp dir, so a folder
    with its index is complete). A failed write's row says FAIL and carries the log tail."""
    out = c.work / (f"ckpt-{layers or 'full'}" if size == "20b" else f"ckpt-{size}-{layers or 'full'}")
    if (out / "model.safetensors.index.json").is_file():
        return out, None
    cmd = [sys.executable, "-m", "gptoss_hpc.synth_checkpoint", "--size", "tiny" if c.cpu else size]
    cmd += ["--device", "cpu" if c.cpu else "cuda", "--overwrite", str(out)]
    if layers and not c.cpu:
        cmd[-1:-1] = ["--num-hidden-layers", str(layers)]  # before OUT_DIR
    log = c.work / "logs" / f"{out.name}.log"
    r = run_sampled(cmd, env=c.env(), log=log, timeout_s=c.hard_left(), label="checkpoint")
    row = {
        "phase": phase,
        "name": f"synth_checkpoint {out.name}",
        "result": result_of(r.rc),
        "wall_s": round(r.wall_s, 1),
        "peak_gpu_gib": r.peak_gib.get("checkpoint"),
        "size_gb": round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9, 1) if r.rc == 0 else None,
    }
    if r.rc != 0:
        row["log_tail"] = r.tail
    return out, row


def _gpu_memory_gib() -> list[float]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(x) / 1024 for x in out.split() if x.strip().isdigit()]


def _running_stage(point: Path | None) -> str | None:
    if point is None:
        return None
    for status in sorted((point / "status").glob("*.json")) if (point / "status").is_dir() else []:
        try:
            if json.loads(status.read_text()).get("state") == "RUNNING":
                return status.stem
        except (OSError, ValueError):
            continue
    return None


@dataclass
class Sampled:
    """Outcome of one command: exit code (None = killed at the budget), wall time, and the GPU memory peak
    (nvidia-smi memory.used, the largest GPU) per stage that was RUNNING when sampled."""

    rc: int | None
    wall_s: float
    peak_gib: dict[str, float] = field(default_factory=dict)
    tail: str = ""
    started: float = 0.0


def run_sampled(
    cmd: list[str],
    *,
    env: dict[str, str],
    log: Path,
    timeout_s: float,
    runs: Path | None = None,
    label: str = "run",
    sample: bool = True,
) -> Sampled:
    """Run ``cmd`` (stdout+stderr to ``log``) for at most ``timeout_s``, then end its process group."""
    log.parent.mkdir(parents=True, exist_ok=True)
    peaks: dict[str, float] = {}
    done = threading.Event()

    def sampler() -> None:
        while not done.wait(1.0):
            mem = _gpu_memory_gib()
            if not mem:
                continue
            points = sorted(runs.glob("*/p000")) if runs is not None else []  # <run_root>/<name>/<timestamp>/p000
            stage = _running_stage(points[-1] if points else None) or label
            peaks[stage] = max(peaks.get(stage, 0.0), max(mem))

    started = time.time()
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        thread = threading.Thread(target=sampler, daemon=True)
        if sample:
            thread.start()
        try:
            rc: int | None = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            rc = None
            os.killpg(proc.pid, signal.SIGTERM)  # our own child's group: the launcher and its local jobs
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        done.set()
    wall = time.time() - started
    text = log.read_text(errors="replace")
    return Sampled(rc, wall, {k: round(v, 1) for k, v in peaks.items()}, text[-3000:], started)


def steady_train_facts(point: Path, warmup_steps: int) -> dict[str, Any]:
    """The trainer's own throughput from metrics.jsonl (rank 0 logs every step: wall time and
    num_input_tokens_seen, real non-padding tokens over all ranks): the steady rate as status and the report define it
    (gptoss_hpc.monitor.records.steady_rate, after ``warmup_steps``), the mean over the same steps, and the real tokens
    per optimizer step."""
    metrics = point / "metrics.jsonl"
    logged = metric_rows(metrics.read_text().splitlines() if metrics.is_file() else [])
    rows = [
        (int(r["step"]), float(r["time"]), int(r["num_input_tokens_seen"]))
        for r in logged
        if "num_input_tokens_seen" in r and "loss" in r
    ]
    facts: dict[str, Any] = {"logged_steps": len(rows)}
    if len(rows) >= 2:
        per_step = sorted(b[2] - a[2] for a, b in itertools.pairwise(rows))
        facts["real_tokens_per_step"] = per_step[len(per_step) // 2]
    tok_s, steps = steady_rate([r for r in logged if "loss" in r], "num_input_tokens_seen", warmup_steps)
    if tok_s is not None and steps is not None:
        # the mean over the same steps also carries any stall (a recompile, a checkpoint), so both are kept and shown
        first, last = (int(s) for s in steps.split("-"))
        steady = [r for r in rows if first <= r[0] <= last]
        facts["train_tok_s"] = round(tok_s)
        facts["train_tok_s_mean"] = round((steady[-1][2] - steady[0][2]) / (steady[-1][1] - steady[0][1]))
        facts["step_s"] = [round(b[1] - a[1], 3) for a, b in itertools.pairwise(rows)]
        facts["steady_steps"] = steps
    train_metrics = point / "train_metrics.json"
    if train_metrics.is_file():
        m = json.loads(train_metrics.read_text())
        batch = m.get("batch") or {}
        facts["max_tokens_per_step"] = batch.get("max_tokens_per_step")
        facts["world_size"] = m.get("world_size")
        facts["speed_knobs"] = m.get("speed_knobs")
        facts["global_step"] = m.get("global_step")
        facts["steady_mfu"] = m.get("steady_mfu")  # the train stage's own, attention counted (stages/run_facts.py)
    return facts


def stage_record(point: Path, stage: str) -> dict[str, Any]:
    """status/<stage>.json of a point: state, error, and the wall_s / peak_gpu_gib a stage records there."""
    path = point / "status" / f"{stage}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


COLUMNS = (
    "phase",
    "stage / config",
    "result",
    "wall s",
    "peak GPU GiB",
    "train tok/s (median step; mean)",
    "bench tok/s",
    "train/bench",
    "tokens/opt step (real; max)",
)


def _fmt(v: Any) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def scaling_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per-GPU throughput of each multi-GPU train=default run against the one-GPU train=default run (issue 19)."""
    one = [r for r in rows if r.get("name") == "train=default" and r.get("train_tok_s")]
    if not one:
        return []
    base = one[-1]["train_tok_s"]
    lines = []
    for r in rows:
        n = r.get("world_size") or 1
        if n > 1 and r.get("train_tok_s") and str(r.get("name", "")).startswith("train=default"):
            per_gpu = r["train_tok_s"] / n
            lines.append(
                f"scaling: {r['name']}: {per_gpu:,.0f} tok/s per GPU = {per_gpu / base:.0%} of one GPU ({base:,})"
            )
    return lines


def table(rows: list[dict[str, Any]]) -> str:
    """ONE markdown table over every row (a stage of the pipeline, a train config, a knob combination)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        ratio = None
        if r.get("train_tok_s") and r.get("bench_tok_s"):
            per_gpu = r["train_tok_s"] / max(1, r.get("world_size") or 1)
            ratio = f"{per_gpu / r['bench_tok_s']:.2f}"
        tokens = ""
        if r.get("real_tokens_per_step") or r.get("max_tokens_per_step"):
            tokens = f"{_fmt(r.get('real_tokens_per_step'))}; {_fmt(r.get('max_tokens_per_step'))}"
        cells = [
            r.get("phase"),
            r.get("name"),
            r.get("result"),
            r.get("wall_s"),
            r.get("peak_gpu_gib"),
            "; ".join(_fmt(r[k]) for k in ("train_tok_s", "train_tok_s_mean") if r.get(k)) or None,
            r.get("bench_tok_s"),
            ratio,
            tokens,
        ]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    scaling = scaling_lines(rows)
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(scaling) + "\n" if scaling else "")


def environment(cpu: bool) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_form": cpu,
    }
    for mod in ("torch", "transformers", "peft", "trl", "deepspeed", "accelerate"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # a missing package shows as absent in the record, not as a crash of the check
            env[mod] = None
    if not cpu:
        import torch

        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    env["nccl_env"] = {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}
    return env


def write_results(out: Path | None, rows: list[dict[str, Any]], env: dict[str, Any], command: str) -> str:
    text = f"GPU check {env.get('date')} on {env.get('gpus') or 'CPU'}: `{command}`\n\n" + table(rows)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.md").write_text(text)
        (out / "gpu_check.json").write_text(json.dumps({"env": env, "command": command, "rows": rows}, indent=1))
    return text
