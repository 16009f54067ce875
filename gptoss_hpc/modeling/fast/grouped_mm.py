"""One grouped GEMM for the fused and the MXFP4 experts (a leaf: both import it, neither imports the other for it)."""

from __future__ import annotations


def grouped_mm(x, w, offs):
    """torch's grouped_mm for bf16 on CUDA (also under torch.compile); transformers' dispatcher otherwise (its
    fallback op covers fp32 on CUDA, used by the bench's fp32 check, and CPU). transformers 5.17's dispatcher
    takes the slow per-expert fallback inside torch.compile, so it is not used for bf16 on CUDA."""
    import torch

    if x.is_cuda and w.dtype == torch.bfloat16:
        fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
        return fn(x.to(w.dtype), w, offs=offs)
    try:
        from transformers.integrations.moe import _grouped_mm as dispatch
    except ImportError:
        dispatch = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return dispatch(x, w, offs=offs)
