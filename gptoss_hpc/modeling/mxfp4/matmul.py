"""The MXFP4 grouped GEMM: a custom op that dequantizes the expert stack just in time (compiled on CUDA) and
multiplies per expert group; its backward is the same op on the transposed weight. Used by the MXFP4 experts
(``gptoss_hpc.modeling.mxfp4.experts``) through the fused experts' core."""

from __future__ import annotations

import logging

import torch

from gptoss_hpc.modeling.fast.anatomy import _COMPILED
from gptoss_hpc.modeling.fast.grouped_mm import grouped_mm
from gptoss_hpc.modeling.mxfp4.format import dequantize_mxfp4

log = logging.getLogger(__name__)


def _compiles(device: torch.device) -> bool:
    """Compile on CUDA; ``_COMPILED["mxfp4_compile_backend"]`` (tests) also compiles elsewhere, with that backend."""
    return device.type == "cuda" or "mxfp4_compile_backend" in _COMPILED


def _compile(fn):
    return torch.compile(fn, dynamic=False, backend=_COMPILED.get("mxfp4_compile_backend", "inductor"))


def _dequantize(blocks, scales, dtype):
    """dequantize_mxfp4: bf16 on CUDA through the Triton kernel (gptoss_hpc.modeling.mxfp4.dequant_triton), else
    through torch.compile on CUDA (one fused pass; the eager version makes ~6 passes)."""
    if blocks.is_cuda and dtype == torch.bfloat16 and not _COMPILED.get("mxfp4_triton_disabled"):
        try:
            from gptoss_hpc.modeling.mxfp4.dequant_triton import dequantize_mxfp4_bf16

            return dequantize_mxfp4_bf16(blocks, scales)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # no triton, or a kernel that does not build here: the compiled path is exact too
            log.warning("Triton MXFP4 dequant failed (%s: %s); using the compiled one", type(exc).__name__, exc)
            _COMPILED["mxfp4_triton_disabled"] = True
    return _dequantize_compiled(blocks, scales, dtype)


def _dequantize_compiled(blocks, scales, dtype):
    if not _compiles(blocks.device) or _COMPILED.get("mxfp4_dequant_disabled"):
        return dequantize_mxfp4(blocks, scales, dtype)
    if "mxfp4_dequant" not in _COMPILED:
        _COMPILED["mxfp4_dequant"] = _compile(dequantize_mxfp4)
    try:
        return _COMPILED["mxfp4_dequant"](blocks, scales, dtype)
    except Exception as exc:  # a torch.compile failure must not kill a training run
        log.warning("compiled MXFP4 dequant failed (%s: %s); dequantizing eagerly", type(exc).__name__, exc)
        _COMPILED["mxfp4_dequant_disabled"] = True
        return dequantize_mxfp4(blocks, scales, dtype)


# A custom op, opaque to torch.compile: AOTAutograd's partitioner cannot decide to keep the dequantized weight
# (1-4 GiB per layer) alive for the backward; only blocks, scales and offsets are saved, and the backward is the
# same op on the transposed weight.
@torch.library.custom_op(
    "gptoss_hpc::mxfp4_grouped_mm",
    mutates_args=(),
    # spelled out: the annotations are strings under `from __future__ import annotations`
    schema="(Tensor x, Tensor blocks, Tensor scales, Tensor offs, bool transpose) -> Tensor",
)
def mxfp4_grouped_mm_op(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, offs: torch.Tensor,
                        transpose: bool) -> torch.Tensor:  # fmt: skip
    """x @ W_e per expert group with W = dequant(blocks, scales) [E, in, out] (transpose: W_e^T, for the input
    gradient)."""
    w = _dequantize(blocks, scales, x.dtype)
    if transpose:
        w = w.transpose(-2, -1)
    return grouped_mm(x.contiguous(), w, offs)


@mxfp4_grouped_mm_op.register_fake
def _(x, blocks, scales, offs, transpose):
    _, d_out, groups, half = blocks.shape
    return x.new_empty(x.shape[0], d_out if not transpose else groups * 2 * half)


def _setup_context(ctx, inputs, output):
    _, blocks, scales, offs, transpose = inputs
    ctx.save_for_backward(blocks, scales, offs)
    ctx.transpose = transpose


def _backward(ctx, grad_out):
    blocks, scales, offs = ctx.saved_tensors
    return mxfp4_grouped_mm_op(grad_out, blocks, scales, offs, not ctx.transpose), None, None, None, None


mxfp4_grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


def mxfp4_grouped_mm(x, blocks, scales, offs, dtype):
    return mxfp4_grouped_mm_op(x.to(dtype), blocks, scales, offs, False)
