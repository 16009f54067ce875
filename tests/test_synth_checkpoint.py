"""The synthetic checkpoint has the Hub's layout, and transformers' real MXFP4 loader reads it back exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gptoss_hpc.config.schema import ModelConfig
from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.synth_checkpoint import (
    HUB_MAX_SHARD_BYTES,
    QUANTIZATION_CONFIG,
    hub_config,
    shard_name,
    shard_plan,
    tensor_specs,
    write_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "gpt-oss-tiny"
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_hpc.synth_checkpoint", "--size", "tiny", "--seed", "3", str(out)],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for name, fname in index["weight_map"].items():
        with safe_open(str(folder / fname), "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def test_20b_index_matches_the_hub() -> None:
    """openai/gpt-oss-20b's index: total_size 13,761,264,768 over three 0-based shards, split inside layer 6."""
    specs = tensor_specs(hub_config("20b"))
    shards = shard_plan(specs, HUB_MAX_SHARD_BYTES)
    assert sum(s.nbytes for s in specs) == 13_761_264_768
    assert [shard_name(k, len(shards)) for k in range(len(shards))] == [
        "model-00000-of-00002.safetensors",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert shards[1][-1].name == "model.layers.6.mlp.experts.gate_up_proj_bias"
    assert shards[2][0].name == "model.layers.6.mlp.experts.gate_up_proj_blocks"
    assert [s.name for s in shards[2][-3:]] == ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    blocks = {s.name: s.shape for s in specs if s.name.startswith("model.layers.0.mlp.experts.")}
    assert blocks["model.layers.0.mlp.experts.gate_up_proj_blocks"] == (32, 5760, 90, 16)
    assert blocks["model.layers.0.mlp.experts.gate_up_proj_scales"] == (32, 5760, 90)
    assert blocks["model.layers.0.mlp.experts.down_proj_blocks"] == (32, 2880, 90, 16)
    assert blocks["model.layers.0.mlp.experts.down_proj_scales"] == (32, 2880, 90)


def test_tiny_layout_index_and_dtypes(tiny_ckpt: Path) -> None:
    files = {p.name for p in tiny_ckpt.iterdir()}
    hub_files = {"config.json", "generation_config.json", "model.safetensors.index.json", "chat_template.jinja"}
    assert hub_files | {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= files
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and shards == [shard_name(k, len(shards)) for k in range(len(shards))]
    assert set(shards) <= files and not [f for f in files if f.endswith(".safetensors") and f not in shards]
    config = json.loads((tiny_ckpt / "config.json").read_text())
    assert config["quantization_config"] == QUANTIZATION_CONFIG
    assert config["model_type"] == "gpt_oss" and "rope_scaling" in config and config["vocab_size"] == 201088
    tensors = _tensors(tiny_ckpt)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    experts = config["num_local_experts"]
    for name, t in tensors.items():
        if name.endswith(("_blocks", "_scales")):
            assert t.dtype == torch.uint8, name
        else:
            assert t.dtype == torch.bfloat16, name
    assert tensors["model.layers.1.mlp.experts.gate_up_proj_blocks"].shape == (experts, 128, 2, 16)
    assert tensors["model.layers.1.mlp.experts.down_proj_scales"].shape == (experts, 64, 2)
    assert not [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]


def test_transformers_loads_it_dequantized_on_cpu(tiny_ckpt: Path) -> None:
    """The project's loader (real from_pretrained + Mxfp4Config(dequantize=True)) with no kernels, no Hub."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from gptoss_hpc.config import compose, to_run_config, validate
    from gptoss_hpc.modeling.model import load_base_model

    cfg = validate(to_run_config(compose(["experiment=demo", "model=local", f"model.name_or_path={tiny_ckpt}"])))
    assert (cfg.model.num_hidden_layers, cfg.model.dequantize_mxfp4, cfg.model.tiny) == (2, True, False)
    model = load_base_model(cfg, None, for_training=True)
    state = model.state_dict()
    tensors = _tensors(tiny_ckpt)
    checked = 0
    for name, t in tensors.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            param = name.removesuffix("_blocks")
            expected = convert_moe_packed_tensors(t, tensors[param + "_scales"], dtype=torch.float32)
            assert torch.equal(state[param], expected), param
            assert 0.01 < expected.std().item() < 0.04, f"{param} std {expected.std().item()}"
        else:
            assert torch.equal(state[name], t.float()), name
        checked += 1
    assert checked == len([n for n in state if "rotary" not in n])
    logits = model(torch.tensor([[200006, 1428, 200008, 13225, 200007]])).logits
    assert torch.isfinite(logits).all() and 0.01 < logits.std().item() < 10


def test_tokenizer_is_the_offline_gptoss_one(tiny_ckpt: Path) -> None:
    from transformers import AutoTokenizer

    from gptoss_hpc.modeling.tokenizer import load_tokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_ckpt))
    ref = load_tokenizer(ModelConfig(tokenizer="offline"))
    text = "Explain why the sky is blue. <|start|>assistant"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|startoftext|>", "<|return|>", "<|endoftext|>")
    assert tok.chat_template == ref.chat_template


def test_refuses_a_non_empty_folder_and_leaves_it(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(GptossHpcError, match="not empty"):
        write_checkpoint(tmp_path, "tiny")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_num_hidden_layers_and_seed(tmp_path: Path) -> None:
    a = write_checkpoint(tmp_path / "a", "tiny", num_hidden_layers=1, seed=5, max_shard_bytes=10**9)
    b = write_checkpoint(tmp_path / "b", "tiny", num_hidden_layers=3, seed=5, max_shard_bytes=10**9)
    config = json.loads((b / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and len(config["layer_types"]) == 3
    ta, tb = _tensors(a), _tensors(b)
    assert not [n for n in ta if "layers.1." in n or "layers.2." in n]
    # a tensor's values depend on (seed, name) only, not on the layer count
    assert all(torch.equal(ta[n], tb[n]) for n in ta)
    assert [p.name for p in a.iterdir() if p.suffix == ".safetensors"] == ["model-00000-of-00000.safetensors"]


def test_model_local_errors_name_the_key(tiny_ckpt: Path, tmp_path: Path) -> None:
    from gptoss_hpc.config import compose, to_run_config, validate
    from gptoss_hpc.errors import ConfigError
    from gptoss_hpc.modeling.model import check_reachable

    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=r"model\.num_hidden_layers"):  # nothing to read the depth from
        validate(to_run_config(compose(["experiment=demo", "model=local", f"model.name_or_path={missing}"])))
    cfg = to_run_config(compose(["model=local", f"model.name_or_path={missing}", "model.num_hidden_layers=2"]))
    with pytest.raises(GptossHpcError, match="no model folder"):
        check_reachable(cfg)
    cfg = to_run_config(compose(["model=local", f"model.name_or_path={tiny_ckpt}", "model.num_hidden_layers=3"]))
    with pytest.raises(GptossHpcError, match=r"set model\.num_hidden_layers=2"):
        check_reachable(cfg)


def test_120b_index_matches_the_hub() -> None:
    """openai/gpt-oss-120b: 65,248,815,744 tensor bytes in 15 shards (model-00000-of-00014 .. 00014-of-00014)."""
    specs = tensor_specs(hub_config("120b"))
    shards = shard_plan(specs, HUB_MAX_SHARD_BYTES)
    assert sum(s.nbytes for s in specs) == 65_248_815_744
    assert shard_name(len(shards) - 1, len(shards)) == "model-00014-of-00014.safetensors"
