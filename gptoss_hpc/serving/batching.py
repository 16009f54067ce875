"""Continuous batching for serve: transformers' ``ContinuousBatchingManager`` decodes every running request in one
batch, new requests join at token boundaries, finished or cancelled ones leave, with a paged KV cache allocated
once at start (so a burst queues or is refused; it cannot grow the cache into an OOM).

Attention runs as ``paged|eager``: transformers' eager paged kernel adds gpt-oss's attention sinks (its
flash and sdpa paged kernels do not), and its paged cache keeps sliding-window layers to their window. Sampling
is per request (temperature, top_p); a greedy request asks for top_k=1, which leaves only the argmax to sample.
Where a model cannot be batched this way, ``batching_problem`` says why and the server falls back to one
generation at a time (``gptoss_hpc.serving.worker``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.serving.worker import GenerationFailedError, QueueFullError

log = logging.getLogger(__name__)

GIB = 1024**3
KV_SHARE_OF_CARD = 0.90  # of min(cluster.gpu_memory_gib, the card): weights + KV cache + workspace stay under it
DEFAULT_MAX_BATCH_TOKENS = 2048  # tokens per forward: bounds the prefill activations and the logits of a step
CPU_PAGE_SIZE = 64
CPU_FULL_REQUESTS = 4
START_TIMEOUT_S = 300.0  # the generation thread allocates the cache (and may warm up) before it serves


class EngineDownError(GptossHpcError):
    """The batching thread stopped (a fatal error in it): the server cannot generate (503)."""


class ContextTooLongError(GptossHpcError):
    """The prompt plus the requested new tokens do not fit this server's context (client error, 400)."""


def batch_model(model: Any) -> Any:
    """The transformers model to batch: a PeftModel's base model (its LoRA layers are injected in place, so the
    base model's forward runs the adapter unmerged)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def batching_problem(model: Any) -> str | None:
    """Why ``model`` cannot be served with continuous batching here, or None when it can."""
    import transformers

    target = batch_model(model)
    if not hasattr(target, "init_continuous_batching"):
        return f"transformers {transformers.__version__} has no continuous batching (init_continuous_batching)"
    try:
        from transformers.generation import ContinuousBatchingConfig  # noqa: F401
    except ImportError:
        return f"transformers {transformers.__version__} has no ContinuousBatchingConfig"
    attn = getattr(target.config, "_attn_implementation", None)
    if attn not in ("eager", "paged|eager", "sdpa", "flex_attention") and "flash" not in str(attn):
        return f"attention {attn!r} has no paged form in transformers (eager, sdpa and flash kernels do)"
    return None


@dataclass
class KVPlan:
    """How the paged cache is sized: ``capacity_tokens`` is what one request may hold (prompt + new tokens)."""

    capacity_tokens: int
    max_batch_tokens: int
    num_blocks: int | None = None  # CPU: given; CUDA: transformers sizes it from max_memory_percent
    max_memory_percent: float | None = None
    page_size: int | None = None
    note: str = ""


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """K and V of every layer for one token (sliding layers counted in full: the plan errs on the safe side)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype_bytes


