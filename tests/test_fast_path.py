"""The speed knobs of gptoss_hpc.modeling.fast compute the same function as the stock path.

Real parts throughout: the tiny gpt-oss (gptoss_hpc/resources/tiny_gpt_oss.json, vocab cut to 384 for speed),
PEFT LoRA from the project's builder, fp32 on CPU. The GPU-only pieces (flex_attention, torch.compile of the
experts and layers) are checked by ``python -m gptoss_hpc.bench train --check`` on the GPU (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import pytest
import torch

from gptoss_hpc.config import compose, to_run_config

VOCAB = 384


def _cfg(*overrides: str):
    return to_run_config(compose(["model=tiny_gpt_oss", "train.seed=3", *overrides]))


def _model(cfg):
    from gptoss_hpc.bench.train import prepare

    return prepare(cfg, "cpu", vocab_size=VOCAB)


def _batch(lengths, seed=0):
    from gptoss_hpc.modeling.fast import pack_sequences

    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]
    labels = [[-100] * (n // 3) + s[n // 3 :] for s, n in zip(seqs, lengths, strict=True)]
    return seqs, labels, pack_sequences(seqs, labels, pad_token_id=0)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _zero(model):
    for p in model.parameters():
        p.grad = None


@pytest.mark.parametrize("length", [37, 400])
def test_chunked_loss_matches_plain_cross_entropy(length):
    """37: every row goes through lm_head; 400: the prompt rows are dropped first (600 predicted rows of 800
    padded to 768 < 800), and their hidden-state gradient must come back as zeros."""
    from gptoss_hpc.modeling.fast import chunked_causal_lm_loss

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, length, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (2, length), generator=g)
    labels[0, :5] = -100
    if length < 100:
        labels[1, 30:] = -100
    else:
        labels[:, : length // 4] = -100

    logits = hidden @ weight.t()
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 50).float(), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    ) / int((labels[:, 1:] != -100).sum())
    ref.backward()
    ref_h, ref_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    for chunk in (7, 16, 1000):
        loss = chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=chunk)
        loss.backward()
        assert abs(float(loss) - float(ref)) < 1e-5
        assert _rel(hidden.grad, ref_h) < 1e-5
        assert _rel(weight.grad, ref_w) < 1e-5
        hidden.grad = weight.grad = None

    # num_items_in_batch (gradient accumulation) divides the sum instead of the local count
    loss = chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=9, num_items_in_batch=1000)
    assert abs(float(loss) * 1000 - float(ref) * int((labels[:, 1:] != -100).sum())) < 1e-3


def test_chunked_model_loss_matches_transformers_loss():
    from gptoss_hpc.modeling.fast import causal_lm_loss

    model, _ = _model(_cfg())
    _, _, batch = _batch([40, 23, 57])
    ref = model(**{k: batch[k] for k in ("input_ids", "labels", "position_ids")}).loss
    ref.backward()
    ref_g = _grads(model)
    _zero(model)
    loss = causal_lm_loss(model, batch, chunk_tokens=32)
    loss.backward()
    assert abs(float(loss) - float(ref)) < 1e-5 * abs(float(ref))
    for n, g in _grads(model).items():
        assert _rel(g, ref_g[n]) < 1e-4, n


def test_no_grad_below_first_lora_layer_gives_the_full_backward_grads():
    from gptoss_hpc.modeling.fast import decoder_layers, freeze_below_first_trainable_layer, lowest_trainable_layer

    # LoRA on the experts of layer 1 only: layer 0 is the frozen prefix
    model, _ = _model(
        _cfg(
            "lora.expert_layers=[1]",
            "lora=all_linear",
            "lora.target_modules=[]",
            "train.no_grad_below_first_lora=false",
        )
    )
    assert lowest_trainable_layer(model) == 1
    _, _, batch = _batch([50, 30])
    inputs = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
    model(**inputs).loss.backward()
    ref_g = _grads(model)
    _zero(model)

    changed = freeze_below_first_trainable_layer(model)
    assert changed == [decoder_layers(model)[0]]
    seen = []
    hook = decoder_layers(model)[1].register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True)
    model(**inputs).loss.backward()
    hook.remove()
    for n, g in _grads(model).items():
        assert _rel(g, ref_g[n]) < 1e-6, n
    # the hidden state entering the first trainable layer carries no autograd history
    args, kwargs = seen[0]
    entering = args[0] if args else kwargs["hidden_states"]
    assert not entering.requires_grad


def test_packing_with_per_sequence_positions_equals_separate_sequences():
    # train.packing applies isolate_packed_sequences: transformers' gpt-oss builds its attention masks
    # without position_ids, so without it a packed row attends across its sequences.
    model, _ = _model(_cfg("train.packing=true"))
    lengths = [20, 33, 11]
    seqs, labels, batch = _batch(lengths, seed=5)
    assert batch["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    assert batch["labels"][0, 20].item() == -100  # no prediction across a sequence boundary
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    packed = model(**{k: batch[k] for k in ("input_ids", "labels", "position_ids")}, num_items_in_batch=n_items)
    packed.loss.backward()
    packed_g = _grads(model)
    _zero(model)

    total = 0.0
    start = 0
    for seq, lab in zip(seqs, labels, strict=True):
        ids = torch.tensor([seq])
        out = model(input_ids=ids, labels=torch.tensor([lab]), num_items_in_batch=n_items)
        out.loss.backward()
        total += float(out.loss)
        # logits of the packed row equal the separate sequence's
        assert torch.allclose(packed.logits[0, start : start + len(seq)], out.logits[0], atol=1e-4)
        start += len(seq)
    assert abs(total - float(packed.loss)) < 1e-5
    for n, g in _grads(model).items():
        assert _rel(g, packed_g[n]) < 1e-4, n


def test_fused_experts_core_matches_transformers_experts():
    from gptoss_hpc.modeling.fast import apply_speed_knobs

    cfg = _cfg("model.fused_experts=true")
    model, knobs = _model(cfg)  # prepare applies the knobs of cfg: the fused core runs
    assert knobs.summary()["experts_implementation"] == "fused_grouped_mm"
    _, _, batch = _batch([30, 25])
    inputs = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
    fused = model(**inputs).loss
    fused.backward()
    fused_g = _grads(model)
    _zero(model)
    knobs.remove()
    ref = model(**inputs).loss
    ref.backward()
    assert abs(float(fused) - float(ref)) < 1e-5
    for n, g in _grads(model).items():
        assert _rel(g, fused_g[n]) < 1e-4, n
    again = apply_speed_knobs(model, cfg)
    assert again.summary()["experts_implementation"] == "fused_grouped_mm"
    again.remove()


def test_factored_expert_lora_factors_equal_peft_delta_weight():
    """The factors the fused experts use reproduce PEFT's own delta weight of every expert, both projections."""
    from gptoss_hpc.modeling.fast.experts import expert_lora_factors

    cfg = _cfg("model.fused_experts=false")
    model, _ = _model(cfg)
    wrappers = [m for m in model.modules() if type(m).__name__ == "ParamWrapper"]
    assert {w.parameter_name for w in wrappers} == {"gate_up_proj", "down_proj"}
    for w in wrappers:
        left, right, scale = expert_lora_factors(w, "default", torch.float32)
        delta = w.get_delta_weight("default")
        r = left.shape[1] // w.num_experts
        for e in range(w.num_experts):
            mine = scale * left[:, e * r : (e + 1) * r] @ right[e * r : (e + 1) * r]
            assert _rel(mine, delta[e]) < 1e-6, (w.parameter_name, e)


