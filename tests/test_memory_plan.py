"""The memory pre-flight: gptoss_hpc.config.memory's estimate against the measured peaks it is calibrated on,
validate's refusal (with fixes that do fit), and `python -m gptoss_hpc.plan` as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_hpc.config import compose, to_run_config
from gptoss_hpc.config.memory import arch_for, estimate_stages, train_estimate
from gptoss_hpc.config.validate import validate
from gptoss_hpc.errors import ConfigError

_STOCK = [
    "model.fused_experts=false", "model.compile_layers=false", "train.loss_chunk_tokens=0", "train.packing=true",
    "train.gradient_checkpointing=true", "train.per_device_train_batch_size=2",
]  # fmt: skip
_MB2 = "train.per_device_train_batch_size=2"
# (overrides, bench peak allocated GiB): 20b bf16, H100/H200, docs/BENCHMARKS.md and /work/shared/FACTS.md
MEASURED = [
    (["train=fast"], 55.8),
    (["train=fast", _MB2], 48.3),
    (["train=fast", "train.per_device_train_batch_size=8"], 70.8),
    (_STOCK, 49.0),
    ([*_STOCK[:2], *_STOCK[3:], "train.loss_chunk_tokens=4096"], 42.8),
    (["model.compile_layers=false", "train.gradient_checkpointing=false", _MB2], 49.0),
    (["train=fast", "lora=attention", _MB2], 56.5),
    (["train=fast", "lora=attention"], 72.3),
    (["train=fast", "lora=all_linear", _MB2], 53.8),
    (["train=fast", "lora=all_linear"], 66.7),
]


def _cfg(*overrides: str):
    return to_run_config(compose(["cluster=coreweave_h200", *overrides]))


@pytest.mark.parametrize(("overrides", "measured"), MEASURED)
def test_estimate_is_within_ten_percent_of_the_measured_peaks(overrides, measured):
    cfg = _cfg(*overrides)
    est = train_estimate(cfg, arch_for(cfg))
    assert abs(est.allocated - measured) <= 0.10 * measured, (overrides, est.parts)


def test_weights_by_dtype_match_the_published_sizes():
    """bf16 20b: 20.9B params (39 GiB); MXFP4 checkpoints: 20b ~13 GB, 120b ~61 GiB of which experts ~57."""
    bf16 = train_estimate(_cfg(), arch_for(_cfg())).parts
    mx20 = train_estimate(_cfg("model.experts_dtype=mxfp4"), arch_for(_cfg())).parts
    c120 = _cfg("model=gpt_oss_120b")
    mx120 = train_estimate(c120, arch_for(c120)).parts
    assert 38.5 < bf16["weights"] < 39.5
    assert 12 < mx20["weights"] < 14 and "dequant buffer" in mx20 and "dequant buffer" not in bf16
    assert 58 < mx120["weights"] < 63
    assert c120.model.experts_dtype == "mxfp4"  # the 120b preset's default


def test_validate_refuses_what_does_not_fit_and_names_fixes_that_do():
    with pytest.raises(ConfigError) as err:
        validate(_cfg("cluster.gpu_memory_gib=24", "train=fast", "stages=[train]"))
    msg = str(err.value)
    assert "train stage needs" in msg and "cluster.gpu_memory_gib=24" in msg
    assert "model.experts_dtype=mxfp4" in msg and "ZeRO-3" in msg
    fix = msg.split("cheapest fixes that fit (fastest first): (1) ")[1].split(";")[0]
    validate(
        _cfg("cluster.gpu_memory_gib=24", "train=fast", "stages=[train]", *fix.split())
    )  # the first named fix does fit

    with pytest.raises(ConfigError, match=r"train stage needs .* \(1\) model\.experts_dtype=mxfp4[ ;]"):
        validate(_cfg("cluster=coreweave_h100", "model=gpt_oss_120b", "model.experts_dtype=bfloat16", "stages=[train]"))
    # train=default's 4x2048 micro-batch: 120b (mxfp4) fits an H200; on an 80 GB H100 it is refused, naming
    # recompute and a smaller micro-batch, the fastest first: the one train.fit_memory picks (recompute: 0.61 of
    # the speed, against 0.41 for 1x2048 micro-batches)
    validate(_cfg("cluster=coreweave_h200", "model=gpt_oss_120b", "stages=[train]"))
    with pytest.raises(ConfigError) as err:
        validate(_cfg("cluster=coreweave_h100", "model=gpt_oss_120b", "stages=[train]"))
    fixes = str(err.value).split("cheapest fixes that fit (fastest first): ")[1].split(". ZeRO-2")[0]
    assert fixes.startswith("(1) train.gradient_checkpointing=true; (2) "), fixes
    assert "train.per_device_train_batch_size=1 train.gradient_accumulation_steps=8" in fixes, fixes
    validate(_cfg("cluster.gpu_memory_gib=null", "model=gpt_oss_120b", "model.experts_dtype=bfloat16"))  # unknown


def test_validate_skips_the_check_on_cpu_clusters():
    cfg = to_run_config(compose(["cluster=local", "model=tiny_gpt_oss", "cluster.gpu_memory_gib=1"]))
    validate(cfg)  # accelerator=cpu: no GPU to fit


def test_zero3_refusal_says_why_and_what_instead():
    with pytest.raises(ConfigError) as err:
        validate(_cfg("train.zero.stage=3"))
    assert "train.zero.stage" in str(err.value) and "model.experts_dtype=mxfp4" in str(err.value)


def test_every_stage_is_estimated_and_the_120b_streams_its_merge_and_evaluates_unmerged():
    stages = estimate_stages(_cfg("model=gpt_oss_120b"), 141)  # experts_dtype=mxfp4 by default
    assert [e.stage for e in stages] == ["train", "merge", "eval", "serve"]
    assert all(e.fits for e in stages), [(e.stage, e.card) for e in stages]
    merge, eval_ = stages[1], stages[2]
    assert "streaming" in merge.note and merge.card < 40  # ~three fp32 expert stacks, not the 218 GiB model
    assert "unmerged" in eval_.note and 60 < eval_.card < 79  # MXFP4 weights (~61 GiB) + adapter + KV
    bf16 = estimate_stages(_cfg("model=gpt_oss_120b", "model.experts_dtype=bfloat16"), 141)
    assert not bf16[1].fits and "streams" in bf16[1].note and not bf16[2].fits
    merged = estimate_stages(_cfg("model=gpt_oss_120b", "eval.model=merged"), 141)
    assert not merged[2].fits and "merged" in merged[2].note


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptoss_hpc.plan", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_plan_cli_prints_the_stages_and_exits_by_the_train_verdict(tmp_path: Path):
    ok = _plan("cluster=coreweave_h100")
    assert ok.returncode == 0, ok.stderr
    assert "train |" in ok.stdout and "serve |" in ok.stdout and "capacity" in ok.stdout
    bad = _plan("cluster=coreweave_h100", "model=gpt_oss_120b", "train=fast", "train.fit_memory=false")
    assert bad.returncode == 1 and "NO" in bad.stdout.splitlines()[2]
    # the shipped default fits itself to the card (gptoss_hpc.config.fit), as the launcher would
    fitted = _plan("cluster=coreweave_h100", "model=gpt_oss_120b", "stages=[train]")
    assert fitted.returncode == 0 and "recompute=True" in fitted.stdout.splitlines()[0], fitted.stdout
    assert "training with train.gradient_checkpointing=true instead" in fitted.stdout
    fits = _plan("--fits")
    assert fits.returncode == 0 and "| gpt_oss_120b |" in fits.stdout and "24 GB" in fits.stdout
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": [
        {"name": "x", "overrides": ["train=fast"], "peak_alloc_gib": 55.8, "tok_s": 1, "micro_batch": "4x2048"},
    ]}))  # fmt: skip
    cmp = _plan("--compare", str(bench))
    assert cmp.returncode == 0 and "| x | 4x2048" in cmp.stdout and "55.8" in cmp.stdout


def test_120b_pipeline_fits_one_80gb_card_through_the_streaming_merge_and_unmerged_eval():
    stages = "stages=[train,merge,eval,serve]"
    fits = ["cluster.gpu_memory_gib=80", "train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=16"]
    validate(_cfg("model=gpt_oss_120b", stages, *fits))  # MXFP4 train, streaming merge, eval/serve unmerged
    with pytest.raises(ConfigError, match=r"the eval stage needs .*eval\.model=adapter"):
        validate(_cfg("model=gpt_oss_120b", stages, *fits, "eval.model=merged"))
    with pytest.raises(ConfigError, match=r"the merge stage needs .*model\.experts_dtype=mxfp4"):
        validate(_cfg("model=gpt_oss_120b", "model.experts_dtype=bfloat16", "stages=[train,merge]"))
    validate(_cfg("cluster=coreweave_h100"))  # 20b bf16 trains, merges and evaluates on one 80 GB card


def test_local_gpu_cluster_reads_the_card_from_nvidia_smi(tmp_path, monkeypatch):
    """The GPU is faked by an nvidia-smi on PATH that answers the memory query like the real one (MiB)."""
    from gptoss_hpc.config.memory import gpu_memory_gib

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 24564\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    local = ["cluster=local", "cluster.accelerator=gpu", "stages=[train]"]
    assert abs(gpu_memory_gib(_cfg(*local)) - 24564 / 1024) < 1e-9
    with pytest.raises(ConfigError, match=r"cluster\.gpu_memory_gib=23\.98"):
        validate(_cfg(*local, "train=fast"))
    validate(_cfg(*local, "model.experts_dtype=mxfp4", "train.per_device_train_batch_size=1"))
    monkeypatch.setenv("PATH", "/nonexistent")
    assert gpu_memory_gib(_cfg(*local)) is None  # no nvidia-smi: no check