def plan_kv_cache(model: Any, *, max_running: int, max_context: int, capacity_gib: float | None, device: Any) -> KVPlan:
    """Size the KV cache from the card: min(``capacity_gib`` (cluster.gpu_memory_gib), the card's memory) x
    KV_SHARE_OF_CARD, less what the loaded model holds now and the logits of one step, is the cache; transformers
    turns that into blocks through max_memory_percent (a share of the memory free once the model is loaded). On CPU
    the cache holds ``max_running`` requests of ``max_context`` tokens."""
    import torch

    config = batch_model(model).config.get_text_config()
    max_context = min(max_context, int(getattr(config, "max_position_embeddings", max_context) or max_context))
    max_batch_tokens = max(DEFAULT_MAX_BATCH_TOKENS, max_running)
    if getattr(device, "type", str(device)) != "cuda":
        # CPU serving is for tests and demos: room for CPU_FULL_REQUESTS requests of max_context tokens at once
        blocks = math.ceil(min(max_running, CPU_FULL_REQUESTS) * max_context / CPU_PAGE_SIZE)
        note = f"CPU KV cache of {blocks} blocks of {CPU_PAGE_SIZE} tokens"
        return KVPlan(max_context, max_batch_tokens, num_blocks=blocks, page_size=CPU_PAGE_SIZE, note=note)
    free, total = torch.cuda.mem_get_info(device)
    card = total if capacity_gib is None else min(total, int(capacity_gib * GIB))
    logits = 3 * max_batch_tokens * config.vocab_size * 4  # fp32 logits, softmax and a copy
    held = total - free
    budget = int(card * KV_SHARE_OF_CARD) - held - logits
    per_token = kv_bytes_per_token(config, torch.tensor([], dtype=batch_model(model).dtype).element_size())
    if budget < per_token * max_context:
        raise GptossHpcError(
            f"no room for a KV cache of one {max_context}-token request: the card allows {card / GIB:.1f} GiB "
            f"(cluster.gpu_memory_gib / the device), the model holds {held / GIB:.1f} GiB; lower --max-model-len"
        )
    percent = min(0.9, budget / free)
    note = f"KV cache {budget / GIB:.1f} GiB of a {card / GIB:.1f} GiB card (model {held / GIB:.1f} GiB)"
    return KVPlan(min(max_context, budget // per_token), max_batch_tokens, max_memory_percent=percent, note=note)


def _cb_config(plan: KVPlan, max_running: int) -> Any:
    """transformers' ContinuousBatchingConfig with the fields this transformers version has (5.17 and 5.25 differ)."""
    from transformers.generation import ContinuousBatchingConfig

    wanted = {
        "num_blocks": plan.num_blocks,
        "max_batch_tokens": plan.max_batch_tokens,
        "max_memory_percent": plan.max_memory_percent,
        "page_size": plan.page_size,
        "max_requests_per_batch": max_running,
        "per_request_processors": True,
        "auto_switch_to_flash": False,  # the flash paged kernels drop the attention sinks
        "allow_block_sharing": False,  # prefix sharing is off for sliding-window models anyway
    }
    names = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    dropped = sorted(k for k, v in wanted.items() if v is not None and k not in names)
    if dropped:
        log.info("this transformers' ContinuousBatchingConfig has no %s: left to its defaults", ", ".join(dropped))
    return ContinuousBatchingConfig(**{k: v for k, v in wanted.items() if v is not None and k in names})


@dataclass
class Progress:
    """What one request has generated so far (token ids, cumulative) and whether it ended."""

    tokens: list[int]
    finished: bool
    error: str | None = None


class BatchEngine:
    """One ContinuousBatchingManager and a router thread that hands each request's outputs to its waiter.

    At most ``max_running`` requests decode together and ``max_waiting`` more wait; one more gets QueueFullError
    (429). ``stream`` yields a request's progress token by token; leaving it early cancels the request and frees
    its cache blocks."""

    def __init__(
        self, model: Any, tokenizer: Any, stops: list[int], *, max_running: int, max_waiting: int, plan: KVPlan
    ) -> None:
        from transformers import GenerationConfig

        self.max_running, self.max_waiting, self.plan = max_running, max_waiting, plan
        self._model = batch_model(model)
        self._saved_attn = self._model.config._attn_implementation
        # Already paged, so that the manager keeps it: transformers 5.17 switches an eager model that supports
        # flash attention to a flash kernel when one is installed, and the flash paged kernels drop the sinks.
        self._model.set_attn_implementation("paged|eager")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
        # The processors exist only when their defaults are set: every request then passes its own values.
        generation = GenerationConfig(
            do_sample=True, temperature=0.5, top_k=50, top_p=0.9, eos_token_id=stops, pad_token_id=pad
        )
        self._manager = self._model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=_cb_config(plan, max_running)
        )
        self._lock = threading.Lock()
        self._routes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._started: set[str] = set()  # requests with a first token (running, not waiting)
        self._counter = 0
        self._stop = threading.Event()
        self._manager.start()
        self._wait_until_serving()
        self._router = threading.Thread(target=self._route, name="batch-router", daemon=True)
        self._router.start()
        log.info("continuous batching: %d running, %d waiting, %s", max_running, max_waiting, plan.note)

    def _wait_until_serving(self) -> None:
        """The manager allocates its cache on its own thread: a cache that does not fit fails there, so wait for
        it and raise here (the server does not start) instead of failing every request later."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while getattr(self._manager, "batch_processor", None) is None and time.monotonic() < deadline:
            if not self._manager.is_running():
                break
            time.sleep(0.05)
        status = getattr(self._manager, "background_thread_status", None)
        error = getattr(status, "fatal_error", None)
        if error is not None or not self._manager.is_running():
            self.close()
            raise GptossHpcError(
                f"continuous batching could not start: {error or 'its thread stopped'}; lower --max-running or "
                "--max-model-len, or serve one request at a time with --no-batching"
            )

    @property
    def active(self) -> int:
        return len(self._routes)

    @property
    def running(self) -> int:
        return len(self._started)

    @property
    def waiting(self) -> int:
        return self.active - self.running

    def ready(self) -> bool:
        return self._manager.is_running() and self._router.is_alive()

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens + max_new_tokens > self.plan.capacity_tokens:
            raise ContextTooLongError(
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_new_tokens}) is over this server's "
                f"context of {self.plan.capacity_tokens} tokens: shorten the conversation or lower max_tokens"
            )

    def submit(self, prompt: list[int], max_new_tokens: int, *, temperature: float | None, top_p: float | None) -> str:
        """Admit one request (ContextTooLongError, QueueFullError at once) and start it: its id for ``follow``."""
        self.check_fits(len(prompt), max_new_tokens)
        sampling = temperature is not None and temperature > 0
        with self._lock:
            if self.active >= self.max_running + self.max_waiting:
                raise QueueFullError(
                    f"the server is busy: {self.max_running} request(s) generate and {self.max_waiting} wait; "
                    "retry later"
                )
            self._counter += 1
            rid = f"req-{self._counter}"
            self._routes[rid] = (asyncio.get_running_loop(), asyncio.Queue())
        try:
            added = self._manager.add_request(
                prompt,
                request_id=rid,
                max_new_tokens=max_new_tokens,
                streaming=True,
                temperature=float(temperature) if sampling else 1.0,
                top_k=0 if sampling else 1,
                top_p=float(top_p) if sampling and top_p is not None else 1.0,
            )
        except Exception as exc:
            self.release(rid, cancel=False)
            raise EngineDownError(f"the batching thread refused the request: {exc}") from exc
        if added is None:  # the manager drops requests once its thread has stopped
            self.release(rid, cancel=False)
            raise EngineDownError("the batching thread has stopped; the server must be restarted (GET /ready is 503)")
        return rid

    async def follow(self, rid: str) -> AsyncIterator[Progress]:
        """Request ``rid``'s progress token by token; leaving early cancels it and frees its cache blocks."""
        finished = False
        try:
            queue = self._routes[rid][1]
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise GenerationFailedError(f"generation stopped: {out}") from out
                if getattr(out, "error", None):
                    raise GenerationFailedError(f"cannot generate for this input: {out.error}")
                finished = out.is_finished()
                yield Progress(list(out.generated_tokens), finished)
        finally:
            self.release(rid, cancel=not finished)

    def release(self, rid: str, *, cancel: bool) -> None:
        with self._lock:
            self._routes.pop(rid, None)
            self._started.discard(rid)
        if cancel:
            self._manager.cancel_request(rid)

    def _route(self) -> None:
        while not self._stop.is_set():
            try:
                out = self._manager.get_result(timeout=0.1)
            except Exception as exc:  # the manager failed: every waiter gets it
                self._fail_all(exc)
                return
            if out is None:
                if not self._manager.is_running():
                    self._fail_all(RuntimeError("the batching thread stopped"))
                    self._stop.wait(0.5)
                continue
            with self._lock:
                route = self._routes.get(out.request_id)
                if route is not None and out.generated_tokens:
                    self._started.add(out.request_id)
            if route is not None:
                loop, queue = route
                loop.call_soon_threadsafe(queue.put_nowait, out)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            routes = list(self._routes.values())
        for loop, queue in routes:
            loop.call_soon_threadsafe(queue.put_nowait, exc)

    def close(self) -> None:
        self._stop.set()
        if self._manager.is_running():
            self._manager.stop(block=True, timeout=30)
        router = getattr(self, "_router", None)
        if router is not None:
            router.join(timeout=5)
        if self._model.config._attn_implementation != self._saved_attn:
            self._model.set_attn_implementation(self._saved_attn)


def generate_completions(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict[str, Any]]],
    *,
    max_new_tokens: int,
    do_sample: bool,
    capacity_gib: float | None = None,
) -> list[str] | None:
    """Every conversation's completion, decoded together (the eval stage's generations): the text after the prompt
    with special tokens kept, ending at its stop token, as harmony.generate_completion returns it. None, with a
    warning saying why, when the model cannot be batched (the caller then generates one at a time)."""
    from gptoss_hpc.modeling.harmony import prompt_ids, stop_token_ids

    problem = batching_problem(model)
    if problem is not None:
        log.warning("generating one prompt at a time, not batched: %s", problem)
        return None
    if not conversations:
        return []
    prompts = [prompt_ids(tokenizer, c) for c in conversations]
    running = min(len(prompts), 32)
    context = max(len(p) for p in prompts) + max_new_tokens
    device = next(model.parameters()).device
    plan = plan_kv_cache(model, max_running=running, max_context=context, capacity_gib=capacity_gib, device=device)
    generation = getattr(batch_model(model), "generation_config", None)
    temperature = (getattr(generation, "temperature", None) or 1.0) if do_sample else None
    top_p = getattr(generation, "top_p", None) if do_sample else None
    engine = BatchEngine(
        model, tokenizer, stop_token_ids(tokenizer), max_running=running, max_waiting=len(prompts), plan=plan
    )

    async def one(prompt: list[int]) -> str:
        rid = engine.submit(prompt, max_new_tokens, temperature=temperature, top_p=top_p)
        tokens: list[int] = []
        async for step in engine.follow(rid):
            tokens = step.tokens
        return tokenizer.decode(tokens, skip_special_tokens=False)

    async def run_all() -> list[str]:
        return list(await asyncio.gather(*(one(p) for p in prompts)))

    try:
        return asyncio.run(run_all())
    finally:
        engine.close()
