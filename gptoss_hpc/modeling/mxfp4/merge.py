"""Merge a LoRA adapter into an MXFP4 gpt-oss checkpoint tensor by tensor, writing bf16 (or MXFP4) safetensors shards.

No model is built: each tensor of the base is read from its shard, the experts are dequantized (the values
``dequantize_mxfp4`` gives, as transformers' loader gives them), the adapter's delta is added where it has one
(experts: PEFT's ``target_parameters`` layout; attention: B @ A), and the result goes to an output shard that is
written once it reaches ``max_shard_bytes``. Host memory stays near one output shard plus one expert stack
(120b: ~5 GB + 8.5 GB in fp32), whatever the model's size. With ``device="cuda"`` the dequant + delta math runs
on the GPU (one expert stack in fp32 there at a time: ~8.5 GB + its delta for the 120b); the merge stage uses
this for ``model.experts_dtype=mxfp4``. ``out_format="mxfp4"`` re-quantizes the adapted expert stacks into the
checkpoint's blocks/scales (unadapted ones are copied as they are) and keeps ``quantization_config``: the 120b
merged model is then ~61 GB instead of ~234 GB, at the price of rounding most of a small LoRA delta away
(``gptoss_hpc.modeling.mxfp4.merge_check`` measures how much survives).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
from pathlib import Path
from typing import Any

from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.modeling.mxfp4.model import _shard_files, dequantize_mxfp4, quantize_mxfp4

log = logging.getLogger(__name__)

_COPIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
           "chat_template.jinja")  # fmt: skip


def _scale(adapter_config: dict[str, Any]) -> float:
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise GptossHpcError("the streaming merge supports one r / lora_alpha for every module (no rank_pattern)")
    r, alpha = adapter_config["r"], adapter_config["lora_alpha"]
    return alpha / r**0.5 if adapter_config.get("use_rslora") else alpha / r


def adapter_deltas(adapter: dict[str, Any], config: dict[str, Any]) -> dict[str, tuple[Any, Any, str]]:
    """checkpoint tensor name -> (lora_A, lora_B, kind) from a PEFT adapter state dict. Expert LoRA
    (``target_parameters``; nested ParamWrappers put one of the two params under ``base_layer``) is told apart by
    lora_B's output size: 2 x intermediate for gate_up_proj, hidden for down_proj."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    if 2 * inter == hidden:
        raise GptossHpcError("gate_up_proj and down_proj LoRA have the same shape here: cannot tell them apart")
    out: dict[str, tuple[Any, Any, str]] = {}
    for key, a in adapter.items():
        if not key.endswith(".lora_A.weight"):
            continue
        stem = key.removesuffix(".lora_A.weight")
        b = adapter[f"{stem}.lora_B.weight"]
        name = stem.removeprefix("base_model.model.").replace(".base_layer", "")
        if name.endswith("mlp.experts"):
            param = "gate_up_proj" if b.shape[0] == 2 * inter else "down_proj"
            out[f"{name}.{param}"] = (a, b, "experts")
        else:
            out[f"{name}.weight"] = (a, b, "linear")
    return out


def _delta(a, b, kind: str, num_experts: int, scale: float):
    """The fp32 delta PEFT's merge adds: experts [E, in, out] (gpt-oss experts are ``is_transposed``: no in/out
    swap, delta[e] = A_e^T @ B_e^T); a Linear [out, in] = B @ A."""
    a, b = a.float(), b.float()
    if kind == "linear":
        return scale * (b @ a)
    a = a.reshape(num_experts, -1, a.shape[-1])  # [E, r, in]
    b = b.reshape(b.shape[0], -1, num_experts).permute(2, 0, 1)  # [E, out, r]
    return scale * (a.transpose(1, 2) @ b.transpose(1, 2))


def dequantize_stack(blocks, scales, device, experts_per_chunk: int = 8):
    """fp32 [E, in, out] (a transposed view, as ``dequantize_mxfp4`` gives) from blocks/scales on any device,
    a few experts at a time: the integer temporaries of one pass are ~4x the fp32 result, so a whole 120b stack
    at once would need ~35 GB more than the 8.5 GB it yields."""
    import torch

    e, out, groups, half = blocks.shape
    result = torch.empty((e, out, groups * 2 * half), dtype=torch.float32, device=device)
    for lo in range(0, e, experts_per_chunk):
        hi = min(e, lo + experts_per_chunk)
        part = dequantize_mxfp4(blocks[lo:hi].to(device), scales[lo:hi].to(device), torch.float32)
        result[lo:hi] = part.transpose(1, 2)
        del part
    return result.transpose(1, 2)


