"""The GPU check: the real pipeline on a synthetic gpt-oss-20b checkpoint, as a user runs it, in selectable phases.

    bash launchers/gpu_check.sh                       # every phase that fits one GPU (pipeline configs bench knobs)
    bash launchers/gpu_check.sh pipeline              # train -> merge -> eval -> serve, shipped defaults, cluster=local
    bash launchers/gpu_check.sh configs bench         # train=default and train=reference (stage + bench tok/s)
    bash launchers/gpu_check.sh bench:default configs:reference   # one config each (`:default`, `:reference`)
    bash launchers/gpu_check.sh 2gpu                  # train=default on 2 GPUs: one rank per GPU, as on Slurm
    bash launchers/gpu_check.sh --work W pipeline120b # 120b on one GPU, resumable (gptoss_hpc.bench.gpu_check_120b)
    bash launchers/gpu_check.sh knobs:0-7             # GPU knob list, entries 0..7 (GPU_KNOBS below)
    bash launchers/gpu_check.sh serve                 # 20b: batched greedy == generate, load bench 1/8/32/64
    bash launchers/gpu_check.sh --work W serve:W/<point>/adapter   # the same on 120b's adapter (MXFP4 base)
    bash launchers/gpu_check.sh fit:20b@24 fit:120b@80 # shipped defaults on a smaller card: train.fit_memory's
                                                      # choice, the allocator capped at that many GiB
    bash launchers/gpu_check.sh long:attn long:bench:16384,32768   # long rows (gptoss_hpc.bench.gpu_check_long)
    bash launchers/gpu_check.sh --cpu pipeline        # CI-sized: tiny checkpoint, CPU ranks (tests/test_gpu_check.py)
    python -m gptoss_hpc.bench.gpu_check table A.json B.json   # one table from several phases' JSON

Each phase is self-contained (the GPU machine is wiped between commands): it writes its checkpoint with
``python -m gptoss_hpc.synth_checkpoint`` into the work dir, then runs ``python -m gptoss_hpc.launch`` with
``cluster=local cluster.accelerator=gpu`` exactly as a user would. Every phase stops starting new work once
``--budget-s`` (default 480 s) is spent, and ends a run still going at ``--hard-s`` (560 s, listed as timeout),
so that the table is written inside a 10-minute device command; what it did not start is ``not run (budget)``.

The table: stage or config, pass/fail, wall s, peak GPU GiB (the stage's own ``peak_gpu_gib`` in
``pNNN/status/<stage>.json`` when it records one, else the nvidia-smi peak while it ran), the trainer's tok/s
(real, non-padding tokens, steady state: from step ``--warmup`` on, so the compiling steps are out) beside
``python -m gptoss_hpc.bench train``'s for the same overrides, and tokens per optimizer step (real; max). Written
to ``$OUT`` (or ``--out``) as gpu_check.md + gpu_check.json, besides the logs of failed runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from gptoss_hpc.bench.gpu_check_120b import phase_pipeline120b
from gptoss_hpc.bench.gpu_check_knobs import GPU_KNOBS, Knobs, knob_matrix  # noqa: F401  (re-exported)
from gptoss_hpc.bench.gpu_check_long import phase_long
from gptoss_hpc.bench.gpu_check_parts import (
    environment,
    result_of,
    run_sampled,
    stage_record,
    steady_train_facts,
    synth_checkpoint,
    table,
    write_results,
)
from gptoss_hpc.bench.gpu_check_serve import phase_serve
from gptoss_hpc.bench.gpu_check_setup import Check, base_overrides, checkpoint

TRAIN_CONFIGS = {"train=default": ["train=default"], "train=reference": ["train=reference"]}
PHASES = ("pipeline", "configs", "bench", "2gpu", "knobs", "pipeline120b", "fit", "serve", "long")
DEFAULT_PHASES = ("pipeline", "configs", "bench", "knobs")


def launch(c: Check, phase: str, name: str, overrides: list[str], *, stages: str, bench: bool) -> dict[str, Any]:
    """``python -m gptoss_hpc.launch <overrides> stages=[...]`` and one row per stage it ran."""
    tag = f"{phase}-{len(c.rows):02d}"
    overrides = [*overrides, *c.extra]
    runs = c.work / "runs" / tag
    cmd = [sys.executable, "-m", "gptoss_hpc.launch", *overrides, f"name={tag}", f"stages={stages}"]
    r = run_sampled(cmd, env=c.env(), log=c.work / "logs" / f"{tag}.log", timeout_s=c.hard_left(), runs=runs)
    points = sorted(runs.glob("*/p000"))
    point = points[-1] if points else runs
    rows = []
    previous_end = r.started
    for stage in stages.strip("[]").split(","):
        rec = stage_record(point, stage)
        wall = rec.get("wall_s")
        if wall is None and rec.get("state") == "COMPLETED":  # stages that record no wall_s: from the status times
            wall = round(rec["time"] - previous_end, 1)
        previous_end = rec.get("time", previous_end)
        row = {
            "phase": phase,
            "name": f"{stage}: {name}" if stage != "train" else name,
            "stage": stage,
            "result": _stage_result(rec, r.rc),
            "wall_s": wall,
            "peak_gpu_gib": rec.get("peak_gpu_gib") if rec.get("peak_gpu_gib") is not None else r.peak_gib.get(stage),
            "smi_peak_gib": r.peak_gib.get(stage),  # nvidia-smi's: the allocator's reserved + the CUDA context
            "command": " ".join(cmd[1:]),
            "error": rec.get("error"),
            "point": str(point),
        }
        if stage == "train":
            row.update(steady_train_facts(point, c.warmup))
        rows.append(row)
    if r.rc != 0 and not any(row["result"].startswith("FAIL") for row in rows):
        rows[-1]["result"] = f"FAIL (launch {result_of(r.rc)})"
    if any(row["result"] != "pass" for row in rows):
        rows[-1]["log_tail"] = r.tail
    c.rows.extend(rows)
    if bench and rows[0]["result"] == "pass":
        bench_for(c, phase, overrides, rows[0])
    return rows[0]


def _stage_result(rec: dict[str, Any], rc: int | None) -> str:
    state = rec.get("state")
    if state == "COMPLETED":
        return "pass"
    if state is None:
        return "not run" if rc == 0 else "FAIL (no status)"
    return f"FAIL ({state})"


def bench_for(c: Check, phase: str, overrides: list[str], row: dict[str, Any]) -> None:
    """``python -m gptoss_hpc.bench train`` with the same model/train/LoRA overrides, its tok/s beside the stage's."""
    if c.skip(phase, f"bench: {row['name']}"):
        return
    keep = [
        o
        for o in overrides
        if o.split("=")[0].split(".")[0] in ("model", "train", "lora")
        and not o.startswith(("model.name_or_path", "model.tokenizer", "train.max_steps", "train.save_steps"))
    ]
    if c.cpu:  # the bench builds its model from the preset's architecture: on CPU the tiny one, not 20b's
        keep = ["model=tiny_gpt_oss", "model.tokenizer=tiny-bpe", *(o for o in keep if not o.startswith("model"))]
    out = c.work / f"bench-{len(c.rows):02d}.json"
    cmd = [
        sys.executable,
        "-m",
        "gptoss_hpc.bench",
        "train",
        *keep,
        "--steps",
        "3",
        "--warmup",
        "2",
        "--no-peak",
        "--json",
        str(out),
    ]
    if c.cpu:
        cmd += ["--device", "cpu", "--vocab", "4096", "--steps", "1", "--warmup", "1"]
    r = run_sampled(cmd, env=c.env(), log=c.work / "logs" / f"{out.stem}.log", timeout_s=c.hard_left(), label="bench")
    try:
        timed = [x for x in json.loads(out.read_text())["rows"] if x["name"].startswith("configured")]
    except (OSError, ValueError, KeyError):
        timed = []
    if r.rc == 0 and timed and timed[0].get("status") == "ok":
        row["bench_tok_s"] = timed[0]["tok_s"]
        row["bench_peak_gib"] = timed[0].get("peak_reserved_gib")
        row["bench_command"] = " ".join(cmd[1:])
    else:
        c.rows.append(
            {"phase": phase, "name": f"bench: {row['name']}", "result": result_of(r.rc or 1), "log_tail": r.tail}
        )


