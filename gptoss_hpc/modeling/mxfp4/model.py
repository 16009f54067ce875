"""gpt-oss's MXFP4 expert format, and building a gpt-oss whose experts stay in it (``model.experts_dtype: mxfp4``).

The Hub checkpoints (openai/gpt-oss-20b, -120b) store each layer's expert weights as
``model.layers.<i>.mlp.experts.{gate_up,down}_proj_blocks`` uint8 [E, out, in/32, 16] (two e2m1 values per byte,
low nibble first) and ``..._scales`` uint8 [E, out, in/32] (an e8m0 exponent, bias 127), plus bf16 biases.
``dequantize_mxfp4`` gives the weight transformers' ``convert_moe_packed_tensors`` gives (bit for bit: same LUT,
same ldexp in fp32, same rounding to the compute dtype), as an [E, in, out] view of an [E, out, in] tensor.

Nothing here materialises a bf16 expert stack: ``load_mxfp4_model`` builds the skeleton on the meta device and
reads each tensor of the safetensors shards one at a time onto the target device; ``build_random_mxfp4_model``
(the bench) fills random blocks and scales directly on the GPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.modeling.mxfp4.format import (  # noqa: F401  re-exported: the format's public names
    BLOCK,
    EXPERT_PARAMS,
    FP4_VALUES,
    SCALE_BIAS,
    SCALE_RANGE,
    dequantize_mxfp4,
    dequantize_mxfp4_lut,
    quantize_mxfp4,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# model construction
# ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def mxfp4_experts_in_models() -> Iterator[None]:
    """gpt-oss models built inside get ``Mxfp4Experts`` instead of ``GptOssExperts`` (GptOssMLP looks the class up
    in its module when it is constructed)."""
    from transformers.models.gpt_oss import modeling_gpt_oss

    from gptoss_hpc.modeling.mxfp4.experts import Mxfp4Experts

    before = modeling_gpt_oss.GptOssExperts
    modeling_gpt_oss.GptOssExperts = Mxfp4Experts
    try:
        yield
    finally:
        modeling_gpt_oss.GptOssExperts = before


def _model_kwargs(dtype, attn_implementation: str, experts_implementation: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    return kwargs


def build_random_mxfp4_model(
    config, device, dtype, attn_implementation: str, experts_implementation: str | None = None, seed: int = 0
):
    """gpt-oss from ``config`` with random MXFP4 experts, built on ``device`` (no bf16 expert stack anywhere)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with mxfp4_experts_in_models(), torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, **_model_kwargs(dtype, attn_implementation, experts_implementation)
        )
    gen = torch.Generator(device=device).manual_seed(seed + 7)
    for module in mxfp4_modules(model):
        module.reset_placeholders()
        module.fill_random(gen)
    return model


def mxfp4_modules(model) -> list[Any]:
    from gptoss_hpc.modeling.mxfp4.experts import Mxfp4Experts

    return [m for m in model.modules() if isinstance(m, Mxfp4Experts)]


