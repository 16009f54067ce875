"""The train stage for real with model.experts_dtype=mxfp4 on CPU: a Hub-layout MXFP4 checkpoint (tiny, from
gptoss_hpc.synth_checkpoint), TRL SFTTrainer + PEFT, the experts resident as blocks/scales. The adapter it saves
loads onto the bf16-dequantized base (what merge/eval load) and reproduces the trained model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptoss_hpc.config import compose, save_run_config, to_run_config, validate
from gptoss_hpc.paths import PointPaths

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from gptoss_hpc.synth_checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-mxfp4", "tiny")


def _point(tmp_path: Path, folder: Path, *overrides: str) -> Path:
    cfg = to_run_config(
        compose(
            [
                "experiment=demo",
                "model.tiny=false",
                f"model.name_or_path={folder}",
                "model.tokenizer=auto",
                "model.dequantize_mxfp4=true",
                "model.experts_dtype=mxfp4",
                "train.max_steps=4",
                "train.max_length=256",
                *overrides,
            ]
        )
    )
    return save_run_config(validate(cfg), tmp_path / "run" / "p000" / "config.yaml")


def test_train_stage_with_mxfp4_resident_experts(tmp_path, synth, monkeypatch):
    import torch
    import trl
    from peft import PeftModel

    from gptoss_hpc.config import load_run_config
    from gptoss_hpc.modeling.model import load_base_model
    from gptoss_hpc.modeling.mxfp4.experts import Mxfp4Experts
    from gptoss_hpc.stages.train import main

    for var in ("WANDB_API_KEY", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    trained = {}
    real_train = trl.SFTTrainer.train

    def spy(self, *args, **kwargs):  # keep a handle on the live trained model (test-only observation)
        out = real_train(self, *args, **kwargs)
        trained["model"] = self.model
        return out

    monkeypatch.setattr(trl.SFTTrainer, "train", spy)
    config = _point(tmp_path, synth)
    paths = PointPaths.from_config(config)
    metrics = main(config)
    assert json.loads(paths.stage_status("train").read_text())["state"] == "COMPLETED"
    assert metrics["global_step"] == 4
    live = trained["model"].eval()
    assert any(isinstance(m, Mxfp4Experts) for m in live.modules())
    assert not any(n.endswith(("gate_up_proj", "down_proj")) for n, _ in live.named_parameters())

    cfg = load_run_config(config)
    base = load_base_model(cfg, paths, for_training=False)  # bf16-dequantized: what merge and eval load
    assert not any(isinstance(m, Mxfp4Experts) for m in base.modules())
    reloaded = PeftModel.from_pretrained(base, str(paths.adapter)).eval()
    ids = torch.randint(0, 2000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = live(input_ids=ids).logits, reloaded(input_ids=ids).logits
        plain = reloaded.get_base_model()
        with reloaded.disable_adapter():
            c = plain(input_ids=ids).logits
    assert (a - b).abs().max().item() < 1e-4
    assert (a - c).abs().max().item() > 1e-4  # training changed the model


def test_two_ranks_deepspeed_zero2_with_mxfp4_resident_experts(tmp_path, synth):
    """DeepSpeed broadcasts every parameter at start: the expert placeholders (a stride-0 view) must be out of
    the parameter list by then, or the broadcast fails. 2 ranks over gloo, as the launcher submits them."""
    import submitit

    from gptoss_hpc.stages.train import TrainJob

    config = _point(tmp_path, synth, "train.deepspeed=true", "cluster.tasks_per_node=2", "train.max_steps=2")
    paths = PointPaths.from_config(config)
    executor = submitit.LocalExecutor(folder=paths.run_dir / "slurm" / "train")
    executor.update_parameters(tasks_per_node=2, timeout_min=10)
    job = executor.submit(TrainJob(), str(config))
    results = job.results()
    m = json.loads(paths.train_metrics.read_text())
    assert results[0]["global_step"] == 2 and len(results) == 2
    assert m["world_size"] == 2 and m["engine"] == "DeepSpeedEngine" and m["zero_stage"] == 2

    # The checkpoint is training state only. The frozen MXFP4 experts used to ride along in every DeepSpeed save
    # (persistent buffers: exclude_frozen_parameters drops parameters only), ~61 GB a save for 120b, which filled
    # the H200 box's disk at the final save. A re-run with more steps resumes from it onto the base's experts.
    import torch

    states = list((paths.train / "checkpoint-2").glob("global_step2/mp_rank_*_model_states.pt"))
    assert states, sorted(p.name for p in (paths.train / "checkpoint-2").rglob("*"))
    module = torch.load(states[0], map_location="cpu", weights_only=False)["module"]
    assert module and all("lora_" in k for k in module), [k for k in module if "lora_" not in k][:5]
    config = _point(tmp_path, synth, "train.deepspeed=true", "cluster.tasks_per_node=2", "train.max_steps=3")
    paths.train_metrics.unlink()  # a finished point is not trained again unless its metrics are removed
    job = executor.submit(TrainJob(), str(config))
    again = job.results()
    m = json.loads(paths.train_metrics.read_text())
    assert again[0]["global_step"] == 3 and m["resumed_from"].endswith("checkpoint-2"), m
