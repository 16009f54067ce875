"""The GPU check's ``pipeline120b`` phase: gpt-oss-120b end to end on one GPU, through the synthetic checkpoint.

    bash launchers/gpu_check.sh --work logs/gc120 pipeline120b       # again with the same --work to go on
    bash launchers/gpu_check.sh --work logs/gc120 pipeline120b:12    # a 12-layer 120b-shaped checkpoint

Steps, each skipped when an earlier command with the same ``--work`` finished it (``pipeline120b.json`` there keeps
the point and the rows; the phase does not fit one 10-minute command: the 65 GB checkpoint alone takes ~3 minutes;
``logs/`` is git-ignored, so a work dir there stays on the device machine between commands while it is held):
the checkpoint (``synth_checkpoint --size 120b``, drawn on the GPU), train with the shipped defaults of
``model=gpt_oss_120b`` (MXFP4-resident experts) through ``python -m gptoss_hpc.launch ... stages=[train]``, then the
point's own stages by hand as a user re-runs one: eval (``eval.model=adapter``: the MXFP4 base + adapter unmerged,
base numbers under disable_adapter), serve (``python -m gptoss_hpc.serve <point>/adapter``, one /score request),
merge (streaming, ``merge.format=mxfp4``).

Disk: the checkpoint is ~65 GB and a bf16 merge of the 120b would be ~234 GB, more than any lent machine's disk,
so this phase merges with ``merge.format=mxfp4`` (~61 GB: the adapted experts re-quantized, the rest copied). The
merge step runs only when the point's filesystem has room for it (checkpoint size + 2 GB), else its row says
``not run (disk ...)``. Checkpoint + MXFP4 merge ~126 GB: the 2-GPU machine's 128 GiB disk holds it when nothing
else there writes much; the 1-GPU machine's 64 GiB holds the checkpoint only.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gptoss_hpc.bench.gpu_check_parts import run_sampled, stage_record, synth_checkpoint

PHASE = "pipeline120b"
STATE = "pipeline120b.json"
STEPS = 6  # optimizer steps: a few, past the compile
DISK_MARGIN = 2e9  # the MXFP4 merge writes about the checkpoint's size (experts re-quantized, the rest copied)
# Seconds a step is expected to need at least (guesses for the full 120b, not measured yet): one that would be cut
# off by --hard-s is left to the next command instead of being started and thrown away.
MIN_LEFT_S = {"train": 360.0, "eval": 150.0, "serve": 90.0, "merge": 240.0}


def _overrides(c: Any, base: list[str], layers: int | None) -> list[str]:
    """The user's 120b command line: model=gpt_oss_120b's shipped defaults (experts_dtype=mxfp4) from the folder."""
    drop = ("model=", "train.max_steps=")
    ov = [o for o in base if not o.startswith(drop)] + ["model=gpt_oss_120b", f"train.max_steps={min(c.steps, STEPS)}"]
    ov += ["eval.model=adapter", "merge.format=mxfp4"]
    if layers and not c.cpu:  # on CPU the stand-in's overrides already give the tiny checkpoint's 2 layers
        ov.append(f"model.num_hidden_layers={layers}")
    return ov


def _stage_by_hand(c: Any, point: Path, stage: str, name: str) -> dict[str, Any]:
    """``python -m gptoss_hpc.stages.<stage> <point>/config.yaml``: the row from its status record."""
    cmd = [sys.executable, "-m", f"gptoss_hpc.stages.{stage}", str(point / "config.yaml")]
    r = run_sampled(
        cmd, env=c.env(), log=c.work / "logs" / f"{PHASE}-{stage}.log", timeout_s=c.hard_left(), label=stage
    )
    rec = stage_record(point, stage)
    row = {
        "phase": PHASE,
        "name": name,
        "stage": stage,
        "result": "pass" if rec.get("state") == "COMPLETED" and r.rc == 0 else f"FAIL ({rec.get('state') or r.rc})",
        "wall_s": rec.get("wall_s") or round(r.wall_s, 1),
        "peak_gpu_gib": rec.get("peak_gpu_gib") if rec.get("peak_gpu_gib") is not None else r.peak_gib.get(stage),
        "peak_host_rss_gib": rec.get("peak_host_rss_gib"),
        "command": " ".join(cmd[1:]),
        "error": rec.get("error"),
    }
    if row["result"] != "pass":
        row["log_tail"] = r.tail
    return row


def _merge_facts(point: Path) -> dict[str, Any]:
    try:
        check = json.loads((point / "merged" / "merge_check.json").read_text())
    except (OSError, ValueError):
        return {}
    return {
        "merge_check_passed": check.get("passed"),
        "survival_mean": check.get("survival_mean"),
        "logit_survival": check.get("logit_survival"),
        "merged_gib": (check.get("merge") or {}).get("merged_gib"),
        "merge_peak_gpu_gib_with_check": (check.get("merge") or {}).get("peak_gpu_gib_with_check"),
    }


def phase_pipeline120b(c: Any, launch: Callable[..., dict[str, Any]], base_overrides: Callable, span: str) -> None:
    """See the module docstring. ``launch`` and ``base_overrides`` are gpu_check's (passed in: no import cycle)."""
    layers = int(span) if span else None
    state_path = c.work / STATE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"done": {}, "point": None}

    def record(step: str, row: dict[str, Any], *, listed: bool = False) -> None:
        if not listed:
            c.rows.append(row)
        if row["result"] == "pass":
            state["done"][step] = row
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(state, indent=1))

    def earlier(step: str) -> bool:
        """True when the step is not to run now: done by an earlier command (its row again), or too little time."""
        if step in state["done"]:
            c.rows.append({**state["done"][step], "note": "earlier command"})
            return True
        need = MIN_LEFT_S[step] * (layers / 36 if layers else 1.0)
        if c.left() < need:
            c.rows.append({"phase": PHASE, "name": step, "result": f"not run (budget: needs ~{need:.0f} s; run again)"})
            return True
        return False

    ckpt, row = synth_checkpoint(c, "120b", layers, PHASE)
    if row is not None:
        record("checkpoint", row)
        if row["result"] != "pass":
            return
    if not earlier("train"):
        first = launch(c, PHASE, "train: 120b shipped defaults", _overrides(c, base_overrides(c, ckpt, 1), layers),
                       stages="[train]", bench=False)  # fmt: skip
        state["point"] = first["point"]
        record("train", first, listed=True)  # launch() listed its rows already
        if first["result"] != "pass":
            return
    point = Path(state["point"])
    if not earlier("eval"):
        record("eval", _stage_by_hand(c, point, "eval", "eval: MXFP4 base + adapter unmerged (one model)"))
    if not earlier("serve"):
        from gptoss_hpc.bench.gpu_check_serve import serve_once

        name = "serve: MXFP4 base + adapter unmerged"
        record("serve", {"phase": PHASE, **serve_once(point / "adapter", c.env(), c.work / "logs" / "serve120b.log",
                                                        c.hard_left(), name=name)})  # fmt: skip
    if earlier("merge"):
        return
    need = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) + DISK_MARGIN
    free = shutil.disk_usage(point).free
    if free < need:
        c.rows.append({"phase": PHASE, "name": "merge: streaming, merge.format=mxfp4",
                       "result": f"not run (disk: {free / 1e9:.0f} GB free, needs ~{need / 1e9:.0f} GB)"})  # fmt: skip
        return
    row = {**_stage_by_hand(c, point, "merge", "merge: streaming, merge.format=mxfp4"), **_merge_facts(point)}
    if row.get("survival_mean") is not None:  # the table has no column for it: in the name
        row["name"] += f" (check {'passed' if row['merge_check_passed'] else 'FAILED'}, adapter kept "
        row["name"] += f"{row['survival_mean']:.0%} of its weight change, {row['logit_survival'] or 0:.0%} of its "
        row["name"] += f"logit effect; {row['merged_gib']} GiB)"
    record("merge", row)