def _shard_files(folder: Path) -> dict[str, Path]:
    """tensor name -> shard file, from model.safetensors.index.json or the single model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / shard for name, shard in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    raise GptossHpcError(
        f"{folder} holds no model.safetensors(.index.json): model.experts_dtype=mxfp4 reads the checkpoint's "
        "*_blocks/*_scales tensors from safetensors shards (the Hub layout of openai/gpt-oss-*)"
    )


def _set_tensor(model, name: str, value) -> None:
    import torch

    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        raise GptossHpcError(f"checkpoint tensor {name} has no place in the gpt-oss model")


def load_mxfp4_model(
    folder: str | Path,
    device,
    dtype,
    attn_implementation: str,
    experts_implementation: str | None = None,
    config=None,
):
    """gpt-oss from a local MXFP4 checkpoint folder with the experts kept as blocks/scales on ``device``.

    The skeleton is built on the meta device, then every tensor of the shards is read on its own (one tensor in
    host memory at a time) and moved to ``device``: floating tensors are cast to ``dtype``, blocks/scales stay
    uint8. Peak host RAM is the largest single tensor (the embedding, 1.2 GB in bf16)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if config is None:
        config = AutoConfig.from_pretrained(str(folder))
    # the Hub config carries quantization_config (mxfp4): its quantizer would dequantize or need triton kernels
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with mxfp4_experts_in_models(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, **_model_kwargs(dtype, attn_implementation, experts_implementation)
        )
    files = _shard_files(folder)
    from gptoss_hpc.modeling.mxfp4.experts import Mxfp4Experts

    # the experts' blocks/scales are non-persistent buffers (kept out of training checkpoints), so not in state_dict
    expected = set(model.state_dict().keys()) | {
        f"{prefix}.{name}_{part}"
        for prefix, module in model.named_modules()
        if isinstance(module, Mxfp4Experts)
        for name in EXPERT_PARAMS
        for part in ("blocks", "scales")
    }
    missing = sorted(expected - set(files))
    if missing:
        raise GptossHpcError(
            f"{folder} lacks {len(missing)} tensors the model needs (first: {missing[:3]}); is it a gpt-oss "
            "MXFP4 checkpoint (*_blocks/*_scales experts)?"
        )
    by_file: dict[Path, list[str]] = {}
    for name in sorted(expected):
        by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in names:
                t = f.get_tensor(name)
                if t.is_floating_point():
                    t = t.to(dtype)
                _set_tensor(model, name, t.to(device))
                del t
    _rebuild_non_persistent(model, device)
    for module in mxfp4_modules(model):
        module.reset_placeholders()
        for name in EXPERT_PARAMS:
            scales = getattr(module, f"{name}_scales")
            lo, hi = int(scales.min()), int(scales.max())
            if lo < SCALE_RANGE[0] or hi > SCALE_RANGE[1]:
                raise GptossHpcError(
                    f"{folder}: {name} scales span {lo}..{hi}, outside {SCALE_RANGE} (values below 2**-125 or above "
                    "2**125) where the MXFP4-resident path is exact; use model.experts_dtype=bfloat16"
                )
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise GptossHpcError(f"tensors left unloaded after reading {folder}: {left[:5]}")
    log.info("loaded %s with MXFP4-resident experts on %s", folder, device)
    return model


def _rebuild_non_persistent(model, device) -> None:
    """The rotary inverse frequencies are computed in __init__, not stored: compute them again on ``device``."""
    import torch

    for name, module in model.named_modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            with torch.device(device):
                fresh = type(module)(config=module.config)
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, fresh)


def write_mxfp4_checkpoint(model, folder: str | Path, max_shard_bytes: int = 2**30) -> Path:
    """Save a bf16/fp32 gpt-oss in the Hub's MXFP4 layout (experts quantized with ``quantize_mxfp4``, the rest as
    it is, config.json with ``quantization_config: {quant_method: mxfp4}``), sharded with an index. For tests and
    the tiny MXFP4 base; layer by layer, so only one layer's experts are quantized in memory at a time."""
    import copy

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = [{}]
    sizes = [0]

    def add(name: str, t) -> None:
        t = t.detach().contiguous().cpu()
        if sizes[-1] and sizes[-1] + t.numel() * t.element_size() > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t
        sizes[-1] += t.numel() * t.element_size()

    for name, t in model.state_dict().items():
        stem, _, leaf = name.rpartition(".")
        if leaf in EXPERT_PARAMS and stem.endswith("mlp.experts"):
            blocks, scales = quantize_mxfp4(t)
            add(f"{name}_blocks", blocks)
            add(f"{name}_scales", scales)
        else:
            add(name, t)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config = copy.deepcopy(model.config)
    config.quantization_config = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    config.save_pretrained(str(folder))
    return folder


def load_mxfp4_peft_model(
    base_folder: str | Path,
    adapter_folder: str | Path,
    device,
    dtype,
    attn_implementation: str,
    experts_implementation: str | None = None,
):
    """An MXFP4-resident base + a LoRA adapter, unmerged, ready for inference (eval/serve of a model whose bf16
    merge would not fit one GPU): the expert LoRA runs factored next to the just-in-time dequantized experts."""
    from peft import PeftModel

    from gptoss_hpc.modeling.fast.experts import factor_expert_lora
    from gptoss_hpc.modeling.mxfp4.experts import release_placeholders

    base = load_mxfp4_model(base_folder, device, dtype, attn_implementation, experts_implementation)
    model = PeftModel.from_pretrained(base, str(adapter_folder))
    factor_expert_lora(model)
    release_placeholders(model)
    model.eval()
    return model
