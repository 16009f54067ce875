"""The GPU check's run state (``Check``: budget, rows, --set overrides) and each phase's inputs: the synthetic
checkpoint, the chat rows and the user's command line for them (``base_overrides``)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptoss_hpc.bench.gpu_check_parts import synth_checkpoint, write_chat_rows


@dataclass
class Check:
    cpu: bool
    work: Path
    budget_s: float
    hard_s: float
    steps: int
    warmup: int
    started: float
    rows: list[dict[str, Any]]
    extra: list[str] = field(default_factory=list)  # --set: overrides after every run's own (and its bench's)
    cap_gib: float | None = None  # --cap-gib: the long phase's runs on a card of this many GiB

    def left(self) -> float:
        """Seconds before no new run may start."""
        return self.budget_s - (time.time() - self.started)

    def hard_left(self) -> float:
        """Seconds before a running command is ended, so the table is still written inside the device limit."""
        return self.hard_s - (time.time() - self.started)

    def env(self) -> dict[str, str]:
        # the caller's environment as it is (NCCL_NVLS_ENABLE=0 and friends stay), plus quiet tokenizers
        return {**os.environ, "TOKENIZERS_PARALLELISM": "false"}

    def skip(self, phase: str, name: str) -> bool:
        if self.left() > 30:
            return False
        self.rows.append({"phase": phase, "name": name, "result": "not run (budget)"})
        return True


def checkpoint(c: Check, layers: int | None = None) -> Path:
    """The synthetic 20b checkpoint (or --cpu's tiny) of this phase; a failed write ends the check."""
    ckpt, row = synth_checkpoint(c, "20b", layers, "setup")
    if row is not None:
        c.rows.append(row)
        if row["result"] != "pass":
            raise SystemExit(f"synth_checkpoint failed:\n{row.get('log_tail', '')}")
    return ckpt


def _data(c: Check) -> Path:
    path = c.work / "chat.jsonl"
    if not path.is_file():
        write_chat_rows(
            # CPU: rows <= 160 words (~245 tokens with the template) inside the stand-in's train.max_length=256: the
            # launch refuses longer rows (data.max_length_policy=refuse)
            path,
            rows=64 if c.cpu else 800,
            median_tokens=120 if c.cpu else 1024,
            max_tokens=160 if c.cpu else 1900,
        )
    return path


def base_overrides(c: Check, ckpt: Path, gpus: int, layers: int | None = None) -> list[str]:
    """The user's command line for this checkpoint: model=gpt_oss_20b from a local folder, cluster=local."""
    ov = [
        f"model.name_or_path={ckpt}",
        "model.tokenizer=auto",
        "cluster=local",
        "data=local",
        f"data.path={_data(c)}",
        "data.eval_fraction=0.05",
        f"run_root={c.work / 'runs'}",
        "train.logging_steps=1",
        f"train.max_steps={c.steps}",
        "train.save_steps=100000",
        "train.push_to_hub=false",
        "eval.max_eval_rows=4",
        "eval.max_new_tokens=24",
    ]
    if c.cpu:
        # the CPU stand-in: tiny checkpoint, fp32, eager kernels, small rows; ranks on CPU with gloo
        ov += [
            "model=gpt_oss_20b",
            "model.num_hidden_layers=2",
            "model.dtype=float32",
            "model.attn_implementation=eager",
            "model.experts_implementation=null",
            "model.fused_experts=false",
            "model.compile_layers=false",
            "train.max_length=256",
            "train.per_device_train_batch_size=2",
            "train.gradient_accumulation_steps=1",
            "train.loss_chunk_tokens=256",
            "train.dataloader_num_workers=0",
            "cluster.accelerator=cpu",
            "cluster.cpus_per_task=1",
            f"cluster.gpus_per_node={gpus}",
        ]
    else:
        ov += ["model=gpt_oss_20b", "cluster.accelerator=gpu", f"cluster.gpus_per_node={gpus}"]
        if layers:
            ov += [f"model.num_hidden_layers={layers}"]
    return ov
