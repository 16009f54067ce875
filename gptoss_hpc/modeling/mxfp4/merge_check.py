"""The streaming merge's check: every adapted tensor of the written merged folder against PEFT's own merge.

The reference does not reuse the merge's delta formula: the gpt-oss skeleton is built on the meta device (no
weights), PEFT loads the adapter onto it (``PeftModel.from_pretrained``; only the LoRA factors become real), and
for each adapted tensor the base weight is read from the checkpoint (experts dequantized in fp32, exact), put
into PEFT's base layer and PEFT's ``get_delta_weight`` gives the delta (its einsum for ``target_parameters``,
B @ A for Linears). One tensor is materialised at a time, on ``device``.

bf16 output: the written tensor must equal bf16(W + delta) element for element, but for rounding flips from
the fp32 summation order (at most ``MAX_MISMATCH`` of the elements, none over one bf16 step). A merge that lost
the adapter is told apart only where the adapter changes the bf16 weight at all (``adapter_visible``): when that
is under ``MIN_VISIBLE`` the record says ``conclusive: false``. MXFP4 output: the written blocks/scales must
dequantize to Q(W + delta), and ``survival`` = max(0, 1 - ||Q(W + delta) - W - delta|| / ||delta||) says how much
of the adapter's weight change the re-quantization kept (1: all of it; 0: the merged model is the base, or the
re-quantization noise is as large as the delta), beside the raw ``projection`` <Q(W + delta) - W, delta> /
||delta||^2 and ``relative_error``. A delta below half an FP4 step of its block rounds back to W (the base is on
the grid already), and one that lifts a block's largest value moves the block's scale and re-rounds all 32 values:
both show as low survival.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from gptoss_hpc.modeling.mxfp4.merge import dequantize_stack
from gptoss_hpc.modeling.mxfp4.model import _shard_files, dequantize_mxfp4, quantize_mxfp4

log = logging.getLogger(__name__)

MAX_MISMATCH = 0.01  # fraction of elements that may round the other way (fp32 summation order)
MIN_VISIBLE = 0.05  # below this fraction of elements changed by the adapter, a lost adapter could pass
LOW_SURVIVAL = 0.5  # merge.format=mxfp4 keeping less of the adapter's weight change than this: warn


def _peft_on_meta(base_folder: Path, adapter_folder: Path) -> dict[str, tuple[Any, Any, str]]:
    """checkpoint tensor name -> (PEFT LoRA layer, its base module, parameter name) with real LoRA factors."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_folder))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    model = PeftModel.from_pretrained(skeleton, str(adapter_folder), low_cpu_mem_usage=True)
    targets = {}
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for factors in (module.lora_A, module.lora_B):
            factors.to_empty(device="cpu")  # the meta skeleton gave them no storage
        param = getattr(module, "parameter_name", None)
        stem = path.removeprefix("base_model.model.").replace(".base_layer", "")
        base = module.get_base_layer()
        targets[f"{stem}.{param}" if param else f"{stem}.weight"] = (module, base, param or "weight")
    result = set_peft_model_state_dict(model, load_file(str(adapter_folder / "adapter_model.safetensors")))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"adapter tensors PEFT does not place: {result.unexpected_keys[:3]}")
    return targets


