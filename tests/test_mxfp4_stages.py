"""merge, eval and serve of a model trained with MXFP4-resident experts (model.experts_dtype=mxfp4), the 120b path,
on the tiny Hub-layout checkpoint from gptoss_hpc.synth_checkpoint on CPU.

Real: the train stage (TRL + PEFT) for two steps, the merge stage streaming shard by shard (no model built), its check
against PEFT's own get_delta_weight, transformers' from_pretrained of the merged folder, the eval stage and the serve
app (fastapi's TestClient) on the base + adapter unmerged. Faults are caused: a merge that drops or misplaces the
adapter's delta must fail the stage and leave no merged/.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gptoss_hpc.config import compose, load_run_config, save_run_config, to_run_config, validate
from gptoss_hpc.paths import PointPaths

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint folder, a point whose adapter/ the train stage wrote)."""
    from gptoss_hpc.stages.train import main
    from gptoss_hpc.synth_checkpoint import write_checkpoint

    root = tmp_path_factory.mktemp("mxfp4_stages")
    ckpt = write_checkpoint(root / "tiny-mxfp4", "tiny")
    config = _point(root / "run" / "p000", ckpt)
    main(config)
    return ckpt, config


def _point(folder: Path, ckpt: Path, *overrides: str) -> Path:
    cfg = to_run_config(
        compose(
            [
                "experiment=demo",
                "model=local",
                f"model.name_or_path={ckpt}",
                "model.dtype=float32",
                "model.attn_implementation=eager",
                "model.experts_implementation=null",
                "model.fused_experts=false",
                "model.compile_layers=false",
                "model.experts_dtype=mxfp4",
                "train.max_steps=2",
                "train.max_length=128",
                "data.max_length_policy=drop",  # the sample's longer rows: this test is about the stages, not them
                "train.learning_rate=5e-2",  # a delta that moves the weights visibly after two steps
                "eval.max_new_tokens=4",
                "eval.max_eval_rows=2",
                *overrides,
            ]
        )
    )
    return save_run_config(validate(cfg), folder / "config.yaml")


def _copy(trained: tuple[Path, Path], tmp_path: Path, *overrides: str) -> PointPaths:
    """A fresh point with the trained adapter, and its own config overrides."""
    ckpt, config = trained
    paths = PointPaths.from_config(_point(tmp_path / "p000", ckpt, *overrides))
    shutil.copytree(PointPaths.from_config(config).adapter, paths.adapter)
    return paths


def _ids() -> torch.Tensor:
    return torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(0))


