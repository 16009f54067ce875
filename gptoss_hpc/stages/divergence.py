"""A diverging run stops: the train stage ends FAILED at the optimizer step whose loss or gradient norm is NaN/inf
(or, with ``train.divergence_spike_factor``, whose loss stays far above its recent median), before that step's
checkpoint is saved, so no broken adapter is saved, merged or evaluated (the failed train job cancels them).

Where it looks, to add no host sync in the common case: on a logging step (``train.logging_steps=1``, the default:
every step) it reads the loss and gradient norm that transformers has already gathered over the ranks and copied
to the host for the log, identical on every rank, so every rank decides the same and raises at the same point,
with no collective in the error path. Between logging steps (``train.logging_steps`` > 1) it reads one flag per
optimizer step: the running loss and the gradient norm tested on the device, OR-ed over the ranks by one small
all_reduce on the success path.

Test-only hook: ``GPTOSS_HPC_TEST_NAN_AT=<rank>:<step>[:<point>]`` multiplies that rank's training loss by NaN in every
micro-batch of that optimizer step (1-based, as ``global_step`` after it), inside the real forward/backward, so
the loss, the gradients and the gradient norm all become NaN as in a real blow-up.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from collections import deque
from collections.abc import Callable
from typing import Any

from gptoss_hpc.config import RunConfig
from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.modeling.distributed import global_rank

log = logging.getLogger(__name__)

NAN_ENV = "GPTOSS_HPC_TEST_NAN_AT"
# Logged losses the spike rule takes its median over.
SPIKE_WINDOW = 32


class Diverged(GptossHpcError):
    """The loss or gradient norm became NaN/inf, or the loss blew up: the train stage stops."""


def rank_step(env: str, point: str) -> tuple[int, int] | None:
    """(rank, step) of a test-only hook (GPTOSS_HPC_TEST_RAISE_AT, GPTOSS_HPC_TEST_NAN_AT) set to ``<rank>:<step>``
    (every point of a launch) or ``<rank>:<step>:<point>`` (that point only, e.g. ``1:3:p002``); None when the
    variable is unset or names another point."""
    spec = os.environ.get(env)
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) == 3:
        if parts[2] != point:
            return None
        parts = parts[:2]
    try:
        rank, step = (int(x) for x in parts)
    except ValueError as exc:
        raise GptossHpcError(f"{env}={spec!r} is not <rank>:<step>[:<point>], e.g. 0:2 or 0:2:p001; unset it") from exc
    return rank, step


class DivergenceGuard:
    """Decides from host values; ``last_checkpoint()`` names the newest complete checkpoint for the message."""

    def __init__(self, cfg: RunConfig, last_checkpoint: Callable[[], Any]) -> None:
        t = cfg.train
        self.spike_factor = float(t.divergence_spike_factor)
        self.spike_steps = int(t.divergence_spike_steps)
        self.last_checkpoint = last_checkpoint
        self.recent: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self.above = 0

    def check(
        self, step: int, loss: float | None, grad_norm: float | None, lr: float | None, spike: bool = True
    ) -> None:
        """Raise Diverged if this optimizer step's loss or gradient norm is not finite, or (``spike``: ``loss`` is
        a logged value) the spike rule fires."""
        for name, value in (("loss", loss), ("gradient norm", grad_norm)):
            if value is not None and not math.isfinite(value):
                self.fail(f"{name} became {_word(value)} at step {step}", lr)
        if loss is None or self.spike_factor <= 0 or not spike:
            return
        median = statistics.median(self.recent) if len(self.recent) >= self.spike_steps else None
        if median is not None and median > 0 and loss > self.spike_factor * median:
            self.above += 1
            if self.above >= self.spike_steps:
                self.fail(
                    f"loss spiked at step {step}: {loss:.4g} is above {self.spike_factor:g}x the median {median:.4g} "
                    f"of the last {len(self.recent)} logged losses for {self.above} logged steps in a row "
                    "(train.divergence_spike_factor, train.divergence_spike_steps)",
                    lr,
                )
            return  # a spike does not enter the median it is judged against
        self.above = 0
        self.recent.append(loss)

    def fail(self, what: str, lr: float | None) -> None:
        checkpoint = self.last_checkpoint()
        rate = f"learning rate {lr:.3g}" if lr is not None else "learning rate unknown"
        raise Diverged(
            f"{what} ({rate}); last good checkpoint: {checkpoint or 'none'}. Nothing after it is saved, and this "
            "point's merge and eval are cancelled. Lower train.learning_rate (or raise train.warmup_ratio) and "
            "re-run to resume from that checkpoint; train.stop_on_divergence=false trains on regardless"
        )


def _word(value: float) -> str:
    return "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def guarded_trainer_class(base: type, guard: DivergenceGuard | None, point: str) -> type:
    """``base`` (an SFTTrainer class) checked by ``guard`` at every optimizer step (None: no check), with the
    GPTOSS_HPC_TEST_NAN_AT hook when that variable is set for this ``point`` (its folder name, e.g. p000)."""
    nan_at = rank_step(NAN_ENV, point)
    if nan_at is not None:
        log.warning("%s is set: rank %d's loss becomes NaN at step %d (test-only hook)", NAN_ENV, *nan_at)
    if guard is None and nan_at is None:
        return base

    class GuardedTrainer(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if nan_at is None or not model.training or (global_rank(), self.state.global_step + 1) != nan_at:
                return out
            if return_outputs:
                return out[0] * float("nan"), out[1]
            return out * float("nan")

        def log(self, logs, *args, **kwargs):
            super().log(logs, *args, **kwargs)  # metrics.jsonl keeps the NaN line
            if guard is not None and "loss" in logs:
                guard.check(self.state.global_step, logs["loss"], logs.get("grad_norm"), logs.get("learning_rate"))

        def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
            logs_now = self.control.should_log and self.state.global_step > self._globalstep_last_logged
            if guard is not None and not logs_now:  # else log() above checks the values it already has
                loss, norm = _nonfinite_on_any_rank(tr_loss, grad_norm)
                guard.check(self.state.global_step, loss, norm, kwargs.get("learning_rate"), spike=False)
            return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    return GuardedTrainer


def _nonfinite_on_any_rank(tr_loss: Any, grad_norm: Any) -> tuple[float | None, float | None]:
    """(NaN, inf or None for the loss; the same for the gradient norm): NaN or inf where it is so on any rank, None
    where it is finite everywhere. One device tensor, one all_reduce, one host read. ``tr_loss`` is transformers'
    running sum since the last log: a NaN/inf in it stays there until that log."""
    import torch
    import torch.distributed as dist

    values = [tr_loss, grad_norm if grad_norm is not None else 0.0]
    flags = torch.stack([torch.as_tensor(v, device=tr_loss.device, dtype=torch.float32) for v in values])
    flags = torch.stack([flags.isnan(), flags.isinf()], dim=1).float()  # [loss, norm] x [nan, inf]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    out: list[float | None] = []
    for nan, inf in flags.tolist():
        out.append(math.nan if nan else (math.inf if inf else None))
    return out[0], out[1]