def phase_pipeline(c: Check) -> None:
    """train -> merge -> eval with the shipped defaults (cluster=local, one GPU), then serve the merged model."""
    ckpt = checkpoint(c)
    row = launch(
        c, "pipeline", "shipped defaults", base_overrides(c, ckpt, 1), stages="[train,merge,eval]", bench=False
    )
    merged = Path(row["point"]) / "merged"
    if c.skip("pipeline", "serve") or not merged.is_dir():
        return
    from gptoss_hpc.bench.gpu_check_serve import serve_once

    c.rows.append({"phase": "pipeline", **serve_once(merged, c.env(), c.work / "logs" / "serve.log", c.hard_left())})


def _selected(span: str) -> dict[str, list[str]]:
    """TRAIN_CONFIGS, or the one a phase's `:default` / `:reference` suffix names."""
    return {k: v for k, v in TRAIN_CONFIGS.items() if not span or k == f"train={span}"}


def phase_configs(c: Check, bench: bool, span: str = "") -> None:
    ckpt = checkpoint(c)
    for name, extra in _selected(span).items():
        if not c.skip("configs", name):
            launch(c, "configs", name, [*base_overrides(c, ckpt, 1), *extra], stages="[train]", bench=bench)


def phase_bench(c: Check, span: str = "") -> None:
    """The bench alone for the train configs (when `configs` ran in another command)."""
    for name, extra in _selected(span).items():
        row = {"phase": "bench", "name": name, "result": "pass"}
        ov = [*base_overrides(c, Path("unused"), 1), *extra, *c.extra]  # --set reaches the bench as it does a run
        bench_for(c, "bench", ov, row)
        row["result"] = "pass" if row.get("bench_tok_s") else "FAIL"
        row["train_tok_s"] = None
        c.rows.append(row)


