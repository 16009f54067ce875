"""Is attention exact at long range? ``python -m gptoss_hpc.bench long_check`` (issue 27, item 3).

    python -m gptoss_hpc.bench long_check --tokens 32768 --layers 2 --json out.json   # GPU: 20b-shaped, fp32
    python -m gptoss_hpc.bench long_check --device cpu --tokens 2048              # CPU: tiny gpt-oss, fp32
    python -m gptoss_hpc.bench long_check --mask-lengths 32768,65536,131072,98304 # + the block-mask builder

Loss and LoRA gradients of a few-layer gpt-oss, built as the train stage builds it (transformers GptOss, PEFT LoRA,
the configured speed knobs and packed-document masks: gptoss_hpc.bench.train_setup.prepare), on ONE packed
micro-batch of several documents (one of them many sliding windows long), against the same model whose attention
is the chunked fp32 reference (gptoss_hpc.modeling.fast.reference_attention: per query chunk the keys it may
see, sinks in the denominator). Two controls run the reference deliberately wrong (documents merged; sliding
windows ignored): their error must be far above the tolerance, or the check could not have caught a mask bug.

On CUDA the fast path is flex_attention with our BlockMasks (compiled layers when the config compiles them); on
CPU it is what the CPU train stage runs: eager attention with transformers' packed masks (transformers refuses
flex_attention with sinks on CPU). ``--mask-lengths``: seconds, peak memory and new compiled graphs of
gptoss_hpc.modeling.fast.packing.flex_document_masks at each length (no S x S memory, no recompile per length).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

# |loss error| / |loss| and ||grad error|| / ||grad|| (all LoRA gradients as one vector). The pass criterion is
# fp32's; a bf16 run (model.dtype=bfloat16) is reported against bf16 rounding of the loss, its gradients only shown
TOLERANCE = {"float32": (1e-5, 1e-4), "bfloat16": (1e-2, None)}


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gptoss_hpc.bench long_check", description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides (default GPU: model=gpt_oss_20b lora=attention)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=32768, help="packed micro-batch length")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (alternating sliding / full)")
    p.add_argument("--vocab", type=int, default=None, help="override the vocab size")
    p.add_argument("--mask-lengths", default="", help="comma list: time the block-mask builder at these lengths")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def compose_check(overrides: list[str], device: str, layers: int):
    from gptoss_hpc.config import compose, to_run_config

    # fp32 on the GPU too: in bf16 the random-weight model's top-4 routing flips under rounding and its LoRA
    # gradients move ~100% with any change (docs/BENCHMARKS.md, "Correctness"), which would hide a mask error
    base = ["model=gpt_oss_20b", "model.dtype=float32", "cluster.accelerator=gpu"]
    if device == "cpu":
        base = ["model=tiny_gpt_oss", "model.dtype=float32", "cluster.accelerator=cpu"]
    return to_run_config(
        compose([*base, "lora=attention", "lora.lora_dropout=0", f"model.num_hidden_layers={layers}", *overrides])
    )


def document_lengths(tokens: int, window: int) -> list[int]:
    """One document over half the row (many windows long), one a fifth, some around the window, a 1-token one,
    then ~1k documents; what is left of ``tokens`` is padding (its own document, as the collator pads)."""
    lengths = [tokens // 2 + 13, tokens // 5 + 7, 3 * window + 5, window - 1, window + 1, 1, 2]
    lengths = [n for n in lengths if n > 0]
    while sum(lengths) + 1100 < tokens:
        lengths.append(1000 + 17 * len(lengths))
    while sum(lengths) >= tokens:
        lengths.pop()
    return lengths


def packed_batch(tokens: int, window: int, vocab: int, seed: int = 7) -> dict[str, Any]:
    from gptoss_hpc.bench.train_setup import PREDICTED_ROWS, make_sequence
    from gptoss_hpc.modeling.fast import pack_sequences
    from gptoss_hpc.modeling.fast.loss import predicted_row_count

    rng = random.Random(seed)
    seqs = [make_sequence(rng, n, vocab) for n in document_lengths(tokens, window)]
    batch = pack_sequences([s for s, _ in seqs], [lab for _, lab in seqs], row_tokens=tokens)
    batch.pop("num_tokens")
    batch[PREDICTED_ROWS] = predicted_row_count(batch["labels"])
    return batch


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_long_attention(cfg, device: str, tokens: int, vocab: int | None = None) -> dict[str, Any]:
    """The comparison (see the module doc); a dict with the errors, the controls and ``status`` pass/fail."""
    import torch

    from gptoss_hpc.bench.train_setup import PREDICTED_ROWS, aux_loss_coef, is_cuda, prepare, to_device, train_loss_of
    from gptoss_hpc.modeling.fast import unwrap
    from gptoss_hpc.modeling.fast.reference_attention import reference_attention

    started = time.perf_counter()
    model, knobs = prepare(cfg, device, vocab_size=vocab)
    config = unwrap(model).config
    with torch.no_grad():  # sinks that matter: a random logit per head around the scores' scale
        g = torch.Generator(device="cpu").manual_seed(cfg.train.seed + 2)
        for layer in unwrap(model).model.layers:
            sinks = layer.self_attn.sinks
            sinks.copy_(torch.randn(sinks.shape, generator=g).to(sinks.dtype))
    window = int(config.sliding_window or 0)
    batch = packed_batch(tokens, max(window, 1), config.vocab_size)
    dev = to_device(batch, device)
    n_items, aux = batch[PREDICTED_ROWS], aux_loss_coef(cfg, config)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        for p in params.values():
            p.grad = None
        loss = train_loss_of(model, knobs, dev, n_items, aux, 1)
        loss.backward()
        grads = torch.cat([p.grad.detach().double().flatten() for p in params.values()])
        return loss.detach().double(), grads

    loss, grads = run()
    with reference_attention(model):
        ref_loss, ref_grads = run()
    controls = {}
    for control in ("merge_documents", "ignore_window"):
        with reference_attention(model, **{control: True}):
            c_loss, c_grads = run()
        controls[control] = {"loss_rel_err": _rel(c_loss, ref_loss), "grad_rel_err": _rel(c_grads, ref_grads)}
    dtype = str(next(iter(params.values())).dtype).removeprefix("torch.")
    loss_tol, grad_tol = TOLERANCE.get(dtype, TOLERANCE["bfloat16"])
    out: dict[str, Any] = {
        "name": "long attention check",
        "device": device,
        "attn": config._attn_implementation,
        "dtype": dtype,
        "layers": config.num_hidden_layers,
        "layer_types": list(config.layer_types),
        "sliding_window": window,
        "tokens": tokens,
        "documents": document_lengths(tokens, max(window, 1)),
        "knobs": knobs.summary(),
        "lora_params": int(grads.numel()),
        "loss": float(loss),
        "loss_ref": float(ref_loss),
        "loss_abs_err": float((loss - ref_loss).abs()),
        "loss_rel_err": _rel(loss, ref_loss),
        "grad_max_abs_err": float((grads - ref_grads).abs().max()),
        "grad_max_abs": float(ref_grads.abs().max()),
        "grad_rel_err": _rel(grads, ref_grads),
        "tolerance": {"loss_rel": loss_tol, "grad_rel": grad_tol},
        "controls": controls,
    }
    if grad_tol is None:
        out["status"] = "reported (bf16; the pass criterion is the fp32 run)"
    else:
        exact = out["loss_rel_err"] <= loss_tol and out["grad_rel_err"] <= grad_tol
        telling = all(c["grad_rel_err"] > 10 * grad_tol for c in controls.values())
        out["status"] = "pass" if exact and telling else ("fail" if not exact else "inconclusive (controls)")
    out["seconds"] = round(time.perf_counter() - started, 1)
    if is_cuda(device):
        out["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    knobs.remove()
    return out


def mask_builder_facts(config, device: str, lengths: list[int]) -> list[dict[str, Any]]:
    """flex_document_masks at each length (three documents): seconds, peak memory over what was allocated before,
    and how many graphs torch.compile made for it (a recompile per length shows as a count growing each time)."""
    import torch
    from torch._dynamo.utils import counters

    from gptoss_hpc.modeling.fast.packing import document_ids, flex_document_masks

    rows = []
    for n in lengths:
        pos = torch.cat([torch.arange(n // 2), torch.arange(n // 3), torch.arange(n - n // 2 - n // 3)])[None]
        pos = pos.to(device)
        if device != "cpu":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if device != "cpu" else 0
        graphs = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        masks = flex_document_masks(config, document_ids(pos))
        if device != "cpu":
            torch.cuda.synchronize()
        row = {"length": n, "seconds": round(time.perf_counter() - t0, 2)}
        row["new_graphs"] = counters["stats"]["unique_graphs"] - graphs
        if device != "cpu":
            row["peak_extra_gib"] = round((torch.cuda.max_memory_allocated() - before) / 2**30, 3)
        row["kinds"] = sorted(masks)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    cfg = compose_check(args.overrides, args.device, args.layers)
    result: dict[str, Any] = {"command": "python -m gptoss_hpc.bench long_check " + " ".join(argv or sys.argv[1:])}
    if args.mask_lengths:
        from transformers import GptOssConfig

        from gptoss_hpc.bench.train_setup import model_config_json
        from gptoss_hpc.modeling.fast import unwrap  # noqa: F401  (imports transformers before the config)

        config = GptOssConfig.from_json_file(str(model_config_json(cfg)))
        lengths = [int(x) for x in args.mask_lengths.split(",") if x]
        result["mask_builder"] = mask_builder_facts(config, args.device, lengths)
        print(json.dumps(result["mask_builder"]), flush=True)
    result["check"] = check_long_attention(cfg, args.device, args.tokens, args.vocab)
    print(json.dumps(result["check"], indent=1), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if result["check"]["status"].startswith(("pass", "reported")) else 1


if __name__ == "__main__":
    sys.exit(main())
