"""MXFP4-resident experts against the bf16-dequantized model on the GPU: ``python -m gptoss_hpc.bench mxfp4``.

    python -m gptoss_hpc.bench mxfp4                                  # 20b architecture, 8 layers, train=fast
    python -m gptoss_hpc.bench mxfp4 model=gpt_oss_120b --layers 4 --json out.json

Builds the model with random MXFP4 experts on the device, and a second copy whose experts are the same weights
dequantized to bf16 (as transformers' loader gives them), both through the configured LoRA + speed knobs
(compiled experts core, compiled layers). One packed micro-batch: loss and LoRA gradients of the two, each
one's peak memory for forward + backward, and the time of one layer's compiled dequant (gate_up, down).
The CPU twin of this check is tests/test_mxfp4.py (fp32, exact to 1e-6).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _copy_weights(mx_model, bf_model) -> None:
    """bf_model gets mx_model's non-expert weights and LoRA, and its experts dequantized by transformers'
    ``convert_moe_packed_tensors`` (independent of ours; contiguous, as its loader leaves them)."""
    import torch
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from gptoss_hpc.modeling.mxfp4.experts import Mxfp4Experts

    mx_params = dict(mx_model.named_parameters())
    mx_modules = dict(mx_model.named_modules())
    with torch.no_grad():
        for name, p in bf_model.named_parameters():
            if name in mx_params:
                p.copy_(mx_params[name])
                continue
            owner, _, leaf = name.rpartition(".")
            experts = mx_modules.get(owner)
            if not isinstance(experts, Mxfp4Experts):
                raise RuntimeError(f"{name}: no counterpart in the MXFP4 model")
            blocks, scales = getattr(experts, f"{leaf}_blocks"), getattr(experts, f"{leaf}_scales")
            p.copy_(convert_moe_packed_tensors(blocks, scales, dtype=p.dtype))


def _step(model, knobs, batch, device: str) -> tuple[float, dict[str, Any], float | None]:
    import torch

    from gptoss_hpc.bench.train_setup import PREDICTED_ROWS, loss_of, sync_device, to_device

    for p in model.parameters():
        p.grad = None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    n_items = batch[PREDICTED_ROWS]
    loss = loss_of(model, knobs, to_device(batch, device), n_items)
    loss.backward()
    sync_device(device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads, peak


def _time_ms(fn) -> float:
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _dequant_ms(model, device: str) -> dict[str, Any]:
    """Per expert stack: each dequant (the shipped one, the Triton kernel at a few tile sizes, the torch.compile
    one) bit-compared with transformers' convert_moe_packed_tensors and timed (median of 10, CUDA events)."""
    import torch
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from gptoss_hpc.modeling.mxfp4.experts import Mxfp4Experts
    from gptoss_hpc.modeling.mxfp4.matmul import _dequantize, _dequantize_compiled

    experts = next(m for m in model.modules() if isinstance(m, Mxfp4Experts))
    variants = {"shipped": lambda b, s: _dequantize(b, s, torch.bfloat16),
                "compiled": lambda b, s: _dequantize_compiled(b, s, torch.bfloat16)}  # fmt: skip
    if device.startswith("cuda"):
        from gptoss_hpc.modeling.mxfp4.dequant_triton import dequantize_mxfp4_bf16

        for rows, warps in ((128, 4), (256, 4), (256, 8), (512, 8)):
            variants[f"triton_{rows}x{warps}"] = lambda b, s, r=rows, w=warps: dequantize_mxfp4_bf16(
                b, s, block_rows=r, num_warps=w
            )
    out: dict[str, Any] = {}
    for name in ("gate_up_proj", "down_proj"):
        blocks, scales = getattr(experts, f"{name}_blocks"), getattr(experts, f"{name}_scales")
        ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16).contiguous().view(torch.int16)
        moved = blocks.numel() + scales.numel() + blocks.numel() * 4  # uint8 read + bf16 written
        for label, fn in variants.items():
            equal = bool(torch.equal(fn(blocks, scales).contiguous().view(torch.int16), ref))
            key = name if label == "shipped" else f"{name}_{label}"
            out[f"{key}_bit_equal_to_transformers"] = equal
            if device.startswith("cuda"):
                ms = _time_ms(lambda fn=fn, b=blocks, s=scales: fn(b, s))
                out[f"{key}_ms"] = round(ms, 3)
                out[f"{key}_GBps"] = round(moved / ms / 1e6)
        del ref
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptoss_hpc.bench mxfp4", description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides on top of train=fast")
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the checked model")
    p.add_argument("--tokens", type=int, default=8192, help="tokens of the packed micro-batch")
    p.add_argument("--device", default="cuda")
    p.add_argument("--vocab", type=int, default=None, help="override the vocab size (CPU smoke runs)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from gptoss_hpc.bench.train import _compose
    from gptoss_hpc.bench.train_setup import micro_batches, prepare

    base = [
        "train=fast",
        f"model.num_hidden_layers={args.layers}",
        f"train.max_length={args.tokens}",
        "train.per_device_train_batch_size=1",
        *args.overrides,
    ]
    mx_cfg = _compose([*base, "model.experts_dtype=mxfp4"])
    bf_cfg = _compose([*base, "model.experts_dtype=bfloat16"])
    row: dict[str, Any] = {"name": "check mxfp4 vs bf16-dequantized", "model": mx_cfg.model.name_or_path}
    row.update(layers=args.layers, tokens=args.tokens, lora=mx_cfg.lora.target_modules or "experts")
    try:
        mx_model, mx_knobs = prepare(mx_cfg, args.device, vocab_size=args.vocab)
        bf_model, bf_knobs = prepare(bf_cfg, args.device, vocab_size=args.vocab)
        _copy_weights(mx_model, bf_model)
        vocab = mx_model.get_base_model().config.vocab_size
        (batch,) = micro_batches(mx_cfg, random.Random(0), vocab, 1, "lognormal")
        results = {}
        for label, model, knobs in (("mxfp4", mx_model, mx_knobs), ("bf16", bf_model, bf_knobs)):
            _step(model, knobs, batch, args.device)  # compiles
            results[label] = _step(model, knobs, batch, args.device)
        (mx_loss, mx_grads, mx_peak), (bf_loss, bf_grads, bf_peak) = results["mxfp4"], results["bf16"]
        errs = {n: _rel(mx_grads[n], g) for n, g in bf_grads.items()}
        worst = max(errs, key=errs.get)
        row.update(
            status="ok",
            loss_mxfp4=round(mx_loss, 6),
            loss_bf16=round(bf_loss, 6),
            loss_rel_err=abs(mx_loss - bf_loss) / abs(bf_loss),
            lora_grad_rel_err_max=errs[worst],
            lora_grad_worst=worst,
            lora_params=len(errs),
            peak_gib_mxfp4=mx_peak and round(mx_peak, 2),
            peak_gib_bf16=bf_peak and round(bf_peak, 2),
            knobs=mx_knobs.summary(),
            dequant=_dequant_ms(mx_model, args.device),
        )
    except Exception as exc:  # report, do not lose the JSON
        import traceback

        traceback.print_exc()
        row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500])
    print(json.dumps(row, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(row, indent=1))
    return 0 if row["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