def phase_2gpu(c: Check) -> None:
    ckpt = checkpoint(c)
    if not c.skip("2gpu", "train=default x2"):
        launch(
            c, "2gpu", "train=default x2 (one rank per GPU)", base_overrides(c, ckpt, 2), stages="[train]", bench=True
        )


def phase_knobs(c: Check, lo: int, hi: int) -> None:
    layers = None if c.cpu else 4  # a 4-layer 20b-shaped checkpoint on the GPU: the knobs act per layer
    ckpt = checkpoint(c, layers)
    gpus = _gpu_count(c)
    for i, k in enumerate(GPU_KNOBS[lo : hi + 1], start=lo):
        name = f"knobs[{i}] {k.name}"
        if k.ranks > gpus:
            c.rows.append({"phase": "knobs", "name": name, "result": f"not run ({gpus} GPU)"})
        elif not c.skip("knobs", name):
            ov = base_overrides(c, ckpt, k.ranks, layers) + k.overrides()
            if c.cpu:  # the compiled knobs are GPU knobs; on CPU they stay off (tests/test_knob_combinations.py)
                ov += ["model.fused_experts=false", "model.compile_layers=false"]
            launch(c, "knobs", name, ov, stages="[train]", bench=False)


def phase_fit(c: Check, span: str) -> None:
    """``fit:20b@24`` / ``fit:120b@80``: the train stage with the model's shipped defaults on a card of that many
    GiB, as a user on it runs it: ``cluster.gpu_memory_gib=N``, so ``train.fit_memory`` picks the setting and the
    stage caps the CUDA allocator at N GiB (gptoss_hpc.stages.common.cap_gpu_memory): a peak past N fails with
    out-of-memory here as it would on that card. The row names the setting the launch chose."""
    size, _, gib = (span or "20b@24").partition("@")
    if size not in ("20b", "120b") or not gib.replace(".", "", 1).isdigit():
        raise SystemExit(f"phase fit:{span}: use fit:20b@GIB or fit:120b@GIB, e.g. fit:20b@24")
    if size == "120b":
        from gptoss_hpc.bench.gpu_check_120b import PHASE

        ckpt, row = synth_checkpoint(c, "120b", None, PHASE)  # 65 GB (the 2-GPU box's disk), shared with pipeline120b
        if row is not None:
            c.rows.append(row)
            if row["result"] != "pass":
                return
    else:
        ckpt = checkpoint(c)
    name = f"fit: {size} shipped defaults on a {gib} GiB card"
    if c.skip("fit", name):
        return
    ov = [*base_overrides(c, ckpt, 1), f"cluster.gpu_memory_gib={gib}"]
    if size == "120b":
        ov = [*(o for o in ov if not o.startswith("model=")), "model=gpt_oss_120b"]
    row = launch(c, "fit", name, ov, stages="[train]", bench=False)
    config = Path(row["point"]) / "config.yaml"
    if config.is_file():  # what train.fit_memory chose, in the row's name (the table has no column for it)
        from gptoss_hpc.config import load_run_config

        cfg = load_run_config(config)
        t = cfg.train
        recompute = " recompute" if t.gradient_checkpointing else ""
        row["name"] += (
            f" (chose {cfg.model.experts_dtype} {t.per_device_train_batch_size}x{t.max_length} "
            f"x GA {t.gradient_accumulation_steps}{recompute})"
        )
        row["gpu_memory_gib"] = float(gib)


