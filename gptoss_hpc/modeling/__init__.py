"""Modeling layer: tokenizer, base model, LoRA, DeepSpeed JSON and SFTConfig kwargs for the train stage.

Submodules import torch/transformers/peft inside their functions, so importing this package is cheap.
"""
