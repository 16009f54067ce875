"""Per-GPU memory estimate of each stage of a config, before anything is submitted.

    python -m gptoss_hpc.plan                                         # the default config
    python -m gptoss_hpc.plan model=gpt_oss_120b cluster=coreweave_h100 train=fast
    python -m gptoss_hpc.plan cluster.gpu_memory_gib=24 model.experts_dtype=mxfp4 train.per_device_train_batch_size=1
    python -m gptoss_hpc.plan --fits                                  # README's "what fits where" table
    python -m gptoss_hpc.plan --lengths 16384,32768,65536,131072      # one long row: what fits, per card

The numbers come from gptoss_hpc.config.memory (weights by dtype, LoRA + optimizer, activations, logits, MXFP4
dequant buffer, workspace; calibrated on H100/H200 measurements). `card` adds fragmentation and the CUDA
context to the allocated peak; `fits` compares it with cluster.gpu_memory_gib. Exit status 1 when the train
stage does not fit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gptoss_hpc.config import derive
from gptoss_hpc.config.memory import USABLE, Estimate, arch_for, estimate_stages, gpu_memory_gib, train_estimate

CARDS = (24, 48, 80, 141)


def _compose(overrides: list[str]):
    from gptoss_hpc.config import compose, to_run_config

    return to_run_config(compose(overrides))


def format_table(estimates: list[Estimate]) -> str:
    keys: list[str] = []
    for e in estimates:
        keys += [k for k in e.parts if k not in keys]
    head = ["stage", *keys, "allocated", "card", "capacity", "fits", "note"]
    rows = [head]
    for e in estimates:
        cap = f"{e.capacity_gib * USABLE:.1f}" if e.capacity_gib else "-"
        fits = {True: "yes", False: "NO", None: "?"}[e.fits]
        parts = [f"{e.parts[k]:.1f}" if k in e.parts else "" for k in keys]
        rows.append([e.stage, *parts, f"{e.allocated:.1f}", f"{e.card:.1f}", cap, fits, e.note])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r[:-1], widths, strict=True)) + " | " + r[-1] for r in rows]
    return "\n".join(lines)


def _fit_cell(found) -> str:
    """``fastest_fit``'s choice as a table cell: experts dtype, micro-batch, recompute/offload, card GiB (+ host)."""
    if found is None:
        return "does not fit"
    _, _, cfg, est = found
    t = cfg.train
    dtype = "bf16" if cfg.model.experts_dtype == "bfloat16" else cfg.model.experts_dtype
    knobs = (" recompute" if t.gradient_checkpointing else "") + (
        " offload" if t.gradient_checkpointing_offload else ""
    )
    host = f" +{est.note.split()[0]}" if est.note else ""
    return f"{dtype} {t.per_device_train_batch_size}x{derive.max_length(t)}{knobs} ({est.card:.0f}{host})"


