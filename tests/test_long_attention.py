"""Attention that is right at long range (issue 27, item 3), at a CPU size.

Real: the tiny gpt-oss (transformers GptOss: sliding window 16 / full layers, attention sinks), PEFT LoRA and the
speed knobs as the train stage applies them (gptoss_hpc.bench.train_setup.prepare), the packed-document masks and
the block-mask builder. The reference is the chunked fp32 attention written from the definition
(gptoss_hpc.modeling.fast.reference_attention). Not here: flex_attention's kernels (transformers refuses sinks with
flex on CPU; the GPU form is ``python -m gptoss_hpc.bench long_check``, phase ``long:attn`` of gpu_check.sh).
"""

from __future__ import annotations

import pytest

from gptoss_hpc.config import compose, to_run_config
from gptoss_hpc.config.attention import attention_length_problems, eager_max_length
from gptoss_hpc.config.memory import Arch, arch_for


def test_packed_row_loss_and_lora_grads_match_the_chunked_reference_on_cpu():
    from gptoss_hpc.bench.long_check import check_long_attention, compose_check

    # 2 layers (sliding, full), 1,024 tokens: a 525-token document (~33 windows), others around the window, a
    # 1-token one, padding; fp32, so any mask or sink error is far above rounding
    cfg = compose_check([], "cpu", 2)
    out = check_long_attention(cfg, "cpu", 1024, vocab=512)
    assert out["layer_types"] == ["sliding_attention", "full_attention"] and out["sliding_window"] == 16
    assert max(out["documents"]) > 30 * out["sliding_window"] and 1 in out["documents"]
    assert out["loss_rel_err"] <= 1e-5 and out["grad_rel_err"] <= 1e-4, out
    # the controls (the reference with documents merged / windows ignored) are what a mask bug looks like: the
    # check tells them apart from the model by orders of magnitude
    assert all(c["grad_rel_err"] > 1e-2 for c in out["controls"].values()), out["controls"]
    assert out["status"] == "pass"


def test_document_block_masks_are_the_reference_masks_at_lengths_off_the_block_size():
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    from gptoss_hpc.modeling.fast.packing import _document_mask_mod, document_ids

    # the mask flex builds from document ids, read back densely, against the definition (same document,
    # causal, within the window), including a length that is not a multiple of flex's 128-token block
    for length, window in ((300, 16), (1000, 128), (1000, None)):
        pos = torch.cat([torch.arange(length // 2), torch.arange(7), torch.arange(length - length // 2 - 7)])[None]
        docs = document_ids(pos)
        mod = _document_mask_mod(docs, window)
        block = create_block_mask(mod, 1, None, length, length, device="cpu")
        q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
        want = (k <= q) & (docs[0][:, None] == docs[0][None, :])
        if window is not None:
            want &= q - k < window
        got = mod(0, 0, q, k)
        assert torch.equal(got, want)
        # every allowed (q, k) lies in a block the BlockMask lists (a block it skips holds no allowed pair)
        dense = block.to_dense()[0, 0].repeat_interleave(128, 0).repeat_interleave(128, 1)[:length, :length]
        assert bool(dense[want].all())
        assert docs[0].max() == 2


@pytest.mark.slow
def test_block_mask_builder_takes_any_length_without_recompiling():
    import torch
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import create_block_mask

    from gptoss_hpc.modeling.fast.packing import _document_mask_mod, document_ids, flex_document_masks

    class Config:  # the two fields flex_document_masks reads from a GptOssConfig
        sliding_window = 16
        layer_types = ("sliding_attention", "full_attention")

    graphs = []
    for length in (1024, 2304, 1000, 4096):  # the first compiles (two graphs: full, sliding), the others do not
        pos = torch.cat([torch.arange(length // 3), torch.arange(length - length // 3)])[None]
        docs = document_ids(pos)
        masks = flex_document_masks(Config, docs)
        graphs.append(counters["stats"]["unique_graphs"])
        for kind, window in (("full_attention", None), ("sliding_attention", 16)):
            eager = create_block_mask(_document_mask_mod(docs, window), 1, None, length, length, device="cpu")
            got, want = masks[kind].as_tuple()[2:6], eager.as_tuple()[2:6]
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert graphs[1:] == [graphs[0]] * 3, graphs


def _cfg(*overrides: str):
    return to_run_config(compose(list(overrides)))


def test_attention_length_problems_name_the_key_and_the_fix():
    cfg = _cfg("model=gpt_oss_20b", "cluster.accelerator=gpu")
    arch = arch_for(cfg)
    assert arch is not None and arch.max_position_embeddings == 131072 and arch.sliding_window == 128
    assert attention_length_problems(cfg, arch, 131072) == []  # flex on CUDA: the presets' path, up to 128k
    (too_long,) = attention_length_problems(cfg, arch, 131073)
    assert "max_position_embeddings (131,072)" in too_long and "train.max_length<=131072" in too_long

    eager = _cfg("model=gpt_oss_20b", "cluster.accelerator=gpu", "model.attn_implementation=eager")
    assert eager_max_length(arch) == 5760  # 64 heads: 8 GiB of fp32 scores per layer at ~5.8k tokens
    assert attention_length_problems(eager, arch, 4096) == []
    (wide,) = attention_length_problems(eager, arch, 32768)
    assert "model.attn_implementation=eager" in wide and "256.0 GiB at 32,768 tokens" in wide
    assert "model.attn_implementation=flex_attention" in wide and "train.max_length<=5760" in wide

    cpu_flex = _cfg("model=tiny_gpt_oss", "model.attn_implementation=flex_attention", "cluster.accelerator=cpu")
    tiny = arch_for(cpu_flex)
    assert tiny is not None and tiny.sliding_window == 16
    (sinks,) = attention_length_problems(cpu_flex, tiny, 256)
    assert "cluster.accelerator=cpu" in sinks and "model.attn_implementation=eager" in sinks


def test_attention_length_problems_is_pure():
    # the launch calls it before anything is imported for training: the config layer imports no torch
    import ast
    from pathlib import Path

    import gptoss_hpc.config.attention as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "gptoss_hpc"}, imported
    assert Arch.__module__ == "gptoss_hpc.config.memory"
