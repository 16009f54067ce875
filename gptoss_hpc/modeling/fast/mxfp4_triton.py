"""The MXFP4 -> bf16 dequant as one hand-written Triton kernel (CUDA only; imported lazily, since it imports triton).

Each program turns a run of 16-byte blocks (32 e2m1 codes sharing one e8m0 scale) into their 32 bf16 values: the
same integer construction as ``gptoss_hpc.modeling.mxfp4_format.dequantize_mxfp4`` (so bit for bit transformers'
``convert_moe_packed_tensors``), with both sides contiguous: 16 bytes in, one int32 per byte out (its two bf16,
low nibble first). torch.compile's kernel for the same math reached ~2.4 TB/s on the H200 (docs/BENCHMARKS.md,
issue 14); the dequant was 21% of the MXFP4 20b train step's GPU time (session 7's profile), run twice per layer
and micro-batch (forward and input gradient)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# rows of 16 bytes per program: 256 rows = 4 KiB read and 16 KiB written
BLOCK_ROWS = 256
NUM_WARPS = 4


@triton.jit
def _bf16_bits(code, scale):
    # e2m1 (sign, 2-bit exponent e, 1-bit mantissa m) x 2**(scale - 127) as bf16 bits: normal values
    # 2**(e-1) * (1 + m/2) get the exponent field e - 1 + scale; the subnormal 0.5 gets scale - 1; zero stays 0
    e = (code >> 1) & 3
    m = code & 1
    field = tl.where(e > 0, e - 1 + scale, tl.where(m > 0, scale - 1, 0))
    mantissa = tl.where(e > 0, m << 6, 0)
    return ((code & 8) << 12) | (field << 7) | mantissa


@triton.jit
def _dequant_kernel(blocks_ptr, scales_ptr, out_ptr, n_rows, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = rows < n_rows
    offs = rows[:, None] * 16 + tl.arange(0, 16)[None, :]
    b = tl.load(blocks_ptr + offs, mask=live[:, None], other=0).to(tl.int32)
    s = tl.load(scales_ptr + rows, mask=live, other=0).to(tl.int32)[:, None]
    packed = _bf16_bits(b & 15, s) | (_bf16_bits(b >> 4, s) << 16)
    tl.store(out_ptr + offs, packed, mask=live[:, None])


@triton.jit
def _dequant_lut_kernel(blocks_ptr, scales_ptr, lut_ptr, nonzero_ptr, out_ptr, n_rows, BLOCK: tl.constexpr):
    # Fewer integer ops per byte than _bf16_bits (the H200 ran that one at the int32 ALU's rate, not HBM's): each
    # byte's two bf16 at scale LUT_SCALE come from a 256-entry table, and the scale's exponent is added to the
    # lanes that are not zero. Both lanes stay non-negative below 2**16, so no carry crosses between them.
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = rows < n_rows
    offs = rows[:, None] * 16 + tl.arange(0, 16)[None, :]
    b = tl.load(blocks_ptr + offs, mask=live[:, None], other=0).to(tl.int32)
    s = tl.load(scales_ptr + rows, mask=live, other=2).to(tl.int32)
    shift = (((s - 2) << 7) * 65537)[:, None]
    packed = tl.load(lut_ptr + b) + (shift & tl.load(nonzero_ptr + b))
    tl.store(out_ptr + offs, packed, mask=live[:, None])


_LUTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
LUT_SCALE = 2  # the smallest scale load_mxfp4_model accepts (mxfp4_format.SCALE_RANGE): exponent shifts are >= 0


def _luts(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per byte value: its two bf16 (low nibble in the low half) at scale LUT_SCALE, and 0xFFFF in each half whose
    code is not +-0."""
    if device not in _LUTS:
        from gptoss_hpc.modeling.mxfp4_format import _fp32_bits

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
                          num_warps: int = NUM_WARPS, method: str = "lut") -> torch.Tensor:  # fmt: skip
    """[E, out, G, 16] uint8 blocks + [E, out, G] uint8 scales (CUDA) -> the [E, G*32, out] bf16 weight, a
    transposed view of a contiguous [E, out, G*32] tensor, as ``dequantize_mxfp4`` returns it."""
    e, out, g, half = blocks.shape
    if half != 16 or blocks.dtype != torch.uint8 or scales.shape != (e, out, g):
        raise ValueError(f"MXFP4 blocks [E, out, G, 16] uint8 with scales [E, out, G]: got {tuple(blocks.shape)} "
                         f"{blocks.dtype} and {tuple(scales.shape)}")  # fmt: skip
    blocks, scales = blocks.contiguous(), scales.contiguous()
    packed = torch.empty((e, out, g * 16), dtype=torch.int32, device=blocks.device)
    n_rows = e * out * g
    grid = (triton.cdiv(n_rows, block_rows),)
    if method == "lut":
        lut, nonzero = _luts(blocks.device)
        _dequant_lut_kernel[grid](blocks, scales, lut, nonzero, packed, n_rows, BLOCK=block_rows, num_warps=num_warps)
    else:
        _dequant_kernel[grid](blocks, scales, packed, n_rows, BLOCK=block_rows, num_warps=num_warps)
    return packed.view(torch.bfloat16).transpose(1, 2)
