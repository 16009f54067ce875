"""The train stage for real on CPU: tiny gpt-oss, the bundled sample, TRL SFTTrainer + PEFT (+ DeepSpeed).

Nothing is faked except W&B's server (WANDB_MODE=offline with a made-up key) and GPUs (ranks on CPU/gloo).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptoss_hpc.config import compose, save_run_config, to_run_config, validate
from gptoss_hpc.paths import PointPaths
from gptoss_hpc.stages.checkpoints import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]


def make_point(tmp_path: Path, *overrides: str) -> Path:
    cfg = validate(to_run_config(compose(["experiment=demo", *overrides])))
    return save_run_config(cfg, tmp_path / "run" / "p000" / "config.yaml")


def run_cli(config: Path, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RANK", "WORLD_SIZE"))}
    full.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "gptoss_hpc.stages.train", str(config)],
        cwd=REPO,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_latest_checkpoint_skips_half_written(tmp_path):
    train = tmp_path / "train"
    good, newer_broken, wrong_step = train / "checkpoint-4", train / "checkpoint-8", train / "checkpoint-6"
    for d, step in ((good, 4), (newer_broken, 8), (wrong_step, 5)):
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_bytes(b"x")
        (d / "optimizer.pt").write_bytes(b"x")
        if d is not newer_broken:  # a save killed before trainer_state.json (written last)
            (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (train / "checkpoint-12").mkdir()  # empty
    (train / "checkpoint-2-tmp").mkdir()
    assert latest_checkpoint(train) == good
    ds = train / "checkpoint-10"  # DeepSpeed layout: `latest` names the global_step folder
    ds.mkdir()
    (ds / "adapter_model.safetensors").write_bytes(b"x")
    (ds / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    (ds / "latest").write_text("global_step10")
    assert latest_checkpoint(train) == good
    (ds / "global_step10").mkdir()
    assert latest_checkpoint(train) == ds
    assert latest_checkpoint(tmp_path / "nothing") is None


@pytest.mark.slow
def test_demo_trains_with_the_real_tokenizer_and_adapter_reproduces_logits(tmp_path, monkeypatch):
    """experiment=demo as shipped: tiny gpt-oss + the 201k gpt-oss tokenizer built offline, 8 steps."""
    import torch
    import trl
    from peft import PeftModel

    from gptoss_hpc.config import load_run_config
    from gptoss_hpc.modeling.model import load_base_model
    from gptoss_hpc.modeling.tokenizer import load_tokenizer
    from gptoss_hpc.stages.train import main

    for var in ("WANDB_API_KEY", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    trained = {}
    real_train = trl.SFTTrainer.train

    def spy(self, *args, **kwargs):  # keep a handle on the live trained model (test-only observation)
        out = real_train(self, *args, **kwargs)
        trained["model"] = self.model
        trained["callbacks"] = [type(cb).__name__ for cb in self.callback_handler.callbacks]
        return out

    monkeypatch.setattr(trl.SFTTrainer, "train", spy)
    config = make_point(tmp_path)
    paths = PointPaths.from_config(config)
    metrics = main(config)

    # files a user would look at
    assert json.loads(paths.stage_status("train").read_text())["state"] == "COMPLETED"
    on_disk = json.loads(paths.train_metrics.read_text())
    assert on_disk["global_step"] == 8 and on_disk["world_size"] == 1 and on_disk["tokens"] > 0
    assert metrics["last_loss"] < metrics["first_loss"], metrics
    lines = [json.loads(x) for x in paths.metrics.read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert len(losses) == 8 and losses[-1] == metrics["last_loss"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (paths.adapter / name).is_file(), name
    assert list((paths.train / "runs").rglob("events.out.tfevents.*")), "TensorBoard logs missing"
    assert "hf_" not in (paths.adapter / "adapter_config.json").read_text()
    # nothing W&B-related without WANDB_API_KEY: no callback, no run, no files. (TRL imports the wandb
    # module when it is installed; importing it starts nothing.)
    assert "WandbCallback" not in trained["callbacks"] and "TensorBoardCallback" in trained["callbacks"]
    assert not (paths.root / "wandb").exists()
    if "wandb" in sys.modules:
        assert sys.modules["wandb"].run is None

    # The adapter loads onto the saved base and reproduces the trained model's logits.
    cfg = load_run_config(config)
    tok = load_tokenizer(cfg.model)
    batch = tok.apply_chat_template(
        [{"role": "user", "content": "What is 17 + 25?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = batch["input_ids"] if hasattr(batch, "keys") else batch
    live = trained["model"].eval()
    reloaded = PeftModel.from_pretrained(load_base_model(cfg, paths, for_training=False), str(paths.adapter)).eval()
    base = load_base_model(cfg, paths, for_training=False)
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (live, reloaded, base))
    diff = (a - b).abs().max().item()
    print(f"loss {metrics['first_loss']:.4f} -> {metrics['last_loss']:.4f}; adapter logits max diff {diff:.2e}")
    assert diff < 1e-5
    assert (a - c).abs().max().item() > 1e-4  # the adapter did change the model


@pytest.mark.slow
def test_two_ranks_run_deepspeed_zero2_over_gloo(tmp_path):
    """2 ranks via submitit's LocalExecutor (tasks_per_node=2) and TrainJob, as the launcher submits it."""
    import submitit

    from gptoss_hpc.stages.train import TrainJob

    config = make_point(tmp_path, "model.tokenizer=tiny-bpe", "train.deepspeed=true", "cluster.tasks_per_node=2")
    paths = PointPaths.from_config(config)
    executor = submitit.LocalExecutor(folder=paths.run_dir / "slurm" / "train")
    executor.update_parameters(tasks_per_node=2, timeout_min=10)
    job = executor.submit(TrainJob(), str(config))
    results = job.results()
    m = json.loads(paths.train_metrics.read_text())
    print({k: m[k] for k in ("world_size", "engine", "zero_stage", "backend", "first_loss", "last_loss")})
    assert results[0]["global_step"] == 8 and len(results) == 2
    assert m["world_size"] == 2 and m["distributed_world_size"] == 2
    assert m["deepspeed"] is True and m["engine"] == "DeepSpeedEngine" and m["zero_stage"] == 2
    assert m["backend"] == "gloo"
    # ZeRO-2 partitions the optimizer state: one shard per rank in the DeepSpeed checkpoint
    step_dir = paths.train / "checkpoint-8" / "global_step8"
    shards = sorted(p.name for p in step_dir.glob("*optim_states.pt"))
    assert len(shards) == 2, shards
    assert json.loads((paths.adapter / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 2


@pytest.mark.slow
def test_wandb_offline_run_when_a_key_is_set(tmp_path):
    """W&B's server is faked by WANDB_MODE=offline; the key is made up and never leaves the machine."""
    config = make_point(tmp_path, "model.tokenizer=tiny-bpe", "train.max_steps=2")
    paths = PointPaths.from_config(config)
    secret = "hf_" + "s3cr3t" * 6
    proc = run_cli(
        config, {"WANDB_API_KEY": "f" * 40, "WANDB_MODE": "offline", "HF_TOKEN": secret, "PUSH_TO_HUB": "false"}
    )
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    runs = list((paths.root / "wandb").glob("offline-run-*"))
    assert runs, f"no offline W&B run under {paths.root / 'wandb'}"
    assert "f" * 40 not in "".join(p.read_text(errors="ignore") for p in runs[0].rglob("*.yaml"))
    m = json.loads(paths.train_metrics.read_text())
    assert m["global_step"] == 2 and m["hub_repo"] is None  # PUSH_TO_HUB=false
    # secrets never land on disk: not in training_args.bin, configs, W&B files, TensorBoard events ...
    leaked = [p for p in paths.root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked, leaked


@pytest.mark.slow
def test_sigusr2_saves_a_checkpoint_and_a_rerun_resumes(tmp_path):
    """Run by hand (no submitit): SIGUSR2 → checkpoint at a step end, exit 1 with the resume hint; the same
    command again resumes from that checkpoint and ends at the same global step as an uninterrupted run."""
    config = make_point(
        tmp_path, "model.tokenizer=tiny-bpe", "train.max_steps=120", "train.save_steps=1000", "train.logging_steps=1"
    )
    paths = PointPaths.from_config(config)
    proc = run_cli(config)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if paths.metrics.is_file() and len(paths.metrics.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGUSR2)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    assert "preempted" in err and "re-run the same command to resume" in err
    ckpt = latest_checkpoint(paths.train)
    assert ckpt is not None
    stopped_at = int(ckpt.name.split("-")[1])
    assert 3 <= stopped_at < 120
    status = json.loads(paths.stage_status("train").read_text())
    assert status["state"] == "FAILED" and "Preempted" in status["error"]

    proc = run_cli(config)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    m = json.loads(paths.train_metrics.read_text())
    assert m["resumed_from"] == str(ckpt) and m["global_step"] == 120
    steps = [json.loads(x)["step"] for x in paths.metrics.read_text().splitlines() if '"loss"' in x]
    assert steps[-1] == 120 and min(s for s in steps if s > stopped_at) == stopped_at + 1


def test_push_adapter_only_when_asked_with_the_env_token(tmp_path, monkeypatch):
    """The Hub is faked: a recording stand-in for huggingface_hub.HfApi. The train stage's push (adapter/) and
    the merge stage's (merged/, repo + "-merged") are the one helper, modeling.hub.push_folder."""
    import huggingface_hub

    from gptoss_hpc.modeling.hub import push_folder

    def push_adapter(cfg, paths):
        return push_folder(cfg, paths, paths.adapter, what="adapter")

    calls = []

    class FakeApi:
        def whoami(self):
            return {"name": "someone"}

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, folder_path, repo_id, **kw):
            calls.append(("upload_folder", repo_id, folder_path))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    config = make_point(tmp_path)
    cfg = validate(to_run_config(compose(["experiment=demo"])))
    paths = PointPaths.from_config(config)
    for var in ("HF_TOKEN", "HF_USER", "PUSH_TO_HUB"):
        monkeypatch.delenv(var, raising=False)
    assert push_adapter(cfg, paths) is None and not calls  # no token: nothing
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setenv("PUSH_TO_HUB", "false")
    assert push_adapter(cfg, paths) is None and not calls
    monkeypatch.delenv("PUSH_TO_HUB")
    monkeypatch.setenv("HF_USER", "me")
    assert push_adapter(cfg, paths) == "me/demo-p000"
    assert calls == [
        ("create_repo", "me/demo-p000", {"private": True, "exist_ok": True, "repo_type": "model"}),
        ("upload_folder", "me/demo-p000", str(paths.adapter)),
    ]
    monkeypatch.delenv("HF_USER")
    assert push_adapter(cfg, paths) == "someone/demo-p000"
    assert push_folder(cfg, paths, paths.adapter, what="merged model", suffix="-merged") == "someone/demo-p000-merged"
    cfg.train.hub_model_id = "org/custom"
    assert push_adapter(cfg, paths) == "org/custom"
    (paths.run_dir / "p001").mkdir()  # a sweep: one repo per point, for the adapter as for the merged model
    assert push_adapter(cfg, paths) == "org/custom-p000"
    cfg.train.push_to_hub = False
    assert push_adapter(cfg, paths) is None


@pytest.mark.slow
def test_no_grad_prefix_knob_plugs_in_and_trains_the_same(tmp_path, monkeypatch):
    """gptoss_hpc.modeling.fast's train.no_grad_below_first_lora through the real train stage: LoRA on layer 1
    only, so layer 0 runs without autograd; the logged losses equal the stock run's."""
    from gptoss_hpc.stages.train import main

    for var in ("WANDB_API_KEY", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    losses = {}
    for knob in ("false", "true"):
        config = make_point(
            tmp_path / knob,
            "model.tokenizer=tiny-bpe",
            "lora.expert_layers=[1]",
            "train.max_steps=3",
            f"train.no_grad_below_first_lora={knob}",
        )
        m = main(config)
        losses[knob] = [
            json.loads(x)["loss"]
            for x in PointPaths.from_config(config).metrics.read_text().splitlines()
            if '"loss"' in x
        ]
        assert (m["speed_knobs"] or {}).get("no_grad_layers", 0) == (1 if knob == "true" else 0)
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_fused_experts_with_factored_lora_train_the_same_and_save_a_plain_adapter(tmp_path, monkeypatch):
    """model.fused_experts (expert LoRA as x@W + s(x@A)@B, gptoss_hpc.modeling.fast) through the real train stage:
    the logged losses of 3 optimizer steps (each after an update from the previous step's LoRA gradients) equal
    those of PEFT's own path, and the saved adapter has the same tensors."""
    import torch
    from safetensors.torch import load_file

    from gptoss_hpc.stages.train import main

    for var in ("WANDB_API_KEY", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    losses, adapters = {}, {}
    for knob in ("false", "true"):
        config = make_point(
            tmp_path / knob,
            "model.tokenizer=tiny-bpe",
            "model.experts_implementation=grouped_mm",
            "train.max_steps=3",
            f"model.fused_experts={knob}",
        )
        m = main(config)
        paths = PointPaths.from_config(config)
        losses[knob] = [json.loads(x)["loss"] for x in paths.metrics.read_text().splitlines() if '"loss"' in x]
        adapters[knob] = load_file(str(paths.adapter / "adapter_model.safetensors"))
        assert (m["speed_knobs"] or {}).get("factored_expert_lora", 0) == (2 if knob == "true" else 0)
    assert len(losses["true"]) == 3
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5, abs=1e-6)
    assert adapters["true"].keys() == adapters["false"].keys()
    for name, ref in adapters["false"].items():
        assert torch.allclose(adapters["true"][name], ref, rtol=1e-4, atol=1e-6), name


def test_rerunning_a_finished_point_does_not_train_again(tmp_path):
    """A finished point re-run by hand (or a requeue racing the end) keeps its adapter and step count."""
    from gptoss_hpc.stages.train import main

    config = make_point(tmp_path, "model.tokenizer=tiny-bpe", "train.max_steps=3", "train.save_steps=3")
    first = main(config)
    adapter = PointPaths.from_config(config).adapter / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    again = main(config)
    assert again["global_step"] == first["global_step"] == 3
    assert adapter.stat().st_mtime_ns == before


def test_chunked_loss_through_the_train_stage_matches_trls_loss(tmp_path, monkeypatch):
    """train.loss_chunk_tokens (lm_head + CE in chunks, gptoss_hpc.modeling.fast) through the real SFT stage:
    with gradient accumulation, the logged losses of 3 optimizer steps equal TRL's full-logits loss, so the
    gradients (hence the updates) are the same too."""
    from gptoss_hpc.stages.train import main

    for var in ("WANDB_API_KEY", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    losses = {}
    for chunk in (0, 64):
        config = make_point(
            tmp_path / str(chunk),
            "model.tokenizer=tiny-bpe",
            "train.max_steps=3",
            "train.gradient_accumulation_steps=2",
            f"train.loss_chunk_tokens={chunk}",
        )
        main(config)
        losses[chunk] = [
            json.loads(x)["loss"]
            for x in PointPaths.from_config(config).metrics.read_text().splitlines()
            if '"loss"' in x
        ]
    assert len(losses[0]) == 3
    assert losses[64] == pytest.approx(losses[0], rel=1e-5, abs=1e-6)
