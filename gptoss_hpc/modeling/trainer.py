"""How the train stage plugs gptoss_hpc.modeling.fast into TRL: the model-level knobs as a callback at train
begin, and the chunked lm_head + CE as an SFTTrainer subclass whose loss equals TRL's."""

from __future__ import annotations

from typing import Any

from gptoss_hpc.config import RunConfig
from gptoss_hpc.errors import GptossHpcError


def speed_knobs_callback(cfg: RunConfig):
    """gptoss_hpc.modeling.fast's model-level knobs (exact; off by default), applied when training begins:
    after PEFT, gradient checkpointing and the DeepSpeed/DDP wrap are in place."""
    m, t = cfg.model, cfg.train
    if not (
        m.fused_experts
        or m.compile_layers
        or t.no_grad_below_first_lora
        # not speed: gpt-oss builds its masks without position_ids, so packed rows would attend across their
        # sequences; apply_speed_knobs isolates them (gptoss_hpc.modeling.fast.isolate_packed_sequences).
        or t.packing
        or t.padding_free
        # MXFP4-resident experts take their LoRA factored (gptoss_hpc.modeling.fast.mxfp4_experts)
        or getattr(m, "experts_dtype", "bfloat16") == "mxfp4"
        or t.gradient_checkpointing_offload
    ):
        return None
    from transformers import TrainerCallback

    class SpeedKnobsCallback(TrainerCallback):
        summary: dict[str, Any] | None = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            from gptoss_hpc.modeling.fast import apply_speed_knobs

            self.summary = apply_speed_knobs(model, cfg).summary()

    return SpeedKnobsCallback()


