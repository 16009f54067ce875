"""Phase ``long`` of the GPU check (issue 27): long reasoning rows, in parts that each fit one 10-minute command.

    bash launchers/gpu_check.sh long:attn                 # attention at 32k vs the exact reference + mask builder
    bash launchers/gpu_check.sh long:bench:16384,32768    # bench train rows, one row of L tokens per micro-batch
    bash launchers/gpu_check.sh long:bench:65536,131072
    bash launchers/gpu_check.sh long:train:mix            # the train stage, shipped defaults, 9/10 short + 8k-32k
    bash launchers/gpu_check.sh long:train:128k           # the train stage, rows of 120k-127k tokens
    bash launchers/gpu_check.sh --cap-gib 80 long:train:128k   # on the H200, as an 80 GB card
    bash launchers/gpu_check.sh --cpu long                # CI-sized: tiny model, CPU (tests/test_gpu_check.py)

Each row: tok/s (bench: the timed steps; train: the median step after --warmup), peak GiB allocated (and the
nvidia-smi peak, ~reserved + context), the memory plan's GiB (gptoss_hpc.config.memory.train_estimate of the
same config), useful MFU with attention FLOPs (gptoss_hpc.config.flops), and the cold start: seconds from the
command's start to the end of the first steady step, with empty inductor/Triton caches (``cold_caches``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from gptoss_hpc.bench.gpu_check_parts import result_of, run_sampled
from gptoss_hpc.bench.long_rows import write_long_rows

PARTS = ("attn", "bench", "train")
BENCH_LENGTHS = (16384, 32768, 65536, 131072)
# the bench setting for long rows: one row per micro-batch, MXFP4-resident experts, recompute
BENCH_OVERRIDES = ["model.experts_dtype=mxfp4", "train.gradient_checkpointing=true"]


def _arch_and_plan(overrides: list[str], cfg=None) -> tuple[Any, float | None]:
    from gptoss_hpc.config import compose, to_run_config
    from gptoss_hpc.config.memory import arch_for, train_estimate

    cfg = cfg if cfg is not None else to_run_config(compose(overrides))
    arch = arch_for(cfg)
    return arch, (round(train_estimate(cfg, arch).allocated, 1) if arch is not None else None)


def _mfu(arch, doc_lengths: list[int], tok_s: float | None, card: str | None) -> float | None:
    from gptoss_hpc.config.flops import mfu

    if arch is None or not tok_s or not doc_lengths:
        return None
    return round(mfu(arch, doc_lengths, sum(doc_lengths) / tok_s, card), 3)


def cold_caches(c, tag: str):
    """Runs started inside see empty inductor and Triton caches of their own: the cold start is measured cold even
    on a machine kept warm from an earlier command (which keeps /tmp and with it the default caches)."""
    from unittest import mock

    root = c.work / "caches" / tag
    return mock.patch.dict(
        os.environ, {"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"), "TRITON_CACHE_DIR": str(root / "triton")}
    )


def part_attn(c, python: str) -> None:
    out = c.work / "long_check.json"
    keep = [o for o in c.extra if o.split("=")[0].split(".")[0] in ("model", "train", "lora")]
    cmd = [python, "-m", "gptoss_hpc.bench", "long_check", *keep, "--json", str(out)]
    if c.cpu:
        cmd += ["--device", "cpu", "--tokens", "512", "--layers", "2", "--vocab", "512"]  # mask builder: a slow test
    else:
        # fp32, 2 layers (sliding, full): ~40-60 GiB at 32k; --set model.num_hidden_layers=4 for four
        cmd += ["--tokens", "32768", "--layers", "2", "--mask-lengths", "16384,32768,65536,131072,98304"]
    r = run_sampled(cmd, env=c.env(), log=c.work / "logs" / "long_check.log", timeout_s=c.hard_left(), label="attn")
    row: dict[str, Any] = {"phase": "long", "name": "attention vs exact reference", "wall_s": round(r.wall_s, 1)}
    try:
        got = json.loads(out.read_text())
        check = got["check"]
        ok = r.rc == 0 and check["status"].startswith(("pass", "reported"))
        row["result"] = "pass" if ok else f"FAIL ({check['status']})"
        row["name"] += (
            f" ({check['tokens']} tokens, {check['layers']} layers, {check['attn']} {check['dtype']}: loss rel "
            f"{check['loss_rel_err']:.1e}, LoRA grad rel {check['grad_rel_err']:.1e}, max abs "
            f"{check['grad_max_abs_err']:.1e})"
        )
        row["peak_gpu_gib"] = check.get("peak_alloc_gib")
        row.update(long_check=check, mask_builder=got.get("mask_builder"))
    except (OSError, ValueError, KeyError):
        row["result"] = result_of(r.rc or 1)
        row["log_tail"] = r.tail
    c.rows.append(row)


def part_bench(c, python: str, span: str) -> None:
    lengths = [int(x) for x in span.split(",") if x] or ([256] if c.cpu else list(BENCH_LENGTHS))
    for n in lengths:
        name = f"bench train: one {n:,}-token row per micro-batch"
        if c.skip("long", name):
            continue
        ov = [*BENCH_OVERRIDES, "train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=1"]
        ov += [f"train.max_length={n}", *(o for o in c.extra if o.split("=")[0].split(".")[0] in ("model", "train"))]
        if c.cpu:
            ov = ["model=tiny_gpt_oss", "model.tokenizer=tiny-bpe", "model.experts_dtype=bfloat16", *ov[1:]]
        out = c.work / f"long-bench-{n}.json"
        cmd = [python, "-m", "gptoss_hpc.bench", "train", *ov, "--lengths", "full", "--steps", "2", "--warmup", "1"]
        cmd += ["--no-peak", "--json", str(out)]
        if c.cpu:
            cmd += ["--device", "cpu", "--vocab", "4096", "--steps", "1"]
        if c.cap_gib:
            cmd += ["--cap-gib", str(c.cap_gib)]
        r = run_sampled(cmd, env=c.env(), log=c.work / "logs" / f"{out.stem}.log", timeout_s=c.hard_left())
        row: dict[str, Any] = {
            "phase": "long",
            "name": name,
            "wall_s": round(r.wall_s, 1),
            "command": " ".join(cmd[1:]),
        }
        try:
            got = json.loads(out.read_text())
            bench = got["rows"][0]
        except (OSError, ValueError, KeyError, IndexError):
            bench = {}
        if r.rc != 0 or bench.get("status") != "ok":
            row.update(result=result_of(r.rc or 1), error=bench.get("error"), log_tail=r.tail)
            c.rows.append(row)
            continue
        arch, plan = _arch_and_plan(ov)
        docs = [n] * max(1, bench["tokens_per_step"] // n)
        row.update(
            result="pass",
            bench_tok_s=bench["tok_s"],
            peak_gpu_gib=bench.get("peak_alloc_gib"),
            bench_peak_gib=bench.get("peak_reserved_gib"),
            plan_gib=plan,
            mfu=_mfu(arch, docs, bench["tok_s"], got["env"].get("card")),
            # command start to the end of the warm-up step (imports, build, compile), empty compile caches
            cold_start_s=round(r.wall_s - bench["step_s"] * (1 if c.cpu else 2), 1),
            overrides=ov,
        )
        row["name"] += (
            f" (peak {row['peak_gpu_gib']} GiB alloc / {row['bench_peak_gib']} reserved, plan {plan} GiB, "
            f"MFU {row['mfu']}, cold start {row['cold_start_s']} s)"
        )
        c.rows.append(row)


def _data(c, kind: str) -> tuple[Path, list[int]]:
    path = c.work / f"long-{kind}.jsonl"
    if c.cpu:  # the tiny model's scale: rows of ~10 words and some of 80-330, or rows of ~1.2k
        lengths = write_long_rows(path, kind, rows=20 if kind == "mix" else 2, scale=0.01)
    else:
        lengths = write_long_rows(path, kind)
    return path, lengths


def part_train(c, python: str, launch, base_overrides, checkpoint, span: str) -> None:
    """The train stage with the shipped defaults on the synthetic 20b checkpoint and a long-row set: no
    train.max_length (the default follows the data)."""
    kinds = [k for k in span.split(",") if k] or (["mix"] if c.cpu else ["mix", "128k"])
    ckpt = checkpoint(c)
    for kind in kinds:
        name = f"train stage, shipped defaults, long rows: {kind}"
        if c.skip("long", name):
            continue
        data, lengths = _data(c, kind)
        ov = [o for o in base_overrides(c, ckpt, 1) if not o.startswith(("data.path=", "train.max_length="))]
        ov += [f"data.path={data}", "data.eval_fraction=0"]
        if c.cpu:  # the tiny stand-in's rows (<= ~400 tokens) in 2 x 512-token micro-batches: CPU-sized steps
            ov.append("train.max_length=512")
        if c.cap_gib:
            ov.append(f"cluster.gpu_memory_gib={c.cap_gib}")
        started = time.time()
        with cold_caches(c, f"train-{kind}"):
            row = launch(c, "long", name, ov, stages="[train]", bench=False)
        _train_facts(c, row, Path(row["point"]), lengths, started)


def _train_facts(c, row: dict[str, Any], point: Path, lengths: list[int], started: float) -> None:
    """Plan GiB, MFU over the set's length profile and the cold start (command start to the first steady step)."""
    config = point / "config.yaml"
    if not config.is_file():
        return
    from gptoss_hpc.config import load_run_config

    cfg = load_run_config(config)
    arch, plan = _arch_and_plan([], cfg)
    kept = [n for n in lengths if n <= cfg.train.max_length] or lengths
    row.update(plan_gib=plan, train_max_length=cfg.train.max_length, rows_over_max_length=len(lengths) - len(kept))
    card = None if c.cpu else _card()
    row["mfu"] = _mfu(arch, kept, row.get("train_tok_s"), card)
    times = _metric_times(point)
    first = next((t for step, t in times if step >= c.warmup), None)
    row["cold_start_s"] = round(first - started, 1) if first else None  # to the end of step --warmup
    row["first_step_s"] = round(times[0][1] - started, 1) if times else None  # to the end of the first step
    row["name"] += (
        f" (max_length {cfg.train.max_length}, peak {row.get('peak_gpu_gib')} GiB alloc / {row.get('smi_peak_gib')} "
        f"nvidia-smi, plan {plan} GiB, MFU {row['mfu']}, cold start {row['cold_start_s']} s)"
    )


def _metric_times(point: Path) -> list[tuple[int, float]]:
    out = []
    path = point / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        rec = json.loads(line)
        if "time" in rec and "step" in rec and "loss" in rec:
            out.append((int(rec["step"]), float(rec["time"])))
    return out


def _card() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def phase_long(c, python: str, launch, base_overrides, checkpoint, span: str) -> None:
    """``long``, ``long:attn``, ``long:bench[:L1,L2]``, ``long:train[:mix|128k]`` (see the module doc)."""
    part, _, rest = span.partition(":")
    if part and part not in PARTS:
        raise SystemExit(f"phase long:{span}: use long, long:attn, long:bench[:L,...] or long:train[:mix|128k]")
    if part in ("", "attn"):
        part_attn(c, python)
    if part in ("", "bench"):
        part_bench(c, python, rest)
    if part in ("", "train"):
        part_train(c, python, launch, base_overrides, checkpoint, rest)
