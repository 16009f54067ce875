"""The merged model against base + adapter, on a probe batch: fp32 logits of each sample (``probe_logits``), the
tolerance per compute dtype, the rounding-noise floor that calibrates it in bf16/fp16, and ``merge_and_check``,
which merges a PEFT model and raises ``MergeError`` when the merged logits leave the tolerance. Used by the merge
stage (stages/merge.py, stages/merge_streaming.py); the MXFP4 streaming merge's own check is mxfp4/merge_check.py.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from gptoss_hpc.errors import GptossHpcError

log = logging.getLogger(__name__)

# |merged - adapter| <= atol + rtol * max|adapter logits|, per compute dtype. fp32 merges are exact up to
# summation order (the tiny CPU model: ~1e-6).
TOLERANCES = {"float32": (1e-4, 1e-5), "bfloat16": (5e-2, 1e-2), "float16": (1e-2, 5e-3)}
# In bf16/fp16 the merged weights are W + delta rounded once, the adapter path rounds differently (a fused
# baddbmm for experts, base(x) + lora(x) for Linears): the merged model is off by about one rounding step
# of every adapted weight, and how much that moves the logits depends on the model (a random-init
# gpt-oss-20b shape is chaotic: one rounding step of ONE expert tensor moves its logits by ~1.0). So the
# low-precision check measures the logit change caused by one rounding step of every adapted weight of the
# merged model (same probe batch) and requires max |diff| <= max(tolerance, NOISE_FACTOR x its max) and
# mean |diff| <= NOISE_FACTOR x its mean. The mean separates a lost adapter from rounding (tiny model in
# bf16: merged 0.0027, noise 0.0037, adapter effect 0.18); rare routing flips dominate the max. When the
# adapter's own effect is within that noise (random-init 20b shape on an H100: effect 0.06, noise 0.048),
# merge_check.json says "conclusive": false and a warning is logged: the check passes but proves little.
NOISE_FACTOR = 3.0
NOISE_REL = 2.0**-8  # relative perturbation: rounds each bf16 weight to itself or a neighbour


class MergeError(GptossHpcError):
    """The adapter is missing, or the merged model does not reproduce the adapter's logits."""

    def __init__(self, message: str, check: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.check = check


def tolerance(dtype_name: str, logits_scale: float) -> float:
    atol, rtol = TOLERANCES.get(dtype_name, TOLERANCES["bfloat16"])
    return atol + rtol * logits_scale


def probe_logits(model: Any, samples: Sequence[Sequence[int]]) -> list[Any]:
    """fp32 logits of each probe sample on the host (the merge checks compare models on them, one at a time)."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for ids in samples:
            x = torch.tensor([list(ids)], device=device)
            out.append(model(input_ids=x).logits[0].float().cpu())
    return out


def adapted_parameters(peft_model: Any) -> list[tuple[Any, str]]:
    """(base module, parameter name) of every weight a LoRA layer adapts; still valid after
    merge_and_unload(), which merges into these parameters and puts the base modules back."""
    from peft.tuners.lora import LoraLayer

    found: dict[tuple[int, str], tuple[Any, str]] = {}
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            name = getattr(module, "parameter_name", None) or "weight"
            found[(id(base), name)] = (base, name)
    return list(found.values())


def rounding_noise(model: Any, targets: Sequence[tuple[Any, str]], samples: Sequence[Sequence[int]], seed: int = 0):
    """(max, mean) |logit change| when every adapted weight of ``model`` moves by one rounding step;
    the weights are restored afterwards (originals kept on the CPU meanwhile)."""
    import torch

    reference = probe_logits(model, samples)
    saved = []
    generators: dict[str, Any] = {}
    with torch.no_grad():
        for module, name in targets:
            param = getattr(module, name)
            saved.append((param, param.detach().to("cpu", copy=True)))
            key = str(param.device)
            if key not in generators:
                generators[key] = torch.Generator(device=param.device).manual_seed(seed)
            noise = torch.randn(param.shape, generator=generators[key], dtype=torch.float32, device=param.device)
            param.copy_((param.float() * (1.0 + NOISE_REL * noise)).to(param.dtype))
            del noise
    try:
        moved = probe_logits(model, samples)
    finally:
        with torch.no_grad():
            for param, original in saved:
                param.copy_(original.to(param.device))
    pairs = list(zip(reference, moved, strict=True))
    return max(float((a - b).abs().max()) for a, b in pairs), sum(float((a - b).abs().sum()) for a, b in pairs) / sum(
        a.numel() for a in reference
    )


def merge_and_check(peft_model: Any, samples: Sequence[Sequence[int]], dtype_name: str) -> tuple[Any, dict]:
    """merge_and_unload() the adapter; compare merged logits with adapter logits on ``samples``.

    Returns (merged model, check record). Raises MergeError when max |diff| exceeds the tolerance.
    """
    peft_model.eval()
    targets = adapted_parameters(peft_model)
    adapter = probe_logits(peft_model, samples)
    with peft_model.disable_adapter():
        base = probe_logits(peft_model, samples)
    merged = peft_model.merge_and_unload()
    merged.eval()
    after = probe_logits(merged, samples)
    pairs = list(zip(adapter, after, strict=True))
    max_diff = max(float((a - m).abs().max()) for a, m in pairs)
    effect = max(float((a - b).abs().max()) for a, b in zip(adapter, base, strict=True))
    effect_mean = sum(float((a - b).abs().sum()) for a, b in zip(adapter, base, strict=True)) / sum(
        a.numel() for a in adapter
    )
    scale = max(float(a.abs().max()) for a in adapter)
    tol = tolerance(dtype_name, scale)
    noise_max = noise_mean = mean_tol = None
    if dtype_name != "float32":
        noise_max, noise_mean = rounding_noise(merged, targets, samples)
        tol = max(tol, NOISE_FACTOR * noise_max)
        mean_tol = NOISE_FACTOR * noise_mean
    mean_diff = sum(float((a - m).abs().sum()) for a, m in pairs) / sum(a.numel() for a in adapter)
    passed = max_diff <= tol and (mean_tol is None or mean_diff <= mean_tol)
    n_tokens = sum(len(s) for s in samples)
    check = {
        "max_abs_diff": max_diff,
        "tolerance": tol,
        "passed": passed,
        "dtype": dtype_name,
        "mean_abs_diff": mean_diff,
        "mean_tolerance": mean_tol,
        "tokens_over_tolerance": sum(int(((a - m).abs().amax(-1) > tol).sum()) for a, m in pairs) / n_tokens,
        "argmax_agreement": sum(int((a.argmax(-1) == m.argmax(-1)).sum()) for a, m in pairs) / n_tokens,
        "logits_max_abs": scale,
        "adapter_effect_max_abs": effect,
        "adapter_effect_mean_abs": effect_mean,
        "rounding_noise_max_abs": noise_max,
        "rounding_noise_mean_abs": noise_mean,
        # False: the adapter's effect is within the rounding noise, so a lost adapter would also pass
        "conclusive": mean_tol is None or effect_mean > mean_tol,
        "adapted_parameters": len(targets),
        "probe_samples": len(samples),
        "probe_tokens": n_tokens,
    }
    if mean_tol is not None and effect_mean <= mean_tol:
        log.warning(
            "the adapter moves the logits by %.3g on average, within %.3g (%g x the rounding noise): this check "
            "cannot tell a correct merge from a lost adapter on this model",
            effect_mean,
            mean_tol,
            NOISE_FACTOR,
        )
    log.info("merge check: max |merged - adapter| = %.3g (tolerance %.3g), adapter effect %.3g", max_diff, tol, effect)
    if effect == 0.0:
        log.warning("the adapter does not change the logits at all (lora_B still zero?): the merge is a no-op")
    if not passed:
        mean_part = f", mean {mean_diff:.3g} (tolerance {mean_tol:.3g})" if mean_tol is not None else ""
        raise MergeError(
            f"merged logits differ from base+adapter logits by max {max_diff:.4g} (tolerance {tol:.4g}){mean_part} "
            f"({dtype_name}, {n_tokens} probe tokens, {check['tokens_over_tolerance']:.1%} of them over the max "
            f"tolerance, adapter effect max {effect:.4g} mean {effect_mean:.3g}); the merged model was not saved",
            check,
        )
    return merged, check
