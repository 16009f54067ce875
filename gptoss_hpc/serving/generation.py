"""What the routes call to generate: continuous batching (``gptoss_hpc.serving.batching``) when the model can be
batched, else today's one-at-a-time worker, with a warning that says why.

``Service.open`` admits a request at once (429 when full, 400 when it cannot fit) and returns a ``Completion``:
async-iterate it for the completion's text as it is generated (special tokens kept, cut at a ``stop`` string),
then read its ``answer``. Leaving the iteration early (a client that disconnects) frees the request's slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from gptoss_hpc.serving.batching import BatchEngine, KVPlan, batching_problem
from gptoss_hpc.serving.metrics import Metrics
from gptoss_hpc.serving.streaming import StopMatcher
from gptoss_hpc.serving.worker import Answer, GenerationFailedError, Generator

log = logging.getLogger(__name__)


@dataclass
class Completion:
    """One admitted request. ``answer`` is set once the iteration ends."""

    service: Service
    prompt_tokens: int
    stop: StopMatcher
    source: AsyncIterator[tuple[str, int, bool]]  # (whole completion text so far, its tokens, ended on a stop token)
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    completion_tokens: int = 0
    answer: Answer | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        text, on_stop_token, status = "", False, "cancelled"
        try:
            async with aclosing(self.source) as source:
                async for full, tokens, ends_on_stop in source:
                    on_stop_token = ends_on_stop
                    if self.first_token is None and tokens:
                        self.first_token = time.perf_counter()
                    self.completion_tokens = tokens
                    piece = self.stop.feed(full[len(text) :])
                    text = full
                    if piece:
                        yield piece
                    if self.stop.stopped:
                        break
            tail = self.stop.flush()
            if tail:
                yield tail
            finish = "stop" if self.stop.stopped or on_stop_token else "length"
            self.answer = self.service.generator.split(self.stop.text, finish)
            status = "ok"
        except GenerationFailedError:
            status = "error"
            raise
        finally:  # "cancelled": the consumer left (a client that disconnected)
            self.service.metrics.finished(self, status)


class Service:
    """The model behind the routes: batched when it can be (``mode`` says which path and why)."""

    def __init__(
        self,
        generator: Generator,
        *,
        max_running: int,
        plan: KVPlan | None,
        why_not_batched: str | None = None,
    ) -> None:
        from gptoss_hpc.modeling.harmony import stop_token_ids

        self.generator, self.tokenizer = generator, generator.tokenizer
        self.metrics = Metrics()
        self.stops = stop_token_ids(self.tokenizer)
        problem = why_not_batched or (batching_problem(generator.model) if plan is not None else "no KV plan")
        self.engine: BatchEngine | None = None
        if problem is None and plan is not None:
            self.engine = BatchEngine(
                generator.model,
                self.tokenizer,
                self.stops,
                max_running=max_running,
                max_waiting=generator.queue.max_waiting,
                plan=plan,
            )
            self.mode = f"continuous batching ({max_running} running, {generator.queue.max_waiting} waiting)"
        else:
            self.mode = f"one request at a time ({problem})"
            if why_not_batched is None:
                log.warning("continuous batching is off, serving one request at a time: %s", problem)
        self.metrics.gauges = lambda: {"running": self.running, "waiting": self.waiting}

    @property
    def running(self) -> int:
        if self.engine is not None:
            return self.engine.running
        return int(self.generator.queue.busy)

    @property
    def waiting(self) -> int:
        return self.engine.waiting if self.engine is not None else self.generator.queue.waiting

    def ready(self) -> bool:
        return self.engine.ready() if self.engine is not None else self.generator.queue.alive()

    def check_tokens(self, requested: int | None, field_name: str) -> int:
        return self.generator.check_tokens(requested, field_name)

    def open(
        self,
        messages: list[dict[str, Any]],
        max_new_tokens: int,
        *,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] = (),
    ) -> Completion:
        from gptoss_hpc.modeling.harmony import HarmonyFormatError, prompt_ids

        try:
            prompt = prompt_ids(self.tokenizer, messages)
        except (HarmonyFormatError, ValueError, TypeError) as exc:
            raise GenerationFailedError(f"cannot generate for this input: {exc}") from exc
        # refusals (429, 400, 503) raise here; the middleware counts them by status
        source = (
            self._batched(prompt, max_new_tokens, temperature, top_p)
            if self.engine is not None
            else self._serial(messages, max_new_tokens, temperature, top_p)
        )
        self.metrics.admitted(len(prompt))
        return Completion(self, len(prompt), StopMatcher(stop), source)

    async def run(self, messages: list[dict[str, Any]], max_new_tokens: int, **options: Any) -> Completion:
        """``open`` and generate to the end."""
        completion = self.open(messages, max_new_tokens, **options)
        async for _ in completion:
            pass
        return completion

    async def answer(self, messages: list[dict[str, Any]], max_new_tokens: int, **options: Any) -> Answer:
        completion = await self.run(messages, max_new_tokens, **options)
        assert completion.answer is not None  # set when the iteration ends without raising
        return completion.answer

    def _batched(
        self, prompt: list[int], n: int, temperature: float | None, top_p: float | None
    ) -> AsyncIterator[tuple[str, int, bool]]:
        assert self.engine is not None
        rid = self.engine.submit(prompt, n, temperature=temperature, top_p=top_p)
        return self._decode(self.engine.follow(rid))

    async def _decode(self, progress: AsyncIterator[Any]) -> AsyncIterator[tuple[str, int, bool]]:
        async with aclosing(progress) as steps:
            async for step in steps:
                text = self.tokenizer.decode(step.tokens, skip_special_tokens=False)
                if text.endswith("\ufffd") and not step.finished:
                    continue  # a character cut between tokens: wait for its end
                yield text, len(step.tokens), bool(step.tokens) and step.tokens[-1] in self.stops

    def _serial(
        self, messages: list[dict[str, Any]], n: int, temperature: float | None, top_p: float | None
    ) -> AsyncIterator[tuple[str, int, bool]]:
        future = self.generator.submit(messages, n, temperature=temperature, top_p=top_p)

        async def whole() -> AsyncIterator[tuple[str, int, bool]]:
            try:
                text = await asyncio.wrap_future(future)
            except Exception as exc:
                log.warning("generation failed: %s", exc)
                raise GenerationFailedError(f"cannot generate for this input: {exc}") from exc
            finally:
                future.cancel()  # a request still queued when its client left is never run
            tokens = len(self.tokenizer.encode(text, add_special_tokens=False))
            yield text, tokens, self.generator.ends_on_stop(text)

        return whole()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.generator.close()
