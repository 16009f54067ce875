"""gpt-oss's MXFP4 expert format: constants, dequantize (bit for bit transformers' ``convert_moe_packed_tensors``)
and quantize. A leaf module (torch imported inside functions): the MXFP4 experts and their grouped-GEMM op read it,
``gptoss_hpc.modeling.mxfp4.model`` (model construction) re-exports it. See that module's docstring for the layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gptoss_hpc.errors import GptossHpcError

if TYPE_CHECKING:
    import torch

# transformers.integrations.mxfp4.FP4_VALUES: the 16 e2m1 codes, sign in the high bit
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127
BLOCK = 32
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


# Scales for which e2m1 x 2**(scale - 127) is a normal float (the bit construction below is exact there): real
# checkpoints hold ~110..135; load_mxfp4_model refuses others.
SCALE_RANGE = (2, 252)


def _fp32_bits(code, scale):
    """IEEE fp32 bits of e2m1 ``code`` (int32, 0..15) x 2**(scale - 127): sign, exponent field and mantissa
    built directly (e2m1 normal 2**(e-1) * (1 + m/2) -> exponent field e - 1 + scale; subnormal 0.5 -> scale - 1)."""
    import torch

    e = (code >> 1) & 3
    m = code & 1
    field = torch.where(e > 0, e - 1 + scale, torch.where(m > 0, scale - 1, torch.zeros_like(scale)))
    mantissa = torch.where(e > 0, m << 22, torch.zeros_like(m))
    return ((code & 8) << 28) | (field << 23) | mantissa


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[E, out, G, 16] uint8 blocks + [E, out, G] uint8 scales -> the [E, G*32, out] weight (a transposed view).

    Bit for bit what ``convert_moe_packed_tensors`` gives (for scales in SCALE_RANGE), built from integer ops:
    for bf16 each input byte becomes one int32 holding its two bf16 values (low nibble first, little-endian), so
    the pass is a plain elementwise map (read 1 byte, write 4) that torch.compile turns into one vectorised kernel.
    The transposed view is what grouped_mm takes (column-major per expert): no copy."""
    import torch

    e, out, g, half = blocks.shape
    b = blocks.to(torch.int32)
    s = scales.to(torch.int32)[..., None]
    lo, hi = _fp32_bits(b & 15, s), _fp32_bits(b >> 4, s)
    if dtype == torch.bfloat16:  # the upper half of an fp32 whose mantissa has one bit is that value in bf16
        packed = ((lo >> 16) & 0xFFFF) | (hi & -65536)
        return packed.view(torch.bfloat16).reshape(e, out, g * 2 * half).transpose(1, 2)
    vals = torch.stack((lo, hi), dim=-1).view(torch.float32).reshape(e, out, g * 2 * half)
    return vals.to(dtype).transpose(1, 2)


def dequantize_mxfp4_lut(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The LUT formulation of transformers' ``convert_moe_packed_tensors`` (fp32 LUT x 2**(scale - 127), rounded
    once): the independent reference ``dequantize_mxfp4`` is tested against."""
    import torch

    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    e, out, g, half = blocks.shape
    lo = (blocks & 0x0F).to(torch.int32)
    hi = (blocks >> 4).to(torch.int32)
    vals = torch.stack((lut[lo], lut[hi]), dim=-1).reshape(e, out, g, 2 * half)
    exp = torch.pow(2.0, (scales.to(torch.int32) - SCALE_BIAS).to(torch.float32))
    w = (vals * exp[..., None]).to(dtype).reshape(e, out, g * 2 * half)
    return w.transpose(1, 2)


# Midpoints between the non-negative e2m1 magnitudes (0, 0.5, 1, 1.5, 2, 3, 4, 6): a tie goes to the lower one
_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def quantize_mxfp4(weight: torch.Tensor, experts_per_chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, in, out] weight -> (blocks, scales) in the Hub layout, round-to-nearest e2m1 (ties to the smaller
    magnitude, values that round to zero stored as +0) with the largest-magnitude element of each 32-block mapped
    to at most 6. The inverse of ``dequantize_mxfp4`` on weights that are already MXFP4-representable; used for
    synthetic checkpoints and ``merge.format=mxfp4``. A few experts at a time, so the fp32 work stays near
    ``experts_per_chunk`` experts (a 120b gate_up stack is 8.5 GB in fp32)."""
    import torch

    e, d_in, d_out = weight.shape
    if d_in % BLOCK:
        raise GptossHpcError(f"MXFP4 needs the input dimension to be a multiple of {BLOCK} (got {d_in})")
    blocks = torch.empty((e, d_out, d_in // BLOCK, BLOCK // 2), dtype=torch.uint8, device=weight.device)
    scales = torch.empty((e, d_out, d_in // BLOCK), dtype=torch.uint8, device=weight.device)
    bounds = torch.tensor(_E2M1_BOUNDS, dtype=torch.float32, device=weight.device)
    for lo in range(0, e, experts_per_chunk):
        hi = min(e, lo + experts_per_chunk)
        w = weight[lo:hi].detach().float().transpose(1, 2).reshape(hi - lo, d_out, d_in // BLOCK, BLOCK).contiguous()
        amax = w.abs().amax(dim=-1).clamp(min=2.0**-126)
        exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-SCALE_BIAS, 127)
        scaled = w / torch.pow(2.0, exp)[..., None]
        codes = torch.bucketize(scaled.abs(), bounds).to(torch.uint8)  # right=False: a tie takes the lower code
        codes |= ((scaled < 0) & (codes > 0)).to(torch.uint8) << 3
        blocks[lo:hi] = codes[..., 0::2] | (codes[..., 1::2] << 4)
        scales[lo:hi] = (exp + SCALE_BIAS).to(torch.uint8)
    return blocks, scales