def _gpu_count(c: Check) -> int:
    if c.cpu:
        return 2
    import torch

    return torch.cuda.device_count()


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bash launchers/gpu_check.sh", description=__doc__.splitlines()[0])
    p.add_argument("phases", nargs="*", help=f"{', '.join(PHASES)}, knobs:A-B, or `table FILE.json ...`")
    p.add_argument("--cpu", action="store_true", help="CI-sized form: tiny checkpoint, CPU ranks")
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    p.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    p.add_argument("--budget-s", type=float, default=480.0, help="start no new run after this (default 480)")
    p.add_argument("--hard-s", type=float, default=560.0, help="end a run still going at this (default 560)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per train run (GPU 16, CPU 4)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Hydra override added to every run (and its bench), after the phase's own; repeatable",
    )
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the trainer's tok/s (GPU 4, CPU 1)")
    p.add_argument("--cap-gib", type=float, default=None, help="phase long: cap the GPU at this many GiB (H200 as 80)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["table"]:
        docs = [json.loads(Path(f).read_text()) for f in argv[1:]]
        rows = [r for d in docs for r in d["rows"]]
        print(table(rows))
        return 0 if all(r.get("result") == "pass" for r in rows) else 1
    args = _parse(argv)
    import tempfile

    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu_check."))).absolute()  # paths land in configs
    c = Check(
        cpu=args.cpu,
        work=work,
        budget_s=args.budget_s,
        hard_s=max(args.hard_s, args.budget_s),
        steps=args.steps or (4 if args.cpu else 16),
        warmup=args.warmup if args.warmup is not None else (1 if args.cpu else 4),
        started=time.time(),
        rows=[],
        extra=list(args.set),
        cap_gib=args.cap_gib,
    )
    env = environment(args.cpu)
    command = "bash launchers/gpu_check.sh " + " ".join(argv)
    phases = args.phases or list(DEFAULT_PHASES)
    try:
        for phase in phases:
            name, _, span = phase.partition(":")
            if name == "pipeline":
                phase_pipeline(c)
            elif name == "configs":
                phase_configs(c, bench="bench" in phases, span=span)
            elif name == "bench":
                if "configs" not in phases:
                    phase_bench(c, span)
            elif name == "2gpu":
                phase_2gpu(c)
            elif name == "fit":
                phase_fit(c, span)
            elif name == "long":
                phase_long(c, sys.executable, launch, base_overrides, checkpoint, span)
            elif name == "serve":
                phase_serve(c, span, checkpoint)
            elif name == "pipeline120b":
                phase_pipeline120b(c, launch, base_overrides, span)
            elif name == "knobs":
                lo, _, hi = (span or f"0-{len(GPU_KNOBS) - 1}").partition("-")
                phase_knobs(c, int(lo), int(hi or lo))
            else:
                print(f"unknown phase {phase!r}; choose from {', '.join(PHASES)} (knobs:A-B)", file=sys.stderr)
                return 2
    finally:
        print(write_results(args.out, c.rows, env, command), flush=True)
    return 0 if c.rows and all(r.get("result") == "pass" or r["result"].startswith("not run") for r in c.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
