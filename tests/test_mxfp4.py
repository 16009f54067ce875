"""MXFP4-resident experts (model.experts_dtype=mxfp4) compute what the bf16-dequantized experts compute.

Real parts: transformers' own MXFP4 dequantizer as the reference for the format, the tiny gpt-oss written as a
sharded MXFP4 checkpoint in the Hub layout and read back by our loader, PEFT LoRA from the project's builder,
fp32 on CPU. The CUDA-only parts (torch.compile of the core, bf16 grouped_mm) run in ``python -m gptoss_hpc.bench
train model.experts_dtype=mxfp4 --check`` on the GPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from gptoss_hpc.config import compose, to_run_config
from gptoss_hpc.errors import GptossHpcError

VOCAB = 384


def _cfg(*overrides: str):
    return to_run_config(compose(["model=tiny_gpt_oss", "train.seed=3", *overrides]))


def _tiny_config():
    from transformers import GptOssConfig

    from gptoss_hpc.resources import tiny_config_path

    config = GptOssConfig.from_json_file(str(tiny_config_path("tiny_gpt_oss")))
    config.vocab_size = VOCAB
    config.pad_token_id = config.bos_token_id = config.eos_token_id = 0
    return config


def _bits(t):
    t = t.contiguous().reshape(-1)
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)  # -0.0 and +0.0 differ here


def test_dequantize_is_bit_equal_to_transformers():
    """Every code and every scale of SCALE_RANGE, eager and compiled (what CUDA runs), against transformers'
    convert_moe_packed_tensors and our own LUT formulation."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from gptoss_hpc.modeling.mxfp4.model import SCALE_RANGE, dequantize_mxfp4, dequantize_mxfp4_lut, quantize_mxfp4

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 96, 4, 16), dtype=torch.uint8, generator=g)
    lo, hi = SCALE_RANGE
    scales = torch.randint(lo, hi + 1, (3, 96, 4), dtype=torch.uint8, generator=g)
    scales[0, 0, :2] = torch.tensor([lo, hi], dtype=torch.uint8)
    compiled = torch.compile(dequantize_mxfp4, dynamic=False)
    for dtype in (torch.bfloat16, torch.float32):
        ref = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        for fn in (dequantize_mxfp4, dequantize_mxfp4_lut, compiled):
            ours = fn(blocks, scales, dtype)
            assert ours.shape == ref.shape == (3, 128, 96)
            assert torch.equal(_bits(ours), _bits(ref)), (fn, dtype)
    # quantize is the inverse on representable weights (how the tests' checkpoints are written)
    w = dequantize_mxfp4(blocks, scales, torch.float32)
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(w), torch.float32), w)
    # the merge's chunked dequant (2 experts + 1) is the same
    from gptoss_hpc.modeling.mxfp4.merge import dequantize_stack

    assert torch.equal(_bits(dequantize_stack(blocks, scales, "cpu", experts_per_chunk=2)), _bits(w))


def test_quantize_rounds_to_the_nearest_e2m1_code_like_a_full_lut_search():
    """The bucketized quantizer (merge.format=mxfp4) against argmin over the 16 codes, ties to the lower code:
    midpoints, signs, zeros, a block that is all zero, and chunking over experts."""
    from gptoss_hpc.modeling.mxfp4.model import FP4_VALUES, SCALE_BIAS, quantize_mxfp4

    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 64, 24, generator=g) * 0.02
    w[0, :15, 0] = torch.tensor([0.25, -0.25, 0.75, -0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, 6.0, 0.0, -0.0, 0.1, -0.1])
    w[1, :32, 1] = 0.0
    for x in (w, w * 1e3):
        blocks, scales = quantize_mxfp4(x, experts_per_chunk=2)
        v = x.transpose(1, 2).reshape(5, 24, 2, 32)
        exp = torch.ceil(torch.log2(v.abs().amax(-1).clamp(min=2.0**-126) / 6.0)).clamp(-SCALE_BIAS, 127)
        lut = torch.tensor(FP4_VALUES)
        codes = ((v / torch.pow(2.0, exp)[..., None])[..., None] - lut).abs().argmin(-1).to(torch.uint8)
        assert torch.equal(scales, (exp + SCALE_BIAS).to(torch.uint8))
        assert torch.equal(blocks, codes[..., 0::2] | (codes[..., 1::2] << 4))


