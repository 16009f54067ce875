"""MXFP4, gpt-oss's expert weight format, in one place: the format (``format``: constants, dequantize/quantize),
model construction with resident MXFP4 experts (``model``), the experts module (``experts``), its grouped-GEMM
custom op (``matmul``) and Triton dequant kernel (``dequant_triton``, CUDA, imported lazily), and the streaming
merge of an MXFP4 checkpoint with an adapter (``merge``, ``python -m gptoss_hpc.modeling.mxfp4.merge``) with its
check against PEFT (``merge_check``). Submodules import torch inside their functions or at their own import:
importing this package is cheap."""
