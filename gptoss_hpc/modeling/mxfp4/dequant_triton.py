"""The MXFP4 -> bf16 dequant as one hand-written Triton kernel (CUDA only; imported lazily, since it imports triton).

Each program turns a run of 16-byte blocks (32 e2m1 codes sharing one e8m0 scale) into their 32 bf16 values, bit
for bit ``gptoss_hpc.modeling.mxfp4.format.dequantize_mxfp4`` and so transformers' ``convert_moe_packed_tensors``
(for scales in SCALE_RANGE), with both sides contiguous: 16 bytes in, one int32 per byte out (its two bf16, low
nibble first). The dequant runs twice per layer and micro-batch (forward and input gradient), a large share of
the MXFP4 train step's GPU time; this kernel against torch.compile's for dequantize_mxfp4: docs/BENCHMARKS.md,
2026-11-30 (39f874e, f7aac5b)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# rows of 16 bytes per program: 256 rows = 4 KiB read and 16 KiB written (the fastest of 64-512 rows x 4-8 warps
# on the H200, by a few percent: docs/BENCHMARKS.md, 2026-11-30, f7aac5b)
BLOCK_ROWS = 256
NUM_WARPS = 8


@triton.jit
def _dequant_kernel(blocks_ptr, scales_ptr, lut_ptr, nonzero_ptr, out_ptr, n_rows, BLOCK: tl.constexpr):
    # Few integer ops per byte (building the bits from the code, as dequantize_mxfp4 does, ran at the int32 ALU's
    # rate on the H200, not HBM's): each byte's two bf16 at scale LUT_SCALE come from a 256-entry table, and the
    # scale's exponent is added to the lanes that are not +-0. Both lanes stay non-negative below 2**16, so no carry
    # crosses between them.
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = rows < n_rows
    offs = rows[:, None] * 16 + tl.arange(0, 16)[None, :]
    b = tl.load(blocks_ptr + offs, mask=live[:, None], other=0).to(tl.int32)
    s = tl.load(scales_ptr + rows, mask=live, other=2).to(tl.int32)
    shift = (((s - 2) << 7) * 65537)[:, None]  # 2 = LUT_SCALE; the exponent shift in both 16-bit lanes
    packed = tl.load(lut_ptr + b) + (shift & tl.load(nonzero_ptr + b))
    tl.store(out_ptr + offs, packed, mask=live[:, None])


_LUTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
LUT_SCALE = 2  # the smallest scale load_mxfp4_model accepts (mxfp4_format.SCALE_RANGE): exponent shifts are >= 0


def _luts(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per byte value: its two bf16 (low nibble in the low half) at scale LUT_SCALE, and 0xFFFF in each half whose
    code is not +-0."""
    if device not in _LUTS:
        from gptoss_hpc.modeling.mxfp4.format import _fp32_bits

        codes = torch.arange(16, dtype=torch.int32)
        bits = ((_fp32_bits(codes, torch.full_like(codes, LUT_SCALE)) >> 16) & 0xFFFF).tolist()
        live = [0xFFFF if c & 7 else 0 for c in range(16)]

        def as_int32(lo: int, hi: int) -> int:
            v = lo | (hi << 16)
            return v - (1 << 32) if v >= 1 << 31 else v

        lut = torch.tensor([as_int32(bits[v & 15], bits[v >> 4]) for v in range(256)], dtype=torch.int32)
        nonzero = torch.tensor([as_int32(live[v & 15], live[v >> 4]) for v in range(256)], dtype=torch.int32)
        _LUTS[device] = (lut.to(device), nonzero.to(device))
    return _LUTS[device]


def dequantize_mxfp4_bf16(blocks: torch.Tensor, scales: torch.Tensor, block_rows: int = BLOCK_ROWS,
                          num_warps: int = NUM_WARPS) -> torch.Tensor:  # fmt: skip
    """[E, out, G, 16] uint8 blocks + [E, out, G] uint8 scales (CUDA) -> the [E, G*32, out] bf16 weight, a
    transposed view of a contiguous [E, out, G*32] tensor, as ``dequantize_mxfp4`` returns it."""
    e, out, g, half = blocks.shape
    if half != 16 or blocks.dtype != torch.uint8 or scales.shape != (e, out, g):
        raise ValueError(f"MXFP4 blocks [E, out, G, 16] uint8 with scales [E, out, G]: got {tuple(blocks.shape)} "
                         f"{blocks.dtype} and {tuple(scales.shape)}")  # fmt: skip
    blocks, scales = blocks.contiguous(), scales.contiguous()
    packed = torch.empty((e, out, g * 16), dtype=torch.int32, device=blocks.device)
    n_rows = e * out * g
    lut, nonzero = _luts(blocks.device)
    _dequant_kernel[(triton.cdiv(n_rows, block_rows),)](blocks, scales, lut, nonzero, packed, n_rows,
                                                             BLOCK=block_rows, num_warps=num_warps)  # fmt: skip
    return packed.view(torch.bfloat16).transpose(1, 2)
