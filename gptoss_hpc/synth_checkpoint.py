"""A random-weight gpt-oss checkpoint in the Hub's on-disk layout, written offline.

    python -m gptoss_hpc.synth_checkpoint --size 20b --device cuda /tmp/gpt-oss-20b-synth
    python -m gptoss_hpc.launch model=local model.name_or_path=/tmp/gpt-oss-20b-synth

The folder looks like openai/gpt-oss-20b (120b) on the Hub: ``config.json`` in the Hub's own form (4.55
keys, ``quantization_config`` mxfp4), ``generation_config.json``, ``model-0000K-of-0000N.safetensors``
shards + ``model.safetensors.index.json`` (same tensor order, same 4.8 GB greedy sharding and 0-based
shard names as transformers' ``convert_gpt_oss_weights_to_hf.py``, so the 20b index reproduces the Hub's
``total_size`` 13,761,264,768 and shard split), MXFP4 experts as ``*_blocks`` / ``*_scales`` uint8, every
other tensor bf16, and the gpt-oss tokenizer (built offline, see gptoss_hpc.modeling.tokenizer) with its chat
template. So ``from_pretrained(folder, quantization_config=Mxfp4Config(dequantize=True))`` runs the same
code as for the real model.

Values: uniform random FP4 nibbles under a scale of 2^-8 or 2^-7 give dequantized experts of std ~0.018
(initializer_range is 0.02); bf16 matrices are N(0, 0.02), biases and sinks N(0, 0.02), norms 1 + N(0, 0.02).
Each tensor draws from its own generator seeded by (seed, tensor name), so a layer's weights do not depend
on how many layers are written; the draws differ between --device cpu and cuda.

``--size tiny`` is the project's tiny gpt-oss (gptoss_hpc/resources/tiny_gpt_oss.json: hidden 64,
intermediate 64, both multiples of MXFP4's 32-value blocks, so the shape is unchanged) with the real
201,088-token vocabulary, sharded at 32 MB so that it too has several shards and an index.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gptoss_hpc.errors import GptossHpcError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SIZES = {"tiny": "tiny_gpt_oss", "20b": "gpt_oss_20b_config", "120b": "gpt_oss_120b_config"}
# transformers' convert_gpt_oss_weights_to_hf.py save_sharded_model: max_shard_size = 4.8 GB.
HUB_MAX_SHARD_BYTES = 4_800_000_000
TINY_MAX_SHARD_BYTES = 32_000_000
MXFP4_BLOCK = 32  # values per scale; 16 bytes of two FP4 nibbles
QUANTIZATION_CONFIG = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}
# openai/gpt-oss-20b's generation_config.json
GENERATION_CONFIG = {
    "bos_token_id": 199998,
    "do_sample": True,
    "eos_token_id": [200002, 199999, 200012],
    "pad_token_id": 199999,
    "transformers_version": "4.55.0.dev0",
}
INIT_STD = 0.02
# Scale bytes are biased exponents (2^(s-127)); a uniform FP4 nibble has rms 2.93, so 2^-8..2^-7 ~ 0.018.
SCALE_EXPONENTS = (-8, -7)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    kind: str  # "weight" | "bias" | "norm" | "blocks" | "scales"

    @property
    def is_uint8(self) -> bool:
        return self.kind in ("blocks", "scales")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (1 if self.is_uint8 else 2)


def hub_config(size: str, num_hidden_layers: int | None = None) -> dict:
    """config.json as the Hub ships it (transformers 4.55 keys), sized from the bundled resource json."""
    from gptoss_hpc.resources import tiny_config_path

    if size not in SIZES:
        raise GptossHpcError(f"--size {size!r} is not one of {sorted(SIZES)}")
    src = json.loads(tiny_config_path(SIZES[size]).read_text())
    layers = src["num_hidden_layers"] if num_hidden_layers is None else num_hidden_layers
    if layers < 1:
        raise GptossHpcError(f"--num-hidden-layers must be >= 1 (got {layers})")
    for key in ("hidden_size", "intermediate_size"):
        if src[key] % MXFP4_BLOCK:
            raise GptossHpcError(f"{key}={src[key]} of {size} is not a multiple of MXFP4's {MXFP4_BLOCK}")
    rope = dict(src["rope_parameters"])
    theta = rope.pop("rope_theta")
    pattern = ("sliding_attention", "full_attention")
    return {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": 200002,
        "experts_per_token": src["num_experts_per_tok"],
        "head_dim": src["head_dim"],
        "hidden_act": "silu",
        "hidden_size": src["hidden_size"],
        "initial_context_length": rope["original_max_position_embeddings"],
        "initializer_range": src["initializer_range"],
        "intermediate_size": src["intermediate_size"],
        "layer_types": [pattern[i % 2] for i in range(layers)],
        "max_position_embeddings": src["max_position_embeddings"],
        "model_type": "gpt_oss",
        "num_attention_heads": src["num_attention_heads"],
        "num_experts_per_tok": src["num_experts_per_tok"],
        "num_hidden_layers": layers,
        "num_key_value_heads": src["num_key_value_heads"],
        "num_local_experts": src["num_local_experts"],
        "output_router_logits": False,
        "pad_token_id": 199999,
        "quantization_config": QUANTIZATION_CONFIG,
        "rms_norm_eps": src["rms_norm_eps"],
        "rope_scaling": rope,
        "rope_theta": int(theta) if float(theta).is_integer() else theta,
        "router_aux_loss_coef": src["router_aux_loss_coef"],
        "sliding_window": src["sliding_window"],
        "swiglu_limit": src["swiglu_limit"],
        "tie_word_embeddings": False,
        "transformers_version": "4.55.0.dev0",
        "use_cache": True,
        "vocab_size": src["vocab_size"],
    }


def tensor_specs(config: dict) -> list[TensorSpec]:
    """Every tensor, in the order of the Hub's index (layers in string order, as the original keys sort)."""
    h, inter, experts = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    specs: list[TensorSpec] = []
    for i in sorted(range(config["num_hidden_layers"]), key=str):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", (h,), "norm"),
            TensorSpec(p + "self_attn.o_proj.bias", (h,), "bias"),
            TensorSpec(p + "self_attn.o_proj.weight", (h, q), "weight"),
            TensorSpec(p + "self_attn.q_proj.bias", (q,), "bias"),
            TensorSpec(p + "self_attn.k_proj.bias", (kv,), "bias"),
            TensorSpec(p + "self_attn.v_proj.bias", (kv,), "bias"),
            TensorSpec(p + "self_attn.q_proj.weight", (q, h), "weight"),
            TensorSpec(p + "self_attn.k_proj.weight", (kv, h), "weight"),
            TensorSpec(p + "self_attn.v_proj.weight", (kv, h), "weight"),
            TensorSpec(p + "self_attn.sinks", (config["num_attention_heads"],), "bias"),
            TensorSpec(p + "mlp.router.bias", (experts,), "bias"),
            TensorSpec(p + "mlp.router.weight", (experts, h), "weight"),
        ]
        # blocks [experts, out_features, in_features / 32, 16]; scales [experts, out_features, in_features / 32]
        for proj, out_f, in_f in (("gate_up_proj", 2 * inter, h), ("down_proj", h, inter)):
            g = in_f // MXFP4_BLOCK
            specs += [
                TensorSpec(f"{p}mlp.experts.{proj}_bias", (experts, out_f), "bias"),
                TensorSpec(f"{p}mlp.experts.{proj}_blocks", (experts, out_f, g, MXFP4_BLOCK // 2), "blocks"),
                TensorSpec(f"{p}mlp.experts.{proj}_scales", (experts, out_f, g), "scales"),
            ]
        specs.append(TensorSpec(p + "post_attention_layernorm.weight", (h,), "norm"))
    vocab = config["vocab_size"]
    specs += [
        TensorSpec("model.embed_tokens.weight", (vocab, h), "weight"),
        TensorSpec("model.norm.weight", (h,), "norm"),
        TensorSpec("lm_head.weight", (vocab, h), "weight"),
    ]
    return specs


def shard_plan(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy sharding exactly as save_sharded_model: a tensor that would overflow starts a new shard."""
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        if used + spec.nbytes > max_shard_bytes and shards[-1]:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += spec.nbytes
    return shards


def shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count - 1:05d}.safetensors"  # 0-based, "of" the last index, as the Hub


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def make_tensor(spec: TensorSpec, seed: int, device: torch.device) -> torch.Tensor:
    import torch

    gen = torch.Generator(device=device).manual_seed(_seed_for(seed, spec.name))
    if spec.kind == "blocks":
        return torch.randint(0, 256, spec.shape, generator=gen, dtype=torch.uint8, device=device)
    if spec.kind == "scales":
        lo, hi = SCALE_EXPONENTS
        exp = torch.randint(lo, hi + 1, spec.shape, generator=gen, dtype=torch.int16, device=device)
        return (exp + 127).to(torch.uint8)
    out = torch.randn(spec.shape, generator=gen, dtype=torch.bfloat16, device=device).mul_(INIT_STD)
    return out.add_(1.0) if spec.kind == "norm" else out


def write_checkpoint(
    out_dir: Path,
    size: str,
    *,
    num_hidden_layers: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the folder through a temp dir next to it and a rename: never half-written."""
    import torch
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise GptossHpcError(f"{out_dir} exists and is not empty; remove it, pick another OUT_DIR or --overwrite")
    if device == "cuda" and not torch.cuda.is_available():
        raise GptossHpcError("--device cuda but torch sees no GPU; use --device cpu")
    dev = torch.device(device)
    config = hub_config(size, num_hidden_layers)
    limit = max_shard_bytes or (TINY_MAX_SHARD_BYTES if size == "tiny" else HUB_MAX_SHARD_BYTES)
    shards = shard_plan(tensor_specs(config), limit)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        weight_map: dict[str, str] = {}
        total = 0
        for k, shard in enumerate(shards):
            t0 = time.perf_counter()
            fname = shard_name(k, len(shards))
            tensors = {s.name: make_tensor(s, seed, dev).cpu() for s in shard}
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            nbytes = sum(s.nbytes for s in shard)
            total += nbytes
            weight_map.update({s.name: fname for s in shard})
            del tensors
            log.info("wrote %s: %d tensors, %.2f GB, %.1f s", fname, len(shard), nbytes / 1e9, time.perf_counter() - t0)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
        _write_tokenizer(tmp)
        _make_readable(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _make_readable(folder: Path) -> None:
    """mkdtemp and safetensors create owner-only modes; a shared checkpoint follows the umask instead."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _write_tokenizer(folder: Path) -> None:
    from gptoss_hpc.config.schema import ModelConfig
    from gptoss_hpc.modeling.tokenizer import load_tokenizer

    tok = load_tokenizer(ModelConfig(tokenizer="offline"))
    tok.save_pretrained(str(folder))
    # The Hub's files name the class every transformers 4.5x/5.x knows, and carry no save-time flags.
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("backend", "is_local", "local_files_only"):
        cfg.pop(key, None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["model_input_names"] = ["input_ids", "attention_mask"]
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    special = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptoss_hpc.synth_checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), required=True)
    parser.add_argument("--num-hidden-layers", type=int, default=None, help="default: the real model's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the weights are drawn")
    parser.add_argument("--max-shard-bytes", type=int, default=None, help="default 4.8e9 (the Hub's), tiny 32e6")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    try:
        out = write_checkpoint(
            args.out_dir,
            args.size,
            num_hidden_layers=args.num_hidden_layers,
            seed=args.seed,
            device=args.device,
            max_shard_bytes=args.max_shard_bytes,
            overwrite=args.overwrite,
        )
    except GptossHpcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote gpt-oss {args.size} (random weights, MXFP4 experts) to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