def test_streaming_merge_stage_writes_bf16_shards_that_reproduce_the_unmerged_adapter(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from gptoss_hpc.modeling.mxfp4.model import load_mxfp4_model, load_mxfp4_peft_model
    from gptoss_hpc.stages.merge import main

    ckpt, _ = trained
    paths = _copy(trained, tmp_path, "model.dtype=bfloat16")
    main(paths.config)
    status = json.loads(paths.stage_status("merge").read_text())
    assert status["state"] == "COMPLETED" and status["peak_host_rss_gib"] > 0, status
    check = json.loads((paths.merged / "merge_check.json").read_text())
    assert check["passed"] and check["conclusive"] and check["adapted_parameters"] > 0
    assert check["merge"]["peak_host_rss_gib"] > 0 and check["merge"]["device"] == "cpu"
    config = json.loads((paths.merged / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    assert (paths.merged / "tokenizer_config.json").is_file() and (paths.merged / "README.md").is_file()

    merged = AutoModelForCausalLM.from_pretrained(str(paths.merged), dtype=torch.float32).eval()
    assert merged.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32  # plain weights, no quantizer
    unmerged = load_mxfp4_peft_model(ckpt, paths.adapter, "cpu", torch.float32, "eager")
    with torch.no_grad():
        want, got = unmerged(input_ids=_ids()).logits, merged(input_ids=_ids()).logits
        with unmerged.disable_adapter():
            base = unmerged(input_ids=_ids()).logits
        plain = load_mxfp4_model(ckpt, "cpu", torch.float32, "eager")(input_ids=_ids()).logits
    torch.testing.assert_close(base, plain)  # disable_adapter() is the base: what eval's base numbers use
    effect = float((want - base).abs().max())
    assert effect > 0.05, "training must have moved the logits for the comparison to mean much"
    # bf16 rounding of every weight of the merged model against the fp32 unmerged one
    assert float((got - want).abs().max()) < effect / 2
    assert float((got - want).abs().mean()) < float((want - base).abs().mean()) / 4


@pytest.mark.parametrize("fault", ["dropped", "experts_swapped"])
def test_streaming_merge_that_loses_the_adapter_fails_the_stage(trained, tmp_path, monkeypatch, fault):
    from gptoss_hpc.modeling.mxfp4 import merge as mxfp4_merge
    from gptoss_hpc.stages.merge import MergeError, main

    real = mxfp4_merge._delta

    def broken(a, b, kind, num_experts, scale):
        delta = real(a, b, kind, num_experts, scale)
        if fault == "dropped":
            return torch.zeros_like(delta)
        return delta.flip(0) if kind == "experts" else delta  # each expert gets another expert's delta

    monkeypatch.setattr(mxfp4_merge, "_delta", broken)
    paths = _copy(trained, tmp_path)
    with pytest.raises(MergeError, match="differ from PEFT's merge"):
        main(paths.config)
    assert not paths.merged.exists() and not paths.merged.with_name("merged.tmp").exists()
    assert json.loads(paths.stage_status("merge").read_text())["state"] == "FAILED"


def _scale_lora_b(adapter: Path, factor: float) -> None:
    from safetensors.torch import load_file, save_file

    file = str(adapter / "adapter_model.safetensors")
    save_file({k: v * factor if "lora_B" in k else v for k, v in load_file(file).items()}, file)


def test_merge_format_mxfp4_requantizes_the_experts_and_reports_survival(trained, tmp_path):
    from gptoss_hpc.modeling.mxfp4.model import load_mxfp4_model
    from gptoss_hpc.stages.merge import main

    paths = _copy(trained, tmp_path / "large", "merge.format=mxfp4")
    main(paths.config)
    index = json.loads((paths.merged / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.gate_up_proj_blocks" in index
    assert not any(k.endswith("experts.gate_up_proj") for k in index)
    assert json.loads((paths.merged / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    check = json.loads((paths.merged / "merge_check.json").read_text())
    assert check["passed"] and check["survival_mean"] > 0.7 and check["survival_by_layer"]  # lr 5e-2: a big delta
    assert check["logit_survival"] > 0.5 and check["logit_effect_mean_abs"] > 0, check  # on the probe samples
    assert not json.loads(paths.stage_status("merge").read_text())["warnings"]
    load_mxfp4_model(paths.merged, "cpu", torch.float32, "eager")  # the MXFP4 loader reads it back

    # a delta far below one FP4 step (the usual LoRA): re-quantization rounds it away, and the stage says so
    small = _copy(trained, tmp_path / "small", "merge.format=mxfp4")
    _scale_lora_b(small.adapter, 1e-3)
    main(small.config)
    check = json.loads((small.merged / "merge_check.json").read_text())
    status = json.loads(small.stage_status("merge").read_text())
    assert check["passed"] and check["survival_mean"] < 0.5, check["survival_mean"]
    assert check["logit_survival"] < 0.5, check["logit_survival"]
    assert any("kept only" in w for w in status["warnings"]), status


def test_eval_stage_runs_the_base_plus_adapter_unmerged_with_one_model_resident(trained, tmp_path, monkeypatch):
    from gptoss_hpc.stages import eval as eval_stage

    paths = _copy(trained, tmp_path)  # no merged/: the adapter path does not need one
    loads = []
    real = eval_stage.load_adapter
    monkeypatch.setattr(eval_stage, "load_adapter", lambda *a: loads.append(1) or real(*a))
    monkeypatch.setattr(eval_stage, "load_base", lambda *a: pytest.fail("a second model was loaded"))
    eval_stage.main(paths.config)
    result = json.loads((paths.eval / "eval.json").read_text())
    assert result["model"] == "adapter" and loads == [1]
    assert result["base"]["loss"] != result["finetuned"]["loss"], "disable_adapter() must give the base"
    assert result["finetuned"]["generations"] == result["base"]["generations"] > 0


def test_serve_app_answers_from_the_adapter_folder(trained, tmp_path):
    from fastapi.testclient import TestClient
    from peft import PeftModel

    from gptoss_hpc.modeling.mxfp4.model import mxfp4_modules
    from gptoss_hpc.serving.app import create_app, load_model

    _, config = trained
    cfg = load_run_config(config)
    folder = PointPaths.from_config(config).adapter
    for with_cfg in (cfg, None):  # the stage (point config), and `python -m gptoss_hpc.serve <adapter folder>`
        model, _ = load_model(folder, with_cfg)
        assert isinstance(model, PeftModel) and mxfp4_modules(model), "the MXFP4 base + adapter, unmerged"
        del model
    with TestClient(create_app(folder, max_new_tokens_cap=8, cfg=cfg)) as client:
        assert client.get("/health").json()["model"].endswith("/p000")
        answer = client.post("/score", json={"prompt": "Hi!", "max_new_tokens": 4})
        assert answer.status_code == 200 and "completion" in answer.json()


def test_eval_and_serve_of_the_adapter_need_no_merge_and_follow_train():
    from gptoss_hpc.errors import ConfigError
    from gptoss_hpc.submission.backends import _dependency
    from gptoss_hpc.submission.pipeline import compose_launch

    args = ["model=gpt_oss_120b", "cluster=coreweave_h200", "cluster.account=a", "stages=[train,eval,serve]"]
    launch = compose_launch(args)  # validates: model.experts_dtype=mxfp4 -> eval.model=adapter
    assert _dependency(launch, "eval", {"train": "11"}) == "afterok:11"
    assert _dependency(launch, "serve", {"train": "11"}) == "afterok:11"
    with pytest.raises(ConfigError, match="eval without merge"):
        compose_launch([*args, "eval.model=merged"])
