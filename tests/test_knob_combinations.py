"""Every combination of model.fused_experts, model.compile_layers, train.gradient_checkpointing, train.packing, LoRA
preset and ranks either runs or is refused by validate (issue 13); none is refused today.

Real: the train stage with TRL's SFTTrainer, PEFT, the tiny gpt-oss (fp32, grouped_mm experts, eager attention),
DeepSpeed ZeRO-2 over gloo for 2 ranks. The compiled knobs really compile on CPU: GPTOSS_HPC_CPU_COMPILE_BACKEND
=aot_eager runs them through dynamo + AOT autograd (the same graphs, guards and autograd as inductor on the GPU,
eager kernels). Faked: the GPU (ranks on CPU). What only a GPU runs (flex_attention backward, inductor/triton) is
the GPU knob list of launchers/gpu_check.sh (gptoss_hpc.bench.gpu_check_knobs.GPU_KNOBS).

The H200 crash this guards against: gradient checkpointing + fused experts failed every step with
``compiled experts failed (_StopRecomputationError); running them eagerly`` then ``AssertionError: Unexpected
state: target_frame.early_stop is set``; it reproduces on CPU with this backend and the old eager fallback.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from gptoss_hpc.bench.gpu_check_knobs import GPU_KNOBS, Knobs, knob_matrix
from gptoss_hpc.config import compose, save_run_config, to_run_config, validate
from gptoss_hpc.paths import PointPaths


@pytest.mark.parametrize("k", knob_matrix(), ids=lambda k: k.name)
def test_every_combination_validates_with_the_gpu_presets(k: Knobs) -> None:
    validate(to_run_config(compose(["cluster=coreweave_h200", f"cluster.gpus_per_node={k.ranks}", *k.overrides()])))


def test_the_gpu_list_holds_the_shipped_configs_and_the_crash() -> None:
    default = to_run_config(compose([]))
    reference = to_run_config(compose(["train=reference"]))
    as_knobs = [
        Knobs(c.model.fused_experts, c.model.compile_layers, c.train.gradient_checkpointing, c.train.packing)
        for c in (default, reference)
    ]
    assert as_knobs == GPU_KNOBS[:2]
    assert {k.lora for k in GPU_KNOBS} == {"experts", "attention", "all_linear"}
    assert {k.ranks for k in GPU_KNOBS} == {1, 2}


def _point(tmp_path, k: Knobs, *extra: str):
    cfg = validate(
        to_run_config(
            compose(
                [
                    "experiment=demo",
                    "model.tokenizer=tiny-bpe",
                    "model.experts_implementation=grouped_mm",
                    "train.max_steps=2",
                    "train.max_length=256",
                    "train.loss_chunk_tokens=64",  # train=default's fused loss (demo turns it off)
                    "train.no_grad_below_first_lora=true",
                    *k.overrides(),
                    *extra,
                ]
            )
        )
    )
    return save_run_config(cfg, tmp_path / "run" / "p000" / "config.yaml")


@pytest.fixture
def compiled_on_cpu(monkeypatch):
    from gptoss_hpc.modeling.fast.anatomy import _COMPILED
    from gptoss_hpc.modeling.fast.fallback import CPU_BACKEND_ENV

    for var in ("WANDB_API_KEY", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(CPU_BACKEND_ENV, "aot_eager")
    _COMPILED.clear()
    torch._dynamo.reset()
    yield _COMPILED
    _COMPILED.clear()
    torch._dynamo.reset()


def _check_metrics(paths: PointPaths, k: Knobs) -> dict:
    m = json.loads(paths.train_metrics.read_text())
    assert m["global_step"] == 2 and m["world_size"] == k.ranks
    assert all(math.isfinite(json.loads(x)["loss"]) for x in paths.metrics.read_text().splitlines() if '"loss"' in x)
    knobs = m["speed_knobs"] or {}
    assert (knobs.get("experts_implementation") == "fused_grouped_mm") is k.fused_experts
    # compiled layers without checkpointing; with it the layers and the experts core stay eager (logged).
    # A layer whose expert LoRA PEFT parametrizes in its forward stays eager (untraceable); factored (fused) it
    # compiles. The tiny model's expert LoRA is on both layers.
    compiled = k.compile_layers and not k.gradient_checkpointing and (k.fused_experts or k.lora == "attention")
    assert knobs.get("compiled_layers", 0) == (2 if compiled else 0)
    assert (knobs.get("factored_expert_lora", 0) > 0) is (k.fused_experts and k.lora != "attention")
    # demo: micro-batch 2 x max_length, accumulation 1; packed, each micro-batch is one bin (train.packing_bin)
    assert m["batch"]["effective_batch"] == (1 if k.packing else 2) * k.ranks
    assert m["batch"]["max_tokens_per_step"] == 2 * m["batch"]["max_length"] * k.ranks
    return m


# single-rank runs covering every pair of knob values; the first two are train=reference and train=default with
# the GPU presets' model knobs
CPU_RUNS = [
    Knobs(True, True, True, False),
    Knobs(True, True, False, True),
    Knobs(True, False, True, True, "attention"),
    Knobs(False, True, True, False, "all_linear"),
    Knobs(False, False, False, True, "attention"),
    Knobs(True, True, False, False, "all_linear"),
    Knobs(False, True, False, True),
    Knobs(True, False, True, False, "all_linear"),
]
_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "k", [CPU_RUNS[0], CPU_RUNS[1], *(pytest.param(k, marks=_SLOW) for k in CPU_RUNS[2:])], ids=lambda k: k.name
)
def test_combination_trains_through_the_real_stage(tmp_path, compiled_on_cpu, k: Knobs) -> None:
    from gptoss_hpc.stages.train import main

    config = _point(tmp_path, k)
    main(config)
    _check_metrics(PointPaths.from_config(config), k)
    if k.fused_experts and not k.gradient_checkpointing:  # the compiled experts ran, no eager fallback
        assert "core:aot_eager" in compiled_on_cpu and not compiled_on_cpu.get("disabled")
    if k.fused_experts and k.gradient_checkpointing:  # eager core by design (set_compiled_experts), never compiled
        assert "core:aot_eager" not in compiled_on_cpu and compiled_on_cpu.get("eager_by_config")
    assert not compiled_on_cpu.get("ce_disabled")


@pytest.mark.slow
@pytest.mark.parametrize("k", [Knobs(True, True, False, True, ranks=2), Knobs(True, True, True, False, ranks=2)],
                         ids=lambda k: k.name)  # fmt: skip
def test_combination_trains_on_two_ranks(tmp_path, compiled_on_cpu, k: Knobs) -> None:
    """2 ranks through submitit's LocalExecutor and TrainJob (as the launcher starts them), ZeRO-2 over gloo."""
    import submitit

    from gptoss_hpc.stages.train import TrainJob

    config = _point(tmp_path, k, "train.deepspeed=true", "cluster.tasks_per_node=2")
    paths = PointPaths.from_config(config)
    executor = submitit.LocalExecutor(folder=paths.run_dir / "slurm" / "train")
    executor.update_parameters(tasks_per_node=2, timeout_min=15)
    job = executor.submit(TrainJob(), str(config))
    job.results()
    m = _check_metrics(paths, k)
    assert m["zero_stage"] == 2 and m["backend"] == "gloo"
    assert "running them eagerly" not in job.stderr()


