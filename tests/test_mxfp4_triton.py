"""The Triton MXFP4 dequant kernel (gptoss_hpc.modeling.mxfp4.dequant_triton), the one the GPU trains with, run by
Triton's own CPU interpreter (TRITON_INTERPRET=1): bit for bit transformers' ``convert_moe_packed_tensors`` and our
``dequantize_mxfp4`` over every byte value, the scale range real checkpoints use, and row counts that leave a
partial last tile. Triton lives in its own folder (the Makefile's TRITON_DIR), so each check runs in a subprocess
with it on the path. The GPU check times it and compares it again on the H200 (``bench mxfp4``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRITON_DIR = Path(sys.prefix) / "triton-interpreter"  # the venv the suite runs in

SCRIPT = r"""
import sys
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors
from gptoss_hpc.modeling.mxfp4.format import SCALE_RANGE, dequantize_mxfp4
from gptoss_hpc.modeling.mxfp4.dequant_triton import dequantize_mxfp4_bf16

experts, out, groups, block_rows = (int(a) for a in sys.argv[1:5])
g = torch.Generator().manual_seed(experts * 1000 + out)
blocks = torch.randint(0, 256, (experts, out, groups, 16), dtype=torch.uint8, generator=g)
blocks.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)  # every code pair at least once
lo, hi = SCALE_RANGE
scales = torch.randint(lo, hi + 1, (experts, out, groups), dtype=torch.uint8, generator=g)
scales.view(-1)[:2] = torch.tensor([lo, hi], dtype=torch.uint8)
got = dequantize_mxfp4_bf16(blocks, scales, block_rows=block_rows)
ours = dequantize_mxfp4(blocks, scales, torch.bfloat16)
ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
assert got.shape == ours.shape == ref.shape, (got.shape, ref.shape)
assert got.stride() == ours.stride(), (got.stride(), ours.stride())
bits = got.contiguous().view(torch.int16)
assert torch.equal(bits, ours.contiguous().view(torch.int16)), "differs from dequantize_mxfp4"
assert torch.equal(bits, ref.contiguous().view(torch.int16)), "differs from convert_moe_packed_tensors"
print("bit-equal", tuple(got.shape))
"""


def _run(*args) -> subprocess.CompletedProcess:
    if not (TRITON_DIR / "triton").is_dir():
        pytest.fail(f"no Triton in {TRITON_DIR}: `make test` installs it (the Makefile's TRITON_STAMP)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{TRITON_DIR}{os.pathsep}{REPO}"}
    return subprocess.run([sys.executable, "-c", SCRIPT, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip


@pytest.mark.parametrize(
    "shape",
    [
        (2, 24, 4, 16),  # 192 rows of 16 bytes: several whole tiles
        (3, 20, 3, 64),  # 180 rows: a partial last tile (masked loads and stores)
        (1, 6, 90, 256),  # 20b's 90 blocks per row (2880 inputs), fewer rows than one tile
    ],
)
def test_the_triton_dequant_is_bit_equal_to_transformers(shape):
    proc = _run(*shape)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bit-equal" in proc.stdout


def test_a_wrong_layout_is_refused_with_the_shapes():
    script = (
        "import torch\nfrom gptoss_hpc.modeling.mxfp4.dequant_triton import dequantize_mxfp4_bf16\n"
        "dequantize_mxfp4_bf16(torch.zeros(2, 4, 3, 8, dtype=torch.uint8), torch.zeros(2, 4, 3, dtype=torch.uint8))"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{TRITON_DIR}{os.pathsep}{REPO}"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "MXFP4 blocks [E, out, G, 16] uint8" in proc.stderr and "(2, 4, 3, 8)" in proc.stderr
