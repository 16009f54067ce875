"""The knob combinations of issue 13 item 1 (model.fused_experts, model.compile_layers, train.gradient_checkpointing,
train.packing, LoRA preset, ranks): the whole matrix, and the list the GPU check runs on a GPU."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Knobs:
    """One combination of the speed knobs (issue 13 item 1)."""

    fused_experts: bool
    compile_layers: bool
    gradient_checkpointing: bool
    packing: bool
    lora: str = "experts"
    ranks: int = 1

    @property
    def name(self) -> str:
        on = [k for k in ("fused_experts", "compile_layers", "gradient_checkpointing", "packing") if getattr(self, k)]
        return f"{self.lora} x{self.ranks}: " + (",".join(on) or "no knobs")

    def overrides(self) -> list[str]:
        return [
            f"model.fused_experts={str(self.fused_experts).lower()}",
            f"model.compile_layers={str(self.compile_layers).lower()}",
            f"train.gradient_checkpointing={str(self.gradient_checkpointing).lower()}",
            f"train.packing={str(self.packing).lower()}",
            f"lora={self.lora}",
        ]


def knob_matrix() -> list[Knobs]:
    """Every combination: 2^4 knob settings x 3 LoRA presets x 1-2 ranks (96). Each one validates; none is
    refused (gptoss_hpc.config.validate, tests/test_knob_combinations.py)."""
    b = (False, True)
    return [
        Knobs(f, c, g, p, lo, r)
        for f in b
        for c in b
        for g in b
        for p in b
        for lo in ("experts", "attention", "all_linear")
        for r in (1, 2)
    ]


# The GPU-only knob list: what only a GPU runs (flex_attention's backward, inductor/triton kernels, the compiled
# experts inside the checkpointed recompute, NCCL). CPU runs the rest through the real train stage
# (tests/test_knob_combinations.py, with torch.compile's aot_eager backend). On a 4-layer 20b-shaped checkpoint:
# every (fused_experts, compile_layers, gradient_checkpointing) triple for `experts`, packing on and off, the two
# shipped configs (default, reference) for the other presets, and both on 2 GPUs.
GPU_KNOBS: list[Knobs] = [
    Knobs(True, True, False, True),  # train=default with the GPU presets
    Knobs(True, True, True, False),  # train=reference: the H200 crash (compiled experts under recompute)
    Knobs(True, False, True, False),
    Knobs(False, True, True, False),
    Knobs(False, False, True, True),
    Knobs(True, False, False, True),
    Knobs(False, True, False, True),
    Knobs(False, False, False, False),
    Knobs(True, True, True, True),
    Knobs(True, True, False, False),
    Knobs(True, True, False, True, "attention"),
    Knobs(True, True, True, False, "attention"),
    Knobs(True, True, False, True, "all_linear"),
    Knobs(True, True, True, False, "all_linear"),
    Knobs(True, True, False, True, ranks=2),
    Knobs(True, True, True, False, ranks=2),
]