def _copy_into_bf16_path(mx_model, bf_model):
    """bf_model gets mx_model's weights: the same non-expert tensors and LoRA, the experts dequantized."""
    from gptoss_hpc.modeling.mxfp4.experts import Mxfp4Experts

    mx_params = dict(mx_model.named_parameters())
    mx_modules = dict(mx_model.named_modules())
    with torch.no_grad():
        for name, p in bf_model.named_parameters():
            if name in mx_params:
                p.copy_(mx_params[name])
                continue
            owner, _, leaf = name.rpartition(".")
            experts = mx_modules[owner]
            assert isinstance(experts, Mxfp4Experts), name
            p.copy_(experts.dequantized(leaf))


def _loss_and_grads(model, knobs, batch):
    from gptoss_hpc.bench.train import loss_of

    for p in model.parameters():
        p.grad = None
    n_items = int((batch["labels"][..., 1:] != -100).sum())
    loss = loss_of(model, knobs, batch, n_items)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


@pytest.mark.parametrize(
    ("lora", "bf16_stack"),
    [
        ("experts", ["model.fused_experts=false"]),  # PEFT's own W + s*A@B path as the reference
        ("experts", ["model.fused_experts=true"]),
        ("all_linear", ["model.fused_experts=true"]),
    ],
)
def test_mxfp4_experts_loss_and_lora_grads_equal_the_dequantized_bf16_path(lora, bf16_stack):
    from gptoss_hpc.bench.train import prepare
    from gptoss_hpc.modeling.mxfp4.experts import Mxfp4Experts

    common = [f"lora={lora}", "model.experts_implementation=grouped_mm", "train.loss_chunk_tokens=64"]
    mx_model, mx_knobs = prepare(_cfg(*common, "model.experts_dtype=mxfp4"), "cpu", vocab_size=VOCAB)
    bf_model, bf_knobs = prepare(_cfg(*common, *bf16_stack), "cpu", vocab_size=VOCAB)
    assert any(isinstance(m, Mxfp4Experts) for m in mx_model.modules())
    assert not any(isinstance(m, Mxfp4Experts) for m in bf_model.modules())
    assert mx_knobs.factored_lora, "MXFP4 experts must get the factored LoRA"
    _copy_into_bf16_path(mx_model, bf_model)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 48), generator=g)
    labels = ids.clone()
    labels[:, :10] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    mx_loss, mx_grads = _loss_and_grads(mx_model, mx_knobs, batch)
    bf_loss, bf_grads = _loss_and_grads(bf_model, bf_knobs, batch)
    assert abs(mx_loss - bf_loss) <= 1e-6 * abs(bf_loss)
    assert mx_grads.keys() == bf_grads.keys()
    assert any("lora" in n and "experts" in n for n in mx_grads)
    for name, grad in bf_grads.items():
        err = float((mx_grads[name] - grad).norm() / grad.norm().clamp_min(1e-30))
        assert err < 1e-5, (name, err)
        assert float(grad.norm()) > 0, name