# Optimizer steps in which torch.compile may still compile (first shapes, grad-mode / checkpoint-recompute variants);
# a graph compiled after them is a recompile the run keeps paying for.
RECOMPILE_WARMUP_STEPS = 4


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (0 when torch is not loaded)."""
    import sys

    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def graph_breaks():
    """torch.compile's graph breaks in this process so far, by reason (empty when torch is not loaded). The train
    stage's compiled regions have none; on the H200, transformers' output-capturing hooks split every compiled
    decoder layer into ~6 graphs (gptoss_hpc.modeling.fast.router_logits)."""
    import sys
    from collections import Counter

    if "torch._dynamo" not in sys.modules:
        return Counter()
    from torch._dynamo.utils import counters

    return Counter({str(k): int(v) for k, v in counters["graph_break"].items() if v})


def recompile_watch_callback(warn, warmup_steps: int = RECOMPILE_WARMUP_STEPS):
    """A callback that reports torch.compile graphs compiled after ``warmup_steps`` optimizer steps: a region whose
    shapes or guards change per step recompiles for seconds each time, which a run's median step time hides (on the
    H200, MXFP4 experts with recompute recompiled at each new packed length: a 16-step run's mean throughput was a
    fifth of its median; docs/BENCHMARKS.md, session 6). ``warn(message)`` is called once, at the end of training,
    with the count and the steps; the first such step is also logged when it happens. Graph breaks in compiled
    regions (``graph_breaks``) made after the callback was created are reported the same way at the end."""
    import logging

    from transformers import TrainerCallback

    log = logging.getLogger(__name__)

    class RecompileWatch(TrainerCallback):
        def __init__(self) -> None:
            self.seen = 0  # optimizer steps of this process (a resumed run compiles afresh)
            self.last = 0
            self.steps: list[int] = []  # steps that compiled new graphs after the warm-up
            self.graphs = 0
            self.breaks_before = graph_breaks()  # process-wide counts: only this training's breaks are reported

        def on_step_end(self, args, state, control, **kwargs):
            now = compiled_graphs()
            self.seen += 1
            if self.seen <= warmup_steps:
                self.last = now
                return
            if now > self.last:
                if not self.steps:
                    log.warning(
                        "torch.compile compiled %d new graph(s) in optimizer step %d, after the %d warm-up steps: "
                        "some compiled region sees a new shape or guard; recompiles cost seconds each",
                        now - self.last, state.global_step, warmup_steps,
                    )  # fmt: skip
                self.steps.append(state.global_step)
                self.graphs += now - self.last
                self.last = now

        def on_train_end(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            breaks = graph_breaks() - self.breaks_before
            if breaks:
                top = "; ".join(f"{n}x {reason.splitlines()[0][:160]}" for reason, n in breaks.most_common(3))
                warn(
                    f"torch.compile split its compiled regions at {sum(breaks.values())} graph break(s) ({top}): "
                    "the host runs Python between the pieces, and a host-bound step leaves the GPU idle. "
                    "Run with TORCH_LOGS=graph_breaks to see where"
                )
            if not self.steps:
                return
            shown = ", ".join(str(s) for s in self.steps[:8]) + (" ..." if len(self.steps) > 8 else "")
            warn(
                f"torch.compile compiled {self.graphs} graph(s) after the first {warmup_steps} optimizer steps (in "
                f"steps {shown}): shapes or guards change per step and each recompile stalls training. With packed "
                "rows set train.pad_to_multiple_of to per_device_train_batch_size x max_length (one shape); or run "
                "with TORCH_LOGS=recompiles to see what changes"
            )

    return RecompileWatch()


def trainer_class(base: type, cfg: RunConfig, world_size: int, deepspeed: bool) -> type:
    """SFTTrainer with the real-token count kept on the device (see ``DeviceTokenCount``), and with
    train.loss_chunk_tokens > 0 a training loss of lm_head + CE in chunks (gptoss_hpc.modeling.fast): the same
    numbers without [tokens, 201088] fp32 logits."""
    chunk = int(getattr(cfg.train, "loss_chunk_tokens", 0) or 0)
    if chunk > 0 and world_size > 1 and not deepspeed:
        # The fused loss runs the decoder module directly; DDP syncs gradients only through its own forward.
        raise GptossHpcError(
            f"train.loss_chunk_tokens={chunk} with {world_size} ranks needs train.deepspeed=true "
            "(ZeRO reduces gradients by hooks; DDP would skip its sync); set train.loss_chunk_tokens=0"
        )

    class DeviceTokenCount(base):
        """transformers counts each micro-batch's real tokens with a gather and ``.item()``: a host sync per
        micro-batch, so the GPU idles while the host prepares the next one. Here the count stays a device tensor
        and is added to ``state.num_input_tokens_seen`` once per optimizer step, where every rank already meets
        (the loss gather of logging, before any checkpoint save): the same numbers in logs and checkpoints."""

        _pending_tokens: Any = None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            from gptoss_hpc.config.memory import arch_for
            from gptoss_hpc.modeling.useful_work import DocumentLengthsCollator, UsefulWork

            # each micro-batch's document lengths, counted on the CPU by the collator (modeling/useful_work.py)
            self.useful_work = UsefulWork(arch_for(cfg))
            self.data_collator = DocumentLengthsCollator(self.data_collator)

        def training_step(self, model, inputs, *args, **kwargs):
            self.useful_work.take(inputs)
            return super().training_step(model, inputs, *args, **kwargs)

        def prediction_step(self, model, inputs, *args, **kwargs):
            self.useful_work.take(inputs, count=False)
            return super().prediction_step(model, inputs, *args, **kwargs)

        def log(self, logs, *args, **kwargs):
            if self.model.training:
                logs.update(self.useful_work.logs())
            return super().log(logs, *args, **kwargs)

        def _track_num_input_tokens(self, inputs):
            pad = getattr(self.processing_class, "pad_token_id", None)
            ids = inputs.get("input_ids")
            if (
                self.args.include_num_input_tokens_seen != "non_padding"
                or "attention_mask" in inputs
                or pad is None
                or ids is None
            ):
                return super()._track_num_input_tokens(inputs)
            count = (ids != pad).sum()
            self._pending_tokens = count if self._pending_tokens is None else self._pending_tokens + count

        def _fold_token_count(self) -> None:
            import torch

            pending, self._pending_tokens = self._pending_tokens, None
            if pending is not None:
                pending = torch.as_tensor(pending, device=self.args.device, dtype=torch.int64)
                self.state.num_input_tokens_seen += int(self.accelerator.gather(pending).sum().item())

        def _maybe_log_save_evaluate(self, *args, **kwargs):
            self._fold_token_count()  # every rank calls this after every optimizer step
            return super()._maybe_log_save_evaluate(*args, **kwargs)

    if chunk <= 0:
        return DeviceTokenCount

    class ChunkedLossSFTTrainer(DeviceTokenCount):
        _items: tuple[Any, int] | None = None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            from gptoss_hpc.modeling.fast.loss import PredictedRowsCollator

            # TRL built its collator in __init__; the wrapper counts each micro-batch's predicted rows on the CPU
            self.data_collator = PredictedRowsCollator(self.data_collator)

        def _items_in_batch(self, num_items_in_batch):
            """transformers passes one device tensor to every micro-batch of an optimizer step: read it once per
            step (a device-to-host sync), not once per micro-batch."""
            import torch

            if not torch.is_tensor(num_items_in_batch):
                return num_items_in_batch
            if self._items is None or self._items[0] is not num_items_in_batch:
                self._items = (num_items_in_batch, int(num_items_in_batch.item()))
            return self._items[1]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs or inputs.get("labels") is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inner = model
            while hasattr(inner, "module"):  # DeepSpeedEngine -> PeftModel (ZeRO-1/2 params are whole)
                inner = inner.module
            items = self._items_in_batch(num_items_in_batch)
            loss, aux = chunked_training_loss(inner, inputs, chunk, items, self.aux_loss_enabled)
            # The rest mirrors SFTTrainer.compute_loss: token-normalised CE scaled back up for DDP's gradient
            # mean, and the MoE aux loss (a per-micro-batch mean) averaged over the accumulation steps.
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            if aux is not None:
                steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
                loss = loss + self.router_aux_loss_coef * aux.to(loss.device) / steps
            return loss

    return ChunkedLossSFTTrainer


def chunked_training_loss(model, inputs: dict[str, Any], chunk_tokens: int, num_items_in_batch, with_aux: bool):
    """(CE, MoE load-balancing loss or None) as gpt-oss's forward computes them, the CE in chunks from the
    hidden states (gptoss_hpc.modeling.fast) so the [tokens, 201088] logits never exist. The router logits come
    from the routers themselves (gptoss_hpc.modeling.fast.router_logits), not transformers' output-capturing
    hooks, which split every compiled decoder layer into several graphs."""
    from gptoss_hpc.modeling.fast import causal_lm_loss, unwrap
    from gptoss_hpc.modeling.fast.router_logits import (
        load_balancing_loss,
        recording,
        recording_routers,
        take_router_logits,
    )

    base = unwrap(model)
    routers = recording_routers(base) if with_aux else []
    with recording(routers):
        loss = causal_lm_loss(base, inputs, chunk_tokens=chunk_tokens, num_items_in_batch=num_items_in_batch)
    router_logits = take_router_logits(routers)
    if not with_aux:
        return loss, None
    aux = load_balancing_loss(router_logits, base.num_experts, base.num_experts_per_tok, inputs.get("attention_mask"))
    return loss, aux
