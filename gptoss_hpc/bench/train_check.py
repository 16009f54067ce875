"""Correctness of the bench's fast path: loss and LoRA gradients of each speed knob against the stock path
and an fp32 plain-math reference on one batch with the same weights (``python -m gptoss_hpc.bench train
--check``), plus component checks of the fused experts and of attention with sinks.
"""

from __future__ import annotations

import gc
import json
import math
from typing import Any

from gptoss_hpc.bench.train_setup import (
    PREDICTED_ROWS,
    is_cuda,
    loss_of,
    micro_batches,
    model_config_json,
    prepare,
    preset_name,
    to_device,
)


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_experts_core(cfg, device: str, tokens: int = 4096) -> dict[str, Any]:
    """One gpt-oss experts block: transformers' grouped_mm path, the eager core and the compiled core against
    an fp32 evaluation of the core; output and gradients (input, routing weights, expert weights)."""
    import torch
    from transformers import GptOssConfig
    from transformers.integrations.moe import grouped_mm_experts_forward
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from gptoss_hpc.modeling.fast import _compiled_core, moe_experts_core

    out: dict[str, Any] = {"name": "check experts core", "tokens": tokens}
    try:
        config = GptOssConfig.from_json_file(str(model_config_json(cfg)))
        torch.manual_seed(0)
        with torch.device(device):
            experts = GptOssExperts(config).to(torch.bfloat16)
            with torch.no_grad():
                for p in experts.parameters():
                    p.normal_(0, 0.02)
            h0 = torch.randn(tokens, config.hidden_size, dtype=torch.bfloat16)
            logits = torch.randn(tokens, config.num_local_experts)
            top_v, idx = torch.topk(logits, config.num_experts_per_tok, dim=-1)
            w0 = torch.softmax(top_v, dim=-1).to(torch.bfloat16)
            gout = torch.randn(tokens, config.hidden_size, dtype=torch.bfloat16)
        names = ["gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"]

        def run(kind: str):
            h = h0.clone().requires_grad_(True)
            w = w0.clone().requires_grad_(True)
            params = [getattr(experts, n) for n in names]
            for p in params:
                p.grad = None
            if kind == "stock":
                y = grouped_mm_experts_forward(experts, h, idx, w)
            elif kind == "fp32":
                h32, w32 = h.float(), w.float()
                p32 = [p.float() for p in params]
                y = moe_experts_core(h32, idx, w32, *p32, float(experts.alpha), float(experts.limit))
            else:
                fn = _compiled_core() if kind == "compiled" else moe_experts_core
                y = fn(h, idx, w, *params, float(experts.alpha), float(experts.limit))
            y.float().backward(gout.float())
            return [y.detach().float(), h.grad.float(), w.grad.float()] + [p.grad.float() for p in params]

        ref = run("fp32")
        labels = ["out", "d_hidden", "d_routing_w", *("d_" + n for n in names)]
        for kind in ("stock", "eager", "compiled"):
            got = run(kind)
            out[kind] = {lab: round(_rel(g, r), 5) for lab, g, r in zip(labels, got, ref, strict=True)}
        out["status"] = "ok"
    except Exception as exc:
        import traceback

        traceback.print_exc()
        out.update(status="error", error=f"{type(exc).__name__}: {exc}"[:300])
    print(json.dumps(out), flush=True)
    return out