def check_streaming_merge(
    base_folder: str | Path,
    adapter_folder: str | Path,
    merged_folder: str | Path,
    *,
    device: str = "cpu",
    out_format: str = "bf16",
) -> dict[str, Any]:
    """Compare every adapted tensor of ``merged_folder`` with PEFT's merge of the base (see the module docstring).
    Returns the check record (``passed``, ``conclusive``, per-tensor rows, MXFP4 ``survival``); raises nothing."""
    import torch
    from safetensors import safe_open

    base_folder, adapter_folder, merged_folder = Path(base_folder), Path(adapter_folder), Path(merged_folder)
    base_files, merged_files = _shard_files(base_folder), _shard_files(merged_folder)
    out_dtype = {"float16": torch.float16, "float32": torch.float32}.get(
        json.loads((merged_folder / "config.json").read_text()).get("torch_dtype", "bfloat16"), torch.bfloat16
    )

    def read(files: dict[str, Path], name: str):
        with safe_open(str(files[name]), framework="pt", device="cpu") as f:
            return f.get_tensor(name).to(device)

    def weight(files: dict[str, Path], name: str):
        if f"{name}_blocks" in files:
            return dequantize_stack(read(files, f"{name}_blocks"), read(files, f"{name}_scales"), device)
        return read(files, name).float()

    rows = []
    for name, (module, base, leaf) in sorted(_peft_on_meta(base_folder, adapter_folder).items()):
        w = weight(base_files, name)
        base._parameters[leaf] = torch.nn.Parameter(w, requires_grad=False)  # PEFT reads device/dtype from it
        for factors in (module.lora_A, module.lora_B):
            factors.to(device)
        delta = module.get_delta_weight(module.active_adapters[0]).float()
        base._parameters[leaf] = torch.nn.Parameter(torch.empty(0, device="meta"), requires_grad=False)
        for factors in (module.lora_A, module.lora_B):
            factors.to("cpu")
        requantized = out_format == "mxfp4" and f"{name}_blocks" in merged_files
        rows.append(_compare(name, w, delta, weight(merged_files, name), out_dtype, requantized))
        del w, delta
    survival = [r["survival"] for r in rows if "survival" in r]
    check: dict[str, Any] = {
        "method": "streaming: every adapted tensor vs PEFT's get_delta_weight on the dequantized base",
        "format": out_format,
        "passed": bool(rows) and all(r["passed"] for r in rows),
        "conclusive": bool(rows) and min(r["adapter_visible"] for r in rows) > MIN_VISIBLE,
        "adapted_parameters": len(rows),
        "max_mismatch": max((r["mismatch"] for r in rows), default=None),
        "max_abs_diff": max((r["max_abs_diff"] for r in rows), default=None),
        "tolerance": f"<= {MAX_MISMATCH:.0%} of elements rounded the other way, none by more than one step",
        "dtype": str(out_dtype).removeprefix("torch."),
        "tensors": rows,
    }
    if survival:
        check["survival_mean"] = sum(survival) / len(survival)
        check["survival_min"] = min(survival)
        check["survival_by_layer"] = _by_layer(rows)
    return check


def _compare(name: str, w, delta, got, out_dtype, requantized: bool, experts_per_chunk: int = 8) -> dict[str, Any]:
    """One tensor's row, a few experts at a time (each full-size temporary of a 120b stack is 8.5 GB)."""
    import torch

    n = w.shape[0] if w.dim() == 3 else 1
    step = experts_per_chunk if w.dim() == 3 else 1
    acc = dict.fromkeys(("mismatch", "over", "visible", "max_diff", "dot", "err2", "d2", "n"), 0.0)
    for lo in range(0, n, step):
        sl = slice(lo, lo + step) if w.dim() == 3 else slice(None)
        wc, dc, gc = w[sl].float(), delta[sl], got[sl].float()
        if requantized:
            want = dequantize_mxfp4(*quantize_mxfp4(wc + dc), torch.float32)
            kept = gc - wc
            acc["dot"] += float((kept * dc).sum())
            acc["err2"] += float((kept - dc).pow(2).sum())
            acc["visible"] += float((want != wc).sum())
        else:
            want = (wc + dc).to(out_dtype).float()
            acc["visible"] += float((want != wc.to(out_dtype).float()).sum())
            spacing = torch.finfo(out_dtype).eps * want.abs().clamp_min(torch.finfo(out_dtype).tiny)
            acc["over"] += float(((gc - want).abs() > spacing).sum())  # more than one rounding step off
        diff = (gc - want).abs()
        acc["max_diff"] = max(acc["max_diff"], float(diff.max()))
        acc["mismatch"] += float((diff > 0).sum())
        acc["d2"] += float(dc.pow(2).sum())
        acc["n"] += diff.numel()
        del wc, dc, gc, want, diff
    count = max(acc["n"], 1.0)
    row: dict[str, Any] = {
        "tensor": name,
        "delta_rms": (acc["d2"] / count) ** 0.5,
        "adapter_visible": acc["visible"] / count,
        "max_abs_diff": acc["max_diff"],
        "mismatch": acc["mismatch"] / count,
        "over_one_step": acc["over"] / count,
    }
    if requantized:
        d2 = max(acc["d2"], 1e-30)
        row["projection"] = acc["dot"] / d2
        row["relative_error"] = (acc["err2"] / d2) ** 0.5
        row["survival"] = max(0.0, 1.0 - row["relative_error"])
    row["passed"] = row["mismatch"] <= MAX_MISMATCH and row["over_one_step"] == 0.0
    return row


def _by_layer(rows: list[dict[str, Any]]) -> dict[str, float]:
    """layer index -> mean survival of its re-quantized expert tensors."""
    layers: dict[str, list[float]] = {}
    for r in rows:
        if "survival" in r:
            layer = r["tensor"].split(".layers.")[1].split(".")[0]
            layers.setdefault(layer, []).append(r["survival"])
    return {k: sum(v) / len(v) for k, v in sorted(layers.items(), key=lambda kv: int(kv[0]))}
