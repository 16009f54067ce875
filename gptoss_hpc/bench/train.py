"""Training throughput of the project's LoRA path on one GPU: ``python -m gptoss_hpc.bench train``.

    python -m gptoss_hpc.bench train                          # the configured (default) stack, `experts` preset
    python -m gptoss_hpc.bench train --reference --check      # + eager/eager and stock flex/grouped_mm rows,
                                                              #   + loss/grad check of the fast path vs stock
    python -m gptoss_hpc.bench train --presets experts,attention,all_linear --json out.json
    python -m gptoss_hpc.bench train train.loss_chunk_tokens=0 --steps 5   # any Hydra override

It composes the run config, builds the real architecture of the selected model (gptoss_hpc/resources/
gpt_oss_{20b,120b}_config.json: the Hub's config values) with random bf16 weights on the GPU, applies the
configured LoRA (gptoss_hpc.modeling.lora.build_lora_config) and speed knobs (gptoss_hpc.modeling.fast), and
times optimizer steps (forward, loss, backward, grad clip, AdamW) on synthetic token batches: sequence
lengths log-normal (median 1024) clipped to [256, train.max_length], 30% of each masked as prompt, packed
(train.packing / padding_free: first-fit-decreasing into rows of max_length, one flattened row of
per_device_train_batch_size rows per micro-batch) or padded to the longest sequence of the micro-batch.

tok/s counts real (non-pad) tokens. MFU = 4 * active matmul params * tok/s / the card's bf16 matmul rate
measured in the same run (8192^3). The trainer itself (TRL) is not in the timed loop: its collator and loss
are what the knobs replace.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from gptoss_hpc.bench.train_env import environment, measure_peak_tflops, print_table
from gptoss_hpc.bench.train_setup import (  # noqa: F401  (re-exported for tests)
    PREDICTED_ROWS,
    active_matmul_params,
    aux_loss_coef,
    build_model,
    is_cuda,
    loss_of,
    make_sequence,
    micro_batches,
    model_config_json,
    prepare,
    preset_name,
    sync_device,
    synthetic_lengths,
    to_device,
    train_loss_of,
)

PRESETS = ("experts", "attention", "all_linear")
_STOCK = [
    "model.fused_experts=false",
    "model.compile_layers=false",
    "train.no_grad_below_first_lora=false",
    "train.loss_chunk_tokens=0",
    "train.packing=false",
    "train.padding_free=false",
    "train.gradient_checkpointing=true",
    "train.per_device_train_batch_size=2",
    # the recipe's 8; tok/s does not depend on it (the optimizer step of ~11M LoRA params is negligible)
    "train.gradient_accumulation_steps=2",
]
REFERENCE_STACKS = {
    "ref eager/eager (2025 stack)": [
        *_STOCK,
        "model.attn_implementation=eager",
        "model.experts_implementation=eager",
    ],
    "ref flex/grouped_mm stock": [
        *_STOCK,
        "model.attn_implementation=flex_attention",
        "model.experts_implementation=grouped_mm",
    ],
}


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gptoss_hpc.bench train", description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. lora=attention train.max_length=4096")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per stack (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation) (default 2)")
    p.add_argument("--json", type=Path, default=None, help="write all rows here")
    p.add_argument("--reference", action="store_true", help="also time the eager/eager and stock stacks")
    p.add_argument("--reference-steps", type=int, default=1, help="timed steps for reference stacks")
    p.add_argument("--presets", default="experts", help="comma list of LoRA presets for the configured stack")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="extra stack: a name and space-separated overrides on top of the config (repeatable)",
    )
    p.add_argument("--check", action="store_true", help="loss/grad of each knob vs eager attention (math)")
    p.add_argument("--check-tokens", type=int, default=2048, help="packed row length of the check batch")
    p.add_argument("--check-layers", type=int, default=8, help="decoder layers of the checked model")
    p.add_argument("--check-presets", default=None, help="presets to --check (default: all of --presets)")
    p.add_argument("--profile", type=Path, default=None, help="torch.profiler table of one configured step")
    p.add_argument("--lengths", choices=["lognormal", "full"], default="lognormal")
    p.add_argument("--ladder", default=None, metavar="A-B", help="rows A..B of the knob ladder (e.g. 0-5)")
    p.add_argument("--no-configured", action="store_true", help="skip the configured rows (checks still run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--vocab", type=int, default=None, help="override the vocab size (CPU smoke runs)")
    p.add_argument("--no-peak", action="store_true", help="skip measuring the matmul peak")
    p.add_argument("--cap-gib", type=float, default=None, help="cap the CUDA allocator here (an 80 GB card on an H200)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------
def run_stack(
    name: str,
    cfg,
    args,
    device: str,
    peak_tflops: float | None,
    steps: int,
    profile: Path | None = None,
    lengths: str | None = None,
):
    import random

    import torch

    t = cfg.train
    row: dict[str, Any] = {
        "name": name,
        "lora": preset_name(cfg),
        "attn": cfg.model.attn_implementation,
        "experts": cfg.model.experts_implementation,
        "fused_experts": cfg.model.fused_experts,
        "grad_ckpt": t.gradient_checkpointing,
        "no_grad_below_first_lora": t.no_grad_below_first_lora,
        "loss_chunk_tokens": t.loss_chunk_tokens,
        "packing": bool(t.packing or t.padding_free),
        "micro_batch": f"{t.per_device_train_batch_size}x{t.max_length}",
        "grad_accum": t.gradient_accumulation_steps,
        "lengths": lengths or args.lengths,
    }
    model = knobs = opt = None
    if is_cuda(device):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        t0 = time.perf_counter()
        model, knobs = prepare(cfg, device, vocab_size=args.vocab)
        row["build_s"] = round(time.perf_counter() - t0, 1)
        row["knobs"] = knobs.summary()
        row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        from gptoss_hpc.modeling.fast import lowest_trainable_layer, unwrap

        row["first_trainable_layer"] = lowest_trainable_layer(model)
        config = unwrap(model).config
        active = active_matmul_params(config)
        row["active_params"] = active
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay)
        rng = random.Random(args.seed)
        ga = t.gradient_accumulation_steps
        aux_coef = aux_loss_coef(cfg, config)
        row["router_aux_loss_coef"] = aux_coef
        total = args.warmup + steps
        data = micro_batches(cfg, rng, config.vocab_size, ga * total, lengths or args.lengths)
        times, tokens, padded, losses = [], [], [], []
        prof_ctx = contextlib.nullcontext()
        for step in range(total):
            chunk = data[step * ga : (step + 1) * ga]
            n_items = sum(mb[PREDICTED_ROWS] for mb in chunk)
            if profile is not None and step == total - 1:
                from torch.profiler import ProfilerActivity
                from torch.profiler import profile as torch_profile

                from gptoss_hpc.modeling.profiling import SyncStacks, sync_lines

                prof_ctx = torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                syncs = SyncStacks().start()  # the train stage's profile.md lists the same
            sync_device(device)
            start = time.perf_counter()
            with prof_ctx as prof:
                step_loss = 0.0
                for mb in chunk:
                    loss = train_loss_of(model, knobs, to_device(mb, device), n_items, aux_coef, ga)
                    loss.backward()
                    step_loss += float(loss.detach())
                torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync_device(device)
            elapsed = time.perf_counter() - start
            if step < args.warmup:  # compilation: the cold start of a new length
                row["warmup_s"] = round(row.get("warmup_s", 0.0) + elapsed, 1)
            else:
                times.append(elapsed)
                tokens.append(sum(mb["real_tokens"] for mb in chunk))
                padded.append(sum(mb["padded_tokens"] for mb in chunk))
                losses.append(step_loss)
            if profile is not None and step == total - 1:
                avg = prof.key_averages()
                table = avg.table(sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=90)
                ops = avg.table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=90)
                profile.parent.mkdir(parents=True, exist_ok=True)
                counts = syncs.stop()
                head = "\n".join(sync_lines(counts, 1)) + "\n\n" if counts is not None else ""
                profile.write_text(head + table + "\n\n" + ops)
                print(table[:7000])
        step_s = statistics.median(times)
        tok = statistics.mean(tokens)
        row.update(
            status="ok",
            step_s=round(step_s, 3),
            tokens_per_step=int(tok),
            padded_tokens_per_step=int(statistics.mean(padded)),
            tok_s=round(tok / step_s),
            loss=round(losses[-1], 4),
        )
        if is_cuda(device):
            row["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
            row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 1)
        if peak_tflops:
            row["mfu"] = round(4 * active * row["tok_s"] / (peak_tflops * 1e12), 3)
    except torch.OutOfMemoryError as exc:
        row.update(status="OOM", error=str(exc).splitlines()[0][:200])
    except Exception as exc:  # one broken stack must not lose the others' numbers
        import traceback

        traceback.print_exc()
        row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        if knobs is not None:
            knobs.remove()
        del model, knobs, opt
        gc.collect()
        if is_cuda(device):
            torch.cuda.empty_cache()
        _fresh_compile_state()
    print(json.dumps(row), flush=True)
    return row


def _fresh_compile_state() -> None:
    """Each stack starts with no compiled code from the ones before it (it compiles its own): a stack timed after
    compiled stacks in one process ran slower than in its own (2026-11-25, before this reset; the reset itself
    was not measured on a GPU)."""
    import torch

    from gptoss_hpc.modeling.fast import _COMPILED

    _COMPILED.clear()
    torch._dynamo.reset()


def ladder(cfg) -> list[tuple[str, Any]]:
    """The configured stack built up one knob at a time from the stock stack (packed data throughout)."""
    from dataclasses import replace

    t, m = cfg.train, cfg.model
    cur_t = replace(
        t,
        packing=True,
        loss_chunk_tokens=0,
        no_grad_below_first_lora=False,
        gradient_checkpointing=True,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=max(1, t.per_device_train_batch_size * t.gradient_accumulation_steps // 2),
    )
    cur_m = replace(m, fused_experts=False, compile_layers=False)
    steps = [("L0 stock stack, packed", {}, {})]
    if t.loss_chunk_tokens:
        steps.append(("L1 + chunked lm_head/CE", {"loss_chunk_tokens": t.loss_chunk_tokens}, {}))
    if t.no_grad_below_first_lora:
        steps.append(("L2 + no autograd below 1st LoRA layer", {"no_grad_below_first_lora": True}, {}))
    if not t.gradient_checkpointing:
        steps.append(("L3 + no grad checkpointing", {"gradient_checkpointing": False}, {}))
    if m.fused_experts:
        steps.append(("L4 + fused (compiled) experts", {}, {"fused_experts": True}))
    if m.compile_layers:
        steps.append(("L5 + compiled decoder layers", {}, {"compile_layers": True}))
    out = []
    for name, dt, dm in steps:
        cur_t, cur_m = replace(cur_t, **dt), replace(cur_m, **dm)
        out.append((name, replace(cfg, train=cur_t, model=cur_m)))
    return out


# ----------------------------------------------------------------------------------------------------------
def _compose(overrides: list[str]):
    from gptoss_hpc.config import compose, to_run_config

    return to_run_config(compose(overrides))


def main(argv: list[str] | None = None) -> int:
    from gptoss_hpc.bench.train_check import check, check_attention_core, check_experts_core

    args = _parse(list(sys.argv[1:] if argv is None else argv))
    import torch

    device = args.device
    if is_cuda(device) and not torch.cuda.is_available():
        print(
            "no CUDA device: the training bench needs a GPU (tests/test_fast_path.py covers the CPU path)",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    env = environment()
    print(json.dumps(env), flush=True)
    if args.cap_gib and is_cuda(device):
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib / total), device)
    peak = None if args.no_peak or not is_cuda(device) else measure_peak_tflops(device)
    env["bf16_matmul_tflops"] = round(peak, 1) if peak else None
    rows: list[dict[str, Any]] = []
    result = {"env": env, "command": "python -m gptoss_hpc.bench train " + " ".join(argv or sys.argv[1:]), "rows": rows}

    def save():
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))

    base = list(args.overrides)
    checks = []
    for i, preset in enumerate(p for p in args.presets.split(",") if p):
        cfg = _compose([f"lora={preset}", *base])
        prof = args.profile if i == 0 else None
        if not args.no_configured:
            rows.append(run_stack("configured (GPU defaults)", cfg, args, device, peak, args.steps, prof))
            rows[-1]["overrides"] = [f"lora={preset}", *base]  # for `python -m gptoss_hpc.plan --compare`
            save()
        if args.check and (args.check_presets is None or preset in args.check_presets.split(",")):
            checks.append((i, cfg))
    if args.ladder:
        lo, _, hi = args.ladder.partition("-")
        steps = ladder(_compose(base))
        for name, cfg in steps[int(lo) : int(hi or lo) + 1]:
            rows.append(run_stack(name, cfg, args, device, peak, args.steps))
            save()
    for name_spec in args.variant:
        name, _, spec = name_spec.partition("=")
        rows.append(run_stack(name, _compose([*base, *spec.split()]), args, device, peak, args.steps))
        rows[-1]["overrides"] = [*base, *spec.split()]
        save()
    if args.reference:
        # The FACTS.md setup: every sequence max_length long (no padding), the best case for the stock stacks.
        for name, extra in REFERENCE_STACKS.items():
            cfg = _compose([*base, *extra])
            rows.append(run_stack(name, cfg, args, device, peak, args.reference_steps, lengths="full"))
            save()
    # Checks last: after their many fp32/bf16 compiles, later timed stacks of the same process ran slower (the
    # attention preset: 14.7k tok/s after them, 20.6k in a process without them; 2026-11-25).
    for i, cfg in checks:
        if i == 0 and is_cuda(device):
            rows.append(check_attention_core(device))
            rows.append(check_experts_core(cfg, device))
        rows.append(check(cfg, args, device))
        save()
    print_table(rows)
    for c in (r for r in rows if r["name"] == "check fast vs stock" and r.get("status") == "ok"):
        for dtype in ("float32", "bfloat16"):
            for key, v in c[dtype].items():
                if isinstance(v, dict) and "grad_rel_err" in v:
                    print(
                        f"check {c['lora']:>10} {dtype:>8} {key:>32}: loss rel err {v['loss_rel_err']:.1e}, "
                        f"LoRA grad rel err {v['grad_rel_err']:.1e} (worst {v['worst_param_rel_err']:.1e})"
                    )
    for c in (r for r in rows if r["name"] == "check experts core" and r.get("status") == "ok"):
        for kind in ("stock", "eager", "compiled"):
            print(f"check experts core {kind:>8} vs fp32: {c[kind]}")
    for c in (r for r in rows if r["name"] == "check attention core" and r.get("status") == "ok"):
        for kind in ("eager", "flex", "flex_in_compile"):
            print(f"check attention core {kind:>15} vs fp32 eager: {c[kind]}")
    save()
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