def merge_mxfp4_adapter(
    base_folder: str | Path,
    adapter_folder: str | Path,
    out_folder: str | Path,
    dtype: str = "bfloat16",
    max_shard_bytes: int = 5 * 10**9,
    device: str = "cpu",
    out_format: str = "bf16",
) -> dict[str, Any]:
    """Write base + adapter, merged, as ``dtype`` safetensors shards + index + config (without the MXFP4
    quantization_config; ``out_format="mxfp4"``: adapted experts re-quantized to blocks/scales, config kept)
    into ``out_folder`` (through a temp folder and a rename). Returns what it did."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base_folder, adapter_folder, out_folder = Path(base_folder), Path(adapter_folder), Path(out_folder)
    if out_format not in ("bf16", "mxfp4"):
        raise GptossHpcError(f"merge format {out_format!r}: choose bf16 or mxfp4 (merge.format)")
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    if str(device).startswith("cuda"):
        # a fresh merge process has not touched CUDA yet, and the allocator's stats exist only after its init
        # (H200: "Invalid device argument" from reset_peak_memory_stats in the merge job)
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
    config = json.loads((base_folder / "config.json").read_text())
    adapter_config = json.loads((adapter_folder / "adapter_config.json").read_text())
    deltas = adapter_deltas(load_file(str(adapter_folder / "adapter_model.safetensors")), config)
    scale, num_experts = _scale(adapter_config), config["num_local_experts"]
    files = _shard_files(base_folder)
    handles: dict[Path, Any] = {}

    def read(name: str):
        # At most two shards open (a tensor's blocks and scales may sit in two): every page read through an open
        # safe_open mmap stays in this process's RSS, and with all 15 shards of 120b kept open the H200 merge
        # peaked at 62 GiB of host RSS, the whole checkpoint, instead of about one shard.
        path = files[name]
        if path not in handles:
            while len(handles) >= 2:
                handles.pop(next(iter(handles)))
            handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return handles[path].get_tensor(name)

    tmp = out_folder.with_name(out_folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shard: dict[str, Any] = {}
    shard_bytes, written, merged = 0, [], []
    peak_buffer = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"part-{len(written) + 1:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            written.append((name, list(shard)))
        shard, shard_bytes = {}, 0

    for name in sorted(files, key=lambda n: (files[n].name, n)):  # shard by shard, so each is opened once
        if name.endswith("_scales"):
            continue
        target = name.removesuffix("_blocks")
        if name.endswith("_blocks") and out_format == "mxfp4" and target not in deltas:
            pieces = {name: read(name), f"{target}_scales": read(f"{target}_scales")}  # unadapted: as they are
        elif name.endswith("_blocks"):
            pieces = {target: dequantize_stack(read(name), read(f"{target}_scales"), device)}
        else:
            pieces = {target: read(name)}
        if target in deltas:
            a, b, kind = deltas.pop(target)
            tensor = pieces.pop(target).to(device).float()
            tensor += _delta(a.to(device), b.to(device), kind, num_experts, scale)  # in place: one stack fewer
            pieces = {target: tensor}
            if kind == "experts" and out_format == "mxfp4":
                blocks, scales = quantize_mxfp4(tensor)
                pieces = {name: blocks, f"{target}_scales": scales}
            merged.append(target)
            del tensor
        for key, tensor in pieces.items():
            if tensor.is_floating_point():
                tensor = tensor.to(torch_dtype)
            tensor = tensor.contiguous().cpu()
            size = tensor.numel() * tensor.element_size()
            if shard and shard_bytes + size > max_shard_bytes:
                flush()
            shard[key] = tensor
            shard_bytes += size
            peak_buffer = max(peak_buffer, shard_bytes)
        del pieces
    flush()
    handles.clear()
    if deltas:
        shutil.rmtree(tmp, ignore_errors=True)
        raise GptossHpcError(f"adapter tensors with no base weight in {base_folder}: {sorted(deltas)[:5]}")
    weight_map = {}
    for i, (name, keys) in enumerate(written, 1):
        final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        os.rename(tmp / name, tmp / final)
        weight_map.update(dict.fromkeys(keys, final))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    if out_format == "bf16":  # dequantized weights must not be read back as MXFP4
        config.pop("quantization_config", None)
    config["torch_dtype"] = dtype
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for extra in _COPIED:
        if (base_folder / extra).is_file():
            shutil.copy2(base_folder / extra, tmp / extra)
    if out_folder.exists():
        shutil.rmtree(out_folder)
    os.rename(tmp, out_folder)
    stats = {
        "shards": len(written),
        "merged_tensors": len(merged),
        "peak_shard_buffer_gib": round(peak_buffer / 2**30, 2),
        "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if str(device).startswith("cuda")
        else None,
        "device": str(device),
        "format": out_format,
        "merged_gib": round(sum(f.stat().st_size for f in out_folder.glob("*.safetensors")) / 2**30, 2),
    }
    log.info("streaming merge of %s + %s -> %s: %s", base_folder, adapter_folder, out_folder, stats)
    return stats


def main(argv: list[str] | None = None) -> int:
    """python -m gptoss_hpc.modeling.mxfp4.merge BASE ADAPTER OUT [--dtype bfloat16] [--device cuda] [--format mxfp4]
    (the merge alone, without the stage's check)"""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m gptoss_hpc.modeling.mxfp4.merge", description=__doc__.splitlines()[0])
    p.add_argument("base", help="MXFP4 checkpoint folder (Hub layout: *_blocks/*_scales safetensors)")
    p.add_argument("adapter", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", help="where the merged safetensors go")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cpu", help="where the dequant + delta math runs, e.g. cuda (default cpu)")
    p.add_argument("--format", default="bf16", choices=["bf16", "mxfp4"], help="as merge.format")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        stats = merge_mxfp4_adapter(
            args.base, args.adapter, args.out, args.dtype, device=args.device, out_format=args.format
        )
    except (GptossHpcError, OSError, KeyError) as exc:
        print(f"merge failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