def test_factored_expert_lora_is_used_and_steps_aside_when_adapters_are_off():
    """With the fused experts the LoRA'd experts run x @ W + s (x @ A) @ B (no parametrization of W); with the
    adapter disabled (the eval stage's base loss) the call goes back to PEFT, which then adds nothing."""
    import gptoss_hpc.modeling.fast.experts as experts_mod

    cfg = _cfg("model.fused_experts=true")
    model, knobs = _model(cfg)
    assert knobs.summary()["factored_expert_lora"] == 2  # tiny model: LoRA on the experts of both layers
    seen = []
    real = experts_mod.moe_experts_core

    def spy(*args):
        seen.append(args[9] is not None and args[10] is not None)
        return real(*args)

    _, _, batch = _batch([30, 25])
    inputs = {k: batch[k] for k in ("input_ids", "position_ids")}
    experts_mod.moe_experts_core = spy
    try:
        with torch.no_grad():
            adapted = model(**inputs).logits
            with model.disable_adapter():
                base_fast = model(**inputs).logits
    finally:
        experts_mod.moe_experts_core = real
    assert seen[:2] == [True, True]  # the adapted pass: both layers factored
    assert seen[2:] == [False, False]  # adapters off: plain fused experts, no LoRA
    knobs.remove()
    with torch.no_grad(), model.disable_adapter():
        base_ref = model(**inputs).logits
    assert _rel(base_fast, base_ref) < 1e-5
    assert _rel(adapted, base_ref) > 1e-4  # the adapter (B drawn non-zero by prepare) did change the output