def check_attention_core(device: str, tokens: int = 1024) -> dict[str, Any]:
    """gpt-oss attention with sinks (GQA 64/8, head_dim 64, causal): transformers' eager and flex paths
    (flex as transformers calls it: its own compiled wrapper; and inlined in a torch.compile'd region)
    against eager attention evaluated in fp32; output and gradients of q, k, v and the sinks."""
    import torch
    from torch import nn
    from torch.nn.attention.flex_attention import create_block_mask
    from transformers.integrations.flex_attention import flex_attention_forward
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    out: dict[str, Any] = {"name": "check attention core", "tokens": tokens}
    try:
        torch.manual_seed(0)
        heads, kv, hd = 64, 8, 64
        mod = nn.Module()
        mod.num_key_value_groups = heads // kv
        mod.training = True
        q0 = torch.randn(1, heads, tokens, hd, device=device, dtype=torch.bfloat16)
        k0 = torch.randn(1, kv, tokens, hd, device=device, dtype=torch.bfloat16)
        v0 = torch.randn(1, kv, tokens, hd, device=device, dtype=torch.bfloat16)
        s0 = torch.randn(heads, device=device, dtype=torch.bfloat16)
        g0 = torch.randn(1, tokens, heads, hd, device=device, dtype=torch.bfloat16)
        idx = torch.arange(tokens, device=device)
        add_mask = torch.where(idx[None, :] <= idx[:, None], 0.0, float("-inf"))[None, None]
        block = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, tokens, tokens, device=device)

        def flex(q, k, v, s):
            mod.sinks = s
            return flex_attention_forward(mod, q, k, v, block, scaling=hd**-0.5, s_aux=s)[0]

        flex_inlined = torch.compile(flex, dynamic=False)

        def run(kind: str):
            q, k, v, s = (t.clone().requires_grad_(True) for t in (q0, k0, v0, s0))
            if kind == "fp32_eager":
                mod.sinks = s.float()
                y = eager_attention_forward(mod, q.float(), k.float(), v.float(), add_mask.float(), scaling=hd**-0.5)[0]
            elif kind == "eager":
                mod.sinks = s
                y = eager_attention_forward(mod, q, k, v, add_mask.to(q.dtype), scaling=hd**-0.5)[0]
            elif kind == "flex":
                y = flex(q, k, v, s)
            else:
                y = flex_inlined(q, k, v, s)
            y.float().backward(g0.float())
            return [y.detach().float(), q.grad.float(), k.grad.float(), v.grad.float(), s.grad.float()]

        ref = run("fp32_eager")
        for kind in ("eager", "flex", "flex_in_compile"):
            got = run(kind)
            out[kind] = {
                lab: round(_rel(g, r), 5)
                for lab, g, r in zip(["out", "dq", "dk", "dv", "dsinks"], got, ref, strict=True)
            }
        out["status"] = "ok"
    except Exception as exc:
        import traceback

        traceback.print_exc()
        out.update(status="error", error=f"{type(exc).__name__}: {exc}"[:300])
    print(json.dumps(out), flush=True)
    return out


def _knob_subsets(cfg) -> dict[str, Any]:
    """cfg with each configured knob alone, and all of them; keys name the subset."""
    from dataclasses import replace

    t, m = cfg.train, cfg.model
    off_t = {"no_grad_below_first_lora": False, "loss_chunk_tokens": 0}
    off_m = {"fused_experts": False, "compile_layers": False}
    subsets = {}
    if t.loss_chunk_tokens:
        subsets["chunked_ce"] = ({**off_t, "loss_chunk_tokens": t.loss_chunk_tokens}, off_m)
    if t.no_grad_below_first_lora:
        subsets["no_grad_prefix"] = ({**off_t, "no_grad_below_first_lora": True}, off_m)
    if m.fused_experts:
        subsets["fused_experts"] = (off_t, {**off_m, "fused_experts": True})
    if m.compile_layers:
        subsets["compile_layers"] = (off_t, {**off_m, "compile_layers": True, "fused_experts": m.fused_experts})
    out = {k: replace(cfg, train=replace(t, **a), model=replace(m, **b)) for k, (a, b) in subsets.items()}
    out["all (configured)"] = cfg
    stock = replace(cfg, train=replace(t, **off_t), model=replace(m, **off_m))
    return stock, out


