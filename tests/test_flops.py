"""The useful-FLOP count behind MFU (gptoss_hpc.config.flops), checked against hand counts."""

from __future__ import annotations

from gptoss_hpc.config import flops
from gptoss_hpc.config.memory import Arch
from gptoss_hpc.resources import RESOURCES


def test_20b_active_params_match_the_published_count() -> None:
    arch = Arch.from_json(RESOURCES / "gpt_oss_20b_config.json")
    assert arch.full_attention_layers == 12 and arch.sliding_window == 128
    # 3.61B active parameters per token (OpenAI's model card: 3.6B)
    assert abs(flops.active_matmul_params(arch) - 3.6071e9) < 1e5


def test_attention_flops_causal_and_windowed_by_hand() -> None:
    arch = Arch(
        vocab=10,
        hidden=8,
        layers=2,
        heads=2,
        kv_heads=1,
        head_dim=4,
        experts=2,
        top_k=1,
        intermediate=8,
        full_attention_layers=1,
        sliding_window=3,
    )
    # one document of 5 tokens: full layer sees 1+2+3+4+5 = 15 keys, sliding (w=3) 1+2+3+3+3 = 12
    assert flops.attention_flops(arch, [5]) == 3 * 4 * 8 * (15 + 12)
    # packing two documents attends within each only
    assert flops.attention_flops(arch, [2, 3]) == flops.attention_flops(arch, [2]) + flops.attention_flops(arch, [3])
    assert flops.train_flops(arch, [5]) == 4 * flops.active_matmul_params(arch) * 5 + 3 * 4 * 8 * 27


def test_mfu_of_the_h100_long_row_bench() -> None:
    """bench train, 20b, one 32,768-token row, 11,681 tok/s on an H100 (docs/BENCHMARKS.md): ~0.35."""
    arch = Arch.from_json(RESOURCES / "gpt_oss_20b_config.json")
    seconds = 32768 / 11681
    assert 0.34 < flops.mfu(arch, [32768], seconds, "NVIDIA H100 80GB HBM3") < 0.36