def test_checkpointings_early_stop_passes_through_and_only_compile_failures_fall_back() -> None:
    from torch._dynamo.exc import InternalTorchDynamoError
    from torch.utils.checkpoint import _StopRecomputationError

    from gptoss_hpc.errors import GptossHpcError
    from gptoss_hpc.modeling.fast.fallback import call_compiled

    def raises(exc):
        def f(*args):
            raise exc

        return f

    def eager(x):
        return x + 1

    state: dict = {}
    with pytest.raises(_StopRecomputationError):
        call_compiled(raises(_StopRecomputationError()), eager, (1,), what="experts", flag="off", state=state)
    with pytest.raises(torch.OutOfMemoryError):  # an OOM is no reason to run the same thing eagerly
        call_compiled(raises(torch.OutOfMemoryError("oom")), eager, (1,), what="experts", flag="off", state=state)
    assert state == {}
    failed = InternalTorchDynamoError("dynamo broke")  # a compile failure
    inside_checkpoint = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)  # as checkpoint does
    with inside_checkpoint, pytest.raises(GptossHpcError, match=r"model\.fused_experts=false"):
        call_compiled(raises(failed), eager, (1,), what="experts", flag="off", state=state)
    assert call_compiled(raises(failed), eager, (1,), what="experts", flag="off", state=state) == 2
    assert state == {"off": True}