def check(cfg, args, device: str) -> dict[str, Any]:
    """Loss and LoRA gradients of each configured knob (alone, then all) and of the stock stack against the plain
    math (eager attention, eager experts, transformers' loss) on the same weights and packed batch, with the
    model cut to --check-layers layers: first all in fp32 (where a wrong gradient shows as a large error: the
    knobs must match to ~1e-4), then the same weights in bf16 (the knobs' error must be that of the stock
    bf16 stack: random-weight LoRA gradients are ill-conditioned in bf16, see docs/BENCHMARKS.md)."""
    import random
    from dataclasses import replace

    import torch

    from gptoss_hpc.modeling.fast import apply_speed_knobs, set_experts_implementation, unwrap

    out: dict[str, Any] = {"name": "check fast vs stock", "lora": preset_name(cfg)}
    model = knobs = None
    try:
        small = replace(cfg, model=replace(cfg.model, num_hidden_layers=args.check_layers, dtype="float32"))
        small = replace(small, train=replace(small.train, per_device_train_batch_size=1, max_length=args.check_tokens))
        stock_cfg, subsets = _knob_subsets(small)
        model, knobs = prepare(stock_cfg, device, vocab_size=args.vocab)
        knobs.remove()
        base_model = unwrap(model)
        vocab = base_model.config.vocab_size
        attn_impl, experts_impl = base_model.config._attn_implementation, base_model.config._experts_implementation
        batch = micro_batches(small, random.Random(args.seed + 7), vocab, 1, "lognormal")[0]
        n_items = batch[PREDICTED_ROWS]
        dev_batch = to_device(batch, device)

        def grads_of(knobs):
            params = {n: p for n, p in model.named_parameters() if p.requires_grad}
            for p in params.values():
                p.grad = None
            torch.manual_seed(args.seed)  # same LoRA-dropout masks in every path
            loss = loss_of(model, knobs, dev_batch, n_items)
            loss.backward()
            return float(loss.detach()), {n: p.grad.detach().double().clone() for n, p in params.items()}

        def plain_math():
            base_model.set_attn_implementation("eager")
            set_experts_implementation(model, "eager")
            result = grads_of(knobs)
            base_model.set_attn_implementation(attn_impl)
            set_experts_implementation(model, experts_impl)
            return result

        out.update(tokens=batch["real_tokens"], layers=args.check_layers)
        for dtype in ("float32", "bfloat16"):
            if dtype == "bfloat16":
                model.to(torch.bfloat16)
            ref_loss, ref_g = plain_math() if dtype == "float32" else (ref_loss, ref_g)  # noqa: F821
            den = sum(float(ref_g[n].pow(2).sum()) for n in ref_g)

            def compare(loss, g, ref_loss=ref_loss, ref_g=ref_g, den=den):
                num = sum(float((g[n] - ref_g[n]).pow(2).sum()) for n in ref_g)
                worst = max((_rel(g[n], ref_g[n]), n) for n in ref_g)
                return {
                    "loss": loss,
                    "loss_rel_err": abs(loss - ref_loss) / abs(ref_loss),
                    "grad_rel_err": math.sqrt(num / max(den, 1e-30)),
                    "worst_param_rel_err": worst[0],
                    "worst_param": worst[1].replace("base_model.model.model.", ""),
                }

            res: dict[str, Any] = {"ref": "fp32 plain math (eager attention, eager experts)", "ref_loss": ref_loss}
            if dtype == "bfloat16":
                res["stock eager/eager"] = compare(*plain_math())
            res[f"stock {attn_impl}/{experts_impl}"] = compare(*grads_of(knobs))
            for name, sub in subsets.items():
                k = apply_speed_knobs(model, sub)
                res[name] = {**compare(*grads_of(k)), "knobs": k.summary()}
                k.remove()
            out[dtype] = res
        out["status"] = "ok"
    except Exception as exc:
        import traceback

        traceback.print_exc()
        out.update(status="error", error=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        model = knobs = None
        gc.collect()
        if is_cuda(device):
            torch.cuda.empty_cache()
    print(json.dumps(out), flush=True)
    return out