def test_pack_greedy_and_collator():
    from gptoss_hpc.modeling.fast import PackingCollator, pack_greedy

    bins = pack_greedy([5, 9, 3, 7, 1], 10)
    assert sorted(i for b in bins for i in b) == [0, 1, 2, 3, 4]
    assert all(sum([5, 9, 3, 7, 1][i] for i in b) <= 10 for b in bins)
    out = PackingCollator(pad_token_id=7, pad_to_multiple_of=8)([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 7, 7]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert out["labels"].tolist() == [[-100, 2, 3, -100, 5, -100, -100, -100]]
    with pytest.raises(ValueError):
        pack_greedy([11], 10)


def test_flex_document_mask_equals_transformers_packed_mask():
    """The flex BlockMask of a packed row (built on CPU here) allows exactly what transformers' eager packed
    mask allows, for full and sliding-window layers."""
    from torch.nn.attention.flex_attention import create_mask
    from transformers import masking_utils

    from gptoss_hpc.modeling.fast import _document_mask_mod

    cfg = _cfg()
    model, _ = _model(cfg)
    config = model.get_base_model().config
    _, _, batch = _batch([20, 33, 11, 9], seed=2)
    pos = batch["position_ids"]
    docs = masking_utils.find_packed_sequence_indices(pos)
    embeds = torch.empty((1, pos.shape[1], 0))
    kwargs = {"config": config, "inputs_embeds": embeds, "attention_mask": None, "cache": None, "position_ids": pos}
    eager = {
        None: masking_utils.create_causal_mask(**kwargs),
        config.sliding_window: masking_utils.create_sliding_window_causal_mask(**kwargs),
    }
    for window, ref in eager.items():
        allowed_ref = ref[0, 0] == 0 if ref.dtype != torch.bool else ref[0, 0]
        dense = create_mask(_document_mask_mod(docs, window), 1, None, pos.shape[1], pos.shape[1], device="cpu")
        assert torch.equal(dense[0, 0], allowed_ref), window


def test_compiled_layers_do_not_recompile_per_packed_micro_batch(monkeypatch):
    """Regional compile of the decoder layers over packed micro-batches (new document masks each time): after
    the first micro-batch no new graphs. A Python-side counter in the experts forward once made every call a
    recompile (dynamo's limit of 256 hit on the GPU). Fakes, because CPU has no flex_attention backward: the
    compile backend is aot_eager (guards and recompiles are decided by dynamo, before any backend), and attention
    is a dense stand-in that evaluates the BlockMask's own mask_mod."""
    import random

    from torch._dynamo.utils import counters
    from transformers import masking_utils
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from gptoss_hpc.bench.train import micro_batches
    from gptoss_hpc.modeling.fast import compile_decoder_layers, flex_document_masks, unwrap
    from gptoss_hpc.modeling.fast import packing as packing_mod

    def dense_flex(module, q, k, v, attention_mask, **kwargs):
        n = q.shape[2]
        allowed = attention_mask.mask_mod(0, 0, torch.arange(n)[:, None], torch.arange(n)[None, :])
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return out.transpose(1, 2).contiguous(), None

    def masks(model, position_ids, dtype=None):
        docs = masking_utils.find_packed_sequence_indices(position_ids)
        return flex_document_masks(unwrap(model).config, docs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flex_attention", dense_flex)
    monkeypatch.setattr(packing_mod, "packed_sequence_masks", masks)
    cfg = _cfg(
        "model.num_hidden_layers=6",
        "lora.expert_layers=[2,4]",
        "model.attn_implementation=flex_attention",
        "model.experts_implementation=grouped_mm",
        "model.fused_experts=true",
        "train.no_grad_below_first_lora=true",
        "train.packing=true",
        "train.gradient_checkpointing=false",
        "train.max_length=256",
    )
    model, knobs = _model(cfg)
    torch._dynamo.reset()
    try:
        assert len(compile_decoder_layers(model, backend="aot_eager")) == 6  # the LoRA'd layers compile too
        graphs = []
        for mb in micro_batches(cfg, random.Random(0), VOCAB, 4, "lognormal"):
            model(input_ids=mb["input_ids"], labels=mb["labels"], position_ids=mb["position_ids"]).loss.backward()
            graphs.append(counters["stats"]["unique_graphs"])
        assert graphs[0] > 0 and graphs[1:] == [graphs[0]] * 3, graphs
    finally:
        knobs.remove()
        for layer in unwrap(model).model.layers:
            layer._compiled_call_impl = None
        torch._dynamo.reset()


def test_a_module_swapped_for_two_markers_runs_each_forward_once():
    """swap_class's forwards call the one they replace through their marker: a no-grad layer swapped again (for a
    second knob) still runs its base forward once, under no_grad, where ``super(type(self), self)`` recursed."""
    from gptoss_hpc.modeling.fast.anatomy import restore_class, swap_class
    from gptoss_hpc.modeling.fast.prefix import NO_GRAD_BASE, _no_grad_forward

    calls = []

    def counting_forward(self, x):
        calls.append("outer")
        return type(self)._test_outer_base.forward(self, x)

    layer = torch.nn.Linear(4, 4)
    assert swap_class(layer, "NoGrad{}", NO_GRAD_BASE, {"forward": _no_grad_forward})
    assert swap_class(layer, "Outer{}", "_test_outer_base", {"forward": counting_forward})
    out = layer(torch.ones(2, 4))
    assert calls == ["outer"] and not out.requires_grad
    assert torch.equal(out, torch.nn.functional.linear(torch.ones(2, 4), layer.weight, layer.bias).detach())
    restore_class(layer, "_test_outer_base")
    restore_class(layer, NO_GRAD_BASE)
    assert type(layer) is torch.nn.Linear and layer(torch.ones(2, 4)).requires_grad