def test_checkpoint_round_trip_loads_blocks_without_a_bf16_expert_stack(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from gptoss_hpc.modeling.mxfp4 import model as mxfp4
    from gptoss_hpc.modeling.mxfp4.experts import Mxfp4Experts

    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(_tiny_config(), dtype=torch.float32, attn_implementation="eager")
    folder = mxfp4.write_mxfp4_checkpoint(ref, tmp_path / "ckpt", max_shard_bytes=40_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1, "the test wants several shards"
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in index
    assert not any(k.endswith("experts.gate_up_proj") for k in index)

    def no_dequant(*args, **kwargs):
        raise AssertionError("loading dequantized an expert stack")

    monkeypatch.setattr(mxfp4, "dequantize_mxfp4", no_dequant)
    model = mxfp4.load_mxfp4_model(folder, "cpu", torch.float32, "eager")
    monkeypatch.undo()
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, Mxfp4Experts)
    assert experts.gate_up_proj_blocks.dtype == torch.uint8
    float_shapes = [tuple(t.shape) for t in model.state_dict().values() if t.is_floating_point()]
    assert tuple(ref.model.layers[1].mlp.experts.gate_up_proj.shape) not in float_shapes
    # the rest of the model is the checkpoint's (rotary frequencies rebuilt from the config)
    ids = torch.randint(0, VOCAB, (1, 20))
    for layer in ref.model.layers:  # the reference holds what the checkpoint holds: its experts rounded to MXFP4
        for leaf in ("gate_up_proj", "down_proj"):
            w = layer.mlp.experts.get_parameter(leaf)
            with torch.no_grad():
                w.copy_(mxfp4.dequantize_mxfp4(*mxfp4.quantize_mxfp4(w), torch.float32))
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_load_reports_a_folder_that_is_not_an_mxfp4_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from gptoss_hpc.modeling.mxfp4.model import load_mxfp4_model

    ref = AutoModelForCausalLM.from_config(_tiny_config(), dtype=torch.float32, attn_implementation="eager")
    ref.save_pretrained(str(tmp_path))  # a bf16-layout checkpoint: experts as gate_up_proj, no blocks
    with pytest.raises(GptossHpcError, match="_blocks"):
        load_mxfp4_model(tmp_path, "cpu", torch.float32, "eager")
    with pytest.raises(GptossHpcError, match="safetensors"):
        load_mxfp4_model(tmp_path / "missing", "cpu", torch.float32, "eager", config=_tiny_config())


def test_unfactored_peft_lora_on_mxfp4_experts_is_refused_not_dropped():
    from gptoss_hpc.bench.train import prepare

    model, knobs = prepare(_cfg("model.experts_dtype=mxfp4"), "cpu", vocab_size=VOCAB)
    names = [n for n, _ in model.named_parameters()]
    assert any(n.endswith("gate_up_proj_bias") for n in names)
    assert not any(n.endswith(("gate_up_proj", "down_proj")) for n in names), "placeholders left as parameters"
    knobs.remove()  # back to PEFT's parametrized W + s*A@B, which would silently read the placeholder
    ids = torch.randint(0, VOCAB, (1, 16))
    # once released, PEFT cannot even parametrize the placeholder; before release our forward refuses it
    with pytest.raises(Exception, match=r"(gate_up|down)_proj|MXFP4 experts take their LoRA factored"):
        model(input_ids=ids)


def test_validate_refuses_mxfp4_on_the_tiny_model_and_unknown_dtypes():
    from gptoss_hpc.config.validate import validate

    with pytest.raises(GptossHpcError, match=r"model\.experts_dtype=mxfp4 needs an MXFP4 checkpoint"):
        validate(_cfg("model.experts_dtype=mxfp4"))
    with pytest.raises(GptossHpcError, match=r"model\.experts_dtype"):
        validate(_cfg("model.experts_dtype=fp8"))


def test_compiled_core_traces_the_mxfp4_op_as_one_graph_and_matches_eager():
    """What CUDA runs: moe_experts_core under torch.compile with the MXFP4 custom op (opaque to the partitioner,
    so the dequantized weight is never saved for backward). aot_eager: dynamo + AOTAutograd without codegen."""
    from gptoss_hpc.modeling.fast.experts import moe_experts_core
    from gptoss_hpc.modeling.mxfp4.model import quantize_mxfp4

    torch.manual_seed(0)
    e, h, i, t, k, r = 4, 64, 64, 24, 2, 4
    gate_up = quantize_mxfp4(torch.randn(e, h, 2 * i) * 0.02)
    down = quantize_mxfp4(torch.randn(e, i, h) * 0.02)
    b_gu, b_d = torch.randn(e, 2 * i) * 0.01, torch.randn(e, h) * 0.01
    hidden = torch.randn(t, h, requires_grad=True)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    weights = torch.softmax(torch.randn(t, k), -1)
    left = torch.randn(h, e * r, requires_grad=True)
    right = torch.randn(e * r, 2 * i, requires_grad=True)

    def run(fn):
        out = fn(hidden, idx, weights, gate_up, b_gu, down, b_d, 1.702, 7.0, (left, right, 2.0), None)
        out.pow(2).sum().backward()
        grads = [p.grad.clone() for p in (hidden, left, right)]
        hidden.grad = left.grad = right.grad = None
        return out.detach(), grads

    ref_out, ref_grads = run(moe_experts_core)
    out, grads = run(torch.compile(moe_experts_core, backend="aot_eager", dynamic=False, fullgraph=True))
    torch.testing.assert_close(out, ref_out)
    for got, want in zip(grads, ref_grads, strict=True):
        assert float(want.norm()) > 0
        torch.testing.assert_close(got, want)


def test_unmerged_mxfp4_base_plus_adapter_equals_the_merged_bf16_model(tmp_path):
    """What eval/serve of a 120b need: the MXFP4 checkpoint + the adapter, unmerged, give the logits (and greedy
    tokens) of the bf16-dequantized base with the adapter merged into it."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from gptoss_hpc.modeling.lora import build_lora_config
    from gptoss_hpc.modeling.mxfp4 import model as mxfp4

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(_tiny_config(), dtype=torch.float32, attn_implementation="eager")
    folder = mxfp4.write_mxfp4_checkpoint(base, tmp_path / "base")
    with torch.no_grad():  # the bf16-path base holds what the checkpoint holds
        for layer in base.model.layers:
            for leaf in ("gate_up_proj", "down_proj"):
                w = layer.mlp.experts.get_parameter(leaf)
                w.copy_(mxfp4.dequantize_mxfp4(*mxfp4.quantize_mxfp4(w), torch.float32))
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    peft_model = get_peft_model(base, build_lora_config(_cfg("lora=all_linear", "lora.lora_dropout=0.0")))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    merged = peft_model.merge_and_unload().eval()

    model = mxfp4.load_mxfp4_peft_model(folder, tmp_path / "adapter", "cpu", torch.float32, "eager")
    with torch.no_grad():
        want, got = merged(input_ids=ids).logits, model(input_ids=ids).logits
    assert float((want - plain).abs().max()) > 1e-3, "the adapter must change the logits for this to mean much"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    gen_kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(
        model.generate(input_ids=ids[:1], **gen_kwargs), merged.generate(input_ids=ids[:1], **gen_kwargs)
    )


def test_streaming_merge_of_an_mxfp4_checkpoint_equals_peft_merge_and_unload(tmp_path):
    """The 120b merge path: base shards + adapter -> merged shards, tensor by tensor (no model, no GPU); it loads
    with plain from_pretrained and gives the logits of PEFT's merge_and_unload on the dequantized base."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from gptoss_hpc.modeling.lora import build_lora_config
    from gptoss_hpc.modeling.mxfp4 import model as mxfp4
    from gptoss_hpc.modeling.mxfp4.merge import merge_mxfp4_adapter

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(_tiny_config(), dtype=torch.float32, attn_implementation="eager")
    folder = mxfp4.write_mxfp4_checkpoint(base, tmp_path / "base", max_shard_bytes=60_000)
    with torch.no_grad():
        for layer in base.model.layers:
            for leaf in ("gate_up_proj", "down_proj"):
                w = layer.mlp.experts.get_parameter(leaf)
                w.copy_(mxfp4.dequantize_mxfp4(*mxfp4.quantize_mxfp4(w), torch.float32))
    peft_model = get_peft_model(base, build_lora_config(_cfg("lora=all_linear", "lora.lora_dropout=0.0")))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    want_model = peft_model.merge_and_unload().eval()

    import safetensors

    real_open, opened, alive = safetensors.safe_open, [], {"now": 0, "max": 0}

    class Counted:  # safe_open, counting the shards held open at once (each one's read pages stay in host RSS)
        def __init__(self, path, **kwargs):
            self.handle = real_open(path, **kwargs)
            opened.append(path)
            alive["now"] += 1
            alive["max"] = max(alive["max"], alive["now"])

        def get_tensor(self, name):
            return self.handle.get_tensor(name)

        def __del__(self):
            alive["now"] -= 1

    safetensors.safe_open = Counted
    try:
        stats = merge_mxfp4_adapter(
            folder, tmp_path / "adapter", tmp_path / "merged", "float32", max_shard_bytes=80_000
        )
    finally:
        safetensors.safe_open = real_open
    shards = len(list(folder.glob("*.safetensors")))
    # shard by shard: none opened twice, at most two at once (the 120b merge once held all 15: 62 GiB host RSS)
    assert shards > 2 and len(opened) == len(set(opened)) == shards and alive["max"] <= 2, (opened, alive)
    assert stats["shards"] > 1 and stats["merged_tensors"] == 2 * (2 + 4)  # 2 layers x (2 expert + 4 attention)
    assert not (tmp_path / "merged.tmp").exists()
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    got_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(got_model(input_ids=ids).logits, want_model(input_ids=ids).logits)
    for name, w in want_model.state_dict().items():
        torch.testing.assert_close(got_model.state_dict()[name], w, msg=name)


def test_hub_layout_checkpoint_loads_mxfp4_resident_like_transformers_dequantizing_loader(tmp_path):
    """gptoss_hpc.synth_checkpoint writes the Hub's layout (config keys, 0-based shard names, bf16 + uint8
    tensors); our loader keeps the experts as blocks and computes what transformers' own MXFP4 loader computes
    after dequantizing them (Mxfp4Config(dequantize=True), the path the bf16 experts_dtype takes)."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    from gptoss_hpc.modeling.mxfp4.experts import Mxfp4Experts
    from gptoss_hpc.modeling.mxfp4.model import load_mxfp4_model
    from gptoss_hpc.synth_checkpoint import write_checkpoint

    folder = write_checkpoint(tmp_path / "synth", "tiny", max_shard_bytes=20_000_000)
    ours = load_mxfp4_model(folder, "cpu", torch.float32, "eager")
    assert isinstance(ours.model.layers[0].mlp.experts, Mxfp4Experts)
    ref = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="eager", quantization_config=Mxfp4Config(dequantize=True)
    )
    for i, layer in enumerate(ref.model.layers):
        for leaf in ("gate_up_proj", "down_proj"):
            want = layer.mlp.experts.get_parameter(leaf)
            assert torch.equal(ours.model.layers[i].mlp.experts.dequantized(leaf, want.dtype), want), (i, leaf)
    ids = torch.randint(0, 2000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_compiled_mxfp4_experts_inside_compiled_layers_match_eager(checkpointing, monkeypatch):
    """The CUDA configuration on the CPU (aot_eager: dynamo + AOTAutograd, no codegen): compiled decoder layers
    around the compiled experts core around the MXFP4 custom op, whose dequant is compiled too. With non-reentrant
    gradient checkpointing the recompute stops early by raising through the compiled core: that must not be
    taken for a compile failure (the fallback once broke checkpointing: 'target_frame.early_stop is set')."""
    from gptoss_hpc.bench.train import loss_of, prepare
    from gptoss_hpc.modeling.fast import _COMPILED, decoder_layers

    cfg = _cfg(
        "model.experts_dtype=mxfp4",
        "lora=all_linear",
        "train.loss_chunk_tokens=64",
        f"train.gradient_checkpointing={str(checkpointing).lower()}",
    )
    model, knobs = prepare(cfg, "cpu", vocab_size=VOCAB)
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    def run():
        for p in model.parameters():
            p.grad = None
        loss = loss_of(model, knobs, batch, 39)
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref_grads = run()
    monkeypatch.setitem(_COMPILED, "mxfp4_compile_backend", "aot_eager")
    for layer in decoder_layers(model):
        layer.compile(dynamic=False, backend="aot_eager")
    try:
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
            for _ in range(2):
                loss, grads = run()
                assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
                for name, g in ref_grads.items():
                    torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6)
        assert "mxfp4_core" in _COMPILED and not _COMPILED.get("mxfp4_disabled"), "fell back to eager"
        assert "mxfp4_dequant" in _COMPILED and not _COMPILED.get("mxfp4_dequant_disabled")
    finally:
        for key in ("mxfp4_core", "mxfp4_dequant", "mxfp4_disabled", "mxfp4_dequant_disabled"):
            _COMPILED.pop(key, None)
        torch._dynamo.reset()


def test_experts_build_from_a_hub_config_without_swiglu_alpha():
    """The Hub's config.json has swiglu_limit but not swiglu_alpha, and transformers 5.17's GptOssConfig has no
    default for it (the H200 box's version; the CPU venv's has one): the MXFP4 experts use gpt-oss's 1.702."""
    from types import SimpleNamespace

    from gptoss_hpc.modeling.mxfp4.experts import Mxfp4Experts

    hub_like = SimpleNamespace(num_local_experts=2, hidden_size=64, intermediate_size=64, swiglu_limit=7.0)
    experts = Mxfp4Experts(hub_like)
    assert (experts.alpha, experts.limit) == (1.702, 7.0)
