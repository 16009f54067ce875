"""The train stage's MoE load-balancing loss reads the router logits from the routers (gptoss_hpc.modeling.fast.
router_logits), not through transformers' output-capturing hooks: the same loss and gradients, and no graph break in
the compiled decoder layers. On the H200 those hooks split every compiled layer of the MXFP4 20b train stage into ~6
graphs (392 compiled calls per optimizer step, against the bench's 68) and left the GPU idle 36% of each step.

Real: the tiny gpt-oss with PEFT LoRA and the speed knobs (gptoss_hpc.bench.train.prepare, as the train stage
applies them), transformers' own ``load_balancing_loss_func`` and output capture, torch.compile through dynamo + AOT
autograd (the aot_eager backend: the GPU's graphs and graph breaks, eager kernels)."""

from __future__ import annotations

import pytest
import torch

from gptoss_hpc.config import compose, to_run_config
from gptoss_hpc.modeling.trainer import chunked_training_loss

VOCAB = 384


def _model(*overrides: str):
    from gptoss_hpc.bench.train import prepare

    cfg = to_run_config(compose(["model=tiny_gpt_oss", "train.seed=5", "lora=experts", *overrides]))
    model, knobs = prepare(cfg, "cpu", vocab_size=VOCAB)
    return model, knobs


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    from gptoss_hpc.modeling.fast import pack_sequences

    g = torch.Generator().manual_seed(seed)
    lengths = [40, 24, 56]
    seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]
    labels = [[-100] * (n // 3) + s[n // 3 :] for s, n in zip(seqs, lengths, strict=True)]
    return pack_sequences(seqs, labels, pad_token_id=0)


def _lora_grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_aux_loss_and_gradients_equal_transformers_output_capture():
    from transformers.models.gpt_oss.modeling_gpt_oss import load_balancing_loss_func

    from gptoss_hpc.modeling.fast import unwrap

    model, _ = _model("train.no_grad_below_first_lora=false")
    base = unwrap(model)
    batch = _inputs()
    _, aux = chunked_training_loss(model, batch, 64, None, with_aux=True)
    aux.backward()
    ours = _lora_grads(model)

    kwargs = {k: batch[k] for k in ("position_ids",) if k in batch}
    out = base.get_decoder()(input_ids=batch["input_ids"], use_cache=False, output_router_logits=True, **kwargs)
    assert len(out.router_logits) == base.config.num_hidden_layers
    ref = load_balancing_loss_func(out.router_logits, base.num_experts, base.num_experts_per_tok, None)
    ref.backward()
    theirs = _lora_grads(model)

    torch.testing.assert_close(aux, ref)
    assert ours.keys() == theirs.keys() and ours  # the aux loss reaches the LoRA of the layers below
    assert any(g.abs().sum() > 0 for g in ours.values())
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], msg=name)


def test_no_logits_outlive_the_loss():
    from gptoss_hpc.modeling.fast.router_logits import LOGITS_ATTR, recording_routers

    model, _ = _model()
    chunked_training_loss(model, _inputs(), 64, None, with_aux=True)
    routers = recording_routers(model)
    assert routers and not any(LOGITS_ATTR in r.__dict__ for r in routers)


@pytest.fixture
def compiled_on_cpu(monkeypatch):
    from torch._dynamo.utils import counters

    from gptoss_hpc.modeling.fast.anatomy import _COMPILED
    from gptoss_hpc.modeling.fast.fallback import CPU_BACKEND_ENV

    monkeypatch.setenv(CPU_BACKEND_ENV, "aot_eager")
    _COMPILED.clear()
    torch._dynamo.reset()
    counters.clear()
    yield counters
    _COMPILED.clear()
    torch._dynamo.reset()
    counters.clear()  # process-wide: the control's graph breaks must not reach later tests' warnings


def test_compiled_layers_have_no_graph_break_with_the_aux_loss(compiled_on_cpu):
    model, knobs = _model("model.compile_layers=true", "model.fused_experts=true", "train.gradient_checkpointing=false")
    assert knobs.compiled_layers, "the layers must really compile for this test to mean anything"
    for seed in range(2):
        loss, aux = chunked_training_loss(model, _inputs(seed), 64, None, with_aux=True)
        (loss + 0.9 * aux).backward()
    assert sum(compiled_on_cpu["graph_break"].values()) == 0, dict(compiled_on_cpu["graph_break"])

    # the control: transformers' output capture (what TRL's default aux loss asked for) breaks every compiled layer
    from gptoss_hpc.modeling.fast import unwrap

    batch = _inputs(0)
    unwrap(model).get_decoder()(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, output_router_logits=True
    )
    assert sum(compiled_on_cpu["graph_break"].values()) > 0


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_balancing_loss_equals_transformers(masked, dtype):
    from transformers.models.gpt_oss.modeling_gpt_oss import load_balancing_loss_func

    from gptoss_hpc.modeling.fast.router_logits import load_balancing_loss

    g = torch.Generator().manual_seed(1)
    layers, tokens, experts, top_k = 5, 37, 8, 3
    logits = [(torch.randn(tokens, experts, generator=g) * 2).to(dtype).requires_grad_() for _ in range(layers)]
    mask = (torch.rand(1, tokens, generator=g) > 0.3).long() if masked else None
    ours = load_balancing_loss(tuple(logits), experts, top_k, mask)
    (g_ours,) = torch.autograd.grad(ours, logits[2])
    ref = load_balancing_loss_func(tuple(logits), experts, top_k, mask)
    (g_ref,) = torch.autograd.grad(ref, logits[2])
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)
    assert load_balancing_loss((), experts, top_k) == 0  # no routed layer (transformers' raises IndexError)


def test_a_recomputed_layer_leaves_no_logits_on_its_router():
    """Under gradient checkpointing the backward re-runs each layer's forward, router included; the logits it
    recomputes (and their autograd graph) must not stay on the module until the next forward."""
    from gptoss_hpc.modeling.fast.router_logits import LOGITS_ATTR, recording_routers

    model, _ = _model("train.gradient_checkpointing=true", "train.no_grad_below_first_lora=false")
    loss, aux = chunked_training_loss(model, _inputs(), 64, None, with_aux=True)
    (loss + 0.9 * aux).backward()
    routers = recording_routers(model)
    assert routers and not any(LOGITS_ATTR in r.__dict__ for r in routers)
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)