def fits_table(base: list[str], lora: str = "experts") -> str:
    """For gpt-oss-20b and -120b and each card size: the setting train.fit_memory would train with (the fastest
    candidate of gptoss_hpc.config.fit whose train stage fits)."""
    from gptoss_hpc.config.fit import fastest_fit

    lines = [f"LoRA `{lora}`, train=default (16k tokens per optimizer step), GiB of one GPU: fastest setting that fits"]
    lines += ["", "| model | " + " | ".join(f"{c} GB" for c in CARDS) + " |", "|---|" + "---|" * len(CARDS)]
    for model in ("gpt_oss_20b", "gpt_oss_120b"):
        base_cfg = _compose([f"model={model}", f"lora={lora}", "train=default", *base])
        arch = arch_for(base_cfg)
        cells = [_fit_cell(fastest_fit(base_cfg, arch, card)) for card in CARDS]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lengths_table(base: list[str], lengths: list[int]) -> str:
    """For each row length and card size: what train.fit_memory trains one such row with (max_length=auto, one row
    per micro-batch) and its planned GiB; the step tokens per GPU follow from the reference rows
    (gptoss_hpc.config.lengths.with_length)."""
    from gptoss_hpc.config.fit import fastest_fit
    from gptoss_hpc.config.lengths import with_length

    base_cfg = _compose(base)
    arch = arch_for(base_cfg)
    if arch is None:
        return f"no architecture known for model.name_or_path={base_cfg.model.name_or_path}"
    lines = [
        f"{base_cfg.model.name_or_path}, LoRA r={base_cfg.lora.r} on "
        f"{base_cfg.lora.expert_params or base_cfg.lora.target_modules}: "
        "the fastest setting that fits one row of each length (card GiB in brackets; host GiB of offloaded "
        "checkpoints after a +)",
        "",
        "| row tokens | " + " | ".join(f"{c} GB" for c in CARDS) + " |",
        "|---|" + "---|" * len(CARDS),
    ]
    for length in lengths:
        cfg = with_length(base_cfg, length, ())
        if length > arch.max_position_embeddings:
            cells = [f"over the context ({arch.max_position_embeddings:,})"] * len(CARDS)
        else:
            cells = [_fit_cell(fastest_fit(cfg, arch, card)) for card in CARDS]
        lines.append(f"| {length:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(paths: list[str]) -> str:
    """Bench rows (``bench train --json``) beside the plan's train estimate for the same overrides."""
    import json

    lines = [
        "| stack | micro-batch x GA | tok/s | measured peak GiB | plan GiB | plan error |",
        "|---|---|---|---|---|---|",
    ]
    for path in paths:
        for row in json.loads(Path(path).read_text())["rows"]:
            if "overrides" not in row:
                continue
            cfg = _compose(row["overrides"])
            est = train_estimate(cfg, arch_for(cfg))
            measured = row.get("peak_alloc_gib")
            err = f"{100 * (est.allocated - measured) / measured:+.1f}%" if measured else row.get("status", "")
            mb = f"{row.get('micro_batch', '')} x {row.get('grad_accum', '')}"
            lines.append(
                f"| {row['name']} | {mb} | {row.get('tok_s', '-')} | {measured if measured else '-'} | "
                f"{est.allocated:.1f} | {err} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptoss_hpc.plan", description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m gptoss_hpc.launch")
    p.add_argument("--fits", action="store_true", help="print the what-fits-where table (20b/120b x card sizes)")
    p.add_argument("--lora", default="experts", help="LoRA preset for --fits (default experts)")
    p.add_argument("--compare", nargs="+", metavar="JSON", help="bench train --json files: measured vs estimated")
    p.add_argument(
        "--lengths",
        metavar="N,N,...",
        help="row lengths in tokens (e.g. 16384,32768,65536,131072): the setting that fits each, per card size",
    )
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.lengths:
        try:
            lengths = [int(x.replace("k", "000").replace("K", "000")) for x in args.lengths.split(",") if x]
        except ValueError:
            p.error(f"--lengths {args.lengths!r}: give token counts separated by commas, e.g. 16384,32768")
        print(lengths_table(args.overrides, lengths))
        return 0
    if args.compare:
        print(compare(args.compare))
        return 0
    if args.fits:
        print(fits_table(args.overrides, args.lora))
        return 0
    from gptoss_hpc.config.disk import point_disk_gib
    from gptoss_hpc.config.fit import fit_to_card

    cfg, fitted = fit_to_card(_compose(args.overrides), args.overrides)  # what the launcher would train
    capacity = gpu_memory_gib(cfg)
    estimates = estimate_stages(cfg, capacity)
    if not estimates:
        print(f"no architecture known for model.name_or_path={cfg.model.name_or_path}: no estimate", file=sys.stderr)
        return 2
    t = cfg.train
    print(
        f"{cfg.model.name_or_path} experts={cfg.model.experts_dtype} lora r={cfg.lora.r} micro-batch "
        f"{t.per_device_train_batch_size}x{derive.max_length(t)} recompute={t.gradient_checkpointing} "
        f"compiled layers={cfg.model.compile_layers} gpu_memory_gib={capacity if capacity is not None else 'unknown'}"
    )
    print(format_table(estimates))
    disk = point_disk_gib(cfg)
    if disk:
        print("disk under run_root per point: " + ", ".join(f"{k} {v:,.1f} GiB" for k, v in disk.items()))
    if fitted:
        print(fitted)
    return 1 if estimates[0].fits is False else 0


if __name__ == "__main__":
    sys.exit(main())
